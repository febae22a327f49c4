"""Optimal-brain-surgeon unit scores: which input units of a projection cost least once the rest is refitted.

For a projection y = W x + b whose input units (MLP channels of `down_proj`,
KV groups of `o_proj`) are removed, with H = X̃ᵀX̃ the Gram of the calibration
inputs augmented by a constant 1 (so the bias is refitted too), the least
output error of removing the set S and refitting everything else is

    E(S) = tr(W̃_S (H⁻¹_SS)⁻¹ W̃_Sᵀ)                       (OBS, Hassibi & Stork 1993)

and the refit of the remaining columns is W̃ ← W̃ − W̃_S (H⁻¹_SS)⁻¹ H⁻¹_S,:.
Removing S also changes what the next unit costs, so the units are taken
away greedily, a few at a time, updating W̃ and H⁻¹ after each step (ZipLM,
SlimGPT). A unit's score is the error increase at the step it was removed,
made non-decreasing along the removal order, so that "keep the k highest
scores" keeps exactly the k units the greedy order removed last, and the
scores of different layers can be ranked against each other (per token, as
the fluctuation score is).

The bias column is never removed and always refitted, so it can be eliminated
exactly: the x-block of H⁻¹ is (Σ + λI)⁻¹ with Σ the inputs' covariance, and
the scores and the updates of W need only C = Σ + λI (n × n, no augmentation).
Two ways to hold C⁻¹, chosen by the statistics:

- dense: C⁻¹ from a Cholesky factor, in one buffer downdated in place after
  each step (float64; float32 for inputs wider than DENSE_FLOAT64_FEATURES
  when the calibration has at least as many tokens as inputs, where float64
  would be 1.6 GB per copy for an 8B down_proj and float32 keeps the order);
- low rank, when the raw inputs are kept (fewer tokens than a quarter of the
  inputs, `InputStatistics.low_rank`: Llama-3-8B's default calibration): with
  Z the centred inputs / √n (tokens × n), C = λI + ZᵀZ and, over the units
  still alive, C⁻¹ = (I − Zᵀ K⁻¹ Z)/λ with K = λI + ZZᵀ (tokens × tokens,
  Woodbury). Removing units subtracts their columns from K; the update of W
  is a tokens-rank product. No n × n matrix is ever formed.

The weights themselves are then refitted by `cut.refit.refit_least_squares`
on the kept units: the same solution the OBS updates converge to.
"""

from __future__ import annotations

import torch

from llmprune.engine.pruning.scores.statistics import InputStatistics

__all__ = ["obs_unit_scores", "obs_removal_error", "inverse_hessian"]

# Units removed per greedy step, as a share of the units a layer has: 1/32 keeps
# the order close to one-at-a-time (checked on SmolLM2) at a fraction of the steps.
_STEP_SHARE = 1 / 32
# Up to this many inputs the dense path works in float64 (SmolLM2, o_proj of 8B: ≤ 134 MB a copy). Beyond,
# float32 halves the memory where the conditioning allows it: with at least as many calibration tokens as
# inputs. With fewer, C is the ridge on most directions and float32's downdates drift (on SmolLM2's
# down_proj with 256 tokens, a fifth of the kept channels changed): float64 then.
DENSE_FLOAT64_FEATURES = 8192


def _ridge(stats: InputStatistics, damping: float) -> float:
    """damping · mean(diag(XᵀX)/n), the ridge on C (as on the uncentred block of the augmented Hessian)."""
    return max(damping * float(stats.squares.mean()) / max(stats.count, 1), 1e-12)


def dense_dtype(stats: InputStatistics) -> torch.dtype:
    """float64, or float32 for wide layers whose calibration spans every input direction."""
    features = stats.total.shape[0]
    return torch.float32 if features > DENSE_FLOAT64_FEATURES and stats.count >= features else torch.float64


def inverse_hessian(stats: InputStatistics, damping: float, dtype: torch.dtype | None = None) -> torch.Tensor:
    """C⁻¹ = (Σ + λI)⁻¹ (n × n) through a Cholesky factor, in place in one n × n buffer."""
    if not stats.has_gram:
        raise ValueError("OBS scores need the Gram matrix (InputStatistics(gram=True))")
    dtype = dtype or dense_dtype(stats)
    n = float(max(stats.count, 1))
    c = stats.gram.to(dtype, copy=True).div_(n)
    mean = stats.mean.to(dtype)
    c.addr_(mean, mean, alpha=-1)
    c.diagonal().add_(_ridge(stats, damping))
    info = torch.empty((), dtype=torch.int32, device=c.device)
    torch.linalg.cholesky_ex(c, out=(c, info))  # the factor overwrites C (LAPACK works in place)
    if int(info) != 0:  # not positive definite in this precision: the float64 route, solved whole
        return (
            inverse_hessian(stats, damping, torch.float64).to(dtype)
            if dtype != torch.float64
            else _plain_inverse(stats, damping)
        )
    return torch.cholesky_inverse(c, out=c)


