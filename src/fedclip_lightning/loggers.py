"""Experiment tracking: W&B (or Fabric's CSV logger) on rank 0, through Fabric.

W&B runs offline automatically when no API key is configured (no
``WANDB_API_KEY`` and no api.wandb.ai entry in ``~/.netrc``) or when
``WANDB_MODE=offline``; ``wandb sync <run dir>/wandb/offline-run-*`` uploads it
later. The run is always finished, also when training fails.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any

from .config import Config

log = logging.getLogger(__name__)


def has_wandb_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or Path("~/.netrc").expanduser())
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
    return rc.authenticators(host) is not None


def wandb_mode(cfg: Config) -> str:
    """online, offline or disabled: what the run will actually do."""
    return wandb_mode_of(cfg.logger.wandb.mode)


def wandb_mode_of(mode: str) -> str:
    """``logger.wandb.mode`` as it will be: online, offline or disabled."""
    env = os.environ.get("WANDB_MODE")
    if mode == "auto":
        if env in ("offline", "dryrun", "disabled"):
            return "disabled" if env == "disabled" else "offline"
        return "online" if has_wandb_api_key() else "offline"
    return mode


def job_type(cfg: Config) -> str:
    """W&B's job type: the run's label (or algorithm) less any ``seed=N`` in it."""
    label = " ".join(t for t in (cfg.label or cfg.algorithm.name).split() if not t.startswith("seed="))
    return (label or cfg.algorithm.name)[:64]


def build_loggers(cfg: Config, run_dir: Path, run_name: str, run_id: str | None = None) -> list[Any]:
    """The Fabric loggers for this run (they log on rank 0 only)."""
    name = cfg.logger.name
    if name == "none":
        return []
    if name == "csv":
        from lightning.fabric.loggers import CSVLogger

        return [CSVLogger(root_dir=str(run_dir), name="csv_logs", version="")]
    mode = wandb_mode(cfg)
    if mode == "disabled":
        return []
    from lightning.pytorch.loggers import WandbLogger

    w = cfg.logger.wandb
    os.environ.setdefault("WANDB_SILENT", "true")
    logger = WandbLogger(
        project=w.project,
        entity=w.entity,
        name=run_name,
        group=w.group,
        # The method, not its repeat: seeds share a job type, so a dashboard grouped by it averages them.
        job_type=job_type(cfg),
        tags=list(w.tags) or None,
        save_dir=str(run_dir),
        offline=(mode == "offline"),
        id=run_id,  # a resumed run continues its W&B run
    )
    # Lightning always passes `anonymous`, which current wandb warns about on every run.
    logger._wandb_init.pop("anonymous", None)
    return [logger]


def finish_loggers(loggers: list[Any], exit_code: int = 0) -> None:
    """Close every logger; W&B gets an explicit finish so offline files are complete."""
    for lg in loggers:
        try:
            lg.finalize("success" if exit_code == 0 else "failed")
        except Exception:  # noqa: BLE001 - closing must not mask the run's own error
            log.exception("could not finalise logger %s", type(lg).__name__)
        exp = getattr(lg, "_experiment", None)
        if exp is not None and hasattr(exp, "finish"):
            try:
                exp.finish(exit_code=exit_code)
            except Exception:  # noqa: BLE001
                log.exception("could not finish the W&B run")
