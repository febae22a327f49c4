"""Layer scores -> a per-layer plan of units (the plan path's allocation, shared by analyze, prune and the sweep)."""

from __future__ import annotations

from dataclasses import replace

import torch

from llmprune.engine.io.architecture import LayerShape
from llmprune.engine.pruning.allocation import (
    LayerUnits,
    ParameterModel,
    PlanOptions,
    layer_parameters,
    layer_rates,
    solve_ratio_for_parameters,
    unit_counts,
)
from llmprune.engine.pruning.config import PruneConfig


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


def resolve_plan_options(config: PruneConfig, file_plan: dict, num_layers: int) -> PlanOptions:
    """Explicit option > the importance config's > the default; --uniform overrides the layer range and strategy."""

    # the file's layer_end may be null (its default), which must stay null rather than fall back
    from_file = PlanOptions(**{k: v for k, v in file_plan.items() if k in PlanOptions.__dataclass_fields__})
    options = from_file.with_overrides(
        ratio=config.ratio,
        strategy=config.strategy,
        alpha=config.alpha,
        min_rate=config.min_rate,
        max_rate=config.max_rate,
        layer_start=config.layer_start,
        layer_end=config.layer_end,
    )
    if config.uniform:
        options = replace(options, strategy="uniform", layer_start=0, layer_end=num_layers)
    return options


def parameter_model(model: torch.nn.Module, shapes: list[LayerShape]) -> ParameterModel:
    layer = model.model.layers[0]
    qkv_bias, mlp_bias = layer.self_attn.q_proj.bias is not None, layer.mlp.gate_proj.bias is not None
    hidden = model.config.hidden_size
    totals = [
        layer_parameters(
            hidden, s, LayerUnits(s.num_key_value_heads, s.num_attention_heads, s.intermediate_size), qkv_bias, mlp_bias
        )
        for s in shapes
    ]
    return ParameterModel(sum(p.numel() for p in model.parameters()), hidden, shapes, qkv_bias, mlp_bias, totals)


def make_plan(
    scores: list[float],
    counter: ParameterModel,
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
    shapes = counter.shapes

    def plan_for(ratio: float) -> tuple[list[float], list[LayerUnits]]:
        return plan_units(
            scores, shapes, replace(options, ratio=ratio), attn_unit, prune_mlp, round_to, same_in_every_layer
        )

    if target_params is not None:

        def count(ratio: float) -> int:
            # ratios under min_rate are not plans; the smallest real one is min_rate
            return counter.count(plan_for(ratio if ratio == 0 or ratio >= options.min_rate else options.min_rate)[1])

        options = replace(options, ratio=solve_ratio_for_parameters(target_params, count, options.max_rate))
    rates, units = plan_for(options.ratio)
    return options, rates, units
