"""User-facing errors.

A mistake in the user's input (a bad config value, a missing folder, a corrupt
image) is raised as a :class:`UserError`. The command line catches it, prints
its message without a traceback and exits with status 2. Every message names
the bad value, the config key that set it and the fix.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable


class UserError(Exception):
    """One or more problems with the user's input.

    ``problems`` are complete sentences; the exception's message lists them
    all, so a config with several mistakes is reported in one go.
    """

    title = "invalid input"

    def __init__(self, problems: str | Iterable[str], title: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if title is not None:
            self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        if len(self.problems) == 1:
            return f"{self.title}: {self.problems[0]}"
        lines = [f"{self.title}: {len(self.problems)} problems"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class ConfigError(UserError):
    title = "config error"


class DataError(UserError):
    title = "data error"


class BackboneError(UserError):
    title = "backbone error"


class DivergedError(UserError):
    """Training produced a non-finite loss or model: the run stops rather than report it as a result."""

    title = "run diverged"


def quiet_on_closed_pipe(main: Callable[..., int]) -> Callable[..., int]:
    """An entry point whose reader went away (``fedclip-lightning --help | head``) stops quietly with
    status 1, as Python's documentation recommends for EPIPE, instead of a BrokenPipeError traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            try:
                return main(*args, **kwargs)
            finally:  # argparse's --help exits through SystemExit with its text still buffered
                sys.stdout.flush()
        except BrokenPipeError:
            # Python flushes stdout again at exit: point it at /dev/null, not at the closed pipe.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 1

    return wrapper
