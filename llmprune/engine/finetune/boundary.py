"""What the processes of a run decide together at a step boundary: save now, stop now.

A stop or a save can be asked of one process only (the dashboard and its keys live in the first
one; a signal may reach one rank; the clock of a save by time differs a little per process), but
saving a checkpoint is a collective (`accelerate.save_state` waits for every process), and a
process that stops while the others go on leaves them waiting in the next all-reduce. So each
such decision is one all-reduce: if any process wants it, all do it, at the same step.
"""

from __future__ import annotations

from typing import Any


def any_process(wanted: bool, accelerator: Any) -> bool:
    """True on every process if `wanted` is true on at least one (a no-op with one process)."""
    if accelerator.num_processes == 1:
        return wanted
    import torch

    flag = torch.tensor([1.0 if wanted else 0.0], device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="sum")) > 0
