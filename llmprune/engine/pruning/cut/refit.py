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

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llmprune.engine.pruning.scores.statistics import InputStatistics

__all__ = [
    "compensate_bias",
    "refit_least_squares",
    "Refit",
    "MIN_TOKENS_PER_INPUT",
    "needs_choice",
    "windows_for_plain_refit",
    "DRAWN_TOKENS_PER_INPUT",
]


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


# Where the ridge comes from when calibration tokens are few for the kept inputs (below
# MIN_TOKENS_PER_INPUT per kept input): chosen per projection by generalised cross-validation
# (Golub, Heath & Wahba 1979), i.e. the λ whose refit is expected to predict *unseen* tokens best,
# from a grid running from `damping` to "only the bias" (λ = ∞, bias compensation). At and above
# that count the fixed `damping` keeps the one Cholesky solve it always had.
MIN_TOKENS_PER_INPUT = 4
# The tokens of one calibration window are not independent observations: GCV counts this many as one.
# Measured on SmolLM2 at 20 % with 8 windows (benchmarks/refit_calibration.py), wiki / pydoc PPL for
# 1, 2, 4, 8, 16 tokens per observation: 106.4/66.2, 91.6/59.7, 93.3/61.8, 95.1/63.0, 95.4/65.0
# (bias compensation alone: 94.6/70.7).
TOKENS_PER_OBSERVATION = 2
# A refit short of MIN_TOKENS_PER_INPUT draws windows of its own for twice that (`layer_pass.refit_ids_for`):
# at exactly 4 the fixed ridge still fits the tokens. `make demo` (attention-only plan, 4 windows, o_proj's 384
# kept inputs), PPL after the prune: 60.42 with the ridge chosen by cross-validation on the 4 windows, 70.31
# refitted plainly on 12 drawn windows (4 per input), 61.45 on 24 (8 per input).
DRAWN_TOKENS_PER_INPUT = 2 * MIN_TOKENS_PER_INPUT
_GRID = torch.logspace(-4, 4, 33, dtype=torch.float64)  # relative to the mean diagonal of XᵀX / n


@dataclass(frozen=True)
class Refit:
    """The refitted projection: weight (out × kept), bias (out,), and the ridge it used.

    `ridge` is relative to the mean diagonal of the kept inputs' second moment; `math.inf` means
    the weights were kept as they were and only the bias moved (bias compensation).
    """

    weight: torch.Tensor
    bias: torch.Tensor
    ridge: float
    chosen: bool  # whether the ridge was chosen by cross-validation (few tokens) or was `damping`


def needs_choice(kept: int, tokens: int) -> bool:
    """Whether the calibration has too few tokens per kept input for the fixed ridge."""
    return tokens < MIN_TOKENS_PER_INPUT * kept


