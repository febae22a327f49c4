"""Which units of a layer to keep: one registry of unit criteria, one name each.

A unit is a KV group (one KV head and its query heads), a query head, or an
MLP channel. Its score (higher = keep) is computed from the layer's weights
and, for data-aware criteria, from `statistics.InputStatistics` of the
inputs of the projection the unit feeds: o_proj for heads and groups
(contiguous blocks of head_dim input columns), down_proj for MLP channels.

- `magnitude`: squared L2 norm of every weight that belongs to the unit (no data);
- `activation`: Σ_j ‖W[:, j]‖²·E[x_j²] over the unit's input columns, the mean
  energy it sends to the output (Wanda-sp, squared);
- `fluctuation`: the variance of the unit's contribution to the output,
  tr(W_S Cov_SS W_Sᵀ) (FLAP); a unit whose output barely moves can be
  replaced by a constant (bias compensation);
- `obs` (default): the output error removing the unit leaves once the rest of
  the projection and its bias are refitted, tr(W_S (H⁻¹_SS)⁻¹ W_Sᵀ)
  (optimal brain surgeon; `obs.obs_unit_scores`). Units are removed greedily,
  a few at a time, updating W and H⁻¹ after each step (SlimGPT, ZipLM). Told
  how many units a layer keeps (`keep=`), the greedy order stops there;
  without it, it runs to the end, so that the scores the global allocation
  ranks add up to the *joint* error of removing the cheapest units together
  (one-shot errors would count redundant units as free: 81.5 vs. 80.1 PPL
  for SmolLM2 at 20 %, benchmarks/quality.py).

Other criteria plug in with `register_unit_score` (Torch-Pruning style).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.io.architecture import attention_counts
from llmprune.engine.pruning.scores import statistics


class UnitScore(Protocol):
    """Scores the units of one decoder layer (higher = keep)."""

    name: str
    needs_statistics: bool  # scores read calibration statistics (else the weights alone)

    def needs_gram(self, width: int) -> bool:
        """Whether units of `width` input columns need XᵀX in the statistics."""

    def kv_groups(self, layer: nn.Module, stats: statistics.InputStatistics | None) -> torch.Tensor:
        """[kv_heads]: one score per KV group, from o_proj's input statistics."""

    def query_heads(self, layer: nn.Module, stats: statistics.InputStatistics | None) -> torch.Tensor:
        """[kv_heads, heads per group]: one score per query head."""

    def mlp_channels(self, layer: nn.Module, stats: statistics.InputStatistics | None) -> torch.Tensor:
        """[intermediate_size]: one score per MLP channel, from down_proj's input statistics."""


def _column_energy(linear: nn.Linear) -> torch.Tensor:
    return statistics.column_energy(linear.weight)  # a block of rows at a time: no float64 copy of the whole weight


def _row_energy(linear: nn.Linear) -> torch.Tensor:
    return linear.weight.detach().to(torch.float64).pow(2).sum(1)


def _blocks(columns: torch.Tensor, width: int) -> torch.Tensor:
    return columns.reshape(-1, width).sum(1)


