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


def named(names: Iterable[str], limit: int = 8) -> str:
    """Names for a message, at most ``limit`` of them: ``a, b, c and 9,997 more``."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown} and {len(names) - limit:,} more"


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


class Problems:
    """Collects the problems of a config as complete sentences (the value, the key that set it, the fix) so
    that every component checks its own keys and the user hears of every mistake in one :class:`ConfigError`."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, message: str) -> None:
        self.messages.append(message)

    def bad(self, key: str, value, why: str, fix: str) -> None:
        self.messages.append(f"{key}={value!r}: {why}. Fix: {fix}.")

    def choice(self, key: str, value, options: tuple[str, ...]) -> None:
        if value not in options:
            self.bad(key, value, "unknown value", f"use one of {', '.join(options)}")

    def positive_int(self, key: str, value: int, minimum: int = 1) -> None:
        if value < minimum:
            self.bad(key, value, f"must be >= {minimum}", f"set {key}={minimum} or more")

    def raise_any(self) -> None:
        if self.messages:
            raise ConfigError(self.messages)


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
