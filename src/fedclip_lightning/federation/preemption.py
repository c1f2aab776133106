"""Preemption: SIGUSR1 (SLURM's warning before a time limit or a preemption, launch.sh's --signal) or
SIGTERM (scancel) set a flag; the server checks it at its safe point, the end of a round, on every rank at
once, writes a checkpoint and stops. After SIGUSR1 the job is requeued under SLURM and resumes by itself
(launch.sh passes resume=auto); after SIGTERM alone it is not (a cancelled job stays cancelled), as
Lightning's Trainer does."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

import torch

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Stopped at a safe point on SIGUSR1/SIGTERM, after writing a checkpoint. ``requeue``: this process asks
    SLURM to requeue the job, as the run's very last act (:func:`run` does it, after the summary, the loggers
    and the run lock are closed: a requeue ends the job's processes at once)."""

    def __init__(self, server_round: int, requeue: bool, terminated: bool = False):
        super().__init__(server_round)
        self.round, self.requeue, self.terminated = server_round, requeue, terminated
        self.requeued: bool | None = None  # None: not asked yet

    def __str__(self) -> str:
        if self.terminated:  # SIGTERM: scancel, or the end of the time limit's grace; requeueing would undo a cancel
            tail = "; stopped on SIGTERM, so the job is not requeued: continue with resume=auto"
        elif self.requeue and self.requeued is None:
            tail = "; the job is requeued as the run ends, and resumes by itself"
        elif self.requeued:
            tail = "; the job was requeued and will resume by itself"
        else:
            tail = "; continue with resume=auto"
        return f"preempted after round {self.round}: checkpoint written{tail}"


class Preemption:
    """Installs the handlers (main thread only); ``requested`` turns true on a signal; ``restore``."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        from .. import signals

        self.requested = bool(signals.received)  # a signal that came while the command line started
        # SLURM's warning (USR1, launch.sh's --signal) asks for a requeue; SIGTERM (scancel) only for a clean stop.
        self.requeue = signal.SIGUSR1 in signals.received
        signals.received.clear()
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002
        self.requested = True
        if signum == signal.SIGUSR1:
            self.requeue = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


def any_rank(fabric, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (signals may reach ranks at different times)."""
    if fabric.world_size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=fabric.device)
    return bool(fabric.all_reduce(t, reduce_op="sum").item() > 0)


def requeue() -> bool:
    """Under SLURM: put this job back in the queue."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0:
        log.warning("scontrol requeue %s failed: %s", job, proc.stderr.strip())
        return False
    return True
