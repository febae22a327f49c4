"""Depth pruning: removing whole decoder layers.

Which layers: the ones that change the residual stream least on calibration
text, measured as block influence 1 - cos(h_in, h_out) (ShortGPT, Men et al.
2024), see `llmprune.engine.pruning.calibrated.measure_units`. Dropping a layer is
exact surgery on the real transformers model: the layer leaves
`model.model.layers`, the config's layer count follows, and the remaining
attention modules are renumbered so that a KV cache indexes them correctly.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ["least_influential", "drop_layers"]


def least_influential(influence: Sequence[float], count: int, keep_first: int = 1, keep_last: int = 1) -> list[int]:
    """The `count` layers with the lowest block influence; the first and last layers are never chosen."""
    candidates = [i for i in range(keep_first, len(influence) - keep_last)]
    if count > len(candidates):
        raise ValueError(f"cannot drop {count} of {len(influence)} layers (at most {len(candidates)})")
    return sorted(sorted(candidates, key=lambda i: influence[i])[:count])


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
