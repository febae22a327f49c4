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

__all__ = ["compensate_bias", "refit_least_squares", "MIN_TOKENS_PER_INPUT"]


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
    w = weight.detach().to(torch.float64).to(stats.total.device)
    shift = w[:, removed] @ stats.mean[removed]
    base = bias.detach().to(torch.float64).to(shift.device) if bias is not None else torch.zeros_like(shift)
    return (base + shift).to(weight.dtype).to(weight.device)


# A least-squares refit over k inputs fitted on fewer than a few·k calibration
# tokens reproduces those tokens and fails on every other one (measured on
# SmolLM2: 256 tokens for 1536 channels turned PPL 39 into thousands). Below
# this many tokens per kept input the refit falls back to bias compensation.
MIN_TOKENS_PER_INPUT = 4


@torch.no_grad()
def refit_least_squares(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stats: InputStatistics,
    keep: Sequence[int],
    damping: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W', b') for the kept columns that best reproduce X·Wᵀ + b on the calibration inputs.

    Solves the normal equations of [X_kept, 1] in float64 with a ridge of
    damping·mean(diag) that pulls W' towards the *original* kept columns, not
    towards 0: directions the calibration inputs do not cover (few samples,
    rarely active channels) keep their trained weights instead of being fitted
    to noise, while well-covered directions are refitted. Returns the new
    weight (out × kept) and bias (out,). With fewer than
    MIN_TOKENS_PER_INPUT calibration tokens per kept input it returns the kept
    columns unchanged and the bias compensation instead.
    """
    if stats.count < MIN_TOKENS_PER_INPUT * len(keep):
        kept_weight = weight.detach()[:, sorted(int(k) for k in keep)].contiguous()
        return kept_weight, compensate_bias(weight, bias, stats, keep)
    if stats.gram is None:
        raise ValueError("least squares needs the Gram matrix (InputStatistics(gram=True))")
    device = stats.gram.device
    keep_index = torch.as_tensor(sorted(int(k) for k in keep), dtype=torch.long, device=device)
    w = weight.detach().to(torch.float64).to(device)
    b = (
        bias.detach().to(torch.float64).to(device)
        if bias is not None
        else torch.zeros(w.shape[0], dtype=torch.float64, device=device)
    )
    n = float(stats.count)
    gram, total = stats.gram, stats.total
    k = keep_index.numel()

    # augmented normal matrix A = X̃ᵀX̃ and right-hand side X̃ᵀY with Y = X Wᵀ + 1 bᵀ
    # no k × in block of the Gram is ever formed (for an 8B down_proj that alone would be ~1 GB):
    # A takes the k × k block directly, the right-hand side the kept rows of the (in × out) product
    a = torch.empty(k + 1, k + 1, dtype=torch.float64, device=device)
    a[:k, :k] = gram[keep_index[:, None], keep_index]
    a[:k, k] = total[keep_index]
    a[k, :k] = total[keep_index]
    a[k, k] = n
    ridge = damping * a[:k, :k].diagonal().mean().clamp_min(1e-12)
    a[:k, :k].diagonal().add_(ridge)  # in place: ridge * eye(k) would be two more k × k matrices
    rhs = torch.empty(k + 1, w.shape[0], dtype=torch.float64, device=device)
    rhs[:k] = (gram @ w.T).index_select(0, keep_index) + torch.outer(total[keep_index], b)
    rhs[:k] += ridge * w.index_select(1, keep_index).T  # the prior: the original weights
    rhs[k] = total @ w.T + n * b
    solution = torch.linalg.solve(a, rhs)  # (k+1) × out
    new_weight = solution[:k].T.contiguous()
    new_bias = solution[k]
    return new_weight.to(weight.dtype).to(weight.device), new_bias.to(weight.dtype).to(weight.device)
