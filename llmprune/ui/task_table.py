"""The accuracy table of `llmprune eval --tasks` (lm-eval's figures for one model, or several side by side)."""

from __future__ import annotations

from rich.table import Table

# shown first when present; any other metric a task reports follows
PREFERRED_METRICS = ("acc", "acc_norm")


def metric_names(scores: list[dict]) -> list[str]:
    found = {metric for score in scores for metric in score["metrics"]}
    return [m for m in PREFERRED_METRICS if m in found] + sorted(found - set(PREFERRED_METRICS))


def format_metric(value: float | None, stderr: float | None = None) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def task_table(result: dict, title: str) -> Table:
    """One row per task: shots, examples scored, and each metric with lm-eval's standard error."""
    scores = result["scores"]
    metrics = metric_names(scores)
    table = Table(title=title, title_justify="left")
    table.add_column("task")
    for column in ("shots", "examples", *metrics):
        table.add_column(column, justify="right")
    for score in scores:
        cells = [format_metric(score["metrics"].get(m), score["stderr"].get(m)) for m in metrics]
        shots = "—" if score["num_fewshot"] is None else str(score["num_fewshot"])
        examples = "—" if score["samples"] is None else str(score["samples"])
        table.add_row(score["task"], shots, examples, *cells)
    return table
