"""Killed, preempted, resumed: the same numbers as a run that was never interrupted."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedclip_lightning.wandb_files import find_offline_runs, read_offline_run
from helpers import PACS_MINI_ARGS, cli_env, read_summary, run_main

# features=reference runs the encoder every batch: rounds slow enough to interrupt.
BASE = [*PACS_MINI_ARGS, "logger=none", "features=reference", "federation.rounds=12",
        "federation.checkpoint_min_seconds=0"]


def _start(args: list[str], tmp: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedclip_lightning", *args], cwd=tmp, env=cli_env(tmp),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before {path} appeared: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < end, f"{path} did not appear"
        time.sleep(0.005)


def _same_results(a: Path, b: Path, state_file: str) -> None:
    sa, sb = read_summary(a), read_summary(b)
    assert sb["status"] == "finished" and sb["resumed_from"] is not None
    for key in ("selected", "final", "selected_round", "rounds_run", "bytes_up_total", "bytes_down_total"):
        assert sa[key] == sb[key], key
    assert (a / "metrics.csv").read_text() == (b / "metrics.csv").read_text()
    ta = torch.load(a / state_file, weights_only=True)["state"]
    tb = torch.load(b / state_file, weights_only=True)["state"]
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    out = {}
    for name, extra in (("keep", ["algorithm.optimizer_state=keep"]), ("local", ["algorithm=local"])):
        tmp = tmp_path_factory.mktemp(f"ref-{name}")
        proc = run_main([*BASE, "run_name=r", *extra], tmp)
        assert proc.returncode == 0, proc.stderr
        out[name] = (tmp / "outputs" / "r", extra)
    return out


@pytest.mark.parametrize("name,state_file", [("keep", "adapter_final.pt"), ("local", "adapters_final.pt")])
def test_sigkill_mid_run_then_resume_is_bitwise_identical(reference_runs, tmp_path, name, state_file):
    """SIGKILL after round 5 (checkpoints every 3 rounds), then resume=auto: the numbers of the run that was never
    interrupted, bitwise. The keep case logs to W&B: one W&B run with each round once."""
    ref, extra = reference_runs[name]
    wandb = name == "keep"
    args = [*BASE, "run_name=r", *extra, "federation.checkpoint_interval=3", *(["logger=wandb"] if wandb else [])]
    run_dir = tmp_path / "outputs" / "r"
    proc = _start(args, tmp_path)
    _wait_for(run_dir / "checkpoints" / "round-000003" / "COMPLETE", proc)
    end = time.monotonic() + 120
    while "\n5," not in (run_dir / "rounds.csv").read_text():
        assert proc.poll() is None and time.monotonic() < end, "round 5 never ended"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_summary(run_dir)["status"] == "running"  # it never got to finish
    before = _logged(run_dir) if wandb else None
    resumed = run_main([*args, "resume=auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and read_summary(run_dir)["resumed_from"] in (3, 6)
    _same_results(ref, run_dir, state_file)
    if not wandb:
        return
    # W&B's offline writer buffers, so the killed session's file holds some prefix of rounds 1-5 (often none);
    # the resumed session logs the rest.
    sessions = _one_run_each_round_once(run_dir, 12, 2)
    assert {r["round"] for r in sessions[0]["history"] if "round" in r} == before
    # docs/wandb.md's upload command, as far as it runs offline: both sessions, in order
    sync = subprocess.run(["wandb", "sync", "--dry-run", *map(str, find_offline_runs(run_dir / "wandb"))],
                          cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert sync.returncode == 0 and "Would sync 2 run(s)" in sync.stdout + sync.stderr, sync.stdout + sync.stderr
    # the models, once, in the last session
    arts = [a for a in sessions[-1]["artifacts"] if a["type"] == "model"]
    assert sorted(a for art in arts for a in art["aliases"] if a != "latest") == ["final", "selected"]


def test_sigusr1_checkpoints_stops_and_resumes(reference_runs, tmp_path):
    """SIGUSR1 (SLURM's warning before the time limit): a checkpoint, exit status 3, and a resume with the numbers
    of the run that was never interrupted; W&B has one run, paused (not failed) in between, each round once."""
    ref, extra = reference_runs["keep"]
    args = [*BASE, "run_name=r", *extra, "federation.checkpoint_interval=0", "logger=wandb"]
    run_dir = tmp_path / "outputs" / "r"
    proc = _start(args, tmp_path)
    _wait_for(run_dir / "rounds.csv", proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "preempted after round" in err and "resume=auto" in err and "Traceback" not in err
    s = read_summary(run_dir)
    assert s["status"] == "preempted" and s["rounds_run"] < 12
    ckpts = list((run_dir / "checkpoints").glob("round-*/COMPLETE"))
    assert len(ckpts) == 1  # interval 0: only the preemption checkpoint
    resumed = run_main([*args, "resume=auto"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    _same_results(ref, run_dir, "adapter_final.pt")
    sessions = _one_run_each_round_once(run_dir, 12, 2)
    assert sessions[0]["exit_code"] == 0  # paused, not failed


def test_resume_with_another_config_is_refused(reference_runs, tmp_path):
    ref, extra = reference_runs["keep"]
    proc = run_main([*BASE, f"output_dir={ref.parent}", "run_name=r", *extra, "resume=auto", "algorithm.lr=1e-3"],
                   tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "algorithm.lr" in proc.stderr and "resume=never" in proc.stderr


def test_a_fresh_start_replaces_the_old_run(reference_runs, tmp_path):
    ref, extra = reference_runs["keep"]
    old = tmp_path / "outputs" / "r"
    shutil.copytree(ref, old)
    rows_before = (old / "metrics.csv").read_text().count("\n")
    proc = run_main([*BASE, "run_name=r", *extra, "federation.rounds=2"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    text = (old / "metrics.csv").read_text()
    assert text.count("\n") < rows_before and {line.split(",")[0] for line in text.splitlines()[1:]} == {"1", "2"}
    # the old checkpoints are gone; the new run kept its newest two
    assert sorted(p.name for p in (old / "checkpoints").iterdir()) == ["round-000001", "round-000002"]


def test_checkpoint_writer_runs_one_write_at_a_time_and_raises_its_errors(caplog):
    """One-process runs write checkpoints in a background thread: a write waits for the one before it,
    an error in a write is raised at the next wait (never silently lost), and close() lets the last
    write land before the run ends."""
    from fedclip_lightning.checkpoint import CheckpointWriter

    order: list[str] = []

    def slow(tag):
        def write():
            time.sleep(0.05)
            order.append(tag)
        return write

    writer = CheckpointWriter()
    writer.submit(slow("round-1"))
    writer.submit(slow("round-2"))  # waits for round-1 first
    assert order == ["round-1"]
    writer.close()
    assert order == ["round-1", "round-2"]

    def fail():
        raise OSError(28, "No space left on device")

    writer = CheckpointWriter()
    writer.submit(fail)
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    writer.submit(fail)
    writer.close()  # the run is ending: logged, not raised over the run's own outcome
    assert "No space left" in caplog.text


# -- one W&B run per training run -----------------------------------------------------------------

def _wandb_sessions(run_dir: Path) -> tuple[str, list[dict]]:
    """The run's W&B id and its offline sessions (oldest first), each read back."""
    sessions = [read_offline_run(d) for d in find_offline_runs(run_dir / "wandb")]
    ids = {s["id"] for s in sessions}
    assert len(ids) == 1, f"more than one W&B run: {ids}"
    return ids.pop(), sessions


def _one_run_each_round_once(run_dir: Path, rounds: int, sessions_expected: int) -> list[dict]:
    run_id, sessions = _wandb_sessions(run_dir)
    assert len(sessions) == sessions_expected
    assert read_summary(run_dir)["wandb_id"] == run_id
    rows = [r for s in sessions for r in s["history"] if "round" in r]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))  # each round once, no gap, in order
    steps = [r["_step"] for r in rows]
    assert steps == sorted(set(steps)) and steps == [r["round"] for r in rows]  # W&B's step is the round
    return sessions


