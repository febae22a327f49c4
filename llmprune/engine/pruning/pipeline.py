"""`llmprune prune`: load -> importance (or a saved config) -> plan -> prune -> PPL -> save -> log.

`run_prune(PruneConfig) -> PruneResult` is what the command calls. Two ways
to decide how much each layer loses:
- global allocation (default): `calibrated.prune_loaded_model` measures every
  KV group and MLP channel on calibration text, cuts the cheapest across all
  layers, and compensates each layer (least squares by default); optionally
  drops whole layers first (--drop-layers);
- plan allocation (any plan option): layer importance -> per-layer rates ->
  `pruning.prune_model`, with the same compensation plugged into its seam.
Both work on an already-loaded model for callers that keep it in memory.
"""

from __future__ import annotations

import re
import resource
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from llmprune.engine.pruning.allocation import (
    ATTENTION_UNITS,
    LayerUnits,
    ParameterModel,
    PlanOptions,
    layer_parameters,
    parse_target_params,
    solve_ratio_for_parameters,
)
from llmprune.engine.pruning.analysis import (
    CalibrationOptions,
    StageProgress,
    check_config_fits,
    measure_importance,
    plan_units,
    read_importance_config,
)
from llmprune.engine.io.architecture import LayerShape, gqa_violations, layer_shape, layer_shapes, require_llama_style
from llmprune.engine.core.errors import UserInputError
from llmprune.engine.data import check_text_source, check_window_options
from llmprune.engine.evaluate import PerplexityResult, perplexity
from llmprune.engine.pruning.importance import LAYER_METHODS, get_unit_importance
from llmprune.engine.core.paths import atomic_write_json, atomic_write_text
from llmprune.engine.pruning.prune_model import Compensation, LayerChange, prune_model
from llmprune.engine.pruning.calibrated import COMPENSATIONS, CalibratedPruneOptions, prune_loaded_model
from llmprune.engine.pruning.reconstruction import compensation_step

ALLOCATIONS = ("global", "plan")
# the calibrated path's names for the unit criteria of importance.UNIT_IMPORTANCE
_CALIBRATED_SCORE = {"fluctuation": "fluctuation", "activation": "wanda", "magnitude": "magnitude"}

