"""Running a Llama-style model one decoder layer at a time on calibration windows.

Layer importance and layer-by-layer pruning both need the hidden states that
enter each decoder layer. Instead of re-implementing the model's forward (mask
creation, rotary embeddings, which change between transformers versions), the
model's own forward is run up to the first decoder layer and stopped there; the
hidden states and the keyword arguments it passes to its layers (causal mask,
position embeddings, position ids) are kept, and every layer is then called
exactly as the model calls it (the SparseGPT/FLAP "catcher" pattern).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from llmprune.engine.data import TokenWindows


class _Caught(Exception):
    """Raised by the hook on the first decoder layer to stop the forward there."""


@dataclass
class CalibrationBatch:
    """One batch of calibration windows at some depth of the model."""

    ids: torch.Tensor  # [batch, seq_len] token ids (the labels of the loss)
    hidden: torch.Tensor  # [batch, seq_len, hidden] entering the current layer
    layer_kwargs: dict[str, Any]  # what the model passes to every decoder layer


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, windows: TokenWindows, batch_size: int = 8) -> list[CalibrationBatch]:
    """Hidden states entering decoder layer 0 for every batch of windows (one embedding pass)."""
    first = model.model.layers[0]
    caught: dict[str, Any] = {}

    def catcher(module: nn.Module, args: tuple, kwargs: dict) -> None:
        caught["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        caught["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Caught

    device = _model_device(model)
    batches = []
    handle = first.register_forward_pre_hook(catcher, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch_size):
            ids = windows.ids[start : start + batch_size].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _Caught:
                pass
            batches.append(CalibrationBatch(ids=ids, hidden=caught["hidden"], layer_kwargs=caught["kwargs"]))
    finally:
        handle.remove()
    return batches


@torch.no_grad()
def run_layer(layer: nn.Module, batch: CalibrationBatch, hidden: torch.Tensor | None = None) -> torch.Tensor:
    """The output of one decoder layer on `hidden` (default: the batch's current hidden states)."""
    output = layer(batch.hidden if hidden is None else hidden, **batch.layer_kwargs)
    # older transformers return a tuple (hidden, ...); 5.x returns the tensor
    return output[0] if isinstance(output, tuple) else output


def advance(layer: nn.Module, batches: list[CalibrationBatch]) -> None:
    """Replace each batch's hidden states by the layer's output on them (move one layer deeper)."""
    for batch in batches:
        batch.hidden = run_layer(layer, batch)


@torch.no_grad()
def head_loss_sum(model: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL (fp32) of the final norm + LM head on `hidden`, and the token count."""
    # the last position predicts nothing: leaving it out spares a copy of the (large) logits
    logits = model.lm_head(model.model.norm(hidden[:, :-1]))
    nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
    return float(nll), ids[:, 1:].numel()


def iterate_layers(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """The decoder layers the model's forward actually runs."""
    layers = model.model.layers[: model.config.num_hidden_layers]
    yield from enumerate(layers)
