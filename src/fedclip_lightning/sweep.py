"""Leave-one-domain-out sweeps: every held-out domain x every algorithm, one command.

    fedclip-lightning-sweep --algorithms fedavg,fedprox,fedclip,zeroshot,local,fedclip_ft \\
        experiment=pacs_mini_debug
    fedclip-lightning-sweep --algorithms fedclip,fedavg --heldout art_painting,sketch \\
        experiment=pacs_paper data.root=/data/PACS

Each (algorithm, held-out domain) is a normal run, in its own process, written to
``<sweep dir>/<algorithm>-<held out>/``; a rerun skips the runs that finished.
All runs share one W&B group (the sweep's name), with the algorithm as the
job type, so one W&B panel compares them. At the end the sweep directory holds
the paper-style tables (Markdown and CSV, selected and final round) and the
comparison plots, and the table is printed.

``--slurm`` submits the same runs as one SLURM job array through submitit
instead of running them here: each task gets launch.sh's ``#SBATCH`` resources
(override them with --partition, --account, --gpus-per-node, --cpus-per-task,
--ntasks-per-node, --time, --mem; --max-parallel throttles the array), runs
launch.sh (srun, resume=auto, USR1 -> checkpoint, requeue, resume), and a job
after the array writes the tables and plots. ``--slurm --dry-run`` prints both
job scripts without submitting.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from .errors import ConfigError, UserError, quiet_on_closed_pipe
from .sweep_results import PLAN, report


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="fedclip-lightning-sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--algorithms", default="fedclip,zeroshot",
                    help="comma-separated algorithms (fedclip, zeroshot, fedavg, fedprox, local, fedclip_ft, "
                         "promptfl, promptfl_ft, clip_adapter, linear_probe)")
    ap.add_argument("--heldout", default="all", help="comma-separated held-out domains, or 'all' (default)")
    ap.add_argument("--name", default=None, help="sweep name: its folder under output_dir and its W&B group")
    ap.add_argument("--slurm", action="store_true", help="submit one SLURM job array instead of running here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                    help="an axis: one run per value, e.g. --set federation.aggregator.name=mean,median "
                         "(repeatable: the axes multiply; each combination is a column of the tables; an "
                         "algorithm.<key> axis applies to the algorithms that have the key)")
    ap.add_argument("--seeds", default=None, metavar="S1,S2",
                    help="repeats: every run once per seed (the axis seed=S1,S2); the tables report the mean "
                         "and the standard deviation over the seeds, and W&B gives the repeats one job type")
    ap.add_argument("--dry-run", action="store_true", help="print the runs (with --slurm: the job scripts) and exit")
    slurm = ap.add_argument_group("SLURM (with --slurm; defaults: launch.sh's #SBATCH header)")
    for opt in ("partition", "account", "nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time",
                "mem"):
        slurm.add_argument(f"--{opt}", default=None, metavar="V", help=f"sbatch --{opt} of each array task")
    slurm.add_argument("--max-parallel", type=int, default=None, metavar="N",
                       help="at most N array tasks at once (sbatch --array=...%%N; default: all)")
    args, overrides = ap.parse_known_args(argv)
    if args.seeds is not None:
        seeds = [x.strip() for x in args.seeds.split(",") if x.strip()]
        if not seeds or not all(x.isdigit() for x in seeds) or len(set(seeds)) != len(seeds):
            raise ConfigError(f"--seeds={args.seeds!r}: expected distinct whole numbers. Fix: e.g. --seeds 0,1,2.")
        if any(ax.partition("=")[0].strip() == "seed" for ax in args.set) or \
                any(o.partition("=")[0] == "seed" for o in overrides):
            raise ConfigError("--seeds and a seed set elsewhere (--set seed=... or seed=...): one of them. "
                              "Fix: drop the other.")
        args.set = [*args.set, "seed=" + ",".join(seeds)]
    slurm_only = [f"--{k.replace('_', '-')}" for k, v in vars(args).items()
                  if v is not None and k in ("partition", "account", "nodes", "ntasks_per_node", "gpus_per_node",
                                             "cpus_per_task", "time", "mem", "max_parallel")]
    if slurm_only and not args.slurm:
        raise ConfigError(f"{slurm_only[0]} is a SLURM option, given without --slurm. Fix: add --slurm to submit "
                          "the sweep as a job array, or drop it to run here.")
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        raise ConfigError(f"unknown option {bad[0]!r}. Fix: see `fedclip-lightning-sweep --help`; "
                          "settings are passed as key=value.")
    return args, overrides


def plan(args: argparse.Namespace, overrides: list[str]) -> tuple[Path, list[tuple[str, str, list[str]]]]:
    """The sweep directory and its runs: (algorithm, held-out domain, overrides)."""
    from .algorithms import registry
    from .aggregation.checks import ONLY_WITH
    from .configure import load_config
    from .data.pipeline import resolve_root

    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    known = registry.names()
    unknown = [a for a in algorithms if a not in known]
    if unknown or not algorithms:
        raise ConfigError(f"--algorithms={args.algorithms!r}: unknown {unknown or 'empty list'}. "
                          f"Fix: choose from {', '.join(known)}.")
    # The settings an axis may turn off are checked run by run (_applying), not in the base.
    axis_keys = {axis.partition("=")[0].strip() for axis in args.set}
    base = load_config([o for o in overrides if ONLY_WITH.get(o.partition("=")[0].lstrip("+~"), ("",))[0]
                        not in axis_keys])
    domains = base.data.domains
    if domains is None:
        root = resolve_root(base)
        domains = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    heldout = domains if args.heldout == "all" else [h.strip() for h in args.heldout.split(",") if h.strip()]
    missing = [h for h in heldout if h not in domains]
    if missing:
        raise ConfigError(f"--heldout={args.heldout!r}: {missing} not among the domains {domains}. "
                          "Fix: name domains of the data set, or use --heldout all.")
    name = args.name or f"sweep-{base.data.dataset}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    sweep_dir = Path(base.output_dir).expanduser() / name
    runs, left_out = [], set()
    for h in heldout:
        for a in algorithms:
            for combo in _combinations(_axes_for(a, args.set)):
                label = " ".join([a, *(f"{_axis_name(k)}={v}" for k, v in combo)])
                tag = re.sub(r"[^A-Za-z0-9_.]+", "_", "_".join([a, *(f"{_axis_name(k)}_{v}" for k, v in combo)]))
                ov = [*_applying(overrides, combo, left_out), f"algorithm={a}", *(f"{k}={v}" for k, v in combo),
                      f"data.unseen=[{h}]",
                      f"output_dir={_q(str(sweep_dir))}", f"run_name={_q(f'{tag}-{h}')}",
                      f"logger.wandb.group={_q(name)}"]
                if combo:
                    ov.append(f"label={_q(label)}")
                runs.append((tag, h, ov))
    for o, (key, value) in sorted(left_out):
        print(f"sweep: {o} has no effect where {key}={value}; those runs leave it out")
    _check_each(runs)
    return sweep_dir, runs


def _axis_name(key: str) -> str:
    """An axis as runs and table columns name it: its last key, or its group for a chooser
    (``federation.aggregator.name`` -> aggregator, ``federation.privacy.mode`` -> privacy)."""
    parts = key.split(".")
    return parts[-2] if len(parts) > 2 and parts[-1] in ("name", "mode") else parts[-1]


def _applying(overrides: list[str], combo, left_out: set) -> list[str]:
    """The fixed overrides less those that an axis value of this run turns off (``--set federation.attack.name=none,
    scaled`` with ``federation.attack.fraction=0.34``: the run without an attack has no attackers to count)."""
    from .aggregation.checks import ONLY_WITH

    axes = dict(combo)
    kept = []
    for o in overrides:
        key = o.partition("=")[0].lstrip("+~")
        enabler, enables, _ = ONLY_WITH.get(key, (None, None, None))
        if enabler in axes and not enables(axes[enabler]):
            left_out.add((o, (enabler, axes[enabler])))
            continue
        kept.append(o)
    return kept


def _q(value: str) -> str:
    """A Hydra-quoted string value: any character (parentheses, commas, '=') stays part of it."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _axes_for(algorithm: str, axes: list[str]) -> list[str]:
    """The axes that apply to ``algorithm``: an ``algorithm.<key>`` axis only where its config has the key
    (``--set algorithm.adapter_hidden=512,64`` sizes FedCLIP's adapter; the other methods run once)."""
    import dataclasses

    from .algorithms import registry

    keys = {f.name for f in dataclasses.fields(registry.get(algorithm).config_class)}
    return [ax for ax in axes if not ax.startswith("algorithm.") or ax.partition("=")[0].split(".")[1] in keys]


