"""The global path: measure every unit of the dense model, rank them across all layers, prune to a budget.

Written once over a `walk.LayerStore`, so that the same body prunes a model in
memory (`InMemoryLayers`) and one streamed from disk (`streaming.StreamedLayers`):
`scores.measure.measure_units` (the dense model's unit scores and block
influence), `allocate.ranking.rank_units` (how many units each layer keeps, at
the cost `allocate.cost.ParameterCost` says) and `cut.layer_pass.prune_layers`
(the one pruning pass). `prune_globally` adds depth pruning (whole layers, in
memory) before the width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.progress import StageProgress
from llmprune.engine.io.architecture import LayerShape
from llmprune.engine.pruning.allocate.budget import Budget
from llmprune.engine.pruning.allocate.cost import ParameterCost
from llmprune.engine.pruning.allocate.level import Level
from llmprune.engine.pruning.allocate.ranking import least_influential, rank_units, removed_parameters
from llmprune.engine.pruning.config import DEFAULT_COMPENSATION, DEFAULT_RESIDUAL_CORRECTION
from llmprune.engine.pruning.cut.layer_pass import (  # noqa: F401 (RefitWindows re-exported)
    LayerReport,
    RefitWindows,
    prune_layers,
    refit_ids_for,
    refit_window_count,
)
from llmprune.engine.pruning.cut.prune_model import LayerChange
from llmprune.engine.pruning.result import after_by_index
from llmprune.engine.pruning.scores.defaults import DEFAULT_UNIT_SCORE
from llmprune.engine.pruning.scores.measure import LayerUnitScores, measure_units
from llmprune.engine.walk.layer_store import (  # noqa: F401 (re-exported)
    InMemoryLayers,
    LayerRunner,
    LayerStore,
    runner_for,
)

__all__ = [
    "CalibratedPruneOptions",
    "RefitWindows",
    "GlobalOutcome",
    "cost_of",
    "prune_to_target",
    "allocate_globally",
    "prune_globally",
    "prune_loaded_model",
    "global_figures",
    "layer_changes",
]


@dataclass
class CalibratedPruneOptions:
    """How `prune_to_target` chooses, cuts and compensates."""

    unit_score: str = DEFAULT_UNIT_SCORE
    """Which units of a layer to keep: obs | fluctuation | activation | magnitude (scores.units.UNIT_SCORES)."""
    compensation: str = DEFAULT_COMPENSATION
    """What to do for the removed units: none | bias (their mean, into the output bias) | lstsq (refit
    o_proj/down_proj).
    """
    allocation: str = "global"
    """How many units each layer keeps (allocate.ranking.RANKINGS): global (rank all units of all layers) |
    even-mlp (the same MLP share everywhere, attention untouched)."""
    attention: bool = True
    """Also remove whole KV groups (else MLP channels only)."""
    max_channel_ratio: float = 0.8
    """At most this share of a layer's MLP channels goes."""
    damping: float = 1e-3
    """Ridge added to the least-squares normal equations, relative to their mean diagonal."""
    correction: float = DEFAULT_RESIDUAL_CORRECTION
    """Residual correction (0–1): how much of the pruned model's drift from the dense model's residual stream each
    least-squares refit also takes away (`cut.layer_pass.prune_layers`)."""


def cost_of(store: LayerStore) -> ParameterCost:
    """The parameter-cost model of the model behind `store` (in memory, or streamed: counted on disk)."""
    if isinstance(store, InMemoryLayers):
        return ParameterCost.of_model(store.model)
    from llmprune.engine.walk.streaming import parameter_count

    return ParameterCost.of_model(store.skeleton, total=parameter_count(store.directory))


def prune_to_target(
    store: LayerStore,
    ids: torch.Tensor,
    runner: LayerRunner,
    params_to_remove: int,
    options: CalibratedPruneOptions | None = None,
    progress: StageProgress | None = None,
    cost: ParameterCost | None = None,
    refit_windows: RefitWindows | None = None,
) -> tuple[list[LayerUnitScores], list[Level], list[LayerReport], int]:
    """Measure the dense model, allocate the cut, then prune layer by layer.

    Returns the scores, the allocation, what each layer's cut did, and the windows the refit ran on.
    """
    options = options or CalibratedPruneOptions()
    cost = cost or cost_of(store)
    scores, plans = allocate_globally(store, ids, runner, params_to_remove, options, progress, cost)
    refit_ids = refit_ids_for(refit_windows, options.compensation, cost.shapes, plans, ids)
    store.begin_pruning()
    reports = prune_layers(
        store,
        ids,
        runner,
        plans,
        options.unit_score,
        options.compensation,
        options.damping,
        progress,
        refit_ids,
        options.correction,
    )
    return scores, plans, reports, refit_window_count(refit_ids, ids)


