"""Errors a user sees. Each says what was wrong, where, and what to do."""

from __future__ import annotations


class WeftError(Exception):
    """Base of every error weft reports to a user rather than crashing on.

    `hint` is the fix, shown on its own line by the CLI. `exit_code` lets the CLI map
    classes of failure to distinct codes (2: bad input, 3: environment, 4: not found,
    5: remote refused).
    """

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class EnvironmentProblem(WeftError):
    """The host lacks something weft needs (root, bpffs, headers, cgroup v2)."""

    exit_code = 3


class NotFound(WeftError):
    exit_code = 4


class RemoteRefused(WeftError):
    """The controller or an agent answered, and the answer was no."""

    exit_code = 5
