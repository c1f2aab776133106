"""Thousands of clients on the same images: a FedCLIP round's time and a process's memory, side by side
(``federation.client_batching=auto``: the clients' adapters in batched products) and one at a time
(``off``), for 3 to 10,000 clients.

The images are the same for every size: the demo's three client styles drawn large enough that 10,000
clients each get at least 2 training images (``data.synthetic_per_class=3500``: 3 styles x 5 shapes x
3,500 = 52,500 images, 5 or 6 a client at 10,000, 3 of them for training), split IID among the clients, no
unseen domain, the demo's small CLIP (64-d features, an adapter of 8,320 values). Each run is a fresh process, after a run of the same size that fills the feature cache
(one file per client, so each size encodes once: a measured run that encoded images would count the encoder
pass), ``federation.rounds`` rounds evaluated at the end only.

Printed per size and mode: the seconds of a training round (configure, fit, aggregate, checkpoint: the
round time less the last round's evaluation), the evaluation of every client at the end, and the peak RSS;
then each size's round against the 3-client round (target: 3,000 clients side by side at most 2x), and the
memory each client adds against its adapter plus Adam state (target at 10,000 clients: at most 1.5x).

    python benchmarks/many_clients.py                     # 3 .. 10,000 clients, both modes
    python benchmarks/many_clients.py --sizes 3 300 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
from fedclip_lightning.configure import load_config
from fedclip_lightning.federation.orchestrator import run
s = run(load_config(sys.argv[1:]))
print("RESULT " + json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "rounds": s["rounds_run"], "total": s["round_seconds_total"], "phases": s["phase_seconds"],
    "setup": s["setup_seconds"], "adapter_bytes": s["bytes_per_client_per_round"],
    "encoded": s["features"].get("encoded_images", 0), "clients": len(s["clients"]),
    "training": s["client_training"], "test": s["final"]["mean_client_test_acc"],
    "min_train": min(v["train"] for v in s["num_samples"].values() if "train" in v)}))
"""


def run(n: int, mode: str, rounds: int, args, out: Path, env: dict) -> dict:
    ov = [f"data.synthetic_per_class={args.per_class}", "data.check_images=false", "data.domains=[sketch,chalk,neon]",
          "data.unseen=[]", "data.partition.scheme=iid",
          f"data.partition.num_clients={n}", "data.partition.min_size=2", f"federation.rounds={rounds}",
          f"federation.eval_interval={rounds}", "federation.zero_shot_baseline=false", "logger=none",
          "progress=false", f"federation.client_batching={mode}", f"output_dir={out}", f"run_name=n{n}-{mode}"]
    proc = subprocess.run([sys.executable, "-c", CHILD, *ov], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{n} clients, {mode}: the run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    r = json.loads(line[len("RESULT "):])
    r["round_s"] = (r["total"] - r["phases"]["evaluate"] - r["phases"]["logging"]) / r["rounds"]
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[3, 30, 300, 3000, 10000])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-class", type=int, default=3500)
    ap.add_argument("--modes", nargs="+", default=["auto", "off"], choices=["auto", "off"])
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="fedclip-many-"))
    env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    rows = {}
    for n in args.sizes:
        run(n, "auto", 1, args, out, env)  # fills this size's feature cache
        for mode in args.modes:
            r = rows[(n, mode)] = run(n, mode, args.rounds, args, out, env)
            assert r["encoded"] == 0, "a measured run encoded images: its peak is not the rounds'"
            assert r["min_train"] >= 2, f"{n} clients: a client has {r['min_train']} training image(s)"
            assert (r["training"] == "side by side") == (mode == "auto"), r["training"]
            print(f"{n:>6} clients {('side by side' if mode == 'auto' else 'one at a time'):>13}: "
                  f"round {r['round_s']:7.3f} s, evaluation {r['phases']['evaluate']:6.2f} s, "
                  f"set-up {r['setup']:6.2f} s, peak RSS {r['maxrss_kb'] / 1024:7.1f} MiB, "
                  f"test {100 * r['test']:.2f}%", flush=True)
    adapter = next(iter(rows.values()))["adapter_bytes"]
    state = 3 * adapter  # the adapter and Adam's two moments of the same shape
    print(f"\nper-client state: adapter {adapter:,} B + Adam moments {2 * adapter:,} B = {state:,} B")
    base = min(args.sizes)
    for mode in args.modes:
        name = "side by side" if mode == "auto" else "one at a time"
        b = rows[(base, mode)]
        for n in args.sizes:
            if n == base:
                continue
            r = rows[(n, mode)]
            growth = (r["maxrss_kb"] - b["maxrss_kb"]) * 1024 / (n - base)
            print(f"{name:>13}, {n:>6} clients: round {r['round_s'] / b['round_s']:6.2f}x the {base}-client round; "
                  f"memory per client {growth / 1024:6.1f} KiB = {growth / state:5.2f}x its adapter + Adam state")
    if "auto" in args.modes and "off" in args.modes:
        for n in args.sizes:
            print(f"{n:>6} clients: side by side {rows[(n, 'off')]['round_s'] / rows[(n, 'auto')]['round_s']:6.2f}x "
                  "faster a round than one at a time")


if __name__ == "__main__":
    main()
