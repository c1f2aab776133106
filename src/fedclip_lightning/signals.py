"""SIGUSR1/SIGTERM caught from the first instant of the command line.

Importing torch and Lightning takes seconds; SLURM's warning signal may come
then. ``install_early`` (called first thing by the command line, before any
heavy import) records such a signal instead of letting it kill the process;
the run's own handler (``federation.preemption.Preemption``) takes it over, so
the run checkpoints after its first round and stops (requeued under SLURM).
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
received: list[int] = []


def _record(signum, frame) -> None:  # noqa: ARG001
    received.append(signum)


def install_early() -> None:
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, _record)
