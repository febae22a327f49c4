"""Rich rendering of recipes: the recipe list, step progress lines, the final report, the sweep."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from llmprune.engine.recipes.registry import Recipe
from llmprune.engine.recipes.report import STATUS_TEXT, RecipeReport, report_table
from llmprune.engine.recipes.runner import STEPS, Notice, StepFinished, StepSkipped, StepStarted
from llmprune.ui.console import err_console, format_count, format_ppl

# (label, getter) of each value a recipe fixes, in the order the pipeline uses them
RECIPE_VALUES = (
    ("ratio", lambda r: f"{r.prune.ratio:g}"),
    ("importance", lambda r: r.prune.importance),
    ("strategy", lambda r: r.prune.strategy),
    ("alpha", lambda r: f"{r.prune.alpha:g}"),
    ("prune MLP", lambda r: "yes" if r.prune.prune_mlp else "no"),
    (
        "prunable layers",
        lambda r: (
            f"{r.prune.layer_start} .. " + ("last-1" if r.prune.layer_end is None else str(r.prune.layer_end - 1))
        ),
    ),
    ("fine-tune", lambda r: r.finetune.method),
    ("lr", lambda r: f"{r.finetune.lr:g}"),
    ("epochs", lambda r: str(r.finetune.epochs)),
    ("samples", lambda r: str(r.finetune.samples)),
    ("grad accum", lambda r: str(r.finetune.grad_accum)),
    ("batch size", lambda r: str(r.finetune.batch_size)),
    ("max grad norm", lambda r: f"{r.finetune.max_grad_norm:g}"),
    ("warmup steps", lambda r: str(r.finetune.warmup_steps)),
)


def recipes_table(recipes: list[Recipe]) -> Table:
    table = Table(title="Recipes (every value can be overridden: llmprune recipe NAME --help)", title_justify="left")
    table.add_column("value")
    for recipe in recipes:
        table.add_column(recipe.name, justify="right")
    for label, getter in RECIPE_VALUES:
        table.add_row(label, *(getter(recipe) for recipe in recipes))
    return table


def recipe_summaries(recipes: list[Recipe]) -> str:
    return "\n".join(f"[bold]{recipe.name}[/]: {recipe.summary}" for recipe in recipes)


class RecipeLines:
    """The recipe's listener and progress callback on stderr: a line per step, a transient bar per long loop.

    The bar is stopped at every step event, so that nothing of it is live when the
    fine-tuning dashboard takes the terminal.
    """

    def __init__(self) -> None:
        self.bar: Progress | None = None
        self.tasks: dict[str, Any] = {}

    def progress(self, stage: str, done: int, total: int) -> None:
        if not err_console.is_terminal:  # a log file gets the step lines only
            return
        if self.bar is None:
            columns = (
                TextColumn("  {task.description:<30}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self.bar = Progress(*columns, console=err_console, transient=True)
            self.bar.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total)
        self.bar.update(self.tasks[stage], completed=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        self.bar, self.tasks = None, {}

    def __call__(self, event: Any) -> None:
        self.close()
        print_recipe_event(event)


def print_recipe_event(event: Any) -> None:
    """One line per step on stderr (the results table goes to stdout)."""
    number = f"{list(STEPS).index(event.step) + 1}/{len(STEPS)}" if hasattr(event, "step") else ""
    if isinstance(event, StepStarted):
        err_console.print(f"[bold cyan]{number} {event.step}[/] [dim]{event.description}…[/]", highlight=False)
    elif isinstance(event, StepFinished):
        err_console.print(f"[green]✓[/] {event.step} [dim]({event.seconds:,.1f} s)[/] {event.summary}", highlight=False)
    elif isinstance(event, StepSkipped):
        err_console.print(f"[dim]· {event.step}: skipped ({event.reason})[/]", highlight=False)
    elif isinstance(event, Notice):
        style = {"info": "dim", "warning": "yellow", "error": "bold red"}[event.level]
        err_console.print(f"[{style}]{event.message}[/]", highlight=False, soft_wrap=True)


def report_rich_table(report: RecipeReport) -> Table:
    title = f"llmprune recipe {report.recipe}: {STATUS_TEXT.get(report.status, report.status)}"
    table = Table(title=title, title_justify="left", caption=f"run directory: {report.run_dir}", caption_justify="left")
    header, *rows = report_table(report)
    for index, column in enumerate(header):
        table.add_column(column, justify="left" if index == 0 else "right")
    styles = {"healthy": "green", "acceptable": "yellow", "too high": "red", "broken": "bold red"}
    for row in rows:
        verdict = row[5]
        table.add_row(*row[:5], f"[{styles.get(verdict, 'dim')}]{verdict}[/]", *row[6:])
    return table


def report_footer(report: RecipeReport) -> str:
    lines = []
    if report.ratio_used is not None and report.ratio_used != report.ratio_asked:
        lines.append(f"pruning ratio used: {report.ratio_used:g} (asked {report.ratio_asked:g})")
    lines += [f"[yellow]auto-retreat:[/] {message}" for message in report.retreats]
    if report.advice:
        lines.append("[bold]what to do:[/]")
        lines += [f"  • {item}" for item in report.advice]
    lines.append(
        f"[dim]total {report.total_seconds:,.0f} s; report saved as {report.run_dir}/report.txt and report.json[/]"
    )
    return "\n".join(lines)


def sweep_rich_table(result: Any) -> Table:
    table = Table(
        title=f"Ratio sweep of {result.model}",
        title_justify="left",
        caption=f"saved: {result.json_path} and {result.chart_path}",
        caption_justify="left",
    )
    for column in ("ratio", "params", "removed", "PPL", "× base", "verdict"):
        table.add_column(column, justify="right")
    for row in result.rows:
        table.add_row(
            "base" if row.ratio == 0 else f"{row.ratio:g}",
            format_count(row.params),
            f"{row.share_removed:.1%}",
            format_ppl(row.ppl),
            f"{row.ppl_vs_base:.2f}",
            row.verdict,
        )
    return table
