"""The live fine-tuning dashboard (Textual).

The dashboard only consumes engine events: a live run posts them as messages
from its training thread (`Dashboard.feed`, thread-safe, never blocks), and
`--watch` replays a run directory's metrics.jsonl as the same events. Training
never depends on it: if the UI dies, the run goes on and prints plain lines.
"""

from __future__ import annotations

import json
import math
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Footer, Header, Label, ProgressBar, RichLog, Sparkline, Static

from llmprune.engine.core.events import (
    CheckpointSaved,
    Event,
    GuardAlert,
    HealthChecked,
    Listener,
    PerplexityMeasured,
    RolledBack,
    RunFinished,
    RunStarted,
    StepMetrics,
    step_events_from_record,
)

T = TypeVar("T")
CHART_POINTS = 240


def _format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "—"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _fmt(value: float | None, spec: str) -> str:
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
            ("loss", _fmt(self.loss, ".4f")),
            ("best loss", _fmt(self.best_loss, ".4f")),
            *([("KD loss", _fmt(self.kd_loss, ".4f")), ("LM loss", _fmt(self.lm_loss, ".4f"))] if self.kd_loss is not None else []),
            ("lr", _fmt(self.lr, ".3g")),
            ("grad norm", _fmt(self.grad_norm, ".3g")),
            ("tokens/s", _fmt(self.tokens_per_second, ",.0f")),
            ("ETA", _format_duration(self.eta_seconds)),
            ("rollbacks", str(self.rollbacks)),
        ]
        rows += [(f"PPL {phase}", _fmt(value, ",.2f")) for phase, value in self.ppl.items()]
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


def _chart_label(name: str, values: deque, spec: str) -> str:
    if not values:
        return f"{name}: —"
    return f"{name}: last {format(values[-1], spec)}  min {format(min(values), spec)}  max {format(max(values), spec)}"


