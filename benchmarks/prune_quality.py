"""PPL vs. share of parameters removed on SmolLM2-135M, for several pruning methods.

Calibration: wikitext-2 validation (../shared/data/wikitext-2/wiki.valid.tokens);
evaluation: wikitext-2 test (../shared/data/wikitext-2-raw/wiki.test.raw), seq_len 128,
the first --max-windows windows. Layer importance is measured once and reused.

    PYTHONPATH=. python benchmarks/prune_quality.py --shares 0.1 0.2 0.3 --max-windows 256

Variants (name: layer plan / unit criterion):
- default: removal importance, inverse plan (alpha from --alpha), activation units, MLP pruned
- block-influence: block-influence importance, inverse plan, activation units
- uniform-activation: the same rate in every prunable layer, activation units
- uniform-magnitude: the same rate in every prunable layer, L2 magnitude units (the classic baseline)
- uniform-magnitude-all: uniform magnitude in every layer, first and last included (--uniform)
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from results_file import table, write_results
from shared_data import CALIBRATION_TEXT, EVALUATION_TEXT, REPO

VARIANTS = {
    "default": dict(method="removal", strategy="inverse", units="activation", uniform=False),
    "block-influence": dict(method="block-influence", strategy="inverse", units="activation", uniform=False),
    "uniform-activation": dict(method=None, strategy="uniform", units="activation", uniform=False),
    "uniform-magnitude": dict(method=None, strategy="uniform", units="magnitude", uniform=False),
    "uniform-magnitude-all": dict(method=None, strategy="uniform", units="magnitude", uniform=True),
}
SCORES_TITLE = "Layer importance of SmolLM2-135M (the scores prune_quality.py measures once and reuses)"


QUALITY_TITLE = "Pruning quality of the layer-importance plan vs. uniform magnitude pruning (SmolLM2-135M)"
QUALITY_NOTES = (
    "Every row starts from the dense model and removes a share of *all* parameters (a parameter target). "
    "`default`: removal layer importance, inverse plan, activation unit scores, MLP channels pruned "
    "(the `--allocation plan` path); `uniform-magnitude`: the same rate in layers 1-28, L2 unit scores. "
    "Calibration: `--samples` windows x 128 tokens of wikitext-2 validation; PPL: the first `--max-windows` "
    "windows x 128 tokens of wikitext-2 test. Seconds include loading the model, on a shared 2-core CPU."
)


def quality_table(rows: list[dict]) -> dict:
    return table(
        "PPL on wikitext-2 test at the same share of all parameters removed",
        ["variant", "share asked", "share removed", "parameters", "PPL", "seconds"],
        [
            [row["variant"], row["share"], row.get("removed_share", 0.0), row["params"], row["ppl"], row.get("seconds")]
            for row in rows
        ],
    )


def scores_table(scores: dict[str, list[float]]) -> dict:
    keys = sorted(scores)
    layers = max((len(scores[key]) for key in keys), default=0)
    return table(
        "Score per decoder layer (key: model|method|windows x tokens|seed)",
        ["layer", *keys],
        [
            [layer, *(scores[key][layer] if layer < len(scores[key]) else None for key in keys)]
            for layer in range(layers)
        ],
    )


def write_scores(path: Path, scores: dict[str, list[float]], command: str | None = None) -> None:
    write_results(
        "layer_scores",
        path=path,
        title=SCORES_TITLE,
        command=command,
        tables=[scores_table(scores)],
        scores=scores,
        notes="A cache: a method's scores depend on the model and the calibration windows, not on the pruning ratio.",
    )


def read_scores(path: Path) -> dict[str, list[float]]:
    return json.loads(path.read_text())["scores"] if path.is_file() else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument(
        "--shares", type=float, nargs="+", default=[0.1, 0.2, 0.3], help="shares of all parameters to remove"
    )
    parser.add_argument("--variants", nargs="+", default=["default", "uniform-magnitude"], choices=sorted(VARIANTS))
    parser.add_argument("--alpha", type=float, default=None, help="inverse-plan contrast (default: the CLI default)")
    parser.add_argument("--max-rate", type=float, default=None)
    parser.add_argument("--samples", type=int, default=50, help="calibration windows (layer and unit importance)")
    parser.add_argument("--max-windows", type=int, default=256)
    parser.add_argument("--round-to", type=int, default=1)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "prune_quality.json")
    parser.add_argument("--scores-cache", type=Path, default=REPO / "benchmarks" / "results" / "layer_scores.json")
    args = parser.parse_args()

    import torch

    from llmprune.engine.data import load_calibration_windows, load_evaluation_windows
    from llmprune.engine.evaluate import perplexity
    from llmprune.engine.io.architecture import layer_shapes
    from llmprune.engine.io.models import load_model
    from llmprune.engine.pruning.allocate.cost import ParameterCost
    from llmprune.engine.pruning.allocate.plan import PlanOptions, make_plan
    from llmprune.engine.pruning.cut.prune_model import prune_model
    from llmprune.engine.pruning.scores.layer_importance import layer_importance

    torch.manual_seed(0)
    base = load_model(args.model)
    calibration = load_calibration_windows(base.tokenizer, CALIBRATION_TEXT, args.samples, 128, seed=0)
    evaluation = load_evaluation_windows(base.tokenizer, EVALUATION_TEXT, 128, args.max_windows)
    dense = perplexity(base.model, evaluation, batch_size=8)
    print(f"dense: PPL {dense.ppl:.3f} ({dense.windows} windows, {dense.seconds:.0f} s)", flush=True)
    rows = [{"variant": "dense", "share": 0.0, "ppl": dense.ppl, "params": base.num_parameters}]

    # layer scores do not depend on the ratio: measured once per method and sample count, kept across runs
    scores_cache = read_scores(args.scores_cache)
    for name in args.variants:
        method = VARIANTS[name]["method"]
        key = f"{args.model}|{method}|{args.samples}x128|seed0"
        if method and key not in scores_cache:
            measured = layer_importance(base.model, calibration, method, batch_size=8)
            scores_cache[key] = measured.scores
            write_scores(args.scores_cache, scores_cache)
            print(f"{method} importance: {measured.seconds:.0f} s", flush=True)

    # share-major, so that an interrupted run still compares the variants at the first share
    for share in args.shares:
        for name in args.variants:
            variant = VARIANTS[name]
            method = variant["method"]
            key = f"{args.model}|{method}|{args.samples}x128|seed0"
            scores = scores_cache[key] if method else [0.0] * base.model.config.num_hidden_layers
            start = time.perf_counter()
            model = load_model(args.model).model
            shapes = layer_shapes(model)
            counter = ParameterCost.of_model(model)
            options = PlanOptions(strategy=variant["strategy"]).with_overrides(alpha=args.alpha, max_rate=args.max_rate)
            if variant["uniform"]:
                options = replace(options, layer_start=0, layer_end=len(shapes))
            options, rates, units = make_plan(
                scores,
                counter,
                options,
                "group",
                True,
                args.round_to,
                variant["uniform"],
                target_params=round((1 - share) * counter.total),
            )
            outcome = prune_model(model, units, calibration, variant["units"], "group", batch_size=8)
            measured = perplexity(model, evaluation, batch_size=8)
            row = {
                "variant": name,
                "share": share,
                "ratio": options.ratio,
                "removed_share": outcome.removed_share,
                "params": outcome.params_after,
                "ppl": measured.ppl,
                "gqa_violations": outcome.gqa_violations,
                "seconds": time.perf_counter() - start,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            del model
            # after every row: a cut-short run keeps its rows
            write_results(
                "prune_quality",
                path=args.output,
                title=QUALITY_TITLE,
                notes=QUALITY_NOTES,
                tables=[quality_table(rows)],
                args={k: str(v) for k, v in vars(args).items()},
                rows=rows,
            )

    print("\n| variant | share of params removed | PPL |\n|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row.get('removed_share', 0.0):.1%} | {row['ppl']:.2f} |")


if __name__ == "__main__":
    main()
