"""The layer-importance chart as an image (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from llmprune.engine.core.paths import atomic_write_bytes


def save_importance_chart(result, path: str | Path) -> Path:
    """Bars of layer importance (protected layers grey) over the planned attention/MLP rates; returns the path."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    scores = result.importance.scores
    layers = list(range(len(scores)))
    protected = set(result.protected())
    figure = Figure(figsize=(max(6.0, 0.28 * len(layers) + 2), 5.5), constrained_layout=True)
    top, bottom = figure.subplots(2, 1, sharex=True)
    colours = ["#9e9e9e" if i in protected else "#1f77b4" for i in layers]
    top.bar(layers, scores, color=colours)
    top.set_ylabel(f"importance ({result.importance.method})")
    top.set_title(f"{result.model}: layer importance (grey = protected)")
    top.axhline(0, color="black", linewidth=0.6)
    width = 0.4
    bottom.bar([i - width / 2 for i in layers], result.attention_rates(), width, label="attention", color="#d62728")
    bottom.bar([i + width / 2 for i in layers], result.mlp_rates(), width, label="MLP", color="#ff7f0e")
    bottom.set_ylabel("planned pruning rate")
    bottom.set_xlabel("decoder layer")
    bottom.set_xticks(layers, [str(i) for i in layers], fontsize=7)
    bottom.legend(loc="upper right")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
