"""Depth pruning: removing whole decoder layers.

Which layers: the ones that change the residual stream least on calibration
text, measured as block influence 1 - cos(h_in, h_out) (ShortGPT, Men et al.
2024), chosen by `allocate.ranking.least_influential` from `scores.measure.measure_units`. Dropping a layer is
exact surgery on the real transformers model: the layer leaves
`model.model.layers`, the config's layer count follows, and the remaining
attention modules are renumbered so that a KV cache indexes them correctly.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["drop_layers"]


def drop_layers(model: nn.Module, indices: Sequence[int]) -> None:
    """Remove these decoder layers from `model` in place."""
    layers = model.model.layers
    doomed = set(int(i) for i in indices)
    if any(i < 0 or i >= len(layers) for i in doomed):
        raise ValueError(f"layer indices must lie in [0, {len(layers)}), got {sorted(doomed)}")
    if len(doomed) >= len(layers):
        raise ValueError("cannot drop every layer")
    kept = [layer for i, layer in enumerate(layers) if i not in doomed]
    model.model.layers = nn.ModuleList(kept)
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        config.layer_types = [t for i, t in enumerate(layer_types) if i not in doomed]
    config.num_hidden_layers = len(kept)
    for new_index, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_index
