"""Stopping `llmprune finetune` the ways a real terminal does, with the dashboard on.

Each test runs the real command in a pseudo-terminal (python's `pty`), waits for a few
training steps, then hangs up the terminal, sends SIGTERM, or sends SIGINT twice. The run
must stop, save a confirmed checkpoint, say so in run.json and exit 130; `--resume` then
trains the rest, and the losses of the two parts are those of one uninterrupted run.
The timeouts are generous (a busy machine) and nothing asserts a duration.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from llmprune.engine.finetune import run_lock
from llmprune.engine.finetune.run_lock import LOCK_FILE

STEPS = 120  # long enough that a few steps in, the run is far from its end; short enough to resume in seconds
TIMEOUT = 240  # seconds for any one wait: generous on a loaded machine, never asserted as a duration
ALT_SCREEN = b"\x1b[?1049h"  # Textual switches to the alternate screen: the dashboard was on


def finetune_args(model_dir: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "finetune",
        str(model_dir),
        "--dataset",
        str(corpus),
        "--samples",
        str(STEPS),
        "--seq-len",
        "32",
        "--lr",
        "1e-4",
        "--out",
        str(out),
        *extra,
    ]


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", LLMPRUNE_DEBUG="0", TERM="xterm-256color")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH", "")])
    return env


class InTerminal:
    """`python -m llmprune ARGS` with a pseudo-terminal as its stdin, stdout, stderr and controlling terminal."""

    def __init__(self, args: list[str], sighup=signal.SIG_DFL):
        self.pid, self.master = pty.fork()
        if self.pid == 0:  # the child: a terminal of 40x120, then the command
            try:
                fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
                # a terminal's shell starts commands with the default SIGHUP, whatever ran these tests (nohup)
                signal.signal(signal.SIGHUP, sighup)
                os.execve(sys.executable, [sys.executable, "-m", "llmprune", *args], child_env())
            finally:
                os._exit(127)
        self.output = bytearray()
        self.status: int | None = None
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:  # the terminal's screen: read all of it, or the child blocks on a full buffer
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.output.extend(chunk)

    def running(self) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
        return self.status is None

    def wait_for_steps(self, metrics: Path, steps: int) -> None:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and self.running():
            if metrics.is_file() and metrics.read_text().count("\n") >= steps:
                return
            time.sleep(0.02)
        self.kill()
        pytest.fail(f"the run did not reach step {steps} (exit {self.exit_code()}): {self.screen()[-2000:]}")

    def hang_up(self) -> None:
        """What an SSH drop or a closed terminal window does: the terminal's master side goes away."""
        os.close(self.master)

    def wait(self, run: Path | None = None) -> int:
        deadline = time.monotonic() + TIMEOUT
        while self.running():
            if time.monotonic() > deadline:
                self.kill()
                # the screen stops where the terminal went away: what the run did after it is in its folder
                after = {name: _tail(run / name) for name in ("training.log", "run.json")} if run else {}
                pytest.fail(f"the run did not end after the stop: {self.screen()[-2000:]}\nthen: {after}")
            time.sleep(0.05)
        return self.exit_code()

    def exit_code(self) -> int | None:
        return None if self.status is None else os.waitstatus_to_exitcode(self.status)

    def kill(self) -> None:
        if self.running():
            os.kill(self.pid, signal.SIGKILL)
            _, self.status = os.waitpid(self.pid, 0)

    def screen(self) -> str:
        return bytes(self.output).decode("utf-8", errors="replace")


def _tail(path: Path, characters: int = 3000) -> str:
    return path.read_text(errors="replace")[-characters:] if path.is_file() else "(none)"


def losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record["loss"] for record in map(json.loads, lines)}


@pytest.fixture(scope="module")
def reference(tiny_model_dir, pydoc_text_file, tmp_path_factory) -> dict[int, float]:
    """The losses of the same run, never interrupted."""
    run = tmp_path_factory.mktemp("reference") / "run"
    done = subprocess.run(
        [sys.executable, "-m", "llmprune", *finetune_args(tiny_model_dir, pydoc_text_file, run, "--json")],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=TIMEOUT * 2,
    )
    assert done.returncode == 0, done.stderr
    return losses(run)


