"""Options shared by several subcommands, and the error boundary of the CLI."""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Any, Callable, Optional

import typer

from llmprune.engine.core.errors import UserInputError
from llmprune.ui.console import error_line, err_console

ModelArg = Annotated[
    str,
    typer.Argument(help="Model: smollm2-135m, a model folder, a .gguf/.safetensors/.bin/.pt file, or a hub id."),
]
OptionalModelArg = Annotated[
    str,
    typer.Argument(help="Model: smollm2-135m (default), a model folder, a .gguf/.safetensors/.bin/.pt file, or a hub id."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto|cpu|cuda|cuda:N|mps (auto: cuda > mps > cpu).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto|float32|bfloat16|float16 (auto: bf16 on GPU, fp32 on CPU).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.")]
BaseModelOpt = Annotated[
    Optional[str], typer.Option("--base-model", help="Architecture of a weights-only file (.bin/.pt/.safetensors without config.json).")
]
TrustPickleOpt = Annotated[
    bool, typer.Option("--trust-pickle", help="Allow loading a whole pickled module (e.g. LLM-Pruner's). Runs code from the file: only for files you trust.")
]
DatasetOpt = Annotated[str, typer.Option("--dataset", help="wikitext2, ptb, c4, pydoc, or a local .txt/.jsonl/.parquet file.")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per evaluation window.")]
MaxWindowsOpt = Annotated[Optional[int], typer.Option("--max-windows", help="Evaluate only the first N windows (default: all).")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")]
IncludePathOpt = Annotated[Optional[str], typer.Option("--include-path", help="Folder of local lm-eval task YAML files (with --tasks).")]


_state = {"debug": False}


def set_debug(enabled: bool) -> None:
    _state["debug"] = enabled


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn deliberate errors into one line and exit code 2; Ctrl-C into exit 130.

    With --debug (or LLMPRUNE_DEBUG=1) the traceback is shown instead.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = _state["debug"] or os.environ.get("LLMPRUNE_DEBUG") == "1"
        try:
            return command(*args, **kwargs)
        except UserInputError as error:
            if debug:
                raise
            error_line(error.problem, error.hint)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            if debug:
                raise
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


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
