"""What the calibration text looks like at the input of one projection, and the scores read from it.

The units pruning removes are *input* columns of one `nn.Linear`: `o_proj`
(its input columns are the query heads of the KV groups) and `down_proj` (its
input columns are the MLP channels). With X the calibration inputs of that
projection (tokens × in_features) and W its weight:

- `InputStatistics` accumulates n, Σx and the Gram matrix XᵀX (float64, so
  that millions of tokens add up without loss), or, while the tokens are few
  for the features, keeps X itself; that is all the maths needs, the unit
  scores here and the compensation in `cut.refit` alike.
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
        self.paired: PairedError | None = None  # an error to refit away as well (`record_inputs(error=)`)

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


class PairedError:
    """An error the refit of a projection should also take away, paired token by token with its inputs x.

    `error` (tokens × outputs, the tokens in the order the projection sees them) is what the projection's
    output would have to add so that the pruned model's residual stream matches the dense model's there
    (`cut.layer_pass`, residual correction). Accumulates Σ x·eᵀ (features × outputs, float64) as the
    inputs go by, and keeps Σ e and Σ‖e‖² for the refit's centring and its cross-validation.
    """

    ROWS = 4096  # tokens at a time in float64: a float64 copy of all of them would be GBs at 8B widths

    def __init__(self, error: torch.Tensor, features: int, device: torch.device | str = "cpu"):
        self.error = error.reshape(-1, error.shape[-1]).to(device)
        self.cross = torch.zeros(features, self.error.shape[1], dtype=torch.float64, device=device)
        self.total = torch.zeros(self.error.shape[1], dtype=torch.float64, device=device)
        self.energy = 0.0
        for first in range(0, self.error.shape[0], self.ROWS):
            rows = self.error[first : first + self.ROWS].to(torch.float64)
            self.total += rows.sum(0)
            self.energy += float(rows.pow(2).sum())
        self._seen = 0

    def add(self, x: torch.Tensor) -> None:
        rows = self.error[self._seen : self._seen + x.shape[0]].to(torch.float64)
        if rows.shape[0] != x.shape[0]:
            raise ValueError(f"the paired error has {self.error.shape[0]} tokens; the inputs ran past them")
        self.cross.addmm_(x.T, rows)
        self._seen += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.error.shape[0], 1)

    def raw(self) -> torch.Tensor:
        """e (tokens × outputs, float64), for the refit on the raw inputs (`InputStatistics.low_rank`)."""
        return self.error.to(torch.float64)


class record_inputs:
    """Context manager: accumulate the inputs of `linear` into InputStatistics while it is open.

    With `error` (tokens × outputs, `PairedError`) the statistics also pair the inputs with it (`stats.paired`).
    """

    def __init__(self, linear: nn.Linear, gram: bool = True, error: torch.Tensor | None = None):
        self.linear = linear
        self.stats = InputStatistics(linear.in_features, linear.weight.device, gram=gram)
        if error is not None:
            self.stats.paired = PairedError(error, linear.in_features, linear.weight.device)
        self._handle = None

    def _add(self, _module, args) -> None:
        self.stats.add(args[0])
        if self.stats.paired is not None:
            self.stats.paired.add(args[0].reshape(-1, args[0].shape[-1]).to(torch.float64))

    def __enter__(self) -> InputStatistics:
        self._handle = self.linear.register_forward_pre_hook(self._add)
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
