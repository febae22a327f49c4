"""The global allocation: rank every unit of every layer by the damage its removal does per parameter.

`rank_units` turns the dense model's unit scores (`scores.measure`) into how
many KV groups and MLP channels each layer keeps (a `level.Level`, what the
cut takes); `least_influential` picks the whole layers depth pruning removes.
What a unit costs comes from `cost.ParameterCost`, the one cost model.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmprune.engine.pruning.allocate.cost import ParameterCost
from llmprune.engine.pruning.allocate.level import Level
from llmprune.engine.pruning.scores.measure import LayerUnitScores

__all__ = ["RANKINGS", "rank_units", "removed_parameters", "least_influential"]

RANKINGS = ("global", "even-mlp")


def rank_units(
    scores: Sequence[LayerUnitScores],
    cost: ParameterCost,
    params_to_remove: int,
    attention: bool = True,
    max_channel_ratio: float = 0.8,
    strategy: str = "global",
) -> list[Level]:
    """How many KV groups and MLP channels each layer keeps so that ≥ params_to_remove go.

    global: rank every unit of every layer by its relative damage per parameter
    (score / input energy / parameters it costs) and remove the cheapest first,
    so sensitive layers keep more. even-mlp: the same MLP share in every layer
    (attention untouched; a baseline). What a unit costs is `cost`'s answer. A
    layer always keeps one KV group and at least (1 - max_channel_ratio) of its
    channels.
    """
    groups = [len(s.group_scores) for s in scores]
    channels = [len(s.channel_scores) for s in scores]
    if params_to_remove <= 0:
        return [Level(g, c) for g, c in zip(groups, channels, strict=True)]
    if strategy == "even-mlp":
        total_channels = sum(len(s.channel_scores) for s in scores)
        per_channel = cost.mlp_channel(0)
        share = min(max_channel_ratio, params_to_remove / (per_channel * total_channels))
        return [Level(g, c - int(round(share * c + 0.4999))) for g, c in zip(groups, channels, strict=True)]
    if strategy != "global":
        raise ValueError(f"unknown ranking strategy {strategy!r} (global | even-mlp)")
    candidates = []  # (damage per parameter, layer, kind, params)
    for index, s in enumerate(scores):
        energy = max(s.input_energy, 1e-12)
        channel_order = sorted(s.channel_scores)
        removable = int(max_channel_ratio * len(channel_order))
        channel_params, group_params = cost.mlp_channel(index), cost.kv_group(index)
        for value in channel_order[:removable]:
            candidates.append((value / energy / channel_params, index, "channel", channel_params))
        if attention and len(s.group_scores) > 1:
            for value in sorted(s.group_scores)[:-1]:
                candidates.append((value / energy / group_params, index, "group", group_params))
    candidates.sort(key=lambda c: c[0])
    removed = 0
    for _, index, kind, params in candidates:
        if removed >= params_to_remove:
            break
        if kind == "channel":
            channels[index] -= 1
        else:
            groups[index] -= 1
        removed += params
    return [Level(g, c) for g, c in zip(groups, channels, strict=True)]


def removed_parameters(cost: ParameterCost, scores: Sequence[LayerUnitScores], plans: Sequence[Level]) -> int:
    """Parameters the plans remove (the units' own parameters; compensation's added biases not counted)."""
    return sum(
        (len(s.group_scores) - p.groups) * cost.kv_group(i) + (len(s.channel_scores) - p.channels) * cost.mlp_channel(i)
        for i, (s, p) in enumerate(zip(scores, plans, strict=False))
    )


def least_influential(influence: Sequence[float], count: int, keep_first: int = 1, keep_last: int = 1) -> list[int]:
    """The `count` layers with the lowest block influence; the first and last layers are never chosen."""
    candidates = [i for i in range(keep_first, len(influence) - keep_last)]
    if count > len(candidates):
        raise ValueError(f"cannot drop {count} of {len(influence)} layers (at most {len(candidates)})")
    return sorted(sorted(candidates, key=lambda i: influence[i])[:count])
