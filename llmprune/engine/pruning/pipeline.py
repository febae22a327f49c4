"""`llmprune prune`: load -> choose the path -> measure -> cut and compensate -> PPL -> save -> log.

`run_prune(PruneConfig) -> PruneResult` is what the command, the recipe's
prune step and `recipe sweep` call. `route.choose_path` decides, once, how
much each layer loses (the choice and its reason are in the result):
- global (default): `calibrated.prune_loaded_model` measures every KV group
  and MLP channel on calibration text, cuts the cheapest across all layers
  and compensates each layer (least squares by default); optionally drops
  whole layers first (--drop-layers);
- plan (any field-guide option): layer importance -> per-layer rates ->
  `prune_model`, with the same unit scores and compensation;
- streamed: the global path with the weights on disk (`streaming`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.process_memory import PhasePeaks
from llmprune.engine.core.progress import StageProgress, named_stage
from llmprune.engine.evaluate import perplexity
from llmprune.engine.io.architecture import LayerShape, gqa_violations, layer_shape, layer_shapes, require_llama_style
from llmprune.engine.pruning.allocation import ParameterModel, parse_target_params
from llmprune.engine.pruning.analysis import check_config_fits, measure_importance, read_importance_config
from llmprune.engine.pruning.calibrated import CalibratedPruneOptions, prune_loaded_model
from llmprune.engine.pruning.config import CalibrationOptions, PruneConfig  # noqa: F401 (re-exported)
from llmprune.engine.pruning.plan import make_plan, parameter_model, resolve_plan_options
from llmprune.engine.pruning.plan_options import DEFAULT_IMPORTANCE_METHOD
from llmprune.engine.pruning.prune_model import LayerChange, prune_model
from llmprune.engine.pruning.reconstruction import step_name
from llmprune.engine.pruning.result import (  # noqa: F401 (re-exported)
    PruneResult,
    default_log_name,
    new_run_folder,
    peak_memory_bytes,
    provenance,
    write_run_log,
)
from llmprune.engine.pruning.route import PrunePath, choose_path  # noqa: F401 (re-exported)
from llmprune.engine.pruning.unit_scores import get_unit_score
from llmprune.engine.walk.streaming import stream_source


def run_prune(config: PruneConfig, progress: StageProgress | None = None, loaded=None) -> PruneResult:
    """The whole `llmprune prune` (see the module docstring); bad input fails before anything is written.

    `loaded` (a models.LoadedModel) prunes a model already in memory, in place, instead of loading `config.model`.
    """
    from llmprune.engine.pruning.preflight import check_prune_outputs

    start = time.perf_counter()
    config.validate()
    if config.unit_importance:
        get_unit_score(config.unit_importance)  # an unknown name is one line before any work
    check_prune_outputs(config)
    phases = PhasePeaks()  # what holds the memory: the peak of each phase goes into the result
    phases.enter("load")
    try:
        return _run_prune(config, _phase_progress(progress, phases), loaded, start, phases)
    finally:
        phases.close()


def _phase_progress(progress: StageProgress | None, phases: PhasePeaks) -> StageProgress:
    """Each progress stage (measure, prune, perplexity before, ...) is a memory phase of its own."""

    def update(stage: str, done: int, total: int) -> None:
        phases.enter(stage)
        if progress:
            progress(stage, done, total)

    return update


def _run_prune(config: PruneConfig, progress: StageProgress, loaded, start: float, phases: PhasePeaks) -> PruneResult:
    from llmprune.engine.pruning.preflight import check_model_before_pruning, check_prune_outputs, check_weights_on_disk

    saved_config = read_importance_config(config.importance_config) if config.importance_config else None
    placement = config.placement() if loaded is None else None
    path = choose_path(config, placement.device if placement is not None else None)
    if path.name == "streamed":
        check_weights_on_disk(str(stream_source(config.model)), action="pruning", force=config.force)
        return _run_streamed(config, path, placement, start, progress, phases)
    loaded = loaded if loaded is not None else config.load(placement)
    model = loaded.model
    require_llama_style(model)
    seq_lens = {
        "--seq-len": config.calibration.seq_len,
        **({"--eval-seq-len": config.eval_seq_len} if config.test_after_prune else {}),
    }
    check_model_before_pruning(
        model,
        action="pruning",
        force=config.force,
        seq_lens=seq_lens,
        drop_layers=config.drop_layers,
        round_to=config.round_to,
    )
    check_prune_outputs(config, needed_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))
    shapes = layer_shapes(model)
    if saved_config:
        check_config_fits(saved_config, shapes, config.model)
    options = resolve_plan_options(config, saved_config.plan if saved_config else {}, len(shapes))
    # with a parameter target the ratio is solved later; the rest of the options must hold already
    (replace(options, ratio=0.0) if config.target_params is not None else options).validate(len(shapes))
    if loaded.tokenizer is None:
        raise UserInputError(
            f"{config.model} has no tokenizer", "save the tokenizer next to the weights or use --base-model"
        )
    counter = parameter_model(model, shapes)
    target = parse_target_params(config.target_params, counter.total) if config.target_params is not None else None
    run = _Run(config, path, loaded, counter, target, progress)
    phases.enter("calibrate")
    if path.name == "plan":
        result = run.plan(options, saved_config)
    elif path.name == "search":
        result = run.search_allocation()
    else:
        result = run.global_allocation()
    return _finish(result, config, start, phases=phases)


def resolved_options(config: PruneConfig, **extra) -> dict:
    """The config as JSON (what report.json and llmprune.json record), plus what the run decided."""
    values = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(replace(config, compensation=None)).items()}
    return {**values, **extra}


class _Run:
    """One in-memory prune: the loaded model, its parameter counter, the calibration and evaluation text."""

    def __init__(
        self, config: PruneConfig, path: PrunePath, loaded, counter: ParameterModel, target: int | None, progress
    ):
        self.config, self.path, self.loaded, self.counter, self.target, self.progress = (
            config,
            path,
            loaded,
            counter,
            target,
            progress,
        )
        self.model = loaded.model
        self.model_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.eval_windows = None
        if config.test_after_prune:
            from llmprune.engine.data import load_evaluation_windows

            self.eval_windows = load_evaluation_windows(
                loaded.tokenizer, config.eval_dataset, config.eval_seq_len, config.max_windows
            )

    def calibration_windows(self):
        from llmprune.engine.data import load_calibration_windows

        calib = self.config.calibration
        return load_calibration_windows(self.loaded.tokenizer, calib.dataset, calib.samples, calib.seq_len, calib.seed)

    def perplexity(self, when: str):
        if self.eval_windows is None:
            return None
        return perplexity(
            self.model, self.eval_windows, self.config.eval_batch_size, named_stage(self.progress, f"perplexity {when}")
        )

    def result(self, **values) -> PruneResult:
        return PruneResult(
            model=self.config.model,
            target_params=self.target,
            gqa_violations=gqa_violations(layer_shapes(self.model)),
            seconds=0.0,
            peak_memory_bytes=peak_memory_bytes(next(self.model.parameters()).device),
            model_bytes=self.model_bytes,
            loaded=self.loaded,
            path=self.path.to_dict(),
            **values,
        )

    def plan(self, options, saved_config) -> PruneResult:
        """Layer importance (or the saved scores) -> per-layer units -> prune_model."""
        config, model = self.config, self.model
        needs_scores = saved_config is None and options.strategy != "uniform"
        compensation = config.compensation or config.compensation_kind
        unit_score = config.unit_score_for("plan")
        needs_windows = needs_scores or get_unit_score(unit_score).needs_statistics or compensation != "none"
        windows = self.calibration_windows() if needs_windows else None
        method = config.importance_method or DEFAULT_IMPORTANCE_METHOD
        if saved_config:
            method, scores = saved_config.method, saved_config.scores
        elif needs_scores:
            measured = measure_importance(model, windows, method, config.calibration.batch_size, self.progress)
            method, scores = measured.method, measured.scores
        else:
            method, scores = "none (uniform plan)", [0.0] * len(self.counter.shapes)
        options, rates, units = make_plan(
            scores,
            self.counter,
            options,
            config.attn_unit,
            config.prune_mlp,
            config.round_to,
            config.uniform,
            self.target,
        )
        ppl_before = self.perplexity("before")
        outcome = prune_model(
            model,
            units,
            windows,
            unit_score,
            config.attn_unit,
            compensation,
            batch_size=config.calibration.batch_size,
            progress=self.progress,
        )
        ppl_after = self.perplexity("after")
        return self.result(
            options=resolved_options(
                config,
                allocation="plan",
                plan=options.to_dict(),
                unit_importance=unit_score,
                compensation=compensation if isinstance(compensation, str) else step_name(compensation),
            ),
            ratio=options.ratio,
            params_before=outcome.params_before,
            params_after=outcome.params_after,
            layers=outcome.layers,
            rates=rates,
            importance_method=method,
            importance=list(scores),
            ppl_before=ppl_before,
            ppl_after=ppl_after,
        )

    def search_allocation(self) -> PruneResult:
        """Every layer cut once at a ladder of levels; the allocation searched against KL on held-out windows."""
        from llmprune.engine.data import held_out_windows, load_text, random_windows, tokenize, window_starts
        from llmprune.engine.pruning.searched import prune_searched

        config, model = self.config, self.model
        shapes, hidden = self.counter.shapes, model.config.hidden_size
        ratio = config.resolved_ratio
        to_remove = (
            self.counter.total - self.target
            if self.target is not None
            else int(ratio * prunable_parameters(shapes, hidden))
        )
        calib = config.calibration
        stream = tokenize(self.loaded.tokenizer, load_text(calib.dataset, "train"))
        cut = random_windows(stream, calib.samples, calib.seq_len, calib.seed, calib.dataset)  # the default's cut
        avoid = window_starts(stream.numel(), calib.samples, calib.seq_len, calib.seed)
        held_out = held_out_windows(stream, config.search_windows, calib.seq_len, avoid, calib.seed + 1)
        ppl_before = self.perplexity("before")
        device = next(model.parameters()).device
        state_path = search_state_path(config)
        state_path.parent.mkdir(parents=True, exist_ok=True)
        outcome = prune_searched(
            model,
            cut.ids.to(device),
            held_out.ids.to(device),
            to_remove,
            _search_options(config),
            compensation=config.compensation_kind,
            batch_size=calib.batch_size,
            state_path=state_path,
            progress=self.progress,
            signature={"model": str(config.model), "dataset": calib.dataset, "samples": calib.samples},
        )
        ppl_after = self.perplexity("after")
        after = layer_shapes(model)
        changes, rates = layer_changes(shapes, after, outcome.dropped_layers, outcome.reports, hidden)
        search = {**outcome.search.to_dict(), "state": str(state_path), "budget_params": outcome.budget,
                  "tolerance_params": outcome.tolerance}  # fmt: skip
        return self.result(
            options=resolved_options(
                config,
                allocation="search",
                compensation=config.compensation_kind,
                dropped_layers=outcome.dropped_layers,
                unit_importance="obs",
            ),
            ratio=ratio if self.target is None else to_remove / self.counter.total,
            params_before=self.counter.total,
            params_after=sum(p.numel() for p in model.parameters()),
            layers=changes,
            rates=rates,
            importance=[0.0] * len(after),
            importance_method="obs (searched allocation: KL to the dense model on held-out windows)",
            ppl_before=ppl_before,
            ppl_after=ppl_after,
            search=search,
        )

    def global_allocation(self) -> PruneResult:
        """Calibrated depth/width pruning with compensation, units ranked across all layers."""
        config, model = self.config, self.model
        shapes, hidden = self.counter.shapes, model.config.hidden_size
        ratio = config.resolved_ratio
        to_remove = (
            self.counter.total - self.target
            if self.target is not None
            else int(ratio * prunable_parameters(shapes, hidden))
        )
        windows = self.calibration_windows()
        ppl_before = self.perplexity("before")
        device = next(model.parameters()).device
        options = CalibratedPruneOptions(
            unit_score=config.unit_score_for("global"), compensation=config.compensation_kind
        )
        outcome = prune_loaded_model(
            model,
            windows.ids.to(device),
            to_remove,
            options,
            config.drop_layers,
            config.calibration.batch_size,
            self.progress,
        )
        ppl_after = self.perplexity("after")
        after = layer_shapes(model)
        changes, rates = layer_changes(shapes, after, outcome.dropped_layers, outcome.reports, hidden)
        # nothing left to cut after the dropped layers (or ratio 0): no unit scores, no influence measured
        influence = [s.influence for s in outcome.scores] if outcome.scores else [0.0] * len(after)
        return self.result(
            options=resolved_options(
                config,
                allocation="global",
                compensation=config.compensation_kind,
                dropped_layers=outcome.dropped_layers,
                unit_importance=options.unit_score,
            ),
            ratio=ratio if self.target is None else to_remove / self.counter.total,
            params_before=self.counter.total,
            params_after=sum(p.numel() for p in model.parameters()),
            layers=changes,
            rates=rates,
            importance=influence,
            importance_method=f"{options.unit_score} (global allocation; importance = block influence)",
            ppl_before=ppl_before,
            ppl_after=ppl_after,
        )


def search_state_path(config: PruneConfig) -> Path:
    """Where the search keeps its state: next to the output (a rerun with the same output resumes from it)."""
    if config.out is not None:
        out = Path(config.out)
        return out.parent / f"{out.name}.search-state.json"
    return Path(config.log_dir) / f"{config.save_ckpt_log_name or default_log_name(config.model)}.search-state.json"


def _search_options(config: PruneConfig):
    from llmprune.engine.pruning.allocate.search import SearchOptions
    from llmprune.engine.pruning.config import DEFAULT_SEARCH_BUDGET, parse_search_budget

    kind, value = parse_search_budget(config.search_budget or DEFAULT_SEARCH_BUDGET)
    if kind == "seconds":
        return SearchOptions(budget_seconds=value, seed=config.calibration.seed)
    return SearchOptions(budget_tokens=int(value), seed=config.calibration.seed)


def prunable_parameters(shapes: list[LayerShape], hidden: int) -> int:
    """Parameters of every KV group and MLP channel (what --ratio is a share of under global allocation)."""
    return sum(
        hidden * s.head_dim * (2 * s.num_attention_heads + 2 * s.num_key_value_heads) + 3 * hidden * s.intermediate_size
        for s in shapes
    )


def layer_changes(
    before: list[LayerShape], after: list[LayerShape], dropped: list[int], reports, hidden: int
) -> tuple[list[LayerChange], list[float]]:
    """Per remaining layer: its change (original index) and the share of its prunable parameters removed."""
    kept = [i for i in range(len(before)) if i not in set(dropped)]
    by_index = {kept[r.index]: r for r in reports}
    changes, rates = [], []
    for new_index, old_index in enumerate(kept):
        report, was, now = by_index.get(old_index), before[old_index], after[new_index]
        ratio_heads = was.num_attention_heads // was.num_key_value_heads
        heads = [g * ratio_heads + j for g in report.kept_groups for j in range(ratio_heads)] if report else None
        changes.append(
            LayerChange(
                old_index,
                was,
                now,
                heads,
                report.kept_channel_indices if report else None,
                dict(report.compensation) if report else {},
            )
        )
        rates.append(1 - prunable_parameters([now], hidden) / prunable_parameters([was], hidden))
    return changes, rates


def _run_streamed(
    config: PruneConfig, path: PrunePath, placement, start: float, progress, phases: PhasePeaks
) -> PruneResult:
    """Global-allocation prune with the weights on disk: one layer on the device at a time, written out as it is
    done."""
    from transformers import AutoTokenizer

    from llmprune.engine.data import load_calibration_windows
    from llmprune.engine.pruning.calibrated import prune_to_target
    from llmprune.engine.walk.streaming import StreamedLayers, parameter_count
    from llmprune.engine.walk.streaming import model_bytes as stored_bytes

    source = stream_source(config.model)
    calib = config.calibration
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    total = parameter_count(source)
    target = parse_target_params(config.target_params, total) if config.target_params is not None else None
    run_folder = new_run_folder(Path(config.log_dir), config.save_ckpt_log_name or default_log_name(config.model))
    out = Path(config.out) if config.out is not None else run_folder / "model"
    from llmprune.engine.io.checkpoint import resolve_save_dtype

    # auto: StreamedLayers keeps the source's stored dtype (bf16 in -> bf16 out)
    save_dtype = None if config.save_dtype == "auto" else resolve_save_dtype(config.save_dtype, None, placement.dtype)
    store = StreamedLayers(source, placement.device, placement.dtype, output=out, save_dtype=save_dtype, phases=phases)
    shapes = [layer_shape(layer) for layer in store.skeleton.model.layers]
    hidden = store.config.hidden_size
    ratio = config.resolved_ratio
    to_remove = total - target if target is not None else int(ratio * prunable_parameters(shapes, hidden))
    windows = load_calibration_windows(tokenizer, calib.dataset, calib.samples, calib.seq_len, calib.seed)
    del tokenizer  # tens of MB that the layer loop does not need; read again to be saved with the output
    options = CalibratedPruneOptions(unit_score=config.unit_score_for("global"), compensation=config.compensation_kind)
    phases.enter("measure")  # store.begin_pruning() starts the "prune" phase
    try:
        scores, _, reports = prune_to_target(
            store, windows.ids, store.runner(calib.seq_len, calib.batch_size), to_remove, options, progress
        )
        after = store.output_shapes
        changes, rates = layer_changes(shapes, after, [], reports, hidden)
        result = PruneResult(
            model=config.model,
            options=resolved_options(
                config,
                allocation="global",
                compensation=config.compensation_kind,
                streamed=True,
                unit_importance=options.unit_score,
            ),
            ratio=ratio if target is None else to_remove / total,
            target_params=target,
            params_before=total,
            params_after=store.output_parameters(),
            layers=changes,
            rates=rates,
            importance_method=f"{options.unit_score} (global allocation, streamed; importance = block influence)",
            importance=[s.influence for s in scores],
            gqa_violations=gqa_violations(after),
            seconds=0.0,
            peak_memory_bytes=0,
            model_bytes=stored_bytes(source),
            loaded=None,
            path=path.to_dict(),
        )
        phases.enter("save")
        store.finish_output(AutoTokenizer.from_pretrained(str(source)), provenance(result, config))
    except BaseException as error:
        store.abort_output(error)
        raise
    result.saved_to = str(out)
    return _finish(result, config, start, run_folder=run_folder, phases=phases, device=placement.device)


def _finish(
    result: PruneResult,
    config: PruneConfig,
    start: float,
    run_folder: Path | None = None,
    phases: PhasePeaks | None = None,
    device=None,
) -> PruneResult:
    """Save the model if asked (and not already written by streaming), write the run log."""
    from llmprune.engine.io.checkpoint import make_stock_compatible, resolve_save_dtype, save_model

    run_folder = run_folder or new_run_folder(
        Path(config.log_dir), config.save_ckpt_log_name or default_log_name(config.model)
    )
    if result.loaded is not None and (config.save_model or config.out is not None):
        if phases is not None:
            phases.enter("save")
        make_stock_compatible(
            result.loaded.model
        )  # zero biases a stock config demands: count what transformers will count
        result.params_after = sum(p.numel() for p in result.loaded.model.parameters())
        model, loaded = result.loaded.model, result.loaded
        out = Path(config.out) if config.out is not None else run_folder / "model"
        # auto keeps the source's stored dtype (bf16 in -> bf16 out) whatever the compute dtype was
        dtype = resolve_save_dtype(
            config.save_dtype, getattr(loaded, "source_dtype", None), next(model.parameters()).dtype
        )
        save_model(model, loaded.tokenizer, out, provenance=provenance(result, config), dtype=dtype)
        result.saved_to = str(out)
    if phases is not None:
        result.peak_rss_by_phase = phases.close()
    if device is None and result.loaded is not None:
        device = next(result.loaded.model.parameters()).device
    if device is not None:  # measured after the save, which can hold a cast copy of the weights
        result.peak_memory_bytes = peak_memory_bytes(device)
    result.seconds = time.perf_counter() - start
    result.log_dir = str(run_folder)
    write_run_log(result, run_folder)
    return result
