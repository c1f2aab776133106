"""Start-up: a cold run from the command to its exit, against its own encoder pass.

A cold 200-round FedCLIP run on the 42-image-per-domain PACS subset (ViT-B-32 at random init, fp32 on the
CPU, a fresh feature cache, ``data.check_images`` as its default) spends most of its time encoding the 168
images; everything else (starting the interpreter, imports, composing the config, scanning the folders,
building the model, the rounds, writing the outputs) is the overhead this script measures. Printed in one
run, each figure from the same command:

1. the command's wall time (spawn to exit), as a multiple of its own encoder phase (target: <= 1.3x);
2. where the rest goes: the interpreter and imports (``python -c 'import ...'`` of what the command
   imports, timed the same way), composing the config and the checks until the run starts, the run's
   set-up besides encoding (scanning, the model, the text features), the rounds, the end (the table,
   the plot, closing files).

    python benchmarks/startup.py [--rounds 200] [--per-domain 42] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACS = REPO.parent / "shared" / "data" / "PACS"


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(PACS))
    ap.add_argument("--backbone", default="ViT-B-32")
    ap.add_argument("--per-domain", type=int, default=42)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=2, help="cold runs (each with a fresh cache); medians")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fedclip-startup-"))
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("FEDCLIP_RUN_DIR", None)
    imports = "import fedclip_lightning.cli, fedclip_lightning.configure, fedclip_lightning.federation.orchestrator"
    rows: dict[str, list[float]] = {k: [] for k in ("wall", "encode", "imports", "before", "setup", "rounds", "end")}
    for i in range(args.repeat):
        out = tmp / f"run{i}"
        ov = ["data=pacs", f"data.root={args.root}", "data.unseen=[art_painting]", f"backbone.name={args.backbone}",
              "backbone.pretrained=null", "backbone.download=false", "fabric=cpu", "logger=none", "progress=false",
              f"data.max_per_domain={args.per_domain}", f"federation.rounds={args.rounds}", f"output_dir={out}",
              "run_name=cold", f"features.dir={out / 'features'}"]
        rows["imports"].append(timed([sys.executable, "-c", imports], env))
        wall = timed([sys.executable, "-m", "fedclip_lightning", *ov], env)
        s = json.loads((out / "cold" / "summary.json").read_text())
        encode = s["features"]["encode_seconds_max_rank"]
        rows["wall"].append(wall)
        rows["encode"].append(encode)
        rows["before"].append(wall - s["wall_time_s"] - rows["imports"][-1])  # composing and checking, then exit
        rows["setup"].append(s["setup_seconds"] - encode)
        rows["rounds"].append(s["round_seconds_total"])
        rows["end"].append(s["wall_time_s"] - s["setup_seconds"] - s["round_seconds_total"])
    med = {k: statistics.median(v) for k, v in rows.items()}
    import torch

    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__}; {args.backbone} random init, fp32, PACS "
          f"{args.per_domain} per domain ({s['features']['encoded_images']} images), {args.rounds} rounds; "
          f"medians of {args.repeat} cold runs\n")
    table = [
        ("the command, spawn to exit", med["wall"], f"**{med['wall'] / med['encode']:.2f}x** its encoder phase "
                                                    "(target <= 1.3x)"),
        ("  its encoder phase", med["encode"], "1.00x"),
        ("  interpreter and imports", med["imports"], f"{med['imports'] / med['encode']:.2f}x"),
        ("  composing and checking the config, exit", med["before"], f"{med['before'] / med['encode']:.2f}x"),
        ("  set-up besides encoding (scan, model, text)", med["setup"], f"{med['setup'] / med['encode']:.2f}x"),
        (f"  {args.rounds} rounds", med["rounds"], f"{med['rounds'] / med['encode']:.2f}x"),
        ("  the end (table, plot, files)", med["end"], f"{med['end'] / med['encode']:.2f}x"),
    ]
    w = max(len(r[0]) for r in table)
    for name, sec, note in table:
        print(f"{name:<{w}}  {sec:7.2f} s  {note}")


if __name__ == "__main__":
    main()
