"""Calibrated layer-by-layer pruning: score, cut, compensate, carry the hidden states on.

The model is visited one decoder layer at a time, the way `LlamaModel.forward`
would run it: the calibration hidden states entering layer i are kept (a
tensor windows × seq_len × hidden), layer i is pruned on *those* inputs (so it
sees what earlier pruning did), and its output becomes the input of layer i+1.
A layer only has to be on the device while it is processed, which is what
`llmprune.engine.pruning.streaming` builds on: the same code runs on an in-memory model
or on layers read from disk one by one (`LayerStore`).

Per layer:
1. attention: record the inputs of `o_proj` (its columns are the query heads of
   each KV group), keep the best-scoring `keep_groups` KV groups, compensate;
2. MLP: run the (already pruned) attention, record the inputs of `down_proj`,
   keep the best `keep_channels` channels, compensate;
3. run the pruned layer to get the next layer's inputs.

Two passes make a prune: `measure_units` (dense model: unit scores, used to
choose how many units each layer keeps, `allocate`) and `prune_layers`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Protocol, Sequence

import torch
from torch import nn

from llmprune.engine.pruning import compensation as comp
from llmprune.engine.core.errors import UserInputError
from llmprune.engine.pruning.surgery import attention_counts, prune_kv_groups, prune_mlp_channels

__all__ = [
    "LayerStore",
    "InMemoryLayers",
    "LayerRunner",
    "LayerPlan",
    "LayerScores",
    "UNIT_SCORES",
    "COMPENSATIONS",
    "measure_units",
    "allocate",
    "prune_layers",
    "CalibratedPruneOptions",
    "prune_to_target",
]

ProgressCallback = Callable[[str, int, int], None]  # (phase, layers done, layers total)


# ---------------------------------------------------------------- where layers live


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


# ---------------------------------------------------------------- running one layer


class LayerRunner:
    """Runs a decoder layer on its own, with the mask and rotary embeddings LlamaModel.forward gives it."""

    def __init__(self, config, rotary: nn.Module, seq_len: int, device: torch.device, dtype: torch.dtype, batch_size: int = 8):
        from transformers.masking_utils import create_causal_mask

        self.batch_size = batch_size
        self.position_ids = torch.arange(seq_len, device=device)[None]
        probe = torch.zeros(1, seq_len, config.hidden_size, device=device, dtype=dtype)
        with torch.no_grad():
            self.position_embeddings = rotary(probe, position_ids=self.position_ids)
        self.mask = create_causal_mask(config=config, inputs_embeds=probe, attention_mask=None, cache=None, position_ids=self.position_ids)

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


# ---------------------------------------------------------------- unit scores


def _group_width(layer: nn.Module) -> int:
    """o_proj input columns per KV group (its r query heads × head_dim); groups are contiguous blocks."""
    heads, kv_heads, head_dim = attention_counts(layer)
    return (heads // kv_heads) * head_dim


def _group_columns(layer: nn.Module) -> list[list[int]]:
    width = _group_width(layer)
    return [list(range(g * width, (g + 1) * width)) for g in range(layer.self_attn.o_proj.in_features // width)]


def _blocks(column_scores: torch.Tensor, width: int) -> torch.Tensor:
    return column_scores.reshape(-1, width).sum(1)


def _magnitude(weight: torch.Tensor, stats: comp.InputStatistics, width: int) -> torch.Tensor:
    return _blocks(weight.detach().to(torch.float64).pow(2).sum(0), width)


def _wanda(weight: torch.Tensor, stats: comp.InputStatistics, width: int) -> torch.Tensor:
    # ‖W[:, j]‖² · E[x_j²]: the mean energy a column sends to the output (Wanda-sp, squared)
    return _blocks(weight.detach().to(torch.float64).pow(2).sum(0) * stats.squares / max(stats.count, 1), width)


def _fluctuation(weight: torch.Tensor, stats: comp.InputStatistics, width: int) -> torch.Tensor:
    if width == 1 or stats.gram is None:
        return _blocks(comp.fluctuation(weight, stats), width)
    groups = [range(g * width, (g + 1) * width) for g in range(weight.shape[1] // width)]
    return comp.group_fluctuation(weight, stats, groups)


# name -> f(weight of o_proj/down_proj, its input statistics, columns per unit) -> one score per unit (higher = keep);
# units are contiguous blocks of `width` input columns (a KV group, or one MLP channel with width 1)
UNIT_SCORES: dict[str, Callable[..., torch.Tensor]] = {
    "magnitude": _magnitude,
    "wanda": _wanda,
    "fluctuation": _fluctuation,
}
COMPENSATIONS = ("none", "bias", "lstsq")


def _needs_gram(unit_score: str, compensation: str, width: int) -> bool:
    """XᵀX is needed for least squares, and for fluctuation scores of multi-column units (KV groups) only."""
    return compensation == "lstsq" or (unit_score == "fluctuation" and width > 1)


# ---------------------------------------------------------------- plans and scores


@dataclass
class LayerPlan:
    """How many units of one layer survive."""

    keep_groups: int
    keep_channels: int


@dataclass
class LayerScores:
    """Dense-model unit scores of one layer, normalised by the energy of the residual stream entering it."""

    group_scores: list[float]
    channel_scores: list[float]
    group_params: int  # parameters one KV group costs (q, k, v rows and o_proj columns)
    channel_params: int  # parameters one MLP channel costs (gate, up rows and down column)
    input_energy: float  # mean ‖h‖² of the tokens entering the layer
    influence: float = 0.0  # 1 - cos(h_in, h_out), averaged over tokens (ShortGPT block influence)
    missing_bias_params: int = 0  # output-bias parameters compensation would add (o_proj, down_proj)

    def to_dict(self) -> dict:
        return asdict(self)


def _unit_params(layer: nn.Module) -> tuple[int, int]:
    attn, mlp = layer.self_attn, layer.mlp
    heads, kv_heads, head_dim = attention_counts(layer)
    hidden = attn.q_proj.in_features
    per_group = (heads // kv_heads) * head_dim * hidden * 2 + 2 * head_dim * hidden
    per_channel = 3 * hidden
    if mlp.gate_proj.bias is not None:
        per_channel += 2
    return per_group, per_channel


# float64 copies of all calibration hidden states would be the largest thing in a streamed run
# (50 windows x 128 tokens x 576: 30 MB each for SmolLM2, GBs for 8B); a few windows at a time suffice
_WINDOWS_PER_CHUNK = 8


def _per_token_mean(values, *hidden: torch.Tensor) -> float:
    """Mean over every token of `values(*chunks)` (per-token float64 values), a few windows at a time."""
    total, tokens = 0.0, 0
    for chunks in zip(*(h.split(_WINDOWS_PER_CHUNK) for h in hidden)):
        per_token = values(*(c.flatten(0, 1).double() for c in chunks))
        total += float(per_token.sum())
        tokens += per_token.numel()
    return total / tokens


@torch.no_grad()
def _cosine_gap(before: torch.Tensor, after: torch.Tensor) -> float:
    """Block influence: mean over tokens of 1 - cos(h_in, h_out)."""
    return _per_token_mean(lambda b, a: 1 - torch.nn.functional.cosine_similarity(b, a, dim=-1), before, after)


@torch.no_grad()
def _energy(hidden: torch.Tensor) -> float:
    """Mean over tokens of ‖h‖²."""
    return _per_token_mean(lambda h: h.pow(2).sum(-1), hidden)


@torch.no_grad()
def measure_units(
    store: LayerStore,
    ids: torch.Tensor,
    runner: LayerRunner,
    unit_score: str = "fluctuation",
    progress: ProgressCallback | None = None,
) -> list[LayerScores]:
    """One pass over the dense model: unit scores and block influence of every layer."""
    score = UNIT_SCORES[unit_score]
    hidden = store.embed(ids)
    results = []
    for index in range(store.num_layers):
        layer = store.load(index)
        with comp.record_inputs(layer.self_attn.o_proj, gram=unit_score == "fluctuation") as attn_stats:
            middle = runner.attention_block(layer, hidden)
        with comp.record_inputs(layer.mlp.down_proj, gram=False) as mlp_stats:
            out = runner.mlp_block(layer, middle)
        group_scores = score(layer.self_attn.o_proj.weight, attn_stats, _group_width(layer))
        # per-channel scores never need the Gram (a single column has no cross terms)
        channel_scores = score(layer.mlp.down_proj.weight, mlp_stats, 1)
        group_params, channel_params = _unit_params(layer)
        results.append(
            LayerScores(
                group_scores=group_scores.tolist(),
                channel_scores=channel_scores.tolist(),
                group_params=group_params,
                channel_params=channel_params,
                input_energy=_energy(hidden),
                influence=_cosine_gap(hidden, out),
                missing_bias_params=sum(p.out_features for p in (layer.self_attn.o_proj, layer.mlp.down_proj) if p.bias is None),
            )
        )
        hidden = out
        store.release(index, layer, changed=False)
        if progress:
            progress("measure", index + 1, store.num_layers)
    return results


def allocate(
    scores: Sequence[LayerScores],
    params_to_remove: int,
    attention: bool = True,
    max_channel_ratio: float = 0.8,
    strategy: str = "global",
) -> list[LayerPlan]:
    """How many KV groups and MLP channels each layer keeps so that ≥ params_to_remove go.

    global: rank every unit of every layer by its relative damage per parameter
    (score / input energy / parameters it costs) and remove the cheapest first,
    so sensitive layers keep more. uniform: the same MLP share in every layer
    (attention untouched). A layer always keeps one KV group and at least
    (1 - max_channel_ratio) of its channels.
    """
    plans = [LayerPlan(len(s.group_scores), len(s.channel_scores)) for s in scores]
    if params_to_remove <= 0:
        return plans
    if strategy == "uniform":
        total_channels = sum(len(s.channel_scores) for s in scores)
        per_channel = scores[0].channel_params
        share = min(max_channel_ratio, params_to_remove / (per_channel * total_channels))
        for plan, s in zip(plans, scores):
            plan.keep_channels = len(s.channel_scores) - int(round(share * len(s.channel_scores) + 0.4999))
        return plans
    if strategy != "global":
        raise ValueError(f"unknown allocation strategy {strategy!r}")
    candidates = []  # (damage per parameter, layer, kind, params)
    for index, s in enumerate(scores):
        energy = max(s.input_energy, 1e-12)
        channel_order = sorted(s.channel_scores)
        removable = int(max_channel_ratio * len(channel_order))
        for value in channel_order[:removable]:
            candidates.append((value / energy / s.channel_params, index, "channel", s.channel_params))
        if attention and len(s.group_scores) > 1:
            for value in sorted(s.group_scores)[:-1]:
                candidates.append((value / energy / s.group_params, index, "group", s.group_params))
    candidates.sort(key=lambda c: c[0])
    removed = 0
    for _, index, kind, params in candidates:
        if removed >= params_to_remove:
            break
        if kind == "channel":
            plans[index].keep_channels -= 1
        else:
            plans[index].keep_groups -= 1
        removed += params
    return plans


# ---------------------------------------------------------------- the pruning pass


def _top(scores: torch.Tensor, count: int) -> list[int]:
    return sorted(torch.topk(scores, count).indices.tolist())


def _set_linear(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=linear.weight.requires_grad)
    linear.in_features = weight.shape[1]
    if bias is not None:
        linear.bias = nn.Parameter(bias.contiguous(), requires_grad=False)


def _compensate(linear: nn.Linear, dense_weight: torch.Tensor, dense_bias, stats, keep_columns: list[int], compensation: str, damping: float) -> None:
    """After surgery sliced `linear`'s input columns, fix its output for what was removed."""
    if compensation == "bias":
        _set_linear(linear, linear.weight.data, comp.compensate_bias(dense_weight, dense_bias, stats, keep_columns))
    elif compensation == "lstsq":
        weight, bias = comp.refit_least_squares(dense_weight, dense_bias, stats, keep_columns, damping=damping)
        _set_linear(linear, weight, bias)


