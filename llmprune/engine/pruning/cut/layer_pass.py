"""The one pruning pass: every layer, in order, cut to its plan on the inputs it really receives, then compensated.

The model is walked with a `layer_store.LayerStore` (in memory or streamed
from disk): the calibration hidden states entering layer i are held (one
tensor, windows × seq_len × hidden), layer i is pruned on *those* inputs, so
it sees what earlier pruning did, and its output becomes the input of layer
i+1. Per layer:

1. attention: record the inputs of o_proj (its columns are the query heads of
   each KV group), keep the best-scoring KV groups (or the same number of
   query heads in every group), compensate o_proj;
2. MLP: run the (already pruned) attention, record the inputs of down_proj,
   keep the best MLP channels, compensate down_proj;
3. run the pruned layer to get the next layer's inputs.

Scores come from `scores.units.UNIT_SCORES`, compensation from
`cut.compensation`; the global path, the plan path (`prune_model`) and the
streamed path all prune through `prune_layers`.

The least-squares refit needs more tokens than the unit choice (`refit.MIN_TOKENS_PER_INPUT` per
kept input: 46 k for a Llama-3-8B down_proj at 20 %), so it may be fitted on windows of its own
(`refit_ids`): a second set of hidden states walks through the pruned layers beside the first, and
compensation reads its statistics while the units are still chosen on `ids`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from llmprune.engine.core.progress import StageProgress
from llmprune.engine.io.architecture import LayerShape, attention_counts
from llmprune.engine.pruning.allocate.level import Level
from llmprune.engine.pruning.cut.compensation import Compensation, CompensationContext, compensation_step, ensure_bias
from llmprune.engine.pruning.cut.refit import DRAWN_TOKENS_PER_INPUT, needs_choice, windows_for_plain_refit
from llmprune.engine.pruning.cut.surgery import prune_kv_groups, prune_mlp_channels, prune_query_heads
from llmprune.engine.pruning.scores import statistics
from llmprune.engine.pruning.scores.defaults import DEFAULT_UNIT_SCORE
from llmprune.engine.pruning.scores.units import UnitScore, get_unit_score, top_units
from llmprune.engine.walk.layer_store import LayerRunner, LayerStore


@dataclass
class LayerReport:
    """What happened to one layer."""

    index: int
    kept_groups: list[int]
    kept_channels: int
    groups_before: int
    channels_before: int
    kept_channel_indices: list[int] | None = None  # None: every channel kept
    kept_query_heads: list[int] | None = None  # original indices; None: attention untouched
    compensation: dict[str, str] = field(default_factory=dict)  # projection -> what really ran (lstsq may fall back)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Streams:
    """The calibration hidden states at one point of the pass: the units are chosen on `choose`, the
    refit is fitted on `refit` (None: on `choose` too; both None without calibration data), and with
    residual correction `dense` is the dense model's on the refit's windows."""

    choose: torch.Tensor | None
    refit: torch.Tensor | None = None
    dense: torch.Tensor | None = None

    @property
    def fit(self) -> torch.Tensor | None:
        return self.refit if self.refit is not None else self.choose

    def through(self, block, layer: nn.Module, dense: torch.Tensor | None) -> _Streams:
        """The streams after `block` of the (cut) layer; `dense`: the dense stream after the uncut block."""
        return _Streams(*(None if h is None else block(layer, h) for h in (self.choose, self.refit)), dense)


class _OneLayer:
    """Cutting and compensating one layer (its attention, then its MLP)."""

    def __init__(
        self,
        index: int,
        layer: nn.Module,
        runner: LayerRunner | None,
        score: UnitScore,
        step: Compensation | None,
        damping: float,
        correction: float = 0.0,
    ):
        self.index, self.layer, self.runner, self.score, self.step, self.damping = (
            index,
            layer,
            runner,
            score,
            step,
            damping,
        )
        self.correction = correction
        _, kv_heads, _ = attention_counts(layer)
        channels = layer.mlp.down_proj.in_features
        self.report = LayerReport(index, list(range(kv_heads)), channels, kv_heads, channels)

    def _record(
        self, linear: nn.Linear, hidden: torch.Tensor, block, gram: bool, error: torch.Tensor | None = None
    ) -> statistics.InputStatistics:
        """Statistics of `linear`'s inputs while `block` runs the dense layer on `hidden` (paired with `error`).

        With few calibration tokens the statistics keep the inputs instead of the Gram (an 8B down_proj's
        is 14,336² float64 = 1.6 GB), so asking for it costs little then.
        """
        with statistics.record_inputs(linear, gram=gram, error=error) as stats:
            block(self.layer, hidden)
        return stats

    def _error(self, hidden: _Streams, dense_after: torch.Tensor | None, block) -> torch.Tensor | None:
        """What the refit should also take away: `correction` × (the dense stream after the block − the pruned
        stream after the still uncut block), on the refit's windows; None without residual correction
        (`prune_layers` walks the dense stream only when its step refits by least squares).

        The uncut block runs here and again in the record pass: the gap has to be known while the inputs go by,
        since keeping the inputs to pair them afterwards would cost tokens × inputs (GBs at 8B widths)."""
        if dense_after is None:
            return None
        # in float32 at least: the gap is small beside either stream, and bf16 would round most of it away
        return (dense_after.float() - block(self.layer, hidden.fit).float()).mul_(self.correction)

    def _statistics(
        self, linear: nn.Linear, width: int, hidden: _Streams, block, dense_after: torch.Tensor | None = None
    ) -> tuple:
        """(statistics to choose the units on, statistics to compensate with); (None, None) without calibration."""
        if hidden.choose is None:
            return None, None
        step_gram = bool(getattr(self.step, "needs_gram", False))
        error = self._error(hidden, dense_after, block)
        if hidden.refit is None:
            stats = self._record(linear, hidden.choose, block, self.score.needs_gram(width) or step_gram, error)
            return stats, stats
        return (
            self._record(linear, hidden.choose, block, self.score.needs_gram(width)),
            self._record(linear, hidden.refit, block, step_gram, error) if self.step is not None else None,
        )

    def _compensate(self, projection: str, linear: nn.Linear, dense: tuple, stats, keep_columns: list[int]) -> None:
        if self.step is None:
            return
        context = CompensationContext(
            self.index, self.layer, projection, linear, dense[0], dense[1], stats, keep_columns, self.damping
        )
        self.report.compensation[projection] = self.step(context)

    def _keep(self, count: int) -> dict:
        """keep= for scores whose ranking depends on how many units stay (greedy OBS)."""
        return {"keep": count} if getattr(self.score, "takes_keep", False) else {}

    @staticmethod
    def _dense(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        return linear.weight.data.clone(), None if linear.bias is None else linear.bias.data.clone()

    def attention(self, plan: Level, hidden: _Streams, dense_after: torch.Tensor | None = None) -> bool:
        heads, kv_heads, head_dim = attention_counts(self.layer)
        per_group = heads // kv_heads
        by_query = plan.heads_per_group is not None and plan.heads_per_group < per_group
        if plan.groups >= kv_heads and not by_query:
            return False
        o_proj = self.layer.self_attn.o_proj
        stats, fit = self._statistics(
            o_proj,
            head_dim if by_query else per_group * head_dim,
            hidden,
            self.runner and self.runner.attention_block,
            dense_after,
        )
        dense = self._dense(o_proj)
        if by_query:
            scores = self.score.query_heads(self.layer, stats)
            keep = [top_units(scores[g], plan.heads_per_group) for g in range(kv_heads)]
            prune_query_heads(self.layer, keep)
            kept_heads = [g * per_group + j for g in range(kv_heads) for j in keep[g]]
        else:
            groups = top_units(self.score.kv_groups(self.layer, stats, **self._keep(plan.groups)), plan.groups)
            prune_kv_groups(self.layer, groups)
            kept_heads = [g * per_group + j for g in groups for j in range(per_group)]
            self.report.kept_groups = groups
        self.report.kept_query_heads = kept_heads
        columns = [h * head_dim + d for h in kept_heads for d in range(head_dim)]
        self._compensate("o_proj", self.layer.self_attn.o_proj, dense, fit, columns)
        return True

    def mlp(self, plan: Level, middle: _Streams, dense_after: torch.Tensor | None = None) -> bool:
        down_proj = self.layer.mlp.down_proj
        if plan.channels >= down_proj.in_features:
            return False
        stats, fit = self._statistics(down_proj, 1, middle, self.runner and self.runner.mlp_block, dense_after)
        keep = top_units(self.score.mlp_channels(self.layer, stats, **self._keep(plan.channels)), plan.channels)
        dense = self._dense(down_proj)
        prune_mlp_channels(self.layer, keep)
        self._compensate("down_proj", self.layer.mlp.down_proj, dense, fit, keep)
        self.report.kept_channels, self.report.kept_channel_indices = len(keep), keep
        return True


# Where the refit's own windows come from: given the windows a plain least-squares refit of the widest
# refitted projection needs, the windows to refit on, or None to refit on the calibration windows the
# units are chosen on. The caller decides how far to go (`pipeline.refit_windows`): every window is one
# more walk through each layer.
RefitWindows = Callable[[int], torch.Tensor | None]


def refit_ids_for(
    refit_windows: RefitWindows | None,
    compensation: str | Compensation | None,
    shapes: Sequence[LayerShape],
    plans: Sequence[Level],
    ids: torch.Tensor,
) -> torch.Tensor | None:
    """The windows the refit is fitted on under `plans` (None: the calibration windows `ids`, or no refit).

    `refit_windows` is asked for `refit.DRAWN_TOKENS_PER_INPUT` tokens per kept input of the widest refitted
    projection when `ids` give it fewer than `refit.MIN_TOKENS_PER_INPUT`, else for `ids`' own count.
    """
    if refit_windows is None or not getattr(compensation_step(compensation), "needs_gram", False):
        return None
    widest, (count, seq_len) = widest_refitted_input(shapes, plans), ids.shape
    short = needs_choice(widest, count * seq_len)
    return refit_windows(windows_for_plain_refit(widest, seq_len, DRAWN_TOKENS_PER_INPUT) if short else count)


def refit_window_count(refit_ids: torch.Tensor | None, ids: torch.Tensor | None) -> int | None:
    """How many windows the refit ran on: its own (`refit_ids_for`), else the calibration's (None: none)."""
    fitted_on = refit_ids if refit_ids is not None else ids
    return None if fitted_on is None else len(fitted_on)


