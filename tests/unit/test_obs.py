"""OBS unit scores: closed forms on tiny layers, behaviour on tiny Llamas."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_tiny_model

from llmprune.engine.pruning.cut import refit
from llmprune.engine.pruning.global_path import CalibratedPruneOptions, InMemoryLayers, LayerRunner, prune_to_target
from llmprune.engine.pruning.scores import statistics
from llmprune.engine.pruning.scores.obs import DENSE_FLOAT64_FEATURES, dense_dtype, obs_removal_error, obs_unit_scores
from llmprune.engine.pruning.scores.units import UNIT_SCORES

SEQ = 32


def _layer(inputs: int = 12, outputs: int = 5, tokens: int = 400, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = (
        torch.randn(tokens, inputs, generator=generator, dtype=torch.float64)
        @ torch.randn(inputs, inputs, generator=generator, dtype=torch.float64)
        + 0.5
    )
    weight = torch.randn(outputs, inputs, generator=generator, dtype=torch.float64)
    bias = torch.randn(outputs, generator=generator, dtype=torch.float64)
    stats = statistics.InputStatistics(inputs, gram=True)
    stats.add(x)
    return x, weight, bias, stats


def _refit_error(x, weight, bias, stats, keep) -> float:
    fitted = refit.refit_least_squares(weight, bias, stats, keep, damping=0.0)
    new_weight, new_bias = fitted.weight, fitted.bias
    return float((x[:, keep] @ new_weight.T + new_bias - (x @ weight.T + bias)).pow(2).sum(1).mean())


def test_obs_error_is_the_least_squares_residual_of_the_refit():
    x, weight, bias, stats = _layer()
    removed = [1, 4, 6, 10]
    keep = [j for j in range(12) if j not in removed]
    assert obs_removal_error(weight, bias, stats, removed, damping=0.0) == pytest.approx(
        _refit_error(x, weight, bias, stats, keep), rel=1e-8
    )


def test_obs_keeps_the_group_whose_removal_costs_least_after_refit():
    x, weight, bias, stats = _layer()
    # four units of three columns: the greedy choice of one unit to remove is the brute-force best
    scores = obs_unit_scores(weight, stats, 3, remove=1, damping=0.0)
    errors = [_refit_error(x, weight, bias, stats, [j for j in range(12) if j // 3 != unit]) for unit in range(4)]
    assert int(scores.argmin()) == min(range(4), key=errors.__getitem__)


def test_greedy_obs_removes_what_refitting_each_candidate_would_choose():
    # the rank-one updates of W and H⁻¹ reproduce a brute-force greedy that refits the layer for every candidate
    x, weight, bias, stats = _layer()
    order = obs_unit_scores(weight, stats, 1, damping=0.0).argsort().tolist()
    alive = list(range(12))
    for expected in order[:6]:
        chosen = min(alive, key=lambda j: _refit_error(x, weight, bias, stats, [k for k in alive if k != j]))
        assert chosen == expected
        alive.remove(chosen)


def test_the_scores_the_allocation_ranks_add_up_to_the_joint_error():
    # two copies of an important input: each alone is free to remove (the other takes over), both together are not;
    # the allocation's scores (no keep=: the whole greedy order) charge the second copy what removing the pair costs
    x, weight, bias, _ = _layer(inputs=8)
    x = torch.cat(
        [
            x,
            x[:, :1]
            + 1e-3 * torch.randn(x.shape[0], 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
        ],
        1,
    )
    weight = torch.cat([weight, weight[:, :1]], 1)
    stats = statistics.InputStatistics(9, gram=True)
    stats.add(x)
    down_proj = torch.nn.Linear(9, 5, bias=False, dtype=torch.float64)
    down_proj.weight.data = weight
    layer = SimpleNamespace(mlp=SimpleNamespace(down_proj=down_proj))
    scores = UNIT_SCORES["obs"].mlp_channels(layer, stats)  # as measure_units asks: no keep=
    one_shot = obs_unit_scores(weight, stats, 1, remove=0, damping=1e-3)
    assert float(one_shot[0]) < float(one_shot.median()) and float(one_shot[8]) < float(
        one_shot.median()
    )  # alone, each looks free
    assert max(float(scores[0]), float(scores[8])) > float(scores.median())  # jointly, the second copy is not
    for count in (2, 4, 6):
        cheapest = scores.argsort()[:count].tolist()
        joint = obs_removal_error(weight, None, stats, cheapest)
        assert float(scores[cheapest].sum()) == pytest.approx(joint, rel=0.05)


def _ids(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 384, (count, SEQ), generator=torch.Generator().manual_seed(seed))


def _prune(model, ids, share: float, **options) -> None:
    runner = LayerRunner(model.config, model.model.rotary_emb, SEQ, torch.device("cpu"), torch.float32, batch_size=3)
    target = int(share * sum(p.numel() for p in model.parameters()))
    prune_to_target(InMemoryLayers(model), ids, runner, target, CalibratedPruneOptions(**options))


def test_nothing_removed_changes_nothing():
    model, ids = make_tiny_model(), _ids(40)
    with torch.no_grad():
        before = model(ids).logits
    _prune(model, ids, 0.0, unit_score="obs")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-4)


def test_obs_prunes_a_tiny_model_to_its_target():
    # the greedy order is told how many units each layer keeps; the tiny model still runs and has shrunk
    model, ids = make_tiny_model(), _ids(40)
    before = sum(p.numel() for p in model.parameters())
    _prune(model, ids, 0.25, unit_score="obs")
    assert sum(p.numel() for p in model.parameters()) <= 0.75 * before
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_float32_is_only_chosen_where_the_tokens_span_the_inputs():
    wide = statistics.InputStatistics(DENSE_FLOAT64_FEATURES + 1, gram=False)
    wide.count = DENSE_FLOAT64_FEATURES
    assert dense_dtype(wide) == torch.float64
    wide.count = DENSE_FLOAT64_FEATURES + 1
    assert dense_dtype(wide) == torch.float32


@pytest.mark.parametrize("width", [1, 4])
def test_low_rank_scores_from_the_kept_inputs_equal_the_dense_ones(width):
    # 10 tokens for 48 inputs: the statistics keep X; the tokens × tokens form gives the dense float64 scores
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(10, 48, generator=generator, dtype=torch.float64) + 0.3
    weight = torch.randn(6, 48, generator=generator, dtype=torch.float64)
    low_rank = statistics.InputStatistics(48)
    low_rank.add(x)
    dense = statistics.InputStatistics(48)
    dense.add(x)
    dense.gram  # noqa: B018 (builds XᵀX: the dense path)
    assert low_rank.low_rank and not dense.low_rank
    for remove in (0, 5, None):
        expected = obs_unit_scores(weight, dense, width, remove=remove)
        torch.testing.assert_close(obs_unit_scores(weight, low_rank, width, remove=remove), expected, rtol=1e-4, atol=0)
    removed = [1, 7, 30]
    assert obs_removal_error(weight, None, low_rank, removed) == pytest.approx(
        obs_removal_error(weight, None, dense, removed), rel=1e-8
    )
