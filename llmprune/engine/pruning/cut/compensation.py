"""Compensation steps: what the pruning pass does to a projection right after its input units were cut.

`layer_pass.prune_layers` calls one step for o_proj (after KV groups or query
heads went) and one for down_proj (after MLP channels went), with the dense
weights and the statistics of the dense layer's inputs on calibration text
(`CompensationContext`). A step returns the name of what it really did, which
the report records layer by layer: with few calibration tokens per kept input
the least-squares refit says how much more it leaned on the original weights.

Built in (`compensation_step(kind)`): `bias` (the removed units' mean output,
folded into the bias) and `lstsq` (refit the kept columns and the bias), both
from `refit`. A Python callable with the same signature plugs in
instead (`PruneConfig.compensation`); `needs_gram = True` on it asks for XᵀX.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.engine.pruning.cut import refit
from llmprune.engine.pruning.scores import statistics

__all__ = ["CompensationContext", "Compensation", "compensation_step", "set_linear", "ensure_bias"]


@dataclass
class CompensationContext:
    """One projection of one layer, right after surgery removed some of its input columns."""

    index: int  # the layer's index in the pass
    layer: nn.Module  # the decoder layer, already pruned
    projection: str  # "o_proj" | "down_proj"
    linear: nn.Linear  # that projection, already sliced to the kept columns
    dense_weight: torch.Tensor  # its weight before the cut (out × in)
    dense_bias: torch.Tensor | None
    stats: statistics.InputStatistics  # its inputs in the dense layer, on the calibration text
    keep_columns: list[int]  # the input columns kept (original indices, ascending)
    damping: float = 1e-3  # ridge of the least-squares refit, relative to the mean diagonal


Compensation = Callable[[CompensationContext], str]


def set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=linear.weight.requires_grad)
    linear.in_features = weight.shape[1]
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad=False)


def ensure_bias(linear: nn.Linear) -> None:
    """A zero output bias where there is none: every layer gets one, pruned or not, so shapes stay uniform."""
    if linear.bias is None:
        linear.bias = nn.Parameter(
            torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device),
            requires_grad=False,
        )


def _bias(context: CompensationContext) -> str:
    bias = refit.compensate_bias(context.dense_weight, context.dense_bias, context.stats, context.keep_columns)
    set_linear(context.linear, context.linear.weight.data, bias)
    return "bias"


def _lstsq(context: CompensationContext) -> str:
    fitted = refit.refit_least_squares(
        context.dense_weight, context.dense_bias, context.stats, context.keep_columns, damping=context.damping
    )
    set_linear(context.linear, fitted.weight, fitted.bias)
    if not fitted.chosen:
        return "lstsq"
    # few calibration tokens per kept input: say which ridge cross-validation chose
    per_input = f"{context.stats.count / max(len(context.keep_columns), 1):.2f} calibration tokens per kept input"
    if math.isinf(fitted.ridge):
        return f"lstsq (bias only, chosen by cross-validation: {per_input})"
    return f"lstsq (ridge {fitted.ridge:.3g}, chosen by cross-validation: {per_input})"


_bias.needs_gram = False  # type: ignore[attr-defined]
_lstsq.needs_gram = True  # type: ignore[attr-defined]
_STEPS: dict[str, Compensation] = {"bias": _bias, "lstsq": _lstsq}


def compensation_step(kind: str | Compensation | None) -> Compensation | None:
    """The step for a name (none | bias | lstsq), or a callable as it is."""
    if kind is None or callable(kind):
        return kind
    if kind == "none":
        return None
    if kind not in _STEPS:
        raise ValueError(f"unknown compensation {kind!r}; known: none, {', '.join(_STEPS)}")
    return _STEPS[kind]


def step_name(step: Compensation | None) -> str:
    """How a step is recorded in the run's options."""
    if step is None:
        return "none"
    return next(
        (name for name, known in _STEPS.items() if known is step), getattr(step, "__name__", type(step).__name__)
    )
