"""The level database of the searched allocation: every layer cut once at a ladder of sizes.

A layer's *level* is what it keeps: `groups` whole KV groups (q:kv unchanged),
`channels` MLP channels on a ladder of `step` channels, or nothing at all
(the layer removed, so that depth and width compete for one budget). The
ladder is the same in every layer, so one MLP step given up by one layer and
taken by another leaves the total parameter count exactly where it was (and
one KV group likewise); a layer removed or brought back is balanced with MLP
steps, which lands within one MLP step of the budget (`Ladder.tolerance`).

`LevelDatabase` holds, per layer, the dense model's calibration statistics
of o_proj and down_proj and the greedy OBS removal order of their units
(`obs.obs_unit_scores`, one pass gives every level: the k units kept are the
k the greedy order removed last), and computes each level's refit
(`compensation.refit_least_squares`) once, when it is first asked for.
`install` puts a level's weights into the live model (no copy of the model:
the dense tensors stay referenced by the database and come back when the
level is full again), so a candidate allocation is evaluated by installing
the layers that changed and running the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from llmprune.engine.pruning import compensation as comp
from llmprune.engine.pruning.obs import obs_unit_scores
from llmprune.engine.pruning.surgery import attention_counts

__all__ = ["Level", "Ladder", "LevelDatabase", "LayerCost", "REMOVED"]

LayerCost = Callable[[int, int | None, int | None], int]
"""Parameters of layer i keeping g KV groups and c MLP channels; (i, None, None): the layer removed (0)."""


@dataclass(frozen=True)
class Level:
    """What one layer keeps: `groups` KV groups and `channels` MLP channels, or nothing (`removed`)."""

    groups: int
    channels: int
    removed: bool = False

    def to_dict(self) -> dict:
        return {"removed": True} if self.removed else {"groups": self.groups, "channels": self.channels}

    @staticmethod
    def from_dict(data: dict) -> Level:
        return REMOVED if data.get("removed") else Level(int(data["groups"]), int(data["channels"]))


REMOVED = Level(0, 0, True)


@dataclass
class Ladder:
    """The levels every layer may take, and what they cost.

    groups: 1..kv_heads; channels: full, full - step, ... down to the floor
    (at least `min_channel_share` of the channels stay); removal when allowed.
    """

    kv_heads: list[int]
    channels: list[int]
    step: int
    cost: LayerCost
    min_channel_share: float = 0.2
    attention: bool = True
    depth: bool = True
    protected: frozenset[int] = frozenset()  # layers never removed (the first and the last)

    @property
    def num_layers(self) -> int:
        return len(self.channels)

    def channel_levels(self, layer: int) -> list[int]:
        """Kept-channel counts of one layer, widest first."""
        full = self.channels[layer]
        floor = max(1, int(-(-full * self.min_channel_share // 1)))
        return [full - k * self.step for k in range(full // self.step + 1) if full - k * self.step >= floor]

    def group_levels(self, layer: int) -> list[int]:
        return list(range(self.kv_heads[layer], 0, -1)) if self.attention else [self.kv_heads[layer]]

    def full(self, layer: int) -> Level:
        return Level(self.kv_heads[layer], self.channels[layer])

    def params(self, allocation: Sequence[Level]) -> int:
        return sum(
            self.cost(i, None, None) if lv.removed else self.cost(i, lv.groups, lv.channels)
            for i, lv in enumerate(allocation)
        )

    @property
    def tolerance(self) -> int:
        """How far under the budget an allocation may land: one MLP step of the costliest layer."""
        return max(
            self.cost(i, self.kv_heads[i], c) - self.cost(i, self.kv_heads[i], c - self.step)
            for i, c in enumerate(self.channels)
        )

    def fits(self, allocation: Sequence[Level], budget: int) -> bool:
        """At most `budget` parameters, and less than one tolerance under it."""
        params = self.params(allocation)
        return budget - self.tolerance < params <= budget

    def uniform(self, budget: int) -> list[Level]:
        """The same MLP level everywhere (attention whole), one step more in the first layers to land on budget."""
        allocation = [self.full(i) for i in range(self.num_layers)]
        # one channel step per layer and pass, first layer first: every layer is within one step of the others
        while self.params(allocation) > budget:
            moved = False
            for i in range(self.num_layers):
                if self.params(allocation) <= budget:
                    break
                levels = self.channel_levels(i)
                k = levels.index(allocation[i].channels)
                if k + 1 < len(levels):
                    allocation[i] = Level(allocation[i].groups, levels[k + 1])
                    moved = True
            if not moved:
                raise ValueError("the budget cannot be reached by MLP channels alone")
        return allocation


def ladder_step(channels: int, steps: int = 32) -> int:
    """MLP channels per level: about 1/steps of the width, a multiple of 8 where the width allows it."""
    step = max(1, channels // steps)
    return step - step % 8 if step >= 16 else step


class LevelDatabase:
    """Calibration statistics, unit orders and (lazily) refits of every layer of one dense model."""

    def __init__(self, layers: Sequence[nn.Module], damping: float = 1e-3, refit: bool = True):
        self.layers = list(layers)
        self.damping = damping
        self.refit = refit
        self.dense = [self._dense_weights(layer) for layer in self.layers]
        self.attn_stats: list[comp.InputStatistics] = []
        self.mlp_stats: list[comp.InputStatistics] = []
        self.group_order: list[list[int]] = []  # best first
        self.channel_order: list[list[int]] = []
        self.group_scores: list[list[float]] = []  # the OBS scores themselves (for the global allocation's start)
        self.channel_scores: list[list[float]] = []
        self.input_energy: list[float] = []  # mean ‖h‖² entering each layer
        self._cache: dict[tuple[int, str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.installed: list[Level] = []

    @staticmethod
    def _dense_weights(layer: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        attn, mlp = layer.self_attn, layer.mlp
        linears = {
            "q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj,
            "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj,
        }  # fmt: skip
        return {name: (lin.weight.data, None if lin.bias is None else lin.bias.data) for name, lin in linears.items()}

    @torch.no_grad()
    def measure(self, hidden: torch.Tensor, runner, progress: Callable[[int, int], None] | None = None) -> None:
        """One dense pass over the calibration windows: statistics and OBS unit orders of every layer."""
        for index, layer in enumerate(self.layers):
            heads, kv_heads, head_dim = attention_counts(layer)
            self.input_energy.append(float(hidden.double().pow(2).sum(-1).mean()))
            with comp.record_inputs(layer.self_attn.o_proj) as attn_stats:
                middle = runner.attention_block(layer, hidden)
            with comp.record_inputs(layer.mlp.down_proj) as mlp_stats:
                hidden = runner.mlp_block(layer, middle)
            o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj
            width = heads // kv_heads * head_dim
            group_scores = obs_unit_scores(o_proj.weight, attn_stats, width, None, self.damping, o_proj.bias)
            channel_scores = obs_unit_scores(down_proj.weight, mlp_stats, 1, None, self.damping, down_proj.bias)
            self.attn_stats.append(attn_stats)
            self.mlp_stats.append(mlp_stats)
            self.group_scores.append(group_scores.tolist())
            self.channel_scores.append(channel_scores.tolist())
            self.group_order.append(group_scores.argsort(descending=True).tolist())
            self.channel_order.append(channel_scores.argsort(descending=True).tolist())
            self.installed.append(Level(kv_heads, down_proj.in_features))
            if progress:
                progress(index + 1, len(self.layers))

    def kept_groups(self, layer: int, groups: int) -> list[int]:
        return sorted(self.group_order[layer][:groups])

    def kept_channels(self, layer: int, channels: int) -> list[int]:
        return sorted(self.channel_order[layer][:channels])

    def _refit(self, layer: int, kind: str, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of o_proj or down_proj on the kept input columns, computed once per level."""
        key = (layer, kind, len(keep))
        if key not in self._cache:
            weight, bias = self.dense[layer]["o" if kind == "attn" else "down"]
            stats = self.attn_stats[layer] if kind == "attn" else self.mlp_stats[layer]
            if self.refit:
                self._cache[key] = comp.refit_least_squares(weight, bias, stats, keep, self.damping)
            else:
                self._cache[key] = (weight[:, keep].contiguous(), comp.compensate_bias(weight, bias, stats, keep))
        return self._cache[key]

    def attention_weights(self, layer: int, groups: int) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """q, k, v, o of one layer keeping its `groups` best KV groups (o refitted)."""
        dense = self.dense[layer]
        heads, kv_heads, head_dim = self._counts(layer)
        if groups >= kv_heads:
            return {name: dense[name] for name in ("q", "k", "v", "o")}
        ratio = heads // kv_heads
        kept = self.kept_groups(layer, groups)
        q_rows = torch.tensor(
            [(g * ratio + j) * head_dim + d for g in kept for j in range(ratio) for d in range(head_dim)]
        )
        kv_rows = torch.tensor([g * head_dim + d for g in kept for d in range(head_dim)])
        out = {}
        for name, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            weight, bias = dense[name]
            out[name] = (weight.index_select(0, rows), None if bias is None else bias.index_select(0, rows))
        out["o"] = self._refit(layer, "attn", q_rows.tolist())
        return out

    def mlp_weights(self, layer: int, channels: int) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """gate, up, down of one layer keeping its `channels` best channels (down refitted)."""
        dense = self.dense[layer]
        if channels >= dense["down"][0].shape[1]:
            return {name: dense[name] for name in ("gate", "up", "down")}
        keep = self.kept_channels(layer, channels)
        rows = torch.tensor(keep)
        out = {}
        for name in ("gate", "up"):
            weight, bias = dense[name]
            out[name] = (weight.index_select(0, rows), None if bias is None else bias.index_select(0, rows))
        out["down"] = self._refit(layer, "mlp", keep)
        return out

    def _counts(self, layer: int) -> tuple[int, int, int]:
        head_dim = self.layers[layer].self_attn.head_dim
        return self.dense[layer]["q"][0].shape[0] // head_dim, self.dense[layer]["k"][0].shape[0] // head_dim, head_dim

    @torch.no_grad()
    def install(self, layer: int, level: Level) -> None:
        """Put this level's weights into the live layer (a removed layer keeps its last weights: it is skipped)."""
        if level.removed or self.installed[layer] == level:
            return
        module = self.layers[layer]
        attn, mlp = module.self_attn, module.mlp
        current = self.installed[layer]
        if current.removed or current.groups != level.groups:
            weights = self.attention_weights(layer, level.groups)
            for name, linear in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj)):
                _set(linear, *weights[name])
            heads, kv_heads, head_dim = self._counts(layer)
            kept_heads = heads // kv_heads * level.groups
            attn.num_key_value_groups = heads // kv_heads
            attn.num_heads, attn.num_key_value_heads = kept_heads, level.groups
        if current.removed or current.channels != level.channels:
            weights = self.mlp_weights(layer, level.channels)
            for name, linear in (("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj)):
                _set(linear, *weights[name])
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = level.channels
        self.installed[layer] = level

    def restore_dense(self) -> None:
        for index in range(len(self.layers)):
            full = Level(self._counts(index)[1], self.dense[index]["down"][0].shape[1])
            self.install(index, full)


def _set(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
    linear.out_features, linear.in_features = weight.shape
