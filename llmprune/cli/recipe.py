"""`llmprune recipe`: the proven pipelines in one command, one subcommand per registered recipe."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Annotated

import typer

from llmprune.cli.common import JsonOpt, guarded, stdout_is_terminal
from llmprune.cli.recipe_options import LOAD_FIELDS, load_parameters, recipe_option_parameters
from llmprune.cli.recipe_sweep import sweep_command
from llmprune.cli.settings_options import settings_parameters, settings_values, with_signature

# the registry is plain data (no torch): the subcommands and their defaults are built from it
from llmprune.engine.recipes.registry import RECIPES, Recipe

EXIT_CODES = {"done": 0, "stopped_at_gate": 1, "finetune_failed": 1, "base_unhealthy": 1, "interrupted": 130}
recipe_app = typer.Typer(help="Proven pipelines in one command: analyze → prune → eval → gate → finetune → eval.")


@recipe_app.callback(invoke_without_command=True)
def recipe_list(
    ctx: typer.Context,
    list_recipes: Annotated[bool, typer.Option("--list", help="Show the recipes and their exact values.")] = False,
    json_output: JsonOpt = False,
) -> None:
    """Proven pipelines in one command. Without a recipe name: the recipes and their exact values."""
    if ctx.invoked_subcommand is not None and not list_recipes:
        return
    from llmprune.ui.console import console, print_json
    from llmprune.ui.recipe_view import recipe_summaries, recipes_table

    if json_output:
        print_json({"recipes": [recipe.to_dict() for recipe in RECIPES.values()]})
    else:
        console.print(recipes_table(list(RECIPES.values())))
        console.print(recipe_summaries(list(RECIPES.values())), highlight=False)
        console.print("[dim]run one: llmprune recipe NAME [--model M] [--ratio R] ... (llmprune recipe NAME --help)[/]")
    raise typer.Exit(0)


def _command_for(recipe: Recipe):
    from llmprune.engine.recipes.config import PipelineSettings, RecipeConfig

    parameters = (
        load_parameters(model_as_option=True)
        + settings_parameters(
            RecipeConfig, prefix="", skip=("recipe", *(f.name for f in dataclasses.fields(PipelineSettings)))
        )
        + settings_parameters(PipelineSettings, prefix="", skip=LOAD_FIELDS)
        + recipe_option_parameters(recipe)
        + [
            inspect.Parameter(
                "no_tui",
                inspect.Parameter.KEYWORD_ONLY,
                default=False,
                annotation=Annotated[
                    bool, typer.Option("--no-tui", help="Plain progress lines instead of the fine-tuning dashboard.")
                ],
            ),
            inspect.Parameter("json_output", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=JsonOpt),
        ]
    )

    def command(**values) -> None:
        from llmprune.engine.finetune.config import FinetuneConfig
        from llmprune.engine.recipes.registry import PruneSettings

        chosen = recipe.with_overrides(
            prune=settings_values(PruneSettings, values, prefix="prune__"),
            finetune=settings_values(FinetuneConfig, values, prefix="finetune__"),
        )
        config = RecipeConfig(recipe=chosen, **settings_values(RecipeConfig, values, prefix=""))
        _run(config, values["no_tui"], values["json_output"])

    command.__doc__ = (
        f"Recipe '{recipe.name}': {recipe.summary}. Rerunning the same command resumes an interrupted run."
    )
    return with_signature(command, parameters)


def _run(config, no_tui: bool, json_output: bool) -> None:
    from llmprune.engine.recipes.runner import run_recipe
    from llmprune.ui.console import console, print_json
    from llmprune.ui.recipe_view import RecipeLines, report_footer, report_rich_table
    from llmprune.ui.train_lines import PlainTrainingLines

    lines = None if json_output else PlainTrainingLines()
    host = None
    if not (no_tui or json_output) and stdout_is_terminal():
        from llmprune.ui.tui import run_with_dashboard  # the same dashboard as `llmprune finetune`

        host = lambda train: run_with_dashboard(train, fallback=lines)  # noqa: E731
    view = None if json_output else RecipeLines()
    try:
        report = run_recipe(config, view, finetune_listener=lines, finetune_host=host, progress=view and view.progress)
    finally:
        if view is not None:
            view.close()
    if json_output:
        print_json(report.to_dict())
    else:
        console.print(report_rich_table(report))
        console.print(report_footer(report), highlight=False)
    raise typer.Exit(EXIT_CODES.get(report.status, 1))


for _recipe in RECIPES.values():
    recipe_app.command(_recipe.name)(guarded(_command_for(_recipe)))

recipe_app.command("sweep")(guarded(sweep_command))
