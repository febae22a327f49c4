"""Per-layer shapes of Llama-style models and the GQA invariant.

Llama, Mistral and Qwen2 share one layout (model.layers[i].self_attn.{q,k,v,o}_proj,
mlp.{gate,up,down}_proj); everything llmprune does relies on it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.io.remote_code.modeling_llmprune import apply_layer_shapes

__all__ = [
    "LayerShape",
    "layer_shape",
    "layer_shapes",
    "apply_layer_shapes",
    "is_uniform",
    "gqa_violations",
    "require_llama_style",
]


@dataclass(frozen=True)
class LayerShape:
    """What one decoder layer looks like."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    o_proj_bias: bool = False
    down_proj_bias: bool = False

    @property
    def gqa_ok(self) -> bool:
        return self.num_key_value_heads > 0 and self.num_attention_heads % self.num_key_value_heads == 0

    @property
    def gqa_ratio(self) -> float:
        return self.num_attention_heads / self.num_key_value_heads if self.num_key_value_heads else float("nan")

    def to_dict(self) -> dict:
        return asdict(self)


def require_llama_style(model: nn.Module) -> None:
    """Refuse models whose layout llmprune does not know, with one clear line."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or len(layers) == 0:
        raise UserInputError(
            f"{type(model).__name__} is not a Llama-style decoder (no model.layers)",
            "llmprune supports Llama, Mistral and Qwen2-style models",
        )
    first = layers[0]
    needed = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ]
    names = {name for name, _ in first.named_modules()}
    missing = [name for name in needed if name not in names]
    if missing:
        raise UserInputError(
            f"{type(model).__name__} is not Llama-style (its layers lack {', '.join(missing)})",
            "llmprune supports Llama, Mistral and Qwen2-style models",
        )


def attention_counts(layer: nn.Module) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of one decoder layer, read from its weights."""
    attn = layer.self_attn
    head_dim = attn.head_dim
    return attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim, head_dim


def layer_shape(layer: nn.Module) -> LayerShape:
    """One decoder layer's shape, read from its weights."""
    attn, mlp = layer.self_attn, layer.mlp
    head_dim = attn.head_dim
    return LayerShape(
        num_attention_heads=attn.q_proj.out_features // head_dim,
        num_key_value_heads=attn.k_proj.out_features // head_dim,
        head_dim=head_dim,
        intermediate_size=mlp.gate_proj.out_features,
        o_proj_bias=attn.o_proj.bias is not None,
        down_proj_bias=mlp.down_proj.bias is not None,
    )


def layer_shapes(model: nn.Module) -> list[LayerShape]:
    """Read each decoder layer's shape from its weights (the truth), not from the config."""
    return [layer_shape(layer) for layer in model.model.layers]


def is_uniform(shapes: list[LayerShape]) -> bool:
    return len(set(shapes)) <= 1


def gqa_violations(shapes: list[LayerShape]) -> list[int]:
    """Indices of layers whose query heads do not divide evenly into KV groups."""
    return [index for index, shape in enumerate(shapes) if not shape.gqa_ok]