def _per_head(columns: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """[heads · head_dim] column scores -> [kv_heads, heads per group]."""
    _, kv_heads, head_dim = attention_counts(layer)
    return _blocks(columns, head_dim).reshape(kv_heads, -1)


class Magnitude:
    name = "magnitude"
    needs_statistics = False

    def needs_gram(self, width: int) -> bool:
        return False

    def query_heads(self, layer, stats=None) -> torch.Tensor:
        attn = layer.self_attn
        return _per_head(_row_energy(attn.q_proj) + _column_energy(attn.o_proj), layer)

    def kv_groups(self, layer, stats=None) -> torch.Tensor:
        _, _, head_dim = attention_counts(layer)
        attn = layer.self_attn
        kv = _blocks(_row_energy(attn.k_proj) + _row_energy(attn.v_proj), head_dim)
        return self.query_heads(layer).sum(1) + kv

    def mlp_channels(self, layer, stats=None) -> torch.Tensor:
        mlp = layer.mlp
        return _row_energy(mlp.gate_proj) + _row_energy(mlp.up_proj) + _column_energy(mlp.down_proj)


class Activation:
    name = "activation"
    needs_statistics = True

    def needs_gram(self, width: int) -> bool:
        return False

    @staticmethod
    def _columns(linear: nn.Linear, stats: statistics.InputStatistics) -> torch.Tensor:
        return _column_energy(linear).to(stats.squares.device) * stats.squares / max(stats.count, 1)

    def query_heads(self, layer, stats) -> torch.Tensor:
        return _per_head(self._columns(layer.self_attn.o_proj, stats), layer)

    def kv_groups(self, layer, stats) -> torch.Tensor:
        return self.query_heads(layer, stats).sum(1)

    def mlp_channels(self, layer, stats) -> torch.Tensor:
        return self._columns(layer.mlp.down_proj, stats)


class Fluctuation:
    name = "fluctuation"
    needs_statistics = True

    def needs_gram(self, width: int) -> bool:
        # a multi-column unit's variance has cross terms; a single column's has none
        return width > 1

    @staticmethod
    def _groups(layer: nn.Module, width: int, stats: statistics.InputStatistics) -> torch.Tensor:
        weight = layer.self_attn.o_proj.weight
        if stats.gram is None:
            return _blocks(statistics.fluctuation(weight, stats), width)
        groups = [range(g * width, (g + 1) * width) for g in range(weight.shape[1] // width)]
        return statistics.group_fluctuation(weight, stats, groups)

    def query_heads(self, layer, stats) -> torch.Tensor:
        _, kv_heads, head_dim = attention_counts(layer)
        return self._groups(layer, head_dim, stats).reshape(kv_heads, -1)

    def kv_groups(self, layer, stats) -> torch.Tensor:
        heads, kv_heads, head_dim = attention_counts(layer)
        return self._groups(layer, heads // kv_heads * head_dim, stats)

    def mlp_channels(self, layer, stats) -> torch.Tensor:
        return statistics.fluctuation(layer.mlp.down_proj.weight, stats)


class OptimalBrainSurgeon:
    name = "obs"
    needs_statistics = True
    takes_keep = True  # kv_groups/mlp_channels accept keep= (units the layer keeps) for the greedy order

    def needs_gram(self, width: int) -> bool:
        return True

    @staticmethod
    def _scores(linear: nn.Linear, stats: statistics.InputStatistics, width: int, keep: int | None) -> torch.Tensor:
        from llmprune.engine.pruning.scores.obs import obs_unit_scores

        units = linear.in_features // width
        return obs_unit_scores(linear.weight, stats, width, remove=None if keep is None else units - keep)

    def query_heads(self, layer, stats) -> torch.Tensor:
        _, kv_heads, head_dim = attention_counts(layer)
        return self._scores(layer.self_attn.o_proj, stats, head_dim, None).reshape(kv_heads, -1)

    def kv_groups(self, layer, stats, keep: int | None = None) -> torch.Tensor:
        heads, kv_heads, head_dim = attention_counts(layer)
        return self._scores(layer.self_attn.o_proj, stats, heads // kv_heads * head_dim, keep)

    def mlp_channels(self, layer, stats, keep: int | None = None) -> torch.Tensor:
        return self._scores(layer.mlp.down_proj, stats, 1, keep)


UNIT_SCORES: dict[str, UnitScore] = {
    score.name: score for score in (Magnitude(), Activation(), Fluctuation(), OptimalBrainSurgeon())
}


def register_unit_score(score: UnitScore) -> None:
    """Make a unit criterion available by its name (to --unit-importance and the Python API)."""
    UNIT_SCORES[score.name] = score


def get_unit_score(name: str) -> UnitScore:
    if name not in UNIT_SCORES:
        raise UserInputError(f"unknown --unit-importance '{name}'", f"use one of {', '.join(sorted(UNIT_SCORES))}")
    return UNIT_SCORES[name]


def top_units(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` highest scores, in ascending index order (ties: the lower index)."""
    order = torch.argsort(scores, descending=True, stable=True)
    return sorted(order[:count].tolist())
