"""A FedCLIP round three ways, in one invocation: in one process (Fabric), through the in-process Flower
Grid (Flower's serialisation, each node rebuilt per message, no network), and over a real SuperLink with
SuperNodes on loopback two ways: a ClientApp process per message (Flower 1.42's default) and the package's
warm worker (``python -m fedclip_lightning.flower worker``: each task forked from a warm process). Prints the mean time of
a round (fit, aggregation, checkpoint; the last round also evaluates) and each path's overhead over the
first.

    python benchmarks/flower_round.py [--rounds 4] [--root ../shared/data/PACS_mini]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mean_round(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["round_seconds_mean"]


def loopback(overrides: list[str], root: Path, work: Path, nodes: list[str], warm: bool) -> Path:
    from fedclip_lightning.flower import APP_DIR

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    link, procs = port(), []

    def start(name, args):
        (work / name).mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen(args, cwd=work, env={**env, "FLWR_HOME": str(work / name)},
                                      stdout=open(work / f"{name}.log", "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))
    try:
        start("link", ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation", "--host",
                       "127.0.0.1", "--port", str(link)])
        while "Uvicorn running" not in (work / "link.log").read_text():
            time.sleep(0.3)
        for n in nodes:
            p = port()
            start(n, ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}", "--port", str(p),
                      "--node-config", f'client="{n}" data-root="{root}" cache-dir="{work / "cache" / n}"',
                      *(["--isolation", "process"] if warm else [])])
            if warm:  # the package's warm worker runs the node's ClientApp tasks
                start(f"{n}-worker", [sys.executable, "-m", "fedclip_lightning.flower", "worker", "--insecure",
                                      "--runtime-api-address", f"127.0.0.1:{p}"])
        (work / "cli").mkdir(exist_ok=True)
        (work / "cli" / "config.toml").write_text(f'[superlink]\ndefault = "b"\n[superlink.b]\naddress = '
                                                  f'"127.0.0.1:{link}"\ninsecure = true\n')
        out = work / "out"
        name = "warm" if warm else "loopback"
        cfg = f'overrides="{" ".join(overrides)} output_dir={out} run_name={name}" min-nodes={len(nodes)}'
        subprocess.run(["flwr", "run", str(APP_DIR), "b", "--stream", "--run-config", cfg], cwd=work,
                       env={**env, "FLWR_HOME": str(work / "cli")}, check=True, stdout=subprocess.DEVNULL)
        return out / name
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGTERM)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--root", type=Path, default=REPO.parent / "shared" / "data" / "PACS_mini")
    a = ap.parse_args()
    from fedclip_lightning.configure import load_config
    from fedclip_lightning.federation.orchestrator import run
    from fedclip_lightning.flower.client_app import app
    from fedclip_lightning.flower.grid import InProcessGrid
    from fedclip_lightning.flower.transport import FlowerClients

    nodes = ["art_painting", "cartoon"]
    overrides = ["experiment=pacs_mini_debug", f"data.domains=[{','.join(nodes)}]", "data.unseen=[]",
                 f"federation.rounds={a.rounds}", f"federation.eval_interval={a.rounds}", "logger=none",
                 "progress=false", "federation.zero_shot_baseline=false", "federation.checkpoint_min_seconds=0"]
    root = a.root.resolve()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        os.environ["FEDCLIP_CACHE_DIR"] = str(work / "cache" / "server")
        run(load_config([*overrides, f"data.root={root}", f"output_dir={work / 'out'}", "run_name=fabric"]))
        grid = InProcessGrid(app, {i + 1: {"client": n, "data-root": str(root), "cache-dir": str(work / "cache" / n)}
                                   for i, n in enumerate(nodes)})
        run(load_config([*overrides, f"output_dir={work / 'out'}", "run_name=grid"]),
            remote=FlowerClients(grid, overrides, min_nodes=len(nodes), poll=0.0))
        rows = [("one process (Fabric)", mean_round(work / "out" / "fabric")),
                ("in-process Flower Grid", mean_round(work / "out" / "grid")),
                ("loopback, Flower's process per message", mean_round(loopback(overrides, root, work, nodes, False))),
                ("loopback, the package's warm worker", mean_round(loopback(overrides, root, work, nodes, True)))]
    print(f"\nFedCLIP on PACS_mini, tiny backbone, {len(nodes)} clients, mean of {a.rounds} rounds "
          "(fit + aggregate + checkpoint; the last one also evaluates)")
    print(f"{'path':40s} {'s/round':>9s} {'overhead s':>11s} {'x':>7s}")
    for name, t in rows:
        print(f"{name:40s} {t:9.3f} {t - rows[0][1]:11.3f} {t / rows[0][1]:7.1f}")


if __name__ == "__main__":
    main()
