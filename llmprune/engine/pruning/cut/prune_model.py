"""The plan path's pruning: a loaded model cut to given per-layer units, `prune_model`.

The per-layer units come from a layer-importance plan (`plan.make_plan`);
the cutting is the one pruning pass, `layer_pass.prune_layers`, on the
model in memory: the same unit scores (`scores.units`), the same
compensation steps (`cut.compensation`) and the same layer walker as the
global and streamed paths. Attention is cut by whole KV groups (q:kv
unchanged) or, with `attn_unit="query"`, by the same number of query heads
in every group.

Memory: the model is modified in place (never copied); besides it, only the
calibration hidden states of one depth are held.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from llmprune.engine.core.progress import StageProgress
from llmprune.engine.data import TokenWindows
from llmprune.engine.io.architecture import LayerShape, gqa_violations, layer_shapes, require_llama_style
from llmprune.engine.pruning.allocate.level import Level
from llmprune.engine.pruning.allocate.plan import LayerUnits
from llmprune.engine.pruning.cut.compensation import Compensation, compensation_step
from llmprune.engine.pruning.cut.layer_pass import RefitWindows, prune_layers, refit_ids_for, refit_window_count
from llmprune.engine.pruning.scores.defaults import DEFAULT_UNIT_SCORE
from llmprune.engine.pruning.scores.units import get_unit_score
from llmprune.engine.walk.layer_store import InMemoryLayers, runner_for


@dataclass
class LayerChange:
    """One layer before and after."""

    index: int
    before: LayerShape
    after: LayerShape
    kept_query_heads: list[int] | None = None  # original indices; None: attention untouched
    kept_mlp_channels: list[int] | None = None
    compensation: dict[str, str] = field(
        default_factory=dict
    )  # projection -> what really ran (lstsq may fall back to bias)

    def to_dict(self) -> dict:
        # channel lists are long; the report keeps the heads (few, and what GQA is about)
        return {
            "index": self.index,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "kept_query_heads": self.kept_query_heads,
            "compensation": self.compensation,
        }


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
    refit_samples: int | None = None  # calibration windows the refit was fitted on (None: no calibration)

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
            "refit_samples": self.refit_samples,
        }


def _validate_units(shapes: Sequence[LayerShape], plan: Sequence[LayerUnits], attn_unit: str) -> None:
    if len(plan) != len(shapes):
        raise ValueError(f"the plan has {len(plan)} layers but the model has {len(shapes)}")
    for index, (shape, units) in enumerate(zip(shapes, plan, strict=False)):
        if not (1 <= units.kv_heads <= shape.num_key_value_heads) or units.heads % units.kv_heads:
            raise ValueError(f"layer {index}: invalid attention units {units}")
        if not (1 <= units.intermediate_size <= shape.intermediate_size):
            raise ValueError(f"layer {index}: invalid MLP width {units.intermediate_size}")
        if (
            attn_unit == "group"
            and units.heads // units.kv_heads != shape.num_attention_heads // shape.num_key_value_heads
        ):
            raise ValueError(
                f"layer {index}: group pruning keeps q:kv, but the plan asks for {units.heads}:{units.kv_heads}"
            )
        if attn_unit == "query" and units.kv_heads != shape.num_key_value_heads:
            raise ValueError(f"layer {index}: query-head pruning keeps every KV head")


def _level(units: LayerUnits, attn_unit: str) -> Level:
    per_group = units.heads // units.kv_heads if attn_unit == "query" else None
    return Level(units.kv_heads, units.intermediate_size, heads_per_group=per_group)


def prune_model(
    model: nn.Module,
    plan: Sequence[LayerUnits],
    calibration: TokenWindows | None = None,
    unit_importance: str = DEFAULT_UNIT_SCORE,
    attn_unit: str = "group",
    compensation: str | Compensation | None = None,
    batch_size: int = 8,
    progress: StageProgress | None = None,
    damping: float = 1e-3,
    refit_windows: RefitWindows | None = None,
    correction: float = 0.0,
) -> PruneOutcome:
    """Prune `model` in place to the per-layer units of `plan` (see the module docstring).

    `compensation`: none | bias | lstsq, or a `cut.compensation.Compensation` callable;
    `refit_windows`: where the least-squares refit's own windows come from (`layer_pass.RefitWindows`);
    `correction`: residual correction (`layer_pass.prune_layers`).
    """
    start = time.perf_counter()
    require_llama_style(model)
    score = get_unit_score(unit_importance)
    step = compensation_step(compensation)
    shapes = layer_shapes(model)
    _validate_units(shapes, plan, attn_unit)
    needs_data = score.needs_statistics or step is not None
    if needs_data and calibration is None:
        raise ValueError(f"unit importance '{unit_importance}' (or compensation) needs calibration windows")
    params_before = sum(p.numel() for p in model.parameters())
    ids = calibration.ids if needs_data else None
    runner = runner_for(model, calibration.seq_len, batch_size) if needs_data else None
    levels = [_level(u, attn_unit) for u in plan]
    refit_ids = refit_ids_for(refit_windows, step, shapes, levels, ids) if needs_data else None
    reports = prune_layers(
        InMemoryLayers(model), ids, runner, levels, score.name, step, damping, progress, refit_ids, correction
    )
    after = layer_shapes(model)
    changes = []
    for report, before, now in zip(reports, shapes, after, strict=False):
        touched = before != now
        heads = (report.kept_query_heads or list(range(before.num_attention_heads))) if touched else None
        channels = (report.kept_channel_indices or list(range(before.intermediate_size))) if touched else None
        changes.append(LayerChange(report.index, before, now, heads, channels, dict(report.compensation)))
    return PruneOutcome(
        layers=changes,
        params_before=params_before,
        params_after=sum(p.numel() for p in model.parameters()),
        seconds=time.perf_counter() - start,
        unit_importance=score.name,
        attn_unit=attn_unit,
        gqa_violations=gqa_violations(after),
        refit_samples=refit_window_count(refit_ids, ids),
    )
