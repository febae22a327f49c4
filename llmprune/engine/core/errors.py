"""Errors the engine raises on purpose.

The CLI turns a `UserInputError` into one line on stderr and exit code 2; any
other exception is a bug and keeps its traceback (with --debug).
"""

from __future__ import annotations


class LlmpruneError(Exception):
    """Base class of the errors llmprune raises deliberately."""


class UserInputError(LlmpruneError):
    """Bad input: says what is wrong and what to do about it."""

    def __init__(self, problem: str, hint: str | None = None):
        self.problem = problem
        self.hint = hint
        super().__init__(problem if not hint else f"{problem} — {hint}")


class CheckFailedError(LlmpruneError):
    """A check found a problem, so the command stopped before doing its work (exit code 1).

    `details` are the findings, one short line each (the CLI prints the first few).
    """

    def __init__(self, problem: str, hint: str | None = None, details: list[str] | tuple[str, ...] = ()):
        self.problem = problem
        self.hint = hint
        self.details = list(details)
        super().__init__(problem if not hint else f"{problem} — {hint}")


def require(condition: bool, problem: str, hint: str) -> None:
    """Raise `UserInputError(problem, hint)` unless `condition` holds: the one form every config's validation takes."""
    if not condition:
        raise UserInputError(problem, hint)