def windows_for_plain_refit(kept: int, seq_len: int, per_input: int = MIN_TOKENS_PER_INPUT) -> int:
    """Calibration windows of `seq_len` tokens that give `kept` inputs `per_input` tokens each."""
    return -(-per_input * kept // seq_len)


def _gcv_ridge(
    eigenvalues: torch.Tensor, explained: torch.Tensor, total: float, tokens: int, scale: float, damping: float
) -> float:
    """The relative ridge (≥ damping, or inf) minimising the GCV score of the multi-output ridge fit.

    With d the eigenvalues of the kept inputs' covariance and e_i the target energy along each
    eigen-direction, a ridge λ leaves the residual R(λ) = T − Σ e_i (1 − (λ/(d_i+λ))²) and uses
    df(λ) = Σ d_i/(d_i+λ) degrees of freedom; GCV(λ) = R(λ) / (1 − df(λ)/n)², with n the observations
    (`TOKENS_PER_OBSERVATION`). λ = ∞ is the bias alone.
    """
    observations = tokens // TOKENS_PER_OBSERVATION
    best, best_score = math.inf, total  # λ = ∞: nothing fitted, R = T, df = 0
    grid = _GRID[_GRID >= damping] if damping > 0 else _GRID
    for relative in grid.tolist():
        lam = relative * scale
        shrink = lam / (eigenvalues + lam)
        residual = total - float((explained * (1 - shrink**2)).sum())
        freedom = float((eigenvalues / (eigenvalues + lam)).sum())
        if freedom >= observations - 1:  # the bias takes one
            continue
        score = max(residual, 0.0) / (1 - freedom / (observations - 1)) ** 2
        if score < best_score:
            best, best_score = relative, score
    return best


@torch.no_grad()
def refit_least_squares(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stats: InputStatistics,
    keep: Sequence[int],
    damping: float = 1e-3,
) -> Refit:
    """The kept columns and bias that best reproduce X·Wᵀ + b on the calibration inputs, and on others.

    Minimises ‖[X_kept, 1]·[W', b']ᵀ − (X Wᵀ + b)‖² + λ‖W' − W_kept‖²: the ridge λ pulls W' towards the
    *original* kept columns, not towards 0, so directions the calibration inputs do not cover keep
    their trained weights instead of being fitted to noise. With enough tokens per kept input λ is
    `damping`·mean(diag); with fewer it is chosen by generalised cross-validation (`_gcv_ridge`),
    which may go as far as λ = ∞ (bias compensation) when no refit would generalise. The bias is
    fitted exactly, which centres the problem: with Σ the inputs' covariance, K the kept and R the
    removed columns,

        W'ᵀ = W_Kᵀ + (Σ_KK + λI)⁻¹ Σ_KR W_Rᵀ,    b' = b + W_R x̄_R − (W' − W_K) x̄_K.

    With the raw inputs kept (few tokens, `InputStatistics.low_rank`) the k × k system is solved
    through the tokens × tokens one (Σ = ZᵀZ: (ZᵀZ + λI)⁻¹Zᵀ = Zᵀ(ZZᵀ + λI)⁻¹), so no k × k matrix is
    formed. Weight and bias come back in the weight's dtype.

    With `stats.paired` (`scores.statistics.PairedError`, an error e per token) the target is X·Wᵀ + b + e:
    the refit also takes away what e says the residual stream lacks there, and Σ_KR W_Rᵀ above gains
    Cov(x_K, e), the bias ē.
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
    scale = max(float(stats.squares[kept].mean() / n), 1e-300)  # the ridge is relative to this mean diagonal
    choose = needs_choice(kept.numel(), stats.count) and stats.count > 2
    paired = stats.paired  # an error to take away as well (residual correction): the target gains it
    paired_mean = paired.mean if paired is not None else torch.zeros_like(b)
    if stats.low_rank:
        x = stats.inputs()
        z_kept = (x.index_select(1, kept) - mean_kept) / n**0.5  # tokens × k
        target = ((x.index_select(1, removed) - mean_removed) / n**0.5) @ w_removed.T  # tokens × out
        if paired is not None:
            target += (paired.raw() - paired_mean) / n**0.5
        small = z_kept @ z_kept.T
        # (damping, None): the fixed ridge, solved below; (inf, None): bias only
        ridge, shift = (
            _chosen_low_rank(small, z_kept, target, stats.count, scale, damping)
            if choose and bool(torch.isfinite(small).all())
            else (damping, None)
        )
        if shift is None and math.isfinite(ridge):
            small.diagonal().add_(max(ridge * scale, 1e-12))
            factor, info = torch.linalg.cholesky_ex(small)
            solved = torch.cholesky_solve(target, factor) if int(info) == 0 else torch.linalg.solve_ex(small, target)[0]
            shift = z_kept.T @ solved  # k × out
    else:
        gram = stats.gram
        cov_kk = gram[kept[:, None], kept] / n
        cov_kk.addr_(mean_kept, mean_kept, alpha=-1)
        # Σ_KR W_Rᵀ without a k × in block of the Gram (for an 8B down_proj that alone would be ~1 GB)
        rhs = gram[kept[:, None], removed] @ w_removed.T / n - torch.outer(mean_kept, mean_removed @ w_removed.T)
        if paired is not None:
            rhs += paired.cross[kept] / n - torch.outer(mean_kept, paired_mean)  # + Cov(x_K, e)
        ridge, shift = (
            _chosen_dense(cov_kk, rhs, _target_energy(gram, removed, w_removed, stats, n), stats.count, scale, damping)
            if choose and bool(torch.isfinite(cov_kk).all())
            else (damping, None)
        )
        if shift is None and math.isfinite(ridge):
            cov_kk.diagonal().add_(max(ridge * scale, 1e-12))  # in place: ridge * eye(k) would be two more k × k
            factor, info = torch.linalg.cholesky_ex(cov_kk)
            shift = torch.cholesky_solve(rhs, factor) if int(info) == 0 else torch.linalg.solve_ex(cov_kk, rhs)[0]
    if shift is None:  # λ = ∞: the weights stay, the bias takes the removed columns' mean (and the error's)
        return Refit(_as(w_kept, weight), _as(b + w_removed @ mean_removed + paired_mean, weight), ridge, choose)
    new_bias = b + w_removed @ mean_removed + paired_mean - shift.T @ mean_kept
    new_weight = w_kept.add_(shift.T)  # in place: no third out × k float64 matrix
    return Refit(_as(new_weight, weight), _as(new_bias, weight), ridge, choose)


def _as(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return value.to(like.dtype).to(like.device)


def _target_energy(
    gram: torch.Tensor, removed: torch.Tensor, w_removed: torch.Tensor, stats: InputStatistics, n: float
) -> float:
    """The variance per token of what the refit has to make up: tr(W_R Σ_RR W_Rᵀ), what the removed columns
    contributed, and with a paired error e also 2·tr(W_R Cov(x_R, e)) + tr(Cov(e))."""
    mean_removed = stats.mean[removed]
    cov_rr = gram[removed[:, None], removed] / n
    cov_rr.addr_(mean_removed, mean_removed, alpha=-1)
    energy = float(((w_removed @ cov_rr) * w_removed).sum())
    paired = stats.paired
    if paired is None:
        return energy
    cov_re = paired.cross[removed] / n - torch.outer(mean_removed, paired.mean)
    return energy + 2 * float((w_removed * cov_re.T).sum()) + paired.energy / n - float(paired.mean.pow(2).sum())


def _chosen_low_rank(
    small: torch.Tensor, z_kept: torch.Tensor, target: torch.Tensor, tokens: int, scale: float, damping: float
) -> tuple[float, torch.Tensor | None]:
    """GCV through the tokens × tokens ZZᵀ: its eigenvectors carry the fit for every λ at once."""
    eigenvalues, vectors = torch.linalg.eigh(small)
    eigenvalues.clamp_min_(0)
    coords = vectors.T @ target  # tokens × out: the target along each eigen-direction
    ridge = _gcv_ridge(eigenvalues, coords.pow(2).sum(1), float(target.pow(2).sum()), tokens, scale, damping)
    if not math.isfinite(ridge):
        return ridge, None
    return ridge, z_kept.T @ (vectors @ (coords / (eigenvalues + ridge * scale)[:, None]))


def _chosen_dense(
    cov_kk: torch.Tensor, rhs: torch.Tensor, total: float, tokens: int, scale: float, damping: float
) -> tuple[float, torch.Tensor | None]:
    """GCV through the eigen-decomposition of Σ_KK (k × k), for when XᵀX, not X, was kept."""
    eigenvalues, vectors = torch.linalg.eigh(cov_kk)
    eigenvalues.clamp_min_(0)
    coords = vectors.T @ rhs  # k × out: Σ_KR W_Rᵀ along each eigen-direction (= √d · the target's)
    covered = eigenvalues > 1e-12 * float(eigenvalues.max().clamp_min(1e-300))
    explained = torch.where(covered, coords.pow(2).sum(1) / eigenvalues.clamp_min(1e-300), 0.0)
    ridge = _gcv_ridge(eigenvalues, explained, total, tokens, scale, damping)
    if not math.isfinite(ridge):
        return ridge, None
    return ridge, vectors @ (coords / (eigenvalues + ridge * scale)[:, None])
