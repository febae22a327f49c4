"""`llmprune recipe sweep`: compare pruning ratios with one importance analysis, in one table and one chart."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llmprune.cli.common import DatasetOpt, DeviceOpt, DtypeOpt, JsonOpt, OptionalModelArg


def sweep_command(
    model: OptionalModelArg = "smollm2-135m",
    ratio: Annotated[list[float], typer.Option("--ratio", help="A pruning ratio to try; repeat it (e.g. --ratio 0.15 --ratio 0.2).")] = [],  # noqa: B006
    recipe: Annotated[str, typer.Option("--recipe", help="Recipe whose pruning settings are used (safe, attn-only, ...).")] = "safe",
    mlp: Annotated[Optional[bool], typer.Option("--mlp/--no-mlp", help="Override the recipe: prune MLP channels too, or not.")] = None,
    importance_config: Annotated[Optional[Path], typer.Option("--importance-config", help="Reuse this layer_importance_config.json.")] = None,
    dataset: DatasetOpt = "wikitext2",
    eval_dataset: Annotated[str, typer.Option("--eval-dataset", help="Evaluation text (its test split).")] = "wikitext2",
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window.")] = 256,
    calibration_samples: Annotated[int, typer.Option("--calibration-samples", help="Calibration windows.")] = 32,
    eval_windows: Annotated[int, typer.Option("--eval-windows", help="Evaluation windows per PPL.")] = 64,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")] = 8,
    out: Annotated[str, typer.Option("--out", help="Folder that receives MODEL-sweep/.")] = "llmprune-runs",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Prune MODEL at several ratios with one importance analysis; a table of size, PPL and verdict, a JSON and a chart."""
    from llmprune.engine.recipes.registry import get_recipe
    from llmprune.engine.recipes.sweep import SweepConfig, run_sweep, save_sweep_json
    from llmprune.ui.console import console, print_json
    from llmprune.ui.prune_report import stage_progress
    from llmprune.ui.recipe_view import sweep_rich_table
    from llmprune.ui.sweep_chart import save_sweep_chart

    config = SweepConfig(
        ratios=list(ratio), recipe=get_recipe(recipe).with_overrides(prune={"prune_mlp": mlp}), model=model, out=out,
        importance_config=str(importance_config) if importance_config else None, dataset=dataset, eval_dataset=eval_dataset,
        seq_len=seq_len, calibration_samples=calibration_samples, eval_windows=eval_windows, batch_size=batch_size,
        device=device, dtype=dtype,
    )
    with stage_progress(enabled=not json_output) as progress:
        result = run_sweep(config, progress)
    result.chart_path = str(save_sweep_chart(result, Path(result.json_path).with_suffix(".png")))
    save_sweep_json(result)
    if json_output:
        print_json(result.to_dict())
    else:
        console.print(sweep_rich_table(result))
