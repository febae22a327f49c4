"""The one layer walker: decoder layers visited in order, wherever they live, and run one at a time.

A `LayerStore` gives the layers (from memory, or from disk for streaming:
`streaming.StreamedLayers`); a `LayerRunner` runs one layer the way
`LlamaModel.forward` would, on calibration hidden states held as one tensor
(windows × seq_len × hidden). Pruning (`layer_pass`), unit measurement
(`pruning.scores.measure`) and streamed layer importance all walk the model this way.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

import torch
from torch import nn

__all__ = ["LayerStore", "InMemoryLayers", "LayerRunner", "runner_for"]


class LayerStore(Protocol):
    """Where decoder layers come from and go to (memory, or disk for streaming)."""

    config: object

    @property
    def num_layers(self) -> int: ...

    def embed(self, ids: torch.Tensor) -> torch.Tensor: ...

    def load(self, index: int) -> nn.Module: ...

    def release(self, index: int, layer: nn.Module, changed: bool) -> None: ...

    def begin_pruning(self) -> None: ...


class InMemoryLayers:
    """The layers of a loaded model; nothing moves."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    @property
    def num_layers(self) -> int:
        return len(self.model.model.layers)

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        embed = self.model.model.embed_tokens
        return embed(ids.to(embed.weight.device))

    def load(self, index: int) -> nn.Module:
        return self.model.model.layers[index]

    def release(self, index: int, layer: nn.Module, changed: bool) -> None:
        pass

    def begin_pruning(self) -> None:
        pass


class LayerRunner:
    """Runs a decoder layer on its own, with the mask and rotary embeddings LlamaModel.forward gives it."""

    def __init__(
        self, config, rotary: nn.Module, seq_len: int, device: torch.device, dtype: torch.dtype, batch_size: int = 8
    ):
        from transformers.masking_utils import create_causal_mask

        self.batch_size = batch_size
        self.position_ids = torch.arange(seq_len, device=device)[None]
        probe = torch.zeros(1, seq_len, config.hidden_size, device=device, dtype=dtype)
        with torch.no_grad():
            self.position_embeddings = rotary(probe, position_ids=self.position_ids)
        self.mask = create_causal_mask(
            config=config, inputs_embeds=probe, attention_mask=None, cache=None, position_ids=self.position_ids
        )

    def _chunks(self, hidden: torch.Tensor) -> Iterable[torch.Tensor]:
        return hidden.split(self.batch_size)

    @torch.no_grad()
    def attention_block(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """h + attn(norm(h)): the residual stream between attention and MLP."""

        def block(chunk: torch.Tensor) -> torch.Tensor:
            attn, _ = layer.self_attn(
                hidden_states=layer.input_layernorm(chunk),
                attention_mask=self.mask,
                position_ids=self.position_ids,
                position_embeddings=self.position_embeddings,
            )
            return chunk + attn

        return self._by_chunks(block, hidden)

    @torch.no_grad()
    def mlp_block(self, layer: nn.Module, middle: torch.Tensor) -> torch.Tensor:
        """h + mlp(norm(h)): the layer's output from the residual stream after attention."""
        return self._by_chunks(lambda chunk: chunk + layer.mlp(layer.post_attention_layernorm(chunk)), middle)

    def _by_chunks(self, block, hidden: torch.Tensor) -> torch.Tensor:
        # written into one preallocated tensor: a list of chunks plus torch.cat would hold the output twice
        out = torch.empty_like(hidden)
        first = 0
        for chunk in self._chunks(hidden):
            out[first : first + chunk.shape[0]] = block(chunk)
            first += chunk.shape[0]
        return out

    def layer(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return self.mlp_block(layer, self.attention_block(layer, hidden))


def runner_for(model: nn.Module, seq_len: int, batch_size: int = 8) -> LayerRunner:
    """A LayerRunner for the decoder layers of a loaded model (its device, dtype and rotary embedding)."""
    weight = next(model.parameters())
    return LayerRunner(model.config, model.model.rotary_emb, seq_len, weight.device, weight.dtype, batch_size)
