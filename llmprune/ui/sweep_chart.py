"""The ratio sweep as an image: PPL against model size (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
import math
from pathlib import Path

from llmprune.engine.core.paths import atomic_write_bytes

VERDICT_COLOURS = {
    "reference": "#1f77b4",
    "healthy": "#2ca02c",
    "acceptable": "#ff7f0e",
    "too high": "#d62728",
    "broken": "#7f0000",
}


def save_sweep_chart(result, path: str | Path) -> Path:
    """One point per model (base and each ratio), coloured by verdict, PPL on a log scale; returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter

    rows = [row for row in result.rows if math.isfinite(row.ppl)]
    figure = Figure(figsize=(6.4, 4.2), constrained_layout=True)
    axes = figure.subplots()
    sizes = [row.params / 1e6 for row in rows]
    axes.plot(sizes, [row.ppl for row in rows], color="#999999", linewidth=1, zorder=1)
    for row, size in zip(rows, sizes, strict=False):
        axes.scatter([size], [row.ppl], color=VERDICT_COLOURS.get(row.verdict, "black"), zorder=2, label=row.verdict)
        axes.annotate(
            "base" if row.ratio == 0 else f"{row.ratio:g}",
            (size, row.ppl),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=False))
    axes.legend(unique.values(), unique.keys(), loc="upper left", fontsize=8)  # PPL grows to the right
    axes.set_yscale("log")
    axes.yaxis.set_major_formatter(ScalarFormatter())
    axes.yaxis.set_minor_formatter(ScalarFormatter())
    axes.set_xlabel("parameters (M)")
    axes.set_ylabel("perplexity (log scale)")
    axes.set_title(f"{Path(result.model).name}: PPL against size, one point per pruning ratio")
    axes.invert_xaxis()  # smaller models to the right, as the ratio grows
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