@dataclass
class PruneConfig:
    """What `llmprune prune` does. Plan options left at None come from --importance-config, else the defaults."""

    model: str = "smollm2-135m"
    """Model spec (alias, folder, file or hub id)."""
    ratio: float | None = None
    """Mean fraction of the prunable units removed in the prunable layers (default 0.2)."""
    target_params: str | None = None
    """Instead of ratio: the size to land on ('6.5B', '110M', or a fraction ≤ 1 of the model to keep)."""
    prune_mlp: bool = False
    """Also prune MLP channels (attention KV groups are always pruned)."""
    attn_unit: str = "group"
    """group: whole KV groups (q:kv unchanged) | query: query heads, evenly in every group."""
    unit_importance: str = "fluctuation"
    """Criterion choosing which units go inside a layer (fluctuation | activation | magnitude | registered ones)."""
    allocation: str = "global"
    """global: rank every KV group and MLP channel of every layer by its measured damage per parameter
    and cut the cheapest (calibrated.prune_loaded_model; prunes MLP channels too) | plan: per-layer rates
    from layer importance (the plan options below; any of them, --uniform or --attn-unit query selects it)."""
    compensation_kind: str = "lstsq"
    """After each layer's cut: lstsq (refit o_proj/down_proj and their biases on calibration inputs) |
    bias (fold the removed units' mean output into the bias) | none."""
    stream: bool | None = None
    """Layer-streamed pruning (streaming.StreamedLayers): weights stay on disk, one layer at a time in memory.
    None: automatically when the model would not fit the device (a safetensors directory or the alias)."""
    drop_layers: int = 0
    """Depth pruning: remove this many whole layers (least block influence) before cutting units (global allocation)."""
    round_to: int = 1
    """MLP widths are rounded to a multiple of this."""
    uniform: bool = False
    """Same shape in every layer (no protected layers) and a stock Llama config on save."""
    importance_config: Path | None = None
    """A layer_importance_config.json from `analyze`: reuse its scores (and plan options as defaults)."""
    importance_method: str = "removal"
    """Layer importance when no config is given: removal | block-influence | taylor."""
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    """Calibration text (training split) for layer and unit importance."""
    strategy: str | None = None
    alpha: float | None = None
    min_rate: float | None = None
    max_rate: float | None = None
    layer_start: int | None = None
    layer_end: int | None = None
    test_after_prune: bool = False
    """Measure perplexity before and after."""
    eval_dataset: str = "wikitext2"
    """Text for that perplexity (its evaluation/test split)."""
    eval_seq_len: int = 128
    max_windows: int | None = 256
    eval_batch_size: int = 8
    save_model: bool = False
    """Save the pruned model (into the run's log folder unless `out` is given)."""
    out: Path | None = None
    """Save the pruned model here."""
    log_dir: Path = Path("prune_log")
    log_name: str | None = None
    """Run folder name under log_dir (default: from the model name)."""
    overwrite: bool = False
    """Replace a previous llmprune output at `out` (a folder that llmprune did not write is never replaced)."""
    force: bool = False
    """Prune even if the weight health check fails (NaN/Inf/huge values, broken GQA or shapes)."""
    compensation: Compensation | None = None
    """Python API only: per-layer step after surgery (see pruning.LayerPruneContext)."""
    base_model: str | None = None
    trust_pickle: bool = False
    device: str = "auto"
    dtype: str = "auto"

    @property
    def uses_global_allocation(self) -> bool:
        """Global allocation unless a layer-importance plan was asked for (any plan option, or a Python compensation)."""
        plan_asked = (
            self.importance_config is not None or self.uniform or self.attn_unit == "query" or self.compensation is not None
            or any(v is not None for v in (self.strategy, self.alpha, self.min_rate, self.max_rate, self.layer_start, self.layer_end))
        )
        return self.allocation == "global" and not plan_asked

    def validate(self) -> None:
        if self.ratio is not None and self.target_params is not None:
            raise UserInputError("--ratio and --target-params were both given", "give one of them")
        if self.ratio is not None and not (0 <= self.ratio < 1):
            raise UserInputError(f"--ratio must lie in [0, 1), got {self.ratio}", "e.g. --ratio 0.2 removes 20 % of the prunable units")
        if self.attn_unit not in ATTENTION_UNITS:
            raise UserInputError(f"unknown --attn-unit '{self.attn_unit}'", f"use one of {', '.join(ATTENTION_UNITS)}")
        if self.importance_method not in LAYER_METHODS:
            raise UserInputError(f"unknown --importance-method '{self.importance_method}'", f"use one of {', '.join(LAYER_METHODS)}")
        get_unit_importance(self.unit_importance)
        if self.allocation not in ALLOCATIONS:
            raise UserInputError(f"unknown --allocation '{self.allocation}'", f"use one of {', '.join(ALLOCATIONS)}")
        if self.compensation_kind not in COMPENSATIONS:
            raise UserInputError(f"unknown --compensation '{self.compensation_kind}'", f"use one of {', '.join(COMPENSATIONS)}")
        if self.drop_layers < 0:
            raise UserInputError(f"--drop-layers must be ≥ 0, got {self.drop_layers}", "e.g. --drop-layers 4")
        if self.stream and not self.uses_global_allocation:
            raise UserInputError("--stream works with --allocation global only", "leave out the plan options (--pruning-strategy, --uniform, ...)")
        if self.stream and (self.drop_layers or self.test_after_prune):
            raise UserInputError("--stream cannot be combined with --drop-layers or --test-after-prune (the model is never in memory)",
                                 "evaluate the saved model with `llmprune eval DIR`")
        if self.drop_layers and not self.uses_global_allocation:
            raise UserInputError("--drop-layers works with --allocation global only", "leave out the plan options (--pruning-strategy, --uniform, ...)")
        if self.round_to < 1:
            raise UserInputError(f"--round-to must be ≥ 1, got {self.round_to}", "e.g. --round-to 8 or 64")
        self.calibration.validate()
        if self.test_after_prune:
            check_window_options(self.eval_seq_len, self.max_windows, self.eval_batch_size, seq_len_option="--eval-seq-len")
            check_text_source(self.eval_dataset, "--eval-dataset")
        if self.out is not None and Path(self.out).is_file():
            raise UserInputError(f"--out {self.out} is a file", "name a folder for the pruned model")


