"""`llmprune recipe sweep`: compare pruning ratios with one importance analysis, in one table and one chart."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated

import typer

from llmprune.cli.common import JsonOpt
from llmprune.cli.recipe_options import LOAD_FIELDS, load_parameters, recipe_option_parameters
from llmprune.cli.settings_options import settings_parameters, settings_values, with_signature


def _parameters() -> list[inspect.Parameter]:
    from llmprune.engine.recipes.config import PipelineSettings

    kind = inspect.Parameter.KEYWORD_ONLY
    own = [
        inspect.Parameter(
            "ratio",
            kind,
            default=[],
            annotation=Annotated[
                list[float],
                typer.Option("--ratio", help="A pruning ratio to try; repeat it (e.g. --ratio 0.15 --ratio 0.2)."),
            ],
        ),
        inspect.Parameter(
            "recipe",
            kind,
            default="safe",
            annotation=Annotated[
                str, typer.Option("--recipe", help="Recipe whose pruning settings are used (safe, attn-only, ...).")
            ],
        ),
        inspect.Parameter(
            "importance_config",
            kind,
            default=None,
            annotation=Annotated[
                Path | None, typer.Option("--importance-config", help="Reuse this layer_importance_config.json.")
            ],
        ),
    ]
    return (
        load_parameters(model_as_option=False)
        + own
        + recipe_option_parameters(None)
        + settings_parameters(PipelineSettings, prefix="", skip=LOAD_FIELDS)
        + [inspect.Parameter("json_output", kind, default=False, annotation=JsonOpt)]
    )


def sweep_command(**values) -> None:
    """Prune MODEL at several ratios with one importance analysis, exactly as `recipe NAME --ratio r` prunes.

    Shows a table of size, PPL and verdict, and writes a JSON and a chart.
    """
    from llmprune.engine.recipes.config import PipelineSettings
    from llmprune.engine.recipes.registry import PruneSettings, get_recipe
    from llmprune.engine.recipes.sweep import SweepConfig, run_sweep, save_sweep_json
    from llmprune.ui.console import console, print_json
    from llmprune.ui.prune_report import stage_progress
    from llmprune.ui.recipe_view import sweep_rich_table
    from llmprune.ui.sweep_chart import save_sweep_chart

    json_output = values.pop("json_output")
    recipe = get_recipe(values.pop("recipe")).with_overrides(
        prune=settings_values(PruneSettings, values, prefix="prune__")
    )
    importance_config = values.pop("importance_config")
    ratios = list(values.pop("ratio"))
    config = SweepConfig(
        ratios=ratios,
        recipe=recipe,
        importance_config=str(importance_config) if importance_config else None,
        **settings_values(PipelineSettings, values, prefix=""),
    )
    with stage_progress(enabled=not json_output) as progress:
        result = run_sweep(config, progress)
    result.chart_path = str(save_sweep_chart(result, Path(result.json_path).with_suffix(".png")))
    save_sweep_json(result)
    if json_output:
        print_json(result.to_dict())
    else:
        console.print(sweep_rich_table(result))


with_signature(sweep_command, _parameters())
