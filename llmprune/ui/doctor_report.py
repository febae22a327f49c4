"""Rich rendering of a doctor report: one screen that says whether the model is broken, where, and what to do."""

from __future__ import annotations

from pathlib import Path

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from llmprune.engine.diagnose.doctor import DoctorReport
from llmprune.engine.diagnose.health import HealthReport
from llmprune.engine.io.structure import Structure, format_ranges
from llmprune.ui.console import format_count

MAX_FINDINGS_SHOWN = 25
_ICON = {"error": "❌", "warning": "⚠️ ", "info": "ℹ️ "}
_STYLE = {"error": "red", "warning": "yellow", "info": "dim"}


def _header(report: DoctorReport) -> Text:
    text = Text.assemble(("Doctor: ", "bold"), (report.model, "bold cyan"))
    details = f"  {report.kind}, {format_count(report.num_parameters)} parameters in {report.num_tensors} tensors"
    if report.config_origin:
        details += f", config: {report.config_origin}"
    text.append(details, style="dim")
    return text


def _summary(report: HealthReport) -> Text:
    text = Text()
    for passed, line in report.summary():
        text.append("✅ " if passed else "❌ ")
        text.append(line + "\n", style=None if passed else "red")
    if report.forward is not None and report.forward.output_shape:
        f = report.forward
        text.append(
            (
                f"   forward: {f.tokens} tokens -> logits {f.output_shape}, min {f.logits_min:.2f}, max"
                f" {f.logits_max:.2f}\n"
                if f.logits_min is not None
                else f"   forward: logits {f.output_shape}, none finite\n"
            ),
            style="dim",
        )
    if report.ppl is not None:
        p, v = report.ppl, report.ppl.verdict
        windows = f", {p.windows} windows" if p.windows else ""
        scale = (
            f"base PPL {v.base_ppl:.2f}, ratio {v.ratio:.2f}x"
            if v.scale == "relative"
            else "base PPL unknown: absolute scale of Llama-3-8B-class models at 2048 tokens"
        )
        text.append(
            f"   PPL {p.source} on {Path(p.dataset).name} (seq_len {p.seq_len}{windows}); {scale}\n", style="dim"
        )
    return text


def _structure(structure: Structure) -> RenderableType:
    tied = {True: "yes", False: "no", None: "?"}[structure.tied_embeddings]
    if structure.uniform and structure.layers:
        layer = structure.layers[0]
        heads = (
            f"{layer.heads} heads / {layer.kv_heads} KV heads"
            if layer.heads
            else f"q {layer.q_out} / kv {layer.k_out} outputs"
        )
        return Text(
            f"Structure: {structure.num_layers} layers × {heads} (head_dim {structure.head_dim or '?'}), MLP"
            f" {layer.mlp_width}, hidden {structure.hidden_size}, vocab {structure.vocab_size}, tied embeddings:"
            f" {tied}",
            style="dim",
        )
    # one row per distinct shape, so that 32 pruned layers still fit on one screen
    groups: dict[tuple, list[int]] = {}
    for layer in structure.layers:
        groups.setdefault((layer.heads, layer.kv_heads, layer.gqa_ratio, layer.mlp_width, layer.gqa_ok), []).append(
            layer.index
        )
    table = Table(
        title=(
            f"Structure: {structure.num_layers} layers (non-uniform), hidden {structure.hidden_size}, tied embeddings:"
            f" {tied}"
        ),
        title_justify="left",
    )
    table.add_column("layers")
    for column in ("heads", "KV heads", "heads:kv", "MLP", "GQA"):
        table.add_column(column, justify="right")
    for (heads, kv_heads, ratio, width, gqa_ok), indices in groups.items():
        table.add_row(
            format_ranges(indices),
            str(heads or "?"),
            str(kv_heads or "?"),
            f"{ratio:g}" if ratio is not None else "?",
            str(width),
            "✅" if gqa_ok else "[red]❌[/]",
        )
    return table


def _layers(report: HealthReport) -> RenderableType | None:
    flagged = [layer for layer in report.layers if layer.findings]
    if not flagged:
        return None
    table = Table(title="Layers with findings", title_justify="left")
    for column in ("layer", "params", "NaN", "Inf", "zeros", "max |w|", "findings"):
        table.add_column(column, justify="right")
    for layer in flagged:
        table.add_row(
            str(layer.index),
            format_count(layer.parameters),
            f"{layer.nan:,}",
            f"{layer.inf:,}",
            f"{100 * layer.zero_share:.1f} %",
            f"{layer.max_abs:.3g}",
            str(layer.findings),
        )
    return table


def _findings(report: HealthReport) -> RenderableType | None:
    if not report.findings:
        return None
    table = Table(title="Findings", title_justify="left")
    table.add_column("")
    table.add_column("check")
    table.add_column("where", no_wrap=True)  # a tensor name must stay copy-pasteable
    table.add_column("what", overflow="fold")
    ordered = [f for severity in ("error", "warning", "info") for f in report.by_severity(severity)]
    for finding in ordered[:MAX_FINDINGS_SHOWN]:
        table.add_row(
            _ICON[finding.severity],
            finding.check,
            finding.location,
            Text(finding.message, style=_STYLE[finding.severity]),
        )
    if len(ordered) > MAX_FINDINGS_SHOWN:
        table.caption = f"… and {len(ordered) - MAX_FINDINGS_SHOWN} more (all of them with --json)"
    return table


def _advice(report: HealthReport) -> Text | None:
    advice = report.advice
    if not advice:
        return None
    text = Text("What to do (most likely fix first):\n", style="bold")
    for number, line in enumerate(advice, 1):
        text.append(f"  {number}. {line}\n", style="")
    return text


def _verdict(report: HealthReport) -> Text:
    if report.ok:
        warnings = len(report.by_severity("warning"))
        extra = f" ({warnings} warning(s) above)" if warnings else ""
        return Text(f"✅ healthy: safe to train on{extra}", style="bold green")
    return Text(f"❌ unsafe to train on: {len(report.by_severity('error'))} error(s)", style="bold red")


def health_report(report: HealthReport) -> Group:
    """A HealthReport (e.g. preflight_check's, before fine-tuning) as one Rich renderable."""
    parts: list[RenderableType | None] = [
        _summary(report),
        _structure(report.structure) if report.structure and report.structure.layers else None,
        _layers(report),
        _findings(report),
        _advice(report),
        _verdict(report),
    ]
    return Group(*(part for part in parts if part is not None))


def doctor_report(report: DoctorReport) -> Group:
    """`llmprune doctor`'s whole report: what was read, then the health report."""
    return Group(_header(report), health_report(report))
