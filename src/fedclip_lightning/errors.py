"""User-facing errors.

A mistake in the user's input (a bad config value, a missing folder, a corrupt
image) is raised as a :class:`UserError`. The command line catches it, prints
its message without a traceback and exits with status 2. Every message names
the bad value, the config key that set it and the fix.
"""

from __future__ import annotations

from collections.abc import Iterable


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
