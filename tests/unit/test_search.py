"""The searched allocation: the level ladder keeps the budget, the search finds a known best, a rerun resumes."""

from __future__ import annotations

import json
import random

import pytest
import torch

from llmprune.engine.pruning.allocate.cost import ParameterCost
from llmprune.engine.pruning.allocate.level import REMOVED, Level
from llmprune.engine.pruning.allocate.levels import Ladder
from llmprune.engine.pruning.allocate.search import (
    KLFitness,
    SearchOptions,
    _channel_move,
    _depth_move,
    _exchange,
    _group_move,
    evolve,
    mutate,
)
from llmprune.engine.pruning.cut.level_database import LevelDatabase
from llmprune.engine.pruning.search_path import cut_in_order, prune_searched
from llmprune.engine.walk.layer_store import runner_for
from tests.conftest import make_tiny_model


def _ladder(model, step: int = 8, depth: bool = True) -> Ladder:
    last = len(model.model.layers) - 1
    return Ladder.of_cost(ParameterCost.of_model(model), True, step, depth=depth, protected=frozenset({0, last}))


def _layer_params(model) -> int:
    return sum(p.numel() for layer in model.model.layers for p in layer.parameters())


def test_the_cost_model_counts_what_the_layers_hold():
    model = make_tiny_model(layers=3)
    for layer in model.model.layers:  # the biases compensation adds are part of the cost
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            linear.bias = torch.nn.Parameter(torch.zeros(linear.out_features))
    ladder = _ladder(model)
    assert ladder.params([ladder.full(i) for i in range(3)]) == _layer_params(model)
    assert ladder.params([REMOVED, ladder.full(1), ladder.full(2)]) == _layer_params(model) - sum(
        p.numel() for p in model.model.layers[0].parameters()
    )


def test_every_exchange_keeps_the_total_exact_and_every_move_fits():
    model = make_tiny_model(layers=5)
    ladder = _ladder(model)
    budget = int(0.8 * ladder.params([ladder.full(i) for i in range(5)]))
    uniform = ladder.uniform(budget)
    assert ladder.fits(uniform, budget)
    assert budget - ladder.tolerance < ladder.params(uniform) <= budget
    # one step down in one layer and one up in another: the same total, for every pair and both kinds
    for move in (_channel_move, _group_move):
        for down in range(5):
            for up in range(5):
                trial = list(uniform)
                if down != up and move(trial, ladder, down, +1) and move(trial, ladder, up, -1):
                    assert ladder.params(trial) == ladder.params(uniform)
    rng = random.Random(0)
    for _ in range(200):
        child = list(uniform)
        for mover in (
            lambda a: _exchange(a, ladder, rng, _channel_move),
            lambda a: _depth_move(a, ladder, budget, rng),
        ):
            if mover(child):
                assert ladder.fits(child, budget)
    children = [mutate(uniform, ladder, budget, rng, SearchOptions(generations=1)) for _ in range(50)]
    assert all(ladder.fits(c, budget) for c in children if c is not None)
    assert any(any(lv.removed for lv in c) for c in children if c is not None)  # depth competes too


def _database(model, ids):
    database = LevelDatabase(list(model.model.layers))
    database.measure(model.model.embed_tokens(ids), runner_for(model, ids.shape[1]))
    return database


def test_installing_the_full_level_gives_the_dense_model_back_and_a_level_has_its_shapes():
    model = make_tiny_model(layers=2)
    ids = torch.randint(0, 384, (8, 16))
    with torch.no_grad():
        dense = model(ids).logits
    database = _database(model, ids)
    database.install(1, Level(1, 64))
    layer = model.model.layers[1]
    assert layer.self_attn.k_proj.out_features == layer.self_attn.head_dim
    assert layer.mlp.down_proj.weight.shape == (64, 64)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, dense)
        database.restore_dense()
        assert torch.equal(model(ids).logits, dense)


def test_the_fitness_is_zero_for_the_dense_model_and_grows_with_the_cut():
    model = make_tiny_model(layers=3)
    ids = torch.randint(0, 384, (8, 16))
    database = _database(model, ids)
    fitness = KLFitness(model, runner_for(model, 16), database, torch.randint(0, 384, (8, 16)), top_k=16)
    full = [Level(2, 128)] * 3
    assert fitness(full, range(8)) == pytest.approx(0.0, abs=1e-6)
    light, heavy = fitness([Level(2, 96)] * 3, range(8)), fitness([Level(1, 32)] * 3, range(8))
    assert 0 < light < heavy


def _redundant_layer_model():
    """Layer 2 of 6 adds nothing to the residual stream: removing it is free, the known best allocation."""
    model = make_tiny_model(layers=6)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    return model


def test_the_search_finds_the_layer_that_can_go():
    model = _redundant_layer_model()
    cut, held_out = torch.randint(0, 384, (16, 16)), torch.randint(0, 384, (16, 16))
    one_layer = sum(p.numel() for p in model.model.layers[2].parameters()) + 2 * 64  # with the biases it would get
    outcome = prune_searched(model, cut, held_out, one_layer, SearchOptions(generations=25, seed=0), depth=True)
    assert outcome.dropped_layers == [2]
    assert outcome.search.fitness < 0.05 * outcome.search.start_fitness["uniform"]
    assert not outcome.search.kept_start
    assert len(model.model.layers) == 5


