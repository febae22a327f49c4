"""`llmprune completion`: print or write the shell completion scripts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmprune.cli.completion_scripts import SCRIPT_FILES, SHELLS, completion_script
from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.outputs import check_writable_location
from llmprune.engine.core.paths import atomic_write_text
from llmprune.ui.console import info, print_json


def completion_command(
    ctx: typer.Context,
    shell: Annotated[str | None, typer.Argument(help="bash, zsh or fish: print that shell's script.")] = None,
    write: Annotated[
        Path | None,
        typer.Option("--write", help="Write all three scripts into this folder (the repository's is completions/)."),
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON object on stdout: the script, or the files written.")
    ] = False,
) -> None:
    """Shell completion scripts generated from this very app (docs/commands/completion.md)."""
    app = ctx.find_root().command  # the app that registered this command (importing it here would be a cycle)
    if write is None and shell is None:
        raise UserInputError(
            "name a shell or pass --write DIR",
            "e.g. llmprune completion bash, or llmprune completion --write completions",
        )
    if shell is not None and shell not in SHELLS:
        raise UserInputError(f"unknown shell '{shell}'", f"use one of {', '.join(SHELLS)}")
    if write is None:
        if json_output:
            print_json({"shell": shell, "script": completion_script(app, shell)})
        else:
            print(completion_script(app, shell), end="")
        return
    check_writable_location(write, option="--write")
    written = []
    for name in (shell,) if shell else SHELLS:
        atomic_write_text(write / SCRIPT_FILES[name], completion_script(app, name))
        written.append(str(write / SCRIPT_FILES[name]))
        if not json_output:
            info(f"wrote {written[-1]}")
    if json_output:
        print_json({"written": written})
