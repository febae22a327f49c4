"""Structural removal of attention groups, query heads and MLP channels, in place.

Each function works on one decoder layer of the real transformers Llama classes
(`LlamaDecoderLayer`, and the Mistral/Qwen2 layers that share its layout). The
`nn.Linear` modules are kept (hooks and names survive); their weights are
replaced by the kept rows/columns, and the attributes that forward reads
(`num_key_value_groups`, head counts, `intermediate_size`) are updated with
them. The shared `config` is never touched: per-layer shapes are read from the
weights (`llmprune.engine.io.architecture.layer_shapes`).

GQA layout. With r = heads // kv_heads, query head h attends with KV head
h // r (transformers' `repeat_kv` repeats each KV head r times in a row), so KV
group g is KV head g plus query heads g*r .. g*r+r-1. Rows of q_proj and
columns of o_proj come in blocks of `head_dim` per query head; rows of k_proj
and v_proj in blocks of `head_dim` per KV head.

Design decision: a layer always keeps at least one KV group (and one query
head per group, and one MLP channel). Removing a whole attention block would
need a different module (or a forward patch) and would break stock reloading;
a plan that asks for it is clamped by the allocation step, and these
functions refuse it with a ValueError.

The `mask_*` helpers zero the same units in an unpruned layer (their
contribution to the residual stream becomes exactly zero), so tests can prove
that surgery gives the same logits as masking.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from llmprune.engine.io.architecture import attention_counts

__all__ = [
    "prune_kv_groups",
    "prune_query_heads",
    "prune_mlp_channels",
    "mask_kv_groups",
    "mask_query_heads",
    "mask_mlp_channels",
    "attention_counts",
]


# ---------------------------------------------------------------- reading a layer


def _checked_indices(keep: Sequence[int], size: int, what: str) -> list[int]:
    """Sorted unique indices in [0, size); at least one."""
    indices = sorted({int(i) for i in keep})
    if len(indices) != len(list(keep)):
        raise ValueError(f"{what}: duplicate indices in {list(keep)}")
    if not indices:
        raise ValueError(f"{what}: at least one must be kept (a layer is never left without {what})")
    if indices[0] < 0 or indices[-1] >= size:
        raise ValueError(f"{what}: indices must lie in [0, {size}), got {list(keep)}")
    return indices


def _unit_rows(units: Sequence[int], width: int, device: torch.device) -> torch.Tensor:
    """Row indices of whole units of `width` rows each (heads of head_dim rows)."""
    units_t = torch.as_tensor(list(units), dtype=torch.long, device=device)
    return (units_t[:, None] * width + torch.arange(width, device=device)[None, :]).reshape(-1)


# ---------------------------------------------------------------- slicing nn.Linear in place


@torch.no_grad()
def _keep_outputs(linear: nn.Linear, rows: torch.Tensor) -> None:
    weight = linear.weight
    linear.weight = nn.Parameter(weight.index_select(0, rows).contiguous(), requires_grad=weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(
            linear.bias.index_select(0, rows).contiguous(), requires_grad=linear.bias.requires_grad
        )
    linear.out_features = int(rows.numel())


@torch.no_grad()
def _keep_inputs(linear: nn.Linear, columns: torch.Tensor) -> None:
    # the output bias does not depend on the inputs: it stays as it is
    weight = linear.weight
    linear.weight = nn.Parameter(weight.index_select(1, columns).contiguous(), requires_grad=weight.requires_grad)
    linear.in_features = int(columns.numel())


def _set_head_attributes(attn: nn.Module, heads: int, kv_heads: int) -> None:
    # forward repeats each KV head num_key_value_groups times; the other two are
    # read by some integrations and by people inspecting the module
    attn.num_key_value_groups = heads // kv_heads
    attn.num_heads = heads
    attn.num_key_value_heads = kv_heads


# ---------------------------------------------------------------- surgery


def prune_kv_groups(layer: nn.Module, keep_groups: Sequence[int]) -> None:
    """Keep whole KV groups (KV head g and its r query heads); q:kv stays as it was.

    Keeping zero groups is refused: a layer always keeps at least one group.
    """
    heads, kv_heads, head_dim = attention_counts(layer)
    groups = _checked_indices(keep_groups, kv_heads, "KV groups")
    ratio = heads // kv_heads
    attn = layer.self_attn
    device = attn.q_proj.weight.device
    query_heads = [g * ratio + j for g in groups for j in range(ratio)]
    q_rows = _unit_rows(query_heads, head_dim, device)
    kv_rows = _unit_rows(groups, head_dim, device)
    _keep_outputs(attn.q_proj, q_rows)
    _keep_outputs(attn.k_proj, kv_rows)
    _keep_outputs(attn.v_proj, kv_rows)
    _keep_inputs(attn.o_proj, q_rows)
    _set_head_attributes(attn, len(query_heads), len(groups))


def prune_query_heads(layer: nn.Module, keep_per_group: Sequence[Sequence[int]]) -> None:
    """Keep the listed query heads of every group (indices 0..r-1 within the group).

    Every group must keep the same number of heads (else ValueError), so that
    each KV head still serves the same number of query heads: GQA stays valid.
    KV heads are all kept.
    """
    heads, kv_heads, head_dim = attention_counts(layer)
    ratio = heads // kv_heads
    if len(keep_per_group) != kv_heads:
        raise ValueError(f"query heads: expected one list per KV group ({kv_heads}), got {len(keep_per_group)}")
    kept = [_checked_indices(keep, ratio, f"query heads of group {g}") for g, keep in enumerate(keep_per_group)]
    counts = {len(keep) for keep in kept}
    if len(counts) != 1:
        raise ValueError(
            f"query heads: every group must keep the same number of heads (GQA), got {[len(k) for k in kept]}"
        )
    attn = layer.self_attn
    query_heads = [g * ratio + j for g, keep in enumerate(kept) for j in keep]
    q_rows = _unit_rows(query_heads, head_dim, attn.q_proj.weight.device)
    _keep_outputs(attn.q_proj, q_rows)
    _keep_inputs(attn.o_proj, q_rows)
    _set_head_attributes(attn, len(query_heads), kv_heads)


def prune_mlp_channels(layer: nn.Module, keep: Sequence[int]) -> None:
    """Keep these intermediate channels of gate/up/down (at least one)."""
    mlp = layer.mlp
    channels = _checked_indices(keep, mlp.gate_proj.out_features, "MLP channels")
    index = torch.as_tensor(channels, dtype=torch.long, device=mlp.gate_proj.weight.device)
    _keep_outputs(mlp.gate_proj, index)
    _keep_outputs(mlp.up_proj, index)
    _keep_inputs(mlp.down_proj, index)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(channels)


# ---------------------------------------------------------------- masking (the reference for tests)


@torch.no_grad()
def _zero_input_columns(linear: nn.Linear, keep_columns: torch.Tensor) -> None:
    mask = torch.zeros(linear.in_features, dtype=torch.bool, device=linear.weight.device)
    mask[keep_columns] = True
    linear.weight[:, ~mask] = 0


def mask_kv_groups(layer: nn.Module, keep_groups: Sequence[int]) -> None:
    """Zero the o_proj columns of every query head outside `keep_groups` (shapes unchanged)."""
    heads, kv_heads, head_dim = attention_counts(layer)
    groups = _checked_indices(keep_groups, kv_heads, "KV groups")
    ratio = heads // kv_heads
    query_heads = [g * ratio + j for g in groups for j in range(ratio)]
    attn = layer.self_attn
    _zero_input_columns(attn.o_proj, _unit_rows(query_heads, head_dim, attn.o_proj.weight.device))


def mask_query_heads(layer: nn.Module, keep_per_group: Sequence[Sequence[int]]) -> None:
    """Zero the o_proj columns of every query head not listed (indices within each group)."""
    heads, kv_heads, head_dim = attention_counts(layer)
    ratio = heads // kv_heads
    query_heads = [g * ratio + int(j) for g, keep in enumerate(keep_per_group) for j in keep]
    attn = layer.self_attn
    _zero_input_columns(attn.o_proj, _unit_rows(query_heads, head_dim, attn.o_proj.weight.device))


def mask_mlp_channels(layer: nn.Module, keep: Sequence[int]) -> None:
    """Zero the down_proj columns of every channel not in `keep` (shapes unchanged)."""
    mlp = layer.mlp
    channels = _checked_indices(keep, mlp.gate_proj.out_features, "MLP channels")
    index = torch.as_tensor(channels, dtype=torch.long, device=mlp.down_proj.weight.device)
    _zero_input_columns(mlp.down_proj, index)
