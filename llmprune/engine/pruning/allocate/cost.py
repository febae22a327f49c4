"""The one parameter-cost model: what a KV group, a query head, an MLP channel or a whole decoder layer costs.

Every allocator (the global ranking, the layer-importance plan, a searched allocation) and every report asks
this model, so that "how many parameters does this plan remove" has one answer. It reads nothing but shapes:

- a KV group is one KV head and its query heads: the q_proj rows and o_proj columns of those query heads,
  the k_proj and v_proj rows of the KV head, and their q/k/v biases when the model has them (Qwen2);
- a query head is its q_proj rows and o_proj columns (and q bias);
- an MLP channel is a gate_proj row, an up_proj row and a down_proj column (and gate/up biases);
- a decoder layer is its projections, their biases and its two norms; a removed layer costs nothing;
- compensation (bias or least squares) gives o_proj and down_proj an output bias when they had none:
  `output_biases=True` counts those `hidden_size` parameters each;
- what lies outside the decoder layers (embeddings, final norm, an untied LM head; a tied head is stored
  and counted once) is `total - sum(layer costs)`, so ties need no special case;
- a stock config with attention_bias / mlp_bias gives every projection a (zero) bias on save:
  `with_biases(qkv_bias, mlp_bias)` asks about the model as saved that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from torch import nn

from llmprune.engine.io.architecture import LayerShape, layer_shape

__all__ = ["ParameterCost"]


@dataclass(frozen=True)
class ParameterCost:
    """Enough about a model to count the parameters of any allocation for it, without touching it."""

    total: int
    """Every parameter of the model as it is (a tied LM head counted once)."""
    hidden_size: int
    shapes: tuple[LayerShape, ...]
    """Each decoder layer's shape, read from its weights."""
    qkv_bias: bool = False
    mlp_bias: bool = False
    outside: int | None = None
    """Parameters outside the decoder layers; None: `total` minus the layers' cost (see `outside_layers`)."""

    def __post_init__(self):
        if self.outside is None:
            layers = sum(self.layer(i) for i in range(len(self.shapes)))
            object.__setattr__(self, "outside", self.total - layers)

    def with_biases(self, qkv_bias: bool, mlp_bias: bool) -> ParameterCost:
        """The same model asked about with (or without) q/k/v and gate/up biases, as a stock config that demands
        them saves it (zero biases); `total` stays the model's as it is."""
        return replace(self, qkv_bias=qkv_bias, mlp_bias=mlp_bias, outside=self.outside)

    @classmethod
    def of_model(cls, model: nn.Module, total: int | None = None) -> ParameterCost:
        """The cost model of a loaded model (or a meta-device skeleton, with `total` read from disk)."""
        layers = list(model.model.layers)
        first = layers[0]
        return cls(
            total=sum(p.numel() for p in model.parameters()) if total is None else int(total),
            hidden_size=model.config.hidden_size,
            shapes=tuple(layer_shape(layer) for layer in layers),
            qkv_bias=first.self_attn.q_proj.bias is not None,
            mlp_bias=first.mlp.gate_proj.bias is not None,
        )

    @property
    def num_layers(self) -> int:
        return len(self.shapes)

    # ---------------------------------------------------------------- one unit

    def query_head(self, index: int) -> int:
        """Parameters one query head of layer `index` costs (q_proj rows, o_proj columns, q bias)."""
        head_dim = self.shapes[index].head_dim
        return 2 * head_dim * self.hidden_size + (head_dim if self.qkv_bias else 0)

    def kv_group(self, index: int) -> int:
        """Parameters one KV group of layer `index` costs (its query heads, its k and v rows, their biases)."""
        shape = self.shapes[index]
        per_group = shape.num_attention_heads // shape.num_key_value_heads
        kv = 2 * shape.head_dim * self.hidden_size + (2 * shape.head_dim if self.qkv_bias else 0)
        return per_group * self.query_head(index) + kv

    def mlp_channel(self, index: int) -> int:
        """Parameters one MLP channel of layer `index` costs (gate and up rows, a down column, their biases)."""
        return 3 * self.hidden_size + (2 if self.mlp_bias else 0)

    def missing_output_biases(self, index: int) -> int:
        """Parameters compensation adds to layer `index`: an output bias for o_proj and down_proj if missing."""
        shape = self.shapes[index]
        return self.hidden_size * ((not shape.o_proj_bias) + (not shape.down_proj_bias))

    # ---------------------------------------------------------------- one layer

    def layer(
        self,
        index: int,
        kv_groups: int | None = None,
        mlp_channels: int | None = None,
        heads_per_group: int | None = None,
        output_biases: bool | None = None,
        removed: bool = False,
    ) -> int:
        """Parameters of decoder layer `index` keeping these units (None: as it is now), or 0 if `removed`.

        `output_biases`: True when o_proj and down_proj carry an output bias after the cut (compensation adds
        one), False when neither does, None: as the layer has them now.
        """
        if removed:
            return 0
        shape, hidden = self.shapes[index], self.hidden_size
        groups = shape.num_key_value_heads if kv_groups is None else kv_groups
        per_group = (
            shape.num_attention_heads // shape.num_key_value_heads if heads_per_group is None else heads_per_group
        )
        width = shape.intermediate_size if mlp_channels is None else mlp_channels
        q, kv = groups * per_group * shape.head_dim, groups * shape.head_dim
        attention = hidden * (2 * q + 2 * kv) + (q + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * hidden * width + (2 * width if self.mlp_bias else 0)
        if output_biases is None:
            biases = hidden * (shape.o_proj_bias + shape.down_proj_bias)
        else:
            biases = 2 * hidden if output_biases else 0
        return attention + mlp + biases + 2 * hidden  # + the two norms

    def layer_shape(self, index: int, shape: LayerShape) -> int:
        """Parameters of layer `index` once it has `shape` (e.g. read off the pruned layer)."""
        per_group = shape.num_attention_heads // shape.num_key_value_heads
        biases = self.hidden_size * (shape.o_proj_bias + shape.down_proj_bias)
        return self.layer(index, shape.num_key_value_heads, shape.intermediate_size, per_group, False) + biases

    # ---------------------------------------------------------------- the whole model

    @property
    def outside_layers(self) -> int:
        """Embeddings, final norm, LM head (a tied one counted once): what no allocation touches."""
        return self.outside

    def count(self, layers: Sequence[int | None]) -> int:
        """The model's parameters when layer i costs `layers[i]` (from `layer(...)`; None: unchanged)."""
        return self.outside_layers + sum(self.layer(i) if n is None else n for i, n in enumerate(layers))

    def count_shapes(self, shapes: Sequence[LayerShape | None]) -> int:
        """The model's parameters when layer i has `shapes[i]` (None: the layer was removed)."""
        return self.count([0 if s is None else self.layer_shape(i, s) for i, s in enumerate(shapes)])

    def prunable_of(self, shape: LayerShape, attention: bool = True, mlp: bool = True, attn_unit: str = "group") -> int:
        """Parameters of the removable structures of one layer of `shape`: its KV groups (or, with attn_unit
        "query", its query heads) and MLP channels."""
        hidden, head_dim = self.hidden_size, shape.head_dim
        total = 0
        if attention:
            q_bias = head_dim if self.qkv_bias else 0
            query = shape.num_attention_heads * (2 * head_dim * hidden + q_bias)
            kv = shape.num_key_value_heads * (2 * head_dim * hidden + 2 * q_bias)
            total += query + kv if attn_unit == "group" else query
        if mlp:
            total += shape.intermediate_size * (3 * hidden + (2 if self.mlp_bias else 0))
        return total

    def prunable(
        self, layers: Sequence[int] | None = None, attention: bool = True, mlp: bool = True, attn_unit: str = "group"
    ) -> int:
        """Parameters of the structures an allocation may remove in `layers` (default: all): what --ratio is a
        share of."""
        chosen = range(self.num_layers) if layers is None else layers
        return sum(self.prunable_of(self.shapes[i], attention, mlp, attn_unit) for i in chosen)

    def prunable_share_removed(
        self,
        after: Sequence[LayerShape | None],
        layers: Sequence[int] | None = None,
        attention: bool = True,
        mlp: bool = True,
        attn_unit: str = "group",
    ) -> float:
        """Share of the prunable parameters of `layers` removed once layer i has `after[i]` (None: removed)."""
        chosen = list(range(self.num_layers)) if layers is None else list(layers)
        before = self.prunable(chosen, attention, mlp, attn_unit)
        now = sum(self.prunable_of(after[i], attention, mlp, attn_unit) for i in chosen if after[i] is not None)
        return 1 - now / before if before else 0.0