def _ensure_bias(linear: nn.Linear) -> None:
    # every layer gets the output bias, pruned or not, so that shapes stay uniform when they can
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device), requires_grad=False)


@dataclass
class LayerReport:
    """What happened to one layer."""

    index: int
    kept_groups: list[int]
    kept_channels: int
    groups_before: int
    channels_before: int
    kept_channel_indices: list[int] | None = None  # None: every channel kept

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def prune_layers(
    store: LayerStore,
    ids: torch.Tensor,
    runner: LayerRunner,
    plans: Sequence[LayerPlan],
    unit_score: str = "fluctuation",
    compensation: str = "bias",
    damping: float = 1e-3,
    progress: ProgressCallback | None = None,
) -> list[LayerReport]:
    """Prune every layer to its plan, in order, on the calibration inputs it really receives."""
    if unit_score not in UNIT_SCORES:
        raise ValueError(f"unknown unit score {unit_score!r}; known: {', '.join(UNIT_SCORES)}")
    if compensation not in COMPENSATIONS:
        raise ValueError(f"unknown compensation {compensation!r}; known: {', '.join(COMPENSATIONS)}")
    score = UNIT_SCORES[unit_score]
    hidden = store.embed(ids)
    reports = []
    for index, plan in enumerate(plans):
        layer = store.load(index)
        attn, mlp = layer.self_attn, layer.mlp
        _, kv_heads, _ = attention_counts(layer)
        channels = mlp.down_proj.in_features
        report = LayerReport(index, list(range(kv_heads)), channels, kv_heads, channels)
        changed = False
        if compensation != "none":
            _ensure_bias(attn.o_proj)
            _ensure_bias(mlp.down_proj)
            changed = True

        if plan.keep_groups < kv_heads:
            with comp.record_inputs(attn.o_proj, gram=_needs_gram(unit_score, compensation, _group_width(layer))) as stats:
                runner.attention_block(layer, hidden)
            groups = _group_columns(layer)
            keep = _top(score(attn.o_proj.weight, stats, _group_width(layer)), plan.keep_groups)
            dense_weight, dense_bias = attn.o_proj.weight.data.clone(), None if attn.o_proj.bias is None else attn.o_proj.bias.data.clone()
            prune_kv_groups(layer, keep)
            _compensate(attn.o_proj, dense_weight, dense_bias, stats, [c for g in keep for c in groups[g]], compensation, damping)
            report.kept_groups, changed = keep, True
        middle = runner.attention_block(layer, hidden)
        del hidden  # the layer's input is not needed any more: one set of hidden states less at the peak

        if plan.keep_channels < channels:
            with comp.record_inputs(mlp.down_proj, gram=_needs_gram(unit_score, compensation, 1)) as stats:
                runner.mlp_block(layer, middle)
            keep = _top(score(mlp.down_proj.weight, stats, 1), plan.keep_channels)
            dense_weight, dense_bias = mlp.down_proj.weight.data.clone(), None if mlp.down_proj.bias is None else mlp.down_proj.bias.data.clone()
            prune_mlp_channels(layer, keep)
            _compensate(mlp.down_proj, dense_weight, dense_bias, stats, keep, compensation, damping)
            report.kept_channels, report.kept_channel_indices, changed = len(keep), keep, True
        hidden = runner.mlp_block(layer, middle)  # noqa: F841 (the next layer's input; read at the loop's top, after the `del` above)
        reports.append(report)
        store.release(index, layer, changed=changed)
        if progress:
            progress("prune", index + 1, len(plans))
    return reports


