"""What `llmprune prune` (and the recipe's prune step, and the sweep) is asked to do.

Torch-free: the command line builds these before it imports the engine. Every
default is set here, in `allocate.plan_options` (the plan's) or in the criteria's
registries (`scores.layers`, `scores.defaults`), nowhere else.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.io.load_options import LoadOptions
from llmprune.engine.pruning.allocate.budget import Budget, resolve_budget
from llmprune.engine.pruning.allocate.plan_options import ATTENTION_UNITS, PlanOptions
from llmprune.engine.pruning.scores.defaults import DEFAULT_UNIT_SCORE, PLAN_UNIT_SCORE
from llmprune.engine.pruning.scores.layers import get_layer_score

COMPENSATIONS = ("none", "bias", "lstsq")
ALLOCATIONS = ("global", "plan", "search")
DEFAULT_SEARCH_BUDGET = "15m"
DEFAULT_COMPENSATION = "lstsq"
DEFAULT_RESIDUAL_CORRECTION = 0.0


def parse_search_budget(text: str) -> tuple[str, float]:
    """('seconds', s) or ('tokens', n) from '20m', '90s', '1.5h', '2M', '500k' or a plain token count."""
    cleaned = str(text).strip().replace("_", "").replace(",", "")
    units = {
        "s": ("seconds", 1),
        "min": ("seconds", 60),
        "m": ("seconds", 60),
        "h": ("seconds", 3600),
        "k": ("tokens", 1e3),
        "K": ("tokens", 1e3),
        "M": ("tokens", 1e6),
        "B": ("tokens", 1e9),
        "": ("tokens", 1),
    }
    for suffix in sorted(units, key=len, reverse=True):
        if cleaned.endswith(suffix):
            kind, scale = units[suffix]
            try:
                value = float(cleaned[: len(cleaned) - len(suffix)] if suffix else cleaned) * scale
            except ValueError:
                break
            if math.isnan(value) or math.isinf(value) or value <= 0:
                break
            return kind, value
    raise UserInputError(
        f"--search-budget '{text}' is not a positive duration or token count",
        "use e.g. 20m (minutes), 90s, 1h, or 2M (forwarded tokens)",
    )  # fmt: skip


@dataclass
class CalibrationOptions:
    """Which text the importance is measured on."""

    dataset: str = "wikitext2"
    """Text source; its training split is used (never the test split)."""
    samples: int = 50
    """Number of calibration windows."""
    refit_samples: int | None = None
    """Windows the least-squares refit is fitted on; None: `samples`, or windows of its own where those are short
    (`pipeline.refit_windows`)."""
    seq_len: int = 128
    """Tokens per calibration window."""
    seed: int = 0
    """Seed of the window positions."""
    batch_size: int = 8
    """Windows per forward pass."""

    def validate(self) -> None:
        if self.samples < 1:
            raise UserInputError(
                f"--importance-samples must be ≥ 1, got {self.samples}", "e.g. --importance-samples 50"
            )
        if self.refit_samples is not None and self.refit_samples < 1:
            raise UserInputError(
                f"--refit-samples must be ≥ 1, got {self.refit_samples}", "e.g. --refit-samples 64, or leave it out"
            )
        if self.seq_len < 2:
            raise UserInputError(f"--seq-len must be ≥ 2, got {self.seq_len}", "e.g. --seq-len 128")
        if self.batch_size < 1:
            raise UserInputError(f"--batch-size must be ≥ 1, got {self.batch_size}", "e.g. --batch-size 8")
        from llmprune.engine.data import check_text_source

        check_text_source(self.dataset)


@dataclass
class PruneConfig(LoadOptions):
    """What `llmprune prune` does. Plan options left at None come from --importance-config, else the defaults.

    Which path runs (global / plan / streamed) is decided by `route.choose_path`.
    """

    ratio: float | None = None
    """Mean fraction of the prunable units removed in the prunable layers (default plan_options.DEFAULT_RATIO)."""
    target_params: str | None = None
    """Instead of ratio: the size to land on ('6.5B', '110M', or a fraction ≤ 1 of the model to keep)."""
    prune_mlp: bool = False
    """Also prune MLP channels on the plan path (the global path always considers them)."""
    attn_unit: str = "group"
    """group: whole KV groups (q:kv unchanged) | query: query heads, evenly in every group (plan path)."""
    unit_importance: str | None = None
    """Criterion choosing which units go inside a layer (scores.units.UNIT_SCORES: obs | fluctuation | activation |
    magnitude);
    None: obs on the global and streamed paths, fluctuation on the plan path (see `unit_score_for`)."""
    allocation: str | None = None
    """global | plan | search; None: global unless a plan option is given (route.choose_path)."""
    search_budget: str | None = None
    """How long the searched allocation searches: minutes ('20m'), seconds ('90s'), hours ('1h') or forwarded tokens
    ('2M', '500k'); None: DEFAULT_SEARCH_BUDGET."""
    search_windows: int = 64
    """Held-out calibration windows the searched allocation selects on (never the windows the cut is fitted on)."""
    search_dataset: str | None = None
    """Text the searched allocation selects on (its training split; several joined by commas are mixed);
    None: the calibration text (--dataset). Windows of a text the cut also uses never overlap the cut's."""
    compensation_kind: str = DEFAULT_COMPENSATION
    """After each layer's cut: lstsq (refit o_proj/down_proj and their biases on calibration inputs) |
    bias (fold the removed units' mean output into the bias) | none."""
    residual_correction: float = DEFAULT_RESIDUAL_CORRECTION
    """0–1: how much of the pruned model's drift from the dense model's residual stream each lstsq refit also takes
    away (the dense model walks beside the pruned one on the refit's windows); 0: each projection only reproduces
    its dense self on the inputs it receives."""
    stream: bool | None = None
    """Layer-streamed pruning (streaming.StreamedLayers): weights stay on disk, one layer at a time in memory.
    None: automatically when the model would not fit the device (a safetensors directory or the alias)."""
    drop_layers: int = 0
    """Depth pruning: remove this many whole layers (least block influence) before cutting units (global path)."""
    round_to: int = 1
    """MLP widths are rounded to a multiple of this (plan path)."""
    uniform: bool = False
    """Same shape in every layer (no protected layers) and a stock Llama config on save (plan path)."""
    importance_config: Path | None = None
    """A layer_importance_config.json from `analyze`: reuse its scores (and plan options as defaults)."""
    importance_method: str | None = None
    """Layer importance when no config is given (plan path): removal (default) | block-influence | taylor."""
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    """Calibration text (training split) for layer and unit importance."""
    strategy: str | None = None
    alpha: float | None = None
    min_rate: float | None = None
    max_rate: float | None = None
    layer_start: int | None = None
    layer_end: int | None = None
    test_after_prune: bool = False
    """Measure perplexity before and after."""
    eval_dataset: str = "wikitext2"
    """Text for that perplexity (its evaluation/test split)."""
    eval_seq_len: int = 128
    max_windows: int | None = 256
    eval_batch_size: int = 8
    save_model: bool = False
    """Save the pruned model (into the run's log folder unless `out` is given)."""
    out: Path | None = None
    """Save the pruned model here."""
    save_dtype: str = "auto"
    """dtype of the saved weights: auto (the source's stored dtype: bf16 in -> bf16 out) | float32 | bfloat16 |
    float16.
    """
    log_dir: Path = Path("prune_log")
    save_ckpt_log_name: str | None = None
    """Run folder name under log_dir (default: from the model name)."""
    overwrite: bool = False
    """Replace a previous pruned model at `out` (a folder that llmprune did not write is never replaced)."""
    force: bool = False
    """Prune even if the weight health check fails (NaN/Inf/huge values, broken GQA or shapes)."""
    compensation: Callable[..., Any] | None = None
    """Python API only: the per-layer compensation step (see cut.compensation.CompensationContext); selects the
    plan path."""

    def unit_score_for(self, allocation: str) -> str:
        """The unit score a path uses: the one asked for, else that path's default."""
        if self.unit_importance:
            return self.unit_importance
        return PLAN_UNIT_SCORE if allocation == "plan" else DEFAULT_UNIT_SCORE

    def budget(self) -> Budget:
        """--ratio / --target-params / --drop-layers as one Budget (bad values: one line, exit 2)."""
        return resolve_budget(self.ratio, self.target_params, self.drop_layers)

    def plan_options(self, file_plan: dict, num_layers: int) -> PlanOptions:
        """Explicit option > the importance config's > the default; --uniform overrides the layer range and
        strategy."""
        # the file's layer_end may be null (its default), which must stay null rather than fall back
        from_file = PlanOptions(**{k: v for k, v in file_plan.items() if k in PlanOptions.__dataclass_fields__})
        options = from_file.with_overrides(
            ratio=self.ratio,
            strategy=self.strategy,
            alpha=self.alpha,
            min_rate=self.min_rate,
            max_rate=self.max_rate,
            layer_start=self.layer_start,
            layer_end=self.layer_end,
        )
        if self.uniform:
            options = replace(options, strategy="uniform", layer_start=0, layer_end=num_layers)
        return options

    def validate(self) -> None:
        """Values on their own; which options fit together is `route.choose_path`'s job."""
        from llmprune.engine.data import check_text_source, check_window_options

        self.budget()  # the size options on their own (the run resolves them once more, before choosing a path)
        if self.attn_unit not in ATTENTION_UNITS:
            raise UserInputError(f"unknown --attn-unit '{self.attn_unit}'", f"use one of {', '.join(ATTENTION_UNITS)}")
        if self.importance_method is not None:
            get_layer_score(self.importance_method)
        if self.allocation is not None and self.allocation not in ALLOCATIONS:
            raise UserInputError(f"unknown --allocation '{self.allocation}'", f"use one of {', '.join(ALLOCATIONS)}")
        if self.search_budget is not None:
            parse_search_budget(self.search_budget)
        if self.search_dataset is not None:
            check_text_source(self.search_dataset, "--search-dataset")
        from llmprune.engine.pruning.allocate.search import SearchOptions

        fewest = SearchOptions().fewest_windows()
        if self.search_windows < fewest:
            raise UserInputError(
                f"--search-windows must be ≥ {fewest} (its last selection stage uses that many), got"
                f" {self.search_windows}",
                "e.g. --search-windows 64",
            )
        if self.compensation_kind not in COMPENSATIONS:
            raise UserInputError(
                f"unknown --compensation '{self.compensation_kind}'", f"use one of {', '.join(COMPENSATIONS)}"
            )
        if not 0.0 <= self.residual_correction <= 1.0:  # NaN fails this too
            raise UserInputError(
                f"--residual-correction must be between 0 and 1, got {self.residual_correction}",
                "e.g. --residual-correction 0.25, or 0 for none",
            )
        if self.residual_correction > 0 and self.compensation_kind != "lstsq":
            raise UserInputError(
                f"--residual-correction works through the least-squares refit, not --compensation"
                f" {self.compensation_kind}",
                "use --compensation lstsq (the default), or leave --residual-correction out",
            )
        if self.round_to < 1:
            raise UserInputError(f"--round-to must be ≥ 1, got {self.round_to}", "e.g. --round-to 8 or 64")
        self.calibration.validate()
        if self.test_after_prune:
            check_window_options(
                self.eval_seq_len, self.max_windows, self.eval_batch_size, seq_len_option="--eval-seq-len"
            )
            check_text_source(self.eval_dataset, "--eval-dataset")
        from llmprune.engine.io.checkpoint import SAVE_DTYPES

        if self.save_dtype not in SAVE_DTYPES:
            raise UserInputError(f"unknown --save-dtype '{self.save_dtype}'", f"use one of {'|'.join(SAVE_DTYPES)}")
        if self.out is not None and Path(self.out).is_file():
            raise UserInputError(f"--out {self.out} is a file", "name a folder for the pruned model")
