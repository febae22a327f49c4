"""Pruned-model quality: llmprune's methods side by side, no fine-tuning.

    python benchmarks/quality.py                       # the README table
    python benchmarks/quality.py --eval-windows 64 --runs default@0.2,bias@0.2

SmolLM2-135M-Instruct, a share of *all* parameters removed (tied embedding
counted once), wikitext-2 test PPL at seq_len 128 over the first 256 windows;
calibration on 64 random windows of wikitext-2 *validation* (never the test
split). Every method starts from a fresh copy of the dense model. Prints
method, share removed, parameters left, PPL and seconds (pruning only), and
one JSON line per row with --json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from shared_data import CALIBRATION_TEXT as VALID  # noqa: E402  (benchmarks/ is the script's directory)
from shared_data import EVALUATION_TEXT as TEST  # noqa: E402

from llmprune.engine.data import load_calibration_windows, load_evaluation_windows
from llmprune.engine.evaluate import perplexity
from llmprune.engine.io.models import load_model
from llmprune.engine.pruning.allocate.ranking import least_influential
from llmprune.engine.pruning.cut.depth import drop_layers
from llmprune.engine.pruning.global_path import (
    CalibratedPruneOptions,
    InMemoryLayers,
    LayerRunner,
    prune_to_target,
)
from llmprune.engine.pruning.scores.measure import measure_units

# name -> options for llmprune's width pruning (the first is the default of `llmprune prune`)
WIDTH_METHODS = {
    "default": CalibratedPruneOptions(),
    # the previous default (fluctuation scores before the OBS ones), for the ablation
    "fluctuation+lstsq": CalibratedPruneOptions(unit_score="fluctuation"),
    "bias": CalibratedPruneOptions(compensation="bias"),
    "no-compensation": CalibratedPruneOptions(compensation="none"),
    "activation+lstsq": CalibratedPruneOptions(unit_score="activation"),
    "magnitude+lstsq": CalibratedPruneOptions(unit_score="magnitude"),
    "mlp-only": CalibratedPruneOptions(attention=False),
    "uniform-mlp+lstsq": CalibratedPruneOptions(allocation="even-mlp", attention=False),
}


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def runner_for(model, seq_len: int) -> LayerRunner:
    return LayerRunner(model.config, model.model.rotary_emb, seq_len, model.device, model.dtype)


def width(model, calibration, share: float, options: CalibratedPruneOptions, refit_windows=None) -> int:
    """Prune `share` of all parameters in place; returns the windows the refit was fitted on.

    `refit_windows`: `product_refit`'s, or None to refit on `calibration` (the same unless it is short).
    """
    store = InMemoryLayers(model)
    runner = runner_for(model, calibration.seq_len)
    removed = int(share * count(model))
    return prune_to_target(store, calibration.ids, runner, removed, options, refit_windows=refit_windows)[3]


def product_refit(tokenizer, source: str, windows: int, seq_len: int):
    """Where `llmprune prune` (in memory) takes the refit's windows from, for `windows` calibration windows."""
    from llmprune.engine.pruning.config import CalibrationOptions, PruneConfig
    from llmprune.engine.pruning.pipeline import refit_windows

    config = PruneConfig(calibration=CalibrationOptions(dataset=source, samples=windows, seq_len=seq_len))
    return refit_windows(config, tokenizer, torch.device("cpu"), streamed=False)


def depth(model, calibration, share: float) -> None:
    """Drop the fewest least-influential layers that remove at least `share` of all parameters."""
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    layers = -(-int(share * count(model)) // per_layer)
    scores = measure_units(InMemoryLayers(model), calibration.ids, runner_for(model, calibration.seq_len), "magnitude")
    drop_layers(model, least_influential([s.influence for s in scores], layers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--runs",
        default="default@0.2,default@0.1,default@0.3,bias@0.2,no-compensation@0.2,depth@0.2,depth@0.1,depth@0.3,activation+lstsq@0.2,mlp-only@0.2",
        help="method@share pairs, in order (methods: " + ", ".join([*WIDTH_METHODS, "depth"]) + ")",
    )
    parser.add_argument("--eval-windows", type=int, default=256)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--no-dense", action="store_true", help="skip the dense model's row (its PPL does not change between runs)"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "quality.json",
        help="results file (rewritten after every row, so a cut-short run keeps its rows)",
    )
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    loaded = load_model(args.model)
    dense, tokenizer = loaded.model, loaded.tokenizer
    evaluation = load_evaluation_windows(tokenizer, TEST, args.seq_len, args.eval_windows)
    calibration = load_calibration_windows(tokenizer, VALID, args.calib_windows, args.seq_len, seed=0)

    rows: list[dict] = []

    def report(method: str, share: float, model, seconds: float) -> None:
        ppl = perplexity(model, evaluation, batch_size=8).ppl
        row = {
            "method": method,
            "share": share,
            "params_m": round(count(model) / 1e6, 2),
            "ppl": round(ppl, 2),
            "seconds": round(seconds, 1),
        }
        print(
            (
                json.dumps(row)
                if args.json
                else f"{method:<22} {share:>5.0%} {row['params_m']:>8.2f}M {ppl:>12.2f} {seconds:>8.1f}s"
            ),
            flush=True,
        )
        rows.append(row)
        write_results(args, rows)

    if not args.json:
        print(f"{'method':<22} {'cut':>5} {'params':>9} {'PPL':>12} {'seconds':>9}")
    if not args.no_dense:
        report("dense", 0.0, dense, 0.0)
    for run in args.runs.split(","):
        method, share = run.split("@")
        share = float(share)
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        if method == "depth":
            depth(model, calibration, share)
        else:
            width(model, calibration, share, WIDTH_METHODS[method])
        report(method, share, model, time.perf_counter() - start)
        del model


def write_results(args, rows: list[dict]) -> None:
    """benchmarks/results/quality.json in the schema `make docs` renders."""
    from llmprune.engine.core.paths import atomic_write_text

    options = {name: {k: v for k, v in vars(o).items()} for name, o in WIDTH_METHODS.items()}
    result = {
        "title": "Pruning quality without fine-tuning (SmolLM2-135M, wikitext-2 test)",
        "command": "python " + " ".join(shlex.quote(a) for a in ["benchmarks/quality.py", *sys.argv[1:]]),
        "machine": "2-core CPU, 24 GiB (shared with other jobs: seconds are indicative)",
        "date": datetime.date.today().isoformat(),
        "notes": (
            f"PPL on the first {args.eval_windows} windows of {args.seq_len} tokens of wikitext-2 test; calibration on"
            f" {args.calib_windows} random windows of wikitext-2 validation. `removed` is the share of *all*"
            " parameters. `default` is what `llmprune prune` does; the other rows change one choice (options in"
            " `options`)."
        ),
        "tables": [
            {
                "caption": "method, share of all parameters removed, parameters left, PPL, pruning seconds",
                "columns": ["method", "removed", "params left (M)", "PPL", "seconds"],
                "rows": [[r["method"], f"{r['share']:.0%}", r["params_m"], r["ppl"], r["seconds"]] for r in rows],
            }
        ],
        "rows": rows,
        "options": options,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