# ---------------------------------------------------------------- both passes, to a parameter target


@dataclass
class CalibratedPruneOptions:
    """How `prune_to_target` chooses, cuts and compensates."""

    unit_score: str = "fluctuation"
    """Which units of a layer to keep: fluctuation | wanda | magnitude (see UNIT_SCORES)."""
    compensation: str = "lstsq"
    """What to do for the removed units: none | bias (their mean, into the output bias) | lstsq (refit o_proj/down_proj)."""
    allocation: str = "global"
    """How many units each layer keeps: global (rank all units of all layers) | uniform (same MLP share everywhere)."""
    attention: bool = True
    """Also remove whole KV groups (else MLP channels only)."""
    max_channel_ratio: float = 0.8
    """At most this share of a layer's MLP channels goes."""
    damping: float = 1e-3
    """Ridge added to the least-squares normal equations, relative to their mean diagonal."""


def _removed_parameters(scores: Sequence[LayerScores], plans: Sequence[LayerPlan]) -> int:
    return sum(
        (len(s.group_scores) - p.keep_groups) * s.group_params + (len(s.channel_scores) - p.keep_channels) * s.channel_params
        for s, p in zip(scores, plans)
    )


def prune_to_target(
    store: LayerStore,
    ids: torch.Tensor,
    runner: LayerRunner,
    params_to_remove: int,
    options: CalibratedPruneOptions | None = None,
    progress: ProgressCallback | None = None,
) -> tuple[list[LayerScores], list[LayerPlan], list[LayerReport]]:
    """Measure the dense model, allocate the cut, then prune layer by layer."""
    options = options or CalibratedPruneOptions()
    scores = measure_units(store, ids, runner, options.unit_score, progress)
    # the output biases compensation adds count against the budget
    added = sum(s.missing_bias_params for s in scores) if options.compensation != "none" and params_to_remove > 0 else 0
    plans = allocate(scores, params_to_remove + added, options.attention, options.max_channel_ratio, options.allocation)
    removable = _removed_parameters(scores, plans)
    if removable < params_to_remove + added:
        raise UserInputError(
            f"the parameter target cannot be reached: at most {removable - added:,} parameters can go "
            f"({params_to_remove:,} asked; every layer keeps one KV group and {1 - options.max_channel_ratio:.0%} of its MLP channels)",
            "ask for a larger model, or add --drop-layers to remove whole layers",
        )
    store.begin_pruning()
    reports = prune_layers(store, ids, runner, plans, options.unit_score, options.compensation, options.damping, progress)
    return scores, plans, reports


