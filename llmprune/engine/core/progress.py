"""How long operations report progress: one callback type, whoever listens.

The engine calls `progress(stage, done, total)`; the CLI decides whether that
becomes a Rich progress bar, JSON lines or nothing.
"""

from __future__ import annotations

from collections.abc import Callable

StageProgress = Callable[[str, int, int], None]
"""(stage name, units done, units total). The name may carry a detail that changes as the stage goes on
after DETAIL ("search · generation 12, KL 0.6181, ETA 4.2 min"); listeners key the stage by `stage_name`."""
DETAIL = " · "


def stage_name(stage: str) -> str:
    """The stage without its detail: what a progress bar or a memory phase is keyed by."""
    return stage.split(DETAIL, 1)[0]


CountProgress = Callable[[int, int], None]
"""(units done, units total) of one stage that is already named."""


def named_stage(progress: StageProgress | None, name: str) -> CountProgress | None:
    """The (done, total) callback of one stage of `progress` (None when nobody listens)."""
    if progress is None:
        return None
    return lambda done, total: progress(name, done, total)
