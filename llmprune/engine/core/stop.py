"""How a stop reaches the work, whatever thread it runs in: SIGINT, SIGTERM, SIGHUP, a lost terminal.

Python delivers a signal only to the main thread, and under the fine-tuning dashboard the
main thread runs the UI while training runs in another. So a signal never acts by itself
here: it is recorded in the one process-wide `STOP`, which tells whoever subscribed (the
training loop's control object, the dashboard). What happens next depends on who is working:

- no cooperative work is going on (prune, eval, analyze, export, a recipe's other steps, all in
  the main thread): the first signal raises KeyboardInterrupt there, as Ctrl-C does, and the
  command removes what it half-wrote and exits 130;
- a training loop is running (`cooperating`): the signal only asks; the loop stops at the next
  step boundary, saves a confirmed checkpoint and returns.

In both cases a second signal changes nothing (the clean-up or the save is under way), and a
third one quits at once with exit 130: atomic writes leave the last complete output (the last
confirmed checkpoint) in place.

A terminal that went away (SIGHUP, or a tty that now answers EIO) is a stop too, and the
standard streams that pointed at it are pointed at /dev/null first, so that no later print can
fail and replace the outcome: the result is in run.json and the log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

FORCE_AFTER = 3  # the signal that quits at once, without waiting for the save
STREAMS = (0, 1, 2)


class StopRequests:
    """The process-wide record of stop requests (thread-safe; also called from signal handlers)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._subscribers: list[Callable[[str], None]] = []
        self._cooperating = 0
        self.count = 0
        self.reason: str | None = None

    @property
    def requested(self) -> bool:
        return self.count > 0

    @property
    def cooperating(self) -> bool:
        """Whether some work stops by itself at a safe point (so a signal must not raise in the main thread)."""
        return self._cooperating > 0

    def request(self, reason: str) -> None:
        """Record a stop and tell every subscriber; a subscriber's failure never hides the stop from the others."""
        with self._lock:
            self.count += 1
            self.reason = self.reason or reason
            subscribers = list(self._subscribers)
        for subscriber in subscribers:
            with contextlib.suppress(Exception):
                subscriber(reason)

    def subscribe(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call `callback(reason)` on each stop (at once if one was already asked); returns the unsubscribe."""
        with self._lock:
            self._subscribers.append(callback)
            already = self.reason if self.requested else None
        if already is not None:
            with contextlib.suppress(Exception):
                callback(already)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    @contextlib.contextmanager
    def cooperating_with(self, on_stop: Callable[[str], None] | None = None) -> Iterator[None]:
        """While inside, a signal only asks (`on_stop` is told) instead of raising KeyboardInterrupt."""
        unsubscribe = self.subscribe(on_stop) if on_stop is not None else (lambda: None)
        with self._lock:
            self._cooperating += 1
        try:
            yield
        finally:
            with self._lock:
                self._cooperating -= 1
            unsubscribe()

    def reset(self) -> None:
        """Forget earlier requests (a new command in the same process, tests)."""
        with self._lock:
            self.count, self.reason = 0, None


STOP = StopRequests()

# ---------------------------------------------------------------- the terminal

_terminal_fds: set[int] = set()  # the standard streams that were a terminal when the command started
_muted: list[bool] = [False]  # set once they were pointed at /dev/null: the terminal is gone for good


def remember_terminal() -> None:
    """Note which standard streams are a terminal now, so that losing it can be told from a pipe."""
    _terminal_fds.clear()
    _muted[0] = False
    _terminal_fds.update(fd for fd in STREAMS if _isatty(fd))


def terminal_lost() -> bool:
    """A stream that was a terminal is one no more: the terminal hung up (its tty answers EIO)."""
    return _muted[0] or any(not _isatty(fd) for fd in _terminal_fds)


def mute_lost_terminal() -> bool:
    """Point the standard streams that were the (now lost) terminal at /dev/null; True if any was."""
    lost = [fd for fd in _terminal_fds if not _isatty(fd)]
    if not lost:
        return False
    null = os.open(os.devnull, os.O_RDWR)
    try:
        for fd in lost:
            os.dup2(null, fd)
            _terminal_fds.discard(fd)
    finally:
        os.close(null)
    _muted[0] = True
    return True


def is_terminal_error(error: BaseException) -> bool:
    """An error from writing to a terminal that has gone away (EIO) or a reader that has (EPIPE)."""
    import errno

    return isinstance(error, OSError) and error.errno in (errno.EIO, errno.EPIPE)


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


# ---------------------------------------------------------------- the signals

SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


_hangup_stops = [True]  # False when started with SIGHUP ignored (nohup): the run outlives its terminal


def hangup_stops() -> bool:
    """Whether losing the terminal stops the work (it does, unless the command was started under nohup)."""
    return _hangup_stops[0]


def install_signal_handlers() -> None:
    """The command line's handlers: every stop signal goes through `STOP` (call from the main thread)."""
    remember_terminal()
    _hangup_stops[0] = True
    for name in SIGNALS:
        if not hasattr(signal, name):
            continue
        if name == "SIGHUP" and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
            # started under nohup: the user asked to keep going without the terminal. The work goes on, but
            # the streams that were the terminal are pointed at /dev/null at once: a write to a hung-up tty
            # fails (EIO), and a dashboard's writer thread that dies of it would block the whole process
            _hangup_stops[0] = False
            signal.signal(signal.SIGHUP, lambda signum, frame: mute_lost_terminal())
            continue
        signal.signal(getattr(signal, name), _on_signal)


def _on_signal(signum: int, frame: object) -> None:
    name = signal.Signals(signum).name
    if signum == getattr(signal, "SIGHUP", None) or terminal_lost():
        mute_lost_terminal()
        reason = "the terminal went away" if name == "SIGHUP" else name
    else:
        reason = name
    STOP.request(reason)
    if STOP.count >= FORCE_AFTER:
        _say(f"\n{name} again: quitting now; the last confirmed checkpoint is kept\n")
        os._exit(130)
    if STOP.count > 1:  # the first one is being acted on (a checkpoint or a clean-up may be under way)
        _say(f"\n{name}: already stopping (a third signal quits at once)\n")
        return
    if STOP.cooperating:
        _say(f"\n{name}: stopping after this step and saving\n")
        return
    raise KeyboardInterrupt


def _say(text: str) -> None:
    """One line on stderr, if it is still there: a print must never fail inside a signal handler."""
    with contextlib.suppress(OSError, ValueError, RuntimeError):  # RuntimeError: a reentrant write
        sys.stderr.write(text)
        sys.stderr.flush()
