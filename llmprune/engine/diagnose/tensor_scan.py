"""Per-tensor statistics and the rule that decides when a weight is abnormally large.

Statistics are computed one tensor at a time, in fp32 chunks, so that a file can
be scanned without building the model and without holding a second full-size
copy of any tensor.

The "huge" rule (see `huge_tensors`). A tensor is flagged when either

- its largest finite |w| is at least `HUGE_RELATIVE` (100) times the median
  largest |w| of the tensors of the same kind in the *other* layers (the same
  name with the layer index removed, e.g. every `mlp.down_proj.weight`), and
  at least `RELATIVE_FLOOR` (1.0) in absolute terms; or
- its largest finite |w| is at least `HUGE_ABSOLUTE` (1000).

Why: weights of one kind have the same scale in every layer of a healthy model
(SmolLM2-135M: the largest layer-to-layer spread is 3.6x, in
post_attention_layernorm), so two orders of magnitude means a tensor was
scaled or blew up during training. The floor
keeps tiny tensors (zero-initialised biases and the like) from being flagged on
a ratio alone: values below 1 cannot overflow anything. The absolute rule
covers tensors that have no peers (embeddings, lm_head, the final norm): no
healthy Llama weight comes near 1000, and values that large overflow fp16
activations after a few multiplications.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass

import torch

from llmprune.engine.io.structure import LAYER_NAME, layer_index

HUGE_RELATIVE = 100.0
RELATIVE_FLOOR = 1.0
HUGE_ABSOLUTE = 1000.0
_CHUNK = 1 << 24  # elements per fp32 chunk (64 MiB)


def tensor_kind(name: str) -> str:
    """The name with its layer index removed: tensors of one kind share a scale."""
    return LAYER_NAME.sub(lambda m: m.group(0).replace(m.group(1), "*"), name, count=1)


@dataclass
class TensorStats:
    """What one tensor holds (max_abs and rms over its finite values)."""

    name: str
    shape: list[int]
    dtype: str
    numel: int
    nan: int
    inf: int
    zeros: int
    max_abs: float
    rms: float

    @property
    def layer(self) -> int | None:
        return layer_index(self.name)

    @property
    def kind(self) -> str:
        return tensor_kind(self.name)

    @property
    def zero_share(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "layer": self.layer, "zero_share": self.zero_share}


@torch.no_grad()
def tensor_stats(name: str, tensor: torch.Tensor) -> TensorStats:
    """NaN/Inf/zero counts, max |w| and RMS of `tensor`, computed chunk by chunk in fp32."""
    flat = tensor.detach().reshape(-1)
    nan = inf = zeros = 0
    max_abs = 0.0
    square_sum = 0.0
    finite_count = 0
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start : start + _CHUNK].float()
        norm = torch.linalg.vector_norm(chunk)
        if not torch.isfinite(norm):  # rare (NaN, Inf, or values beyond 1e19): count the bad values, leave them out
            chunk_nan = int(torch.isnan(chunk).sum())
            chunk_inf = int(torch.isinf(chunk).sum())
            nan, inf = nan + chunk_nan, inf + chunk_inf
            chunk = chunk[torch.isfinite(chunk)]
            norm = torch.linalg.vector_norm(chunk, dtype=torch.float64)
        zeros += chunk.numel() - int(torch.count_nonzero(chunk))
        if chunk.numel():
            low, high = torch.aminmax(chunk)
            max_abs = max(max_abs, -float(low), float(high))
            square_sum += float(norm) ** 2
            finite_count += chunk.numel()
    return TensorStats(
        name=name,
        shape=list(tensor.shape),
        dtype=str(tensor.dtype).removeprefix("torch."),
        numel=flat.numel(),
        nan=nan,
        inf=inf,
        zeros=zeros,
        max_abs=max_abs,
        rms=(square_sum / finite_count) ** 0.5 if finite_count else 0.0,
    )


@dataclass
class HugeTensor:
    """A tensor the huge rule flagged, and why."""

    stats: TensorStats
    reference: float | None  # median max |w| of its peers (None: absolute rule)
    rule: str

    @property
    def factor(self) -> float | None:
        return self.stats.max_abs / self.reference if self.reference else None


def huge_tensors(all_stats: list[TensorStats]) -> list[HugeTensor]:
    """Tensors whose values are far outside what is normal for their kind (rule in the module docstring)."""
    by_kind: dict[str, list[TensorStats]] = defaultdict(list)
    for stats in all_stats:
        by_kind[stats.kind].append(stats)
    flagged = []
    for stats in all_stats:
        peers = [other.max_abs for other in by_kind[stats.kind] if other is not stats]
        reference = statistics.median(peers) if peers else None
        if reference and stats.max_abs >= RELATIVE_FLOOR and stats.max_abs >= HUGE_RELATIVE * reference:
            rule = (
                f"max |w| {stats.max_abs:.3g} is {stats.max_abs / reference:,.0f}x that of the same tensor in other"
                f" layers ({reference:.3g})"
            )
            flagged.append(HugeTensor(stats, reference, rule))
        elif stats.max_abs >= HUGE_ABSOLUTE:
            flagged.append(HugeTensor(stats, None, f"max |w| {stats.max_abs:.3g} ≥ {HUGE_ABSOLUTE:g}"))
    return flagged


def largest_spread(all_stats: list[TensorStats]) -> tuple[str, float]:
    """The kind whose max |w| varies most between layers, and that factor (max / median of the others)."""
    by_kind: dict[str, list[float]] = defaultdict(list)
    for stats in all_stats:
        by_kind[stats.kind].append(stats.max_abs)
    worst = ("", 1.0)
    for kind, values in by_kind.items():
        for index, value in enumerate(values):
            others = values[:index] + values[index + 1 :]
            reference = statistics.median(others) if others else 0.0
            if reference > 0 and value / reference > worst[1]:
                worst = (kind, value / reference)
    return worst
