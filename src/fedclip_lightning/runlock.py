"""One writer per run directory.

The process that will be a run's global rank 0 takes ``<run dir>/.lock`` (host,
pid, SLURM job id, a token) with an exclusive create before anything is
written there, and removes it when the run ends, however it ends short of
SIGKILL. A second run into the same directory gets a message naming the holder.
A lock left behind is taken over when it is provably stale: its pid is dead on
this host, or it belongs to this same SLURM job (a requeued job resuming after
its node was lost). Otherwise the message says how to remove it by hand.
Processes that a run launches itself (Fabric's other ranks) inherit the token
and do not lock again.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from pathlib import Path

from .errors import ConfigError

log = logging.getLogger(__name__)
LOCK = ".lock"
TOKEN_ENV = "FEDCLIP_RUN_LOCK"


def _is_rank_zero() -> bool:
    return all(os.environ.get(v, "0") == "0" for v in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.held = False

    def acquire(self) -> "RunLock":
        if not _is_rank_zero():
            return self
        holder = self._read()
        if holder is not None and holder.get("token") and holder.get("token") == os.environ.get(TOKEN_ENV):
            return self  # our own launcher's lock
        me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
              "token": secrets.token_hex(8)}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale(self._read() or {})
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            os.environ[TOKEN_ENV] = me["token"]
            return self
        raise ConfigError(f"another run took {self.path} at the same moment. Fix: start one run per run_name.")

    def _take_over_if_stale(self, holder: dict) -> None:
        host, pid, job = holder.get("host"), holder.get("pid"), holder.get("slurm_job")
        same_job = job is not None and job == os.environ.get("SLURM_JOB_ID")
        dead_here = host == socket.gethostname() and isinstance(pid, int) and not _alive(pid)
        if same_job or dead_here or not holder:
            why = "its process is gone" if dead_here else ("it is this SLURM job's own, from before a requeue"
                                                           if same_job else "it is unreadable")
            log.warning("taking over the stale lock %s (%s)", self.path, why)
            print(f"  WARNING: taking over the stale lock {self.path} ({why})", flush=True)
            self.path.unlink(missing_ok=True)
            return
        raise ConfigError(f"run directory {self.path.parent} is in use by another run (host {host}, pid {pid}"
                          + (f", SLURM job {job}" if job else "") + "). Two runs into one directory would mix their "
                          "files. Fix: wait for it to end, choose another run_name, or, if that run is gone (its "
                          f"machine crashed), delete {self.path}.")

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            os.environ.pop(TOKEN_ENV, None)
