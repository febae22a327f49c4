"""The searched path: cut every layer once at a ladder of levels, search the allocation, assemble the model.

`prune_searched` ties `allocate.levels` (the level database built from one
dense pass over the cut windows) and `allocate.search` (the evolutionary
search, judged by KL to the dense model on *held-out* windows) to a loaded
model, then leaves the model at the chosen levels: KV groups and MLP
channels kept as the greedy OBS order says, o_proj and down_proj refitted
(least squares, or bias compensation), and the layers the search removed
dropped whole.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.progress import StageProgress
from llmprune.engine.io.architecture import layer_shapes
from llmprune.engine.pruning.allocate.levels import Ladder, Level, LevelDatabase, ladder_step
from llmprune.engine.pruning.allocate.search import KLFitness, SearchOptions, SearchOutcome, evolve
from llmprune.engine.pruning.allocation import LayerUnits, layer_parameters
from llmprune.engine.pruning.layer_pass import LayerReport
from llmprune.engine.pruning.reconstruction import ensure_bias
from llmprune.engine.walk.layer_store import runner_for

__all__ = ["SearchedOutcome", "prune_searched", "layer_cost"]


@dataclass
class SearchedOutcome:
    """What `prune_searched` did."""

    dropped_layers: list[int]
    reports: list[LayerReport]
    search: SearchOutcome
    budget: int  # parameters the decoder layers may keep
    tolerance: int  # how far under the budget the allocation may land


def layer_cost(model: nn.Module, compensated: bool) -> Callable[[int, int | None, int | None], int]:
    """Parameters of layer i keeping g KV groups and c channels (0 when removed), output biases included
    when compensation adds them (it gives every kept layer one, pruned or not)."""
    shapes = layer_shapes(model)
    layer = model.model.layers[0]
    qkv_bias, mlp_bias = layer.self_attn.q_proj.bias is not None, layer.mlp.gate_proj.bias is not None
    hidden = model.config.hidden_size
    if compensated:
        shapes = [replace(s, o_proj_bias=True, down_proj_bias=True) for s in shapes]

    def cost(index: int, groups: int | None, channels: int | None) -> int:
        if groups is None or channels is None:
            return 0
        s = shapes[index]
        units = LayerUnits(groups, groups * (s.num_attention_heads // s.num_key_value_heads), channels)
        return layer_parameters(hidden, s, units, qkv_bias, mlp_bias)

    return cost


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
) -> SearchedOutcome:
    """Measure, search and assemble; the model is pruned in place."""
    layers = list(model.model.layers)
    cost = layer_cost(model, compensation != "none")
    dense_params = sum(sum(p.numel() for p in layer.parameters()) for layer in layers)
    budget = dense_params - params_to_remove
    channels = [layer.mlp.down_proj.in_features for layer in layers]
    kv_heads = [layer.self_attn.k_proj.out_features // layer.self_attn.head_dim for layer in layers]
    ladder = Ladder(
        kv_heads, channels, ladder_step(min(channels)), cost, attention=attention, depth=depth,
        protected=frozenset({0, len(layers) - 1}),
    )  # fmt: skip
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
    ranked = global_start(database, ladder, budget, params_to_remove + _added_biases(model, compensation))
    if ranked is not None:
        starts["global"] = ranked

    def report(generation: int, best: float, left: float | None) -> None:
        if progress:
            eta = f", ETA {left / 60:.1f} min" if left is not None else ""
            progress(f"search (KL {best:.4f}{eta})", generation, options.generations or generation + 1)

    outcome = evolve(
        ladder, budget, fitness, select_ids.shape[0], starts, options, state_path, report,
        tokens_spent=lambda: fitness.tokens, signature_extra=signature,
    )  # fmt: skip
    return SearchedOutcome(
        *assemble(model, database, outcome.allocation, compensation), outcome, budget, ladder.tolerance
    )


def _added_biases(model: nn.Module, compensation: str) -> int:
    if compensation == "none":
        return 0
    return sum(
        p.out_features for layer in model.model.layers for p in (layer.self_attn.o_proj, layer.mlp.down_proj)
        if p.bias is None
    )  # fmt: skip


def global_start(database: LevelDatabase, ladder: Ladder, budget: int, to_remove: int) -> list[Level] | None:
    """The global ranking's allocation (the default prune's), on the ladder and fitted to the budget."""
    import random

    from llmprune.engine.pruning.allocate.search import _rebalance
    from llmprune.engine.pruning.calibrated import LayerScores, allocate

    scores = []
    for i in range(ladder.num_layers):
        group_params = ladder.cost(i, 2, 1) - ladder.cost(i, 1, 1)
        channel_params = ladder.cost(i, 1, 2) - ladder.cost(i, 1, 1)
        scores.append(
            LayerScores(database.group_scores[i], database.channel_scores[i], group_params, channel_params,
                        database.input_energy[i])
        )  # fmt: skip
    plans = allocate(scores, to_remove, ladder.attention, 1 - ladder.min_channel_share)
    allocation = []
    for i, plan in enumerate(plans):
        levels = ladder.channel_levels(i)
        nearest = min(levels, key=lambda c: abs(c - plan.keep_channels))
        allocation.append(Level(max(1, plan.keep_groups), nearest))
    return allocation if _rebalance(allocation, ladder, budget, random.Random(0)) else None


def refit_in_order(
    model: nn.Module, cut_ids: torch.Tensor, allocation: list[Level], compensation: str = "lstsq", batch_size: int = 8
) -> tuple[list[int], list[LayerReport]]:
    """The default prune's pass at the searched sizes: drop the removed layers, then cut and refit each layer on
    the inputs it really receives from the layers pruned before it (`layer_pass.prune_layers`)."""
    from llmprune.engine.pruning.depth import drop_layers
    from llmprune.engine.pruning.layer_pass import LayerPlan, prune_layers
    from llmprune.engine.walk.layer_store import InMemoryLayers

    dropped = [i for i, lv in enumerate(allocation) if lv.removed]
    if dropped:
        drop_layers(model, dropped)
    plans = [LayerPlan(lv.groups, lv.channels) for lv in allocation if not lv.removed]
    runner = runner_for(model, cut_ids.shape[1], batch_size)
    reports = prune_layers(InMemoryLayers(model), cut_ids, runner, plans, "obs", compensation)
    return dropped, reports


@torch.no_grad()
def assemble(
    model: nn.Module, database: LevelDatabase, allocation: list[Level], compensation: str
) -> tuple[list[int], list[LayerReport]]:
    """Leave the model at these levels: install each, give kept layers their output biases, drop removed layers."""
    from llmprune.engine.pruning.depth import drop_layers

    reports = []
    dropped = [i for i, lv in enumerate(allocation) if lv.removed]
    for index, level in enumerate(allocation):
        if level.removed:
            continue
        database.install(index, level)
        layer = database.layers[index]
        if compensation != "none":
            ensure_bias(layer.self_attn.o_proj)
            ensure_bias(layer.mlp.down_proj)
        full_groups, full_channels = database._counts(index)[1], database.dense[index]["down"][0].shape[1]
        channels = database.kept_channels(index, level.channels)
        reports.append(
            LayerReport(
                index=index - sum(1 for d in dropped if d < index),
                kept_groups=database.kept_groups(index, level.groups),
                kept_channels=level.channels,
                groups_before=full_groups,
                channels_before=full_channels,
                kept_channel_indices=channels if level.channels < full_channels else None,
                compensation={"o_proj": compensation, "down_proj": compensation},
            )
        )
    if dropped:
        drop_layers(model, dropped)
    return dropped, reports
