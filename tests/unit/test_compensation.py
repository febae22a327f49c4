"""Compensation maths on tiny nn.Linear layers: statistics, scores, bias and least-squares fixes."""

from __future__ import annotations

import math

import pytest
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
    fitted = refit.refit_least_squares(linear.weight, None, stats, keep, damping=0.0)
    weight, bias = fitted.weight, fitted.bias
    assert not fitted.chosen and fitted.ridge == 0.0  # 512 tokens for 8 kept inputs: the fixed ridge
    assert weight.shape == (6, len(keep)) and bias.shape == (6,)
    assert error(weight, bias) < 0.5 * bias_only

    everything = list(range(12))
    fitted = refit.refit_least_squares(linear.weight, None, stats, everything, damping=0.0)
    weight, bias = fitted.weight, fitted.bias
    torch.testing.assert_close(weight, linear.weight.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(bias, torch.zeros(6), atol=1e-4, rtol=1e-4)


def _held_out_error(linear: nn.Linear, keep: list[int], fitted: refit.Refit, x: torch.Tensor) -> float:
    with torch.no_grad():
        dense = linear(x).double()
        return float((x[:, keep].double() @ fitted.weight.double().T + fitted.bias.double() - dense).pow(2).mean())


def _few_tokens_layer(predictable: bool, tokens: int, seed: int) -> tuple[nn.Linear, torch.Tensor, list[int]]:
    """40 inputs, 4 removed; the removed ones are an exact mix of kept ones, or noise of their own."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 40, generator=g)
    if predictable:
        x[:, 36:] = x[:, :4] @ torch.randn(4, 4, generator=g)
    linear = _linear(40, out=8, seed=seed)
    return linear, x, list(range(36))


def test_with_few_tokens_the_ridge_is_chosen_and_a_predictable_cut_is_refitted():
    # 60 tokens for 36 kept inputs (< 4 per input): cross-validation picks the ridge; the removed inputs are
    # an exact mix of kept ones, so a refit generalises and beats bias compensation on tokens it never saw
    linear, x, keep = _few_tokens_layer(predictable=True, tokens=2060, seed=6)
    stats = _stats(linear, x[:60], chunks=2)
    fitted = refit.refit_least_squares(linear.weight, linear.bias, stats, keep)
    assert fitted.chosen and math.isfinite(fitted.ridge)
    bias_only = refit.Refit(
        linear.weight.detach()[:, keep], refit.compensate_bias(linear.weight, linear.bias, stats, keep), math.inf, True
    )
    unseen = x[60:]
    assert _held_out_error(linear, keep, fitted, unseen) < 0.6 * _held_out_error(linear, keep, bias_only, unseen)


def test_with_few_tokens_an_unpredictable_cut_is_not_fitted_to_noise():
    # the removed inputs are noise of their own: a plain refit on 60 tokens fits that noise with 36 inputs
    # and does worse than bias compensation on unseen tokens; the chosen ridge does not
    linear, x, keep = _few_tokens_layer(predictable=False, tokens=2060, seed=7)
    stats = _stats(linear, x[:60], chunks=2)
    chosen = refit.refit_least_squares(linear.weight, linear.bias, stats, keep)
    assert chosen.chosen and chosen.ridge > 1.0
    seen = x[:60].double()
    with torch.no_grad():
        target = linear(x[:60]).double()
    design = torch.cat([seen[:, keep], torch.ones(60, 1, dtype=torch.float64)], 1)
    solution = torch.linalg.lstsq(design, target).solution  # the plain least-squares refit
    plain = refit.Refit(solution[:-1].T, solution[-1], 0.0, False)
    bias_only = refit.Refit(
        linear.weight.detach()[:, keep], refit.compensate_bias(linear.weight, linear.bias, stats, keep), math.inf, True
    )
    unseen = x[60:]
    bias_error = _held_out_error(linear, keep, bias_only, unseen)
    assert _held_out_error(linear, keep, plain, unseen) > 1.2 * bias_error  # what choosing the ridge avoids
    assert _held_out_error(linear, keep, chosen, unseen) <= 1.05 * bias_error


def test_the_refit_from_the_kept_inputs_equals_the_refit_from_the_gram():
    # few tokens for the features: the statistics keep X instead of XᵀX; the tokens × tokens solve gives the same W', b'
    features, tokens = 64, 12
    keep = [k for k in range(features) if k % 5]
    linear = nn.Linear(features, 6)
    x = _inputs(tokens=tokens, features=features, seed=4)
    low_rank = _stats(linear, x, chunks=3)
    assert low_rank.low_rank
    fitted = refit.refit_least_squares(linear.weight, linear.bias, low_rank, keep)
    assert fitted.chosen  # 12 tokens for 51 kept inputs: both paths choose the ridge, and choose the same
    dense = _stats(linear, x, chunks=3)
    dense.gram  # noqa: B018 (builds XᵀX from the kept inputs: the dense path from here on)
    assert not dense.low_rank
    from_gram = refit.refit_least_squares(linear.weight, linear.bias, dense, keep)
    assert from_gram.ridge == fitted.ridge
    torch.testing.assert_close(fitted.weight, from_gram.weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fitted.bias, from_gram.bias, atol=1e-5, rtol=1e-4)


def test_statistics_keep_the_inputs_only_while_they_are_smaller_than_the_gram():
    features = 64
    linear = nn.Linear(features, 6)
    stats = _stats(linear, _inputs(tokens=16, features=features), chunks=2)
    assert stats.low_rank and stats.inputs().shape == (16, features)
    x = _inputs(tokens=40, features=features, seed=5)
    stats = _stats(linear, x, chunks=4)  # 40 > 64 / 4: the Gram takes over, built from the inputs seen so far
    assert not stats.low_rank
    torch.testing.assert_close(stats.gram, x.double().T @ x.double())


def _ridge_solution(x: torch.Tensor, target: torch.Tensor, w_kept: torch.Tensor, keep: list[int], ridge: float):
    """min ‖[X_K, 1]·[W', b']ᵀ − target‖² + λ‖W' − W_K‖², solved directly (λ relative to mean diag(X_KᵀX_K)/n)."""
    x = x.double()[:, keep]
    n = x.shape[0]
    mean, target_mean = x.mean(0), target.mean(0)
    z, t = x - mean, target - target_mean
    if math.isinf(ridge):  # only the bias moves
        return w_kept.double(), target_mean - w_kept.double() @ mean
    lam = ridge * float((x * x).mean(0).mean())
    system = z.T @ z / n + lam * torch.eye(len(keep), dtype=torch.float64)
    weight = torch.linalg.solve(system, z.T @ t / n + lam * w_kept.double().T).T
    return weight, target_mean - weight @ mean


def _paired_stats(linear: nn.Linear, x: torch.Tensor, error: torch.Tensor, chunks: int):
    with statistics.record_inputs(linear, error=error) as stats, torch.no_grad():
        for part in x.chunk(chunks):
            linear(part)
    return stats


def test_a_paired_error_is_refitted_away_with_the_dense_output():
    # residual correction: the target is X·Wᵀ + b + e. The refit must be the ridge solution for that target, from
    # the Gram (many tokens) and from the kept inputs (few tokens, ridge chosen by cross-validation) alike
    for tokens, features in ((512, 12), (12, 64)):
        keep = [k for k in range(features) if k % 4]
        linear = nn.Linear(features, 6)
        x = _inputs(tokens=tokens, features=features, seed=7)
        g = torch.Generator().manual_seed(8)
        error = x[:, keep[:3]] @ torch.randn(3, 6, generator=g) + 0.3 * torch.randn(tokens, 6, generator=g)
        stats = _paired_stats(linear, x, error, chunks=3)
        assert stats.low_rank == (tokens == 12)
        fitted = refit.refit_least_squares(linear.weight, linear.bias, stats, keep)
        target = x.double() @ linear.weight.double().T + linear.bias.double() + error.double()
        weight, bias = _ridge_solution(x, target, linear.weight[:, keep], keep, fitted.ridge)
        torch.testing.assert_close(fitted.weight.double(), weight, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fitted.bias.double(), bias, atol=1e-5, rtol=1e-4)
        plain = refit.refit_least_squares(linear.weight, linear.bias, _stats(linear, x, chunks=3), keep)
        assert not torch.allclose(plain.bias, fitted.bias, atol=1e-3)  # the error moved the fit


def test_a_paired_error_must_cover_every_input_token():
    linear = nn.Linear(12, 6)
    x = _inputs(tokens=64)
    with pytest.raises(ValueError, match="paired error has 32 tokens"):
        _paired_stats(linear, x, torch.zeros(32, 6), chunks=4)
