"""Helpers shared by the end-to-end tests: run the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import PACS_MINI

# The real PACS_mini, a tiny random backbone, 3 rounds: seconds on the CPU.
PACS_MINI_ARGS = ["experiment=pacs_mini_debug", f"data.root={PACS_MINI}", "progress=false"]


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "FEDCLIP_CACHE_DIR": str(tmp_path / "cache"),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB__DISABLE_STATS": "true",
        "WANDB__DISABLE_META": "true",
        "WANDB_DIR": str(tmp_path / "wandb_home"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_home" / "cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb_home" / "config"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb_home" / "data"),
        "PYTHONUNBUFFERED": "1",
    })
    # WANDB_SERVICE: a W&B service that an in-process test started (and stopped) is not the child's.
    for var in ("FEDCLIP_RUN_DIR", "WANDB_API_KEY", "WANDB_SERVICE", "SLURM_JOB_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(var, None)
    return env


def run_cli(args: list[str], tmp_path: Path, timeout: int = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m fedclip_lightning <args>`` in ``tmp_path`` (``env``: variables to add)."""
    return subprocess.run(
        [sys.executable, "-m", "fedclip_lightning", *args],
        cwd=tmp_path, env={**cli_env(tmp_path), **(env or {})}, capture_output=True, text=True, timeout=timeout,
    )


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())
