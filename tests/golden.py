"""Golden numbers: every algorithm's results on PACS_mini with the tiny backbone, frozen in a file.

A refactoring must not change a single bit of what any algorithm computes. This
module runs each configuration below (one process in this interpreter, two
through the real command line) and reduces its outputs to a record:

* ``metrics``: metrics.csv verbatim (every evaluated round's accuracy and loss,
  per client, split and unseen domain, as the run printed them);
* ``selected`` / ``final``: summary.json's model selection and final round;
* ``bytes``: the communication counters;
* ``states``: a SHA-256 of every tensor of the saved adapters / models
  (``*_selected.pt``, ``*_final.pt``, ``adapters_final.pt``).

``tests/test_golden.py`` compares fresh runs with ``tests/golden/pacs_mini.json``.
Re-record only when a change is meant to alter the numbers, and say why in
the commit::

    python tests/golden.py --record
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import PACS_MINI  # noqa: E402

GOLDEN_FILE = Path(__file__).resolve().parent / "golden" / "pacs_mini.json"

# A learning rate high enough that three rounds move every tensor well past float noise.
COMMON = ["experiment=pacs_mini_debug", f"data.root={PACS_MINI}", "progress=false", "logger=none",
          "federation.rounds=3", "algorithm.lr=1e-3"]

CASES: dict[str, list[str]] = {
    "fedclip": ["algorithm=fedclip"],
    "fedclip_reference_path": ["algorithm=fedclip", "features=reference"],
    "fedclip_prototype": ["algorithm=fedclip", "algorithm.loss=prototype"],
    "fedclip_keep": ["algorithm=fedclip", "algorithm.optimizer_state=keep"],
    "fedclip_samples": ["algorithm=fedclip", "federation.aggregation=samples"],
    "fedclip_half": ["algorithm=fedclip", "federation.client_fraction=0.5"],
    "zeroshot": ["algorithm=zeroshot"],
    "fedavg": ["algorithm=fedavg", "algorithm.lr=1e-5", "federation.rounds=2"],
    "fedavg_image": ["algorithm=fedavg", "algorithm.trainable=image", "algorithm.lr=1e-5", "federation.rounds=2"],
    "fedavg_adapter": ["algorithm=fedavg", "algorithm.trainable=adapter", "algorithm.prompt=null"],
    "fedprox": ["algorithm=fedprox", "algorithm.lr=1e-5", "algorithm.mu=0.5", "federation.rounds=2"],
    "fedprox_adapter": ["algorithm=fedprox", "algorithm.trainable=adapter", "algorithm.mu=0.5"],
    "local": ["algorithm=local"],
    "local_keep": ["algorithm=local", "algorithm.optimizer_state=keep"],
    "fedclip_ft": ["algorithm=fedclip_ft", "algorithm.personal_epochs=2"],
    # The server side (issue 10): each option's numbers, and 1 vs 2 processes.
    "server_adam_unreliable": ["algorithm=fedclip", "federation.server_optimizer=adam", "federation.dropout=0.3",
                               "federation.straggler_fraction=0.5", "federation.local_epochs_range=[1,2]"],
    "trimmed_mean_gaussian_attack": ["algorithm=fedclip", "federation.aggregator=trimmed_mean",
                                     "federation.trim_beta=0.34", "federation.attack=gaussian",
                                     "federation.attack_fraction=0.34"],
    "krum_sign_flip": ["algorithm=fedclip_ft", "federation.aggregator=krum", "federation.attack=sign_flip",
                       "federation.attack_fraction=0.34", "federation.server_optimizer=yogi"],
    "dp_server_momentum": ["algorithm=fedclip", "federation.dp=server", "federation.dp_clip=0.05",
                           "federation.server_optimizer=momentum", "federation.client_fraction=0.67"],
    "dp_client_target": ["algorithm=fedavg", "algorithm.trainable=adapter", "federation.dp=client",
                         "federation.dp_target_epsilon=20", "federation.server_optimizer=adagrad"],
    # The other parameter-efficient methods (issue 11) and a bottleneck adapter.
    "promptfl": ["algorithm=promptfl", "algorithm.n_ctx=4"],
    "clip_adapter": ["algorithm=clip_adapter"],
    "linear_probe": ["algorithm=linear_probe"],
    "fedclip_hidden8": ["algorithm=fedclip", "algorithm.adapter_hidden=8"],
    "promptfl_ft": ["algorithm=promptfl_ft", "algorithm.n_ctx=4", "algorithm.personal_epochs=2"],
}

# Cases also run on two processes (each spawn costs seconds): one of each code path across ranks.
TWO_PROCESS = ("fedclip_keep", "fedclip_half", "fedavg", "fedprox_adapter", "local_keep", "fedclip_ft", "zeroshot",
               "server_adam_unreliable", "krum_sign_flip", "dp_server_momentum")


def _digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()[:24]


def record_of(run_dir: Path) -> dict:
    """What a run directory says, reduced to the numbers that must never drift."""
    s = json.loads((run_dir / "summary.json").read_text())
    states = {}
    for f in sorted(run_dir.glob("*.pt")):
        saved = torch.load(f, map_location="cpu", weights_only=True)
        states[f.name] = {"round": saved["round"], **{k: _digest(v) for k, v in sorted(saved["state"].items())}}
    return {
        "status": s["status"],
        "metrics": (run_dir / "metrics.csv").read_text().splitlines(),
        "selected": s["selected"], "final": s["final"], "selected_round": s["selected_round"],
        "bytes": [s["bytes_up_total"], s["bytes_down_total"], s["bytes_per_client_per_round"]],
        "params": [s["trainable_params"], s["communicated_params"]],
        "states": states,
    }


def run_one_process(name: str, out: Path) -> dict:
    from fedclip_lightning.config import load_config
    from fedclip_lightning.federation.orchestrator import run

    cfg = load_config([*COMMON, *CASES[name], f"output_dir={out}", f"run_name={name}",
                       f"features.dir={out / 'features'}"])
    run(cfg)
    return record_of(out / name)


def run_two_processes(name: str, out: Path) -> dict:
    from helpers import run_cli

    out.mkdir(parents=True, exist_ok=True)
    proc = run_cli([*COMMON, *CASES[name], f"output_dir={out}", f"run_name={name}", "fabric.devices=2"], out)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} on 2 processes failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return record_of(out / name)


def load_golden() -> dict:
    return json.loads(GOLDEN_FILE.read_text())


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true", help="run the cases and (re)write the golden file")
    ap.add_argument("--only", nargs="+", choices=list(CASES), help="re-record these cases only, keep the rest")
    args = ap.parse_args()
    if not args.record:
        ap.print_help()
        return
    golden: dict = load_golden() if args.only else {"one_process": {}, "two_processes": {}}
    cases = args.only or list(CASES)
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases:
            golden["one_process"][name] = run_one_process(name, Path(tmp) / "one")
            print(f"recorded {name} (1 process)", flush=True)
        for name in (n for n in TWO_PROCESS if n in cases):
            golden["two_processes"][name] = run_two_processes(name, Path(tmp) / "two")
            print(f"recorded {name} (2 processes)", flush=True)
    GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN_FILE.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    same = [n for n in TWO_PROCESS if golden["two_processes"][n] == golden["one_process"][n]]
    print(f"wrote {GOLDEN_FILE}; 2 processes equal 1 bitwise for {len(same)} of {len(TWO_PROCESS)} cases: {same}")


if __name__ == "__main__":
    main()
