"""Rich rendering shared by the subcommands.

Results go to stdout (a table, or one JSON object with --json); progress and
errors go to stderr so that `--json` output stays machine-readable.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def print_json(data: Any) -> None:
    """Exactly one JSON object on stdout, nothing else."""
    print(json.dumps(data, default=_json_default, allow_nan=True))


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def error_line(problem: str, hint: str | None = None) -> None:
    # escaped: a path or an install command such as llmprune[lm-eval] is not Rich markup
    text = f"[bold red]error:[/] {escape(problem)}"
    if hint:
        text += f" [dim]→[/] {escape(hint)}"
    err_console.print(text, highlight=False, soft_wrap=True)


def info(message: str) -> None:
    err_console.print(f"[dim]{message}[/]", highlight=False, soft_wrap=True)


def format_count(n: float) -> str:
    """134515008 -> '134.5 M'."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return str(int(n))


def format_ppl(ppl: float | None) -> str:
    if ppl is None:
        return "—"
    if not math.isfinite(ppl):
        return "inf"
    return f"{ppl:,.2f}"


@contextmanager
def progress_callback(description: str, enabled: bool = True) -> Iterator[Callable[[int, int], None]]:
    """A (done, total) callback drawing a Rich progress bar on stderr."""
    if not enabled:
        yield lambda done, total: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    bar = Progress(*columns, console=err_console, transient=True)
    task: list = []

    def update(done: int, total: int) -> None:
        # started on the first update, so that an error before any work prints no empty bar
        if not task:
            bar.start()
            task.append(bar.add_task(description, total=total))
        bar.update(task[0], completed=done, total=total)

    try:
        yield update
    finally:
        if task:
            bar.stop()


def perplexity_table(rows: list[dict], title: str = "Perplexity") -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("dataset", "seq_len", "windows", "tokens", "PPL", "tokens/s", "params"):
        table.add_column(column, justify="left" if column == "dataset" else "right")
    for row in rows:
        table.add_row(
            str(row["dataset"]),
            str(row["seq_len"]),
            str(row["windows"]),
            f"{row['tokens']:,}",
            format_ppl(row["ppl"]),
            f"{row['tokens_per_second']:,.0f}",
            format_count(row["params"]),
        )
    return table
