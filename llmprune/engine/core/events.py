"""Typed events a fine-tuning run emits while it goes.

The training loop calls one `listener(event)`; the CLI picks who listens (the
Textual dashboard, plain Rich lines, nothing). The run directory's
`metrics.jsonl` holds one `StepMetrics` per optimizer step with its alerts, so
`step_events_from_record` can replay a run that is going or finished.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class RunStarted:
    """The run is set up and about to train (or to resume)."""

    run_dir: str
    method: str
    total_steps: int
    start_step: int
    epochs: int
    tokens_per_step: int
    trainable_parameters: int
    total_parameters: int
    device: str
    teacher: str | None = None  # "spec (T=…, weight …)" when distilling


@dataclass(frozen=True)
class HealthChecked:
    """Result of the pre-flight health check (doctor's checks) before step 1."""

    ok: bool
    forced: bool
    findings: list[dict] = field(default_factory=list)


@dataclass(frozen=True)
class PerplexityMeasured:
    """PPL on the evaluation split, before or after training."""

    phase: str  # before | after
    ppl: float
    dataset: str
    windows: int


@dataclass(frozen=True)
class GuardAlert:
    """A step whose loss or gradient norm could not be trusted; its update was not applied."""

    step: int
    kind: str  # nan_loss | inf_loss | loss_limit | grad_norm
    value: float
    action: str  # skip | rollback | stop
    message: str
    advice: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {**asdict(self), "advice": list(self.advice)}


@dataclass(frozen=True)
class StepMetrics:
    """One optimizer step (one line of metrics.jsonl)."""

    step: int
    epoch: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_second: float
    applied: bool = True  # False when a guard skipped the update
    alerts: tuple[GuardAlert, ...] = ()
    # with a teacher, `loss` = kd_weight * kd_loss + (1 - kd_weight) * lm_loss; both parts are recorded
    lm_loss: float | None = None
    kd_loss: float | None = None

    def to_dict(self) -> dict:
        record = asdict(self)
        record["alerts"] = [alert.to_dict() for alert in self.alerts]
        return record


@dataclass(frozen=True)
class CheckpointSaved:
    step: int
    path: str
    reason: str  # interval | request | final | start


@dataclass(frozen=True)
class RolledBack:
    """Weights, optimizer and scheduler went back to the last good checkpoint; the LR was scaled down."""

    at_step: int
    restored_step: int
    lr_scale: float
    rollbacks: int


@dataclass(frozen=True)
class RunFinished:
    status: str  # completed | stopped_by_user | stopped_by_guard
    steps: int
    best_loss: float | None
    last_good_checkpoint: str | None
    model_dir: str | None
    message: str = ""


Event = (
    RunStarted
    | HealthChecked
    | PerplexityMeasured
    | GuardAlert
    | StepMetrics
    | CheckpointSaved
    | RolledBack
    | RunFinished
)
Listener = Callable[[Event], None]


def step_events_from_record(record: dict) -> list[Event]:
    """The events of one metrics.jsonl line: its alerts first, then the step itself."""
    alerts = tuple(
        GuardAlert(**{**alert, "advice": tuple(alert.get("advice", ()))}) for alert in record.get("alerts", ())
    )
    step = StepMetrics(**{**record, "alerts": alerts})
    return [*alerts, step]
