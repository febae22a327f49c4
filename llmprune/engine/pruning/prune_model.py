"""Layer-by-layer structured pruning of a loaded model: `prune_model`.

The pass walks the decoder layers **in order** and carries the calibration
hidden states from layer to layer, so that each layer's unit scores are
computed on the inputs produced by the already-pruned earlier layers (as
SparseGPT and FLAP do). For every layer that the plan touches:

1. run the unpruned layer on the carried inputs with hooks on o_proj and
   down_proj (`importance.collect_activations`): per-channel sums, squares and
   optionally X^T X of their inputs, plus the dense layer's outputs;
2. score its units with the criterion named by `unit_importance`
   (`importance.UNIT_IMPORTANCE`, open to `register_unit_importance`) and keep
   the best ones: whole KV groups (or the same number of query heads in every
   group), and MLP channels;
3. cut them out (`surgery`), then call `compensation(context)` if given: the
   seam for bias compensation / least-squares reconstruction. The
   `LayerPruneContext` holds the pruned layer, the carried inputs, the dense
   outputs, the activation statistics of the unpruned layer, the kept indices
   and the removed o_proj/down_proj columns; with `gram=True` (run_prune
   sets it when the compensation has `needs_gram = True`) the statistics also
   hold X^T X of the o_proj and down_proj inputs. Default: none;
4. run the pruned layer to produce the next layer's inputs.

Memory: the model is modified in place (never copied); besides it, only the
calibration hidden states of one depth and one layer's dense outputs are held.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from llmprune.engine.core.progress import StageProgress
from llmprune.engine.pruning.allocation import LayerUnits
from llmprune.engine.io.architecture import LayerShape, gqa_violations, layer_shapes, require_llama_style
from llmprune.engine.data import TokenWindows
from llmprune.engine.pruning.importance import LayerActivations, collect_activations, get_unit_importance
from llmprune.engine.pruning.layerwise import CalibrationBatch, capture_layer_inputs, iterate_layers, run_layer
from llmprune.engine.pruning.surgery import prune_kv_groups, prune_mlp_channels, prune_query_heads



@dataclass
class LayerPruneContext:
    """What a compensation step sees for one layer, right after its surgery."""

    index: int
    layer: nn.Module  # already pruned
    inputs: list[CalibrationBatch]  # hidden states entering the layer (from the pruned earlier layers)
    dense_outputs: list[torch.Tensor] | None  # the unpruned layer's outputs on those inputs
    activations: LayerActivations | None  # o_proj/down_proj input statistics of the unpruned layer
    kept_query_heads: torch.Tensor  # original indices of the query heads kept
    kept_mlp_channels: torch.Tensor  # original indices of the MLP channels kept
    head_dim: int
    removed_o_proj_columns: torch.Tensor  # [hidden, removed heads * head_dim] weights cut from o_proj
    removed_down_proj_columns: torch.Tensor  # [hidden, removed channels] weights cut from down_proj


Compensation = Callable[[LayerPruneContext], None]


@dataclass
class LayerChange:
    """One layer before and after."""

    index: int
    before: LayerShape
    after: LayerShape
    kept_query_heads: list[int] | None = None  # original indices; None: layer untouched
    kept_mlp_channels: list[int] | None = None

    def to_dict(self) -> dict:
        # channel lists are long; the report keeps the heads (few, and what GQA is about)
        return {"index": self.index, "before": self.before.to_dict(), "after": self.after.to_dict(),
                "kept_query_heads": self.kept_query_heads}


@dataclass
class PruneOutcome:
    """What `prune_model` did."""

    layers: list[LayerChange]
    params_before: int
    params_after: int
    seconds: float
    unit_importance: str
    attn_unit: str
    gqa_violations: list[int] = field(default_factory=list)

    @property
    def removed_share(self) -> float:
        """Share of *all* parameters removed (the seed tools' "actual pruning rate")."""
        return 1 - self.params_after / self.params_before if self.params_before else 0.0

    def to_dict(self) -> dict:
        return {
            "layers": [layer.to_dict() for layer in self.layers],
            "params_before": self.params_before,
            "params_after": self.params_after,
            "removed_share": self.removed_share,
            "seconds": self.seconds,
            "unit_importance": self.unit_importance,
            "attn_unit": self.attn_unit,
            "gqa_violations": self.gqa_violations,
        }


def _top(scores: torch.Tensor, keep: int) -> list[int]:
    """Indices of the `keep` highest scores, in ascending index order (ties: lower index)."""
    order = torch.argsort(scores.float(), descending=True, stable=True)
    return sorted(order[:keep].tolist())


def _changes_layer(shape: LayerShape, units: LayerUnits) -> bool:
    return (
        units.kv_heads != shape.num_key_value_heads
        or units.heads != shape.num_attention_heads
        or units.intermediate_size != shape.intermediate_size
    )


def _validate_units(shapes: Sequence[LayerShape], plan: Sequence[LayerUnits], attn_unit: str) -> None:
    if len(plan) != len(shapes):
        raise ValueError(f"the plan has {len(plan)} layers but the model has {len(shapes)}")
    for index, (shape, units) in enumerate(zip(shapes, plan)):
        if not (1 <= units.kv_heads <= shape.num_key_value_heads) or units.heads % units.kv_heads:
            raise ValueError(f"layer {index}: invalid attention units {units}")
        if not (1 <= units.intermediate_size <= shape.intermediate_size):
            raise ValueError(f"layer {index}: invalid MLP width {units.intermediate_size}")
        if attn_unit == "group" and units.heads // units.kv_heads != shape.num_attention_heads // shape.num_key_value_heads:
            raise ValueError(f"layer {index}: group pruning keeps q:kv, but the plan asks for {units.heads}:{units.kv_heads}")
        if attn_unit == "query" and units.kv_heads != shape.num_key_value_heads:
            raise ValueError(f"layer {index}: query-head pruning keeps every KV head")


def _prune_one_layer(
    layer: nn.Module,
    shape: LayerShape,
    units: LayerUnits,
    criterion,
    acts: LayerActivations | None,
    attn_unit: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Surgery on one layer; returns kept query heads, kept channels and the removed o/down columns."""
    head_dim = shape.head_dim
    kv_heads = shape.num_key_value_heads
    ratio = shape.num_attention_heads // kv_heads
    all_heads = torch.arange(shape.num_attention_heads)
    kept_heads = all_heads
    if units.heads != shape.num_attention_heads:
        if attn_unit == "group":
            groups = _top(criterion.kv_group_scores(layer, acts), units.kv_heads)
            kept_heads = torch.tensor([g * ratio + j for g in groups for j in range(ratio)])
        else:
            per_group = criterion.query_head_scores(layer, acts)
            keep = [_top(per_group[g], units.heads // kv_heads) for g in range(kv_heads)]
            kept_heads = torch.tensor([g * ratio + j for g in range(kv_heads) for j in keep[g]])
    kept_channels = torch.arange(shape.intermediate_size)
    if units.intermediate_size != shape.intermediate_size:
        kept_channels = torch.tensor(_top(criterion.mlp_channel_scores(layer, acts), units.intermediate_size))

    removed_heads = all_heads[~torch.isin(all_heads, kept_heads)]
    o_weight, down_weight = layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight
    removed_o_cols = (removed_heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).reshape(-1)
    removed_channels = torch.arange(shape.intermediate_size)[~torch.isin(torch.arange(shape.intermediate_size), kept_channels)]
    removed_o = o_weight.detach().index_select(1, removed_o_cols.to(o_weight.device)).clone()
    removed_down = down_weight.detach().index_select(1, removed_channels.to(down_weight.device)).clone()

    if units.heads != shape.num_attention_heads:
        if attn_unit == "group":
            prune_kv_groups(layer, groups)
        else:
            prune_query_heads(layer, keep)
    if units.intermediate_size != shape.intermediate_size:
        prune_mlp_channels(layer, kept_channels.tolist())
    return kept_heads, kept_channels, removed_o, removed_down


def prune_model(
    model: nn.Module,
    plan: Sequence[LayerUnits],
    calibration: TokenWindows | None = None,
    unit_importance: str = "activation",
    attn_unit: str = "group",
    compensation: Compensation | None = None,
    gram: bool = False,
    batch_size: int = 8,
    progress: StageProgress | None = None,
) -> PruneOutcome:
    """Prune `model` in place to the per-layer units of `plan` (see the module docstring)."""
    start = time.perf_counter()
    require_llama_style(model)
    criterion = get_unit_importance(unit_importance)
    shapes = layer_shapes(model)
    _validate_units(shapes, plan, attn_unit)
    needs_data = criterion.needs_activations or compensation is not None
    if needs_data and calibration is None:
        raise ValueError(f"unit importance '{unit_importance}' (or compensation) needs calibration windows")
    params_before = sum(p.numel() for p in model.parameters())
    touched = [i for i, (s, u) in enumerate(zip(shapes, plan)) if _changes_layer(s, u)]
    batches = capture_layer_inputs(model, calibration, batch_size) if needs_data and touched else []
    last = touched[-1] if touched else -1
    kept: dict[int, tuple[list[int], list[int]]] = {}

    for index, layer in iterate_layers(model):
        if index > last:
            break
        shape, units = shapes[index], plan[index]
        if _changes_layer(shape, units):
            acts, dense = (collect_activations(layer, batches, gram) if batches else (None, None))
            kept_heads, kept_channels, removed_o, removed_down = _prune_one_layer(layer, shape, units, criterion, acts, attn_unit)
            kept[index] = (kept_heads.tolist(), kept_channels.tolist())
            if compensation is not None:
                compensation(
                    LayerPruneContext(
                        index=index, layer=layer, inputs=batches, dense_outputs=dense, activations=acts,
                        kept_query_heads=kept_heads, kept_mlp_channels=kept_channels, head_dim=shape.head_dim,
                        removed_o_proj_columns=removed_o, removed_down_proj_columns=removed_down,
                    )
                )
            del dense, acts
        for batch in batches:  # the next layer's inputs come from this (pruned) layer
            batch.hidden = run_layer(layer, batch)
        if progress:
            progress("pruning layers", index + 1, last + 1)

    after = layer_shapes(model)
    return PruneOutcome(
        layers=[LayerChange(i, b, a, *kept.get(i, (None, None))) for i, (b, a) in enumerate(zip(shapes, after))],
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
        seconds=time.perf_counter() - start,
        unit_importance=unit_importance,
        attn_unit=attn_unit,
        gqa_violations=gqa_violations(after),
    )