def allocate_globally(
    store: LayerStore,
    ids: torch.Tensor,
    runner: LayerRunner,
    params_to_remove: int,
    options: CalibratedPruneOptions | None = None,
    progress: StageProgress | None = None,
    cost: ParameterCost | None = None,
) -> tuple[list[LayerUnitScores], list[Level]]:
    """The dense model's unit scores and how many units each layer keeps (nothing is cut yet)."""
    options = options or CalibratedPruneOptions()
    cost = cost or cost_of(store)
    scores = measure_units(store, ids, runner, options.unit_score, progress)
    # the output biases compensation adds count against the budget
    added = (
        sum(cost.missing_output_biases(i) for i in range(cost.num_layers))
        if options.compensation != "none" and params_to_remove > 0
        else 0
    )
    plans = rank_units(
        scores, cost, params_to_remove + added, options.attention, options.max_channel_ratio, options.allocation
    )
    removable = removed_parameters(cost, scores, plans)
    if removable < params_to_remove + added:
        raise UserInputError(
            f"the parameter target cannot be reached: at most {removable - added:,} parameters can go"
            f" ({params_to_remove:,} asked; every layer keeps one KV group and {1 - options.max_channel_ratio:.0%} of"
            " its MLP channels)",
            "ask for a larger model, or add --drop-layers to remove whole layers",
        )
    return scores, plans


@dataclass
class GlobalOutcome:
    """What `prune_globally` did."""

    cost: ParameterCost  # of the model before anything was removed
    dropped_layers: list[int]  # original indices of the decoder layers removed whole
    scores: list[LayerUnitScores]  # of the layers that remained, measured on the dense model
    plans: list[Level]
    reports: list[LayerReport]
    refit_samples: int = 0  # calibration windows the refit was fitted on (0: nothing was cut)


CalibratedOutcome = GlobalOutcome  # the name it had before the pruning package had its wings


def prune_globally(
    store: LayerStore,
    ids: torch.Tensor,
    runner: LayerRunner,
    budget: Budget,
    options: CalibratedPruneOptions | None = None,
    progress: StageProgress | None = None,
    refit_windows: RefitWindows | None = None,
) -> GlobalOutcome:
    """The global path on any store: drop the budget's whole layers (in memory only), then prune units to the
    rest of the budget."""
    options = options or CalibratedPruneOptions()
    cost = before = cost_of(store)
    params_to_remove = budget.params_to_remove(cost)
    dropped: list[int] = []
    if budget.drop_layers > 0:
        if not isinstance(store, InMemoryLayers):
            raise ValueError("depth pruning needs the model in memory")
        from llmprune.engine.pruning.cut.depth import drop_layers

        influence = [s.influence for s in measure_units(store, ids, runner, "magnitude", progress)]
        dropped = least_influential(influence, budget.drop_layers)
        drop_layers(store.model, dropped)
        cost = cost_of(store)
        params_to_remove -= before.total - cost.total
    if params_to_remove > 0:
        return GlobalOutcome(
            before,
            dropped,
            *prune_to_target(store, ids, runner, params_to_remove, options, progress, cost, refit_windows),
        )
    return GlobalOutcome(before, dropped, [], [], [])


def prune_loaded_model(
    model: torch.nn.Module,
    ids: torch.Tensor,
    budget: Budget,
    options: CalibratedPruneOptions | None = None,
    batch_size: int = 8,
    progress: StageProgress | None = None,
    refit_windows: RefitWindows | None = None,
) -> GlobalOutcome:
    """`prune_globally` on a model in memory."""
    runner = runner_for(model, ids.shape[1], batch_size)
    return prune_globally(InMemoryLayers(model), ids, runner, budget, options, progress, refit_windows)


# ---------------------------------------------------------------- what the global path reports


def global_figures(budget: Budget, outcome: GlobalOutcome, after: list[LayerShape]) -> dict:
    """What the global path reports, in memory or streamed: sizes, shares, per-layer changes and rates."""
    cost = outcome.cost
    changes, rates = layer_changes(cost, after, outcome.dropped_layers, outcome.reports)
    target = budget.target(cost.total)
    return {
        # the budget as a share of the prunable parameters, like --ratio (solved from --target-params)
        "ratio": budget.resolved_ratio if target is None else (cost.total - target) / cost.prunable(),
        "removed_share_prunable": cost.prunable_share_removed(after_by_index(changes, cost.num_layers)),
        "params_before": cost.total,
        "layers": changes,
        "rates": rates,
    }


def layer_changes(
    cost: ParameterCost, after: list[LayerShape], dropped: list[int], reports
) -> tuple[list[LayerChange], list[float]]:
    """Per remaining layer: its change (original index) and the share of its prunable parameters removed."""
    before = cost.shapes
    kept = [i for i in range(len(before)) if i not in set(dropped)]
    by_index = {kept[r.index]: r for r in reports}
    changes, rates = [], []
    for new_index, old_index in enumerate(kept):
        report, was, now = by_index.get(old_index), before[old_index], after[new_index]
        ratio_heads = was.num_attention_heads // was.num_key_value_heads
        heads = [g * ratio_heads + j for g in report.kept_groups for j in range(ratio_heads)] if report else None
        changes.append(
            LayerChange(
                old_index,
                was,
                now,
                heads,
                report.kept_channel_indices if report else None,
                dict(report.compensation) if report else {},
            )
        )
        rates.append(1 - cost.prunable_of(now) / cost.prunable_of(was))
    return changes, rates