# ---------------------------------------------------------------- a loaded model, depth and width


@dataclass
class CalibratedOutcome:
    """What `prune_loaded_model` did."""

    dropped_layers: list[int]  # original indices of the decoder layers removed whole
    scores: list[LayerScores]  # of the layers that remained, measured on the dense model
    plans: list[LayerPlan]
    reports: list[LayerReport]


def prune_loaded_model(
    model: nn.Module,
    ids: torch.Tensor,
    params_to_remove: int,
    options: CalibratedPruneOptions | None = None,
    drop: int = 0,
    batch_size: int = 8,
    progress: ProgressCallback | None = None,
) -> CalibratedOutcome:
    """Depth then width: drop the `drop` least influential layers, then prune units to the remaining budget."""
    from llmprune.engine.pruning.depth import drop_layers, least_influential

    options = options or CalibratedPruneOptions()
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    runner = LayerRunner(model.config, model.model.rotary_emb, ids.shape[1], device, dtype, batch_size)
    store = InMemoryLayers(model)
    dropped: list[int] = []
    if drop > 0:
        influence = [s.influence for s in measure_units(store, ids, runner, "magnitude", progress)]
        dropped = least_influential(influence, drop)
        before = sum(p.numel() for p in model.parameters())
        drop_layers(model, dropped)
        params_to_remove -= before - sum(p.numel() for p in model.parameters())
    if params_to_remove > 0:
        scores, plans, reports = prune_to_target(store, ids, runner, params_to_remove, options, progress)
    else:
        scores, plans, reports = [], [], []
    return CalibratedOutcome(dropped, scores, plans, reports)
