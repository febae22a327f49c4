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

The weights themselves are then refitted by `compensation.refit_least_squares`
on the kept units: the same solution the OBS updates converge to.
"""

from __future__ import annotations

import torch

from llmprune.engine.pruning.scores.statistics import InputStatistics

__all__ = ["obs_unit_scores", "obs_removal_error", "augmented_hessian"]

# Units removed per greedy step, as a share of the units a layer has: 1/32 keeps
# the order close to one-at-a-time (checked on SmolLM2) at a fraction of the steps.
_STEP_SHARE = 1 / 32


def augmented_hessian(stats: InputStatistics, damping: float) -> torch.Tensor:
    """[[XᵀX, Σx], [Σxᵀ, n]] / n with a ridge of damping·mean(diag) on the XᵀX block (float64)."""
    if stats.gram is None:
        raise ValueError("OBS scores need the Gram matrix (InputStatistics(gram=True))")
    features = stats.gram.shape[0]
    n = float(max(stats.count, 1))
    h = torch.empty(features + 1, features + 1, dtype=torch.float64, device=stats.gram.device)
    h[:features, :features] = stats.gram / n
    h[:features, features] = stats.total / n
    h[features, :features] = stats.total / n
    h[features, features] = 1.0
    ridge = damping * h[:features, :features].diagonal().mean().clamp_min(1e-12)
    h[:features, :features] += ridge * torch.eye(features, dtype=torch.float64, device=h.device)
    return h


def obs_removal_error(
    weight: torch.Tensor, bias: torch.Tensor | None, stats: InputStatistics, removed: list[int], damping: float = 1e-3
) -> float:
    """E(S) per token for removing the input columns `removed` at once (the closed form; for tests and checks)."""
    h_inv = torch.linalg.inv(augmented_hessian(stats, damping))
    w = _augmented_weight(weight, bias, h_inv.device)
    index = torch.as_tensor(removed, dtype=torch.long, device=h_inv.device)
    w_s = w.index_select(1, index)
    block = h_inv.index_select(0, index).index_select(1, index)
    return float(torch.einsum("oi,ij,oj->", w_s, torch.linalg.inv(block), w_s))


def _augmented_weight(weight: torch.Tensor, bias: torch.Tensor | None, device) -> torch.Tensor:
    w = weight.detach().to(torch.float64).to(device)
    b = (
        bias.detach().to(torch.float64).to(device)[:, None]
        if bias is not None
        else torch.zeros(w.shape[0], 1, dtype=torch.float64, device=device)
    )
    return torch.cat([w, b], 1)


@torch.no_grad()
def obs_unit_scores(
    weight: torch.Tensor,
    stats: InputStatistics,
    width: int,
    remove: int | None = None,
    damping: float = 1e-3,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One score per unit (contiguous blocks of `width` input columns; higher = keep), by greedy OBS removal.

    `remove`: how many units the greedy order takes away (None: all); the units
    left score above every removed one, by their OBS error at that point. With
    remove=0 the scores are the one-shot OBS errors ‖W̃_u‖²_{(H⁻¹_uu)⁻¹}.
    """
    h_inv = torch.linalg.inv(augmented_hessian(stats, damping))
    w = _augmented_weight(weight, bias, h_inv.device)
    units = weight.shape[1] // width
    columns = torch.arange(units * width, device=h_inv.device).view(units, width)
    alive = torch.ones(units, dtype=torch.bool, device=h_inv.device)
    scores = torch.empty(units, dtype=torch.float64, device=h_inv.device)
    step = max(1, int(units * _STEP_SHARE))
    floor, left = 0.0, units if remove is None else min(remove, units)
    while left > 0:
        errors = _unit_errors(w, h_inv, columns, alive, width)
        count = min(step, left)
        left -= count
        chosen = torch.topk(-errors, count).indices  # the cheapest alive units
        chosen = chosen[errors[chosen].argsort()]
        # the error of removing them together, spread over them in order, never below what was already paid
        index = columns[chosen].reshape(-1)
        block = h_inv.index_select(0, index).index_select(1, index)
        block_inv = torch.linalg.inv(block)
        w_s = w.index_select(1, index)
        joint = float(torch.einsum("oi,ij,oj->", w_s, block_inv, w_s))
        single = errors[chosen].clamp_min(0)
        shares = single / single.sum() * joint if float(single.sum()) > 0 else torch.full_like(single, joint / count)
        for unit, share in zip(chosen.tolist(), shares.tolist(), strict=False):
            floor = max(floor, share)
            scores[unit] = floor
            floor = floor * (1 + 1e-9) + 1e-300  # strictly increasing: top-k is unambiguous
        alive[chosen] = False
        # the OBS update: refit what is left, and drop the removed units from H⁻¹
        w -= (w_s @ block_inv) @ h_inv.index_select(0, index)
        h_inv -= h_inv.index_select(1, index) @ block_inv @ h_inv.index_select(0, index)
        w[:, index] = 0
    if alive.any():
        scores[alive] = floor + _unit_errors(w, h_inv, columns, alive, width)[alive].clamp_min(0) + 1e-300
    return scores


def _unit_errors(
    w: torch.Tensor, h_inv: torch.Tensor, columns: torch.Tensor, alive: torch.Tensor, width: int
) -> torch.Tensor:
    """E({u}) for every unit u given what has been removed so far (inf for removed units)."""
    errors = torch.full((columns.shape[0],), float("inf"), dtype=torch.float64, device=w.device)
    live = alive.nonzero().flatten()
    if width == 1:
        index = columns[live, 0]
        diag = h_inv.diagonal()[index].clamp_min(1e-300)
        errors[live] = w[:, index].pow(2).sum(0) / diag
        return errors
    for unit in live.tolist():
        index = columns[unit]
        block = h_inv.index_select(0, index).index_select(1, index)
        w_s = w.index_select(1, index)
        errors[unit] = torch.einsum("oi,ij,oj->", w_s, torch.linalg.inv(block), w_s)
    return errors
