"""Compensation maths on tiny nn.Linear layers: statistics, scores, bias and least-squares fixes."""

from __future__ import annotations

import torch
from torch import nn

from llmprune.engine.pruning.cut import refit
from llmprune.engine.pruning.scores import statistics


def _inputs(tokens: int = 512, features: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, features, generator=g)
    x[:, 3] = 2.5 + 0.01 * torch.randn(tokens, generator=g)  # nearly constant: cheap to replace by a bias
    x[:, 5] = 4 * x[:, 5]  # loud: must be kept
    return x


def _linear(features: int = 12, out: int = 6, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(features, out, bias=False)


def _stats(linear: nn.Linear, x: torch.Tensor, chunks: int = 4) -> statistics.InputStatistics:
    with statistics.record_inputs(linear) as stats, torch.no_grad():
        for part in x.chunk(chunks):
            linear(part)
    return stats


def test_statistics_match_the_data():
    x = _inputs()
    stats = _stats(_linear(), x)
    assert stats.count == x.shape[0]
    torch.testing.assert_close(stats.mean, x.double().mean(0))
    torch.testing.assert_close(stats.variance, x.double().var(0, unbiased=False))
    torch.testing.assert_close(stats.covariance(), torch.cov(x.double().T, correction=0))


def test_fluctuation_ranks_the_constant_column_low_and_the_loud_one_high():
    linear, x = _linear(), _inputs()
    scores = statistics.fluctuation(linear.weight, _stats(linear, x))
    assert int(scores.argmin()) == 3
    assert int(scores.argmax()) == 5


def test_group_fluctuation_is_the_variance_of_the_groups_output():
    linear, x = _linear(), _inputs()
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9, 10, 11]]
    scores = statistics.group_fluctuation(linear.weight, _stats(linear, x), groups)
    for group, score in zip(groups, scores, strict=False):
        contribution = x[:, group].double() @ linear.weight[:, group].detach().double().T
        expected = contribution.var(0, unbiased=False).sum()
        torch.testing.assert_close(score, expected)


def test_bias_compensation_keeps_the_mean_output():
    linear, x = _linear(), _inputs()
    stats = _stats(linear, x)
    keep = [0, 1, 2, 4, 5, 6, 7]
    bias = refit.compensate_bias(linear.weight, None, stats, keep)
    pruned = nn.Linear(len(keep), 6)
    with torch.no_grad():
        pruned.weight.copy_(linear.weight[:, keep])
        pruned.bias.copy_(bias)
        torch.testing.assert_close(pruned(x[:, keep]).mean(0), linear(x).mean(0), atol=1e-5, rtol=1e-5)
        # and removing the near-constant column costs almost nothing once compensated
        only_3 = [i for i in range(12) if i != 3]
        fixed = x[:, only_3] @ linear.weight[:, only_3].T + refit.compensate_bias(linear.weight, None, stats, only_3)
        uncompensated = x[:, only_3] @ linear.weight[:, only_3].T
    dense = linear(x).detach()
    assert (fixed - dense).pow(2).mean() < 0.01 * (uncompensated - dense).pow(2).mean()


def test_least_squares_beats_bias_and_is_exact_when_nothing_is_removed():
    linear, x = _linear(), _inputs()
    x[:, 9] = 0.5 * x[:, 0] - x[:, 1] + 0.05 * torch.randn(x.shape[0])  # column 9 is predictable from 0 and 1
    stats = _stats(linear, x)
    keep = [0, 1, 2, 4, 5, 6, 7, 8]
    dense = linear(x).detach().double()

    def error(weight: torch.Tensor, bias: torch.Tensor) -> float:
        return float((x[:, keep].double() @ weight.double().T + bias.double() - dense).pow(2).mean())

    bias_only = error(linear.weight[:, keep].detach(), refit.compensate_bias(linear.weight, None, stats, keep))
    weight, bias = refit.refit_least_squares(linear.weight, None, stats, keep, damping=0.0)
    assert weight.shape == (6, len(keep)) and bias.shape == (6,)
    assert error(weight, bias) < 0.5 * bias_only

    everything = list(range(12))
    weight, bias = refit.refit_least_squares(linear.weight, None, stats, everything, damping=0.0)
    torch.testing.assert_close(weight, linear.weight.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bias, torch.zeros(6), atol=1e-4, rtol=1e-4)


def test_least_squares_with_too_few_tokens_falls_back_to_bias_compensation():
    features = 12
    keep = [k for k in range(features) if k not in (3, 7)]
    x = _inputs(tokens=refit.MIN_TOKENS_PER_INPUT * len(keep) - 1, features=features)
    linear = _linear(features)
    stats = _stats(linear, x, chunks=1)
    weight, bias = refit.refit_least_squares(linear.weight, linear.bias, stats, keep)
    torch.testing.assert_close(weight, linear.weight[:, keep])
    torch.testing.assert_close(bias, refit.compensate_bias(linear.weight, linear.bias, stats, keep))
