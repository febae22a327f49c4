"""`llmprune analyze`: per-layer importance and a non-uniform pruning plan."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmprune.cli.common import BaseModelOpt, DeviceOpt, DtypeOpt, JsonOpt, OptionalModelArg, TrustPickleOpt
from llmprune.cli.pruning_options import (
    AlphaOpt,
    AttnUnitOpt,
    CalibBatchOpt,
    CalibDatasetOpt,
    CalibSeqLenOpt,
    ForceOpt,
    ImportanceMethodOpt,
    LayerEndOpt,
    LayerStartOpt,
    MaxRateOpt,
    MinRateOpt,
    OverwriteOpt,
    RoundToOpt,
    SamplesOpt,
    SeedOpt,
    StrategyOpt,
)
from llmprune.engine.pruning.allocate.plan_options import DEFAULT_RATIO
from llmprune.engine.pruning.analysis_file import DEFAULT_CONFIG_NAME
from llmprune.engine.pruning.config import CalibrationOptions
from llmprune.engine.pruning.scores.layers import DEFAULT_LAYER_SCORE

_CAL = CalibrationOptions()  # the defaults --help shows are the engine's


def analyze_command(
    model: OptionalModelArg = "smollm2-135m",
    importance_method: ImportanceMethodOpt = DEFAULT_LAYER_SCORE,
    importance_samples: SamplesOpt = _CAL.samples,
    seq_len: CalibSeqLenOpt = _CAL.seq_len,
    dataset: CalibDatasetOpt = _CAL.dataset,
    seed: SeedOpt = _CAL.seed,
    batch_size: CalibBatchOpt = _CAL.batch_size,
    ratio: Annotated[
        float, typer.Option("--ratio", help="Mean fraction of the prunable units the plan removes.")
    ] = DEFAULT_RATIO,
    pruning_strategy: StrategyOpt = None,
    alpha: AlphaOpt = None,
    min_pruning_rate: MinRateOpt = None,
    max_pruning_rate: MaxRateOpt = None,
    layer_start: LayerStartOpt = None,
    layer_end: LayerEndOpt = None,
    attn_unit: AttnUnitOpt = "group",
    prune_mlp: Annotated[bool, typer.Option("--prune-mlp/--no-prune-mlp", help="Plan MLP channel rates too.")] = True,
    round_to: RoundToOpt = 1,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The JSON config to write (the chart PNG goes next to it).")
    ] = Path(DEFAULT_CONFIG_NAME),
    overwrite: OverwriteOpt = False,
    force: ForceOpt = False,
    base_model: BaseModelOpt = None,
    trust_pickle: TrustPickleOpt = False,
    stream: Annotated[
        bool,
        typer.Option(
            "--stream",
            help="Read one layer at a time from disk (removal, block-influence): for models that do not fit in memory.",
        ),
    ] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Measure how much each decoder layer matters and turn it into a per-layer pruning plan."""
    from llmprune.engine.pruning.allocate.plan import PlanOptions
    from llmprune.engine.pruning.analysis import AnalyzeConfig, run_analyze
    from llmprune.ui.charts import save_importance_chart
    from llmprune.ui.console import console, print_json
    from llmprune.ui.prune_report import analyze_table, importance_bars, stage_progress

    plan = PlanOptions(ratio=ratio).with_overrides(
        strategy=pruning_strategy,
        alpha=alpha,
        min_rate=min_pruning_rate,
        max_rate=max_pruning_rate,
        layer_start=layer_start,
        layer_end=layer_end,
    )
    config = AnalyzeConfig(
        model=model,
        importance_method=importance_method,
        calibration=CalibrationOptions(
            dataset=dataset, samples=importance_samples, seq_len=seq_len, seed=seed, batch_size=batch_size
        ),
        plan=plan,
        attn_unit=attn_unit,
        prune_mlp=prune_mlp,
        round_to=round_to,
        output=output,
        base_model=base_model,
        trust_pickle=trust_pickle,
        device=device,
        dtype=dtype,
        stream=stream,
        overwrite=overwrite,
        force=force,
    )
    with stage_progress(enabled=not json_output) as progress:
        result = run_analyze(config, progress=progress)
    result.chart_path = str(save_importance_chart(result, Path(output).with_suffix(".png")))
    if json_output:
        print_json(result.to_dict())
        return
    console.print(analyze_table(result))
    console.print(importance_bars(result))
    console.print(f"[bold]plan saved:[/] {result.config_path}  [bold]chart:[/] {result.chart_path}", highlight=False)
    console.print(f"[dim]next: llmprune prune {model} --importance-config {result.config_path}[/]", highlight=False)
