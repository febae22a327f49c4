"""The level database of the searched allocation: every layer's units ordered once, each level's refit once.

Per layer it holds the dense model's calibration statistics of o_proj and
down_proj and the greedy OBS removal order of their units
(`scores.obs.obs_unit_scores`: one pass gives every level, the k units kept
are the k the greedy order removed last), and computes each level's refit
(`cut.refit.refit_least_squares`, or bias compensation) when it is first
asked for. `install` puts a level's weights into the live model (no copy
of the model: the dense tensors stay referenced here and come back when the
level is full again), so a candidate allocation is evaluated by installing
the layers that changed and running the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from llmprune.engine.io.architecture import attention_counts
from llmprune.engine.pruning.allocate.level import Level
from llmprune.engine.pruning.cut import refit
from llmprune.engine.pruning.scores import statistics
from llmprune.engine.pruning.scores.obs import obs_unit_scores

__all__ = ["LevelDatabase"]


class LevelDatabase:
    """Calibration statistics, unit orders and (lazily) refits of every layer of one dense model."""

    def __init__(self, layers: Sequence[nn.Module], damping: float = 1e-3, refit: bool = True):
        self.layers = list(layers)
        self.damping = damping
        self.refit = refit
        self.dense = [self._dense_weights(layer) for layer in self.layers]
        self.attn_stats: list[statistics.InputStatistics] = []
        self.mlp_stats: list[statistics.InputStatistics] = []
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
            with statistics.record_inputs(layer.self_attn.o_proj) as attn_stats:
                middle = runner.attention_block(layer, hidden)
            with statistics.record_inputs(layer.mlp.down_proj) as mlp_stats:
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
                fitted = refit.refit_least_squares(weight, bias, stats, keep, self.damping)
                self._cache[key] = (fitted.weight, fitted.bias)
            else:
                self._cache[key] = (weight[:, keep].contiguous(), refit.compensate_bias(weight, bias, stats, keep))
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
