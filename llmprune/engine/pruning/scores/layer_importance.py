"""Layer importance measured on calibration text (the criteria and their names are in `layers`).

`walked_scores` computes `removal` and `block-influence` with the one layer
walker, in memory or streamed: the hidden states entering layer i are those of
the unmodified model, so skipping layer i only re-runs layers i+1..L-1 from
them: L(L-1)/2 layer passes instead of L(L-1) for one full forward per skipped
layer (`removal_importance_naive`, kept as the reference the fast way is tested
and benchmarked against). `taylor_scores` needs one forward + backward pass.

Unit scores (which heads, groups and channels go inside a layer) are in `units`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.engine.core.progress import CountProgress
from llmprune.engine.data import TokenWindows
from llmprune.engine.evaluate import sliced_nll
from llmprune.engine.pruning.scores.layers import DEFAULT_LAYER_SCORE, get_layer_score
from llmprune.engine.walk.layer_store import InMemoryLayers, LayerRunner, LayerStore, runner_for


@dataclass
class LayerImportance:
    """One score per decoder layer (higher = more important) and how it was obtained."""

    method: str
    scores: list[float]
    base_loss: float
    samples: int
    seq_len: int
    seconds: float
    layer_passes: int  # decoder-layer forward calls on a batch: the work done

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _tick(progress: CountProgress | None, done: int, total: int) -> None:
    if progress:
        progress(done, total)


@torch.no_grad()
def walked_scores(
    store: LayerStore,
    runner: LayerRunner,
    head_nll: Callable[[torch.Tensor, torch.Tensor], float],
    ids: torch.Tensor,
    method: str,
    batch_size: int,
    progress: CountProgress | None = None,
) -> tuple[list[float], float, int]:
    """removal / block-influence scores with the one layer walker (in memory or streamed), every layer read once.

    removal: the stream that skips layer i is opened at layer i with the hidden states entering it and
    run through every later layer; L(L-1)/2 layer passes, one set of hidden states per open stream.
    `head_nll(hidden, ids)` is the summed next-token NLL of the final norm + LM head.
    Returns (scores, base loss, decoder-layer calls on a batch).
    """
    hidden = store.embed(ids)
    count = store.num_layers
    skipped: list[torch.Tensor] = []  # skipped[i]: the hidden states of the model without layer i
    influence = [0.0] * count
    passes = 0
    for index in range(count):
        layer = store.load(index)
        if method == "removal":
            skipped = [runner.layer(layer, stream) for stream in skipped]
            passes += len(skipped)
            skipped.append(hidden)
        out = runner.layer(layer, hidden)
        passes += 1
        influence[index] = float((1 - F.cosine_similarity(hidden.float(), out.float(), dim=-1)).mean())
        hidden = out
        store.release(index, layer, changed=False)
        _tick(progress, index + 1, count)
    tokens = ids[:, 1:].numel()
    base = head_nll(hidden, ids) / tokens
    scores = [head_nll(stream, ids) / tokens - base for stream in skipped] if method == "removal" else influence
    return scores, base, passes * -(-ids.shape[0] // batch_size)


def model_head_nll(model: nn.Module, batch_size: int) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """Summed next-token NLL (fp32) of a loaded model's final norm + LM head, a few windows at a time."""
    head = model.lm_head
    parameter = head.weight

    @torch.no_grad()
    def nll(hidden: torch.Tensor, ids: torch.Tensor) -> float:
        total = 0.0
        for first in range(0, hidden.shape[0], batch_size):
            # the last position predicts nothing
            normed = model.model.norm(hidden[first : first + batch_size, :-1])
            targets = ids[first : first + batch_size, 1:].reshape(-1)
            total += float(
                sliced_nll(
                    normed.reshape(-1, normed.shape[-1]),
                    targets,
                    parameter,
                    parameter.device,
                    parameter.dtype,
                    head.bias,
                )
            )
        return total

    return nll


def taylor_scores(
    model: nn.Module, windows: TokenWindows, batch_size: int, progress: CountProgress | None
) -> tuple[list[float], float, int]:
    layers = list(model.model.layers[: model.config.num_hidden_layers])
    device = next(model.parameters()).device
    saved_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
    layer_params = [[p for p in layer.parameters()] for layer in layers]
    for params in layer_params:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
    batches = max(1, -(-len(windows) // batch_size))
    loss_sum = 0.0
    was_training = model.training
    model.eval()
    try:
        for b_index, start in enumerate(range(0, len(windows), batch_size)):
            ids = windows.ids[start : start + batch_size].to(device)
            logits = model(input_ids=ids, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            (loss / batches).backward()
            loss_sum += float(loss.detach())
            _tick(progress, b_index + 1, batches)
        with torch.no_grad():
            scores = [
                float(sum((p * p.grad).abs().sum() for p in params if p.grad is not None)) for params in layer_params
            ]
    finally:
        for name, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(saved_flags[name])
        model.train(was_training)
    return scores, loss_sum / batches, len(layers) * batches


def layer_importance(
    model: nn.Module,
    windows: TokenWindows,
    method: str = DEFAULT_LAYER_SCORE,
    batch_size: int = 8,
    progress: CountProgress | None = None,
) -> LayerImportance:
    """Score every decoder layer on the calibration windows (the model is left unchanged)."""
    criterion = get_layer_score(method)
    start = time.perf_counter()
    if not criterion.walked:
        measure = criterion.measure_in_memory or _BUILT_IN[criterion.name]
        scores, base, passes = measure(model, windows, batch_size, progress)
    else:
        runner = runner_for(model, windows.seq_len, batch_size)
        ids = windows.ids.to(next(model.parameters()).device)
        scores, base, passes = walked_scores(
            InMemoryLayers(model), runner, model_head_nll(model, batch_size), ids, method, batch_size, progress
        )
    return LayerImportance(
        method=method,
        scores=scores,
        base_loss=base,
        samples=len(windows),
        seq_len=windows.seq_len,
        seconds=time.perf_counter() - start,
        layer_passes=passes,
    )


_BUILT_IN = {"taylor": taylor_scores}  # the built-in criteria the walker does not compute


class _SkippedLayer(nn.Module):
    """Stands in for a decoder layer: returns its input unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@torch.no_grad()
def removal_importance_naive(model: nn.Module, windows: TokenWindows, batch_size: int = 8) -> LayerImportance:
    """The reference: one full forward of the model per skipped layer (plus one unmodified)."""
    start = time.perf_counter()
    device = next(model.parameters()).device
    layers = model.model.layers
    count = model.config.num_hidden_layers

    def mean_loss() -> float:
        # the usual way: the model's own forward with labels
        total, tokens = 0.0, 0
        for first in range(0, len(windows), batch_size):
            ids = windows.ids[first : first + batch_size].to(device)
            total += float(model(input_ids=ids, labels=ids, use_cache=False).loss) * ids[:, 1:].numel()
            tokens += ids[:, 1:].numel()
        return total / tokens

    base = mean_loss()
    scores = []
    for i in range(count):
        original = layers[i]
        layers[i] = _SkippedLayer()
        try:
            scores.append(mean_loss() - base)
        finally:
            layers[i] = original
    batches = -(-len(windows) // batch_size)
    return LayerImportance(
        method="removal-naive",
        scores=scores,
        base_loss=base,
        samples=len(windows),
        seq_len=windows.seq_len,
        seconds=time.perf_counter() - start,
        layer_passes=(count * count) * batches,
    )
