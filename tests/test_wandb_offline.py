"""The offline W&B reader returns exactly what a run logged (no network, no API key)."""

from __future__ import annotations

import time

import pytest

from fedclip_lightning.wandb_files import find_offline_runs, read_offline_run

wandb = pytest.importorskip("wandb")


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    # setenv (not os.environ) so WandbLogger's own os.environ["WANDB_MODE"] = "dryrun"
    # is undone at teardown as well.
    for k, v in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB__DISABLE_STATS": "true",  # WANDB__X -> Settings.x_x: no system-metrics sampler
        "WANDB__DISABLE_META": "true",  # no environment/hardware probe
        "WANDB_DIR": str(tmp_path),
        "WANDB_CACHE_DIR": str(tmp_path / ".cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / ".config"),
        "WANDB_DATA_DIR": str(tmp_path / ".data"),
    }.items():
        monkeypatch.setenv(k, v)
    for k in ("WANDB_RUN_ID", "WANDB_RESUME", "WANDB_RUN_GROUP", "WANDB_JOB_TYPE", "WANDB_PROJECT"):
        monkeypatch.delenv(k, raising=False)
    yield tmp_path
    if wandb.run is not None:  # never leak a run into the next test
        wandb.finish()


def read_finished(run_dir):
    """The run as read once wandb-core has written its exit record: it (another process) may close the file a
    moment after ``finish()`` returns when the machine is busy (two test workers), as a sweep reads a run's files
    after its process ended."""
    deadline = time.monotonic() + 30
    while (got := read_offline_run(run_dir))["exit_code"] is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return got


def test_reader_returns_logged_values(offline_wandb):
    run = wandb.init(
        project="p", name="n", group="g", job_type="fedclip", dir=offline_wandb,
        config={"a": 1, "nested": {"b": 2}},
    )  # fmt: skip
    for k in range(3):
        run.log({"client/photo/val_acc": 0.25 * k, "round": k, "grp": {"x": k}})
    run.summary["best"] = 0.5
    run_id = run.id
    run.finish()

    (run_dir,) = find_offline_runs(offline_wandb)
    got = read_finished(run_dir)
    assert (got["id"], got["name"], got["group"], got["job_type"], got["project"]) == (
        run_id, "n", "g", "fedclip", "p",
    )  # fmt: skip
    assert got["config"] == {"a": 1, "nested": {"b": 2}}
    assert got["exit_code"] == 0
    assert len(got["history"]) == 3
    for k, row in enumerate(got["history"]):
        assert row["_step"] == k
        assert row["client/photo/val_acc"] == 0.25 * k
        assert row["round"] == k
        assert row["grp/x"] == k  # nested dicts come back as "/"-joined keys
    assert got["summary"]["best"] == 0.5
    assert got["summary"]["round"] == 2
    assert got["summary"]["client/photo/val_acc"] == 0.5


def test_lightning_wandb_logger_offline(offline_wandb):
    WandbLogger = pytest.importorskip("lightning.pytorch.loggers").WandbLogger

    logger = WandbLogger(
        project="p", name="n", group="g", job_type="fedclip", offline=True,
        save_dir=offline_wandb,
    )  # fmt: skip
    logger.log_hyperparams({"a": 1, "nested": {"b": 2}})
    steps = [0, 5, 10]
    for k in steps:
        logger.log_metrics({"client/photo/val_acc": k / 10, "round": k}, step=k)
    logger.experiment.summary["best"] = 0.5
    logger.experiment.finish()

    (run_dir,) = find_offline_runs(offline_wandb)
    got = read_finished(run_dir)
    assert (got["name"], got["group"], got["job_type"]) == ("n", "g", "fedclip")
    assert got["config"] == {"a": 1, "nested": {"b": 2}}
    # WandbLogger does not pass step= to wandb: `_step` is wandb's own 0,1,2,...
    # counter and the Lightning step is logged as the metric "trainer/global_step".
    assert [r["_step"] for r in got["history"]] == [0, 1, 2]
    assert [r["trainer/global_step"] for r in got["history"]] == steps
    assert [r["round"] for r in got["history"]] == steps
    assert [r["client/photo/val_acc"] for r in got["history"]] == [0.0, 0.5, 1.0]
    assert got["summary"]["best"] == 0.5
    assert got["exit_code"] == 0


def test_unfinished_run_has_no_exit_code(offline_wandb):
    run = wandb.init(project="p", dir=offline_wandb)
    run.log({"x": 1})
    # wandb-core buffers the .wandb file (32 KiB blocks): mid-run it may hold only
    # the 7-byte header, so a live run reads as mostly empty, never as an error.
    (run_dir,) = find_offline_runs(offline_wandb)
    got = read_offline_run(run_dir)
    assert got["exit_code"] is None and got["id"] in (None, run.id)
    run.finish(exit_code=3)
    got = read_finished(run_dir)
    assert got["exit_code"] == 3 and got["history"][0]["x"] == 1
