"""Helpers shared by the end-to-end tests: run the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from conftest import PACS_MINI

# The real PACS_mini, a tiny random backbone, 3 rounds: seconds on the CPU. No end-of-run figures (half of such a
# run's time): the golden cases (every algorithm), the demo and test_tables_plots draw them and check them.
PACS_MINI_ARGS = ["experiment=pacs_mini_debug", f"data.root={PACS_MINI}", "progress=false", "plots=false"]


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


@dataclass
class Result:
    """What a command left: as ``subprocess.CompletedProcess`` has it."""

    returncode: int
    stdout: str
    stderr: str


@contextmanager
def isolated(env: dict[str, str], cwd: Path):
    """This process as a fresh one would be for a command: exactly ``env`` as its variables, ``cwd`` as its
    folder; on the way out everything a command changes in a process (variables, folder, log handlers,
    signal handlers, W&B's process-wide state) is put back."""
    import logging
    import signal

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    root = logging.getLogger()
    saved_log = (root.handlers[:], root.level)
    saved_signals = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    if "wandb" in sys.modules:  # a W&B that ran in this process before (not isolated) starts over too
        sys.modules["wandb"].teardown()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    try:
        yield
    finally:
        torn_down = "wandb" in sys.modules
        if torn_down:  # W&B keeps process-wide settings (its folders, its service) from the first run
            sys.modules["wandb"].teardown()
        os.environ.clear()
        os.environ.update(saved_env)
        if torn_down:  # the service that variable names is gone with the teardown
            os.environ.pop("WANDB_SERVICE", None)
        os.chdir(saved_cwd)
        root.handlers[:], level = saved_log
        root.setLevel(level)
        for s, h in saved_signals.items():
            signal.signal(s, h)


def exit_status(main, args: list[str]) -> int:
    """``main(args)``'s exit status as the interpreter would give it: an exception main lets through (a bug,
    never a user's mistake) is status 1 with its traceback on stderr."""
    import traceback

    try:
        return main(list(args))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:  # Ctrl-C stops the test session, not just this command
        raise
    except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback, status 1
        traceback.print_exc()
        return 1


def run_main(args: list[str], tmp_path: Path, env: dict[str, str] | None = None, main=None) -> Result:
    """The command line's ``main(args)`` (``fedclip_lightning.cli.main``, or the ``main`` given) in this
    interpreter, as ``run_cli`` runs it in a fresh one: the same variables (``cli_env``), the same working
    folder, its output captured, its exit status returned. For tests where the separate process is not itself
    what is tested: a fresh interpreter pays 6-8 s of imports here."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    if main is None:
        from fedclip_lightning.cli import main
    out, err = io.StringIO(), io.StringIO()
    with isolated({**cli_env(tmp_path), **(env or {})}, tmp_path), redirect_stdout(out), redirect_stderr(err):
        code = exit_status(main, args)
    return Result(code, out.getvalue(), err.getvalue())


def runs_in_process(monkeypatch) -> None:
    """A local sweep's runs in this interpreter (``sweep.launch_run``), each with the variables and folder the
    sweep gives its child process, its output where the sweep's goes. One run through a real child process
    stays under test (tests/test_sweep.py)."""
    from fedclip_lightning import sweep
    from fedclip_lightning.cli import main

    def launch(args: list[str], env: dict[str, str]) -> int:
        with isolated(env, Path.cwd()):
            return exit_status(main, args)

    monkeypatch.setattr(sweep, "launch_run", launch)


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def num_adapter_params(dim: int, hidden: int | None = None) -> int:
    """2 (d^2 + d): the count the paper reports (525,312 for d = 512); ``2 d h + h + d`` with a bottleneck."""
    h = hidden or dim
    return 2 * dim * h + h + dim


def federation_config(*dotlist: str):
    """A FederationConfig from override-style strings, as the command line spells them without the
    ``federation.`` prefix: ``federation_config("privacy.mode=server", "privacy.clip=0.5")``."""
    from omegaconf import OmegaConf

    from fedclip_lightning.config import FederationConfig

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FederationConfig), OmegaConf.from_dotlist(list(dotlist))))
