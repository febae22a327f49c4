"""The dashboard: driven with Pilot from a stream of events, in watch mode from a run directory, and its layout."""

from __future__ import annotations

import json
import math

import pytest

from llmprune.engine.core.events import CheckpointSaved, RunFinished, RunStarted, StepMetrics
from llmprune.engine.finetune.guards import check_step, make_alert
from llmprune.ui.tui import Dashboard, WatchDashboard, run_with_dashboard

SIZE = (110, 34)


@pytest.fixture
def anyio_backend():
    return "asyncio"


def stream_with_a_nan():
    """A run of 6 steps whose step 4 has a NaN loss (rolled back)."""
    events = [RunStarted("/runs/demo", "full", 10, 0, 1, 256, 1000, 1000, "cpu")]
    for step, loss, grad_norm in [
        (1, 3.5, 1.2),
        (2, 3.1, 0.9),
        (3, 2.9, 0.8),
        (4, math.nan, math.nan),
        (5, 2.7, 0.7),
        (6, 2.8, 0.6),
    ]:
        alerts = ()
        if not math.isfinite(loss):
            alerts = (make_alert(step, check_step(loss, grad_norm, 1e6), "rollback", 1e-5),)
            events.extend(alerts)
        events.append(StepMetrics(step, 1, loss, 1e-5, grad_norm, 512.0, not alerts, alerts))
    return events


def alert_lines(app) -> list[str]:
    return [line.text for line in app.query_one("#alerts").lines]


@pytest.mark.anyio
async def test_pilot_shows_values_and_a_lasting_red_alert():
    stopped, saved = [], []
    app = Dashboard(on_stop=lambda: stopped.append(1), on_save=lambda: saved.append(1))
    async with app.run_test(size=SIZE) as pilot:
        for event in stream_with_a_nan():
            app.feed(event)  # as the training thread does
        await pilot.pause()
        stats = str(app.query_one("#stats").render())
        assert "6 / 10" in stats and "2.8000" in stats  # current step and loss
        assert "2.7000" in stats  # best loss
        assert "alerts" in stats
        lines = alert_lines(app)
        assert lines[0].startswith("⚠ step 4: nan_loss = nan → rollback")
        assert any("lower the learning rate" in line for line in lines)
        # the NaN step is in the alerts, not in the charts
        assert list(app.query_one("#loss-chart").data) == [3.5, 3.1, 2.9, 2.7, 2.8]
        assert "min 2.7000" in str(app.query_one("#loss-label").render())
        assert "step 6/10" in str(app.query_one("#progress-label").render())
        # later events do not push the alert away
        app.feed(CheckpointSaved(6, "/runs/demo/checkpoints/step-000006", "interval"))
        await pilot.pause()
        assert alert_lines(app)[0].startswith("⚠ step 4")
        await pilot.press("s")
        await pilot.press("q")
        assert saved == [1] and stopped == [1]
        assert "stopping" in app.state.status


@pytest.mark.anyio
async def test_finished_run_shows_status_and_last_good_checkpoint():
    app = Dashboard()
    async with app.run_test(size=SIZE) as pilot:
        for event in stream_with_a_nan():
            app.show(event)
        app.show(
            RunFinished(
                "stopped_by_guard",
                6,
                2.7,
                "/runs/demo/checkpoints/step-000003",
                "/runs/demo/model",
                "stopped at step 6",
            )
        )
        await pilot.pause()
        stats = str(app.query_one("#stats").render())
        assert "finished: stopped_by_guard" in stats and "step-000003" in stats
        assert "finished: stopped_by_guard" in alert_lines(app)[-1]


