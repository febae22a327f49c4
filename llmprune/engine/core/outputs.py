"""Where a command may write, decided before any work is done.

Every command that writes asks the same four questions about its output
location, in this order, and stops with one line when an answer is no:

1. does it exist, and as what (a folder where a file is expected, or the reverse)?
2. if it is a folder with something in it: is it a previous llmprune output
   (it carries a marker file)? Only then may it be replaced, and only with
   --overwrite; anything else the user keeps, always;
3. can this process create files there (the nearest existing folder is probed
   by creating and removing an empty folder: permission bits lie on /sys, /proc
   and read-only mounts)?
4. is there room for what will be written (when the size is known)?

Disk-full and file-too-large errors that still happen while writing are turned
into one line by `describe_write_error`.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.paths import remove_stale_staging

# files that mark a folder as something llmprune wrote (a saved model, a fine-tuning run, a recipe run, a sweep)
OUTPUT_MARKERS = (
    "llmprune.json",
    "run.json",
    "state.json",
    "sweep.json",
    "layer_importance_config.json",
    "adapter_config.json",
)
# a little room for the config, the tokenizer and the provenance next to the weights
_SPACE_MARGIN = 1.05
_SPACE_SLACK = 64 * 2**20


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"  # pragma: no cover


# what each kind of output carries: a command replaces or continues only its own kind
MODEL_MARKER, RUN_MARKER, RECIPE_MARKER, SWEEP_MARKER = "llmprune.json", "run.json", "state.json", "sweep.json"


def is_llmprune_output(folder: Path, markers: tuple[str, ...] = OUTPUT_MARKERS) -> bool:
    return any((folder / marker).is_file() for marker in markers)


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    return probe


def _check_name(path: Path, option: str) -> Path:
    """The absolute location; refuses the current folder (or one above it) and names that cannot be a folder."""
    if not str(path).strip():
        raise UserInputError(f"{option} is empty", f"name a new folder, e.g. {option} ./pruned")
    resolved = Path(os.path.abspath(path.expanduser()))
    cwd = Path.cwd().resolve()
    try:
        real = resolved.resolve()
    except OSError:
        real = resolved
    if real == cwd or real in cwd.parents:
        raise UserInputError(
            f"{option} {path} is the current folder (or one above it), which would be replaced",
            f"name a new folder inside it, e.g. {option} ./pruned",
        )
    return resolved


def _check_writable(path: Path, option: str) -> Path:
    """The nearest existing folder must accept a new entry (probed for real); returns that folder."""
    anchor = _nearest_existing(path)
    if anchor == path and anchor.is_file():  # a file to be replaced: its folder receives the new one
        anchor = anchor.parent
    if not anchor.is_dir():
        raise UserInputError(
            f"{option} {path} cannot be created: {anchor} is a file, not a folder", f"choose another {option}"
        )
    try:
        Path(tempfile.mkdtemp(dir=anchor, prefix=".llmprune-probe-")).rmdir()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UserInputError(
            f"{option} {path} is not writable ({reason} in {anchor})", f"choose a folder you can write to for {option}"
        ) from None
    return anchor


def _check_space(anchor: Path, path: Path, needed_bytes: int | None, option: str) -> None:
    if not needed_bytes:
        return
    needed = int(needed_bytes * _SPACE_MARGIN) + _SPACE_SLACK
    free = shutil.disk_usage(anchor).free
    if free < needed:
        raise UserInputError(
            f"not enough free space for {option} {path}: about {human_bytes(needed)} needed, {human_bytes(free)} free",
            f"free some space or choose another {option} on a larger disk",
        )


def check_output_folder(
    path: str | os.PathLike,
    *,
    option: str,
    overwrite: bool = False,
    needed_bytes: int | None = None,
    resumable: bool = False,
    kind: str | tuple[str, ...] | None = None,
) -> Path:
    """Decide whether a folder output may be written at `path`; returns its absolute path.

    `resumable`: the caller continues what is in the folder (a recipe rerun, finetune --resume),
    so an existing llmprune output is accepted without --overwrite.
    `kind`: the marker file of the output this command writes (e.g. RUN_MARKER): another kind of
    llmprune output (a fine-tuning run where a pruned model goes) is refused like a foreign folder.
    """
    path = Path(path)
    resolved = _check_name(path, option)
    if resolved.is_file() or (resolved.exists() and not resolved.is_dir()):
        raise UserInputError(f"{option} {path} is a file, not a folder", f"name a folder for {option}")
    if resolved.is_dir() and any(resolved.iterdir()):
        if not is_llmprune_output(resolved):
            raise UserInputError(
                f"{option} {path} already exists and holds files that llmprune did not write",
                f"name a new or empty folder for {option} (nothing in {path} was touched)",
            )
        kinds = (kind,) if isinstance(kind, str) else kind
        if kinds and not is_llmprune_output(resolved, kinds):
            found = next(marker for marker in OUTPUT_MARKERS if (resolved / marker).is_file())
            raise UserInputError(
                f"{option} {path} holds another kind of llmprune output (it has {found}, not {kinds[0]})",
                f"name a new or empty folder for {option}",
            )
        if not (overwrite or resumable):
            raise UserInputError(
                f"{option} {path} already holds an llmprune output",
                f"pass --overwrite to replace it, or name another {option}",
            )
    anchor = _check_writable(resolved, option)
    _check_space(anchor, resolved, needed_bytes, option)
    remove_stale_staging(resolved)
    return resolved


def check_writable_location(path: str | os.PathLike, *, option: str, needed_bytes: int | None = None) -> Path:
    """A folder that only receives new entries (a log root, a runs root): not a file, writable, with room."""
    path = Path(path)
    if not str(path).strip():
        raise UserInputError(f"{option} is empty", f"name a folder for {option}")
    resolved = Path(os.path.abspath(path.expanduser()))
    if resolved.exists() and not resolved.is_dir():
        raise UserInputError(f"{option} {path} is a file, not a folder", f"name a folder for {option}")
    anchor = _check_writable(resolved, option)
    _check_space(anchor, resolved, needed_bytes, option)
    return resolved


def check_output_file(path: str | os.PathLike, *, option: str, ours: bool = False, overwrite: bool = False) -> Path:
    """Decide whether a single file may be written at `path` (a JSON report, a chart); returns its absolute path.

    `ours`: the file that is there is a previous llmprune output of the same kind (the caller read it),
    which --overwrite replaces; any other existing file is never replaced.
    """
    path = Path(path)
    if not str(path).strip() or path.name in ("", ".", ".."):
        raise UserInputError(f"{option} '{path}' is not a file name", f"name a file, e.g. {option} plan.json")
    resolved = Path(os.path.abspath(path.expanduser()))
    if resolved.is_dir():
        raise UserInputError(
            f"{option} {path} is a folder", f"name a file inside it, e.g. {option} {path / 'plan.json'}"
        )
    if resolved.exists() and not ours:
        raise UserInputError(
            f"{option} {path} already exists and is not an llmprune output", f"name a new file for {option}"
        )
    if resolved.exists() and not overwrite:
        raise UserInputError(
            f"{option} {path} already holds an llmprune output",
            f"pass --overwrite to replace it, or name another {option}",
        )
    _check_writable(resolved, option)
    return resolved


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC / EFBIG / EDQUOT, also when a library wrapped them in its own error (safetensors, torch)."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return True
        text = str(error).lower()
        if any(marker in text for marker in ("no space left", "file too large", "disk quota", "unexpected pos")):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False