@dataclass
class PruneResult:
    """Everything the report shows, and what `llmprune.json` records."""

    model: str
    options: dict
    ratio: float
    target_params: int | None
    params_before: int
    params_after: int
    layers: list[LayerChange]
    rates: list[float]
    importance_method: str
    importance: list[float]
    gqa_violations: list[int]
    seconds: float
    peak_memory_bytes: int  # peak RSS of the process on CPU (libraries included), peak allocated on CUDA
    model_bytes: int  # the unpruned weights, for comparison with the peak
    ppl_before: PerplexityResult | None = None
    ppl_after: PerplexityResult | None = None
    saved_to: str | None = None
    log_dir: str | None = None
    loaded: Any = field(default=None, repr=False)
    """The pruned model in memory (a models.LoadedModel), for callers that go on with it; not serialised."""

    @property
    def removed_share(self) -> float:
        return 1 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def healthy(self) -> bool:
        finite = self.ppl_after is None or (self.ppl_after.ppl == self.ppl_after.ppl and self.ppl_after.ppl != float("inf"))
        return not self.gqa_violations and finite

    def gqa_summary(self) -> str:
        if self.gqa_violations:
            return f"GQA broken in layers {self.gqa_violations}"
        ratios = sorted({a.after.num_attention_heads // a.after.num_key_value_heads for a in self.layers})
        return "all layers keep " + " or ".join(f"{r}:1" for r in ratios)

    def to_dict(self) -> dict:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "loaded"}
        data["layers"] = [layer.to_dict() for layer in self.layers]
        data["ppl_before"] = self.ppl_before.to_dict() if self.ppl_before else None
        data["ppl_after"] = self.ppl_after.to_dict() if self.ppl_after else None
        data["removed_share"] = self.removed_share
        data["gqa"] = self.gqa_summary()
        data["healthy"] = self.healthy
        return data


def resolve_plan_options(config: PruneConfig, file_plan: dict, num_layers: int) -> PlanOptions:
    """Explicit option > the importance config's > the default; --uniform overrides the layer range and strategy."""

    # the file's layer_end may be null (its default), which must stay null rather than fall back
    from_file = PlanOptions(**{k: v for k, v in file_plan.items() if k in PlanOptions.__dataclass_fields__})
    options = from_file.with_overrides(
        ratio=config.ratio, strategy=config.strategy, alpha=config.alpha, min_rate=config.min_rate,
        max_rate=config.max_rate, layer_start=config.layer_start, layer_end=config.layer_end,
    )
    if config.uniform:
        options = replace(options, strategy="uniform", layer_start=0, layer_end=num_layers)
    return options


def parameter_model(model: torch.nn.Module, shapes: list[LayerShape]) -> ParameterModel:
    layer = model.model.layers[0]
    qkv_bias, mlp_bias = layer.self_attn.q_proj.bias is not None, layer.mlp.gate_proj.bias is not None
    hidden = model.config.hidden_size
    totals = [
        layer_parameters(hidden, s, LayerUnits(s.num_key_value_heads, s.num_attention_heads, s.intermediate_size), qkv_bias, mlp_bias)
        for s in shapes
    ]
    return ParameterModel(sum(p.numel() for p in model.parameters()), hidden, shapes, qkv_bias, mlp_bias, totals)


def make_plan(
    scores: list[float],
    counter: ParameterModel,
    options: PlanOptions,
    attn_unit: str = "group",
    prune_mlp: bool = False,
    round_to: int = 1,
    same_in_every_layer: bool = False,
    target_params: int | None = None,
) -> tuple[PlanOptions, list[float], list[LayerUnits]]:
    """Layer scores -> (options with the final ratio, per-layer rates, per-layer units).

    With `target_params`, the ratio is solved so that the pruned model has about
    that many parameters (counted exactly from the planned shapes).
    """
    shapes = counter.shapes

    def plan_for(ratio: float) -> tuple[list[float], list[LayerUnits]]:
        return plan_units(scores, shapes, replace(options, ratio=ratio), attn_unit, prune_mlp, round_to, same_in_every_layer)

    if target_params is not None:
        def count(ratio: float) -> int:
            # ratios under min_rate are not plans; the smallest real one is min_rate
            return counter.count(plan_for(ratio if ratio == 0 or ratio >= options.min_rate else options.min_rate)[1])

        options = replace(options, ratio=solve_ratio_for_parameters(target_params, count, options.max_rate))
    rates, units = plan_for(options.ratio)
    return options, rates, units


def _peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _run_folder(log_dir: Path, name: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = log_dir / name / stamp
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = log_dir / name / f"{stamp}-{suffix}"
    return folder


def default_log_name(model: str) -> str:
    name = Path(model.rstrip("/")).name or model
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def run_prune(config: PruneConfig, progress: StageProgress | None = None) -> PruneResult:
    """The whole `llmprune prune` (see the module docstring); bad input fails before anything is written."""
    from llmprune.engine.data import load_calibration_windows, load_evaluation_windows
    from llmprune.engine.core.device import choose_placement
    from llmprune.engine.io.models import load_model

    from llmprune.engine.pruning.preflight import check_model_before_pruning, check_prune_outputs, check_weights_on_disk

    start = time.perf_counter()
    config.validate()
    check_prune_outputs(config)
    saved_config = read_importance_config(config.importance_config) if config.importance_config else None
    placement = choose_placement(config.device, config.dtype)
    source = _wants_stream(config, placement)
    if source is not None:
        check_weights_on_disk(str(source), action="pruning", force=config.force)
        return _run_streamed(config, source, placement, start, progress)
    loaded = load_model(config.model, base_model=config.base_model, trust_pickle=config.trust_pickle, placement=placement)
    model = loaded.model
    require_llama_style(model)
    seq_lens = {"--seq-len": config.calibration.seq_len, **({"--eval-seq-len": config.eval_seq_len} if config.test_after_prune else {})}
    check_model_before_pruning(model, action="pruning", force=config.force, seq_lens=seq_lens, drop_layers=config.drop_layers)
    check_prune_outputs(config, needed_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))
    shapes = layer_shapes(model)
    if saved_config:
        check_config_fits(saved_config, shapes, config.model)
    file_plan = saved_config.plan if saved_config else {}
    options = resolve_plan_options(config, file_plan, len(shapes))
    target_mode = config.target_params is not None
    # with a parameter target the ratio is solved later; the rest of the options must hold already
    (replace(options, ratio=0.0) if target_mode else options).validate(len(shapes))
    if loaded.tokenizer is None:
        raise UserInputError(f"{config.model} has no tokenizer", "save the tokenizer next to the weights or use --base-model")
    counter = parameter_model(model, shapes)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    target = parse_target_params(config.target_params, counter.total) if target_mode else None

    if config.uses_global_allocation:
        return _run_global(config, loaded, counter, target, start, progress, model_bytes)

    criterion = get_unit_importance(config.unit_importance)
    needs_scores = saved_config is None and options.strategy != "uniform"
    needs_windows = needs_scores or criterion.needs_activations or config.compensation is not None
    calib = config.calibration
    windows = load_calibration_windows(loaded.tokenizer, calib.dataset, calib.samples, calib.seq_len, calib.seed) if needs_windows else None
    eval_windows = (
        load_evaluation_windows(loaded.tokenizer, config.eval_dataset, config.eval_seq_len, config.max_windows)
        if config.test_after_prune else None
    )

    if saved_config:
        method, scores = saved_config.method, saved_config.scores
    elif needs_scores:
        measured = measure_importance(model, windows, config.importance_method, calib.batch_size, progress)
        method, scores = measured.method, measured.scores
    else:
        method, scores = "none (uniform plan)", [0.0] * len(shapes)

    options, rates, units = make_plan(scores, counter, options, config.attn_unit, config.prune_mlp, config.round_to,
                                      config.uniform, target)

    def stage(name: str):
        return (lambda d, t: progress(name, d, t)) if progress else None

    ppl_before = perplexity(model, eval_windows, config.eval_batch_size, stage("perplexity before")) if eval_windows else None
    compensation = config.compensation
    if compensation is None and config.compensation_kind != "none":
        compensation = compensation_step(config.compensation_kind)
    outcome = prune_model(model, units, windows, config.unit_importance, config.attn_unit, compensation,
                          gram=bool(getattr(compensation, "needs_gram", False)),
                          batch_size=calib.batch_size, progress=progress)
    ppl_after = perplexity(model, eval_windows, config.eval_batch_size, stage("perplexity after")) if eval_windows else None

    resolved = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(replace(config, compensation=None)).items()},
        "allocation": "plan",
        "plan": options.to_dict(),
        "compensation": getattr(compensation, "__name__", type(compensation).__name__) if compensation else None,
    }
    result = PruneResult(
        model=config.model, options=resolved, ratio=options.ratio, target_params=target,
        params_before=outcome.params_before, params_after=outcome.params_after, layers=outcome.layers, rates=rates,
        importance_method=method, importance=list(scores), gqa_violations=outcome.gqa_violations,
        seconds=0.0, peak_memory_bytes=_peak_memory_bytes(placement.device), model_bytes=model_bytes, ppl_before=ppl_before, ppl_after=ppl_after,
        loaded=loaded,
    )
    return _finish(result, config, start)


