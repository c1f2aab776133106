"""A sweep as one SLURM job array through submitit, with launch.sh's resources, and a table job after it.

launch.sh's ``#SBATCH`` header is the one place where a job's resources are written: ``sbatch
launch.sh`` reads it, and so does the sweep here. Each array task gets those resources (nodes, tasks
and GPUs per node, CPUs per task, time, the USR1 signal before the time limit, requeue) unless a
sweep option overrides them (``--partition``, ``--account``, ``--gpus-per-node``, ...). A task runs
``launch.sh <the run's settings>`` from its batch step, exactly as ``sbatch launch.sh`` would: one
process per task with srun, ``resume=auto``, and on USR1 (or a preemption) a checkpoint, a requeue
and a resumed run. A second job, dependent on the whole array (``afterany``: also when runs failed),
writes the sweep's tables and plots (and logs them to W&B) when the array has ended.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from .errors import ConfigError, UserError

# The resources a sweep option may override, as sbatch spells them.
RESOURCES = ("partition", "account", "nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task", "time", "mem")
# What the table job asks for (it reads JSON and CSV files and draws a few plots).
REPORT_RESOURCES = {"nodes": "1", "ntasks-per-node": "1", "cpus-per-task": "1", "time": "30:00"}


def launch_script() -> Path:
    launch = Path(__file__).resolve().parents[2] / "launch.sh"
    if not launch.is_file():
        raise ConfigError(f"--slurm needs launch.sh, not found at {launch}. Fix: install the package from a "
                          "checkout (pip install -e .) and run the sweep there.")
    return launch


def read_header(launch: Path) -> dict[str, str | bool]:
    """launch.sh's ``#SBATCH`` options, as sbatch reads them: up to the first command line."""
    out: dict[str, str | bool] = {}
    for line in launch.read_text().splitlines():
        text = line.strip()
        if text.startswith("#SBATCH"):
            words = text[len("#SBATCH"):].split()
            if words and words[0].startswith("--"):
                key, eq, value = words[0][2:].partition("=")
                out[key] = value if eq else True
        elif text and not text.startswith("#"):
            break
    return out