def _combinations(axes: list[str]) -> list[tuple[tuple[str, str], ...]]:
    """``--set k=a,b --set j=x`` -> ((k, a), (j, x)), ((k, b), (j, x))."""
    import itertools

    parsed = []
    for axis in axes:
        key, eq, values = axis.partition("=")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not eq or not key.strip() or not vals:
            raise ConfigError(f"--set {axis!r}: expected KEY=V1,V2,... Fix: e.g. --set federation.aggregator.name=mean,median.")
        parsed.append([(key.strip(), v) for v in vals])
    return list(itertools.product(*parsed))


def _check_each(runs) -> None:
    """Every run's config composes and validates before anything runs (a clash is named)."""
    from .configure import load_config

    problems = []
    for tag, h, ov in runs:
        try:
            load_config(ov)
        except UserError as exc:
            problems.append(f"{tag}-{h}: {exc}")
    if problems:
        raise ConfigError(f"{len(problems)} of the sweep's {len(runs)} runs have an invalid config; the first: "
                          f"{problems[0]} Fix: drop that algorithm or axis value from the sweep.")


# Settings that change nothing a sweep compares (where and how a run prints or stores, not its numbers). A run that
# finished with other values of anything else is run again: its rounds, features, processes, logger, label.
NOT_COMPARED = ("progress", "plots", "run_name", "resume", "note", "features.dir", "features.num_workers", "data.num_workers",
                "fabric.timeout_minutes", "backbone.download", "backbone.cache_dir", "federation.checkpoint_interval",
                "federation.keep_checkpoints", "federation.checkpoint_min_seconds")


