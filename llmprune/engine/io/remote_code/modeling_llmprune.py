"""Llama with per-layer shapes, as written by llmprune for non-uniform pruned models.

This file is copied into every saved non-uniform model directory, so that

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

works anywhere transformers is installed. It must import nothing but torch and
transformers. It does not fork the modeling code: it builds the stock Llama
model and then resizes each decoder layer's projections to the shapes recorded
in `config.layer_shapes`, fixing the per-module attributes that forward reads.
"""

from __future__ import annotations

from torch import nn
from transformers import LlamaForCausalLM


def _resized_linear(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    if old.in_features == in_features and old.out_features == out_features and (old.bias is not None) == bias:
        return old
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def apply_layer_shapes(model: nn.Module, layer_shapes: list[dict]) -> None:
    """Resize every decoder layer of a Llama-style model to the recorded shapes.

    Each entry: num_attention_heads, num_key_value_heads, intermediate_size and,
    optionally, o_proj_bias / down_proj_bias (output biases added by pruning
    compensation). Weights of resized modules are fresh; load a state dict after.
    """
    layers = model.model.layers
    if len(layer_shapes) != len(layers):
        raise ValueError(f"layer_shapes has {len(layer_shapes)} entries but the model has {len(layers)} layers")
    hidden = model.config.hidden_size
    for layer, shape in zip(layers, layer_shapes, strict=False):
        attn, mlp = layer.self_attn, layer.mlp
        heads, kv_heads = int(shape["num_attention_heads"]), int(shape["num_key_value_heads"])
        head_dim = attn.head_dim
        qkv_bias = attn.q_proj.bias is not None
        o_bias = bool(shape.get("o_proj_bias", attn.o_proj.bias is not None))
        attn.q_proj = _resized_linear(attn.q_proj, hidden, heads * head_dim, qkv_bias)
        attn.k_proj = _resized_linear(attn.k_proj, hidden, kv_heads * head_dim, qkv_bias)
        attn.v_proj = _resized_linear(attn.v_proj, hidden, kv_heads * head_dim, qkv_bias)
        attn.o_proj = _resized_linear(attn.o_proj, heads * head_dim, hidden, o_bias)
        # forward reads these to repeat KV heads; keep them in step with the weights.
        attn.num_key_value_groups = heads // kv_heads
        attn.num_heads = heads
        attn.num_key_value_heads = kv_heads

        width = int(shape["intermediate_size"])
        gate_bias = mlp.gate_proj.bias is not None
        down_bias = bool(shape.get("down_proj_bias", mlp.down_proj.bias is not None))
        mlp.gate_proj = _resized_linear(mlp.gate_proj, hidden, width, gate_bias)
        mlp.up_proj = _resized_linear(mlp.up_proj, hidden, width, gate_bias)
        mlp.down_proj = _resized_linear(mlp.down_proj, width, hidden, down_bias)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width


class LlmpruneLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose decoder layers may differ in heads and MLP width."""

    def __init__(self, config):
        super().__init__(config)
        shapes = getattr(config, "layer_shapes", None)
        if shapes:
            apply_layer_shapes(self, shapes)
