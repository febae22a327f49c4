"""The `llmprune` command: registers the subcommands and the global options."""

from __future__ import annotations

from typing import Annotated

import typer

from llmprune._version import __version__
from llmprune.cli import analyze as analyze_cli
from llmprune.cli import completion as completion_cli
from llmprune.cli import doctor as doctor_cli
from llmprune.cli import eval as eval_cli
from llmprune.cli import export as export_cli
from llmprune.cli import finetune as finetune_cli
from llmprune.cli import prune as prune_cli
from llmprune.cli import recipe as recipe_cli
from llmprune.cli.common import guarded, quiet_libraries, set_debug

app = typer.Typer(
    name="llmprune",
    help=(
        "Make Llama-style models smaller by structured pruning without breaking them, and bring them back by"
        " fine-tuning."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        print(f"llmprune {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool | None, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks instead of one-line errors.")] = False,
) -> None:
    """llmprune: prune, diagnose, evaluate and fine-tune Llama-style models."""
    set_debug(debug)
    quiet_libraries()


app.command(
    "eval",
    help=(
        "Perplexity on a text (wikitext2, ptb, c4, pydoc, local files), a generation smoke test, or lm-eval task"
        " accuracy (--tasks)."
    ),
)(guarded(eval_cli.eval_command))
app.command("analyze", help="Per-layer importance and a non-uniform pruning plan, saved as a reusable JSON config.")(
    guarded(analyze_cli.analyze_command)
)
app.command(
    "prune", help="GQA-aware structured pruning of attention groups and MLP channels; saves a model that reloads."
)(guarded(prune_cli.prune_command))
app.command("finetune", help="Recovery fine-tuning (full or LoRA) with NaN guards, checkpoints and a live dashboard.")(
    guarded(finetune_cli.finetune_command)
)
app.command(
    "doctor", help="Diagnose a checkpoint: NaN/Inf, huge values, GQA shapes, forward test, PPL verdict and advice."
)(guarded(doctor_cli.doctor_command))
app.command("export", help="Write a model (pruned or not) as a GGUF file for llama.cpp, ollama and LM Studio.")(
    guarded(export_cli.export_command)
)
app.add_typer(recipe_cli.recipe_app, name="recipe")
app.command("completion", help="Shell completion scripts (bash, zsh, fish) generated from this app.")(
    guarded(completion_cli.completion_command)
)


def main() -> None:
    # Ctrl-C, `kill`, a job scheduler's SIGTERM or a closed terminal's SIGHUP stop the command, whatever thread
    # does the work: finetune saves its state, a half-written output is removed, and the exit code is 130
    from llmprune.engine.core.stop import install_signal_handlers

    install_signal_handlers()
    app(prog_name="llmprune")
