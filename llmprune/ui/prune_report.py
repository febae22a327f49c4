"""Rich rendering of `analyze` and `prune` results, and their multi-stage progress."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from llmprune.engine.core.progress import stage_name
from llmprune.ui.console import err_console, format_count, format_ppl

BAR_WIDTH = 40


@contextmanager
def stage_progress(enabled: bool = True) -> Iterator[Callable[[str, int, int], None]]:
    """A (stage, done, total) callback: one Rich progress bar per stage, on stderr."""
    if not enabled:
        yield lambda stage, done, total: None
        return
    columns = (
        TextColumn("{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    bar = Progress(*columns, console=err_console, transient=True)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int) -> None:
        if not tasks:
            bar.start()
        name = stage_name(stage)  # one bar per stage, whatever detail it shows now
        if name not in tasks:
            tasks[name] = bar.add_task(stage, total=total)
        bar.update(tasks[name], completed=done, total=total, description=stage)

    try:
        yield update
    finally:
        if tasks:
            bar.stop()


def _pct(value: float) -> str:
    return f"{value:.0%}" if value else "—"


def analyze_table(result) -> Table:
    protected = set(result.protected())
    table = Table(
        title=(
            f"Layer importance of {result.model} ({result.importance.method}, {result.importance.samples} ×"
            f" {result.importance.seq_len} tokens)"
        ),
        title_justify="left",
    )
    for column in ("layer", "importance", "plan rate", "attention", "MLP", "heads/kv", "MLP width"):
        table.add_column(column, justify="right")
    for i, (_shape, units, score, rate, attn, mlp) in enumerate(
        zip(
            result.shapes,
            result.units,
            result.importance.scores,
            result.rates,
            result.attention_rates(),
            result.mlp_rates(),
            strict=False,
        )
    ):
        table.add_row(
            str(i),
            f"{score:.4f}",
            "protected" if i in protected else f"{rate:.3f}",
            _pct(attn),
            _pct(mlp),
            f"{units.heads}/{units.kv_heads}",
            str(units.intermediate_size),
        )
    table.caption = (
        f"base loss {result.importance.base_loss:.4f}; analysis took {result.importance.seconds:.1f} s; plan:"
        f" {result.plan.strategy}, alpha {result.plan.alpha}, ratio {result.plan.ratio}"
    )
    return table


def importance_bars(result) -> Group:
    """The layer-sensitivity profile at a glance: one bar per layer, protected layers dim."""
    scores = result.importance.scores
    top = max((abs(s) for s in scores), default=0.0) or 1.0
    protected = set(result.protected())
    lines = [Text(f"importance per layer ({result.importance.method}); ▒ = protected", style="bold")]
    for i, score in enumerate(scores):
        length = int(round(BAR_WIDTH * abs(score) / top))
        glyph = "▒" if i in protected else "█"
        style = "red" if score < 0 else ("dim" if i in protected else "cyan")
        line = Text(f"{i:>3} ")
        line.append(glyph * length if length else "▏", style=style)
        line.append(f" {score:.4f}", style="dim")
        lines.append(line)
    return Group(*lines)


def prune_table(result) -> Table:
    table = Table(title=f"Pruned {result.model}", title_justify="left")
    for column in ("layer", "importance", "rate", "heads", "KV heads", "MLP width"):
        table.add_column(column, justify="right")
    for change, score, rate in zip(result.layers, result.importance, result.rates, strict=False):
        b, a = change.before, change.after

        def arrow(x: int, y: int) -> str:
            return str(x) if x == y else f"{x} → [bold]{y}[/]"

        table.add_row(
            str(change.index),
            f"{score:.4f}",
            f"{rate:.3f}" if rate else "—",
            arrow(b.num_attention_heads, a.num_attention_heads),
            arrow(b.num_key_value_heads, a.num_key_value_heads),
            arrow(b.intermediate_size, a.intermediate_size),
        )
    return table


def prune_summary(result) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    gqa_style = "red" if result.gqa_violations else "green"
    path = result.path or {}
    rows = [
        ("path", f"{path.get('name', '?')}: {path.get('reason', '')}"),
        (
            "ratio",
            f"{result.ratio:.4f} of the prunable parameters"
            + (f" (solved for {format_count(result.target_params)} parameters)" if result.target_params else ""),
        ),
        (
            "parameters",
            (
                f"{format_count(result.params_before)} → {format_count(result.params_after)}  ({result.params_before:,}"
                f" → {result.params_after:,})"
            ),
        ),
        (
            "removed",
            f"{result.removed_share_prunable:.2%} of the prunable parameters, {result.removed_share:.2%} of all"
            " parameters",
        ),
        ("GQA", f"[{gqa_style}]{result.gqa_summary()}[/]"),
    ]
    if result.ppl_before and result.ppl_after:
        ppl = result.ppl_after
        rows.append(
            (
                "PPL",
                (
                    f"{format_ppl(result.ppl_before.ppl)} → {format_ppl(ppl.ppl)}  ({ppl.dataset}, seq_len"
                    f" {ppl.seq_len}, {ppl.windows} windows)"
                ),
            )
        )
    short = result.refit_calibration()
    if short:
        rows.append(
            (
                "refit",
                (
                    f"{short['tokens']:,} calibration tokens, {short['tokens_per_kept_input']:.2f} per kept input of"
                    f" the widest projection ({short['widest_kept_inputs']:,}): its ridge was chosen by"
                    f" cross-validation; --refit-samples {short['samples_for_plain_refit']} would give the"
                    f" {short['plain_refit_tokens_per_input']} per input of a plain refit (each window is one more"
                    " pass through every layer)"
                ),
            )
        )
    elif refit_line := _refit_apart(result.options):
        rows.append(("refit", refit_line))
    if correction := result.options.get("residual_correction"):
        rows.append(
            (
                "correction",
                f"each least-squares refit also took away {correction:.0%} of the pruned model's gap to the dense"
                " model's residual stream (--residual-correction; the dense model ran beside, on the refit's windows)",
            )
        )
    if result.search:
        rows.append(("search", search_line(result.search)))
    rows.append(("time", f"{result.seconds:.1f} s"))
    rows.append(
        (
            "peak memory",
            (
                f"{result.peak_memory_bytes / 2**20:,.0f} MiB (the unpruned weights: {result.model_bytes / 2**20:,.0f}"
                " MiB)"
            ),
        )
    )
    if result.peak_rss_by_phase:
        rows.append(
            (
                "peak RSS by phase",
                ", ".join(f"{name} {peak / 2**20:,.0f} MiB" for name, peak in result.peak_rss_by_phase.items()),
            )
        )
    if result.saved_to:
        rows.append(("saved to", result.saved_to))
    rows.append(("log", result.log_dir))
    for name, value in rows:
        table.add_row(name, value)
    return table


def search_line(search: dict) -> str:
    """What the searched allocation did: from which start, how long, and the KL it reached on every held-out window."""
    start = search["start"]
    line = (
        f"{search['generations']} generation{'' if search['generations'] == 1 else 's'} ({search['seconds'] / 60:.1f}"
        f" min, {search['tokens']:,} tokens) from the"
        f" {start} start; KL to the dense model on the held-out windows {search['start_fitness'][start]:.4f}"
    )
    if search.get("kept_start"):
        return line + ", no better allocation found there: the start was kept"
    return line + f" → {search['fitness']:.4f}"


def _refit_apart(options: dict) -> str | None:
    """The refit's line when it was fitted on more windows than the units were chosen on."""
    calibration = options.get("calibration") or {}
    drawn, chosen_on = options.get("refit_samples"), calibration.get("samples")
    if not drawn or not chosen_on or drawn <= chosen_on:
        return None
    why = (
        "short of 4 tokens per kept input of the widest projection, drawn for 8"
        if calibration.get("refit_samples") is None
        else "--refit-samples"
    )
    return (
        f"least squares on {drawn} calibration windows ({why}; each is one more pass through every layer),"
        f" the units chosen on {chosen_on}"
    )