class Dashboard(App):
    """Live charts of loss, LR and gradient norm; progress, ETA, tokens/s; NaN/Inf alerts that stay listed."""

    TITLE = "llmprune finetune"
    CSS = """
    #top { height: auto; }
    #stats { width: 36; height: auto; padding: 0 1; border: round $primary; }
    #charts { height: auto; padding: 0 1; border: round $primary; }
    .chart-label { color: $text-muted; }
    Sparkline { height: 3; margin-bottom: 1; }
    #progress-row { height: 1; padding: 0 1; }
    #progress-label { margin-left: 2; }
    #alerts { height: 1fr; min-height: 4; border: round $error; }
    """
    BINDINGS = [
        Binding("q", "stop", "Stop after saving"),
        Binding("s", "save", "Save checkpoint now"),
        Binding("ctrl+c", "stop", "Stop", show=False),
    ]

    class EngineEvent(Message):
        """One engine event, posted from the training thread."""

        def __init__(self, event: Event) -> None:
            super().__init__()
            self.event = event

    class TrainingEnded(Message):
        """The training function returned or raised."""

    def __init__(self, *, on_stop: Callable[[], None] | None = None, on_save: Callable[[], None] | None = None,
                 watch_dir: str | Path | None = None, close_when_finished: bool = False):
        super().__init__()
        self.state = DashboardState()
        self._on_stop, self._on_save = on_stop, on_save
        self._close_when_finished = close_when_finished
        self._watch = MetricsFollower(watch_dir) if watch_dir is not None else None
        self.on_mounted: Callable[[], None] | None = None

    # ------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False)
        with Horizontal(id="top"):
            yield Static(id="stats")
            with Vertical(id="charts"):
                for key in ("loss", "lr", "grad_norm"):
                    yield Label(id=f"{key}-label", classes="chart-label")
                    yield Sparkline([], id=f"{key}-chart", summary_function=max)
        with Horizontal(id="progress-row"):
            yield ProgressBar(total=None, show_eta=False, id="progress")
            yield Label(id="progress-label")
        yield RichLog(id="alerts", wrap=True, markup=False, max_lines=500)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#alerts", RichLog).border_title = "alerts"
        self.query_one("#charts").border_title = "charts"
        self.query_one("#stats").border_title = "run"
        self._refresh()
        if self._watch is not None:
            self.sub_title = str(self._watch.run_dir)
            self._poll_metrics()
            self.set_interval(0.5, self._poll_metrics)
        if self.on_mounted is not None:
            self.on_mounted()

    # ------------------------------------------------------------ events in

    def feed(self, event: Event) -> None:
        """The engine listener: thread-safe and non-blocking; dropped once the app has closed."""
        self.post_message(self.EngineEvent(event))

    def on_dashboard_engine_event(self, message: EngineEvent) -> None:
        self.show(message.event)

    def on_dashboard_training_ended(self, message: TrainingEnded) -> None:
        if not self.state.status.startswith("finished"):
            self.exit()  # the training raised: the caller reports the error
        elif self._close_when_finished:
            self.set_timer(1.0, self.exit)  # a last look at the final numbers

    def show(self, event: Event) -> None:
        self.state.apply(event)
        if isinstance(event, GuardAlert):
            self._log_alert(event)
        elif isinstance(event, RolledBack):
            self.query_one("#alerts", RichLog).write(Text(self.state.notes[-1], style="yellow"))
        elif isinstance(event, RunStarted):
            self.sub_title = event.run_dir
        elif isinstance(event, RunFinished):
            style = "bold red" if event.status == "stopped_by_guard" else "bold green"
            self.query_one("#alerts", RichLog).write(Text(f"finished: {event.status}. {event.message}", style=style))
        self._refresh()

    def _log_alert(self, alert: GuardAlert) -> None:
        log = self.query_one("#alerts", RichLog)
        log.write(Text(f"⚠ step {alert.step}: {alert.kind} = {alert.value:.4g} → {alert.action}", style="bold white on red"))
        log.write(Text(alert.message, style="red"))
        if alert.advice:
            log.write(Text("advice: " + "; ".join(alert.advice), style="red"))

    def _refresh(self) -> None:
        state = self.state
        self.query_one("#stats", Static).update(state.stats_text())
        for key, values, spec in (("loss", state.losses, ".4f"), ("lr", state.lrs, ".2e"), ("grad_norm", state.grad_norms, ".3g")):
            self.query_one(f"#{key}-label", Label).update(_chart_label(key.replace("_", " "), values, spec))
            self.query_one(f"#{key}-chart", Sparkline).data = list(values)
        bar = self.query_one("#progress", ProgressBar)
        if state.total_steps:
            bar.update(total=state.total_steps, progress=state.step)
        self.query_one("#progress-label", Label).update(
            f"step {state.step}/{state.total_steps or '?'}   ETA {_format_duration(state.eta_seconds)}   "
            f"{_fmt(state.tokens_per_second, ',.0f')} tok/s"
        )

    def _poll_metrics(self) -> None:
        for event in self._watch.poll():
            self.show(event)

    # ------------------------------------------------------------ keys

    def action_stop(self) -> None:
        if self._on_stop is None or self.state.status.startswith("finished"):
            self.exit()
            return
        self.state.status = "stopping after this step (saving)"
        self._on_stop()
        self._refresh()

    def action_save(self) -> None:
        if self._on_save is None:
            self.notify("saving is only possible in the process that trains", severity="warning")
            return
        self._on_save()
        self.notify("a checkpoint will be saved after this step")


