"""Cache locations and atomic file writes shared by the engine."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def cache_dir(*parts: str) -> Path:
    """llmprune's cache folder ($LLMPRUNE_CACHE, else $XDG_CACHE_HOME/llmprune, else ~/.cache/llmprune)."""
    root = os.environ.get("LLMPRUNE_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "llmprune")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file so that readers see the old or the new content, never half of it."""
    with atomic_file(path) as staging, open(staging, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


@contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling file (`.<name>.<pid>-<random>.partial`, which `remove_stale_staging`
    recognises); on success it replaces `final` in one rename, on failure it is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    descriptor, staging = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.{os.getpid()}-", suffix=".partial")
    os.close(descriptor)
    try:
        os.chmod(staging, 0o666 & ~_umask())  # mkstemp makes it private; the file is an ordinary output
        yield Path(staging)
        os.replace(staging, final)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically (see atomic_write_bytes)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_staging(final: str | os.PathLike) -> list[Path]:
    """Remove the staging folders of earlier writes of `final` whose process is gone (killed mid-save).

    Staging folders are named `.<name>.<pid>-<random>.partial`; one of a live process (a
    concurrent writer) is left alone, one without a pid (an older llmprune) is stale.
    """
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for candidate in final.parent.glob(f".{glob.escape(final.name)}.*.partial"):
        middle = candidate.name[len(final.name) + 2 : -len(".partial")]
        pid = middle.split("-", 1)[0]
        if pid.isdigit() and "-" in middle and _process_alive(int(pid)):
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:  # a single-file output's staging (export's .gguf)
            candidate.unlink(missing_ok=True)
        removed.append(candidate)
    retired = final.with_name(f".{final.name}.old")
    if retired.is_dir() and not final.exists():  # killed between the two renames: the old version is the only one
        os.replace(retired, final)
    elif retired.is_dir():
        shutil.rmtree(retired, ignore_errors=True)
    return removed


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `final` in one rename.

    An interrupted write leaves `final` as it was (absent or the previous version).
    """
    final = Path(os.path.abspath(Path(final).expanduser()))
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{os.getpid()}-", suffix=".partial"))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the folder is an ordinary output
        yield staging
        if final.exists():
            retired = final.with_name(f".{final.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(final, retired)
            os.replace(staging, final)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
