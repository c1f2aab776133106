"""launch.sh on a real (one-node) SLURM cluster: 2 tasks, then a preemption that requeues and resumes.

.ci/run starts the cluster with .ci/slurm-up.sh; where no SLURM answers (a laptop), these tests skip.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO
from fedclip_lightning.wandb_files import find_offline_runs, read_offline_run
from helpers import PACS_MINI_ARGS, cli_env, read_summary, run_main


def _slurm_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


# One after the other under pytest-xdist: each job takes both CPUs of the one-node cluster.
pytestmark = [pytest.mark.skipif(not _slurm_up(), reason="no SLURM cluster answers (CI starts one: .ci/slurm-up.sh)"),
              pytest.mark.xdist_group("slurm")]

SBATCH = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
          "--time=15:00"]


def _local_reference(tmp: Path, extra: list[str]) -> dict:
    proc = run_main([*PACS_MINI_ARGS, "logger=none", "run_name=local", *extra], tmp)
    assert proc.returncode == 0, proc.stderr
    return read_summary(tmp / "outputs" / "local")


def _same_metrics(a: dict, b: dict) -> None:
    for key in ("selected", "final", "selected_round", "rounds_run", "bytes_up_total"):
        assert a[key] == b[key], key


def test_sbatch_two_tasks_requeued_by_usr1_resume_with_the_metrics_of_one_local_process(tmp_path):
    """launch.sh under sbatch: 2 tasks (one run directory per job), USR1 mid-run (it checkpoints, requeues and
    resumes), and the metrics of the same run in one local process."""
    # Rounds slow enough to interrupt, a checkpoint after each.
    extra = ["features=reference", "federation.rounds=12", "federation.checkpoint_min_seconds=0"]
    ref = _local_reference(tmp_path, extra)
    out = tmp_path / "slurm"
    args = [*PACS_MINI_ARGS, "logger=none", f"output_dir={out}", *extra]
    job = subprocess.run([*SBATCH, f"--output={tmp_path}/slurm-%j.out", "launch.sh", *args], cwd=REPO,
                         env=cli_env(tmp_path), capture_output=True, text=True, check=True).stdout.strip()
    run_dir = out / f"fedclip-pacs_mini-slurm{job}"
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "round-000002" / "COMPLETE").exists():
        assert time.monotonic() < deadline, "the job never wrote its round-2 checkpoint"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)  # reaches the srun tasks, as --signal=USR1@90
    status = None
    while status != "finished":
        assert time.monotonic() < deadline, f"the job did not finish after its requeue (status {status})"
        time.sleep(1)
        try:
            status = json.loads((run_dir / "summary.json").read_text())["status"]
        except (OSError, ValueError):
            pass
    log = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
    assert "preempted after round" in log and "requeued" in log and "resumed from" in log
    show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in show
    s = read_summary(run_dir)
    assert s["resumed_from"] is not None and s["world_size"] == 2
    _same_metrics(ref, s)


def test_sweep_array_gets_launch_sh_resources_resumes_a_preempted_task_and_writes_the_tables(tmp_path):
    """fedclip-lightning-sweep --slurm: a 2-task array (submitit) with the requested CPUs, USR1 to one task
    (it checkpoints, requeues and resumes), and the job after the array writes the tables."""
    out = tmp_path / "outputs"
    # rounds of about 0.4 s (8 local epochs, encoder every batch): time to signal the run mid-way
    from fedclip_lightning.sweep import main

    cmd = ["--slurm", "--algorithms", "fedclip,local", "--heldout", "sketch", "--name", "s", "--cpus-per-task", "1",
           "--gpus-per-node", "0", "--time", "15:00", *PACS_MINI_ARGS, "logger=wandb", "features=reference",
           "federation.rounds=12", "algorithm.local_epochs=8", "federation.checkpoint_min_seconds=0",
           f"output_dir={out}"]
    proc = run_main(cmd, tmp_path, main=main)  # the submission in this interpreter; the jobs are SLURM's
    assert proc.returncode == 0, proc.stderr
    array = re.search(r"submitted job array (\d+)", proc.stdout).group(1)
    tables = re.search(r"table job (\d+)", proc.stdout).group(1)
    sweep = out / "s"
    deadline = time.monotonic() + 480
    while not (sweep / "fedclip-sketch" / "checkpoints" / "round-000002" / "COMPLETE").exists():
        assert time.monotonic() < deadline, "task 0 never wrote its round-2 checkpoint"
        time.sleep(0.05)
    subprocess.run(["scancel", "--signal=USR1", f"{array}_0"], check=True)
    while _in_queue(array) or _in_queue(tables):
        assert time.monotonic() < deadline, f"the array or the table job is still queued: {_squeue()}"
        time.sleep(1)
    logs = "".join(p.read_text() for p in sorted((sweep / "slurm").glob("*_log.out")))
    for run in ("fedclip-sketch", "local-sketch"):
        s = read_summary(sweep / run)
        assert s["status"] == "finished", logs[-3000:]
        assert s["slurm"]["cpus_per_task"] == "1" and s["slurm"]["array_job_id"] == array  # from inside the job
    # the requeue is the run's last act: nothing (W&B's finish, the summary) was cut off by it
    assert "Traceback" not in logs and "could not finish the W&B run" not in logs, logs[-3000:]
    preempted = read_summary(sweep / "fedclip-sketch")
    assert preempted["resumed_from"] is not None and int(preempted["slurm"]["restart_count"]) >= 1
    # the preempted run is one W&B run, each round once
    rows = [r for d in find_offline_runs(sweep / "fedclip-sketch" / "wandb") for r in read_offline_run(d)["history"]
            if "round" in r]
    assert [r["round"] for r in rows] == list(range(1, 13))
    # the table job ran after the array and wrote the tables
    with open(sweep / "table_selected.csv") as f:
        header = next(csv.reader(f))
    assert "fedclip" in header and "local" in header
    assert "written: s/table_selected.md" in logs


def _squeue() -> str:
    return subprocess.run(["squeue", "-h", "-o", "%i %T"], capture_output=True, text=True).stdout


def _in_queue(job: str) -> bool:
    return any(line.split()[0].split("_")[0] == job for line in _squeue().splitlines() if line.strip())