def _plain_inverse(stats: InputStatistics, damping: float) -> torch.Tensor:
    """The plain inverse where Cholesky fails; a non-finite C (a broken model, --force) gives non-finite scores."""
    c = stats.covariance()
    c.diagonal().add_(_ridge(stats, damping))
    return torch.linalg.inv_ex(c).inverse


def _spd_inverse(block: torch.Tensor) -> torch.Tensor:
    factor, info = torch.linalg.cholesky_ex(block)
    return torch.cholesky_inverse(factor) if int(info) == 0 else torch.linalg.inv_ex(block).inverse


class _Dense:
    """C⁻¹ held whole, downdated in place when units go."""

    def __init__(self, stats: InputStatistics, damping: float, dtype: torch.dtype | None = None):
        self.h_inv = inverse_hessian(stats, damping, dtype)
        self.dtype = self.h_inv.dtype

    def diagonal(self) -> torch.Tensor:
        return self.h_inv.diagonal().to(torch.float64)

    def block(self, index: torch.Tensor) -> torch.Tensor:
        return self.h_inv[index[:, None], index].to(torch.float64)

    def remove(self, w: torch.Tensor, index: torch.Tensor, block_inv: torch.Tensor) -> None:
        """W -= W_S (C⁻¹_SS)⁻¹ C⁻¹_S,: and C⁻¹ -= C⁻¹_:,S (C⁻¹_SS)⁻¹ C⁻¹_S,:, both in place (no n × n temporary)."""
        rows = self.h_inv.index_select(0, index)  # s × n (= C⁻¹_:,S transposed: C⁻¹ is symmetric)
        block_inv = block_inv.to(self.dtype)
        w.addmm_(w.index_select(1, index) @ block_inv, rows, alpha=-1)
        self.h_inv.addmm_(rows.T, block_inv @ rows, alpha=-1)


class _LowRank:
    """C⁻¹ over the alive units as (I − Zᵀ K⁻¹ Z)/λ, K = λI + ZZᵀ; removed units' columns of Z are zeroed."""

    def __init__(self, stats: InputStatistics, damping: float):
        n = float(max(stats.count, 1))
        self.z = (stats.inputs() - stats.mean).div_(n**0.5)  # tokens × features, float64
        self.ridge = _ridge(stats, damping)
        self.k = self.z @ self.z.T
        self.k.diagonal().add_(self.ridge)
        self._refresh()

    def _refresh(self) -> None:
        self.k_inv = _spd_inverse(self.k)
        self.k_inv_z = self.k_inv @ self.z  # tokens × features

    def diagonal(self) -> torch.Tensor:
        return (1 - (self.z * self.k_inv_z).sum(0)) / self.ridge

    def block(self, index: torch.Tensor) -> torch.Tensor:
        z_s = self.z.index_select(1, index)
        block = -(z_s.T @ self.k_inv_z.index_select(1, index))
        block.diagonal().add_(1)
        return block / self.ridge

    def remove(self, w: torch.Tensor, index: torch.Tensor, block_inv: torch.Tensor) -> None:
        """W_R' += W_S (C⁻¹_SS)⁻¹ Z_Sᵀ K⁻¹ Z_R' / λ (C⁻¹_S,R' = −Z_Sᵀ K⁻¹ Z_R'/λ), then K -= Z_S Z_Sᵀ."""
        z_s = self.z.index_select(1, index)
        step = (w.index_select(1, index).to(torch.float64) @ block_inv) @ self.k_inv_z.index_select(1, index).T
        self.z[:, index] = 0
        self.k.addmm_(z_s, z_s.T, alpha=-1)
        # only the columns still alive change (removed ones have zero columns in Z): the work shrinks as units go
        live = self.z.abs().sum(0).nonzero().flatten()
        w.index_add_(1, live, (step / self.ridge).to(w.dtype) @ self.z.index_select(1, live).to(w.dtype))
        self._refresh()


