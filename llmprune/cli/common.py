"""Options shared by several subcommands, and the error boundary of the CLI."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from typing import Annotated, Any

import click
import typer

from llmprune.engine.core.errors import CheckFailedError, UserInputError
from llmprune.ui.console import err_console, error_line, print_json

ModelArg = Annotated[
    str,
    typer.Argument(help="Model: smollm2-135m, a model folder, a .gguf/.safetensors/.bin/.pt file, or a hub id."),
]
OptionalModelArg = Annotated[
    str,
    typer.Argument(
        help="Model: smollm2-135m (default), a model folder, a .gguf/.safetensors/.bin/.pt file, or a hub id."
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto|cpu|cuda|cuda:N|mps (auto: cuda > mps > cpu).")]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="auto|float32|bfloat16|float16 (auto: bf16 on GPU, fp32 on CPU).")
]
SaveDtypeOpt = Annotated[
    str,
    typer.Option(
        "--save-dtype",
        help="dtype of the saved weights: auto (the source's: bf16 in -> bf16 out)|float32|bfloat16|float16.",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.")]
BaseModelOpt = Annotated[
    str | None,
    typer.Option(
        "--base-model", help="Architecture of a weights-only file (.bin/.pt/.safetensors without config.json)."
    ),
]
TrustPickleOpt = Annotated[
    bool,
    typer.Option(
        "--trust-pickle",
        help=(
            "Allow loading a whole pickled module (e.g. LLM-Pruner's). Runs code from the file: only for files you"
            " trust."
        ),
    ),
]
DatasetOpt = Annotated[
    str, typer.Option("--dataset", help="wikitext2, ptb, c4, pydoc, or a local .txt/.jsonl/.parquet file.")
]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per evaluation window.")]
MaxWindowsOpt = Annotated[
    int | None, typer.Option("--max-windows", help="Evaluate only the first N windows (default: all).")
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")]
IncludePathOpt = Annotated[
    str | None, typer.Option("--include-path", help="Folder of local lm-eval task YAML files (with --tasks).")
]


_state = {"debug": False}


def set_debug(enabled: bool) -> None:
    _state["debug"] = enabled


def _fail(code: int, problem: str, hint: str | None, json_output: bool, details: list[str] = ()) -> None:
    """One line on stderr (and, with --json, one JSON object on stdout); then exit with `code`."""
    if json_output:
        print_json({"status": "error", "exit_code": code, "error": problem, "hint": hint, "details": list(details)})
    error_line(problem, hint)
    for line in list(details)[:10]:
        err_console.print(f"  - {line}", highlight=False, soft_wrap=True, markup=False)
    raise typer.Exit(code)


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """The error boundary of every subcommand: no traceback without --debug.

    Bad input (UserInputError, unreadable/unwritable files, a full disk) -> one line, exit 2;
    a check that stopped the run (CheckFailedError) -> the findings, exit 1; Ctrl-C (or SIGTERM/SIGHUP, see
    engine/core/stop.py) -> exit 130, also when the terminal that went away made a print fail;
    anything else is a bug -> one line naming it, exit 1. With --debug (or LLMPRUNE_DEBUG=1)
    the traceback is shown instead.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = _state["debug"] or os.environ.get("LLMPRUNE_DEBUG") == "1"
        json_output = bool(kwargs.get("json_output"))
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except KeyboardInterrupt:
            if debug:
                raise
            _say_interrupted()
            raise typer.Exit(130) from None
        except Exception as error:  # noqa: BLE001 - this is the boundary
            if _lost_to_a_stop(error):  # the dying terminal's EIO must not replace the stop that came with it
                _say_interrupted()
                raise typer.Exit(130) from None
            if debug:
                raise
            code, problem, hint, details = describe_failure(error)
            _fail(code, problem, hint, json_output, details)

    return wrapper


def _say_interrupted() -> None:
    with contextlib.suppress(OSError):  # the terminal may be gone: the outcome is the exit code, not this line
        err_console.print("[yellow]interrupted[/]")


def _lost_to_a_stop(error: BaseException) -> bool:
    """An error from writing to a terminal that went away, or any error once a stop was asked for by a signal."""
    from llmprune.engine.core.stop import STOP, is_terminal_error, mute_lost_terminal, terminal_lost

    if is_terminal_error(error) and terminal_lost():
        mute_lost_terminal()
        return True
    return STOP.requested and is_terminal_error(error)


def describe_failure(error: BaseException) -> tuple[int, str, str | None, list[str]]:
    """(exit code, problem, hint, details) of an error that reached the CLI."""
    from llmprune.engine.core.outputs import is_disk_full

    if isinstance(error, UserInputError):
        return 2, error.problem, error.hint, []
    if isinstance(error, CheckFailedError):
        return 1, error.problem, error.hint, error.details
    if is_disk_full(error):
        return (
            2,
            f"the disk is full or the file size limit was reached while writing ({_first_line(error)})",
            "free some space (or raise the limit, ulimit -f) and run the command again",
            [],
        )
    if isinstance(error, OSError):
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        return 2, f"{error.strerror or _first_line(error)}{where}", "check the path and its permissions", []
    if isinstance(error, MemoryError):
        return 2, "out of memory", "use a smaller --batch-size/--seq-len, or --stream for prune", []
    return (
        1,
        f"unexpected error: {type(error).__name__}: {_first_line(error)}",
        "run again with --debug to see the traceback, and report it",
        [],
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def quiet_libraries() -> None:
    """Keep transformers/datasets progress bars and warnings off the user's screen.

    Through the environment, which the libraries read when they are first imported:
    importing them here would cost seconds on every `--help`. A library already
    imported (a test runner, a Python caller) is told directly.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "transformers" in sys.modules:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.utils as hub_utils

        hub_utils.disable_progress_bars()


def stdout_is_terminal() -> bool:
    return sys.stdout.isatty()
