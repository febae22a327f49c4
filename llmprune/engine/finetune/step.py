"""One optimizer step's gradients: micro-batches, accumulation, and the loss parts averaged over processes."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from llmprune.engine.data import TokenWindows
from llmprune.engine.finetune.config import FinetuneConfig
from llmprune.engine.finetune.distill import LossParts


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