def stopped_then_resumed(tiny_model_dir, pydoc_text_file, run: Path, stop, *extra: str) -> dict:
    """Start the run in a terminal, `stop(terminal)` it after 3 steps; check the stop; resume; return run.json."""
    terminal = InTerminal(finetune_args(tiny_model_dir, pydoc_text_file, run, *extra))
    terminal.wait_for_steps(run / "metrics.jsonl", 3)
    stop(terminal)
    code = terminal.wait(run)
    assert code == 130, terminal.screen()[-3000:]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "stopped_by_user", record
    assert 3 <= record["steps"] < STEPS
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == record["steps"]  # the stop saved a confirmed checkpoint of the last step
    assert not (run / LOCK_FILE).exists()
    assert "Traceback" not in (run / "training.log").read_text()
    terminal.output_at_stop = terminal.screen()

    resumed = subprocess.run(
        [sys.executable, "-m", "llmprune", *finetune_args(tiny_model_dir, pydoc_text_file, run, "--resume", "--json")],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=TIMEOUT * 2,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "completed"
    return {"stopped_at": record["steps"], "terminal": terminal}


def test_a_hung_up_terminal_stops_saves_and_resumes(tiny_model_dir, pydoc_text_file, tmp_path, reference):
    run = tmp_path / "run"
    outcome = stopped_then_resumed(tiny_model_dir, pydoc_text_file, run, InTerminal.hang_up)
    assert ALT_SCREEN in outcome["terminal"].output
    assert losses(run) == pytest.approx(reference, rel=1e-6)


def test_sigterm_under_the_dashboard_stops_saves_and_resumes(tiny_model_dir, pydoc_text_file, tmp_path, reference):
    run = tmp_path / "run"
    outcome = stopped_then_resumed(
        tiny_model_dir, pydoc_text_file, run, lambda terminal: os.kill(terminal.pid, signal.SIGTERM)
    )
    terminal = outcome["terminal"]
    assert ALT_SCREEN in terminal.output
    # the terminal stayed: after the dashboard, the result table says how the run ended
    assert "stopped on request" in terminal.output_at_stop
    assert losses(run) == pytest.approx(reference, rel=1e-6)


def test_sigint_twice_under_the_dashboard_stops_saves_and_resumes(tiny_model_dir, pydoc_text_file, tmp_path, reference):
    def twice(terminal: InTerminal) -> None:
        os.kill(terminal.pid, signal.SIGINT)
        time.sleep(0.2)
        os.kill(terminal.pid, signal.SIGINT)

    run = tmp_path / "run"
    outcome = stopped_then_resumed(tiny_model_dir, pydoc_text_file, run, twice)
    screen = outcome["terminal"].output_at_stop
    assert ALT_SCREEN in outcome["terminal"].output
    assert "terminate called" not in screen and "Exception ignored" not in screen
    assert losses(run) == pytest.approx(reference, rel=1e-6)


def test_plain_lines_in_a_terminal_that_hangs_up_still_exit_130(tiny_model_dir, pydoc_text_file, tmp_path, reference):
    run = tmp_path / "run"
    outcome = stopped_then_resumed(tiny_model_dir, pydoc_text_file, run, InTerminal.hang_up, "--no-tui")
    assert ALT_SCREEN not in outcome["terminal"].output
    assert losses(run) == pytest.approx(reference, rel=1e-6)


def test_a_second_writer_is_refused_while_the_first_trains(tiny_model_dir, pydoc_text_file, tmp_path):
    run = tmp_path / "run"
    # every window of the small corpus, for many epochs: it must still be training when the second one starts, however
    # slowly that one starts on a busy machine (it is killed below); at the usual rate the tiny model overfits and its
    # guard stops it after some 700 steps, which a busy machine reaches first, so it learns (almost) nothing here
    long_run = finetune_args(
        tiny_model_dir, pydoc_text_file, run, "--no-tui", "--samples", "50000", "--epochs", "10000", "--lr", "1e-7"
    )
    first = InTerminal(long_run)
    try:
        first.wait_for_steps(run / "metrics.jsonl", 2)
        second = subprocess.run(
            [sys.executable, "-m", "llmprune", *long_run, "--resume"],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=TIMEOUT,
        )
        assert first.running(), (first.exit_code(), bytes(first.output).decode(errors="replace")[-3000:])
        assert second.returncode == 2, second.stderr
        assert f"is being written by process {first.pid} on " in second.stderr
        assert len(second.stderr.strip().splitlines()) <= 2 and "Traceback" not in second.stderr
    finally:
        first.kill()  # killed outright, the lock file stays behind: its process is gone, so the next writer takes over
    assert (run / LOCK_FILE).is_file() and run_lock.live_owner(run) is None
    with run_lock.holding(run):
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()


def wait_for_progress(terminal: InTerminal) -> None:
    """Until a Rich progress bar is on the screen: the command is in its long loop."""
    deadline = time.monotonic() + TIMEOUT
    while b"\xe2\x94\x81" not in terminal.output:  # ━, the bar
        if not terminal.running() or time.monotonic() > deadline:
            terminal.kill()
            pytest.fail(f"no progress bar (exit {terminal.exit_code()}): {terminal.screen()[-2000:]}")
        time.sleep(0.02)


def test_eval_in_a_terminal_that_hangs_up_exits_130(tiny_model_dir, pydoc_text_file):
    terminal = InTerminal(["eval", str(tiny_model_dir), "--dataset", str(pydoc_text_file), "--seq-len", "16"])
    wait_for_progress(terminal)
    terminal.hang_up()
    assert terminal.wait() == 130


def test_analyze_stopped_by_sigterm_exits_130_and_writes_nothing(tiny_model_dir, pydoc_text_file, tmp_path):
    out = tmp_path / "plans"
    out.mkdir()
    terminal = InTerminal(
        [
            "analyze",
            str(tiny_model_dir),
            "--dataset",
            str(pydoc_text_file),
            "--seq-len",
            "64",
            "--importance-samples",
            "3000",
            "-o",
            str(out / "plan.json"),
        ]
    )
    wait_for_progress(terminal)
    os.kill(terminal.pid, signal.SIGTERM)
    assert terminal.wait() == 130, terminal.screen()[-2000:]
    assert "interrupted" in terminal.screen() and "Traceback" not in terminal.screen()
    assert list(out.iterdir()) == []


def test_under_nohup_a_hung_up_terminal_neither_stops_the_run_nor_keeps_it_from_ending(
    tiny_model_dir, pydoc_text_file, tmp_path
):
    # SIGHUP ignored (nohup, `trap '' HUP`): the user asked the run to outlive its terminal; the dashboard
    # must let go of the terminal when it goes, and the run must finish and exit by itself
    run = tmp_path / "run"
    terminal = InTerminal(finetune_args(tiny_model_dir, pydoc_text_file, run), sighup=signal.SIG_IGN)
    terminal.wait_for_steps(run / "metrics.jsonl", 3)
    terminal.hang_up()
    assert terminal.wait(run) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed" and record["steps"] == STEPS
