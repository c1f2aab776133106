"""Golden numbers: every algorithm's results on PACS_mini with the tiny backbone, frozen in a file.

A refactoring must not change a single bit of what any algorithm computes. This
module runs each configuration below and reduces its outputs to a record:

* ``metrics``: metrics.csv verbatim (every evaluated round's accuracy and loss,
  per client, split and unseen domain, as the run printed them);
* ``selected`` / ``final``: summary.json's model selection and final round;
* ``bytes``: the communication counters;
* ``states``: a SHA-256 of every tensor of the saved adapters / models
  (``*_selected.pt``, ``*_final.pt``, ``adapters_final.pt``);
* ``values``: three float64 figures of each such tensor (sum, L2 norm, a fixed
  weighted sum), for comparing runs whose bits may differ.

The numbers are recorded under the portable numerics profile
(``fedclip_lightning.numerics.PORTABLE``: AVX2 kernels, MKL's COMPATIBLE
branch, one thread), which gives the same bits on any x86-64 CPU with AVX2, so
``tests/test_golden.py`` checks them bit for bit on whatever machine it runs
(one process and two). It also runs every case with the machine's own kernels
and compares those within ``TOLERANCE``. Re-record only when a change is meant
to alter the numbers, and say why in the commit (CI never records)::

    python tests/golden.py --record              # every case
    python tests/golden.py --record --only fedclip local
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path


if __name__ == "__main__" and "--record" in sys.argv:
    # Record under the portable profile: its variables must be set before torch is imported.
    from fedclip_lightning.numerics import PORTABLE, SWITCH, is_portable

    if not is_portable():
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **PORTABLE, SWITCH: "portable"})

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import PACS_MINI  # noqa: E402

GOLDEN_FILE = Path(__file__).resolve().parent / "golden" / "pacs_mini.json"

# A learning rate high enough that three rounds move every tensor well past float noise.
# The clients one at a time (federation.client_batching=off): the numbers these cases have always recorded; side by
# side equals them to float rounding (tests/test_batched.py).
# No end-of-run figures (they change no number; test_tables_plots and the PEFT tests draw them for each layout of
# metrics.csv).
COMMON = ["experiment=pacs_mini_debug", f"data.root={PACS_MINI}", "progress=false", "plots=false", "logger=none",
          "federation.rounds=3", "algorithm.lr=1e-3", "federation.client_batching=off"]

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
    # The server side: each option's numbers, and 1 vs 2 processes.
    "server_adam_unreliable": ["algorithm=fedclip", "federation.server_optimizer.name=adam",
                               "federation.unreliable.dropout=0.3", "federation.unreliable.straggler_fraction=0.5",
                               "federation.unreliable.local_epochs_range=[1,2]"],
    "trimmed_mean_gaussian_attack": ["algorithm=fedclip", "federation.aggregator.name=trimmed_mean",
                                     "federation.aggregator.trim_beta=0.34", "federation.attack.name=gaussian",
                                     "federation.attack.fraction=0.34"],
    "krum_sign_flip": ["algorithm=fedclip_ft", "federation.aggregator.name=krum", "federation.attack.name=sign_flip",
                       "federation.attack.fraction=0.34", "federation.server_optimizer.name=yogi"],
    "dp_server_momentum": ["algorithm=fedclip", "federation.privacy.mode=server", "federation.privacy.clip=0.05",
                           "federation.server_optimizer.name=momentum", "federation.client_fraction=0.67"],
    "dp_client_target": ["algorithm=fedavg", "algorithm.trainable=adapter", "federation.privacy.mode=client",
                         "federation.privacy.target_epsilon=20", "federation.server_optimizer.name=adagrad"],
    # The other parameter-efficient methods and a bottleneck adapter.
    "promptfl": ["algorithm=promptfl", "algorithm.n_ctx=4"],
    "clip_adapter": ["algorithm=clip_adapter"],
    "linear_probe": ["algorithm=linear_probe"],
    "fedclip_hidden8": ["algorithm=fedclip", "algorithm.adapter_hidden=8"],
    "promptfl_ft": ["algorithm=promptfl_ft", "algorithm.n_ctx=4", "algorithm.personal_epochs=2"],
    "promptfl_csc": ["algorithm=promptfl", "algorithm.n_ctx=4", "algorithm.csc=true"],
    # the evaluation protocols (few-shot clients, base-to-novel) with the prompt methods they are known for
    "fedtpg_protocols": ["algorithm=fedtpg", "algorithm.hidden=16", "data.shots=2", "data.classes.split=base_novel"],
    "cocoop_protocols": ["algorithm=cocoop", "data.shots=2", "data.classes.split=base_novel"],
}

# Cases also run on two processes (in one launch of two ranks): one of each code path across ranks.
TWO_PROCESS = ("fedclip_keep", "fedclip_half", "fedavg", "fedprox_adapter", "local_keep", "fedclip_ft", "zeroshot",
               "server_adam_unreliable", "krum_sign_flip", "dp_server_momentum", "promptfl", "clip_adapter",
               "linear_probe", "promptfl_ft", "fedclip_hidden8", "fedclip_samples", "promptfl_csc", "fedtpg_protocols",
               "cocoop_protocols")


def _digest(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest()[:24]


def _values(t: torch.Tensor) -> list[float]:
    """Sum, L2 norm and a fixed weighted sum (weights in [-0.5, 0.5), by position), in float64."""
    t = t.detach().cpu().reshape(-1).double()
    w = (torch.arange(t.numel(), dtype=torch.float64) * 0.6180339887498949) % 1.0 - 0.5
    return [float(t.sum()), float(t.norm()), float((t * w).sum())]


# The numbers the golden file recorded: metrics.csv's first five columns (round, client, split, accuracy,
# loss) and the accuracies of summary.json's blocks. Balanced accuracy (a later column and keys) is computed
# from the same predictions and held by tests/test_protocols.py.
RECORDED_COLUMNS = 5


def _recorded_columns(row: str) -> str:
    return ",".join(row.split(",")[:RECORDED_COLUMNS])


def _recorded_keys(block: dict | None) -> dict | None:
    return None if block is None else {k: v for k, v in block.items() if "balanced" not in k}


def _nan_as_text(x):
    """NaN (a split with no image of those classes) as "nan", so that records compare equal with ``==``."""
    if isinstance(x, dict):
        return {k: _nan_as_text(v) for k, v in x.items()}
    return "nan" if isinstance(x, float) and x != x else x


def record_of(run_dir: Path) -> dict:
    """What a run directory says, reduced to the numbers that must never drift."""
    s = json.loads((run_dir / "summary.json").read_text())
    states, values = {}, {}
    for f in sorted(run_dir.glob("*.pt")):
        saved = torch.load(f, map_location="cpu", weights_only=True)
        states[f.name] = {"round": saved["round"], **{k: _digest(v) for k, v in sorted(saved["state"].items())}}
        values[f.name] = {k: _values(v) for k, v in sorted(saved["state"].items())}
    return {
        "status": s["status"],
        "metrics": [_recorded_columns(row) for row in (run_dir / "metrics.csv").read_text().splitlines()],
        "selected": _recorded_keys(s["selected"]), "final": _recorded_keys(s["final"]),
        "selected_round": s["selected_round"],
        "bytes": [s["bytes_up_total"], s["bytes_down_total"], s["bytes_per_client_per_round"]],
        # base-to-novel's scores where the case has them (a case without them records no such key)
        **({"base_novel": _nan_as_text(s["base_novel"])} if s.get("base_novel") else {}),
        "params": [s["trainable_params"], s["communicated_params"]],
        "states": states,
        "values": values,
    }


def run_one_process(name: str, out: Path, extra: tuple[str, ...] = ()) -> dict | None:
    """One case in this interpreter, with the kernels this process was started with (its record; None on a
    rank other than 0 of several)."""
    from fedclip_lightning.configure import load_config
    from fedclip_lightning.federation.orchestrator import run

    cfg = load_config([*COMMON, *CASES[name], *extra, f"output_dir={out}", f"run_name={name}",
                       f"features.dir={out / 'features'}"])
    run(cfg)
    return record_of(out / name) if os.environ.get("LOCAL_RANK", "0") == "0" else None


class Background:
    """Child processes that run golden cases while this interpreter does other work; ``result()`` waits for
    them and returns ``{name: record}`` (rank 0's, for two ranks)."""

    def __init__(self, what: str, procs: list, result: Path, timeout: int):
        import time

        self.what, self.procs, self.path, self.deadline = what, procs, result, time.monotonic() + timeout
        self._records: dict | None = None

    def result(self) -> dict[str, dict]:
        import subprocess
        import time

        if self._records is None:
            try:
                logs = [p.communicate(timeout=max(1.0, self.deadline - time.monotonic()))[0] for p in self.procs]
            except subprocess.TimeoutExpired:
                for p in self.procs:
                    p.kill()
                raise
            if any(p.returncode != 0 for p in self.procs):
                raise RuntimeError(f"the {self.what} golden run failed:\n" + "\n".join(
                    f"-- process {r} (exit {p.returncode}):\n{log[-3000:]}"
                    for r, (p, log) in enumerate(zip(self.procs, logs))))
            records = json.loads(self.path.read_text())
            assert records["numerics"]["profile"] == "portable" and records["numerics"]["threads"] == 1, \
                records["numerics"]
            self._records = records["records"]
        return self._records


def _start(names: list[str], out: Path, ranks: int, timeout: int) -> Background:
    import socket
    import subprocess

    from helpers import cli_env

    from fedclip_lightning.numerics import PORTABLE, SWITCH

    out.mkdir(parents=True, exist_ok=True)
    result = out / "records.json"
    env = {**cli_env(out), **PORTABLE, SWITCH: "portable"}  # the profile, as FEDCLIP_NUMERICS=portable sets it
    cmd = [sys.executable, __file__, "--run", *names, "--json", str(result)]
    if ranks == 1:
        procs = [subprocess.Popen(cmd, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
        return Background("portable one-process", procs, result, timeout)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", WORLD_SIZE=str(ranks))
    procs = [subprocess.Popen([*cmd, "--two"], cwd=out, env={**env, "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(ranks)]
    return Background("two-process", procs, result, timeout)


def start_portable(names: list[str], out: Path, timeout: int = 1200) -> Background:
    """The cases in one fresh interpreter under the portable profile (its kernels are chosen at import)."""
    return _start(names, out, 1, timeout)


def start_two_processes(names: list[str], out: Path, timeout: int = 1200) -> Background:
    """The cases on two processes under the portable profile, started as a cluster launcher (srun, torchrun)
    starts a job: two interpreters with LOCAL_RANK 0 and 1 and one MASTER_PORT, which join one process group
    and run the cases one after another, each as ``fabric.devices=2`` runs it on every rank. One start-up for
    all of them (a case of its own through the command line pays about 20 s of it; tests/test_e2e.py keeps
    Fabric's own launcher under test)."""
    return _start(names, out, 2, timeout)


def load_golden() -> dict:
    return json.loads(GOLDEN_FILE.read_text())


def expected_two_processes(golden: dict, name: str) -> dict:
    """Under the portable profile (one thread a process) two processes give one process's bits."""
    return golden.get("two_processes", {}).get(name, golden["one_process"][name])


# ---------------------------------------------------------------------------------------------------------------
# Comparing records

# Runs of one configuration with different kernels (another CPU, another thread count) agree within these
# bounds; the measurements behind them are in the README ("Reproducibility"). Measured over every case: the
# machine's own kernels against the portable record move a loss by at most 1e-6 (one unit of its last printed
# digit) and a tensor figure by at most 5e-7 of its file's norm; a 1% change of the learning rate moves some loss
# of every case by 7e-6 or more (tests/test_golden.py proves it on every run).
TOLERANCE = {
    "loss_abs": 2.5e-6,    # a loss in metrics.csv (printed with 6 decimals): two units of the last digit
    "value_rel": 1e-5,     # a tensor's sum / norm / weighted sum, relative to the norm of all tensors of its file
}


def compare_bitwise(got: dict, want: dict, name: str) -> None:
    """Every field equal; the tensors by their digests (``values`` are float64 sums of the same tensors, whose
    last bits follow the comparing process's own thread count, and serve ``compare_within`` only)."""
    for key in (k for k in want if k != "values"):
        if key == "metrics" and got[key] != want[key]:
            diff = [f"  now  {a}\n  was  {b}" for a, b in zip(got[key], want[key]) if a != b]
            raise AssertionError(f"{name}: metrics.csv drifted in {len(diff)} rows:\n" + "\n".join(diff[:6]))
        if key == "states" and got[key] != want[key]:
            drift = {f: sorted(k for k in want[key][f] if got[key].get(f, {}).get(k) != want[key][f][k])[:4]
                     for f in want[key]}
            raise AssertionError(f"{name}: saved tensors drifted: {drift} (files now {sorted(got[key])})")
        assert got.get(key) == want[key], f"{name}: {key} drifted"


def compare_within(got: dict, want: dict, name: str, tol: dict | None = None) -> list[str]:
    """``got`` against ``want`` to the bounds of ``TOLERANCE``: accuracies, counters, the selected round
    and every row's round/client/split exact; losses and tensors within the bounds. Raises on a
    difference; returns the largest deviations seen (for reports)."""
    tol = TOLERANCE if tol is None else tol
    problems: list[str] = []
    for key in ("status", "selected", "final", "selected_round", "bytes", "params", "base_novel"):
        if key in want and got.get(key) != want[key]:
            problems.append(f"{key}: now {got[key]} / was {want[key]}")
    if len(got["metrics"]) != len(want["metrics"]) or got["metrics"][0] != want["metrics"][0]:
        problems.append(f"metrics.csv: {len(got['metrics'])} rows now, {len(want['metrics'])} before")
    worst_loss, worst_value = 0.0, 0.0
    for a, b in zip(got["metrics"][1:], want["metrics"][1:]):
        ra, rb = a.split(","), b.split(",")
        if ra[:4] != rb[:4]:
            problems.append(f"metrics.csv row: now {a} / was {b}")
            continue
        if (ra[4] == "") != (rb[4] == ""):
            problems.append(f"metrics.csv loss: now {a} / was {b}")
        elif ra[4]:
            d = abs(float(ra[4]) - float(rb[4]))
            worst_loss = max(worst_loss, d)
            if d > tol["loss_abs"]:
                problems.append(f"metrics.csv loss off by {d:.2e}: now {a} / was {b}")
    gv, wv = got["values"], want["values"]
    if {f: sorted(v) for f, v in gv.items()} != {f: sorted(v) for f, v in wv.items()}:
        problems.append(f"saved tensors: now {sorted(gv)} / was {sorted(wv)}")
    else:
        for f in wv:
            # Relative to the whole file: a tensor that training leaves near zero (an attention key bias,
            # whose gradient is zero but for rounding) holds only float noise, which no bound on itself fits.
            scale = max(sum(n * n for _, n, _ in wv[f].values()) ** 0.5, 1e-12)
            for k, want_k in wv[f].items():
                d = max(abs(x - y) for x, y in zip(gv[f][k], want_k)) / scale
                worst_value = max(worst_value, d)
                if d > tol["value_rel"]:
                    problems.append(f"{f}:{k} off by {d:.2e} of the file's norm: now {gv[f][k]} / was {want_k}")
    if problems:
        raise AssertionError(f"{name}: {len(problems)} difference(s) beyond the tolerance {tol}:\n  "
                             + "\n  ".join(problems[:8]))
    return [f"loss {worst_loss:.1e}", f"tensors {worst_value:.1e}"]


# ---------------------------------------------------------------------------------------------------------------

def main() -> None:
    import tempfile

    from fedclip_lightning.numerics import describe, is_portable

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true", help="run the cases and (re)write the golden file")
    ap.add_argument("--only", nargs="+", choices=list(CASES), help="re-record these cases only, keep the rest")
    ap.add_argument("--run", nargs="+", choices=list(CASES), help=argparse.SUPPRESS)  # the test's portable run
    ap.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--two", action="store_true", help=argparse.SUPPRESS)  # this process is a rank of two
    args = ap.parse_args()
    if args.run:
        out = args.json.parent / ("two" if args.two else "one")
        extra = ("fabric.devices=2",) if args.two else ()
        records = {n: run_one_process(n, out, extra) for n in args.run}
        if os.environ.get("LOCAL_RANK", "0") == "0":
            args.json.write_text(json.dumps({"numerics": describe(), "records": records}))
        return
    if not args.record:
        ap.print_help()
        return
    if os.environ.get("CI"):
        sys.exit("golden.py: CI never records golden numbers; record on a development machine and commit the file")
    assert is_portable(), "the portable profile was set before torch was imported (see the top of this file)"
    golden: dict = load_golden() if args.only else {"one_process": {}, "two_processes": {}}
    cases = args.only or list(CASES)
    with tempfile.TemporaryDirectory() as tmp:
        for name in cases:
            golden["one_process"][name] = run_one_process(name, Path(tmp) / "one")
            print(f"recorded {name} (1 process)", flush=True)
        twos = start_two_processes([n for n in TWO_PROCESS if n in cases], Path(tmp) / "two").result()
        for name, two in twos.items():
            golden.setdefault("two_processes", {}).pop(name, None)
            if two != golden["one_process"][name]:
                golden["two_processes"][name] = two
            print(f"recorded {name} (2 processes: {'equal to 1' if name not in golden['two_processes'] else 'its own'})",
                  flush=True)
    from fedclip_lightning.numerics import PORTABLE

    golden["profile"] = PORTABLE
    golden["recorded_with"] = describe()
    GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN_FILE.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN_FILE}; 2 processes equal 1 bitwise for "
          f"{len(TWO_PROCESS) - len(golden['two_processes'])} of {len(TWO_PROCESS)} cases")


if __name__ == "__main__":
    main()
