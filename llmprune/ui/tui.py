"""The live fine-tuning dashboard (Textual).

The dashboard only consumes engine events: a live run posts them as messages
from its training thread (`Dashboard.feed`, thread-safe, never blocks), and
`--watch` replays a run directory's metrics.jsonl as the same events. Training
never depends on it: if the UI dies, the run goes on and prints plain lines.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import Footer, Header, Label, ProgressBar, RichLog, Sparkline, Static

from llmprune.engine.core.events import (
    Event,
    GuardAlert,
    Listener,
    RolledBack,
    RunFinished,
    RunStarted,
)
from llmprune.engine.core.stop import STOP, hangup_stops, mute_lost_terminal, terminal_lost
from llmprune.ui.dashboard_state import DashboardState, format_duration, format_value
from llmprune.ui.metrics_follower import MetricsFollower

T = TypeVar("T")


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

    def __init__(
        self,
        *,
        on_stop: Callable[[], None] | None = None,
        on_save: Callable[[], None] | None = None,
        watch_dir: str | Path | None = None,
        close_when_finished: bool = False,
        stop_requested: Callable[[], bool] | None = None,
    ):
        super().__init__()
        self.state = DashboardState()
        self._on_stop, self._on_save = on_stop, on_save
        self._stop_requested = stop_requested
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
        if self._stop_requested is not None:
            self.set_interval(0.25, self._follow_stop)
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
        log.write(
            Text(f"⚠ step {alert.step}: {alert.kind} = {alert.value:.4g} → {alert.action}", style="bold white on red")
        )
        log.write(Text(alert.message, style="red"))
        if alert.advice:
            log.write(Text("advice: " + "; ".join(alert.advice), style="red"))

    def _refresh(self) -> None:
        state = self.state
        self.query_one("#stats", Static).update(state.stats_text())
        for key, values, spec in (
            ("loss", state.losses, ".4f"),
            ("lr", state.lrs, ".2e"),
            ("grad_norm", state.grad_norms, ".3g"),
        ):
            self.query_one(f"#{key}-label", Label).update(_chart_label(key.replace("_", " "), values, spec))
            self.query_one(f"#{key}-chart", Sparkline).data = list(values)
        bar = self.query_one("#progress", ProgressBar)
        if state.total_steps:
            bar.update(total=state.total_steps, progress=state.step)
        self.query_one("#progress-label", Label).update(
            f"step {state.step}/{state.total_steps or '?'}   ETA {format_duration(state.eta_seconds)}   "
            f"{format_value(state.tokens_per_second, ',.0f')} tok/s"
        )

    def _poll_metrics(self) -> None:
        for event in self._watch.poll():
            self.show(event)

    def _follow_stop(self) -> None:
        """A stop from outside (a signal): say so; a lost terminal leaves nothing to draw on, so close at once."""
        if terminal_lost():
            self.exit()
        elif self._stop_requested() and not self.state.status.startswith(("finished", "stopping")):
            self.state.status = "stopping after this step (saving)"
            self._refresh()

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
            target(event)  # a terminal that went away under the fallback printer: see run_setup.safe_listener

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
    dashboard crashes, the run goes on with `fallback` as listener. A signal (which
    Python delivers to this, the UI's thread) or the terminal going away asks the
    training thread to stop after its step and save; this returns when it has.
    """
    from llmprune.engine.finetune.train import TrainingControl

    control = TrainingControl()
    # from here until the training thread ends, a signal must ask it to stop, never raise in this thread
    with STOP.cooperating_with(lambda reason: control.request_stop()):
        return _run_with_dashboard(train, control, fallback, close_when_finished, headless)


def _run_with_dashboard(
    train: Callable[[Listener, Any], T],
    control: Any,
    fallback: Listener | None,
    close_when_finished: bool,
    headless: bool,
) -> T:
    relay = _Relay(fallback)
    outcome: dict[str, Any] = {}
    done = threading.Event()
    app = Dashboard(
        on_stop=control.request_stop,
        on_save=control.request_save,
        close_when_finished=close_when_finished,
        stop_requested=lambda: control.stop_requested,
    )

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
        if control.stop_requested:  # stopped before anything began: nothing to train, nothing to save
            app.exit()
            return
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
    if terminal_lost():  # the dashboard closed because its terminal went away: that is a stop (but under nohup)
        mute_lost_terminal()
        if hangup_stops():
            STOP.request("the terminal went away")
    if thread.ident is None:
        if control.stop_requested:
            raise KeyboardInterrupt
        thread.start()  # the app failed before mounting: train without it
    while not done.wait(timeout=0.5):  # a signal meanwhile only asks the run to stop (see run_with_dashboard)
        pass
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