def _prunable_parameters(shapes: list[LayerShape], hidden: int) -> int:
    """Parameters of every KV group and MLP channel (what --ratio is a share of under global allocation)."""
    return sum(
        hidden * s.head_dim * (2 * s.num_attention_heads + 2 * s.num_key_value_heads) + 3 * hidden * s.intermediate_size
        for s in shapes
    )


def _changes(before: list[LayerShape], after: list[LayerShape], dropped: list[int], reports, hidden: int) -> tuple[list[LayerChange], list[float]]:
    """Per remaining layer: its change (original index) and the share of its prunable parameters removed."""
    kept = [i for i in range(len(before)) if i not in set(dropped)]
    by_index = {kept[r.index]: r for r in reports}
    changes, rates = [], []
    for new_index, old_index in enumerate(kept):
        report, was, now = by_index.get(old_index), before[old_index], after[new_index]
        ratio_heads = was.num_attention_heads // was.num_key_value_heads
        heads = [g * ratio_heads + j for g in report.kept_groups for j in range(ratio_heads)] if report else None
        changes.append(LayerChange(old_index, was, now, heads, report.kept_channel_indices if report else None))
        rates.append(1 - _prunable_parameters([now], hidden) / _prunable_parameters([was], hidden))
    return changes, rates


def _run_global(config: PruneConfig, loaded, counter: ParameterModel, target: int | None, start: float, progress,
                model_bytes: int) -> PruneResult:
    """`llmprune prune` with global allocation: calibrated depth/width pruning with compensation."""
    from llmprune.engine.data import load_calibration_windows, load_evaluation_windows

    model, calib = loaded.model, config.calibration
    shapes = layer_shapes(model)
    params_before = counter.total
    ratio = config.ratio if config.ratio is not None else 0.2
    to_remove = params_before - target if target is not None else int(ratio * _prunable_parameters(shapes, model.config.hidden_size))
    windows = load_calibration_windows(loaded.tokenizer, calib.dataset, calib.samples, calib.seq_len, calib.seed)
    eval_windows = (
        load_evaluation_windows(loaded.tokenizer, config.eval_dataset, config.eval_seq_len, config.max_windows)
        if config.test_after_prune else None
    )

    def stage(name: str):
        return (lambda d, t: progress(name, d, t)) if progress else None

    device = next(model.parameters()).device
    ppl_before = perplexity(model, eval_windows, config.eval_batch_size, stage("perplexity before")) if eval_windows else None
    options = CalibratedPruneOptions(unit_score=_CALIBRATED_SCORE.get(config.unit_importance, config.unit_importance),
                                     compensation=config.compensation_kind)
    outcome = prune_loaded_model(model, windows.ids.to(device), to_remove, options, config.drop_layers, calib.batch_size, progress)
    ppl_after = perplexity(model, eval_windows, config.eval_batch_size, stage("perplexity after")) if eval_windows else None

    after = layer_shapes(model)
    changes, rates = _changes(shapes, after, outcome.dropped_layers, outcome.reports, model.config.hidden_size)
    influence = [s.influence for s in outcome.scores] if outcome.scores else [0.0] * len(after)
    resolved = {
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(replace(config, compensation=None)).items()},
        "allocation": "global",
        "compensation": config.compensation_kind,
        "dropped_layers": outcome.dropped_layers,
    }
    result = PruneResult(
        model=config.model, options=resolved, ratio=ratio if target is None else to_remove / params_before, target_params=target,
        params_before=params_before, params_after=sum(p.numel() for p in model.parameters()), layers=changes, rates=rates,
        importance_method=f"{config.unit_importance} (global allocation; importance = block influence)", importance=influence,
        gqa_violations=gqa_violations(after), seconds=0.0, peak_memory_bytes=_peak_memory_bytes(device),
        model_bytes=model_bytes, ppl_before=ppl_before, ppl_after=ppl_after, loaded=loaded,
    )
    return _finish(result, config, start)


