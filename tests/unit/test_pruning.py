"""prune_model: surgery equals masking the same units, GQA kept, ratio 0 is a no-op, the compensation seam."""

import copy

import pytest
import torch

from llmprune.engine.data import TokenWindows
from llmprune.engine.io.architecture import gqa_violations, layer_shapes
from llmprune.engine.pruning.allocate.plan import PlanOptions, layer_rates, unit_counts
from llmprune.engine.pruning.cut.prune_model import prune_model
from llmprune.engine.pruning.cut.surgery import mask_mlp_channels, mask_query_heads
from tests.conftest import make_tiny_model

IDS = torch.tensor([[1, 5, 9, 33, 200, 17, 4, 8, 90, 12, 3, 250, 77, 6]])


def _windows():
    generator = torch.Generator().manual_seed(1)
    return TokenWindows(torch.randint(0, 384, (6, 24), generator=generator), "random", 10_000)


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _plan(model, ratio, attn_unit="group", prune_mlp=True):
    scores = [3.0, 0.5, 0.2, 0.4, 0.1, 2.0][: model.config.num_hidden_layers]
    rates = layer_rates(scores, PlanOptions(ratio=ratio, alpha=2.0))
    return unit_counts(rates, layer_shapes(model), attn_unit, True, prune_mlp)


def _mask_like(reference, outcome):
    for change in outcome.layers:
        if change.kept_query_heads is None:
            continue
        layer = reference.model.layers[change.index]
        ratio = change.before.num_attention_heads // change.before.num_key_value_heads
        groups = [
            [h % ratio for h in change.kept_query_heads if h // ratio == g]
            for g in range(change.before.num_key_value_heads)
        ]
        mask_query_heads(layer, groups)
        mask_mlp_channels(layer, change.kept_mlp_channels)


@pytest.mark.parametrize("unit_importance", ["activation", "magnitude"])
@pytest.mark.parametrize("attn_unit", ["group", "query"])
@pytest.mark.parametrize("heads,kv_heads,hidden", [(8, 2, 64), (9, 3, 72)])
def test_pruned_model_equals_masking_and_keeps_gqa(unit_importance, attn_unit, heads, kv_heads, hidden):
    model = make_tiny_model(layers=6, heads=heads, kv_heads=kv_heads, hidden=hidden)
    reference = copy.deepcopy(model)
    outcome = prune_model(model, _plan(model, 0.5, attn_unit), _windows(), unit_importance, attn_unit, batch_size=4)
    _mask_like(reference, outcome)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-4, atol=1e-4)
    shapes = layer_shapes(model)
    assert outcome.gqa_violations == [] == gqa_violations(shapes)
    assert outcome.params_after == sum(p.numel() for p in model.parameters()) < outcome.params_before
    if attn_unit == "group":
        assert all(s.num_attention_heads // s.num_key_value_heads == heads // kv_heads for s in shapes)
    else:
        assert all(s.num_key_value_heads == kv_heads for s in shapes)
        assert any(s.num_attention_heads < heads for s in shapes)
    assert shapes[0] == layer_shapes(reference)[0] and shapes[-1] == layer_shapes(reference)[-1]


def test_ratio_zero_changes_nothing():
    model = make_tiny_model(layers=6)
    reference = copy.deepcopy(model)
    outcome = prune_model(model, _plan(model, 0.0), _windows())
    assert torch.equal(_logits(model), _logits(reference))
    assert outcome.params_after == outcome.params_before


def test_activation_scores_need_calibration():
    model = make_tiny_model(layers=6)
    with pytest.raises(ValueError, match="calibration"):
        prune_model(model, _plan(model, 0.3), None, "activation")


def test_compensation_sees_each_pruned_projection_in_order():
    model = make_tiny_model(layers=6)
    seen = []

    def compensation(context):
        seen.append((context.index, context.projection))
        assert context.stats.count == 6 * 24
        assert context.linear.in_features == len(context.keep_columns)
        assert context.dense_weight.shape[1] > len(context.keep_columns)
        return "custom"

    plan = _plan(model, 0.5)
    outcome = prune_model(model, plan, _windows(), compensation=compensation, batch_size=4)
    layers = [index for index, _ in seen]
    assert layers == sorted(layers) and len(seen) >= 3
    for index in set(layers):  # attention first, then the MLP
        assert [p for i, p in seen if i == index] in (["o_proj"], ["down_proj"], ["o_proj", "down_proj"])
    assert {name for change in outcome.layers for name in change.compensation.values()} == {"custom"}
