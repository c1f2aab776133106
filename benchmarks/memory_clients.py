"""Memory per client: peak memory of one process with few and with many clients.

A process holds one frozen backbone whatever its number of clients; a client's
own state is its adapter and (with optimizer_state=keep) its Adam state, kept
on the CPU between its turns. So peak memory must grow by about that much per
client, never by a model. Target: growth per client within 1.5x the bytes of
that client's adapter and optimiser state.

Each size runs in a fresh process (peak RSS from getrusage), after a run of the
same size that fills the feature cache (the cache holds one file per client, so
each size needs its own: a measured run that encoded images would count the
encoder pass's memory), on the same PACS images split IID among the clients (so
the data held is the same in every run), tiny backbone, 2 rounds.

    python benchmarks/memory_clients.py               # 10 and 200 clients
    python benchmarks/memory_clients.py --sizes 10 100 400
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACS = REPO.parent / "shared" / "data" / "PACS"

CHILD = r"""
import json, resource, sys
from fedclip_lightning.configure import load_config
from fedclip_lightning.federation.orchestrator import run
s = run(load_config(sys.argv[2:]))
print("RESULT " + json.dumps({"clients": len(s["clients"]), "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                              "adapter_bytes": s["bytes_per_client_per_round"],
                              "encoded": s["features"].get("encoded_images", 0)}))
"""


def measure(n: int, args, out: Path, env: dict) -> dict:
    ov = ["data=pacs", f"data.root={args.root}", "data.check_images=false", "data.partition.scheme=iid",
          f"data.partition.num_clients={n}", "data.partition.min_size=10", "data.unseen=[sketch]", "logger=none",
          "progress=false", f"output_dir={out}", f"run_name=n{n}", f"federation.rounds={args.rounds}",
          "algorithm.optimizer_state=keep", "federation.checkpoint_interval=0", f"backbone={args.backbone}"]
    proc = subprocess.run([sys.executable, "-c", CHILD, "x", *ov], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(PACS))
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 200])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--backbone", default="tiny_vit")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="fedclip-mem-"))
    env = dict(os.environ, FEDCLIP_CACHE_DIR=str(out / "cache"), PYTHONUNBUFFERED="1")
    env.pop("FEDCLIP_RUN_DIR", None)
    for n in args.sizes:  # fills the feature cache: every measured run reads it, none encodes
        measure(n, args, out, env)
    rows = [measure(n, args, out, env) for n in args.sizes]
    assert all(r["encoded"] == 0 for r in rows), "a measured run encoded images: its peak is not the rounds'"
    adapter = rows[0]["adapter_bytes"]
    state = 3 * adapter  # the adapter and Adam's two moments of the same shape
    print(f"per-client state: adapter {adapter:,} B + Adam moments {2 * adapter:,} B = {state:,} B")
    for r in rows:
        print(f"{r['clients']:>5} clients: peak RSS {r['maxrss_kb'] / 1024:8.1f} MiB")
    lo, hi = rows[0], rows[-1]
    growth = (hi["maxrss_kb"] - lo["maxrss_kb"]) * 1024 / (hi["clients"] - lo["clients"])
    print(f"growth per client from {lo['clients']} to {hi['clients']}: {growth / 1024:.1f} KiB = "
          f"{growth / state:.2f}x the client's state (target <= 1.5x)")


if __name__ == "__main__":
    main()
