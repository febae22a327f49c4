"""The global path: measure every unit of the dense model, rank them across all layers, prune to a target.

Two passes make a prune, both walking the model with a `layer_store.LayerStore`
(in memory, or streamed from disk by `streaming.StreamedLayers`, so the same
code prunes a model that does not fit): `measure_units` (the dense model's
unit scores and block influence, which `allocate` turns into how many units
each layer keeps) and `layer_pass.prune_layers` (the one pruning pass).
`prune_loaded_model` adds depth pruning (whole layers) before the width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.progress import StageProgress
from llmprune.engine.pruning import compensation as comp
from llmprune.engine.pruning.config import COMPENSATIONS, DEFAULT_UNIT_IMPORTANCE  # noqa: F401 (re-exported)
from llmprune.engine.pruning.layer_pass import LayerPlan, LayerReport, prune_layers
from llmprune.engine.pruning.surgery import attention_counts
from llmprune.engine.pruning.unit_scores import UNIT_SCORES, get_unit_score  # noqa: F401 (re-exported)
from llmprune.engine.walk.layer_store import (
    InMemoryLayers,
    LayerRunner,
    LayerStore,
    runner_for,
)  # noqa: F401 (re-exported)

__all__ = [
    "LayerPlan",
    "LayerReport",
    "LayerScores",
    "measure_units",
    "allocate",
    "CalibratedPruneOptions",
    "prune_to_target",
    "prune_loaded_model",
]


# ---------------------------------------------------------------- plans and scores


@dataclass
class LayerScores:
    """Dense-model unit scores of one layer, normalised by the energy of the residual stream entering it."""

    group_scores: list[float]
    channel_scores: list[float]
    group_params: int  # parameters one KV group costs (q, k, v rows and o_proj columns)
    channel_params: int  # parameters one MLP channel costs (gate, up rows and down column)
    input_energy: float  # mean ‖h‖² of the tokens entering the layer
    influence: float = 0.0  # 1 - cos(h_in, h_out), averaged over tokens (ShortGPT block influence)
    missing_bias_params: int = 0  # output-bias parameters compensation would add (o_proj, down_proj)

    def to_dict(self) -> dict:
        return asdict(self)


def _unit_params(layer: nn.Module) -> tuple[int, int]:
    attn, mlp = layer.self_attn, layer.mlp
    heads, kv_heads, head_dim = attention_counts(layer)
    hidden = attn.q_proj.in_features
    per_group = (heads // kv_heads) * head_dim * hidden * 2 + 2 * head_dim * hidden
    per_channel = 3 * hidden
    if mlp.gate_proj.bias is not None:
        per_channel += 2
    return per_group, per_channel


# float64 copies of all calibration hidden states would be the largest thing in a streamed run
# (50 windows x 128 tokens x 576: 30 MB each for SmolLM2, GBs for 8B); a few windows at a time suffice
_WINDOWS_PER_CHUNK = 8


def _per_token_mean(values, *hidden: torch.Tensor) -> float:
    """Mean over every token of `values(*chunks)` (per-token float64 values), a few windows at a time."""
    total, tokens = 0.0, 0
    for chunks in zip(*(h.split(_WINDOWS_PER_CHUNK) for h in hidden), strict=False):
        per_token = values(*(c.flatten(0, 1).double() for c in chunks))
        total += float(per_token.sum())
        tokens += per_token.numel()
    return total / tokens


@torch.no_grad()
def _cosine_gap(before: torch.Tensor, after: torch.Tensor) -> float:
    """Block influence: mean over tokens of 1 - cos(h_in, h_out)."""
    return _per_token_mean(lambda b, a: 1 - torch.nn.functional.cosine_similarity(b, a, dim=-1), before, after)


@torch.no_grad()
def _energy(hidden: torch.Tensor) -> float:
    """Mean over tokens of ‖h‖²."""
    return _per_token_mean(lambda h: h.pow(2).sum(-1), hidden)


@torch.no_grad()
def measure_units(
    store: LayerStore,
    ids: torch.Tensor,
    runner: LayerRunner,
    unit_score: str = DEFAULT_UNIT_IMPORTANCE,
    progress: StageProgress | None = None,
) -> list[LayerScores]:
    """One pass over the dense model: unit scores and block influence of every layer."""
    score = get_unit_score(unit_score)
    hidden = store.embed(ids)
    results = []
    for index in range(store.num_layers):
        layer = store.load(index)
        heads, kv_heads, head_dim = attention_counts(layer)
        with comp.record_inputs(
            layer.self_attn.o_proj, gram=score.needs_gram(heads // kv_heads * head_dim)
        ) as attn_stats:
            middle = runner.attention_block(layer, hidden)
        with comp.record_inputs(layer.mlp.down_proj, gram=score.needs_gram(1)) as mlp_stats:
            out = runner.mlp_block(layer, middle)
        group_scores = score.kv_groups(layer, attn_stats)
        channel_scores = score.mlp_channels(layer, mlp_stats)
        group_params, channel_params = _unit_params(layer)
        results.append(
            LayerScores(
                group_scores=group_scores.tolist(),
                channel_scores=channel_scores.tolist(),
                group_params=group_params,
                channel_params=channel_params,
                input_energy=_energy(hidden),
                influence=_cosine_gap(hidden, out),
                missing_bias_params=sum(
                    p.out_features for p in (layer.self_attn.o_proj, layer.mlp.down_proj) if p.bias is None
                ),
            )
        )
        hidden = out
        store.release(index, layer, changed=False)
        if progress:
            progress("measure", index + 1, store.num_layers)
    return results


def allocate(
    scores: Sequence[LayerScores],
    params_to_remove: int,
    attention: bool = True,
    max_channel_ratio: float = 0.8,
    strategy: str = "global",
) -> list[LayerPlan]:
    """How many KV groups and MLP channels each layer keeps so that ≥ params_to_remove go.

    global: rank every unit of every layer by its relative damage per parameter
    (score / input energy / parameters it costs) and remove the cheapest first,
    so sensitive layers keep more. uniform: the same MLP share in every layer
    (attention untouched). A layer always keeps one KV group and at least
    (1 - max_channel_ratio) of its channels.
    """
    plans = [LayerPlan(len(s.group_scores), len(s.channel_scores)) for s in scores]
    if params_to_remove <= 0:
        return plans
    if strategy == "uniform":
        total_channels = sum(len(s.channel_scores) for s in scores)
        per_channel = scores[0].channel_params
        share = min(max_channel_ratio, params_to_remove / (per_channel * total_channels))
        for plan, s in zip(plans, scores, strict=False):
            plan.keep_channels = len(s.channel_scores) - int(round(share * len(s.channel_scores) + 0.4999))
        return plans
    if strategy != "global":
        raise ValueError(f"unknown allocation strategy {strategy!r}")
    candidates = []  # (damage per parameter, layer, kind, params)
    for index, s in enumerate(scores):
        energy = max(s.input_energy, 1e-12)
        channel_order = sorted(s.channel_scores)
        removable = int(max_channel_ratio * len(channel_order))
        for value in channel_order[:removable]:
            candidates.append((value / energy / s.channel_params, index, "channel", s.channel_params))
        if attention and len(s.group_scores) > 1:
            for value in sorted(s.group_scores)[:-1]:
                candidates.append((value / energy / s.group_params, index, "group", s.group_params))
    candidates.sort(key=lambda c: c[0])
    removed = 0
    for _, index, kind, params in candidates:
        if removed >= params_to_remove:
            break
        if kind == "channel":
            plans[index].keep_channels -= 1
        else:
            plans[index].keep_groups -= 1
        removed += params
    return plans


# ---------------------------------------------------------------- both passes, to a parameter target


@dataclass
class CalibratedPruneOptions:
    """How `prune_to_target` chooses, cuts and compensates."""

    unit_score: str = DEFAULT_UNIT_IMPORTANCE
    """Which units of a layer to keep: obs | fluctuation | activation | magnitude (unit_scores.UNIT_SCORES)."""
    compensation: str = "lstsq"
    """What to do for the removed units: none | bias (their mean, into the output bias) | lstsq (refit
    o_proj/down_proj).
    """
    allocation: str = "global"
    """How many units each layer keeps: global (rank all units of all layers) | uniform (same MLP share everywhere)."""
    attention: bool = True
    """Also remove whole KV groups (else MLP channels only)."""
    max_channel_ratio: float = 0.8
    """At most this share of a layer's MLP channels goes."""
    damping: float = 1e-3
    """Ridge added to the least-squares normal equations, relative to their mean diagonal."""


