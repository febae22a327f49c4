"""How long operations report progress: one callback type, whoever listens.

The engine calls `progress(stage, done, total)`; the CLI decides whether that
becomes a Rich progress bar, JSON lines or nothing.
"""

from __future__ import annotations

from collections.abc import Callable

StageProgress = Callable[[str, int, int], None]
"""(stage name, units done, units total)."""
CountProgress = Callable[[int, int], None]
"""(units done, units total) of one stage that is already named."""


def named_stage(progress: StageProgress | None, name: str) -> CountProgress | None:
    """The (done, total) callback of one stage of `progress` (None when nobody listens)."""
    if progress is None:
        return None
    return lambda done, total: progress(name, done, total)