class MetricsFollower:
    """Reads a run directory as it grows: run.json for the frame, metrics.jsonl for the steps."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._offset = 0
        self._started = False
        self._finished = False

    def poll(self) -> list[Event]:
        events: list[Event] = []
        run = _read_json(self.run_dir / "run.json")
        if run and not self._started:
            self._started = True
            config = run.get("config", {})
            events.append(RunStarted(
                run_dir=str(self.run_dir), method=config.get("method", "?"), total_steps=int(run.get("total_steps", 0)),
                start_step=0, epochs=int(config.get("epochs", 1)),
                tokens_per_step=int(config.get("batch_size", 1)) * int(config.get("grad_accum", 1)) * int(config.get("seq_len", 0)),
                trainable_parameters=0, total_parameters=0, device="", teacher=config.get("teacher"),
            ))
        events += self._new_steps()
        if run and not self._finished and run.get("status") not in (None, "running"):
            self._finished = True
            events.append(RunFinished(
                status=run["status"], steps=int(run.get("steps", 0)), best_loss=run.get("best_loss"),
                last_good_checkpoint=run.get("last_good_checkpoint"), model_dir=run.get("model_dir") or run.get("adapter_dir"),
                message=run.get("message", ""),
            ))
        return events

    def _new_steps(self) -> list[Event]:
        path = self.run_dir / "metrics.jsonl"
        try:
            with path.open(encoding="utf-8") as handle:
                handle.seek(self._offset)
                chunk = handle.read()
        except OSError:
            return []
        complete, _, _ = chunk.rpartition("\n")  # a line still being written waits for the next poll
        if not complete:
            return []
        self._offset += len((complete + "\n").encode("utf-8"))
        events: list[Event] = []
        for line in complete.splitlines():
            if line.strip():
                events += step_events_from_record(json.loads(line))
        return events


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------- running a training under the dashboard


class _Relay:
    """The listener given to the engine: to the dashboard while it lives, then to the fallback."""

    def __init__(self, fallback: Listener | None):
        self.target: Listener | None = None
        self.fallback = fallback
        self.started: RunStarted | None = None

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            self.started = event
        target = self.target or self.fallback
        if target is not None:
            target(event)

    def to_fallback(self) -> None:
        """The dashboard is gone: later events go to the fallback, which first learns what the run is."""
        self.target = None
        if self.fallback is not None and self.started is not None:
            self.fallback(self.started)


def run_with_dashboard(
    train: Callable[[Listener, Any], T],
    *,
    fallback: Listener | None = None,
    close_when_finished: bool = True,
    headless: bool = False,
) -> T:
    """Run `train(listener, control)` in a thread with the dashboard attached; return its result.

    `train` is e.g. `lambda listener, control: run_finetune(config, listener, control=control)`.
    `q` asks the run to stop after saving, `s` to save a checkpoint now. If the
    dashboard crashes or is closed, the run goes on with `fallback` as listener.
    """
    from llmprune.engine.finetune.train import TrainingControl

    control = TrainingControl()
    relay = _Relay(fallback)
    outcome: dict[str, Any] = {}
    done = threading.Event()
    app = Dashboard(on_stop=control.request_stop, on_save=control.request_save, close_when_finished=close_when_finished)

    def work() -> None:
        try:
            outcome["result"] = train(relay, control)
        except BaseException as error:  # re-raised in the caller's thread
            outcome["error"] = error
        finally:
            done.set()
            app.post_message(Dashboard.TrainingEnded())  # thread-safe; ignored once the app is gone

    thread = threading.Thread(target=work, name="llmprune-train")

    def start() -> None:
        relay.target = app.feed
        thread.start()

    app.on_mounted = start
    try:
        app.run(headless=headless)
    finally:
        if done.is_set():
            relay.target = None
        else:
            relay.to_fallback()
    if thread.ident is None:
        thread.start()  # the app failed before mounting: train without it
    while True:
        try:
            if done.wait(timeout=0.5):
                break
        except KeyboardInterrupt:  # Ctrl-C after the dashboard closed: stop cleanly, after saving
            control.request_stop()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


class WatchDashboard(Dashboard, inherit_bindings=False):
    """The dashboard on a run directory: it only reads, so its one key closes it."""

    BINDINGS = [Binding("q", "quit", "Close (the run goes on)"), Binding("ctrl+c", "quit", "Close", show=False)]


def watch_run(run_dir: str | Path) -> None:
    """Open the dashboard on a run directory (going or finished); q closes it."""
    WatchDashboard(watch_dir=run_dir).run()
