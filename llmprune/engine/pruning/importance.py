"""How much each decoder layer, and each unit inside a layer, matters.

Layer scores (higher = more important), `layer_importance(model, windows, method)`:
- `removal`: increase of the calibration loss when the layer is skipped. The
  hidden states entering layer i are those of the unmodified model, so skipping
  layer i only re-runs layers i+1..L-1 from them: L(L-1)/2 layer passes instead
  of L(L-1) for one full forward per skipped layer (`removal_importance_naive`,
  kept as the reference the fast way is tested and benchmarked against).
- `block-influence`: 1 - cosine similarity of a layer's input and output hidden
  states, averaged over tokens (ShortGPT); one forward pass.
- `taylor`: sum over the layer's weights of |w * dL/dw| (first-order Taylor
  estimate of the loss change when the layer's weights are zeroed, LLM-Pruner's
  element-wise criterion summed per layer); one forward + backward pass.

Unit scores (which heads, groups and channels go inside a layer) are in
`unit_scores`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.engine.data import TokenWindows
from llmprune.engine.core.errors import UserInputError
from llmprune.engine.pruning.layerwise import (
    CalibrationBatch,
    capture_layer_inputs,
    head_loss_sum,
    iterate_layers,
    run_layer,
)
from llmprune.engine.core.progress import CountProgress
from llmprune.engine.pruning.plan_options import LAYER_METHODS



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


def _removal(model: nn.Module, batches: list[CalibrationBatch], progress: CountProgress | None) -> tuple[list[float], float, int]:
    layers = [layer for _, layer in iterate_layers(model)]
    count = len(layers)
    skipped_nll = [0.0] * count
    tokens = 0
    passes = 0
    base_nll = 0.0
    for b_index, batch in enumerate(batches):
        hidden_in = batch.hidden  # entering layer i of the unmodified model
        for i in range(count):
            hidden = hidden_in
            for j in range(i + 1, count):
                hidden = run_layer(layers[j], batch, hidden)
            passes += count - i - 1
            skipped_nll[i] += head_loss_sum(model, hidden, batch.ids)[0]
            hidden_in = run_layer(layers[i], batch, hidden_in)
            passes += 1
        nll, n = head_loss_sum(model, hidden_in, batch.ids)
        base_nll += nll
        tokens += n
        _tick(progress, b_index + 1, len(batches))
    base = base_nll / tokens
    return [s / tokens - base for s in skipped_nll], base, passes


def _block_influence(model: nn.Module, batches: list[CalibrationBatch], progress: CountProgress | None) -> tuple[list[float], float, int]:
    layers = [layer for _, layer in iterate_layers(model)]
    totals = [0.0] * len(layers)
    tokens = 0
    nll_sum = 0.0
    for b_index, batch in enumerate(batches):
        hidden = batch.hidden
        for i, layer in enumerate(layers):
            out = run_layer(layer, batch, hidden)
            totals[i] += float((1 - F.cosine_similarity(hidden.float(), out.float(), dim=-1)).sum())
            hidden = out
        tokens += hidden.shape[0] * hidden.shape[1]
        nll_sum += head_loss_sum(model, hidden, batch.ids)[0]
        _tick(progress, b_index + 1, len(batches))
    predicted = sum(b.ids[:, 1:].numel() for b in batches)
    return [t / tokens for t in totals], nll_sum / predicted, len(layers) * len(batches)


def _taylor(model: nn.Module, windows: TokenWindows, batch_size: int, progress: CountProgress | None) -> tuple[list[float], float, int]:
    layers = [layer for _, layer in iterate_layers(model)]
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
            scores = [float(sum((p * p.grad).abs().sum() for p in params if p.grad is not None)) for params in layer_params]
    finally:
        for name, p in model.named_parameters():
            p.grad = None
            p.requires_grad_(saved_flags[name])
        model.train(was_training)
    return scores, loss_sum / batches, len(layers) * batches


def layer_importance(
    model: nn.Module,
    windows: TokenWindows,
    method: str = "removal",
    batch_size: int = 8,
    progress: CountProgress | None = None,
) -> LayerImportance:
    """Score every decoder layer on the calibration windows (the model is left unchanged)."""
    if method not in LAYER_METHODS:
        raise UserInputError(f"unknown --importance-method '{method}'", f"use one of {', '.join(LAYER_METHODS)}")
    start = time.perf_counter()
    if method == "taylor":
        scores, base, passes = _taylor(model, windows, batch_size, progress)
    else:
        batches = capture_layer_inputs(model, windows, batch_size)
        compute = _removal if method == "removal" else _block_influence
        scores, base, passes = compute(model, batches, progress)
    return LayerImportance(
        method=method,
        scores=scores,
        base_loss=base,
        samples=len(windows),
        seq_len=windows.seq_len,
        seconds=time.perf_counter() - start,
        layer_passes=passes,
    )


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
        method="removal-naive", scores=scores, base_loss=base, samples=len(windows), seq_len=windows.seq_len,
        seconds=time.perf_counter() - start, layer_passes=(count * count) * batches,
    )
