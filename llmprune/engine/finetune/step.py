"""One optimizer step's gradients: micro-batches, accumulation, and the loss parts averaged over processes."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from llmprune.engine.data import TokenWindows
from llmprune.engine.finetune.config import FinetuneConfig
from llmprune.engine.finetune.distill import LossParts
from llmprune.engine.finetune.guards import StepVerdict


@dataclass
class StepLoss:
    """One optimizer step's loss and its parts, averaged over micro-batches and processes."""

    loss: float
    lm: float
    kd: float | None = None
    teacher_finite: bool = True


def forward_backward(
    model, loss_fn, windows: TokenWindows, order: torch.Tensor, first: int, config: FinetuneConfig, accelerator
) -> StepLoss:
    """Accumulate the gradients of one optimizer step; `first` is the step's first window in `order`."""
    parts: list[LossParts] = []
    for micro in range(config.grad_accum):
        # each process reads its own slice of the global batch
        start = first + (micro * accelerator.num_processes + accelerator.process_index) * config.batch_size
        ids = windows.ids[order[start : start + config.batch_size]].to(accelerator.device)
        last_micro = micro == config.grad_accum - 1
        # gradients are synchronised across processes once, on the last micro-batch
        with nullcontext() if last_micro else accelerator.no_sync(model):
            loss = loss_fn(model, ids)
            accelerator.backward(loss.total / config.grad_accum)
        parts.append(loss)

    def mean(values: list[torch.Tensor]) -> float:
        return float(accelerator.reduce(torch.stack([v.detach().float() for v in values]).mean(), reduction="mean"))

    distilled = parts[0].kd is not None
    teacher_finite = True
    if distilled:
        flags = torch.stack([p.teacher_finite for p in parts]).all().float()
        teacher_finite = bool(accelerator.reduce(flags, reduction="mean") == 1.0)  # every process's teacher was finite
    return StepLoss(
        loss=mean([p.total for p in parts]),
        lm=mean([p.lm for p in parts]),
        kd=mean([p.kd for p in parts]) if distilled else None,
        teacher_finite=teacher_finite,
    )


def all_processes_agree(verdict: StepVerdict, accelerator) -> StepVerdict:
    """The same verdict on every process: a step one process refuses is refused by all (skip or roll back together).

    The loss is already averaged over processes and the gradients all-reduced, so a NaN anywhere reaches every
    process's verdict; this all-reduce of the "refused" flag makes it so by construction (a threshold met on one
    process only, a guard with state that differs), and a process never waits in a collective the others skipped.
    """
    if accelerator.num_processes == 1:
        return verdict
    refused = torch.tensor([0.0 if verdict.ok else 1.0], device=accelerator.device)
    if float(accelerator.reduce(refused, reduction="sum")) == 0.0 or not verdict.ok:
        return verdict
    return StepVerdict(False, "other_process", float("nan"), "another process refused this step")
