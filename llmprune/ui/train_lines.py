"""Plain Rich rendering of a fine-tuning run: progress lines on stderr and the final summary.

Used with --no-tui, when stdout is not a terminal, and as the fallback if the
dashboard closes while the run goes on.
"""

from __future__ import annotations

import math
from pathlib import Path

from rich.console import Console
from rich.table import Table

from llmprune.engine.core.events import (
    CheckpointSaved,
    Event,
    GuardAlert,
    HealthChecked,
    PerplexityMeasured,
    RolledBack,
    RunFinished,
    RunStarted,
    StepMetrics,
)
from llmprune.ui.console import err_console, format_count, format_ppl


class PlainTrainingLines:
    """A listener that prints one line every few steps, and every alert in full."""

    def __init__(self, console: Console | None = None, lines: int = 40):
        self.console = console or err_console
        self.lines = lines
        self.every = 1
        self.total = 0

    def __call__(self, event: Event) -> None:
        out = self.console.print
        if isinstance(event, RunStarted):
            self.total = event.total_steps
            self.every = max(1, event.total_steps // self.lines)
            out(
                f"[bold]fine-tuning[/] ({event.method}, {format_count(event.trainable_parameters)} trainable of"
                f" {format_count(event.total_parameters)}) steps {event.start_step + 1}..{event.total_steps} on"
                f" {event.device} → {event.run_dir}",
                highlight=False,
            )
            if event.teacher:
                out(f"distilling from {event.teacher}", highlight=False)
        elif isinstance(event, StepMetrics):
            if event.step % self.every == 0 or event.step in (1, self.total) or not event.applied:
                loss = f"{event.loss:.4f}" if math.isfinite(event.loss) else str(event.loss)
                out(
                    f"step {event.step:>5}/{self.total} epoch {event.epoch} loss {loss}{loss_parts(event)} lr"
                    f" {event.lr:.3g} grad_norm {event.grad_norm:.3g} {event.tokens_per_second:,.0f} tok/s"
                    + ("" if event.applied else " [red](not applied)[/]"),
                    highlight=False,
                )
        elif isinstance(event, GuardAlert):
            out(f"[bold red]ALERT[/] [red]{event.message}[/]", highlight=False, soft_wrap=True)
            out("[red]  advice: " + "; ".join(event.advice) + "[/]", highlight=False, soft_wrap=True)
        elif isinstance(event, RolledBack):
            out(
                f"[yellow]rolled back to step {event.restored_step}, LR x{event.lr_scale:g} (rollback"
                f" {event.rollbacks})[/]",
                highlight=False,
            )
        elif isinstance(event, CheckpointSaved) and event.reason != "start":
            note = "" if event.reason == "final" else " (becomes the last good one once the next step passes the guard)"
            out(f"[dim]checkpoint {event.path}{note}[/]", highlight=False)
        elif isinstance(event, PerplexityMeasured):
            out(
                f"PPL {event.phase}: [bold]{format_ppl(event.ppl)}[/] ({event.dataset}, {event.windows} windows)",
                highlight=False,
            )
        elif isinstance(event, HealthChecked):
            out(
                "[green]health check passed[/]"
                if event.ok
                else "[red]health check failed; training anyway (--force)[/]"
            )
        elif isinstance(event, RunFinished):
            style = "red" if event.status == "stopped_by_guard" else "green"
            out(f"[{style}]finished: {event.status}[/] {event.message}", highlight=False, soft_wrap=True)


def loss_parts(step: StepMetrics) -> str:
    """' (KD x, LM y)' when the step was distilled, else nothing."""
    if step.kd_loss is None or step.lm_loss is None:
        return ""
    return f" (KD {step.kd_loss:.4f}, LM {step.lm_loss:.4f})"


def finetune_table(result: dict) -> Table:
    table = Table(title="Fine-tuning", title_justify="left", show_header=False)
    table.add_column("", style="dim")
    table.add_column("")
    status_style = "red" if result["status"] == "stopped_by_guard" else "green"
    rows = [
        ("status", f"[{status_style}]{result['status']}[/]"),
        ("steps", f"{result['steps']} / {result['total_steps']}"),
        ("best loss", "—" if result["best_loss"] is None else f"{result['best_loss']:.4f}"),
        ("PPL before", format_ppl(result["ppl_before"])),
        ("PPL after", format_ppl(result["ppl_after"])),
        ("alerts", str(len(result["alerts"]))),
        ("rollbacks", str(result["rollbacks"])),
        ("tokens/s", f"{result['tokens_per_second']:,.0f}"),
        ("last good checkpoint", result["last_good_checkpoint"] or "—"),
        ("model", result["model_dir"] or result["adapter_dir"] or "—"),
        ("run directory", str(Path(result["run_dir"]))),
    ]
    for name, value in rows:
        table.add_row(name, value)
    if result.get("message"):
        table.add_row("note", result["message"])
    return table


def health_findings_table(report: dict) -> Table:
    """doctor's findings (severity, check, where, what, advice) as a table."""
    table = Table(title="Pre-flight health check", title_justify="left")
    for column in ("severity", "check", "where", "finding", "advice"):
        table.add_column(column)
    for finding in report.get("findings", []):
        severity = str(finding.get("severity", ""))
        style = "red" if severity == "error" else "yellow" if severity == "warning" else "dim"
        advice = finding.get("advice") or []
        table.add_row(
            f"[{style}]{severity}[/]",
            str(finding.get("check", "")),
            str(finding.get("location", "")),
            str(finding.get("message", "")),
            "; ".join(advice) if isinstance(advice, list) else str(advice),
        )
    return table


def memory_plan_table(plan: dict) -> Table:
    """The memory plan (memory_plan.MemoryPlan.to_dict()): each term, the total against the free memory, the fixes."""
    settings = plan["settings"]
    how = f"{settings['method']}, micro-batch {settings['batch_size']} x {settings['seq_len']} tokens"
    if settings["gradient_checkpointing"]:
        how += ", gradient checkpointing"
    if settings["processes"] > 1:
        how += f", {settings['processes']} processes" + (" (FSDP)" if settings["sharded"] else "")
    table = Table(title="Memory plan", title_justify="left", show_header=False)
    table.add_column("", style="dim")
    table.add_column("")
    table.add_row("training", how)
    for name, size in plan["terms"].items():
        table.add_row(name, f"{size / 2**30:.2f} GiB")
    share = " per process" if settings["processes"] > 1 else ""
    table.add_row(f"total{share}", f"[bold]{plan['per_process_bytes'] / 2**30:.2f} GiB[/]")
    free = plan["available_bytes"]
    verdict = "[green]fits[/]" if plan["fits"] else "[red]does not fit[/]"
    table.add_row(
        f"free {plan['where']}",
        "unknown" if free is None else f"{free / 2**30:.2f} GiB: {verdict}",
    )
    for fix in plan.get("fixes", []):
        table.add_row("would fit", f"{fix['change']} ({fix['needed_bytes'] / 2**30:.2f} GiB)")
    return table
