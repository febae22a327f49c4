"""`llmprune doctor`: diagnose a checkpoint before anyone trains on it."""

from __future__ import annotations

from typing import Annotated

import typer

from llmprune.cli.common import (
    BaseModelOpt,
    BatchSizeOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxWindowsOpt,
    OptionalModelArg,
    TrustPickleOpt,
)


def doctor_command(
    model: OptionalModelArg = "smollm2-135m",
    test_forward: Annotated[
        bool,
        typer.Option(
            "--test-forward",
            help="Run a short prompt through the model; name the first module whose output is not finite.",
        ),
    ] = False,
    ppl: Annotated[
        bool,
        typer.Option(
            "--ppl", help="Measure perplexity and judge it (relative to the base model when its PPL is known)."
        ),
    ] = False,
    base_ppl: Annotated[
        float | None,
        typer.Option("--base-ppl", help="The base model's PPL on the same data (default: the one prune recorded)."),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", help="Text for --ppl (default: the one prune recorded, else wikitext2)."),
    ] = None,
    seq_len: Annotated[
        int | None, typer.Option("--seq-len", help="Tokens per window for --ppl (default: prune's, else 2048).")
    ] = None,
    max_windows: MaxWindowsOpt = None,
    batch_size: BatchSizeOpt = 1,
    base_model: BaseModelOpt = None,
    trust_pickle: TrustPickleOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    stream: Annotated[
        bool | None,
        typer.Option(
            "--stream/--no-stream",
            help="--test-forward one layer at a time from disk (default: automatic when the model does not fit).",
        ),
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Diagnose a checkpoint: NaN/Inf, huge values, GQA and shapes, forward test, PPL verdict, and what to do.

    Exit code 0: healthy; 1: unsafe to train on (NaN, Inf, huge values, broken GQA/shapes,
    non-finite forward, PPL verdict "broken"); 2: the input cannot be read.
    """
    from llmprune.engine.diagnose.doctor import DoctorConfig, run_doctor
    from llmprune.ui.console import console, print_json, progress_callback
    from llmprune.ui.doctor_report import doctor_report

    config = DoctorConfig(
        model=model,
        base_model=base_model,
        trust_pickle=trust_pickle,
        test_forward=test_forward,
        ppl=ppl,
        dataset=dataset,
        seq_len=seq_len,
        max_windows=max_windows,
        batch_size=batch_size,
        base_ppl=base_ppl,
        device=device,
        dtype=dtype,
        stream=stream,
    )
    with progress_callback("perplexity", enabled=not json_output) as progress:
        report = run_doctor(config, progress=progress)
    if json_output:
        print_json(report.to_dict())
    else:
        console.print(doctor_report(report))
    raise typer.Exit(report.exit_code)
