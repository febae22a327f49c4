"""One writer per run folder: `run.lock` names the process (pid, host) that trains into it.

Two trainers in one folder interleave their logs, trim each other's metrics and delete each
other's checkpoints. So a run folder is locked while a process writes it; a second
`finetune --resume` (or a rerun of a recipe) is refused with one line naming the live owner.
The exclusion itself is an `flock` on the file, which the kernel drops when the process ends
however it ends (killed, crashed), so a lock left by a dead process is simply taken over; the
file's content (pid, host, start) is only there to name the owner in the refusal.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmprune.engine.core.errors import UserInputError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are then not locked
    fcntl = None

LOCK_FILE = "run.lock"
_held: dict[Path, int] = {}  # lock file -> the open descriptor holding its flock, in this process


@dataclass(frozen=True)
class LockOwner:
    """Who holds a run folder."""

    pid: int
    host: str
    since: str = ""
    command: str = ""

    def describe(self) -> str:
        since = f" since {self.since}" if self.since else ""
        return f"process {self.pid} on {self.host}{since}"


def read_owner(run_dir: str | Path) -> LockOwner | None:
    """The owner the lock file names (live or not), or None if there is no readable lock file."""
    try:
        record = json.loads((Path(run_dir) / LOCK_FILE).read_text(encoding="utf-8"))
        return LockOwner(
            int(record["pid"]), str(record["host"]), str(record.get("since", "")), record.get("command", "")
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def live_owner(run_dir: str | Path) -> LockOwner | None:
    """The other process that writes `run_dir` now, or None if nobody does (no lock, or its process is gone)."""
    path = _lock_path(run_dir)
    if fcntl is None or path in _held or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_owner(run_dir) or LockOwner(0, "an unknown host")
    finally:
        os.close(fd)  # closing drops the probe's shared lock
    return None


def check_unlocked(run_dir: str | Path) -> None:
    """Refuse, with one line naming the owner, if another live process writes `run_dir`; writes nothing."""
    owner = live_owner(run_dir)
    if owner is not None:
        raise UserInputError(
            f"{run_dir} is being written by {owner.describe()}",
            f"wait for it to finish, or stop it (kill -TERM {owner.pid}) and then --resume; to follow it:"
            f" llmprune finetune --watch {run_dir}",
        )


def acquire(run_dir: str | Path) -> None:
    """Take the lock of `run_dir` (an existing folder) for this process; refuse if a live process holds it."""
    path = _lock_path(run_dir)
    if fcntl is None or path in _held:
        return
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            check_unlocked(run_dir)
            continue  # released in between: try again
        # the file may have been unlinked by its last owner between our open and our flock: lock the one in place
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        owner = LockOwner(
            os.getpid(), socket.gethostname(), time.strftime("%Y-%m-%d %H:%M:%S"), " ".join(sys.argv)[:300]
        )
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(asdict(owner)).encode())
        _held[path] = fd
        return
    raise UserInputError(f"could not take the lock {path}", "run the command again")


def release(run_dir: str | Path) -> None:
    """Give the lock back (only one this process holds)."""
    path = _lock_path(run_dir)
    fd = _held.pop(path, None)
    if fd is None:
        return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # before the flock goes, so that nobody takes a lock on a file about to vanish
    os.close(fd)


@contextlib.contextmanager
def holding(run_dir: str | Path):
    """The lock of `run_dir` for the duration of the block."""
    acquire(run_dir)
    try:
        yield
    finally:
        release(run_dir)


def _lock_path(run_dir: str | Path) -> Path:
    return (Path(run_dir) / LOCK_FILE).absolute()