def _removed_parameters(scores: Sequence[LayerScores], plans: Sequence[LayerPlan]) -> int:
    return sum(
        (len(s.group_scores) - p.keep_groups) * s.group_params
        + (len(s.channel_scores) - p.keep_channels) * s.channel_params
        for s, p in zip(scores, plans, strict=False)
    )


def prune_to_target(
    store: LayerStore,
    ids: torch.Tensor,
    runner: LayerRunner,
    params_to_remove: int,
    options: CalibratedPruneOptions | None = None,
    progress: StageProgress | None = None,
) -> tuple[list[LayerScores], list[LayerPlan], list[LayerReport]]:
    """Measure the dense model, allocate the cut, then prune layer by layer."""
    options = options or CalibratedPruneOptions()
    scores = measure_units(store, ids, runner, options.unit_score, progress)
    # the output biases compensation adds count against the budget
    added = sum(s.missing_bias_params for s in scores) if options.compensation != "none" and params_to_remove > 0 else 0
    plans = allocate(scores, params_to_remove + added, options.attention, options.max_channel_ratio, options.allocation)
    removable = _removed_parameters(scores, plans)
    if removable < params_to_remove + added:
        raise UserInputError(
            f"the parameter target cannot be reached: at most {removable - added:,} parameters can go"
            f" ({params_to_remove:,} asked; every layer keeps one KV group and {1 - options.max_channel_ratio:.0%} of"
            " its MLP channels)",
            "ask for a larger model, or add --drop-layers to remove whole layers",
        )
    store.begin_pruning()
    reports = prune_layers(
        store, ids, runner, plans, options.unit_score, options.compensation, options.damping, progress
    )
    return scores, plans, reports