def _rerun_plan(run_dir: Path, ov: list[str]) -> tuple[str, str]:
    """``("skip" | "resume" | "fresh", why)`` for a planned run: skip one that finished with these settings,
    resume one that stopped (killed, preempted) with a checkpoint of them, run the rest afresh and say why."""
    from .checkpoint import checkpoint_root, latest, load_meta
    from .config import to_dict
    from .configure import load_config

    want = to_dict(load_config(ov))
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if summary is not None and summary.get("status") == "finished":
        diff = _differences(summary.get("config") or {}, want)
        if not diff:
            return "skip", ""
        return "fresh", "finished earlier with other settings (" + "; ".join(diff[:3]) + "): run again"
    ckpt = latest(run_dir) if checkpoint_root(run_dir).is_dir() else None
    if ckpt is not None:
        try:
            meta = load_meta(ckpt)
            saved = json.loads(meta["config"])
        except Exception:  # noqa: BLE001 - a damaged checkpoint: the run starts afresh
            return "fresh", f"its checkpoint {ckpt.name} cannot be read: run again from round 0"
        if not _differences(saved, want):
            return "resume", f"stopped after round {meta['round']}: resumed from its checkpoint"
        return "fresh", "stopped earlier with other settings: run again from round 0"
    return "fresh", ""


def _differences(saved: dict, want: dict) -> list[str]:
    """The settings in which a saved run's config differs from the one wanted. A key the saved config does not
    have (the run is older than the key) is the same where the wanted value is the key's default: a new key's
    default is the behaviour from before it (``algorithm.csc=false``, ``data.classes.split=all``)."""
    from .checkpoint import _flatten

    a, b = _flatten(saved), _flatten(want)
    defaults = _flatten(_default_config(want))
    return [f"{k}: then {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if not any(k == r or k.startswith(r + ".") for r in NOT_COMPARED) and a.get(k) != b.get(k)
            and not (k not in a and k in defaults and b.get(k) == defaults[k])]


def _default_config(want: dict) -> dict:
    """The schema's defaults, with the wanted algorithm's own keys (``Config()`` and its config class)."""
    import dataclasses

    from .algorithms import registry
    from .config import Config, to_dict

    out = to_dict(Config())
    name = (want.get("algorithm") or {}).get("name")
    if name in registry.names():
        out["algorithm"] = dataclasses.asdict(registry.get(name).config_class(name=name))
    return out