def stream_source(spec: str) -> Path | None:
    """The safetensors directory a streamed prune reads for this model spec (None: it cannot stream)."""
    from llmprune.engine.io.models import ALIASES, alias_path, convert_gguf

    if spec in ALIASES:
        return convert_gguf(alias_path(spec))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir() and ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        return path
    return None


def _wants_stream(config: PruneConfig, placement) -> Path | None:
    if config.stream is False or not config.uses_global_allocation or config.drop_layers or config.test_after_prune:
        return None
    from llmprune.engine.pruning.streaming import should_stream

    source = stream_source(config.model)
    if config.stream and source is None:
        raise UserInputError(f"--stream needs a model directory with safetensors weights (or a .gguf / alias), not {config.model}",
                             "save the model with save_pretrained(..., safe_serialization=True) first")
    if source is not None and (config.stream or should_stream(source, placement.device)):
        return source
    return None


def _run_streamed(config: PruneConfig, source: Path, placement, start: float, progress) -> PruneResult:
    """Global-allocation prune with the weights on disk: one layer on the device at a time, written out as it is done."""
    from transformers import AutoTokenizer

    from llmprune.engine.pruning.calibrated import prune_to_target
    from llmprune.engine.data import load_calibration_windows
    from llmprune.engine.pruning.streaming import StreamedLayers, parameter_count
    from llmprune.engine.pruning.streaming import model_bytes as stored_bytes

    calib = config.calibration
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    total = parameter_count(source)
    target = parse_target_params(config.target_params, total) if config.target_params is not None else None
    run_folder = _run_folder(Path(config.log_dir), config.log_name or default_log_name(config.model))
    out = Path(config.out) if config.out is not None else run_folder / "model"
    store = StreamedLayers(source, placement.device, placement.dtype, output=out)
    shapes = [layer_shape(layer) for layer in store.skeleton.model.layers]
    hidden = store.config.hidden_size
    ratio = config.ratio if config.ratio is not None else 0.2
    to_remove = total - target if target is not None else int(ratio * _prunable_parameters(shapes, hidden))
    windows = load_calibration_windows(tokenizer, calib.dataset, calib.samples, calib.seq_len, calib.seed)
    del tokenizer  # tens of MB that the layer loop does not need; read again to be saved with the output
    options = CalibratedPruneOptions(unit_score=_CALIBRATED_SCORE.get(config.unit_importance, config.unit_importance),
                                     compensation=config.compensation_kind)
    try:
        scores, _, reports = prune_to_target(store, windows.ids, store.runner(calib.seq_len, calib.batch_size), to_remove, options, progress)
        after = store.output_shapes
        changes, rates = _changes(shapes, after, [], reports, hidden)
        resolved = {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(replace(config, compensation=None)).items()},
            "allocation": "global", "compensation": config.compensation_kind, "streamed": True,
        }
        result = PruneResult(
            model=config.model, options=resolved, ratio=ratio if target is None else to_remove / total, target_params=target,
            params_before=total, params_after=0, layers=changes, rates=rates,
            importance_method=f"{config.unit_importance} (global allocation, streamed; importance = block influence)",
            importance=[s.influence for s in scores], gqa_violations=gqa_violations(after), seconds=0.0,
            peak_memory_bytes=0, model_bytes=stored_bytes(source), loaded=None,
        )
        result.params_after = store.output_parameters()
        store.finish_output(AutoTokenizer.from_pretrained(str(source)), provenance(result, config))
    except BaseException as error:
        store.abort_output(error)
        raise
    result.saved_to = str(out)
    result.peak_memory_bytes = _peak_memory_bytes(placement.device)
    return _finish(result, config, start, run_folder=run_folder)


