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
   count (bisection on the exact count of the resulting shapes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.io.architecture import LayerShape
from llmprune.engine.pruning.plan_options import ATTENTION_UNITS, STRATEGIES, PlanOptions  # noqa: F401 (re-exported)


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


# ---------------------------------------------------------------- parameter counts


def layer_parameters(hidden: int, shape: LayerShape, units: LayerUnits, qkv_bias: bool, mlp_bias: bool) -> int:
    """Parameters of one decoder layer with these units (projections, biases, the two norms)."""
    head_dim = shape.head_dim
    q = units.heads * head_dim
    kv = units.kv_heads * head_dim
    attention = hidden * (2 * q + 2 * kv) + (q + 2 * kv if qkv_bias else 0) + (hidden if shape.o_proj_bias else 0)
    width = units.intermediate_size
    mlp = 3 * hidden * width + (2 * width if mlp_bias else 0) + (hidden if shape.down_proj_bias else 0)
    return attention + mlp + 2 * hidden


@dataclass
class ParameterModel:
    """Enough about a model to count the parameters of any plan for it, without touching it."""

    total: int
    hidden_size: int
    shapes: list[LayerShape]
    qkv_bias: bool = False
    mlp_bias: bool = False
    layer_totals: list[int] = field(default_factory=list)

    def count(self, plan_units: Sequence[LayerUnits]) -> int:
        new = sum(
            layer_parameters(self.hidden_size, shape, units, self.qkv_bias, self.mlp_bias)
            for shape, units in zip(self.shapes, plan_units, strict=False)
        )
        return self.total - sum(self.layer_totals) + new


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


def parse_target_params(text: str, current_total: int) -> int:
    """'6.5B', '900M', '120000' (absolute), or a fraction ≤ 1 of the current model ('0.8' keeps 80 %)."""
    cleaned = str(text).strip().upper().replace("_", "").replace(",", "")
    multipliers = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
    try:
        if cleaned and cleaned[-1] in multipliers:
            value = float(cleaned[:-1]) * multipliers[cleaned[-1]]
        else:
            value = float(cleaned)
            if 0 < value <= 1:
                value *= current_total
    except ValueError:
        raise UserInputError(
            f"--target-params '{text}' is not a number", "use e.g. 6.5B, 110M or 0.8 (a fraction of the model)"
        ) from None
    if not (0 < value <= current_total) or math.isnan(value):
        raise UserInputError(
            f"--target-params {text} must be positive and at most the model's {current_total:,} parameters",
            "use e.g. 0.8 to keep 80 % of the parameters",
        )
    return int(round(value))