def minutes(value: str, key: str = "--time") -> int:
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes, rounded up."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
    if not m:
        raise ConfigError(f"{key}={value!r} is not a SLURM time. Fix: e.g. {key}=90 (minutes), {key}=04:00:00 "
                          f"or {key}=1-12:00:00.")
    days, a, b, c = m.groups()
    if days is not None:  # D-H[:M[:S]]
        secs = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # H:M:S
        secs = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # M:S
        secs = int(a) * 60 + int(b)
    else:  # M
        secs = int(a) * 60
    return max(1, -(-secs // 60))


def resolve(header: dict[str, str | bool], given: dict[str, str | None]) -> dict[str, str]:
    """The resources of each array task: launch.sh's header, then what the sweep was given."""
    out = {k: str(header[k]) for k in RESOURCES if isinstance(header.get(k), str)}
    out.update({k: str(v) for k, v in given.items() if v is not None})
    for key in ("nodes", "ntasks-per-node", "gpus-per-node", "cpus-per-task"):
        if key in out and not out[key].isdigit():
            raise ConfigError(f"--{key}={out[key]!r}: expected a whole number. Fix: e.g. --{key}=1.")
    if "time" in out:
        minutes(out["time"])
    return out


def executor_parameters(res: dict[str, str], header: dict[str, str | bool], job_name: str) -> dict[str, Any]:
    """submitit's ``update_parameters`` for one job (array or not) with resources ``res``."""
    signal = header.get("signal") if isinstance(header.get("signal"), str) else None
    extra: dict[str, Any] = {"signal": signal} if signal else {}
    if header.get("requeue") is True:
        extra["requeue"] = True
    for key in ("partition", "account", "mem"):
        if key in res:
            extra[key] = res[key]
    params: dict[str, Any] = dict(
        job_name=job_name, wckey=job_name, use_srun=False, stderr_to_stdout=True,
        time=minutes(res.get("time", "60")), nodes=int(res.get("nodes", "1")),
        ntasks_per_node=int(res.get("ntasks-per-node", "1")), cpus_per_task=int(res.get("cpus-per-task", "1")),
        additional_parameters=extra)
    if "gpus-per-node" in res:
        params["gpus_per_node"] = int(res["gpus-per-node"])
    return params


def run_task(launch: str, overrides: list[str]) -> str:
    """One array task, in its batch step: launch.sh with the run's settings (srun, resume=auto)."""
    print(f"array task: {launch} {' '.join(shlex.quote(o) for o in overrides)}", flush=True)
    env = {k: v for k, v in os.environ.items() if k not in ("FEDCLIP_RUN_DIR", "WANDB_SERVICE")}
    rc = subprocess.run(["bash", launch, *overrides], env=env).returncode
    if rc == 3:  # preempted: the run checkpointed and requeued this job, which continues it
        return "preempted"
    if rc == 143:  # SLURM ended the step (a requeue racing the run's own exit, a cancel, the time limit): the
        # run's SIGTERM handler checkpoints first, and the job's state says which it was; not a failed run.
        print("array task: the step was terminated by SLURM (SIGTERM); the job's state says why", flush=True)
        return "terminated"
    if rc != 0:
        raise RuntimeError(f"the run exited with status {rc}; its output is above")
    return "finished"


def report_task(sweep_dir: str) -> str:
    """The table job: the sweep's tables and plots (and their W&B artifact) from what the runs left."""
    from .sweep_results import report

    text = report(Path(sweep_dir))
    print(text, flush=True)
    return text


class SlurmSweep:
    """The array of a sweep's runs and its table job, as submitit will submit them."""

    def __init__(self, sweep_dir: Path, runs: list[tuple[str, str, list[str]]], given: dict[str, str | None],
                 max_parallel: int | None):
        self.launch = launch_script()
        self.header = read_header(self.launch)
        self.sweep_dir, self.runs = sweep_dir.resolve(), runs
        self.resources = resolve(self.header, given)
        if max_parallel is not None and max_parallel < 1:
            raise ConfigError(f"--max-parallel={max_parallel}: expected at least 1. Fix: e.g. --max-parallel=4.")
        self.max_parallel = max_parallel or len(runs)
        report_res = {**REPORT_RESOURCES, **{k: self.resources[k] for k in ("partition", "account")
                                             if k in self.resources}}
        name = str(self.header.get("job-name", "fedclip"))
        self.array_params = {**executor_parameters(self.resources, self.header, name),
                             "array_parallelism": self.max_parallel}
        self.report_params = executor_parameters(report_res, {}, f"{name}-tables")

    @property
    def folder(self) -> Path:
        return self.sweep_dir / "slurm"

    def scripts(self) -> tuple[str, str]:
        """The two job scripts, as submitit writes them (for --dry-run)."""
        from submitit.slurm.slurm import _make_sbatch_string  # what SlurmExecutor writes, without submitting

        command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(self.folder))}"
        array = _make_sbatch_string(command=command, folder=self.folder, map_count=len(self.runs),
                                    **self.array_params)
        report = _make_sbatch_string(command=command, folder=self.folder,
                                     **{**self.report_params, "dependency": "afterany:ARRAY_JOB_ID"})
        return array, report

    def submit(self) -> tuple[str, str]:
        """Submit the array, then the table job after it; returns their job ids."""
        try:
            import submitit
        except ImportError:
            raise ConfigError("--slurm needs submitit. Fix: pip install 'submitit>=1.5'.") from None
        self.folder.mkdir(parents=True, exist_ok=True)
        ex = submitit.SlurmExecutor(folder=self.folder)
        ex.update_parameters(**self.array_params)
        try:
            jobs = ex.map_array(run_task, [str(self.launch)] * len(self.runs), [ov for _, _, ov in self.runs])
            array_id = jobs[0].job_id.split("_")[0]
            rex = submitit.SlurmExecutor(folder=self.folder)
            rex.update_parameters(**self.report_params, dependency=f"afterany:{array_id}")
            report = rex.submit(report_task, str(self.sweep_dir))
        except FileNotFoundError:
            raise UserError("--slurm: sbatch is not on this machine's PATH. Fix: run the sweep on a SLURM login "
                            "node, or without --slurm.") from None
        except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as exc:
            raise UserError(f"sbatch refused the sweep: {str(exc).strip()[-600:]}. Fix: check --partition, "
                            "--account, --gpus-per-node, --cpus-per-task, --time and --mem against the cluster "
                            "(sinfo shows what its partitions offer), or look at it with --slurm --dry-run.") from None
        return array_id, report.job_id

    def describe(self) -> str:
        r = self.resources
        return (f"{len(self.runs)} array task(s), at most {self.max_parallel} at once; each: "
                + ", ".join(f"--{k}={r[k]}" for k in RESOURCES if k in r)
                + "".join(f", --{k}" + ("" if v is True else f"={v}")
                          for k, v in self.array_params["additional_parameters"].items() if k in ("signal", "requeue")))