def _finish(result: PruneResult, config: PruneConfig, start: float, run_folder: Path | None = None) -> PruneResult:
    """Save the model if asked (and not already written by streaming), write the run log."""
    from llmprune.engine.io.checkpoint import save_model

    run_folder = run_folder or _run_folder(Path(config.log_dir), config.log_name or default_log_name(config.model))
    if result.loaded is not None and (config.save_model or config.out is not None):
        model, loaded = result.loaded.model, result.loaded
        out = Path(config.out) if config.out is not None else run_folder / "model"
        save_model(model, loaded.tokenizer, out, provenance=provenance(result, config))
        result.saved_to = str(out)
    result.seconds = time.perf_counter() - start
    result.log_dir = str(run_folder)
    write_run_log(result, run_folder)
    return result


def provenance(result: PruneResult, config: PruneConfig) -> dict:
    """What llmprune.json records (doctor reads base_model, ppl_before/ppl_after, dataset, seq_len, max_windows)."""
    return {
        "base_model": result.model,
        "ppl_before": result.ppl_before.ppl if result.ppl_before else None,
        "ppl_after": result.ppl_after.ppl if result.ppl_after else None,
        "dataset": config.eval_dataset if result.ppl_after else None,
        "seq_len": config.eval_seq_len if result.ppl_after else None,
        "max_windows": config.max_windows if result.ppl_after else None,
        "pruning": {
            "options": result.options,
            "ratio": result.ratio,
            "target_params": result.target_params,
            "params_before": result.params_before,
            "params_after": result.params_after,
            "removed_share": result.removed_share,
            "importance_method": result.importance_method,
            "importance": result.importance,
            "rates": result.rates,
            "layers": [layer.to_dict() for layer in result.layers],
        },
    }


