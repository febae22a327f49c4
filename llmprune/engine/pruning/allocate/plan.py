"""From layer importance to a per-layer pruning plan (plain functions, no model).

1. `layer_rates`: one pruning rate per decoder layer. Layers outside
   [layer_start, layer_end) get 0. The others get weights from their importance
   (min-max normalised to u in [0, 1] over the prunable layers):
   - `inverse`: exp(-alpha * u): more important layers are pruned less;
   - `proportional`: exp(+alpha * u) (the seed tools' option, kept for comparison);
   - `uniform`: 1 (same as alpha = 0).
   The weights are scaled, clamped to [min_rate, max_rate], and the scale is
   solved (bisection) so that the mean rate over the prunable layers is `ratio`.
2. `unit_counts`: rates -> whole units kept per layer. Attention units are
   coarse (SmolLM2 has 3 KV groups per layer), so they are apportioned across
   layers by largest remainder: the total removed matches the plan, the
   layers with the highest rates lose the extra unit. A layer always keeps at
   least one KV group, one query head per group and `round_to` MLP channels.
3. `solve_ratio_for_parameters`: the ratio whose plan lands on a parameter
   count (bisection on the exact count of the resulting shapes, from `cost.ParameterCost`).
4. `make_plan`: all of it, from layer scores to the units every layer keeps.

Strategy names (inverse | proportional | uniform) are this plan's; the global
ranking (`ranking`) has its own, and none of them is spelled the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.io.architecture import LayerShape
from llmprune.engine.pruning.allocate.cost import ParameterCost
from llmprune.engine.pruning.allocate.plan_options import ATTENTION_UNITS, STRATEGIES, PlanOptions  # noqa: F401 (re-exported)


def _weights(scores: Sequence[float], strategy: str, alpha: float) -> list[float]:
    if strategy == "uniform" or alpha == 0 or len(scores) < 2:
        return [1.0] * len(scores)
    low, high = min(scores), max(scores)
    spread = high - low
    normalised = [(s - low) / spread if spread > 0 else 0.0 for s in scores]
    sign = -1.0 if strategy == "inverse" else 1.0
    return [math.exp(sign * alpha * u) for u in normalised]


def layer_rates(importance: Sequence[float], options: PlanOptions) -> list[float]:
    """One rate per layer: 0 for protected layers, mean `ratio` over the prunable ones."""
    num_layers = len(importance)
    options.validate(num_layers)
    rates = [0.0] * num_layers
    prunable = options.prunable(num_layers)
    if options.ratio == 0:
        return rates
    weights = _weights([float(importance[i]) for i in prunable], options.strategy, options.alpha)

    def clamped(scale: float) -> list[float]:
        return [min(options.max_rate, max(options.min_rate, scale * w)) for w in weights]

    def mean_at(scale: float) -> float:
        return sum(clamped(scale)) / len(weights)

    # mean_at is continuous and non-decreasing in scale: bisection finds the scale
    low, high = 0.0, 1.0
    while mean_at(high) < options.ratio and high < 1e12:
        high *= 2
    for _ in range(200):
        middle = (low + high) / 2
        if mean_at(middle) < options.ratio:
            low = middle
        else:
            high = middle
    for index, rate in zip(prunable, clamped(high), strict=False):
        rates[index] = rate
    return rates


# ---------------------------------------------------------------- rates -> units


@dataclass
class LayerUnits:
    """What one layer keeps after pruning."""

    kv_heads: int
    heads: int
    intermediate_size: int

    def to_dict(self) -> dict:
        return asdict(self)


def _apportion(targets: Sequence[float], limits: Sequence[int]) -> list[int]:
    """Integers near `targets` (each ≤ its limit) whose sum is round(sum(targets)), by largest remainder.

    Targets are clipped to their limits first: what a layer cannot give up is
    not pushed onto the other layers.
    """
    targets = [min(float(t), float(limit)) for t, limit in zip(targets, limits, strict=False)]
    floors = [int(math.floor(t)) for t in targets]
    wanted = round(sum(targets))
    order = sorted(range(len(targets)), key=lambda i: (targets[i] - math.floor(targets[i]), targets[i]), reverse=True)
    missing = wanted - sum(floors)
    while missing > 0:
        progressed = False
        for i in order:
            if missing == 0:
                break
            if floors[i] < limits[i] and targets[i] > floors[i]:
                floors[i] += 1
                missing -= 1
                progressed = True
        if not progressed:
            break
    return floors


def _round_width(width: float, full: int, round_to: int) -> int:
    if width >= full:
        return full
    kept = int(round(width / round_to)) * round_to
    return max(round_to, min(kept, full))


def unit_counts(
    rates: Sequence[float],
    shapes: Sequence[LayerShape],
    attn_unit: str = "group",
    prune_attention: bool = True,
    prune_mlp: bool = False,
    round_to: int = 1,
    same_in_every_layer: bool = False,
) -> list[LayerUnits]:
    """How many KV groups / query heads / MLP channels each layer keeps.

    `same_in_every_layer` rounds each layer on its own instead of apportioning
    across layers, so that equal rates give equal shapes (uniform export).
    """
    if attn_unit not in ATTENTION_UNITS:
        raise UserInputError(f"unknown --attn-unit '{attn_unit}'", f"use one of {', '.join(ATTENTION_UNITS)}")
    if round_to < 1:
        raise UserInputError(f"--round-to must be ≥ 1, got {round_to}", "e.g. --round-to 8 or 64")
    per_group = [s.num_attention_heads // s.num_key_value_heads for s in shapes]
    if attn_unit == "group":
        units = [s.num_key_value_heads for s in shapes]
    else:
        units = per_group
    if prune_attention and same_in_every_layer:
        removed = [min(u - 1, int(round(r * u))) for r, u in zip(rates, units, strict=False)]
    elif prune_attention:
        removed = _apportion([r * u for r, u in zip(rates, units, strict=False)], [u - 1 for u in units])
    else:
        removed = [0] * len(shapes)
    result = []
    for rate, shape, unit_total, gone, ratio in zip(rates, shapes, units, removed, per_group, strict=False):
        if attn_unit == "group":
            kv_heads = unit_total - gone
            heads = kv_heads * ratio
        else:
            kv_heads = shape.num_key_value_heads
            heads = kv_heads * (ratio - gone)
        width = shape.intermediate_size
        if prune_mlp and rate > 0:
            width = _round_width(width * (1 - rate), width, round_to)
        result.append(LayerUnits(kv_heads=kv_heads, heads=heads, intermediate_size=width))
    return result


def units_cost(cost: ParameterCost, index: int, units: LayerUnits) -> int:
    """Parameters of layer `index` keeping `units` (the cost model's count)."""
    return cost.layer(index, units.kv_heads, units.intermediate_size, units.heads // units.kv_heads)


# ---------------------------------------------------------------- a ratio for a parameter target


def solve_ratio_for_parameters(
    target: int,
    count_for_ratio: Callable[[float], int],
    max_ratio: float,
    tolerance: float = 0.002,
) -> float:
    """The ratio whose plan has about `target` parameters (bisection; counts fall as the ratio grows)."""
    if count_for_ratio(0.0) <= target:
        return 0.0
    if count_for_ratio(max_ratio) > target:
        raise UserInputError(
            f"--target-params {target:,} cannot be reached: even at ratio {max_ratio} the model keeps"
            f" {count_for_ratio(max_ratio):,} parameters",
            "raise --max-pruning-rate, widen the layer range, add --prune-mlp, or ask for a larger target",
        )
    low, high = 0.0, max_ratio
    for _ in range(60):
        middle = (low + high) / 2
        if count_for_ratio(middle) > target:
            low = middle
        else:
            high = middle
        if abs(count_for_ratio(high) - target) <= tolerance * target:
            break
    return high


# ---------------------------------------------------------------- scores -> the whole plan


def plan_units(
    scores: list[float],
    shapes: list[LayerShape],
    plan: PlanOptions,
    attn_unit: str,
    prune_mlp: bool,
    round_to: int,
    same_in_every_layer: bool = False,
) -> tuple[list[float], list[LayerUnits]]:
    """Scores -> (per-layer rates, per-layer units kept)."""
    rates = layer_rates(scores, plan)
    units = unit_counts(rates, shapes, attn_unit, True, prune_mlp, round_to, same_in_every_layer)
    return rates, units


def make_plan(
    scores: list[float],
    cost: ParameterCost,
    options: PlanOptions,
    attn_unit: str = "group",
    prune_mlp: bool = False,
    round_to: int = 1,
    same_in_every_layer: bool = False,
    target_params: int | None = None,
) -> tuple[PlanOptions, list[float], list[LayerUnits]]:
    """Layer scores -> (options with the final ratio, per-layer rates, per-layer units).

    With `target_params`, the ratio is solved so that the pruned model has about
    that many parameters (counted exactly from the planned shapes).
    """
    shapes = list(cost.shapes)

    def plan_for(ratio: float) -> tuple[list[float], list[LayerUnits]]:
        return plan_units(
            scores, shapes, replace(options, ratio=ratio), attn_unit, prune_mlp, round_to, same_in_every_layer
        )

    if target_params is not None:

        def count(ratio: float) -> int:
            # ratios under min_rate are not plans; the smallest real one is min_rate
            units = plan_for(ratio if ratio == 0 or ratio >= options.min_rate else options.min_rate)[1]
            return cost.count([units_cost(cost, i, u) for i, u in enumerate(units)])

        options = replace(options, ratio=solve_ratio_for_parameters(target_params, count, options.max_rate))
    rates, units = plan_for(options.ratio)
    return options, rates, units
