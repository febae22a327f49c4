"""`llmprune eval`: perplexity and a generation smoke test."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llmprune.cli.common import (
    BaseModelOpt,
    BatchSizeOpt,
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxWindowsOpt,
    OptionalModelArg,
    SeqLenOpt,
    TrustPickleOpt,
)


def eval_command(
    model: OptionalModelArg = "smollm2-135m",
    dataset: DatasetOpt = "wikitext2",
    seq_len: SeqLenOpt = 2048,
    max_windows: MaxWindowsOpt = None,
    batch_size: BatchSizeOpt = 1,
    prompt: Annotated[Optional[str], typer.Option("--prompt", help="Also print a short greedy generation from this prompt.")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate for --prompt.")] = 32,
    base_model: BaseModelOpt = None,
    trust_pickle: TrustPickleOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Perplexity of a model on a text (default: wikitext-2 test), and optionally a generation."""
    from llmprune.engine.evaluate import EvalConfig, run_evaluation
    from llmprune.ui.console import console, perplexity_table, print_json, progress_callback

    config = EvalConfig(
        model=model, dataset=dataset, seq_len=seq_len, max_windows=max_windows, batch_size=batch_size,
        prompt=prompt, max_new_tokens=max_new_tokens, base_model=base_model, trust_pickle=trust_pickle,
        device=device, dtype=dtype,
    )
    with progress_callback("evaluating", enabled=not json_output) as progress:
        result = run_evaluation(config, progress=progress)
    if json_output:
        print_json(result.to_dict())
        return
    console.print(perplexity_table([result.to_dict()], title=f"Perplexity of {model}"))
    if result.generation is not None:
        console.print(f"[bold]prompt:[/] {prompt}\n[bold]output:[/] {result.generation}", highlight=False)
