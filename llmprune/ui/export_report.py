"""Rendering of an export result."""

from __future__ import annotations

from rich.text import Text

from llmprune.ui.console import format_count


def export_report(result) -> Text:
    """A few lines: the file, its architecture, what was adapted for llama.cpp, and how to run it."""
    text = Text()
    text.append(f"wrote {result.path}", style="bold green")
    text.append(
        f"  ({result.bytes / 2**20:,.1f} MiB, {result.tensors} tensors, {format_count(result.parameters)} values,"
        f" {result.outtype})\n"
    )
    heads = sorted({layer["heads"] for layer in result.layers})
    widths = sorted({layer["ffn"] for layer in result.layers})
    kind = "uniform layers" if result.architecture == "llama" else "per-layer shapes"
    text.append(
        f"architecture {result.architecture} ({kind}): {len(result.layers)} layers, heads {_span(heads)}, MLP width"
        f" {_span(widths)}\n"
    )
    text.append(
        f"tokenizer: {result.tokenizer.get('tokens')} tokens, pre-tokenizer {result.tokenizer.get('pre')}, add BOS"
        f" {result.tokenizer.get('add_bos')}, chat template"
        f" {'yes' if result.tokenizer.get('chat_template') else 'no'}\n"
    )
    if result.padded_layers:
        text.append(
            f"layers {result.padded_layers} had no heads or no MLP channels: written with one all-zero one (same"
            " output)\n",
            style="yellow",
        )
    if result.f16_fallbacks:
        text.append(
            f"{len(result.f16_fallbacks)} tensors kept f16 (rows not a multiple of 32, q8_0 needs it)\n", style="yellow"
        )
    if result.not_exported:
        text.append(f"not exported (not part of a Llama model): {', '.join(result.not_exported[:5])}\n", style="yellow")
    text.append(f"run it: llama-cli -m {result.path}", style="dim")
    return text


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"
