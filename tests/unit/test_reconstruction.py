"""Compensation steps and the fluctuation score inside the one pruning pass (prune_model: the plan path of `llmprune
prune`).
"""

from __future__ import annotations

import torch
from conftest import make_tiny_model

from llmprune.engine.data import TokenWindows
from llmprune.engine.pruning.allocate.plan import LayerUnits
from llmprune.engine.pruning.cut.prune_model import prune_model
from llmprune.engine.pruning.scores import statistics
from llmprune.engine.pruning.scores.units import get_unit_score
from llmprune.engine.walk.layer_store import runner_for


def _windows(count: int, seed: int) -> TokenWindows:
    ids = torch.randint(0, 384, (count, 32), generator=torch.Generator().manual_seed(seed))
    return TokenWindows(ids, "random", ids.numel())


def test_fluctuation_scores_the_output_variance():
    model = make_tiny_model()
    layer = model.model.layers[1]
    runner = runner_for(model, 32, batch_size=4)
    with torch.no_grad():
        entering = runner.layer(model.model.layers[0], model.model.embed_tokens(_windows(4, 0).ids))
        with statistics.record_inputs(layer.mlp.down_proj, gram=False) as stats:
            runner.layer(layer, entering)
    scores = get_unit_score("fluctuation").mlp_channels(layer, stats)
    expected = stats.variance * layer.mlp.down_proj.weight.detach().double().pow(2).sum(0)
    torch.testing.assert_close(scores, expected)


def test_least_squares_step_tracks_the_dense_model_better_than_no_compensation():
    calibration, held_out = _windows(64, 0), _windows(8, 1).ids
    dense = make_tiny_model()
    with torch.no_grad():
        reference = dense(held_out).logits
    plan = [LayerUnits(kv_heads=1, heads=4, intermediate_size=64)] * 4
    errors = {}
    for kind in ("none", "lstsq"):
        model = make_tiny_model()
        outcome = prune_model(model, plan, calibration, "fluctuation", compensation=kind, batch_size=16)
        assert all(layer.self_attn.o_proj.bias is not None for layer in model.model.layers) == (kind == "lstsq")
        ran = {name for change in outcome.layers for name in change.compensation.values()}
        assert ran == ({"lstsq"} if kind == "lstsq" else set())
        with torch.no_grad():
            errors[kind] = float((model(held_out).logits - reference).pow(2).mean())
    assert errors["lstsq"] < errors["none"]


def test_a_refit_with_few_tokens_is_recorded_with_the_ridge_cross_validation_chose():
    model = make_tiny_model()
    plan = [LayerUnits(kv_heads=1, heads=4, intermediate_size=100)] * 4
    # 2 windows x 32 tokens = 64 tokens for 100 kept channels: the ridge is chosen, and the record says so
    outcome = prune_model(model, plan, _windows(2, 0), "fluctuation", compensation="lstsq", batch_size=2)
    for change in outcome.layers:
        recorded = change.compensation["down_proj"]
        assert recorded.startswith("lstsq (") and recorded.endswith(
            "chosen by cross-validation: 0.64 calibration tokens per kept input)"
        )
        assert change.to_dict()["compensation"] == change.compensation