def format_log(result: PruneResult) -> str:
    """training.log: every figure of the run, readable without tools."""
    lines = [
        f"llmprune prune {result.model}",
        f"finished: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"importance: {result.importance_method}",
        f"ratio: {result.ratio:.4f}" + (f" (solved for --target-params {result.target_params:,})" if result.target_params else ""),
        f"parameters: {result.params_before:,} -> {result.params_after:,} (removed {result.removed_share:.2%} of all parameters)",
        f"GQA: {result.gqa_summary()}",
    ]
    for label, ppl in (("before", result.ppl_before), ("after", result.ppl_after)):
        if ppl:
            lines.append(f"PPL {label}: {ppl.ppl:.4f} ({ppl.dataset}, seq_len {ppl.seq_len}, {ppl.windows} windows)")
    lines.append(f"time: {result.seconds:.1f} s, peak memory: {result.peak_memory_bytes / 2**20:.0f} MiB"
                 f" (the unpruned weights: {result.model_bytes / 2**20:.0f} MiB)")
    if result.saved_to:
        lines.append(f"saved to: {result.saved_to}")
    lines.append("layer  importance  rate    heads  kv  mlp (before -> after)")
    for change, score, rate in zip(result.layers, result.importance, result.rates):
        b, a = change.before, change.after
        lines.append(
            f"{change.index:>5}  {score:>10.4f}  {rate:>5.3f}  {b.num_attention_heads:>3}->{a.num_attention_heads:<3}"
            f" {b.num_key_value_heads}->{a.num_key_value_heads}  {b.intermediate_size}->{a.intermediate_size}"
        )
    lines.append("options: " + ", ".join(f"{k}={v}" for k, v in result.options.items()))
    return "\n".join(lines) + "\n"


def write_run_log(result: PruneResult, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "training.log", format_log(result))
    atomic_write_json(folder / "report.json", result.to_dict())
