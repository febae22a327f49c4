"""`llmprune eval`: perplexity and a generation smoke test, or zero-shot tasks through lm-eval (--tasks)."""

from __future__ import annotations

from typing import Annotated

import typer

from llmprune.cli.common import (
    BaseModelOpt,
    BatchSizeOpt,
    DatasetOpt,
    DeviceOpt,
    DtypeOpt,
    IncludePathOpt,
    JsonOpt,
    MaxWindowsOpt,
    OptionalModelArg,
    SeqLenOpt,
    TrustPickleOpt,
)

TasksOpt = Annotated[
    str | None,
    typer.Option(
        "--tasks",
        help=(
            "Comma-separated lm-eval tasks (e.g. arc_easy,hellaswag): accuracy instead of perplexity. Needs the lm-eval"
            " extra."
        ),
    ),
]
LimitOpt = Annotated[
    float | None,
    typer.Option(
        "--limit", help="Only the first N examples per task, or a fraction if < 1 (with --tasks; for quick checks)."
    ),
]
NumFewshotOpt = Annotated[
    int | None,
    typer.Option("--num-fewshot", help="Examples in each prompt (with --tasks; default: the task's own, usually 0)."),
]


def eval_command(
    model: OptionalModelArg = "smollm2-135m",
    dataset: DatasetOpt = "wikitext2",
    seq_len: SeqLenOpt = 2048,
    max_windows: MaxWindowsOpt = None,
    batch_size: BatchSizeOpt = 1,
    prompt: Annotated[
        str | None, typer.Option("--prompt", help="Also print a short greedy generation from this prompt.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate for --prompt.")] = 32,
    tasks: TasksOpt = None,
    include_path: IncludePathOpt = None,
    limit: LimitOpt = None,
    num_fewshot: NumFewshotOpt = None,
    base_model: BaseModelOpt = None,
    trust_pickle: TrustPickleOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    stream: Annotated[
        bool | None,
        typer.Option(
            "--stream/--no-stream",
            help=(
                "Stream the layers from disk: all windows through one layer, then the next (default: automatic when the"
                " model does not fit)."
            ),
        ),
    ] = None,
    json_output: JsonOpt = False,
) -> None:
    """Perplexity of a model on a text (default: wikitext-2 test), optionally a generation and lm-eval tasks.

    With --tasks, the accuracy on lm-eval tasks.
    """
    if tasks is not None and stream:
        from llmprune.engine.core.errors import UserInputError

        raise UserInputError(
            "--stream measures perplexity one layer at a time; --tasks needs the model in memory",
            "drop --stream or --tasks",
        )
    if tasks is not None:
        from llmprune.engine.tasks import TaskEvalConfig, TaskOptions, run_task_evaluation, task_names
        from llmprune.ui.console import console, format_count, print_json
        from llmprune.ui.task_table import task_table

        options = TaskOptions(
            tasks=task_names(tasks),
            include_path=include_path,
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
        )
        result = run_task_evaluation(
            TaskEvalConfig(
                model=model,
                options=options,
                base_model=base_model,
                trust_pickle=trust_pickle,
                device=device,
                dtype=dtype,
            )
        ).to_dict()
        if json_output:
            print_json(result)
            return
        console.print(
            task_table(result, title=f"lm-eval tasks on {model} ({format_count(result['params'])} parameters)")
        )
        if limit is not None:
            console.print(
                f"[yellow]--limit {limit:g}: only part of each task was scored; not comparable with published"
                " figures[/]"
            )
        return

    from llmprune.engine.evaluate import EvalConfig, run_evaluation
    from llmprune.ui.console import console, perplexity_table, print_json, progress_callback

    config = EvalConfig(
        model=model,
        dataset=dataset,
        seq_len=seq_len,
        max_windows=max_windows,
        batch_size=batch_size,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        base_model=base_model,
        trust_pickle=trust_pickle,
        device=device,
        dtype=dtype,
        stream=stream,
    )
    with progress_callback("evaluating", enabled=not json_output) as progress:
        result = run_evaluation(config, progress=progress)
    if json_output:
        print_json(result.to_dict())
        return
    console.print(perplexity_table([result.to_dict()], title=f"Perplexity of {model}"))
    if result.generation is not None:
        console.print(f"[bold]prompt:[/] {prompt}\n[bold]output:[/] {result.generation}", highlight=False)
