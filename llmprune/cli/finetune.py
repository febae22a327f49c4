"""`llmprune finetune`: guarded recovery fine-tuning, with the live dashboard in a terminal."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from llmprune.cli.common import (
    BaseModelOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    SaveDtypeOpt,
    TrustPickleOpt,
    stdout_is_terminal,
)
from llmprune.engine.core.errors import UserInputError


def finetune_command(
    model: Annotated[
        str | None,
        typer.Argument(help="Model to fine-tune: a pruned folder, any model folder or file, a hub id, smollm2-135m."),
    ] = None,
    method: Annotated[str, typer.Option(help="full (every weight) or lora (peft adapters).")] = "full",
    lora_r: Annotated[int, typer.Option(help="LoRA rank.")] = 16,
    lora_alpha: Annotated[int, typer.Option(help="LoRA alpha.")] = 32,
    lora_targets: Annotated[
        str, typer.Option(help="Comma-separated modules that get LoRA adapters.")
    ] = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    merge: Annotated[bool, typer.Option(help="LoRA: merge the adapters and save a full model.")] = False,
    dataset: Annotated[
        str, typer.Option(help="Training text (its train split): wikitext2, ptb, c4, pydoc, or a local file.")
    ] = "wikitext2",
    samples: Annotated[int, typer.Option(help="Training windows.")] = 256,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 256,
    epochs: Annotated[int, typer.Option(help="Passes over the windows.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass (per process).")] = 1,
    grad_accum: Annotated[int, typer.Option(help="Forward passes per optimizer step.")] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 1e-5,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 0,
    schedule: Annotated[str, typer.Option(help="linear, cosine or constant.")] = "cosine",
    max_grad_norm: Annotated[float, typer.Option(help="Clip the global gradient norm (0: no clipping).")] = 1.0,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    seed: Annotated[int, typer.Option(help="Seed for data and torch.")] = 0,
    on_nan: Annotated[
        str,
        typer.Option(
            help="On a NaN/Inf/huge loss or NaN gradient: stop, skip, or rollback (last good state, LR halved)."
        ),
    ] = "rollback",
    loss_limit: Annotated[float, typer.Option(help="A loss above this counts as divergence.")] = 1e6,
    max_rollbacks: Annotated[int, typer.Option(help="Rollbacks before the run stops.")] = 3,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 50,
    out: Annotated[str | None, typer.Option(help="Run directory (default: llmprune-runs/finetune-<time>).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last good checkpoint.")] = False,
    test_before: Annotated[bool, typer.Option(help="Measure PPL before training.")] = False,
    test_after: Annotated[bool, typer.Option(help="Measure PPL after training.")] = False,
    eval_dataset: Annotated[
        str, typer.Option(help="Text for --test-before/--test-after (evaluation split).")
    ] = "wikitext2",
    eval_windows: Annotated[int, typer.Option(help="Evaluation windows of --seq-len tokens.")] = 64,
    force: Annotated[bool, typer.Option(help="Train even if the health check fails.")] = False,
    teacher: Annotated[
        str | None, typer.Option(help="Distil from this model (usually the unpruned base, e.g. smollm2-135m).")
    ] = None,
    kd_temperature: Annotated[
        float, typer.Option(help="Distillation softmax temperature (the KL is scaled by T²).")
    ] = 1.0,
    kd_weight: Annotated[
        float, typer.Option(help="Weight of the distillation loss; the LM loss gets 1 - weight.")
    ] = 1.0,
    kd_top_k: Annotated[
        int | None, typer.Option(help="Keep only the teacher's k largest logits per token (saves memory).")
    ] = None,
    no_tui: Annotated[bool, typer.Option("--no-tui", help="Plain progress lines instead of the dashboard.")] = False,
    watch: Annotated[
        str | None,
        typer.Option(help="Open the dashboard on a run directory (going or finished) and do nothing else."),
    ] = None,
    base_model: BaseModelOpt = None,
    trust_pickle: TrustPickleOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    save_dtype: SaveDtypeOpt = "auto",
    json_output: JsonOpt = False,
) -> None:
    """Fine-tune a (pruned) model with NaN guards, atomic checkpoints, resume and a live dashboard."""
    if watch is not None:
        return watch_command(watch)
    if model is None:
        raise UserInputError(
            "no model given", "pass the model to fine-tune, e.g. llmprune finetune ./pruned --samples 200"
        )
    from llmprune.engine.finetune.train import FinetuneConfig

    config = FinetuneConfig(
        model=model,
        method=method,
        lora_r=lora_r,
        lora_alpha=lora_alpha,
        merge=merge,
        lora_targets=tuple(t.strip() for t in lora_targets.split(",") if t.strip()),
        dataset=dataset,
        samples=samples,
        seq_len=seq_len,
        epochs=epochs,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup_steps=warmup_steps,
        schedule=schedule,
        max_grad_norm=max_grad_norm,
        weight_decay=weight_decay,
        seed=seed,
        on_nan=on_nan,
        loss_limit=loss_limit,
        max_rollbacks=max_rollbacks,
        save_every=save_every,
        out=out,
        resume=resume,
        test_before=test_before,
        test_after=test_after,
        eval_dataset=eval_dataset,
        eval_windows=eval_windows,
        force=force,
        teacher=teacher,
        kd_temperature=kd_temperature,
        kd_weight=kd_weight,
        kd_top_k=kd_top_k,
        base_model=base_model,
        trust_pickle=trust_pickle,
        device=device,
        dtype=dtype,
        save_dtype=save_dtype,
    )
    config.validate()
    _train_and_report(config, dashboard=not (no_tui or json_output), json_output=json_output)


def _train_and_report(config, *, dashboard: bool, json_output: bool) -> None:
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
                lambda listener, control: run_finetune(config, listener, control=control), fallback=lines
            )
        else:
            result = run_finetune(config, lines)
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
