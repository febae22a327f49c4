"""What the fine-tuning dashboard shows, as plain data updated from engine events (no widgets: testable on its own)."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from rich.text import Text

from llmprune.engine.core.events import (
    CheckpointSaved,
    Event,
    GuardAlert,
    HealthChecked,
    PerplexityMeasured,
    RolledBack,
    RunFinished,
    RunStarted,
    StepMetrics,
)

CHART_POINTS = 240


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_value(value: float | None, spec: str) -> str:
    if value is None:
        return "—"
    return format(value, spec) if math.isfinite(value) else str(value)


@dataclass
class DashboardState:
    """Everything the dashboard shows, updated from events (no widgets: testable on its own)."""

    run_dir: str = ""
    method: str = ""
    status: str = "starting"
    total_steps: int = 0
    step: int = 0
    epoch: int = 0
    loss: float | None = None
    best_loss: float | None = None
    kd_loss: float | None = None  # the two parts of the loss when distilling
    lm_loss: float | None = None
    teacher: str | None = None
    lr: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    last_good_checkpoint: str | None = None
    rollbacks: int = 0
    ppl: dict[str, float] = field(default_factory=dict)
    alerts: list[GuardAlert] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    losses: deque = field(default_factory=lambda: deque(maxlen=CHART_POINTS))
    lrs: deque = field(default_factory=lambda: deque(maxlen=CHART_POINTS))
    grad_norms: deque = field(default_factory=lambda: deque(maxlen=CHART_POINTS))
    step_seconds: deque = field(default_factory=lambda: deque(maxlen=20))
    tokens_per_step: int = 0

    @property
    def eta_seconds(self) -> float | None:
        if not self.step_seconds or not self.total_steps:
            return None
        return (self.total_steps - self.step) * sum(self.step_seconds) / len(self.step_seconds)

    def apply(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.run_dir, self.method, self.total_steps = event.run_dir, event.method, event.total_steps
            self.step, self.tokens_per_step, self.status = event.start_step, event.tokens_per_step, "training"
            self.teacher = event.teacher
        elif isinstance(event, StepMetrics):
            self.step, self.epoch, self.lr, self.grad_norm = event.step, event.epoch, event.lr, event.grad_norm
            self.loss, self.kd_loss, self.lm_loss = event.loss, event.kd_loss, event.lm_loss
            if event.tokens_per_second > 0:
                self.tokens_per_second = event.tokens_per_second
                if self.tokens_per_step:
                    self.step_seconds.append(self.tokens_per_step / event.tokens_per_second)
            # refused steps are in the alerts, not in the charts: one 1e7 spike would flatten them
            if event.applied and math.isfinite(event.loss) and math.isfinite(event.grad_norm):
                self.best_loss = event.loss if self.best_loss is None else min(self.best_loss, event.loss)
                self.losses.append(event.loss)
                self.lrs.append(event.lr)
                self.grad_norms.append(event.grad_norm)
        elif isinstance(event, GuardAlert):
            self.alerts.append(event)
        elif isinstance(event, CheckpointSaved):
            self.notes.append(f"checkpoint saved at step {event.step} ({event.reason})")
        elif isinstance(event, RolledBack):
            self.rollbacks = event.rollbacks
            self.notes.append(f"rolled back to step {event.restored_step}; LR x{event.lr_scale:g}")
        elif isinstance(event, PerplexityMeasured):
            self.ppl[event.phase] = event.ppl
        elif isinstance(event, HealthChecked):
            self.notes.append("health check passed" if event.ok else "health check FAILED (--force)")
        elif isinstance(event, RunFinished):
            self.status = f"finished: {event.status}"
            self.last_good_checkpoint = event.last_good_checkpoint
            self.notes.append(event.message or event.status)

    def stats_text(self) -> Text:
        text = Text()
        rows = [
            ("status", self.status),
            ("step", f"{self.step} / {self.total_steps or '?'}"),
            ("epoch", str(self.epoch or "—")),
            ("loss", format_value(self.loss, ".4f")),
            ("best loss", format_value(self.best_loss, ".4f")),
            *(
                [("KD loss", format_value(self.kd_loss, ".4f")), ("LM loss", format_value(self.lm_loss, ".4f"))]
                if self.kd_loss is not None
                else []
            ),
            ("lr", format_value(self.lr, ".3g")),
            ("grad norm", format_value(self.grad_norm, ".3g")),
            ("tokens/s", format_value(self.tokens_per_second, ",.0f")),
            ("ETA", format_duration(self.eta_seconds)),
            ("rollbacks", str(self.rollbacks)),
        ]
        rows += [(f"PPL {phase}", format_value(value, ",.2f")) for phase, value in self.ppl.items()]
        for name, value in rows:
            text.append(f"{name:>10} ", style="dim")
            text.append(f"{value}\n", style="bold")
        if self.alerts:
            text.append(f"{'alerts':>10} ", style="dim")
            text.append(f"{len(self.alerts)}\n", style="bold red")
        if self.teacher:
            text.append("teacher: ", style="dim")
            text.append(f"{self.teacher}\n")
        if self.last_good_checkpoint:
            text.append("last good: ", style="dim")
            text.append(Path(self.last_good_checkpoint).name, style="bold green")
        return text
