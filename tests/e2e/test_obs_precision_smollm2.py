"""OBS scores on the real SmolLM2's statistics: float32 (where it is used) and the low-rank path keep float64's."""

import pytest
import torch

from llmprune.engine.pruning.scores import statistics
from llmprune.engine.pruning.scores.obs import obs_unit_scores
from llmprune.engine.pruning.scores.units import top_units

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def down_proj_inputs(smollm2, wikitext_valid):
    """down_proj's inputs in layers 3 and 15 (after the massive activation appears) on 16 windows × 128 tokens."""
    from llmprune.engine.data import load_calibration_windows

    windows = load_calibration_windows(smollm2.tokenizer, str(wikitext_valid), 16, 128)
    captured = {}

    def capture(index):
        def hook(_module, args):
            captured[index] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()

        return hook

    hooks = [smollm2.model.model.layers[i].mlp.down_proj.register_forward_pre_hook(capture(i)) for i in (3, 15)]
    with torch.no_grad():
        smollm2.model(windows.ids)
    for hook in hooks:
        hook.remove()
    return {i: (smollm2.model.model.layers[i].mlp.down_proj.weight.detach(), x) for i, x in captured.items()}


def _stats(x: torch.Tensor, dense: bool) -> statistics.InputStatistics:
    stats = statistics.InputStatistics(x.shape[1])
    stats.add(x)
    if dense:
        stats.gram  # noqa: B018 (the Gram replaces the kept inputs: the dense path)
    return stats


def _kept_overlap(a: torch.Tensor, b: torch.Tensor, keep: int) -> float:
    return len(set(top_units(a, keep)) & set(top_units(b, keep))) / keep


def _assert_same_choice(scores: torch.Tensor, reference: torch.Tensor, name: str) -> None:
    assert torch.isfinite(scores).all(), name
    for share in (0.2, 0.5, 0.8):  # the channels a layer keeps at those cuts
        keep = int(share * reference.numel())
        assert _kept_overlap(scores, reference, keep) >= 0.99, (name, share)
    # the greedy order's scores, which the allocation ranks across layers, agree to a small fraction
    relative = ((scores - reference).abs() / reference.abs()).median()
    assert relative < 1e-4, (name, float(relative))


@pytest.mark.parametrize("layer", [3, 15])
def test_float32_keeps_what_float64_keeps_when_the_calibration_spans_the_inputs(down_proj_inputs, layer):
    weight, x = down_proj_inputs[layer]
    assert x.shape[0] >= x.shape[1]  # 2,048 tokens for 1,536 channels
    reference = obs_unit_scores(weight, _stats(x, dense=True), 1, dtype=torch.float64)
    _assert_same_choice(obs_unit_scores(weight, _stats(x, dense=True), 1, dtype=torch.float32), reference, "float32")


@pytest.mark.parametrize("layer", [3, 15])
def test_low_rank_scores_from_few_tokens_equal_the_dense_float64_ones(down_proj_inputs, layer):
    weight, x = down_proj_inputs[layer]
    x = x[:256]  # fewer tokens than a quarter of the channels: the statistics keep X, not XᵀX
    low_rank = _stats(x, dense=False)
    assert low_rank.low_rank
    reference = obs_unit_scores(weight, _stats(x, dense=True), 1, dtype=torch.float64)
    _assert_same_choice(obs_unit_scores(weight, low_rank, 1), reference, "low rank")