def test_wandb_run_killed_before_its_first_checkpoint_restarts_as_the_same_run(tmp_path):
    args = [*BASE, "run_name=r", "logger=wandb", "federation.rounds=4", "federation.checkpoint_interval=0"]
    run_dir = tmp_path / "outputs" / "r"
    proc = _start(args, tmp_path)
    end = time.monotonic() + 120
    while 1 not in _logged(run_dir):
        assert proc.poll() is None and time.monotonic() < end, "round 1 never reached the W&B file"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = run_main([*args, "resume=auto"], tmp_path)
    assert again.returncode == 0, again.stderr
    _one_run_each_round_once(run_dir, 4, 2)
    # another config in the same directory is another W&B run
    other = run_main([*args, "resume=never", "algorithm.lr=1e-3"], tmp_path)
    assert other.returncode == 0, other.stderr
    assert len({read_offline_run(d)["id"] for d in find_offline_runs(run_dir / "wandb")}) == 1  # the old one is
    assert len({read_offline_run(d)["id"] for d in find_offline_runs(run_dir / "replaced")}) == 1  # set aside


def _logged(run_dir: Path) -> set[int]:
    return {int(r["round"]) for d in find_offline_runs(run_dir / "wandb") for r in read_offline_run(d)["history"]
            if "round" in r}