def widest_refitted_input(shapes: Sequence[LayerShape], plans: Sequence[Level]) -> int:
    """The most inputs any compensated projection keeps under `plans` (0: nothing is cut)."""
    widest = 0
    for shape, plan in zip(shapes, plans, strict=True):
        if plan.removed:
            continue
        per_group = shape.num_attention_heads // shape.num_key_value_heads
        heads = plan.groups * (plan.heads_per_group if plan.heads_per_group is not None else per_group)
        if heads < shape.num_attention_heads:
            widest = max(widest, heads * shape.head_dim)
        if plan.channels < shape.intermediate_size:
            widest = max(widest, plan.channels)
    return widest


@torch.no_grad()
def prune_layers(
    store: LayerStore,
    ids: torch.Tensor | None,
    runner: LayerRunner | None,
    plans: Sequence[Level],
    unit_score: str = DEFAULT_UNIT_SCORE,
    compensation: str | Compensation | None = "bias",
    damping: float = 1e-3,
    progress: StageProgress | None = None,
    refit_ids: torch.Tensor | None = None,
    correction: float = 0.0,
) -> list[LayerReport]:
    """Prune every layer to its plan, in order, on the calibration inputs it really receives.

    `ids` (calibration windows) may be None only for a data-free score with no compensation;
    `refit_ids`: other windows to compensate on (None: `ids`); `correction` (residual correction, 0–1): how
    much of the gap between the pruned and the dense model's residual stream each least-squares refit also
    takes away (0: each projection only reproduces its dense self on the inputs it receives).
    """
    score = get_unit_score(unit_score)
    step = compensation_step(compensation)
    if ids is None and (score.needs_statistics or step is not None):
        raise ValueError(f"unit score '{score.name}' (or compensation) needs calibration windows")
    fit_apart = refit_ids is not None and step is not None and refit_ids is not ids
    # residual correction walks the dense model beside the pruned one, on the windows the refit is fitted on
    corrects = correction > 0 and runner is not None and ids is not None and getattr(step, "needs_gram", False)
    fit_ids = refit_ids if fit_apart else ids
    hidden = _Streams(
        store.embed(ids) if ids is not None else None,
        store.embed(refit_ids) if fit_apart else None,
        store.embed(fit_ids) if corrects else None,
    )
    reports = []
    for index, plan in enumerate(plans):
        layer = store.load(index)
        one = _OneLayer(index, layer, runner, score, step, damping, correction)
        changed = step is not None
        if step is not None:
            ensure_bias(layer.self_attn.o_proj)
            ensure_bias(layer.mlp.down_proj)
        # the dense stream goes through each block before that block is cut
        dense_middle = runner.attention_block(layer, hidden.dense) if corrects else None
        changed |= one.attention(plan, hidden, dense_middle)
        middle = hidden.through(runner.attention_block, layer, dense_middle) if runner is not None else hidden
        hidden = None  # the layer's input is not needed any more: one set of hidden states less at the peak
        dense_out = runner.mlp_block(layer, dense_middle) if corrects else None
        changed |= one.mlp(plan, middle, dense_out)
        hidden = middle.through(runner.mlp_block, layer, dense_out) if runner is not None else middle
        reports.append(one.report)
        store.release(index, layer, changed=changed)
        if progress:
            progress("prune", index + 1, len(plans))
    return reports