def test_the_pruned_model_lands_on_the_budget():
    model = make_tiny_model(layers=4)
    before = sum(p.numel() for p in model.parameters())
    cut, held_out = torch.randint(0, 384, (16, 16)), torch.randint(0, 384, (16, 16))
    outcome = prune_searched(model, cut, held_out, int(0.2 * before), SearchOptions(generations=3))
    removed = before - sum(p.numel() for p in model.parameters())
    assert int(0.2 * before) <= removed < int(0.2 * before) + outcome.tolerance
    with torch.no_grad():
        assert torch.isfinite(model(cut[:2]).logits).all()


def test_the_searched_model_is_the_dense_model_cut_in_order_at_the_chosen_sizes():
    """The search installs levels into the live model; the result is cut afresh from the dense weights, as the default
    cuts, with the refit on windows of its own when they are given."""
    import copy

    model = make_tiny_model(layers=4)
    dense = copy.deepcopy(model)
    cut, held_out, refit = (torch.randint(0, 384, (n, 16)) for n in (16, 16, 24))
    asked = []

    def refit_windows(needed: int) -> torch.Tensor:
        asked.append(needed)
        return refit

    share = int(0.2 * sum(p.numel() for p in model.parameters()))
    outcome = prune_searched(model, cut, held_out, share, SearchOptions(generations=3), refit_windows=refit_windows)
    assert asked and outcome.refit_samples == 24
    dropped, _, refit_samples = cut_in_order(dense, cut, outcome.search.allocation, refit_windows=lambda n: refit)
    assert (dropped, refit_samples) == (outcome.dropped_layers, 24)
    pruned, fresh = model.state_dict(), dense.state_dict()
    assert pruned.keys() == fresh.keys()
    for name, tensor in pruned.items():
        assert torch.equal(tensor, fresh[name]), name


def test_a_rerun_resumes_from_the_saved_generation(tmp_path):
    model = make_tiny_model(layers=4)
    ids = torch.randint(0, 384, (8, 16))
    database = _database(model, ids)
    ladder = _ladder(model, depth=False)
    budget = int(0.8 * ladder.params([ladder.full(i) for i in range(4)]))
    fitness = KLFitness(model, runner_for(model, 16), database, torch.randint(0, 384, (16, 16)), top_k=16)
    starts = {"uniform": ladder.uniform(budget)}
    state = tmp_path / "search.json"
    first = evolve(ladder, budget, fitness, 16, starts, SearchOptions(generations=2), state)
    assert state.is_file() and first.generations == 2
    resumed = evolve(ladder, budget, fitness, 16, starts, SearchOptions(generations=4), state)
    assert resumed.resumed_from == 2 and resumed.generations == 4
    assert resumed.curve[:2] == first.curve
    fresh = evolve(ladder, budget, fitness, 16, starts, SearchOptions(generations=4), tmp_path / "other.json")
    assert [c["fitness"] for c in fresh.curve] == pytest.approx([c["fitness"] for c in resumed.curve])


def test_the_start_is_kept_when_the_search_won_only_on_a_few_windows():
    """Every child beats the start on the selection stages' few windows, none on all of them: the start stays."""
    ladder = _ladder(make_tiny_model(layers=4), depth=False)
    budget = int(0.8 * ladder.params([ladder.full(i) for i in range(4)]))
    start = ladder.uniform(budget)

    def fitness(allocation, windows) -> float:
        is_start = list(allocation) == start
        return float(not is_start) if len(windows) == 32 else float(is_start)

    outcome = evolve(ladder, budget, fitness, 32, {"uniform": start}, SearchOptions(generations=3))
    assert all(c["accepted"] for c in outcome.curve)  # the stages were fooled every generation
    assert outcome.kept_start and outcome.allocation == start and outcome.fitness == 0.0


def test_too_few_held_out_windows_and_no_bound_are_refused():
    model = make_tiny_model(layers=2)
    ids = torch.randint(0, 384, (8, 16))
    database = _database(model, ids)
    ladder = _ladder(model, depth=False)
    fitness = KLFitness(model, runner_for(model, 16), database, ids[:4], top_k=16)
    starts = {"uniform": ladder.uniform(ladder.params([ladder.full(0), ladder.full(1)]) - 500)}
    with pytest.raises(ValueError, match="held-out windows"):
        evolve(ladder, 10**9, fitness, 4, starts, SearchOptions(generations=1))
    with pytest.raises(ValueError, match="bound"):
        evolve(ladder, 10**9, fitness, 4, starts, SearchOptions())


def test_held_out_windows_share_no_token_with_the_cut_and_too_few_is_refused():
    from llmprune.engine.core.errors import UserInputError
    from llmprune.engine.data import held_out_windows, random_windows, window_starts

    ids = torch.arange(5000)  # every token is its own position
    cut = random_windows(ids, 10, 32, seed=0)
    avoid = window_starts(ids.numel(), 10, 32, seed=0)
    assert torch.equal(cut.ids[:, 0], torch.tensor(avoid))
    held = held_out_windows(ids, 40, 32, avoid, seed=1)
    used = set(cut.ids.flatten().tolist())
    assert held.ids.shape == (40, 32) and not used & set(held.ids.flatten().tolist())
    assert len(set(held.ids.flatten().tolist())) == 40 * 32  # nor with each other
    with pytest.raises(UserInputError, match="held-out windows"):
        held_out_windows(ids, 200, 32, avoid, seed=1)


def test_a_level_round_trips_through_its_saved_form():
    for level in (Level(2, 96), REMOVED, Level(3, 128, heads_per_group=2)):
        assert Level.from_dict(json.loads(json.dumps(level.to_dict()))) == level
    assert Level(2, 96).to_dict() == {"groups": 2, "channels": 96}  # the search state's form, as before
