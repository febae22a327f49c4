"""Surgery removes units exactly: same logits as zero-masking them, GQA kept valid."""

import copy

import pytest
import torch

from llmprune.engine.io.architecture import gqa_violations, layer_shapes
from llmprune.engine.pruning.cut.surgery import (
    mask_kv_groups,
    mask_mlp_channels,
    mask_query_heads,
    prune_kv_groups,
    prune_mlp_channels,
    prune_query_heads,
)
from tests.conftest import make_tiny_model

IDS = torch.tensor([[1, 5, 9, 33, 200, 17, 4, 8, 90, 12, 3, 250]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS, use_cache=False).logits


def _pair(**kwargs):
    model = make_tiny_model(**kwargs)
    return model, copy.deepcopy(model)


@pytest.mark.parametrize("heads,kv_heads,hidden", [(8, 2, 64), (9, 3, 72), (8, 4, 64)])
def test_kv_group_surgery_equals_masking(heads, kv_heads, hidden):
    pruned, masked = _pair(heads=heads, kv_heads=kv_heads, hidden=hidden)
    keep = [kv_heads - 1] if kv_heads == 2 else [0, kv_heads - 1]
    for index in (1, 2):
        prune_kv_groups(pruned.model.layers[index], keep)
        mask_kv_groups(masked.model.layers[index], keep)
    torch.testing.assert_close(_logits(pruned), _logits(masked), rtol=1e-5, atol=1e-5)
    shape = layer_shapes(pruned)[1]
    assert shape.num_key_value_heads == len(keep)
    assert shape.num_attention_heads == len(keep) * heads // kv_heads
    assert gqa_violations(layer_shapes(pruned)) == []
    assert pruned.model.layers[1].self_attn.num_key_value_groups == heads // kv_heads


def test_masking_really_changes_the_output():
    """Guards the test above: masking a group is not a no-op, so equality means something."""
    model, reference = _pair()
    mask_kv_groups(model.model.layers[1], [0])
    assert not torch.allclose(_logits(model), _logits(reference), atol=1e-4)


def test_query_head_surgery_equals_masking_and_keeps_gqa():
    pruned, masked = _pair(heads=9, kv_heads=3, hidden=72)
    keep = [[0, 2], [1, 2], [0, 1]]
    prune_query_heads(pruned.model.layers[2], keep)
    mask_query_heads(masked.model.layers[2], keep)
    torch.testing.assert_close(_logits(pruned), _logits(masked), rtol=1e-5, atol=1e-5)
    shape = layer_shapes(pruned)[2]
    assert (shape.num_attention_heads, shape.num_key_value_heads) == (6, 3)
    assert pruned.model.layers[2].self_attn.num_key_value_groups == 2


def test_uneven_query_heads_are_refused():
    model = make_tiny_model(heads=9, kv_heads=3, hidden=72)
    with pytest.raises(ValueError, match="same number"):
        prune_query_heads(model.model.layers[0], [[0, 1], [0], [2, 1]])


def test_mlp_surgery_equals_masking():
    pruned, masked = _pair()
    keep = list(range(0, 128, 3))
    prune_mlp_channels(pruned.model.layers[0], keep)
    mask_mlp_channels(masked.model.layers[0], keep)
    torch.testing.assert_close(_logits(pruned), _logits(masked), rtol=1e-5, atol=1e-5)
    assert layer_shapes(pruned)[0].intermediate_size == len(keep)
    assert pruned.model.layers[0].mlp.down_proj.in_features == len(keep)


def test_keeping_everything_changes_nothing():
    model, reference = _pair()
    layer = model.model.layers[0]
    prune_kv_groups(layer, [0, 1])
    prune_query_heads(layer, [[0, 1, 2, 3], [0, 1, 2, 3]])
    prune_mlp_channels(layer, range(128))
    assert torch.equal(_logits(model), _logits(reference))


def test_surgery_with_biases_equals_masking():
    pruned, masked = _pair(attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for param in pruned.parameters():
            if param.dim() == 1 and param.shape[0] != 64:
                param.normal_(0, 0.1)
    masked.load_state_dict(pruned.state_dict())
    prune_kv_groups(pruned.model.layers[1], [1])
    mask_kv_groups(masked.model.layers[1], [1])
    prune_mlp_channels(pruned.model.layers[1], [3, 7, 9, 100])
    mask_mlp_channels(masked.model.layers[1], [3, 7, 9, 100])
    torch.testing.assert_close(_logits(pruned), _logits(masked), rtol=1e-5, atol=1e-5)
    assert pruned.model.layers[1].self_attn.k_proj.bias.shape == (8,)


@pytest.mark.parametrize(
    "call",
    [
        lambda layer: prune_kv_groups(layer, []),
        lambda layer: prune_kv_groups(layer, [2]),
        lambda layer: prune_kv_groups(layer, [0, 0]),
        lambda layer: prune_mlp_channels(layer, []),
        lambda layer: prune_query_heads(layer, [[], []]),
    ],
)
def test_invalid_keeps_are_refused_and_leave_the_layer_intact(call):
    model = make_tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        call(model.model.layers[0])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_pruned_model_still_generates_with_a_kv_cache():
    model = make_tiny_model()
    prune_kv_groups(model.model.layers[0], [1])
    prune_mlp_channels(model.model.layers[3], range(40))
    out = model.generate(IDS[:, :4], max_new_tokens=5, do_sample=False, pad_token_id=2)
    assert out.shape == (1, 9)
