"""What a prune did: the result object, the run log (training.log, report.json) and llmprune.json's record."""

from __future__ import annotations

import re
import resource
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from llmprune.engine.core.paths import atomic_write_json, atomic_write_text
from llmprune.engine.evaluate import PerplexityResult
from llmprune.engine.io.architecture import LayerShape
from llmprune.engine.pruning.config import PruneConfig
from llmprune.engine.pruning.cut.prune_model import LayerChange
from llmprune.engine.pruning.cut.refit import MIN_TOKENS_PER_INPUT, needs_choice, windows_for_plain_refit


@dataclass
class PruneResult:
    """Everything the report shows, and what `llmprune.json` records."""

    model: str
    options: dict
    ratio: float
    """The budget as a share of the prunable parameters (KV groups, MLP channels in the prunable layers): the
    --ratio asked, or the one solved from --target-params."""
    removed_share_prunable: float
    """Measured: the share of the prunable parameters the prune removed (removed_share: of all parameters)."""
    target_params: int | None
    params_before: int
    params_after: int
    layers: list[LayerChange]
    rates: list[float]
    importance_method: str
    importance: list[float]
    gqa_violations: list[int]
    seconds: float
    peak_memory_bytes: int  # peak RSS of the process on CPU (libraries included), peak allocated on CUDA
    model_bytes: int  # the unpruned weights, for comparison with the peak
    ppl_before: PerplexityResult | None = None
    ppl_after: PerplexityResult | None = None
    saved_to: str | None = None
    log_dir: str | None = None
    peak_rss_by_phase: dict[str, int] = field(default_factory=dict)
    """Peak resident memory of each phase (load, measure, prune, save, ...) in bytes: what holds the memory."""
    path: dict = field(default_factory=dict)
    """The path taken and why (route.PrunePath.to_dict())."""
    search: dict | None = None
    """The searched allocation (search.SearchOutcome.to_dict()): start, generations, fitness curve, levels per layer."""
    loaded: Any = field(default=None, repr=False)
    """The pruned model in memory (a models.LoadedModel), for callers that go on with it; not serialised."""

    @property
    def removed_share(self) -> float:
        """Measured: the share of all parameters the prune removed (removed_share_prunable: of the prunable)."""
        return 1 - self.params_after / self.params_before if self.params_before else 0.0

    @property
    def healthy(self) -> bool:
        finite = self.ppl_after is None or (
            self.ppl_after.ppl == self.ppl_after.ppl and self.ppl_after.ppl != float("inf")
        )
        return not self.gqa_violations and finite

    def gqa_summary(self) -> str:
        if self.gqa_violations:
            return f"GQA broken in layers {self.gqa_violations}"
        ratios = sorted({a.after.num_attention_heads // a.after.num_key_value_heads for a in self.layers})
        return "all layers keep " + " or ".join(f"{r}:1" for r in ratios)

    def refit_calibration(self) -> dict | None:
        """Where the least-squares refit had fewer calibration tokens than it needs for a plain refit.

        None when every refitted projection had `MIN_TOKENS_PER_INPUT` tokens per kept input; otherwise the
        tokens, the widest refitted projection's kept inputs, and the calibration windows that would give
        it that many (the ridge was chosen by cross-validation instead: sound, but the refit does less).
        """
        calibration = self.options.get("calibration") or {}
        samples = self.options.get("refit_samples") or calibration.get("samples")
        seq_len = calibration.get("seq_len")
        widest = 0
        for change in self.layers:
            refitted = {name for name, ran in change.compensation.items() if ran.startswith("lstsq")}
            if "down_proj" in refitted:
                widest = max(widest, change.after.intermediate_size)
            if "o_proj" in refitted:
                widest = max(widest, change.after.num_attention_heads * change.after.head_dim)
        if not widest or not samples or not seq_len:
            return None
        tokens = samples * seq_len
        if not needs_choice(widest, tokens):
            return None
        return {
            "tokens": tokens,
            "widest_kept_inputs": widest,
            "tokens_per_kept_input": tokens / widest,
            "plain_refit_tokens_per_input": MIN_TOKENS_PER_INPUT,
            "samples_for_plain_refit": windows_for_plain_refit(widest, seq_len),
        }

    def to_dict(self) -> dict:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "loaded"}
        data["refit_calibration"] = self.refit_calibration()
        data["layers"] = [layer.to_dict() for layer in self.layers]
        data["ppl_before"] = self.ppl_before.to_dict() if self.ppl_before else None
        data["ppl_after"] = self.ppl_after.to_dict() if self.ppl_after else None
        data["removed_share"] = self.removed_share
        data["gqa"] = self.gqa_summary()
        data["healthy"] = self.healthy
        return data


def after_by_index(changes: list[LayerChange], num_layers: int) -> list[LayerShape | None]:
    """Each original layer's shape after the prune (None: removed whole)."""
    after: list[LayerShape | None] = [None] * num_layers
    for change in changes:
        after[change.index] = change.after
    return after


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def new_run_folder(log_dir: Path, name: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    folder = log_dir / name / stamp
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = log_dir / name / f"{stamp}-{suffix}"
    return folder


def default_log_name(model: str) -> str:
    name = Path(model.rstrip("/")).name or model
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def provenance(result: PruneResult, config: PruneConfig) -> dict:
    """What llmprune.json records (doctor reads base_model, ppl_before/ppl_after, dataset, seq_len, max_windows)."""
    return {
        "base_model": result.model,
        "ppl_before": result.ppl_before.ppl if result.ppl_before else None,
        "ppl_after": result.ppl_after.ppl if result.ppl_after else None,
        "dataset": config.eval_dataset if result.ppl_after else None,
        "seq_len": config.eval_seq_len if result.ppl_after else None,
        "max_windows": config.max_windows if result.ppl_after else None,
        "pruning": {
            "path": result.path,
            "options": result.options,
            "ratio": result.ratio,
            "removed_share_prunable": result.removed_share_prunable,
            "target_params": result.target_params,
            "params_before": result.params_before,
            "params_after": result.params_after,
            "removed_share": result.removed_share,
            "importance_method": result.importance_method,
            "importance": result.importance,
            "rates": result.rates,
            "layers": [layer.to_dict() for layer in result.layers],
        },
    }


def format_log(result: PruneResult) -> str:
    """training.log: every figure of the run, readable without tools."""
    lines = [
        f"llmprune prune {result.model}",
        f"finished: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"path: {result.path.get('name')} ({result.path.get('reason')})",
        f"importance: {result.importance_method}",
        f"ratio: {result.ratio:.4f} of the prunable parameters"
        + (f" (solved for --target-params {result.target_params:,})" if result.target_params else ""),
        (
            f"parameters: {result.params_before:,} -> {result.params_after:,} (removed"
            f" {result.removed_share_prunable:.2%} of the prunable parameters, {result.removed_share:.2%} of all)"
        ),
        f"GQA: {result.gqa_summary()}",
    ]
    for label, ppl in (("before", result.ppl_before), ("after", result.ppl_after)):
        if ppl:
            lines.append(f"PPL {label}: {ppl.ppl:.4f} ({ppl.dataset}, seq_len {ppl.seq_len}, {ppl.windows} windows)")
    lines.append(
        f"time: {result.seconds:.1f} s, peak memory: {result.peak_memory_bytes / 2**20:.0f} MiB"
        f" (the unpruned weights: {result.model_bytes / 2**20:.0f} MiB)"
    )
    if result.peak_rss_by_phase:
        lines.append(
            "peak RSS by phase: "
            + ", ".join(f"{name} {peak / 2**20:.0f} MiB" for name, peak in result.peak_rss_by_phase.items())
        )
    if result.saved_to:
        lines.append(f"saved to: {result.saved_to}")
    lines.append("layer  importance  rate    heads  kv  mlp (before -> after)")
    for change, score, rate in zip(result.layers, result.importance, result.rates, strict=False):
        b, a = change.before, change.after
        lines.append(
            f"{change.index:>5}  {score:>10.4f}  {rate:>5.3f}  {b.num_attention_heads:>3}->{a.num_attention_heads:<3}"
            f" {b.num_key_value_heads}->{a.num_key_value_heads}  {b.intermediate_size}->{a.intermediate_size}"
        )
    lines.append("options: " + ", ".join(f"{k}={v}" for k, v in result.options.items()))
    return "\n".join(lines) + "\n"


def write_run_log(result: PruneResult, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "training.log", format_log(result))
    atomic_write_json(folder / "report.json", result.to_dict())
