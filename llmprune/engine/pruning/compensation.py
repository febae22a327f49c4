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
    "refit_ridge",
    "column_energy",
]


class InputStatistics:
    """Running n, Σx and XᵀX of a linear layer's inputs (float64, on the layer's device).

    While there are fewer calibration tokens than a quarter of the features (an 8B down_proj: 14,336
    features, the default 256 or 6,400 tokens), the inputs themselves are kept instead of XᵀX: they
    are smaller than the Gram (256 × 14,336 vs 14,336²: 29 MB vs 1.6 GB), and OBS scores and the
    refit work on them directly (`low_rank`), so the features² matrix is never formed. Asking for
    `gram` builds it from them.
    """

    # keep the inputs while count ≤ features · LOW_RANK_SHARE (the Gram is then at least 4× larger)
    LOW_RANK_SHARE = 1 / 4

    def __init__(self, features: int, device: torch.device | str = "cpu", gram: bool = True):
        self.count = 0
        self.total = torch.zeros(features, dtype=torch.float64, device=device)
        self.squares = torch.zeros(features, dtype=torch.float64, device=device)
        # the full Gram is only needed for least squares and exact group scores
        self.has_gram = gram
        self._gram: torch.Tensor | None = None
        self._inputs: list[torch.Tensor] | None = [] if gram else None

    @torch.no_grad()
    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.squares += (x * x).sum(0)
        if not self.has_gram:
            return
        if self._inputs is not None and self.count <= self.LOW_RANK_SHARE * x.shape[1]:
            self._inputs.append(x.clone() if x.data_ptr() == inputs.data_ptr() else x)
            return
        self.gram.addmm_(x.T, x)  # in place: no second features² matrix

    @property
    def low_rank(self) -> bool:
        """Whether the raw inputs are kept (few tokens for the features) instead of XᵀX."""
        return self._inputs is not None and self._gram is None

    def inputs(self) -> torch.Tensor:
        """X (count × features, float64); only while `low_rank`."""
        if not self.low_rank:
            raise ValueError("the raw inputs are only kept while there are few calibration tokens")
        if not self._inputs:
            return self.total.new_zeros(0, self.total.shape[0])
        if len(self._inputs) > 1:
            self._inputs = [torch.cat(self._inputs)]
        return self._inputs[0]

    @property
    def gram(self) -> torch.Tensor | None:
        """XᵀX (features², float64); None when not recorded. Built from the kept inputs on first use."""
        if not self.has_gram:
            return None
        if self._gram is None:
            features = self.total.shape[0]
            self._gram = torch.zeros(features, features, dtype=torch.float64, device=self.total.device)
            for x in self._inputs or []:
                self._gram.addmm_(x.T, x)
            self._inputs = None
        return self._gram

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        return (self.squares / max(self.count, 1) - self.mean**2).clamp_min(0)

    def covariance(self) -> torch.Tensor:
        if not self.has_gram:
            raise ValueError("covariance needs the Gram matrix (InputStatistics(gram=True))")
        mean = self.mean
        cov = self.gram / max(self.count, 1)
        return cov.addr_(mean, mean, alpha=-1)  # in place: no second features² matrix


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
    cov = stats.covariance() if stats.has_gram else None
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
        shift = z_kept.T @ torch.cholesky_solve(target, torch.linalg.cholesky(small))  # k × out
    else:
        gram = stats.gram
        cov_kk = gram[kept[:, None], kept] / n
        cov_kk.addr_(mean_kept, mean_kept, alpha=-1)
        cov_kk.diagonal().add_(ridge)  # in place: ridge * eye(k) would be two more k × k matrices
        # Σ_KR W_Rᵀ without a k × in block of the Gram (for an 8B down_proj that alone would be ~1 GB)
        rhs = gram[kept[:, None], removed] @ w_removed.T / n - torch.outer(mean_kept, mean_removed @ w_removed.T)
        factor, info = torch.linalg.cholesky_ex(cov_kk)
        shift = torch.cholesky_solve(rhs, factor) if int(info) == 0 else torch.linalg.solve(cov_kk, rhs)
    new_bias = b + w_removed @ mean_removed - shift.T @ mean_kept
    new_weight = w_kept.add_(shift.T)  # in place: no third out × k float64 matrix
    return new_weight.to(weight.dtype).to(weight.device), new_bias.to(weight.dtype).to(weight.device)
