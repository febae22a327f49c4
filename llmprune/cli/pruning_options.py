"""Options shared by `analyze` and `prune` (importance, calibration and plan)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

ImportanceMethodOpt = Annotated[
    str,
    typer.Option("--importance-method", help="Layer importance: removal (loss increase when the layer is skipped), block-influence (1 - cos(in, out)), taylor (|w·grad|)."),
]
SamplesOpt = Annotated[int, typer.Option("--importance-samples", help="Calibration windows (training split of --dataset).")]
CalibSeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per calibration window.")]
CalibDatasetOpt = Annotated[
    str, typer.Option("--dataset", help="Calibration text, training split: wikitext2, ptb, c4, pydoc, or a local .txt/.jsonl/.parquet file.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the calibration window positions.")]
CalibBatchOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")]
StrategyOpt = Annotated[
    Optional[str],
    typer.Option("--pruning-strategy", help="inverse (important layers pruned less; default), proportional, uniform."),
]
AlphaOpt = Annotated[
    Optional[float],
    typer.Option("--alpha", help="Contrast of the inverse/proportional plan: least vs most important layer weight e^alpha (default 4; 0 = uniform)."),
]
MinRateOpt = Annotated[Optional[float], typer.Option("--min-pruning-rate", help="Lowest rate of a prunable layer (default 0).")]
MaxRateOpt = Annotated[Optional[float], typer.Option("--max-pruning-rate", help="Highest rate of any layer (default 0.8).")]
LayerStartOpt = Annotated[
    Optional[int], typer.Option("--layer-start", help="First prunable layer (default 1: the first layer is protected).")
]
LayerEndOpt = Annotated[
    Optional[int], typer.Option("--layer-end", help="One past the last prunable layer (default: the number of layers - 1, so the last layer is protected).")
]
AttnUnitOpt = Annotated[
    str, typer.Option("--attn-unit", help="group: remove whole KV groups, q:kv unchanged (default); query: remove query heads evenly from every group.")
]
RoundToOpt = Annotated[int, typer.Option("--round-to", help="Round MLP widths to a multiple of this (e.g. 8 or 64 for fast kernels).")]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Go on even if the weight health check fails (NaN/Inf/huge values, broken GQA or shapes).")
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a previous llmprune output at the output location.")]
