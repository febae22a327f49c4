"""One pass over the dense model: every layer's unit scores and its block influence.

The walk goes through a `walk.LayerStore` (in memory, or streamed from disk),
so the same code measures a model that does not fit. The scores are what the
global ranking (`allocate.ranking`) orders; the block influence is what depth
pruning drops layers by.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from llmprune.engine.core.progress import StageProgress
from llmprune.engine.io.architecture import attention_counts
from llmprune.engine.pruning.scores import statistics
from llmprune.engine.pruning.scores.defaults import DEFAULT_UNIT_SCORE
from llmprune.engine.pruning.scores.units import get_unit_score
from llmprune.engine.walk.layer_store import LayerRunner, LayerStore

__all__ = ["LayerUnitScores", "measure_units"]


@dataclass
class LayerUnitScores:
    """Dense-model unit scores of one layer, and the energy of the residual stream entering it."""

    group_scores: list[float]
    channel_scores: list[float]
    input_energy: float  # mean ‖h‖² of the tokens entering the layer
    influence: float = 0.0  # 1 - cos(h_in, h_out), averaged over tokens (ShortGPT block influence)

    def to_dict(self) -> dict:
        return asdict(self)


# float64 copies of all calibration hidden states would be the largest thing in a streamed run
# (50 windows x 128 tokens x 576: 30 MB each for SmolLM2, GBs for 8B); a few windows at a time suffice
_WINDOWS_PER_CHUNK = 8


def _per_token_mean(values, *hidden: torch.Tensor) -> float:
    """Mean over every token of `values(*chunks)` (per-token float64 values), a few windows at a time."""
    total, tokens = 0.0, 0
    for chunks in zip(*(h.split(_WINDOWS_PER_CHUNK) for h in hidden), strict=False):
        per_token = values(*(c.flatten(0, 1).double() for c in chunks))
        total += float(per_token.sum())
        tokens += per_token.numel()
    return total / tokens


@torch.no_grad()
def _cosine_gap(before: torch.Tensor, after: torch.Tensor) -> float:
    """Block influence: mean over tokens of 1 - cos(h_in, h_out)."""
    return _per_token_mean(lambda b, a: 1 - torch.nn.functional.cosine_similarity(b, a, dim=-1), before, after)


@torch.no_grad()
def _energy(hidden: torch.Tensor) -> float:
    """Mean over tokens of ‖h‖²."""
    return _per_token_mean(lambda h: h.pow(2).sum(-1), hidden)


@torch.no_grad()
def measure_units(
    store: LayerStore,
    ids: torch.Tensor,
    runner: LayerRunner,
    unit_score: str = DEFAULT_UNIT_SCORE,
    progress: StageProgress | None = None,
) -> list[LayerUnitScores]:
    """One pass over the dense model: unit scores and block influence of every layer."""
    score = get_unit_score(unit_score)
    hidden = store.embed(ids)
    results = []
    for index in range(store.num_layers):
        layer = store.load(index)
        heads, kv_heads, head_dim = attention_counts(layer)
        with statistics.record_inputs(
            layer.self_attn.o_proj, gram=score.needs_gram(heads // kv_heads * head_dim)
        ) as attn_stats:
            middle = runner.attention_block(layer, hidden)
        with statistics.record_inputs(layer.mlp.down_proj, gram=score.needs_gram(1)) as mlp_stats:
            out = runner.mlp_block(layer, middle)
        group_scores = score.kv_groups(layer, attn_stats)
        channel_scores = score.mlp_channels(layer, mlp_stats)
        results.append(
            LayerUnitScores(
                group_scores=group_scores.tolist(),
                channel_scores=channel_scores.tolist(),
                input_energy=_energy(hidden),
                influence=_cosine_gap(hidden, out),
            )
        )
        hidden = out
        store.release(index, layer, changed=False)
        if progress:
            progress("measure", index + 1, store.num_layers)
    return results
