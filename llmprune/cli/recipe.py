"""`llmprune recipe`: the proven pipelines in one command, one subcommand per registered recipe."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llmprune.cli.recipe_sweep import sweep_command
from llmprune.cli.common import DatasetOpt, DeviceOpt, DtypeOpt, JsonOpt, guarded, stdout_is_terminal
# the registry is plain data (no torch): the subcommands and their defaults are built from it
from llmprune.engine.recipes.registry import RECIPES, Recipe

EXIT_CODES = {"done": 0, "stopped_at_gate": 1, "finetune_failed": 1, "interrupted": 130}
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
    prune, train = recipe.prune, recipe.finetune

    def command(
        model: Annotated[str, typer.Option("--model", help="Base model: smollm2-135m, a folder, a file or a hub id.")] = "smollm2-135m",
        name: Annotated[Optional[str], typer.Option("--name", help="Run folder name (default: MODEL-RECIPE-RATIO%).")] = None,
        out: Annotated[str, typer.Option("--out", help="Folder holding the runs.")] = "llmprune-runs",
        dataset: DatasetOpt = "wikitext2",
        eval_dataset: Annotated[str, typer.Option("--eval-dataset", help="Evaluation text (its test split).")] = "wikitext2",
        ratio: Annotated[float, typer.Option("--ratio", help="Fraction of prunable structures removed.")] = prune.ratio,
        importance: Annotated[str, typer.Option("--importance", help="Layer importance criterion.")] = prune.importance,
        strategy: Annotated[str, typer.Option("--strategy", help="Per-layer allocation strategy.")] = prune.strategy,
        alpha: Annotated[float, typer.Option("--alpha", help="Strength of the inverse allocation.")] = prune.alpha,
        mlp: Annotated[bool, typer.Option("--mlp/--no-mlp", help="Prune MLP channels too.")] = prune.prune_mlp,
        layer_start: Annotated[int, typer.Option("--layer-start", help="First prunable layer (earlier ones are protected).")] = prune.layer_start,
        layer_end: Annotated[Optional[int], typer.Option("--layer-end", help="One past the last prunable layer (default: all but the last).")] = prune.layer_end,
        method: Annotated[str, typer.Option("--method", help="Fine-tuning: full or lora.")] = train.method,
        lr: Annotated[float, typer.Option("--lr", help="Fine-tuning peak learning rate.")] = train.lr,
        epochs: Annotated[int, typer.Option("--epochs", help="Fine-tuning epochs.")] = train.epochs,
        samples: Annotated[int, typer.Option("--samples", help="Fine-tuning windows.")] = train.samples,
        grad_accum: Annotated[int, typer.Option("--grad-accum", help="Forward passes per optimizer step.")] = train.grad_accum,
        max_grad_norm: Annotated[float, typer.Option("--max-grad-norm", help="Gradient clipping threshold.")] = train.max_grad_norm,
        warmup_steps: Annotated[int, typer.Option("--warmup-steps", help="Linear warm-up steps.")] = train.warmup_steps,
        teacher: Annotated[bool, typer.Option("--teacher/--no-teacher", help="Distil from the base model when it fits in memory next to the pruned one.")] = train.teacher,
        seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per window (calibration, evaluation, training).")] = 256,
        calibration_samples: Annotated[int, typer.Option("--calibration-samples", help="Windows for the importance analysis.")] = 32,
        eval_windows: Annotated[int, typer.Option("--eval-windows", help="Evaluation windows per PPL measurement.")] = 64,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per forward pass when measuring.")] = 8,
        skip_finetune: Annotated[bool, typer.Option("--skip-finetune", help="Stop after the gate.")] = False,
        auto_retreat: Annotated[bool, typer.Option("--auto-retreat", help="If the gate fails, re-prune lower until it passes.")] = False,
        retreat_step: Annotated[float, typer.Option("--retreat-step", help="Ratio decrement per retreat.")] = 0.05,
        min_ratio: Annotated[float, typer.Option("--min-ratio", help="The auto-retreat gives up below this ratio.")] = 0.05,
        restart: Annotated[bool, typer.Option("--restart", help="Discard a previous run of the same name instead of resuming it.")] = False,
        no_tui: Annotated[bool, typer.Option("--no-tui", help="Plain progress lines instead of the fine-tuning dashboard.")] = False,
        device: DeviceOpt = "auto",
        dtype: DtypeOpt = "auto",
        json_output: JsonOpt = False,
    ) -> None:
        from llmprune.engine.recipes.runner import RecipeConfig, run_recipe
        from llmprune.ui.console import console, print_json
        from llmprune.ui.recipe_view import RecipeLines, report_footer, report_rich_table
        from llmprune.ui.train_lines import PlainTrainingLines

        chosen = recipe.with_overrides(
            prune={"ratio": ratio, "importance": importance, "strategy": strategy, "alpha": alpha, "prune_mlp": mlp,
                   "layer_start": layer_start, "layer_end": layer_end},
            finetune={"method": method, "lr": lr, "epochs": epochs, "samples": samples, "grad_accum": grad_accum,
                      "max_grad_norm": max_grad_norm, "warmup_steps": warmup_steps, "teacher": teacher},
        )
        config = RecipeConfig(
            recipe=chosen, model=model, out=out, name=name, dataset=dataset, eval_dataset=eval_dataset, seq_len=seq_len,
            calibration_samples=calibration_samples, eval_windows=eval_windows, batch_size=batch_size,
            skip_finetune=skip_finetune, auto_retreat=auto_retreat, retreat_step=retreat_step, min_ratio=min_ratio,
            restart=restart, device=device, dtype=dtype,
        )
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

    command.__doc__ = f"Recipe '{recipe.name}': {recipe.summary}. Rerunning the same command resumes an interrupted run."
    return command


for _recipe in RECIPES.values():
    recipe_app.command(_recipe.name)(guarded(_command_for(_recipe)))
recipe_app.command("sweep")(guarded(sweep_command))
