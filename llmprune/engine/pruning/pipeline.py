"""`llmprune prune`: load -> choose the path -> measure -> cut and compensate -> PPL -> save -> log.

`run_prune(PruneConfig) -> PruneResult` is what the command, the recipe's
prune step and `recipe sweep` call. `route.choose_path` decides, once, how
much each layer loses (the choice and its reason are in the result):
- global (default): `global_path.prune_globally` measures every KV group
  and MLP channel on calibration text, cuts the cheapest across all layers
  and compensates each layer (least squares by default); optionally drops
  whole layers first (--drop-layers);
- plan (any field-guide option): layer importance -> per-layer rates ->
  `cut.prune_model`, with the same unit scores and compensation;
- streamed: the same global body over the layers streamed from disk (`walk.streaming`).

The size of the cut is read once (`config.budget()` -> `allocate.budget.Budget`) before the path is
chosen; every path takes that budget and counts parameters with `allocate.cost.ParameterCost`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.process_memory import PhasePeaks
from llmprune.engine.core.progress import StageProgress, named_stage, stage_name
from llmprune.engine.evaluate import perplexity
from llmprune.engine.io.architecture import gqa_violations, layer_shapes, require_llama_style
from llmprune.engine.pruning.allocate.budget import Budget
from llmprune.engine.pruning.allocate.cost import ParameterCost
from llmprune.engine.pruning.allocate.plan import make_plan
from llmprune.engine.pruning.analysis import check_config_fits, measure_importance, read_importance_config
from llmprune.engine.pruning.config import CalibrationOptions, PruneConfig  # noqa: F401 (re-exported)
from llmprune.engine.pruning.cut.compensation import step_name
from llmprune.engine.pruning.cut.prune_model import prune_model
from llmprune.engine.pruning.global_path import (
    CalibratedPruneOptions,
    RefitWindows,
    global_figures,
    prune_globally,
    prune_loaded_model,
)
from llmprune.engine.pruning.result import (  # noqa: F401 (re-exported)
    PruneResult,
    after_by_index,
    default_log_name,
    new_run_folder,
    peak_memory_bytes,
    provenance,
    write_run_log,
)
from llmprune.engine.pruning.route import PrunePath, choose_path  # noqa: F401 (re-exported)
from llmprune.engine.pruning.scores.layers import DEFAULT_LAYER_SCORE
from llmprune.engine.pruning.scores.units import get_unit_score
from llmprune.engine.walk.streaming import stream_source


def run_prune(config: PruneConfig, progress: StageProgress | None = None, loaded=None) -> PruneResult:
    """The whole `llmprune prune` (see the module docstring); bad input fails before anything is written.

    `loaded` (a models.LoadedModel) prunes a model already in memory, in place, instead of loading `config.model`.
    """
    from llmprune.engine.pruning.preflight import check_prune_outputs

    start = time.perf_counter()
    budget = config.budget()  # --ratio / --target-params / --drop-layers, read once, before any path is chosen
    config.validate()
    if config.unit_importance:
        get_unit_score(config.unit_importance)  # an unknown name is one line before any work
    check_prune_outputs(config)
    phases = PhasePeaks()  # what holds the memory: the peak of each phase goes into the result
    phases.enter("load")
    try:
        return _run_prune(config, budget, _phase_progress(progress, phases), loaded, start, phases)
    finally:
        phases.close()


def _phase_progress(progress: StageProgress | None, phases: PhasePeaks) -> StageProgress:
    """Each progress stage (measure, prune, perplexity before, ...) is a memory phase of its own."""

    def update(stage: str, done: int, total: int) -> None:
        phases.enter(stage_name(stage))
        if progress:
            progress(stage, done, total)

    return update


def _run_prune(
    config: PruneConfig, budget: Budget, progress: StageProgress, loaded, start: float, phases: PhasePeaks
) -> PruneResult:
    from llmprune.engine.pruning.preflight import check_model_before_pruning, check_prune_outputs, check_weights_on_disk

    saved_config = read_importance_config(config.importance_config) if config.importance_config else None
    placement = config.placement() if loaded is None else None
    path = choose_path(config, placement.device if placement is not None else None)
    if path.name == "streamed":
        check_weights_on_disk(str(stream_source(config.model)), action="pruning", force=config.force)
        return _run_streamed(config, budget, path, placement, start, progress, phases)
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
    cost = ParameterCost.of_model(model)
    shapes = list(cost.shapes)
    if saved_config:
        check_config_fits(saved_config, shapes, config.model)
    options = config.plan_options(saved_config.plan if saved_config else {}, len(shapes))
    # with a parameter target the plan's ratio is solved later; the rest of the options must hold already
    options.validate(len(shapes), check_ratio=not budget.by_target)
    if loaded.tokenizer is None:
        raise UserInputError(
            f"{config.model} has no tokenizer", "save the tokenizer next to the weights or use --base-model"
        )
    run = _Run(config, budget, path, loaded, cost, progress)
    phases.enter("calibrate")
    if path.name == "plan":
        result = run.plan(options, saved_config)
    elif path.name == "search":
        result = run.search_allocation()
    else:
        result = run.global_allocation()
    return _finish(result, config, start, phases=phases)


def refit_windows(config: PruneConfig, tokenizer, device: torch.device, streamed: bool) -> RefitWindows | None:
    """Where the least-squares refit's windows come from (`global_path.RefitWindows`).

    --refit-samples N: N windows of the calibration text, drawn now. By default, when --importance-samples
    give the refit fewer than `refit.MIN_TOKENS_PER_INPUT` tokens per kept input, windows of its own for
    `refit.DRAWN_TOKENS_PER_INPUT` (`layer_pass.refit_ids_for`): on SmolLM2 at 20 %, refitting on 8
    windows instead of 64 costs 80.10 -> 88.91 wiki PPL (benchmarks/refit_split.py), and a Llama-3-8B
    down_proj kept at 12.6 k inputs asks for about 790 windows of 128 tokens. Not when streamed on the CPU,
    the small machine's path: one layer at 8B widths took 470 s and 9.06 GB refitted plainly on 787
    windows of 64 tokens, against 41 s and 2.22 GB (benchmarks/one_layer_8b.py); the summary says what
    --refit-samples would give.
    """
    from llmprune.engine.data import load_calibration_windows

    calib = config.calibration

    def draw(count: int) -> torch.Tensor:
        return load_calibration_windows(tokenizer, calib.dataset, count, calib.seq_len, calib.seed).ids.to(device)

    if calib.refit_samples == calib.samples:
        return None  # the very windows the units are chosen on
    if calib.refit_samples is not None:
        fixed = draw(calib.refit_samples)
        return lambda needed: fixed
    if streamed and device.type == "cpu":
        return None
    return lambda needed: draw(needed) if needed > calib.samples else None


def resolved_options(config: PruneConfig, **extra) -> dict:
    """The config as JSON (what report.json and llmprune.json record), plus what the run decided."""
    values = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(replace(config, compensation=None)).items()}
    return {**values, **extra}


class _Run:
    """One in-memory prune: the loaded model, its parameter-cost model, the calibration and evaluation text."""

    def __init__(self, config: PruneConfig, budget: Budget, path: PrunePath, loaded, cost: ParameterCost, progress):
        self.config, self.budget, self.path, self.loaded, self.cost, self.progress = (
            config,
            budget,
            path,
            loaded,
            cost,
            progress,
        )
        self.target = budget.target(cost.total)
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
        method = config.importance_method or DEFAULT_LAYER_SCORE
        if saved_config:
            method, scores = saved_config.method, saved_config.scores
        elif needs_scores:
            measured = measure_importance(model, windows, method, config.calibration.batch_size, self.progress)
            method, scores = measured.method, measured.scores
        else:
            method, scores = "none (uniform plan)", [0.0] * len(self.cost.shapes)
        options, rates, units = make_plan(
            scores,
            self.cost,
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
            refit_windows=refit_windows(config, self.loaded.tokenizer, next(model.parameters()).device, streamed=False),
            correction=config.residual_correction,
        )
        ppl_after = self.perplexity("after")
        share = self.cost.prunable_share_removed(
            after_by_index(outcome.layers, self.cost.num_layers),
            options.prunable(self.cost.num_layers),
            mlp=config.prune_mlp,
            attn_unit=config.attn_unit,
        )
        return self.result(
            options=resolved_options(
                config,
                allocation="plan",
                plan=options.to_dict(),
                unit_importance=unit_score,
                compensation=compensation if isinstance(compensation, str) else step_name(compensation),
                refit_samples=outcome.refit_samples,
            ),
            ratio=options.ratio,
            removed_share_prunable=share,
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
        from llmprune.engine.pruning.search_path import prune_by_search

        config, model = self.config, self.model
        ppl_before = self.perplexity("before")
        device = next(model.parameters()).device
        outcome, figures = prune_by_search(
            model,
            self.loaded.tokenizer,
            config,
            self.budget,
            self.progress,
            refit_windows(config, self.loaded.tokenizer, device, streamed=False),
        )
        return self.result(
            **figures,
            options=resolved_options(
                config,
                allocation="search",
                compensation=config.compensation_kind,
                dropped_layers=outcome.dropped_layers,
                unit_importance="obs",
                refit_samples=outcome.refit_samples,
            ),
            params_after=sum(p.numel() for p in model.parameters()),
            importance=[0.0] * len(figures["layers"]),
            importance_method="obs (searched allocation: KL to the dense model on held-out windows)",
            ppl_before=ppl_before,
            ppl_after=self.perplexity("after"),
            search=outcome.to_dict(),
        )

    def global_allocation(self) -> PruneResult:
        """Calibrated depth/width pruning with compensation, units ranked across all layers."""
        config, model = self.config, self.model
        windows = self.calibration_windows()
        ppl_before = self.perplexity("before")
        device = next(model.parameters()).device
        options = _global_options(config)
        outcome = prune_loaded_model(
            model,
            windows.ids.to(device),
            self.budget,
            options,
            config.calibration.batch_size,
            self.progress,
            refit_windows(config, self.loaded.tokenizer, device, streamed=False),
        )
        ppl_after = self.perplexity("after")
        after = layer_shapes(model)
        # nothing left to cut after the dropped layers (or ratio 0): no unit scores, no influence measured
        influence = [s.influence for s in outcome.scores] if outcome.scores else [0.0] * len(after)
        return self.result(
            **global_figures(self.budget, outcome, after),
            options=resolved_options(
                config,
                allocation="global",
                compensation=config.compensation_kind,
                dropped_layers=outcome.dropped_layers,
                unit_importance=options.unit_score,
                refit_samples=outcome.refit_samples,
            ),
            params_after=sum(p.numel() for p in model.parameters()),
            importance=influence,
            importance_method=f"{options.unit_score} (global allocation; importance = block influence)",
            ppl_before=ppl_before,
            ppl_after=ppl_after,
        )


def _global_options(config: PruneConfig) -> CalibratedPruneOptions:
    return CalibratedPruneOptions(
        unit_score=config.unit_score_for("global"),
        compensation=config.compensation_kind,
        correction=config.residual_correction,
    )


def _run_streamed(
    config: PruneConfig, budget: Budget, path: PrunePath, placement, start: float, progress, phases: PhasePeaks
) -> PruneResult:
    """The global path with the weights on disk: one layer on the device at a time, written out as it is done."""
    from transformers import AutoTokenizer

    from llmprune.engine.data import load_calibration_windows
    from llmprune.engine.io.checkpoint import resolve_save_dtype
    from llmprune.engine.walk.streaming import StreamedLayers
    from llmprune.engine.walk.streaming import model_bytes as stored_bytes

    source = stream_source(config.model)
    calib = config.calibration
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    run_folder = new_run_folder(Path(config.log_dir), config.save_ckpt_log_name or default_log_name(config.model))
    out = Path(config.out) if config.out is not None else run_folder / "model"
    # auto: StreamedLayers keeps the source's stored dtype (bf16 in -> bf16 out)
    save_dtype = None if config.save_dtype == "auto" else resolve_save_dtype(config.save_dtype, None, placement.dtype)
    store = StreamedLayers(source, placement.device, placement.dtype, output=out, save_dtype=save_dtype, phases=phases)
    windows = load_calibration_windows(tokenizer, calib.dataset, calib.samples, calib.seq_len, calib.seed)
    refit = refit_windows(config, tokenizer, placement.device, streamed=True)
    del tokenizer  # tens of MB that the layer loop does not need (unless the refit draws more); read again to save
    options = _global_options(config)
    phases.enter("measure")  # store.begin_pruning() starts the "prune" phase
    try:
        runner = store.runner(calib.seq_len, calib.batch_size)
        outcome = prune_globally(store, windows.ids, runner, budget, options, progress, refit)
        after = store.output_shapes
        result = PruneResult(
            **global_figures(budget, outcome, after),
            model=config.model,
            options=resolved_options(
                config,
                allocation="global",
                compensation=config.compensation_kind,
                streamed=True,
                unit_importance=options.unit_score,
                refit_samples=outcome.refit_samples,
            ),
            target_params=budget.target(outcome.cost.total),
            params_after=store.output_parameters(),
            importance_method=f"{options.unit_score} (global allocation, streamed; importance = block influence)",
            importance=[s.influence for s in outcome.scores],
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
