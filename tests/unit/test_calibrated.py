"""Calibrated layer-by-layer pruning on tiny random Llamas: runner, allocation, compensation, reload."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from llmprune.engine.io.architecture import layer_shapes
from llmprune.engine.io.checkpoint import save_model
from llmprune.engine.io.models import load_model
from llmprune.engine.pruning.allocate.cost import ParameterCost
from llmprune.engine.pruning.allocate.ranking import rank_units
from llmprune.engine.pruning.cut.layer_pass import widest_refitted_input
from llmprune.engine.pruning.cut.refit import DRAWN_TOKENS_PER_INPUT, windows_for_plain_refit
from llmprune.engine.pruning.global_path import CalibratedPruneOptions, InMemoryLayers, LayerRunner, prune_to_target
from llmprune.engine.pruning.scores.measure import measure_units

SEQ = 32


def _ids(count: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 384, (count, SEQ), generator=torch.Generator().manual_seed(seed))


def _runner(model) -> LayerRunner:
    return LayerRunner(model.config, model.model.rotary_emb, SEQ, torch.device("cpu"), torch.float32, batch_size=3)


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_runner_reproduces_the_models_forward():
    model, ids = make_tiny_model(), _ids()
    store, runner = InMemoryLayers(model), _runner(model)
    hidden = store.embed(ids)
    for layer in model.model.layers:
        hidden = runner.layer(layer, hidden)
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(model.model.norm(hidden)), model(ids).logits, rtol=0, atol=0)


def test_block_influence_and_input_energy_are_means_over_every_token():
    # 20 windows: measured a few windows at a time (uneven chunks), they must equal the all-at-once formulas
    model, ids = make_tiny_model(), _ids(20)
    store, runner = InMemoryLayers(model), _runner(model)
    scores = measure_units(store, ids, runner, "magnitude")
    hidden = store.embed(ids)
    for layer, score in zip(model.model.layers, scores, strict=False):
        out = runner.layer(layer, hidden)
        flat_in, flat_out = hidden.flatten(0, 1).double(), out.flatten(0, 1).double()
        influence = (1 - torch.nn.functional.cosine_similarity(flat_in, flat_out, dim=-1)).mean()
        assert score.influence == pytest.approx(float(influence), rel=1e-9)
        assert score.input_energy == pytest.approx(float(flat_in.pow(2).sum(-1).mean()), rel=1e-9)
        hidden = out


@pytest.mark.parametrize("compensation", ["none", "bias", "lstsq"])
def test_nothing_removed_changes_nothing(compensation):
    model, ids = make_tiny_model(), _ids()
    with torch.no_grad():
        before = model(ids).logits
    prune_to_target(InMemoryLayers(model), ids, _runner(model), 0, CalibratedPruneOptions(compensation=compensation))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-6)


def test_global_allocation_meets_the_budget_and_spares_sensitive_layers():
    model, ids = make_tiny_model(), _ids()
    scores = measure_units(InMemoryLayers(model), ids, _runner(model))
    target = int(0.2 * _count(model))
    cost = ParameterCost.of_model(model)
    plans = rank_units(scores, cost, target)
    removed = sum(
        (len(s.group_scores) - p.groups) * cost.kv_group(i) + (len(s.channel_scores) - p.channels) * cost.mlp_channel(i)
        for i, (s, p) in enumerate(zip(scores, plans, strict=False))
    )
    assert removed >= target
    assert all(p.groups >= 1 and p.channels >= 0.2 * len(s.channel_scores) for s, p in zip(scores, plans, strict=False))
    # units are ranked by damage per parameter relative to the layer's input energy: layers differ
    assert len({p.channels for p in plans}) > 1


def test_least_squares_tracks_the_dense_model_better_than_bias_or_nothing():
    ids, held_out = _ids(64), _ids(8, seed=1)  # enough tokens that the refit generalises
    dense = make_tiny_model()
    with torch.no_grad():
        reference = dense(held_out).logits
    errors = {}
    for compensation in ("none", "bias", "lstsq"):
        model = make_tiny_model()
        prune_to_target(
            InMemoryLayers(model),
            ids,
            _runner(model),
            int(0.2 * _count(model)),
            CalibratedPruneOptions(compensation=compensation),
        )
        assert _count(model) <= 0.8 * _count(dense)
        with torch.no_grad():
            errors[compensation] = float((model(held_out).logits - reference).pow(2).mean())
    # (random weights: whether the mean alone helps varies; the refit must help on unseen windows)
    assert errors["lstsq"] < min(errors["bias"], errors["none"])


def test_a_refit_on_windows_of_its_own_keeps_the_units_and_tracks_the_dense_model_better():
    # 4 windows (128 tokens) are too few for the refit; the units are chosen on them either way
    ids, more, held_out = _ids(4), _ids(64, seed=2), _ids(8, seed=1)
    with torch.no_grad():
        reference = make_tiny_model()(held_out).logits
    asked: list[int] = []

    def refit_windows(needed: int) -> torch.Tensor:
        asked.append(needed)
        return more

    outcomes, errors = [], []
    for windows in (None, refit_windows):
        model = make_tiny_model()
        outcome = prune_to_target(
            InMemoryLayers(model), ids, _runner(model), int(0.2 * _count(model)), refit_windows=windows
        )
        outcomes.append(outcome)
        with torch.no_grad():
            errors.append(float((model(held_out).logits - reference).pow(2).mean()))
    (_, plans, alone, on_ids), (_, plans_apart, apart, on_more) = outcomes
    # the same allocation, and the same units in the first layer (later ones see the refitted layers' outputs)
    assert plans == plans_apart
    assert (alone[0].kept_channel_indices, alone[0].kept_groups) == (
        apart[0].kept_channel_indices,
        apart[0].kept_groups,
    )
    assert (on_ids, on_more) == (4, 64)
    # 128 tokens are short of 4 per kept input: asked for what 8 per kept input of the widest projection take
    cost = ParameterCost.of_model(make_tiny_model())
    assert asked == [windows_for_plain_refit(widest_refitted_input(cost.shapes, plans), SEQ, DRAWN_TOKENS_PER_INPUT)]
    assert errors[1] < errors[0]


def test_compensated_model_saves_and_reloads_to_the_same_logits(tmp_path, tiny_tokenizer):
    model, ids = make_tiny_model(), _ids()
    prune_to_target(InMemoryLayers(model), ids, _runner(model), int(0.25 * _count(model)))
    shapes = layer_shapes(model)
    assert all(s.o_proj_bias and s.down_proj_bias for s in shapes)
    with torch.no_grad():
        expected = model(ids).logits
    save_model(model, tiny_tokenizer, tmp_path / "pruned")
    reloaded = load_model(str(tmp_path / "pruned")).model
    assert layer_shapes(reloaded) == shapes
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-5)


def test_uniform_bias_compensated_model_is_a_stock_llama(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model, ids = make_tiny_model(), _ids()
    options = CalibratedPruneOptions(compensation="bias", allocation="even-mlp", attention=False)
    prune_to_target(InMemoryLayers(model), ids, _runner(model), int(0.15 * _count(model)), options)
    with torch.no_grad():
        expected = model(ids).logits
    save_model(model, tiny_tokenizer, tmp_path / "stock")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock")  # no remote code
    assert stock.config.mlp_bias and "layer_shapes" not in stock.config.to_dict()
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, expected, rtol=0, atol=1e-5)


def test_uniform_heads_that_do_not_divide_the_hidden_size_save_with_per_layer_shapes(tmp_path, tiny_tokenizer):
    # Llama-3-8B cut to 6 of 8 KV groups in every layer has 24 heads for hidden 4096: transformers refuses that stock
    # config (hidden_size % num_attention_heads), so the uniform model is saved like a non-uniform one, and reloads
    from llmprune.engine.pruning.cut.surgery import prune_kv_groups

    model, ids = make_tiny_model(kv_heads=4), _ids()  # 8 heads of 8 in 4 groups, hidden 64
    for layer in model.model.layers:
        prune_kv_groups(layer, [0, 1, 3])  # 6 heads: 64 % 6 != 0
    with torch.no_grad():
        expected = model(ids).logits
    save_model(model, tiny_tokenizer, tmp_path / "pruned")
    reloaded = load_model(str(tmp_path / "pruned")).model
    assert {s.num_attention_heads for s in layer_shapes(reloaded)} == {6}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected, rtol=0, atol=1e-5)


def _first_layer_error(correction: float, ids: torch.Tensor, refit_ids: torch.Tensor | None = None):
    """Cut layer 0 (one KV group of two, half its MLP) with `correction`; its output's squared error to the dense
    model's on the windows the refit was fitted on, and what the cut kept."""
    from llmprune.engine.pruning.allocate.level import Level
    from llmprune.engine.pruning.cut.layer_pass import prune_layers

    dense, model = make_tiny_model(), make_tiny_model()
    plans = [Level(1, 64)] + [Level(2, 128)] * 3
    reports = prune_layers(
        InMemoryLayers(model), ids, _runner(model), plans, compensation="lstsq", refit_ids=refit_ids,
        correction=correction,
    )  # fmt: skip
    store, runner = InMemoryLayers(dense), _runner(dense)
    fitted_on = refit_ids if refit_ids is not None else ids
    target = runner.layer(dense.model.layers[0], store.embed(fitted_on))
    out = _runner(model).layer(model.model.layers[0], InMemoryLayers(model).embed(fitted_on))
    return float((out - target).pow(2).mean()), (reports[0].kept_groups, reports[0].kept_channel_indices)


def test_residual_correction_brings_a_cut_layers_output_closer_to_the_dense_models():
    # The attention cut leaves the MLP's residual stream off the dense one. Without correction the MLP's refit only
    # reproduces the dense MLP on that stream; with correction 1 it also takes the stream's gap away, so the layer's
    # output is closer to the dense layer's (on the windows it was fitted on). The units kept are the same.
    ids = _ids(64)
    plain, kept = _first_layer_error(0.0, ids)
    corrected, kept_corrected = _first_layer_error(1.0, ids)
    half, _ = _first_layer_error(0.5, ids)
    assert kept == kept_corrected
    assert corrected < half < plain


def test_residual_correction_follows_the_refit_onto_windows_of_its_own():
    # the dense stream walks on the refit's windows (64), not the 4 the units are chosen on
    ids, more = _ids(4), _ids(64, seed=2)
    plain, kept = _first_layer_error(0.0, ids, refit_ids=more)
    corrected, kept_corrected = _first_layer_error(1.0, ids, refit_ids=more)
    assert kept == kept_corrected
    assert corrected < plain
