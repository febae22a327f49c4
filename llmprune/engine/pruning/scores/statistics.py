"""What the calibration text looks like at the input of one projection, and the scores read from it.

The units pruning removes are *input* columns of one `nn.Linear`: `o_proj`
(its input columns are the query heads of the KV groups) and `down_proj` (its
input columns are the MLP channels). With X the calibration inputs of that
projection (tokens × in_features) and W its weight:

- `InputStatistics` accumulates n, Σx and the Gram matrix XᵀX (float64, so
  that millions of tokens add up without loss); that is all the maths needs,
  the unit scores here and the compensation in `cut.refit` alike.
- fluctuation score of a set of columns S (FLAP-style, Ahn et al. 2024): the
  variance of their contribution to the output, tr(W_S Cov_SS W_Sᵀ). A unit
  whose output barely moves on real text can be replaced by a constant.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["InputStatistics", "record_inputs", "column_energy", "fluctuation", "group_fluctuation"]


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
