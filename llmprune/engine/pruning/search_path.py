"""The searched path: cut every layer once at a ladder of levels, search the allocation, cut the model to it.

`prune_searched` ties `cut.level_database` (the level database built from one
dense pass over the cut windows, on `allocate.levels`' ladder) and `allocate.search` (the evolutionary
search, judged by KL to the dense model on *held-out* windows) to a loaded
model, then cuts the dense model to the chosen sizes as the default prune
cuts (`cut_in_order`): the layers the search removed dropped whole, then
layer by layer the KV groups and MLP channels that the greedy OBS order
keeps, o_proj and down_proj refitted (least squares, or bias compensation)
on the inputs the layers pruned before pass on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.progress import DETAIL, StageProgress
from llmprune.engine.io.architecture import layer_shapes
from llmprune.engine.pruning.allocate.budget import Budget
from llmprune.engine.pruning.allocate.cost import ParameterCost
from llmprune.engine.pruning.allocate.level import Level
from llmprune.engine.pruning.allocate.levels import Ladder
from llmprune.engine.pruning.allocate.ranking import rank_units
from llmprune.engine.pruning.allocate.search import KLFitness, SearchOptions, SearchOutcome, evolve, rebalance
from llmprune.engine.pruning.config import DEFAULT_SEARCH_BUDGET, PruneConfig, parse_search_budget
from llmprune.engine.pruning.cut.depth import drop_layers
from llmprune.engine.pruning.cut.layer_pass import (
    LayerReport,
    RefitWindows,
    prune_layers,
    refit_ids_for,
    refit_window_count,
)
from llmprune.engine.pruning.cut.level_database import LevelDatabase
from llmprune.engine.pruning.global_path import GlobalOutcome, global_figures
from llmprune.engine.pruning.result import default_log_name
from llmprune.engine.pruning.scores.measure import LayerUnitScores
from llmprune.engine.walk.layer_store import InMemoryLayers, runner_for

__all__ = [
    "SearchedOutcome",
    "prune_searched",
    "prune_by_search",
    "cut_in_order",
    "search_space",
    "search_state_path",
]


def search_state_path(config: PruneConfig) -> Path:
    """Where the search keeps its state: next to the output (a rerun with the same output resumes from it)."""
    if config.out is not None:
        out = Path(config.out)
        return out.parent / f"{out.name}.search-state.json"
    return Path(config.log_dir) / f"{config.save_ckpt_log_name or default_log_name(config.model)}.search-state.json"


def search_options(config: PruneConfig) -> SearchOptions:
    kind, value = parse_search_budget(config.search_budget or DEFAULT_SEARCH_BUDGET)
    if kind == "seconds":
        return SearchOptions(budget_seconds=value, seed=config.calibration.seed)
    return SearchOptions(budget_tokens=int(value), seed=config.calibration.seed)


def prune_by_search(
    model: nn.Module,
    tokenizer,
    config: PruneConfig,
    budget: Budget,
    progress=None,
    refit_windows: RefitWindows | None = None,
):
    """The search path of `llmprune prune` on a loaded model: the default's cut windows, held-out windows from the
    same text, the search, the cut (its refit on `refit_windows`, as the default's), and the figures the report
    shows (as the global path reports them)."""
    from llmprune.engine.data import calibration_and_held_out

    calib = config.calibration
    # the cut windows are the default's; the held-out ones share no token with them
    cut, held_out = calibration_and_held_out(
        tokenizer, calib.dataset, calib.samples, config.search_windows, calib.seq_len, calib.seed, config.search_dataset
    )
    cost = ParameterCost.of_model(model)
    device = next(model.parameters()).device
    state_path = search_state_path(config)
    state_path.parent.mkdir(parents=True, exist_ok=True)
    outcome = prune_searched(
        model,
        cut.ids.to(device),
        held_out.ids.to(device),
        budget.params_to_remove(cost),
        search_options(config),
        compensation=config.compensation_kind,
        batch_size=calib.batch_size,
        state_path=state_path,
        progress=progress,
        signature={
            "model": str(config.model),
            "dataset": calib.dataset,
            "samples": calib.samples,
            "search_dataset": held_out.source,
        },
        refit_windows=refit_windows,
        correction=config.residual_correction,
    )
    outcome.state_path = str(state_path)
    done = GlobalOutcome(cost, outcome.dropped_layers, [], [], outcome.reports)
    return outcome, global_figures(budget, done, layer_shapes(model))


@dataclass
class SearchedOutcome:
    """What `prune_searched` did."""

    dropped_layers: list[int]
    reports: list[LayerReport]
    search: SearchOutcome
    budget: int  # parameters the decoder layers may keep
    tolerance: int  # how far under the budget the allocation may land
    state_path: str | None = None
    refit_samples: int | None = None  # the windows the final cut's refit ran on

    def to_dict(self) -> dict:
        """What report.json records of the search."""
        return {
            **self.search.to_dict(),
            "state": self.state_path,
            "budget_params": self.budget,
            "tolerance_params": self.tolerance,
        }


def prune_searched(
    model: nn.Module,
    cut_ids: torch.Tensor,
    select_ids: torch.Tensor,
    params_to_remove: int,
    options: SearchOptions,
    compensation: str = "lstsq",
    attention: bool = True,
    depth: bool = True,
    batch_size: int = 8,
    state_path: Path | None = None,
    progress: StageProgress | None = None,
    extra_starts: dict[str, list[Level]] | None = None,
    signature: dict | None = None,
    refit_windows: RefitWindows | None = None,
    correction: float = 0.0,
) -> SearchedOutcome:
    """Measure, search, then cut the dense model at the chosen sizes (`cut_in_order`); the model is pruned in
    place. `refit_windows`: where the final cut's refit windows come from (`layer_pass.RefitWindows`);
    `correction`: the final cut's residual correction (`layer_pass.prune_layers`)."""
    layers = list(model.model.layers)
    cost, ladder, budget = search_space(model, params_to_remove, compensation, attention, depth)
    try:
        uniform = ladder.uniform(budget)
    except ValueError:
        raise UserInputError(
            f"the parameter target cannot be reached by the search ({params_to_remove:,} parameters asked)",
            "ask for a larger model",
        ) from None
    runner = runner_for(model, cut_ids.shape[1], batch_size)
    database = LevelDatabase(layers, refit=compensation == "lstsq")
    with torch.no_grad():
        database.measure(
            model.model.embed_tokens(cut_ids), runner, progress and (lambda d, t: progress("levels", d, t))
        )
    fitness = KLFitness(model, runner_for(model, select_ids.shape[1], batch_size), database, select_ids)
    starts = {"uniform": uniform, **(extra_starts or {})}
    ranked = global_start(database, ladder, cost, budget, params_to_remove, compensation)
    if ranked is not None:
        starts["global"] = ranked

    def report(generation: int, best: float, left: float | None) -> None:
        if progress:
            eta = f", ETA {max(left, 0.0) / 60:.1f} min" if left is not None else ""
            progress(
                f"search{DETAIL}generation {generation}, KL {best:.4f}{eta}",
                generation,
                options.generations or generation + 1,
            )

    outcome = evolve(
        ladder, budget, fitness, select_ids.shape[0], starts, options, state_path, report,
        tokens_spent=lambda: fitness.tokens, signature_extra=signature,
    )  # fmt: skip
    # The chosen sizes are cut as the default cuts, not assembled from the database's levels: each layer's
    # units chosen and refitted on the inputs the layers pruned before it really pass on, the refit on its own
    # windows where those are given. SmolLM2 at 20 %, the sizes of one search (benchmarks/results/
    # search_assembly.json, search_quality.json): 79.08 / 53.96 wiki / pydoc PPL assembled, 77.31 / 55.16 cut
    # in order, 74.54 / 53.05 with the refit on 256 windows.
    database.restore_dense()
    fitness = database = None  # their Gram matrices and cached dense logits go before the pass gathers its own
    dropped, reports, refit_samples = cut_in_order(
        model, cut_ids, outcome.allocation, compensation, batch_size, refit_windows, progress, correction
    )
    return SearchedOutcome(dropped, reports, outcome, budget, ladder.tolerance, refit_samples=refit_samples)


def search_space(
    model: nn.Module, params_to_remove: int, compensation: str = "lstsq", attention: bool = True, depth: bool = True
) -> tuple[ParameterCost, Ladder, int]:
    """The parameter-cost model, the ladder of levels and the decoder layers' budget that a search works in."""
    cost = ParameterCost.of_model(model)
    # the decoder layers' budget: what they hold now less what must go (compensation's biases are priced in)
    budget = sum(cost.layer(i) for i in range(cost.num_layers)) - params_to_remove
    ladder = Ladder.of_cost(
        cost, compensation != "none", attention=attention, depth=depth, protected=frozenset({0, cost.num_layers - 1})
    )
    return cost, ladder, budget


def global_start(
    database: LevelDatabase,
    ladder: Ladder,
    cost: ParameterCost,
    budget: int,
    params_to_remove: int,
    compensation: str = "lstsq",
) -> list[Level] | None:
    """The global ranking's allocation (the default prune's), on the ladder and fitted to the budget."""
    import random

    # the ranking removes units until the target is met, the output biases compensation adds included
    added = sum(cost.missing_output_biases(i) for i in range(cost.num_layers)) if compensation != "none" else 0
    to_remove = params_to_remove + added

    scores = [
        LayerUnitScores(database.group_scores[i], database.channel_scores[i], database.input_energy[i])
        for i in range(ladder.num_layers)
    ]
    plans = rank_units(scores, cost, to_remove, ladder.attention, 1 - ladder.min_channel_share)
    allocation = []
    for i, plan in enumerate(plans):
        levels = ladder.channel_levels(i)
        nearest = min(levels, key=lambda c: abs(c - plan.channels))
        allocation.append(Level(max(1, plan.groups), nearest))
    return allocation if rebalance(allocation, ladder, budget, random.Random(0)) else None


def cut_in_order(
    model: nn.Module,
    cut_ids: torch.Tensor,
    allocation: list[Level],
    compensation: str = "lstsq",
    batch_size: int = 8,
    refit_windows: RefitWindows | None = None,
    progress: StageProgress | None = None,
    correction: float = 0.0,
) -> tuple[list[int], list[LayerReport], int]:
    """The default prune's pass at the searched sizes, on the dense model: drop the removed layers, then cut and
    refit each layer on the inputs it really receives from the layers pruned before it
    (`cut.layer_pass.prune_layers`; the refit on `refit_windows`, with residual `correction`, as the default's is).

    Returns the dropped layers, what each kept layer's cut did and the windows the refit ran on.
    """
    dropped = [i for i, lv in enumerate(allocation) if lv.removed]
    kept_shapes = [shape for shape, lv in zip(layer_shapes(model), allocation, strict=True) if not lv.removed]
    plans = [level for level in allocation if not level.removed]
    refit_ids = refit_ids_for(refit_windows, compensation, kept_shapes, plans, cut_ids)
    if dropped:
        drop_layers(model, dropped)
    runner = runner_for(model, cut_ids.shape[1], batch_size)
    reports = prune_layers(
        InMemoryLayers(model),
        cut_ids,
        runner,
        plans,
        "obs",
        compensation,
        progress=progress,
        refit_ids=refit_ids,
        correction=correction,
    )
    return dropped, reports, refit_window_count(refit_ids, cut_ids)
