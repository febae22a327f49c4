"""The README's ratio sweep, through the shared pruning path: `recipe sweep` = what `recipe safe --ratio r` does.

One layer-importance analysis of SmolLM2-135M on wikitext-2 *validation* text,
then one pruned copy per ratio through `run_prune` with the `safe` recipe's
PruneConfig (plan path: removal importance, inverse plan, MLP channels,
fluctuation unit scores, least-squares compensation with its recorded
fallback), each measured on wikitext-2 *test* windows.

    LLMPRUNE_SHARED_DATA=../shared/data nice -n 5 .venv/bin/python benchmarks/sweep.py

Writes benchmarks/results/sweep.json (then `make docs` renders it).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from shared_data import CALIBRATION_TEXT, EVALUATION_TEXT, REPO

sys.path.insert(0, str(REPO))


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--recipe", default="safe")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calibration-samples", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "sweep.json")
    args = parser.parse_args()

    import torch

    from llmprune.engine.recipes.registry import get_recipe
    from llmprune.engine.recipes.sweep import SweepConfig, run_sweep

    torch.manual_seed(0)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as runs:
        config = SweepConfig(
            ratios=args.ratios,
            recipe=get_recipe(args.recipe),
            model=args.model,
            out=runs,
            dataset=CALIBRATION_TEXT,
            eval_dataset=EVALUATION_TEXT,
            seq_len=args.seq_len,
            calibration_samples=args.calibration_samples,
            eval_windows=args.eval_windows,
            device="cpu",
        )
        result = run_sweep(config)
        logs = sorted(Path(runs).rglob("report.json"))
        compensation = {}
        for log in logs:
            report = json.loads(log.read_text())
            ran = sorted({name for layer in report["layers"] for name in layer.get("compensation", {}).values()})
            compensation[f"{report['ratio']:g}"] = ran
    seconds = time.perf_counter() - start
    ratios = " ".join(f"--ratio {r:g}" for r in args.ratios)
    rows = [
        [
            "base" if row.ratio == 0 else f"{row.ratio:g}",
            _count(row.params),
            f"{row.share_removed:.1%}",
            round(row.ppl, 2),
            round(row.ppl_vs_base, 2),
            row.verdict,
        ]
        for row in result.rows
    ]
    data = {
        "title": f"Ratio sweep of {args.model} through the recipe's pruning path ({args.recipe})",
        "command": (
            "LLMPRUNE_SHARED_DATA=../shared/data nice -n 5 .venv/bin/python benchmarks/sweep.py"
            + f" --ratios {' '.join(f'{r:g}' for r in args.ratios)} --seq-len {args.seq_len}"
            + f" --calibration-samples {args.calibration_samples} --eval-windows {args.eval_windows}"
        ),
        "equivalent_cli": (
            f"llmprune recipe sweep {args.model} {ratios} --recipe {args.recipe} --dataset {CALIBRATION_TEXT}"
            f" --eval-dataset {EVALUATION_TEXT} --seq-len {args.seq_len} --calibration-samples"
            f" {args.calibration_samples} --eval-windows {args.eval_windows}"
        ),
        "machine": "2-core CPU, 24 GiB",
        "date": date.today().isoformat(),
        "notes": (
            f"One removal-importance analysis on {args.calibration_samples} calibration windows of {args.seq_len}"
            " tokens (wikitext-2 validation), then each ratio prunes a fresh copy of the base model through"
            f" `run_prune` with the `{args.recipe}` recipe's settings, exactly as `llmprune recipe {args.recipe}"
            " --ratio r` does (a test checks that both give the same parameters and PPL). PPL on the first"
            f" {args.eval_windows} wikitext-2 test windows of {args.seq_len} tokens, no fine-tuning. Verdicts are those"
            " of the recipe's gate. With so few calibration tokens the least-squares refit's ridge"
            " is chosen by cross-validation (recorded per layer in each prune's report)."
        ),
        "tables": [
            {
                "caption": "Pruning ratio against size and PPL",
                "columns": ["ratio", "params", "removed", "PPL", "× base", "verdict"],
                "rows": rows,
            }
        ],
        "rows": [row.__dict__ for row in result.rows],
        "compensation_ran": compensation,
        "seconds": round(seconds, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(data["tables"][0], indent=2))


if __name__ == "__main__":
    main()
