"""The least-squares refit with few calibration tokens: PPL on wikitext-2 and on unseen pydoc prose.

    python benchmarks/refit_calibration.py
    python benchmarks/refit_calibration.py --runs default@0.2:8,bias@0.2:8 --output /tmp/ridge.json

Llama-3-8B's down_proj has 14,336 inputs: its default calibration gives fewer tokens than kept inputs,
the regime where a plain least-squares refit reproduces the calibration tokens and nothing else. This
puts SmolLM2-135M (1,536 MLP inputs) in the same regime, 8 windows × 128 = 1,024 tokens, next to the
64 windows of benchmarks/quality.py. Each run is `method@share:windows`: quality.py's width
method, the share of all parameters removed and the calibration windows (wikitext-2 validation,
seed 0). PPL on the first 256 windows of
128 tokens of wikitext-2 test (quality.py's protocol) and of CPython's pydoc_data prose, which neither
calibration nor training saw.

`default` is `llmprune prune`'s default: when the calibration gives the refit fewer than 4 tokens per kept input
of its widest projection, the refit draws windows of its own for 8; `held` is the same prune with the
refit held to the calibration windows (its ridge then chosen by cross-validation, `refit.py`).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality import WIDTH_METHODS, count, product_refit, width  # noqa: E402
from results_file import table, write_results  # noqa: E402
from shared_data import CALIBRATION_TEXT, wiki_and_pydoc_windows  # noqa: E402

from llmprune.engine.data import load_calibration_windows  # noqa: E402
from llmprune.engine.evaluate import perplexity  # noqa: E402
from llmprune.engine.io.models import load_model  # noqa: E402

DEFAULT_RUNS = "default@0.2:64,default@0.2:8,held@0.2:8,bias@0.2:8,default@0.2:4,held@0.2:4,bias@0.2:4"


def parse(run: str) -> tuple[str, float, int]:
    method, rest = run.split("@")
    share, windows = rest.split(":")
    return method, float(share), int(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS)
    parser.add_argument("--eval-windows", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--no-dense", action="store_true")
    parser.add_argument("--output", type=Path, default=None, help="results file (default: results/refit_calibration)")
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    dense, tokenizer = loaded.model, loaded.tokenizer
    texts = wiki_and_pydoc_windows(tokenizer, args.seq_len, args.eval_windows)
    rows: list[dict] = []

    def report(label: str, share: float, windows: int, model, seconds: float, refit: int = 0) -> None:
        ppl = {name: round(perplexity(model, w, batch_size=8).ppl, 2) for name, w in texts.items()}
        row = {
            "method": label,
            "share": share,
            "calibration_windows": windows,
            "refit_windows": refit,
            "params_m": round(count(model) / 1e6, 2),
            **{f"{name}_ppl": value for name, value in ppl.items()},
            "seconds": round(seconds, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        dense_row = next((r for r in rows if r["method"] == "dense"), None)
        write_results(
            "refit_calibration",
            path=args.output,
            title="The least-squares refit with few calibration tokens (SmolLM2-135M, wikitext-2 test and pydoc)",
            notes=(
                f"PPL on the first {args.eval_windows} windows of {args.seq_len} tokens of wikitext-2 test and of"
                " CPython's pydoc_data prose (unseen: nothing is calibrated or trained on it); calibration on N random"
                " windows of wikitext-2 validation (seed 0). 8 windows = 1,024 tokens, fewer than SmolLM2's 1,536 MLP"
                " inputs: the regime Llama-3-8B's 14,336 were in by default. `default` is `llmprune prune`'s default:"
                " short of 4 tokens per kept input of its widest projection, the refit draws windows of its own (more"
                " of the same text and seed) for 8, while the allocation and the units come from the N windows;"
                " `held` holds the refit to the N windows, where below 4 tokens per kept input its ridge towards the"
                " original weights is chosen per projection by generalised cross-validation, from the plain ridge up"
                " to bias compensation alone (the `bias` rows). `removed` is the share of all parameters."
            ),
            tables=[
                table(
                    "method, removed, calibration windows, windows the refit was fitted on, params left, PPL wiki /"
                    " pydoc (× dense)",
                    ["method", "removed", "calib windows", "refit windows", "params (M)", "wiki PPL", "pydoc PPL"],
                    [
                        [
                            r["method"],
                            f"{r['share']:.0%}",
                            r["calibration_windows"],
                            r.get("refit_windows", "-"),
                            r["params_m"],
                            _with_ratio(r["wiki_ppl"], dense_row and dense_row["wiki_ppl"]),
                            _with_ratio(r["pydoc_ppl"], dense_row and dense_row["pydoc_ppl"]),
                        ]
                        for r in rows
                    ],
                )
            ],
            rows=rows,
        )

    if not args.no_dense:
        report("dense", 0.0, 0, dense, 0.0)
    for run in args.runs.split(","):
        method, share, windows = parse(run)
        calibration = load_calibration_windows(tokenizer, CALIBRATION_TEXT, windows, args.seq_len, seed=0)
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        sized = product_refit(tokenizer, CALIBRATION_TEXT, windows, args.seq_len) if method == "default" else None
        refit = width(model, calibration, share, WIDTH_METHODS["default" if method == "held" else method], sized)
        report(method, share, windows, model, time.perf_counter() - start, refit)
        del model


def _with_ratio(value: float, dense: float | None) -> str:
    return f"{value:.2f} ({value / dense:.2f}×)" if dense else f"{value:.2f}"


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
