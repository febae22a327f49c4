"""The per-step guard: decide whether an optimizer step can be trusted.

A step is refused when its loss is NaN/Inf or above a limit, or when the
gradient norm is not finite. Refused steps are never applied: one NaN update
poisons every weight it touches, and Adam's moments carry it on for good.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmprune.engine.core.events import GuardAlert

ON_NAN_CHOICES = ("stop", "skip", "rollback")

# What the field does when a pruned model diverges, most effective first.
FIELD_GUIDE = (
    "lower the learning rate (e.g. --lr 5e-6)",
    "clip gradients harder (e.g. --max-grad-norm 0.5)",
    "train on shorter windows (e.g. --seq-len 128)",
    "avoid fp16: use bf16 on GPU or fp32 on CPU (--dtype auto)",
    "if it still diverges, re-prune with a lower ratio and check it with llmprune doctor",
)


@dataclass(frozen=True)
class StepVerdict:
    ok: bool
    kind: str = ""
    value: float = 0.0
    message: str = ""


def check_step(
    loss: float, grad_norm: float, loss_limit: float, collapse_loss: float | None = None, teacher_finite: bool = True
) -> StepVerdict:
    """Judge one optimizer step from its (process-averaged) loss and global gradient norm.

    A gradient of exactly zero is a collapse too, whether or not the model
    ever beat chance (a random model that collapses never arms `collapse_loss`).

    `collapse_loss` (set once the model has shown it predicts better than chance):
    a loss back at chance level means the weights were destroyed, even though
    it is finite and small (a too-high LR drives a real model to uniform output,
    loss = ln(vocab), with zero gradients, not to NaN).

    `teacher_finite` (distillation): False when the teacher's logits held a NaN/Inf;
    the loss is then NaN too, but the alert should name the teacher, not the student.
    """
    if not teacher_finite:
        return StepVerdict(False, "teacher_logits", loss, "the teacher's logits hold NaN/Inf values")
    if math.isnan(loss):
        return StepVerdict(False, "nan_loss", loss, "loss is NaN")
    if math.isinf(loss):
        return StepVerdict(False, "inf_loss", loss, "loss is infinite")
    if loss > loss_limit:
        return StepVerdict(False, "loss_limit", loss, f"loss {loss:.4g} is above the limit {loss_limit:.4g}")
    if collapse_loss is not None and loss >= collapse_loss:
        return StepVerdict(
            False, "collapsed", loss, f"loss {loss:.4g} is back at chance level: the model has collapsed"
        )
    if not math.isfinite(grad_norm):
        return StepVerdict(False, "grad_norm", grad_norm, f"gradient norm is {grad_norm}")
    if grad_norm == 0.0 and loss > 0.0:
        # a live model always has some gradient; exactly zero on a non-zero loss means
        # saturated activations (uniform output after a huge update): nothing can learn any more
        return StepVerdict(False, "dead_gradient", grad_norm, "gradient is exactly zero: the model has collapsed")
    return StepVerdict(True)


def likely_causes(kind: str, lr: float, fp16: bool) -> str:
    if kind == "teacher_logits":
        return (
            "likely causes: a broken teacher model (check it with llmprune doctor) "
            "or overflow in its low-precision forward pass"
        )
    causes = []
    if kind in ("loss_limit", "grad_norm", "collapsed", "dead_gradient") or lr > 1e-4:
        causes.append(f"a learning rate too high for this model (lr {lr:.3g})")
    if fp16:
        causes.append("fp16 overflow")
    causes.append("activations that lost their counterweights in pruning (exploding outliers)")
    return "likely causes: " + "; ".join(causes)


def make_alert(step: int, verdict: StepVerdict, action: str, lr: float, fp16: bool = False) -> GuardAlert:
    what = {"skip": "update skipped", "rollback": "update skipped, rolling back", "stop": "update skipped, stopping"}[
        action
    ]
    return GuardAlert(
        step=step,
        kind=verdict.kind,
        value=verdict.value,
        action=action,
        message=f"step {step}: {verdict.message} — {what}; {likely_causes(verdict.kind, lr, fp16)}",
        advice=FIELD_GUIDE,
    )
