"""llmprune's compensation and fluctuation score, plugged into `pruning.prune_model`'s seams.

`pruning.prune_model` (the layer-importance plan path of `llmprune prune`)
scores units with a criterion from `importance.UNIT_IMPORTANCE` and calls a
`Compensation` after each layer's surgery. This module registers the
`fluctuation` criterion there and builds that compensation step from
`llmprune.engine.pruning.compensation`: `compensation_step("bias" | "lstsq")`.
"""

from __future__ import annotations

import torch
from torch import nn

from llmprune.engine.pruning import compensation as comp
from llmprune.engine.pruning.importance import LayerActivations, register_unit_importance
from llmprune.engine.pruning.prune_model import Compensation, LayerPruneContext
from llmprune.engine.pruning.surgery import attention_counts

__all__ = ["FluctuationImportance", "compensation_step", "statistics_from"]


def statistics_from(count: int, total: torch.Tensor, squares: torch.Tensor, gram: torch.Tensor | None) -> comp.InputStatistics:
    """InputStatistics from the sums `importance.collect_activations` gathered."""
    stats = comp.InputStatistics(total.numel(), total.device, gram=False)
    stats.count = count
    stats.total = total.to(torch.float64)
    stats.squares = squares.to(torch.float64)
    stats.gram = gram.to(torch.float64) if gram is not None else None
    return stats


def _o_stats(acts: LayerActivations) -> comp.InputStatistics:
    return statistics_from(acts.tokens, acts.o_proj_sum, acts.o_proj_sq, acts.o_proj_gram)


def _down_stats(acts: LayerActivations) -> comp.InputStatistics:
    return statistics_from(acts.tokens, acts.down_proj_sum, acts.down_proj_sq, acts.down_proj_gram)


class FluctuationImportance:
    """Variance of the unit's contribution to the layer output on calibration text (FLAP): Var(x_j)·‖W[:, j]‖².

    Units whose output hardly varies are cheap to remove once their mean is
    folded into the bias (`--compensation bias|lstsq`).
    """

    name = "fluctuation"
    needs_activations = True

    def query_head_scores(self, layer: nn.Module, acts: LayerActivations | None) -> torch.Tensor:
        _, kv_heads, head_dim = attention_counts(layer)
        columns = comp.fluctuation(layer.self_attn.o_proj.weight, _o_stats(acts)).float()
        return columns.view(-1, head_dim).sum(1).view(kv_heads, -1)

    def kv_group_scores(self, layer: nn.Module, acts: LayerActivations | None) -> torch.Tensor:
        return self.query_head_scores(layer, acts).sum(1)

    def mlp_channel_scores(self, layer: nn.Module, acts: LayerActivations | None) -> torch.Tensor:
        return comp.fluctuation(layer.mlp.down_proj.weight, _down_stats(acts)).float()


register_unit_importance(FluctuationImportance())


def _dense_weight(pruned: torch.Tensor, kept: torch.Tensor, removed: torch.Tensor, size: int) -> torch.Tensor:
    """The unpruned weight, put back together from the kept columns and the removed ones."""
    dense = torch.empty(pruned.shape[0], size, dtype=pruned.dtype, device=pruned.device)
    mask = torch.zeros(size, dtype=torch.bool, device=pruned.device)
    mask[kept.to(pruned.device)] = True
    dense[:, mask] = pruned
    dense[:, ~mask] = removed.to(pruned.device)
    return dense


def _fix(linear: nn.Linear, kept_columns: torch.Tensor, removed: torch.Tensor, stats: comp.InputStatistics, kind: str, damping: float) -> None:
    if removed.shape[1] == 0:
        return
    size = kept_columns.numel() + removed.shape[1]
    dense = _dense_weight(linear.weight.data, kept_columns, removed, size)
    keep = kept_columns.tolist()
    if kind == "lstsq":
        weight, bias = comp.refit_least_squares(dense, linear.bias, stats, keep, damping)
        linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    else:
        bias = comp.compensate_bias(dense, linear.bias, stats, keep)
    linear.bias = nn.Parameter(bias, requires_grad=False)


def compensation_step(kind: str, damping: float = 1e-3) -> Compensation:
    """A `pruning.Compensation` that folds the removed units' mean into the output biases (bias)
    or refits o_proj/down_proj and their biases by least squares (lstsq), on the unpruned layer's inputs.

    lstsq needs `prune_model(..., gram=True)` (the step says so with `needs_gram`).
    """
    if kind not in ("bias", "lstsq"):
        raise ValueError(f"unknown compensation {kind!r} (bias or lstsq)")

    def compensate(context: LayerPruneContext) -> None:
        acts = context.activations
        head_dim = context.head_dim
        heads = context.kept_query_heads.to(torch.long)
        o_columns = (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
        _fix(context.layer.self_attn.o_proj, o_columns, context.removed_o_proj_columns, _o_stats(acts), kind, damping)
        _fix(context.layer.mlp.down_proj, context.kept_mlp_channels.to(torch.long), context.removed_down_proj_columns, _down_stats(acts), kind, damping)

    compensate.__name__ = f"{kind}-compensation"
    compensate.needs_gram = kind == "lstsq"  # prune_model collects XᵀX only when asked
    return compensate
