"""Options shared by `analyze`, `prune`, the recipes and the sweep (importance, calibration and plan).

One name per option everywhere (the field guide's); the defaults shown in the
help come from the engine's dataclasses (`plan_options`) and registries (`scores.layers`),
the one place they are set.
"""

from __future__ import annotations

from typing import Annotated

import typer

from llmprune.engine.pruning.allocate.plan_options import plan_default
from llmprune.engine.pruning.scores.layers import DEFAULT_LAYER_SCORE, layer_scores_help

_METHODS_HELP = layer_scores_help()
_PLAN = "With prune: selects the layer-importance plan path."
ImportanceMethodOpt = Annotated[str, typer.Option("--importance-method", help=f"Layer importance: {_METHODS_HELP}.")]
PlanImportanceMethodOpt = Annotated[
    str | None,
    typer.Option(
        "--importance-method",
        help=f"Layer importance of the plan: {_METHODS_HELP} (default {DEFAULT_LAYER_SCORE}). {_PLAN}",
    ),
]
SamplesOpt = Annotated[
    int, typer.Option("--importance-samples", help="Calibration windows (training split of --dataset).")
]
RefitSamplesOpt = Annotated[
    int | None,
    typer.Option(
        "--refit-samples",
        help=(
            "Calibration windows the least-squares refit is fitted on (default: --importance-samples, or, when those"
            " give fewer than 4 tokens per kept input, windows of its own for 8; not when streamed on the CPU)."
        ),
    ),
]
CalibSeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration window.")]
CalibDatasetOpt = Annotated[
    str,
    typer.Option(
        "--dataset",
        help=(
            "Calibration text, training split: wikitext2, ptb, c4, pydoc, or a local .txt/.jsonl/.parquet file;"
            " several joined by commas (a.txt,b.jsonl) give equal numbers of windows each."
        ),
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the calibration window positions.")]
CalibBatchOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")]
StrategyOpt = Annotated[
    str | None,
    typer.Option(
        "--pruning-strategy",
        help=(
            f"inverse (important layers pruned less), proportional, uniform (default {plan_default('strategy')})."
            f" {_PLAN}"
        ),
    ),
]
AlphaOpt = Annotated[
    float | None,
    typer.Option(
        "--alpha",
        help=(
            "Contrast of the inverse/proportional plan: least vs most important layer weight e^alpha (default"
            f" {plan_default('alpha'):g}; 0 = uniform). {_PLAN}"
        ),
    ),
]
MinRateOpt = Annotated[
    float | None,
    typer.Option(
        "--min-pruning-rate", help=f"Lowest rate of a prunable layer (default {plan_default('min_rate'):g}). {_PLAN}"
    ),
]
MaxRateOpt = Annotated[
    float | None,
    typer.Option(
        "--max-pruning-rate", help=f"Highest rate of any layer (default {plan_default('max_rate'):g}). {_PLAN}"
    ),
]
LayerStartOpt = Annotated[
    int | None,
    typer.Option(
        "--layer-start",
        help=f"First prunable layer (default {plan_default('layer_start')}: the first layer is protected). {_PLAN}",
    ),
]
LayerEndOpt = Annotated[
    int | None,
    typer.Option(
        "--layer-end",
        help=(
            "One past the last prunable layer (default: the number of layers - 1, so the last layer is protected)."
            f" {_PLAN}"
        ),
    ),
]
AttnUnitOpt = Annotated[
    str,
    typer.Option(
        "--attn-unit",
        help=(
            "group: remove whole KV groups, q:kv unchanged (default); query: remove query heads evenly from every"
            " group."
        ),
    ),
]
RoundToOpt = Annotated[
    int, typer.Option("--round-to", help="Round MLP widths to a multiple of this (e.g. 8 or 64 for fast kernels).")
]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force", help="Go on even if the weight health check fails (NaN/Inf/huge values, broken GQA or shapes)."
    ),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace a previous llmprune output at the output location.")
]
