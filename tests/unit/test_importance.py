"""Layer and unit importance: the fast removal score equals the naive one at half the work; unit scores see the weights
and data.
"""

import pytest
import torch

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.data import TokenWindows
from llmprune.engine.pruning.cut.surgery import mask_kv_groups
from llmprune.engine.pruning.scores import statistics
from llmprune.engine.pruning.scores.layer_importance import layer_importance, removal_importance_naive
from llmprune.engine.pruning.scores.units import UNIT_SCORES, get_unit_score
from llmprune.engine.walk.layer_store import runner_for
from tests.conftest import make_tiny_model


def _windows(count=6, seq_len=24, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return TokenWindows(torch.randint(0, 384, (count, seq_len), generator=generator), "random", 10_000)


def test_removal_reuses_hidden_states_and_equals_the_naive_way():
    model = make_tiny_model(layers=6)
    windows = _windows()
    fast = layer_importance(model, windows, "removal", batch_size=4)
    naive = removal_importance_naive(model, windows, batch_size=4)
    assert fast.scores == pytest.approx(naive.scores, abs=1e-5)
    assert fast.base_loss == pytest.approx(naive.base_loss, abs=1e-6)
    assert fast.layer_passes * 2 <= naive.layer_passes + 6 * 2  # about half the decoder-layer work


def test_removal_score_is_the_loss_increase_of_a_skipped_layer():
    model = make_tiny_model()
    scores = layer_importance(model, _windows(), "removal").scores
    with torch.no_grad():  # make layer 2 an identity: skipping it then changes nothing
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[2].mlp.down_proj.weight.zero_()
    after = layer_importance(model, _windows(), "removal").scores
    assert after[2] == pytest.approx(0.0, abs=1e-6)
    assert scores[2] != pytest.approx(0.0, abs=1e-4)


def test_block_influence_and_taylor_leave_the_model_unchanged():
    model = make_tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    influence = layer_importance(model, _windows(), "block-influence").scores
    taylor = layer_importance(model, _windows(), "taylor").scores
    assert all(0 <= s <= 2 for s in influence) and all(s > 0 for s in taylor)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_unknown_methods_are_user_errors():
    with pytest.raises(UserInputError, match="importance-method"):
        layer_importance(make_tiny_model(), _windows(), "random")
    with pytest.raises(UserInputError, match="unit-importance"):
        get_unit_score("random")


def test_magnitude_scores_match_the_weights():
    model = make_tiny_model()
    layer = model.model.layers[0]
    scores = UNIT_SCORES["magnitude"].kv_groups(layer, None)
    attn = layer.self_attn
    group1 = (
        attn.q_proj.weight[32:64].pow(2).sum()
        + attn.o_proj.weight[:, 32:64].pow(2).sum()
        + attn.k_proj.weight[8:16].pow(2).sum()
        + attn.v_proj.weight[8:16].pow(2).sum()
    )
    assert scores[1].item() == pytest.approx(group1.item(), rel=1e-5)
    channels = UNIT_SCORES["magnitude"].mlp_channels(layer, None)
    assert channels.shape == (128,)


def test_activation_scores_see_a_dead_group():
    model = make_tiny_model()
    layer = model.model.layers[1]
    mask_kv_groups(layer, [0])  # group 1's heads contribute nothing any more
    windows = _windows()
    runner = runner_for(model, 24, batch_size=3)
    with statistics.record_inputs(layer.self_attn.o_proj, gram=False) as stats, torch.no_grad():
        entering = runner.layer(model.model.layers[0], model.model.embed_tokens(windows.ids))
        runner.attention_block(layer, entering)
    assert stats.count == 6 * 24
    scores = UNIT_SCORES["activation"].kv_groups(layer, stats)
    assert scores[1].item() == 0.0 and scores[0].item() > 0
    heads = UNIT_SCORES["activation"].query_heads(layer, stats)
    assert heads.shape == (2, 4)