@pytest.mark.anyio
async def test_watch_mode_replays_a_run_directory(tmp_path):
    records = [event.to_dict() for event in stream_with_a_nan() if isinstance(event, StepMetrics)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
    (tmp_path / "run.json").write_text(
        json.dumps({"config": {"method": "lora", "seq_len": 256}, "total_steps": 10, "status": "running"})
    )
    app = WatchDashboard(watch_dir=tmp_path)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert app.state.step == 3 and app.state.method == "lora" and not app.state.alerts
        # the run goes on: two more lines (one with the NaN), the second one half-written
        with (tmp_path / "metrics.jsonl").open("a") as handle:
            handle.write(json.dumps(records[3]) + "\n" + json.dumps(records[4])[:20])
        await pilot.pause(0.7)
        assert app.state.step == 4 and [a.step for a in app.state.alerts] == [4]
        assert alert_lines(app)[0].startswith("⚠ step 4")
        await pilot.press("q")
    assert app.return_code == 0


def test_run_with_dashboard_returns_the_result_and_survives_listener_use():
    received = []

    def fake_training(listener, control):
        for event in stream_with_a_nan():
            listener(event)
        listener(RunFinished("completed", 6, 2.7, None, None))
        return "result"

    assert run_with_dashboard(fake_training, fallback=received.append, headless=True) == "result"


def test_run_with_dashboard_reraises_training_errors():
    def failing(listener, control):
        raise ValueError("bad input")

    with pytest.raises(ValueError, match="bad input"):
        run_with_dashboard(failing, headless=True)


def test_layout_snapshot(snap_compare):
    async def feed(pilot):
        for event in stream_with_a_nan():
            pilot.app.show(event)
        await pilot.pause()

    assert snap_compare(Dashboard(), terminal_size=SIZE, run_before=feed)


def test_when_the_dashboard_closes_early_the_fallback_takes_over_with_the_run_frame():
    import threading

    from llmprune.engine.core.events import RunStarted as Started

    received, closed = [], threading.Event()
    original_mount = Dashboard.on_mount

    def close_at_once(self):
        original_mount(self)
        self.exit()  # as if the UI had crashed or been closed while training goes on

    def training(listener, control):
        closed.wait(5)
        for event in stream_with_a_nan():
            listener(event)
        return "done"

    Dashboard.on_mount = close_at_once
    try:
        timer = threading.Timer(1.0, closed.set)
        timer.start()
        assert run_with_dashboard(training, fallback=received.append, headless=True) == "done"
    finally:
        Dashboard.on_mount = original_mount
    # the fallback saw every event (and the frame of the run first)
    assert isinstance(received[0], Started) and sum(isinstance(e, StepMetrics) for e in received) == 6


def test_the_dashboard_shows_the_kd_and_lm_parts_and_the_teacher(tmp_path):
    from llmprune.ui.dashboard_state import DashboardState
    from llmprune.ui.metrics_follower import MetricsFollower

    state = DashboardState()
    state.apply(
        RunStarted("/runs/kd", "full", 10, 0, 1, 256, 1000, 1000, "cpu", teacher="smollm2-135m (T=1, KD weight 0.5)")
    )
    state.apply(StepMetrics(1, 1, 2.25, 1e-4, 0.5, 512.0, lm_loss=3.5, kd_loss=1.0))
    text = str(state.stats_text())
    assert (
        "KD loss 1.0000" in text and "LM loss 3.5000" in text and "teacher: smollm2-135m (T=1, KD weight 0.5)" in text
    )
    plain = DashboardState()
    plain.apply(StepMetrics(1, 1, 2.25, 1e-4, 0.5, 512.0))
    assert "KD loss" not in str(plain.stats_text())
    # watch mode reads the parts back from metrics.jsonl and the teacher from run.json
    (tmp_path / "run.json").write_text(
        json.dumps({"config": {"method": "full", "teacher": "smollm2-135m"}, "total_steps": 10, "status": "running"})
    )
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps(StepMetrics(1, 1, 2.25, 1e-4, 0.5, 512.0, lm_loss=3.5, kd_loss=1.0).to_dict()) + "\n"
    )
    watched = DashboardState()
    for event in MetricsFollower(tmp_path).poll():
        watched.apply(event)
    assert (watched.kd_loss, watched.lm_loss, watched.teacher) == (1.0, 3.5, "smollm2-135m")
