"""`llmprune finetune`: guarded recovery fine-tuning, with the live dashboard in a terminal."""

from __future__ import annotations

import inspect
import os
from typing import Annotated

import typer

from llmprune.cli.common import JsonOpt, stdout_is_terminal
from llmprune.cli.recipe_options import LOAD_FIELDS, load_parameters
from llmprune.cli.settings_options import settings_parameters, settings_values, with_signature
from llmprune.engine.core.errors import UserInputError


def _finetune_parameters() -> list[inspect.Parameter]:
    """The command's options: the model argument, where the model loads, every FinetuneConfig field, the display."""
    from llmprune.engine.finetune.config import FinetuneConfig  # torch-free: the options come from its fields

    keyword = inspect.Parameter.KEYWORD_ONLY
    model = inspect.Parameter(
        "model",
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Argument(
                help="Model to fine-tune: a pruned folder, any model folder or file, a hub id, smollm2-135m."
            ),
        ],
    )
    loading = [p for p in load_parameters(model_as_option=False) if p.name != "model"]
    display = [
        inspect.Parameter(
            "no_tui",
            keyword,
            default=False,
            annotation=Annotated[bool, typer.Option("--no-tui", help="Plain progress lines instead of the dashboard.")],
        ),
        inspect.Parameter(
            "watch",
            keyword,
            default=None,
            annotation=Annotated[
                str | None,
                typer.Option(help="Open the dashboard on a run directory (going or finished) and do nothing else."),
            ],
        ),
        inspect.Parameter("json_output", keyword, default=False, annotation=JsonOpt),
    ]
    settings = settings_parameters(FinetuneConfig, prefix="", skip=LOAD_FIELDS)
    return [model, *settings, *loading, *display]


def finetune_command(**values) -> None:
    """Fine-tune a (pruned) model with NaN guards, atomic checkpoints, resume and a live dashboard."""
    if values["watch"] is not None:
        return watch_command(values["watch"])
    if values["model"] is None:
        raise UserInputError(
            "no model given", "pass the model to fine-tune, e.g. llmprune finetune ./pruned --samples 200"
        )
    from llmprune.engine.finetune.config import FinetuneConfig

    config = FinetuneConfig(**settings_values(FinetuneConfig, values, prefix=""))
    json_output = values["json_output"]
    plan = _show_memory_plan(config, json_output)
    _train_and_report(config, plan, dashboard=not (values["no_tui"] or json_output), json_output=json_output)


def _show_memory_plan(config, json_output: bool):
    """Plan the memory before anything loads and show it; --dry-run ends here (exit 0: it fits, 1: it does not)."""
    from llmprune.engine.finetune.memory_plan import plan_finetune
    from llmprune.ui.console import console, print_json
    from llmprune.ui.train_lines import memory_plan_table

    plan = plan_finetune(config)
    shown = plan.to_dict() if plan is not None else None
    if config.dry_run:
        fits = plan is None or plan.fits
        if json_output:
            print_json({"status": "dry_run", "fits": fits, "memory_plan": shown})
        elif shown is None:
            console.print("memory plan: not known before a weights-only file is loaded; every other check passed")
        else:
            console.print(memory_plan_table(shown))
        raise typer.Exit(0 if fits else 1)
    if shown is not None and not json_output and os.environ.get("RANK", "0") == "0":
        console.print(memory_plan_table(shown))
    return plan


with_signature(finetune_command, _finetune_parameters())


def _train_and_report(config, plan, *, dashboard: bool, json_output: bool) -> None:
    """Train (under the dashboard in a terminal), then print the result; the exit code says how the run ended."""
    from llmprune.engine.finetune.train import UnhealthyModelError, run_finetune
    from llmprune.ui.console import console, error_line, print_json
    from llmprune.ui.train_lines import PlainTrainingLines, finetune_table, health_findings_table

    # under `accelerate launch` every process runs this command: only the first one talks
    main_process = os.environ.get("RANK", "0") == "0"
    lines = None if json_output or not main_process else PlainTrainingLines()
    try:
        if main_process and dashboard and stdout_is_terminal():
            from llmprune.ui.tui import run_with_dashboard

            result = run_with_dashboard(
                lambda listener, control: run_finetune(config, listener, control=control, memory_plan=plan),
                fallback=lines,
            )
        else:
            result = run_finetune(config, lines, memory_plan=plan)
    except UnhealthyModelError as refused:
        report = refused.report.to_dict()
        if json_output:
            print_json({"status": "refused_unhealthy", "health": report})
        else:
            console.print(health_findings_table(report))
            error_line(
                "the model failed the pre-flight health check, so training was not started",
                "fix what doctor reports (see advice above), or pass --force to train anyway",
            )
        raise typer.Exit(1) from None
    if not main_process:
        raise typer.Exit(130 if result.status == "stopped_by_user" else 0 if result.ok else 1)
    if json_output:
        print_json(result.to_dict())
    else:
        console.print(finetune_table(result.to_dict()))
    if result.status == "stopped_by_user":  # saved, but not finished: `finetune && deploy` must not go on
        raise typer.Exit(130)
    if not result.ok:
        raise typer.Exit(1)


def watch_command(run_dir: str) -> None:
    from pathlib import Path

    from llmprune.ui.tui import watch_run

    if not (Path(run_dir) / "run.json").is_file():
        raise UserInputError(
            f"{run_dir} is not a fine-tuning run directory (no run.json)",
            "pass the --out folder of a llmprune finetune run",
        )
    watch_run(run_dir)
