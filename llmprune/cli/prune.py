"""`llmprune prune`: GQA-aware structured pruning that saves a reloadable model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmprune.cli.common import (
    BaseModelOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    OptionalModelArg,
    SaveDtypeOpt,
    TrustPickleOpt,
)
from llmprune.cli.pruning_options import (
    AlphaOpt,
    AttnUnitOpt,
    CalibBatchOpt,
    CalibDatasetOpt,
    CalibSeqLenOpt,
    ForceOpt,
    LayerEndOpt,
    LayerStartOpt,
    MaxRateOpt,
    MinRateOpt,
    OverwriteOpt,
    PlanImportanceMethodOpt,
    RefitSamplesOpt,
    RoundToOpt,
    SamplesOpt,
    SeedOpt,
    StrategyOpt,
)
from llmprune.engine.pruning.allocate.plan_options import DEFAULT_RATIO
from llmprune.engine.pruning.analysis_file import DEFAULT_CONFIG_NAME
from llmprune.engine.pruning.config import CalibrationOptions, PruneConfig

# the defaults shown by --help are the engine's (set once, in the config dataclasses)
_PRUNE, _CAL = PruneConfig(), CalibrationOptions()


def prune_command(
    model: OptionalModelArg = "smollm2-135m",
    ratio: Annotated[
        float | None,
        typer.Option(
            "--ratio",
            help=(
                "Fraction of the prunable units (KV groups, + MLP channels with --prune-mlp) removed on average in the"
                f" prunable layers (default {DEFAULT_RATIO})."
            ),
        ),
    ] = None,
    target_params: Annotated[
        str | None,
        typer.Option(
            "--target-params",
            help="Instead of --ratio: the size to land on, e.g. 6.5B, 110M, or 0.8 (keep 80 % of the parameters).",
        ),
    ] = None,
    prune_mlp: Annotated[
        bool,
        typer.Option("--prune-mlp", help="Also prune MLP channels (plan allocation; global allocation always may)."),
    ] = False,
    allocation: Annotated[
        str | None,
        typer.Option(
            "--allocation",
            help=(
                "global: cut the least damaging KV groups/MLP channels across all layers (the default) | plan:"
                " per-layer rates from layer importance (selected by any field-guide option: --importance-method,"
                " --pruning-strategy, --alpha, --min/--max-pruning-rate, --layer-start/--layer-end) | search:"
                " per-layer levels (KV groups, MLP channels, whole layers) searched against KL to the dense model"
                " on held-out calibration windows (EvoPress-style; see --search-budget)."
            ),
        ),
    ] = None,
    search_budget: Annotated[
        str | None,
        typer.Option(
            "--search-budget",
            help="How long --allocation search searches: 20m, 90s, 1h, or forwarded tokens (2M, 500k). Default 15m.",
        ),
    ] = None,
    search_windows: Annotated[
        int,
        typer.Option(
            "--search-windows",
            help="Held-out calibration windows --allocation search selects on (disjoint from the cut's windows).",
        ),
    ] = _PRUNE.search_windows,
    search_dataset: Annotated[
        str | None,
        typer.Option(
            "--search-dataset",
            help=(
                "Text --allocation search selects on, like what the model will serve (its training split; several"
                " joined by commas are mixed). Default: --dataset."
            ),
        ),
    ] = None,
    compensation: Annotated[
        str,
        typer.Option(
            "--compensation",
            help=(
                "After each layer's cut: lstsq (least-squares refit of o_proj/down_proj + bias, default) | bias"
                " (removed units' mean into the bias) | none."
            ),
        ),
    ] = _PRUNE.compensation_kind,
    residual_correction: Annotated[
        float,
        typer.Option(
            "--residual-correction",
            help=(
                "0–1: how much of the pruned model's drift from the dense model each least-squares refit also takes"
                " away (the dense model runs beside, on the refit's windows). 0: none (default)."
            ),
        ),
    ] = _PRUNE.residual_correction,
    stream: Annotated[
        bool | None,
        typer.Option(
            "--stream/--no-stream",
            help=(
                "Layer-streamed: weights stay on disk, one layer at a time in memory, the pruned layer written out"
                " before the next (default: automatic when the model does not fit the device)."
            ),
        ),
    ] = None,
    drop_layers: Annotated[
        int,
        typer.Option(
            "--drop-layers",
            help="Depth pruning: remove this many whole layers (least block influence) before cutting units.",
        ),
    ] = _PRUNE.drop_layers,
    attn_unit: AttnUnitOpt = _PRUNE.attn_unit,
    unit_importance: Annotated[
        str | None,
        typer.Option(
            "--unit-importance",
            help=(
                "Which units go inside a layer: obs (greedy optimal-brain-surgeon removal: least output error after the"
                " refit; the default of the global path), fluctuation (variance of the unit's output on calibration"
                " text; the default of the plan path), activation (weight norm × activation norm) or magnitude (L2)."
            ),
            show_default=False,
        ),
    ] = None,
    round_to: RoundToOpt = _PRUNE.round_to,
    uniform: Annotated[
        bool,
        typer.Option("--uniform", help="Same shape in every layer (no protected layers); saves a stock Llama config."),
    ] = False,
    importance_config: Annotated[
        Path | None,
        typer.Option(
            "--importance-config",
            help="Reuse the scores (and plan options, as defaults) of `llmprune analyze`'s JSON instead of measuring.",
        ),
    ] = None,
    skip_importance_analysis: Annotated[
        bool, typer.Option("--skip-importance-analysis", help=f"Same as --importance-config {DEFAULT_CONFIG_NAME}.")
    ] = False,
    importance_method: PlanImportanceMethodOpt = None,
    importance_samples: SamplesOpt = _CAL.samples,
    refit_samples: RefitSamplesOpt = None,
    seq_len: CalibSeqLenOpt = _CAL.seq_len,
    dataset: CalibDatasetOpt = _CAL.dataset,
    seed: SeedOpt = _CAL.seed,
    batch_size: CalibBatchOpt = _CAL.batch_size,
    pruning_strategy: StrategyOpt = None,
    alpha: AlphaOpt = None,
    min_pruning_rate: MinRateOpt = None,
    max_pruning_rate: MaxRateOpt = None,
    layer_start: LayerStartOpt = None,
    layer_end: LayerEndOpt = None,
    test_after_prune: Annotated[
        bool, typer.Option("--test-after-prune", help="Measure perplexity before and after pruning.")
    ] = False,
    eval_dataset: Annotated[
        str, typer.Option("--eval-dataset", help="Text for --test-after-prune (its test split).")
    ] = _PRUNE.eval_dataset,
    eval_seq_len: Annotated[
        int, typer.Option("--eval-seq-len", help="Tokens per evaluation window.")
    ] = _PRUNE.eval_seq_len,
    max_windows: Annotated[
        int | None, typer.Option("--max-windows", help="Evaluate the first N windows (default 256).")
    ] = _PRUNE.max_windows,
    save_model: Annotated[
        bool, typer.Option("--save-model", help="Save the pruned model into the run's log folder (or --out).")
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Save the pruned model in this folder (new or empty; a previous pruned model only with --overwrite).",
        ),
    ] = None,
    save_dtype: SaveDtypeOpt = "auto",
    overwrite: OverwriteOpt = False,
    force: ForceOpt = False,
    log_dir: Annotated[Path, typer.Option("--log-dir", help="Root of the run logs.")] = _PRUNE.log_dir,
    save_ckpt_log_name: Annotated[
        str | None, typer.Option("--save-ckpt-log-name", help="Run folder name (default: the model's name).")
    ] = None,
    base_model: BaseModelOpt = None,
    trust_pickle: TrustPickleOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Remove whole KV groups (and MLP channels) layer by layer, keeping GQA valid, and report what changed."""
    from llmprune.engine.pruning.pipeline import run_prune
    from llmprune.ui.console import console, print_json
    from llmprune.ui.prune_report import prune_summary, prune_table, stage_progress

    if skip_importance_analysis and importance_config is None:
        importance_config = Path(DEFAULT_CONFIG_NAME)
    config = PruneConfig(
        model=model,
        ratio=ratio,
        target_params=target_params,
        prune_mlp=prune_mlp,
        attn_unit=attn_unit,
        unit_importance=unit_importance,
        allocation=allocation,
        search_budget=search_budget,
        search_windows=search_windows,
        search_dataset=search_dataset,
        compensation_kind=compensation,
        residual_correction=residual_correction,
        drop_layers=drop_layers,
        stream=stream,
        round_to=round_to,
        uniform=uniform,
        importance_config=importance_config,
        importance_method=importance_method,
        calibration=CalibrationOptions(
            dataset=dataset,
            samples=importance_samples,
            refit_samples=refit_samples,
            seq_len=seq_len,
            seed=seed,
            batch_size=batch_size,
        ),
        strategy=pruning_strategy,
        alpha=alpha,
        min_rate=min_pruning_rate,
        max_rate=max_pruning_rate,
        layer_start=layer_start,
        layer_end=layer_end,
        test_after_prune=test_after_prune,
        eval_dataset=eval_dataset,
        eval_seq_len=eval_seq_len,
        max_windows=max_windows,
        save_model=save_model,
        out=out,
        save_dtype=save_dtype,
        log_dir=log_dir,
        save_ckpt_log_name=save_ckpt_log_name,
        overwrite=overwrite,
        force=force,
        base_model=base_model,
        trust_pickle=trust_pickle,
        device=device,
        dtype=dtype,
    )
    with stage_progress(enabled=not json_output) as progress:
        result = run_prune(config, progress=progress)
    if json_output:
        print_json(result.to_dict())
    else:
        console.print(prune_table(result))
        console.print(prune_summary(result))
    if not result.healthy:
        raise typer.Exit(1)
