"""Making up for what pruning removes: activation statistics, unit scores, bias and least-squares fixes.

Everything here is about one `nn.Linear` whose *input* units are removed:
`o_proj` (its input columns are the query heads of the KV groups) and
`down_proj` (its input columns are the MLP channels). With X the calibration
inputs of that projection (tokens × in_features) and W its weight:

- `InputStatistics` accumulates n, Σx and the Gram matrix XᵀX (float64, so
  that millions of tokens add up without loss); that is all the maths needs.
- fluctuation score of a set of columns S (FLAP-style, Ahn et al. 2024): the
  variance of their contribution to the output, tr(W_S Cov_SS W_Sᵀ). A unit
  whose output barely moves on real text can be replaced by a constant.
- bias compensation: replace the removed columns' contribution by its mean,
  b += W_removed · E[x_removed]. The layer's output keeps its average.
- least-squares refit: choose the kept columns' weights *and* the bias so that
  the pruned projection reproduces the dense one on the calibration inputs,
  min ‖[X_kept, 1]·[W', b']ᵀ − (X Wᵀ + b)‖². Bias compensation is the special
  case where W' = W_kept is frozen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "InputStatistics",
    "record_inputs",
    "fluctuation",
    "group_fluctuation",
    "compensate_bias",
    "refit_least_squares",
    "column_energy",
]


class InputStatistics:
    """Running n, Σx and XᵀX of a linear layer's inputs (float64, on the layer's device)."""

    def __init__(self, features: int, device: torch.device | str = "cpu", gram: bool = True):
        self.count = 0
        self.total = torch.zeros(features, dtype=torch.float64, device=device)
        self.squares = torch.zeros(features, dtype=torch.float64, device=device)
        # the full Gram is only needed for least squares and exact group scores
        self.gram = torch.zeros(features, features, dtype=torch.float64, device=device) if gram else None

    @torch.no_grad()
    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.squares += (x * x).sum(0)
        if self.gram is not None:
            self.gram.addmm_(x.T, x)  # in place: no second features² matrix

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        return (self.squares / max(self.count, 1) - self.mean**2).clamp_min(0)

    def covariance(self) -> torch.Tensor:
        if self.gram is None:
            raise ValueError("covariance needs the Gram matrix (InputStatistics(gram=True))")
        mean = self.mean
        return self.gram / max(self.count, 1) - torch.outer(mean, mean)


class record_inputs:
    """Context manager: accumulate the inputs of `linear` into InputStatistics while it is open."""

    def __init__(self, linear: nn.Linear, gram: bool = True):
        self.linear = linear
        self.stats = InputStatistics(linear.in_features, linear.weight.device, gram=gram)
        self._handle = None

    def __enter__(self) -> InputStatistics:
        self._handle = self.linear.register_forward_pre_hook(lambda _module, args: self.stats.add(args[0]))
        return self.stats

    def __exit__(self, *exc) -> None:
        self._handle.remove()


def column_energy(weight: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """‖W[:, j]‖² for every input column j, in float64, a block of rows at a time.

    A float64 copy of the whole weight and its square would be twice 0.47 GB for an
    8B down_proj, the largest allocation of a streamed prune's measuring pass.
    """
    weight = weight.detach()
    total = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    for first in range(0, weight.shape[0], rows):
        total += weight[first : first + rows].to(torch.float64).pow(2).sum(0)
    return total


def fluctuation(weight: torch.Tensor, stats: InputStatistics) -> torch.Tensor:
    """Per input column j: Var(x_j)·‖W[:, j]‖², the variance that column adds to the output."""
    return stats.variance * column_energy(weight)


def group_fluctuation(weight: torch.Tensor, stats: InputStatistics, groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """For each group of columns S: tr(W_S Cov_SS W_Sᵀ), the variance of the group's whole output.

    Unlike summing per-column scores this counts how a head's columns move together.
    """
    cov = stats.covariance() if stats.gram is not None else None
    w = weight.detach().to(torch.float64)
    scores = []
    for columns in groups:
        index = torch.as_tensor(list(columns), dtype=torch.long, device=w.device)
        w_s = w.index_select(1, index)
        if cov is None:
            scores.append((stats.variance[index] * w_s.pow(2).sum(0)).sum())
        else:
            c_ss = cov.index_select(0, index).index_select(1, index)
            scores.append(torch.einsum("oi,ij,oj->", w_s, c_ss, w_s))
    return torch.stack(scores)


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
