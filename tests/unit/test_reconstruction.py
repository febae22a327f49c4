"""Compensation and the fluctuation score inside pruning.prune_model (the plan path of `llmprune prune`)."""

from __future__ import annotations

import torch

from conftest import make_tiny_model
from llmprune.engine.pruning import compensation as comp
from llmprune.engine.pruning.allocation import LayerUnits
from llmprune.engine.data import TokenWindows
from llmprune.engine.pruning.importance import collect_activations, get_unit_importance
from llmprune.engine.pruning.layerwise import capture_layer_inputs
from llmprune.engine.pruning.prune_model import prune_model
from llmprune.engine.pruning.reconstruction import compensation_step


def _windows(count: int, seed: int) -> TokenWindows:
    ids = torch.randint(0, 384, (count, 32), generator=torch.Generator().manual_seed(seed))
    return TokenWindows(ids, "random", ids.numel())


def test_fluctuation_is_registered_and_scores_the_output_variance():
    model = make_tiny_model()
    layer = model.model.layers[1]
    batches = capture_layer_inputs(model, _windows(4, 0), batch_size=4)
    batches[0].hidden = model.model.layers[0](batches[0].hidden, **batches[0].layer_kwargs)
    acts, _ = collect_activations(layer, batches)
    with comp.record_inputs(layer.mlp.down_proj, gram=False) as stats, torch.no_grad():
        layer(batches[0].hidden, **batches[0].layer_kwargs)
    scores = get_unit_importance("fluctuation").mlp_channel_scores(layer, acts)
    torch.testing.assert_close(scores.double(), comp.fluctuation(layer.mlp.down_proj.weight, stats), rtol=1e-3, atol=1e-6)


def test_least_squares_step_tracks_the_dense_model_better_than_no_compensation():
    calibration, held_out = _windows(64, 0), _windows(8, 1).ids
    dense = make_tiny_model()
    with torch.no_grad():
        reference = dense(held_out).logits
    plan = [LayerUnits(kv_heads=1, heads=4, intermediate_size=64)] * 4
    errors = {}
    for kind in ("none", "lstsq"):
        model = make_tiny_model()
        step = compensation_step(kind) if kind != "none" else None
        prune_model(model, plan, calibration, "fluctuation", compensation=step, gram=kind == "lstsq", batch_size=16)
        assert all(layer.self_attn.o_proj.bias is not None for layer in model.model.layers) == (kind == "lstsq")
        with torch.no_grad():
            errors[kind] = float((model(held_out).logits - reference).pow(2).mean())
    assert errors["lstsq"] < errors["none"]
