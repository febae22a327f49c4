"""Layer importance with the model on disk: one decoder layer in memory at a time.

`removal` (loss increase when layer i is skipped) needs, for layer i, only the
hidden states entering layer i and the layers after it. Streaming turns the
loops around: every layer is read once, in order, and applied to every
"skip" stream opened so far; the stream that skips layer i is opened at layer
i with the hidden states entering it, and is not run through layer i. The
work is the same L(L-1)/2 layer passes as the in-memory fast path
(`importance.walked_scores`, shared with it); the memory is one layer plus one set of calibration
hidden states per layer (windows × seq_len × hidden each), not the model.
`block-influence` streams in one pass. Criteria that cannot stream say so
(`layers.LayerScore.can_stream`).
"""

from __future__ import annotations

import time

import torch

from llmprune.engine.data import TokenWindows
from llmprune.engine.evaluate import window_nll
from llmprune.engine.pruning.scores.layer_importance import LayerImportance, walked_scores
from llmprune.engine.pruning.scores.layers import get_layer_score
from llmprune.engine.walk.streaming import StreamedLayers

__all__ = ["streamed_layer_importance"]


class _Head:
    """Final norm + LM head, read from disk once (a tied head reuses the embedding).

    The head stays in its stored dtype and is applied a vocabulary slice at a time
    (evaluate.window_nll): an 8B head made fp32 at once would be 2 GB, plus its logits.
    """

    def __init__(self, store: StreamedLayers):
        norm = store.skeleton.model.norm
        norm.to_empty(device=store.device)
        norm.load_state_dict({k: v.to(store.dtype) for k, v in store.read_tensors("model.norm.").items()})
        self.norm = norm
        self.store = store
        self.weight = (store.read_tensors("lm_head.") or store.read_tensors("model.embed_tokens."))["weight"]

    @torch.no_grad()
    def nll_sum(self, hidden: torch.Tensor, ids: torch.Tensor, batch_size: int) -> float:
        return float(
            sum(
                window_nll(self.norm(h[None])[0], window[1:], self.weight, self.store)
                for h, window in zip(hidden, ids, strict=False)
            )
        )


@torch.no_grad()
def streamed_layer_importance(
    store: StreamedLayers,
    windows: TokenWindows,
    method: str = "removal",
    batch_size: int = 8,
    progress=None,
) -> LayerImportance:
    """The same scores as `importance.layer_importance` (the same walker), reading one layer at a time from disk."""
    get_layer_score(method, stream=True)  # one line for a criterion that cannot stream
    start = time.perf_counter()
    runner = store.runner(windows.seq_len, batch_size)
    head = None

    def head_nll(hidden: torch.Tensor, ids: torch.Tensor) -> float:
        nonlocal head
        head = head or _Head(store)  # read once every layer has been released
        return head.nll_sum(hidden, ids, batch_size)

    scores, base, passes = walked_scores(store, runner, head_nll, windows.ids, method, batch_size, progress)
    return LayerImportance(
        method=method,
        scores=scores,
        base_loss=base,
        samples=len(windows),
        seq_len=windows.seq_len,
        seconds=time.perf_counter() - start,
        layer_passes=passes,
    )