def _die_with_parent() -> None:
    """In the child: SIGTERM when the sweep process dies, however it dies (Linux's PR_SET_PDEATHSIG)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_local(sweep_dir: Path, runs) -> list[str]:
    """Run each (algorithm, held-out) in its own process; return the ones that failed (the others go on)."""
    failed = []
    env = dict(os.environ)
    for var in ("FEDCLIP_RUN_DIR", "WANDB_SERVICE"):  # each run has its own directory and its own W&B service
        env.pop(var, None)
    for i, (a, h, ov) in enumerate(runs, 1):
        run_dir = sweep_dir / f"{a}-{h}"
        action, why = _rerun_plan(run_dir, ov)
        if action == "skip":
            print(f"[{i}/{len(runs)}] {a}, held out {h}: finished earlier, skipped", flush=True)
            continue
        print(f"[{i}/{len(runs)}] {a}, held out {h}" + (f": {why}" if why else ""), flush=True)
        args = [*ov, "resume=auto"] if action == "resume" else ov
        code = launch_run(args, env)
        if code != 0:
            failed.append(f"{a}-{h} (exit {code})")
            print(f"[{i}/{len(runs)}] {a}, held out {h}: FAILED (exit {code}); going on with the others",
                  file=sys.stderr, flush=True)
    return failed


def launch_run(args: list[str], env: dict[str, str]) -> int:
    """One run of a local sweep in a process of its own (a crash or a leak of one run stays its own); its exit
    status."""
    return subprocess.run([sys.executable, "-m", "fedclip_lightning", *args], env=env,
                          preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None).returncode


def submit_slurm(args: argparse.Namespace, sweep_dir: Path, runs) -> None:
    """One SLURM job array (submitit) with launch.sh's resources, and the table job after it."""
    from .slurm import RESOURCES, SlurmSweep

    given = {k: getattr(args, k.replace("-", "_")) for k in RESOURCES}
    job = SlurmSweep(sweep_dir, runs, given, args.max_parallel)
    if args.dry_run:
        array, tables = job.scripts()
        print(f"# the array: {job.describe()}\n{array}\n# the table job, after the array:\n{tables}")
        for i, (a, h, ov) in enumerate(runs):
            print(f"# task {i}: {job.launch} {' '.join(ov)}")
        return
    array_id, report_id = job.submit()
    print(f"submitted job array {array_id}: {job.describe()}\n"
          f"table job {report_id} runs when the array has ended (afterany) and writes {sweep_dir}/table_*.md\n"
          f"logs: {job.folder}/<job id>_<task>_0_log.out; runs: {sweep_dir}/<algorithm>-<held out>/")




def save_plan(sweep_dir: Path, overrides: list[str], runs) -> None:
    """sweep.json: what the sweep runs, its settings, its W&B run id and logger (the table job reads it, and so
    needs neither torch nor the config's composition: seconds, not the ten of a run's imports)."""
    import dataclasses
    import secrets

    from .configure import load_config
    from .files import atomic_write_text

    sweep_dir.mkdir(parents=True, exist_ok=True)
    try:
        old = json.loads((sweep_dir / PLAN).read_text())
    except (OSError, ValueError):
        old = {}
    # The logger as the runs have it (a run's overrides: the sweep's alone may not validate, an axis completing them).
    logger = dataclasses.asdict(load_config(runs[0][2] if runs else overrides).logger)
    atomic_write_text(sweep_dir / PLAN, json.dumps({
        "name": sweep_dir.name, "overrides": overrides, "runs": [f"{a}-{h}" for a, h, _ in runs],
        "wandb_id": old.get("wandb_id") or secrets.token_hex(4), "logger": logger}, indent=1))


@quiet_on_closed_pipe
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, overrides = _parse(argv)
        sweep_dir, runs = plan(args, overrides)
        if not args.dry_run:
            save_plan(sweep_dir, overrides, runs)
        if args.slurm:
            submit_slurm(args, sweep_dir, runs)
            return 0
        if args.dry_run:
            for a, h, ov in runs:
                print(f"{a}-{h}: fedclip-lightning {' '.join(ov)}")
            return 0
        print(f"sweep {sweep_dir.name}: {len(runs)} runs into {sweep_dir}", flush=True)
        failed = run_local(sweep_dir, runs)
        print("\n" + report(sweep_dir))
        if failed:
            print(f"\n{len(failed)} run(s) failed: {', '.join(failed)}; rerun the same command to retry them",
                  file=sys.stderr)
            return 1
    except UserError as exc:
        print(f"fedclip-lightning-sweep: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
