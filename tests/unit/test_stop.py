"""core/stop.py: how a signal or a lost terminal becomes a stop, in whatever thread the work runs."""

from __future__ import annotations

import os
import pty
import signal
import threading

import pytest

from llmprune.engine.core import stop
from llmprune.engine.core.stop import STOP


@pytest.fixture(autouse=True)
def fresh_stop():
    STOP.reset()
    yield
    STOP.reset()


def test_a_signal_outside_cooperative_work_raises_keyboard_interrupt_once():
    with pytest.raises(KeyboardInterrupt):
        stop._on_signal(signal.SIGTERM, None)
    assert STOP.requested and STOP.reason == "SIGTERM"
    stop._on_signal(signal.SIGINT, None)  # the first one is being acted on: the clean-up must not be interrupted


def test_while_a_loop_cooperates_a_signal_only_asks_and_reaches_its_thread():
    asked = threading.Event()
    seen = []

    def loop() -> None:  # a training loop in another thread, as under the dashboard
        asked.wait(timeout=30)
        seen.append(threading.current_thread().name)

    worker = threading.Thread(target=loop, name="trainer")
    with STOP.cooperating_with(lambda reason: asked.set()):
        worker.start()
        stop._on_signal(signal.SIGHUP if hasattr(signal, "SIGHUP") else signal.SIGTERM, None)  # no raise here
        worker.join(timeout=30)
    assert seen == ["trainer"] and not STOP.cooperating


def test_the_third_signal_quits_at_once(monkeypatch):
    exits = []
    monkeypatch.setattr(stop.os, "_exit", lambda code: exits.append(code))
    with STOP.cooperating_with(lambda reason: None):
        for _ in range(3):
            stop._on_signal(signal.SIGINT, None)
    assert exits == [130]


def test_a_subscriber_after_the_stop_hears_of_it_and_a_failing_one_hides_nothing():
    heard = []
    STOP.subscribe(lambda reason: 1 / 0)
    STOP.request("SIGTERM")
    unsubscribe = STOP.subscribe(heard.append)
    assert heard == ["SIGTERM"]
    unsubscribe()
    STOP.request("SIGINT")
    assert heard == ["SIGTERM"] and STOP.count == 2


def test_a_hung_up_terminal_is_seen_and_its_stream_is_pointed_at_dev_null(monkeypatch):
    master, slave = pty.openpty()
    try:
        monkeypatch.setattr(stop, "STREAMS", (slave,))
        stop.remember_terminal()
        assert not stop.terminal_lost()
        os.close(master)  # the terminal goes away
        with pytest.raises(OSError) as error:
            os.write(slave, b"x")
        assert stop.is_terminal_error(error.value) and stop.terminal_lost()
        assert stop.mute_lost_terminal()
        assert os.write(slave, b"result") == 6 and stop.terminal_lost()  # writes now succeed, into /dev/null
    finally:
        os.close(slave)
        monkeypatch.setattr(stop, "STREAMS", ())
        stop.remember_terminal()


def test_a_pipe_is_not_a_lost_terminal(monkeypatch):
    read, write = os.pipe()
    try:
        monkeypatch.setattr(stop, "STREAMS", (write,))
        stop.remember_terminal()
        assert not stop.terminal_lost() and not stop.mute_lost_terminal()
    finally:
        os.close(read)
        os.close(write)
        monkeypatch.setattr(stop, "STREAMS", ())
        stop.remember_terminal()


def test_a_printer_failing_on_a_lost_terminal_stops_the_run_without_a_traceback(monkeypatch, caplog):
    from llmprune.engine.finetune.run_setup import safe_listener

    master, slave = pty.openpty()
    try:
        monkeypatch.setattr(stop, "STREAMS", (slave,))
        stop.remember_terminal()
        emit = safe_listener(lambda event: os.write(slave, b"step 7 loss 2.1\n"))
        os.close(master)  # the terminal goes away, and no SIGHUP comes (say, it is ignored)
        emit("event")
        assert STOP.requested and STOP.reason == "the terminal went away"
        emit("event")  # the stream is /dev/null now: nothing fails, nothing more is asked
        assert STOP.count == 1 and "Traceback" not in caplog.text
    finally:
        os.close(slave)
        monkeypatch.setattr(stop, "STREAMS", ())
        stop.remember_terminal()


def test_under_nohup_a_hang_up_does_not_stop_but_lets_go_of_the_terminal(monkeypatch):
    installed = {}
    muted = []
    monkeypatch.setattr(stop.signal, "getsignal", lambda signum: signal.SIG_IGN)
    monkeypatch.setattr(stop.signal, "signal", lambda signum, handler: installed.setdefault(signum, handler))
    monkeypatch.setattr(stop, "mute_lost_terminal", lambda: muted.append(True) or True)
    stop.STOP.reset()
    try:
        stop.install_signal_handlers()
        assert installed[signal.SIGINT] is stop._on_signal and installed[signal.SIGTERM] is stop._on_signal
        assert not stop.hangup_stops()
        installed[signal.SIGHUP](signal.SIGHUP, None)  # the terminal goes away: no stop, no exception
        assert muted == [True] and not stop.STOP.requested
    finally:
        stop._hangup_stops[0] = True
