"""Training checkpoints that are never half-written and never trusted too early.

A checkpoint is `accelerate`'s full training state (model, optimizer,
scheduler, RNG of every process, our `TrainingProgress`), so resuming works
the same under DDP/FSDP. It is written into a hidden `.step-N.partial` folder
and renamed into place only when complete; `latest.json` (written atomically)
names the last *good* one. A checkpoint taken after step k holds the weights
that update k produced, and nobody knows whether those weights are sane until
step k+1's forward pass: so it stays *pending* until the next step passes the
guard (`confirm`), and a failed step discards it. An interrupted save or a
Ctrl-C at any point leaves `latest.json` naming a complete, good checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.events import CheckpointSaved, Listener, RolledBack
from llmprune.engine.core.outputs import is_disk_full
from llmprune.engine.core.paths import atomic_write_json

LATEST_FILE = "latest.json"
log = logging.getLogger("llmprune.train")  # the training loop's logger: one log file for the whole run


@dataclass
class TrainingProgress:
    """Where the run stands; saved in every checkpoint (accelerate calls state_dict/load_state_dict)."""

    step: int = 0  # optimizer steps attempted (skipped ones included); the data position follows from it
    rollbacks: int = 0
    lr_scale: float = 1.0
    best_loss: float | None = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


class CheckpointStore:
    """The checkpoints folder of one run: atomic saves, pending/confirmed, pruning of old ones."""

    def __init__(self, root: str | Path, accelerator: Any, keep: int = 2):
        self.root = Path(root)
        self.accelerator = accelerator
        self.keep = max(1, keep)
        self.pending: Path | None = None
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ reading

    def latest(self) -> Path | None:
        """The last confirmed good checkpoint, or None."""
        return latest_checkpoint(self.root)

    # ------------------------------------------------------------ writing

    def save(self, step: int) -> Path:
        """Write the full training state for `step`; it becomes the latest good one only on `confirm()`."""
        acc = self.accelerator
        final = self.root / step_dir_name(step)
        staging = self.root / f".{final.name}.partial"
        if acc.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        acc.wait_for_everyone()
        # accelerate warns that it drops the tied lm_head copy from the safetensors file;
        # that is expected (load_state re-ties it) and would only scribble over the dashboard
        logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
        try:
            acc.save_state(str(staging))
            acc.wait_for_everyone()
            if acc.is_main_process:
                # the latest good one may be this very folder (a save requested twice at one step)
                if final.exists() and final != self.latest():
                    shutil.rmtree(final)
                if not final.exists():
                    os.replace(staging, final)
                else:
                    shutil.rmtree(staging)
        except BaseException as error:
            if acc.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(error, Exception) and is_disk_full(error):
                good = self.latest()
                intact = (
                    f"the checkpoint of step {checkpoint_step(good)} is intact ({good})"
                    if good
                    else "no earlier checkpoint exists"
                )
                raise UserInputError(
                    "no space left on the disk (or the file size limit was reached) while saving the checkpoint of"
                    f" step {step}; {intact}",
                    (
                        "free some space, then continue with --resume"
                        if good
                        else "free some space, then run the command again"
                    ),
                ) from None
            raise
        acc.wait_for_everyone()
        self.pending = final
        return final

    def confirm(self) -> Path | None:
        """The step after the pending checkpoint passed the guard: make it the latest good one."""
        if self.pending is None:
            return None
        confirmed, self.pending = self.pending, None
        if self.accelerator.is_main_process:
            step = int(confirmed.name.split("-")[1])
            atomic_write_json(self.root / LATEST_FILE, {"step": step, "path": confirmed.name})
            self._prune()
        return confirmed

    def discard_pending(self) -> None:
        """The step after the pending checkpoint failed: its weights produced a bad loss."""
        if self.pending is not None and self.accelerator.is_main_process and self.pending != self.latest():
            shutil.rmtree(self.pending, ignore_errors=True)
        self.pending = None

    def restore(self, path: Path) -> None:
        """Load model, optimizer, scheduler, RNG and progress from `path` on every process."""
        self.accelerator.load_state(str(path))

    def _prune(self) -> None:
        latest = self.latest()
        complete = sorted(p for p in self.root.glob("step-*") if p.is_dir())
        for old in complete[: -self.keep]:
            if old != latest:
                shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint `latest.json` names, if it is there."""
    root = Path(root)
    try:
        record = json.loads((root / LATEST_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    path = root / str(record.get("path", ""))
    return path if record.get("path") and path.is_dir() else None


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


# ---------------------------------------------------------------- coming back to a good state


def _restore_keeping_counters(store: CheckpointStore, good: Path, progress: TrainingProgress) -> int:
    """Weights, optimizer, schedule and LR scale as `good` holds them; the run's step, rollback and best-loss
    counters stay as they are (the data position moves on). Returns the step `good` was saved at."""
    counters = (progress.step, progress.rollbacks, progress.best_loss)
    store.restore(good)  # also reloads `progress` as it was then
    restored_step = progress.step
    progress.step, progress.rollbacks, progress.best_loss = counters
    return restored_step


def rollback_to_last_good(store: CheckpointStore, progress: TrainingProgress, scheduler: Any, emit: Listener) -> None:
    """Back to the last good weights/optimizer with half the LR; the data position moves on past the bad batch."""
    at_step = progress.step
    restored_step = _restore_keeping_counters(store, store.latest(), progress)
    progress.rollbacks += 1
    progress.lr_scale *= 0.5
    scheduler.base_lrs = [base * 0.5 for base in scheduler.base_lrs]
    # put the schedule at the current step with the new base LR
    scheduler.last_epoch = at_step - 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    event = RolledBack(
        at_step=at_step, restored_step=restored_step, lr_scale=progress.lr_scale, rollbacks=progress.rollbacks
    )
    log.warning("rolled back to step %d (LR x%.3g, rollback %d)", restored_step, progress.lr_scale, progress.rollbacks)
    emit(event)


@torch.no_grad()
def settle_final_state(model, windows, store, progress, status, accelerator, emit) -> Path | None:
    """Make the weights in memory trustworthy before they are saved, and return the last good checkpoint.

    After a guard stop the weights go back to the last good checkpoint. Otherwise the
    last update has not been judged yet: one forward pass does it, and the final
    state becomes a confirmed checkpoint (or, if that loss is bad, the last good one is restored).
    """
    if status != "stopped_by_guard":
        ids = windows.ids[:1].to(accelerator.device)
        model.eval()
        loss = float(
            accelerator.reduce(
                model(input_ids=ids, labels=ids, use_cache=False).loss.detach().float(), reduction="mean"
            )
        )
        model.train()
        if math.isfinite(loss):
            if store.pending is None or checkpoint_step(store.pending) != progress.step:
                store.save(progress.step)
                emit(CheckpointSaved(step=progress.step, path=str(store.pending), reason="final"))
            store.confirm()
            return store.latest()
        log.error("the final weights give a non-finite loss; restoring the last good checkpoint")
    store.discard_pending()
    good = store.latest()
    if good is not None:
        _restore_keeping_counters(store, good, progress)
    return good
