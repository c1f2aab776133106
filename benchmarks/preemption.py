"""Time lost to a preemption: a run stopped by SIGUSR1 and resumed, against one never interrupted.

Both are the product's own command line on the same data (PACS_mini, tiny backbone, the encoder
on every batch so rounds take a while). The preempted run gets SIGUSR1 once its round-K checkpoint
exists; it finishes that round, checkpoints and exits (status 3); `resume=auto` continues it. Each
process is timed from outside, start-up included, since a real requeue pays start-up again.

    python benchmarks/preemption.py
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MINI = REPO.parent / "shared" / "data" / "PACS_mini"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--at", type=int, default=5, help="signal once this round's checkpoint exists")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fedclip-preempt-"))
    env = dict(os.environ, FEDCLIP_CACHE_DIR=str(tmp / "cache"), PYTHONUNBUFFERED="1")
    env.pop("FEDCLIP_RUN_DIR", None)
    base = [sys.executable, "-m", "fedclip_lightning", "experiment=pacs_mini_debug", f"data.root={MINI}",
            "logger=none", "progress=false", "features=reference", f"federation.rounds={args.rounds}",
            "federation.checkpoint_min_seconds=0",
            f"output_dir={tmp}"]

    t0 = time.perf_counter()
    subprocess.run([*base, "run_name=plain"], env=env, check=True, capture_output=True)
    plain = time.perf_counter() - t0

    t0 = time.perf_counter()
    proc = subprocess.Popen([*base, "run_name=stopped"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    mark = tmp / "stopped" / "checkpoints" / f"round-{args.at:06d}" / "COMPLETE"
    while not mark.exists():
        if proc.poll() is not None:
            sys.exit("the run ended before it could be preempted: raise --rounds")
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    proc.wait()
    first = time.perf_counter() - t0
    assert proc.returncode == 3, proc.stderr.read()
    t0 = time.perf_counter()
    subprocess.run([*base, "run_name=stopped", "resume=auto"], env=env, check=True, capture_output=True)
    second = time.perf_counter() - t0

    a = json.loads((tmp / "plain" / "summary.json").read_text())
    b = json.loads((tmp / "stopped" / "summary.json").read_text())
    same = all(a[k] == b[k] for k in ("selected", "final", "rounds_run"))
    print(f"uninterrupted run, {args.rounds} rounds:   {plain:6.1f} s")
    print(f"preempted after round {b['resumed_from']} + resumed: {first:6.1f} s + {second:.1f} s = {first + second:.1f} s")
    print(f"time lost to the preemption: {first + second - plain:.1f} s ({(first + second) / plain:.2f}x); "
          f"same metrics: {same}")


if __name__ == "__main__":
    main()
