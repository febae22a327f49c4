"""Making up for what pruning removes: the bias and least-squares fixes of one projection.

Everything here is about one `nn.Linear` whose *input* units are removed
(`o_proj`, `down_proj`), with X the calibration inputs of that projection
(`scores.statistics.InputStatistics`) and W its weight:

- bias compensation: replace the removed columns' contribution by its mean,
  b += W_removed · E[x_removed]. The layer's output keeps its average.
- least-squares refit: choose the kept columns' weights *and* the bias so that
  the pruned projection reproduces the dense one on the calibration inputs,
  min ‖[X_kept, 1]·[W', b']ᵀ − (X Wᵀ + b)‖². Bias compensation is the special
  case where W' = W_kept is frozen.

Which of them runs after a layer's cut (--compensation) is `cut.compensation`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llmprune.engine.pruning.scores.statistics import InputStatistics

__all__ = ["compensate_bias", "refit_least_squares", "MIN_TOKENS_PER_INPUT", "refit_ridge"]


def _removed(keep: Sequence[int], size: int, device: torch.device) -> torch.Tensor:
    mask = torch.ones(size, dtype=torch.bool, device=device)
    mask[torch.as_tensor(list(keep), dtype=torch.long, device=device)] = False
    return mask


@torch.no_grad()
def compensate_bias(
    weight: torch.Tensor, bias: torch.Tensor | None, stats: InputStatistics, keep: Sequence[int]
) -> torch.Tensor:
    """The output bias after removing every column not in `keep`: b + W_removed · E[x_removed].

    `weight` is the *unpruned* weight (out × in); returns a new bias (out,) in the weight's dtype.
    """
    removed = _removed(keep, weight.shape[1], stats.total.device)
    # only the removed columns in float64 (a float64 copy of an 8B down_proj would be 0.47 GB)
    w_removed = weight.detach().to(stats.total.device)[:, removed].to(torch.float64)
    shift = w_removed @ stats.mean[removed]
    base = bias.detach().to(torch.float64).to(shift.device) if bias is not None else torch.zeros_like(shift)
    return (base + shift).to(weight.dtype).to(weight.device)


# A least-squares refit over k inputs fitted on fewer than a few·k calibration tokens reproduces those
# tokens and fails on every other one (measured on SmolLM2: 256 tokens for 1536 channels with the plain
# ridge turned PPL 39 into thousands). Down to this many tokens per kept input the ridge is `damping`;
# below it, the ridge grows as (MIN_TOKENS_PER_INPUT·k / n)^RIDGE_GROWTH, pulling the refit towards the
# original weights more the less the calibration covers: a curve from the refit to the kept weights
# (where only the bias is refitted), not a switch between them.
MIN_TOKENS_PER_INPUT = 4
RIDGE_GROWTH = 2.0


def refit_ridge(damping: float, kept: int, tokens: int) -> float:
    """The refit's ridge relative to the mean diagonal of XᵀX: `damping`, raised when tokens per kept input are few."""
    shortfall = MIN_TOKENS_PER_INPUT * kept / max(tokens, 1)
    return damping * max(1.0, shortfall) ** RIDGE_GROWTH


@torch.no_grad()
def refit_least_squares(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stats: InputStatistics,
    keep: Sequence[int],
    damping: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') for the kept columns that best reproduce X·Wᵀ + b on the calibration inputs.

    Minimises ‖[X_kept, 1]·[W', b']ᵀ − (X Wᵀ + b)‖² + λ‖W' − W_kept‖²: the ridge λ (`refit_ridge`:
    damping·mean(diag), more with few tokens per kept input) pulls W' towards the *original* kept
    columns, not towards 0, so directions the calibration inputs do not cover (few samples, rarely
    active channels) keep their trained weights instead of being fitted to noise, while
    well-covered directions are refitted. The bias is fitted exactly, which centres the problem:
    with Σ the inputs' covariance, K the kept and R the removed columns,

        W'ᵀ = W_Kᵀ + (Σ_KK + λI)⁻¹ Σ_KR W_Rᵀ,    b' = b + W_R x̄_R − (W' − W_K) x̄_K.

    With the raw inputs kept (few tokens, `InputStatistics.low_rank`) the k × k system is solved
    through the tokens × tokens one (Σ = ZᵀZ: (ZᵀZ + λI)⁻¹Zᵀ = Zᵀ(ZZᵀ + λI)⁻¹), so no k × k matrix is
    formed. Returns the new weight (out × kept) and bias (out,), in the weight's dtype.
    """
    if not stats.has_gram:
        raise ValueError("least squares needs the Gram matrix (InputStatistics(gram=True))")
    device = stats.total.device
    kept = torch.as_tensor(sorted(int(k) for k in keep), dtype=torch.long, device=device)
    removed = _removed(kept.tolist(), weight.shape[1], device).nonzero().flatten()
    w = weight.detach().to(device)
    w_kept = w.index_select(1, kept).to(torch.float64)
    w_removed = w.index_select(1, removed).to(torch.float64)
    b = (
        bias.detach().to(torch.float64).to(device)
        if bias is not None
        else torch.zeros(w.shape[0], dtype=torch.float64, device=device)
    )
    n = float(max(stats.count, 1))
    mean = stats.mean
    mean_kept, mean_removed = mean[kept], mean[removed]
    ridge = refit_ridge(damping, kept.numel(), stats.count) * float(stats.squares[kept].mean() / n)
    ridge = max(ridge, 1e-12)
    if stats.low_rank:
        x = stats.inputs()
        z_kept = (x.index_select(1, kept) - mean_kept) / n**0.5  # tokens × k
        target = ((x.index_select(1, removed) - mean_removed) / n**0.5) @ w_removed.T  # tokens × out
        small = z_kept @ z_kept.T
        small.diagonal().add_(ridge)
        factor, info = torch.linalg.cholesky_ex(small)
        solved = torch.cholesky_solve(target, factor) if int(info) == 0 else torch.linalg.solve_ex(small, target)[0]
        shift = z_kept.T @ solved  # k × out
    else:
        gram = stats.gram
        cov_kk = gram[kept[:, None], kept] / n
        cov_kk.addr_(mean_kept, mean_kept, alpha=-1)
        cov_kk.diagonal().add_(ridge)  # in place: ridge * eye(k) would be two more k × k matrices
        # Σ_KR W_Rᵀ without a k × in block of the Gram (for an 8B down_proj that alone would be ~1 GB)
        rhs = gram[kept[:, None], removed] @ w_removed.T / n - torch.outer(mean_kept, mean_removed @ w_removed.T)
        factor, info = torch.linalg.cholesky_ex(cov_kk)
        shift = torch.cholesky_solve(rhs, factor) if int(info) == 0 else torch.linalg.solve_ex(cov_kk, rhs)[0]
    new_bias = b + w_removed @ mean_removed - shift.T @ mean_kept
    new_weight = w_kept.add_(shift.T)  # in place: no third out × k float64 matrix
    return new_weight.to(weight.dtype).to(weight.device), new_bias.to(weight.dtype).to(weight.device)