# ---------------------------------------------------------------- a loaded model, depth and width


@dataclass
class CalibratedOutcome:
    """What `prune_loaded_model` did."""

    dropped_layers: list[int]  # original indices of the decoder layers removed whole
    scores: list[LayerScores]  # of the layers that remained, measured on the dense model
    plans: list[LayerPlan]
    reports: list[LayerReport]


def prune_loaded_model(
    model: nn.Module,
    ids: torch.Tensor,
    params_to_remove: int,
    options: CalibratedPruneOptions | None = None,
    drop: int = 0,
    batch_size: int = 8,
    progress: StageProgress | None = None,
) -> CalibratedOutcome:
    """Depth then width: drop the `drop` least influential layers, then prune units to the remaining budget."""
    from llmprune.engine.pruning.depth import drop_layers, least_influential

    options = options or CalibratedPruneOptions()
    runner = runner_for(model, ids.shape[1], batch_size)
    store = InMemoryLayers(model)
    dropped: list[int] = []
    if drop > 0:
        influence = [s.influence for s in measure_units(store, ids, runner, "magnitude", progress)]
        dropped = least_influential(influence, drop)
        before = sum(p.numel() for p in model.parameters())
        drop_layers(model, dropped)
        params_to_remove -= before - sum(p.numel() for p in model.parameters())
    if params_to_remove > 0:
        scores, plans, reports = prune_to_target(store, ids, runner, params_to_remove, options, progress)
    else:
        scores, plans, reports = [], [], []
    return CalibratedOutcome(dropped, scores, plans, reports)