def _hessian(stats: InputStatistics, damping: float, dtype: torch.dtype | None = None) -> _Dense | _LowRank:
    return _LowRank(stats, damping) if stats.low_rank else _Dense(stats, damping, dtype)


def obs_removal_error(
    weight: torch.Tensor, bias: torch.Tensor | None, stats: InputStatistics, removed: list[int], damping: float = 1e-3
) -> float:
    """E(S) per token for removing the input columns `removed` at once (the closed form; for tests and checks).

    The bias is refitted, so it does not change the error (it is eliminated exactly: see the module's notes).
    """
    hessian = _hessian(stats, damping)
    index = torch.as_tensor(removed, dtype=torch.long, device=stats.total.device)
    w_s = weight.detach().to(torch.float64).to(index.device).index_select(1, index)
    return float(torch.einsum("oi,ij,oj->", w_s, torch.linalg.inv(hessian.block(index)), w_s))


@torch.no_grad()
def obs_unit_scores(
    weight: torch.Tensor,
    stats: InputStatistics,
    width: int,
    remove: int | None = None,
    damping: float = 1e-3,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """One score per unit (contiguous blocks of `width` input columns; higher = keep), by greedy OBS removal.

    `remove`: how many units the greedy order takes away (None: all); the units
    left score above every removed one, by their OBS error at that point. With
    remove=0 the scores are the one-shot OBS errors ‖W_u‖²_{(C⁻¹_uu)⁻¹}. `bias`
    does not change them (it is refitted; kept for the callers that pass it).
    `dtype`: the dense inverse's precision (None: float64 up to DENSE_FLOAT64_FEATURES inputs).
    """
    hessian = _hessian(stats, damping, dtype)
    device = stats.total.device
    # one working copy of W, in the dense inverse's precision (float32 at 8B widths), updated in place
    w = weight.detach().to(device=device, dtype=getattr(hessian, "dtype", torch.float32), copy=True)
    units = weight.shape[1] // width
    columns = torch.arange(units * width, device=device).view(units, width)
    alive = torch.ones(units, dtype=torch.bool, device=device)
    scores = torch.empty(units, dtype=torch.float64, device=device)
    step = max(1, int(units * _STEP_SHARE))
    floor, left = 0.0, units if remove is None else min(remove, units)
    while left > 0:
        errors = _unit_errors(w, hessian, columns, alive, width)
        count = min(step, left)
        left -= count
        chosen = torch.topk(-errors, count).indices  # the cheapest alive units
        chosen = chosen[errors[chosen].argsort()]
        # the error of removing them together, spread over them in order, never below what was already paid
        index = columns[chosen].reshape(-1)
        block_inv = _spd_inverse(hessian.block(index))
        w_s = w.index_select(1, index).to(torch.float64)
        joint = float(torch.einsum("oi,ij,oj->", w_s, block_inv, w_s))
        single = errors[chosen].clamp_min(0)
        shares = single / single.sum() * joint if float(single.sum()) > 0 else torch.full_like(single, joint / count)
        for unit, share in zip(chosen.tolist(), shares.tolist(), strict=False):
            floor = max(floor, share)
            scores[unit] = floor
            floor = floor * (1 + 1e-9) + 1e-300  # strictly increasing: top-k is unambiguous
        alive[chosen] = False
        # the OBS update: refit what is left, and drop the removed units from C⁻¹
        hessian.remove(w, index, block_inv)
        w[:, index] = 0
    if alive.any():
        scores[alive] = floor + _unit_errors(w, hessian, columns, alive, width)[alive].clamp_min(0) + 1e-300
    return scores


def _unit_errors(w: torch.Tensor, hessian, columns: torch.Tensor, alive: torch.Tensor, width: int) -> torch.Tensor:
    """E({u}) for every unit u given what has been removed so far (inf for removed units)."""
    errors = torch.full((columns.shape[0],), float("inf"), dtype=torch.float64, device=w.device)
    live = alive.nonzero().flatten()
    if width == 1:
        index = columns[live, 0]
        diag = hessian.diagonal()[index].clamp_min(1e-300)
        energy = torch.linalg.vector_norm(w, dim=0, dtype=torch.float64).pow(2)  # no copy of W's columns
        errors[live] = energy[index] / diag
        return errors
    for unit in live.tolist():
        index = columns[unit]
        w_s = w.index_select(1, index).to(torch.float64)
        errors[unit] = torch.einsum("oi,ij,oj->", w_s, _spd_inverse(hessian.block(index)), w_s)
    return errors
