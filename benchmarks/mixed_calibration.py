"""Calibration from one source or from two, mixed: PPL on wikitext-2 and on unseen pydoc prose.

    python benchmarks/mixed_calibration.py --second /usr/share/vim/vim90/doc/options.txt

The default prune (quality.py's `default` width method) at 20 % of all parameters, calibrated on
64 windows × 128 tokens of wikitext-2 validation alone, then on the same number of windows drawn
half from wikitext-2 validation and half from a second text (`--dataset a,b`: equal numbers of
windows from each, `data.load_calibration_windows`). The second text should be another kind of
prose than either evaluation text; on this machine Vim's option reference (software
documentation, as pydoc is, but not pydoc). PPL on the first 256 windows of 128 tokens of
wikitext-2 test and of CPython's pydoc_data prose, which no calibration saw.
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
from quality import WIDTH_METHODS, count, width  # noqa: E402
from results_file import table, write_results  # noqa: E402
from shared_data import CALIBRATION_TEXT, wiki_and_pydoc_windows  # noqa: E402

from llmprune.engine.data import load_calibration_windows  # noqa: E402
from llmprune.engine.evaluate import perplexity  # noqa: E402
from llmprune.engine.io.models import load_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--second", required=True, help="the second calibration text (a local file)")
    parser.add_argument("--share", type=float, default=0.2)
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--eval-windows", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    dense, tokenizer = loaded.model, loaded.tokenizer
    texts = wiki_and_pydoc_windows(tokenizer, args.seq_len, args.eval_windows)
    dense_ppl = {name: perplexity(dense, w, batch_size=8).ppl for name, w in texts.items()}
    rows: list[dict] = []
    for label, source in (
        ("wikitext-2 alone", CALIBRATION_TEXT),
        (f"wikitext-2 + {Path(args.second).name}", f"{CALIBRATION_TEXT},{args.second}"),
    ):
        calibration = load_calibration_windows(tokenizer, source, args.windows, args.seq_len, seed=0)
        model = copy.deepcopy(dense)
        start = time.perf_counter()
        width(model, calibration, args.share, WIDTH_METHODS["default"])
        seconds = time.perf_counter() - start
        ppl = {name: perplexity(model, w, batch_size=8).ppl for name, w in texts.items()}
        row = {
            "calibration": label,
            "params_m": round(count(model) / 1e6, 2),
            **{f"{name}_ppl": round(value, 2) for name, value in ppl.items()},
            "seconds": round(seconds, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        write_results(
            "mixed_calibration",
            title="Calibration from one source or two, mixed (SmolLM2-135M, wikitext-2 test and pydoc)",
            notes=(
                f"The default prune at {args.share:.0%} of all parameters, {args.windows} calibration windows of"
                f" {args.seq_len} tokens (seed 0): from wikitext-2 validation alone, or half from it and half from"
                f" {args.second} (`--dataset a,b`). PPL on the first {args.eval_windows} windows of wikitext-2 test"
                " and of CPython's pydoc_data prose; neither calibration saw either. Ratio to the dense model in"
                f" brackets (dense: wiki {dense_ppl['wiki']:.2f}, pydoc {dense_ppl['pydoc']:.2f})."
            ),
            tables=[
                table(
                    "calibration text, params left, PPL wiki / pydoc (× dense)",
                    ["calibration", "params (M)", "wiki PPL", "pydoc PPL", "prune (s)"],
                    [
                        [
                            r["calibration"],
                            r["params_m"],
                            f"{r['wiki_ppl']:.2f} ({r['wiki_ppl'] / dense_ppl['wiki']:.2f}×)",
                            f"{r['pydoc_ppl']:.2f} ({r['pydoc_ppl'] / dense_ppl['pydoc']:.2f}×)",
                            r["seconds"],
                        ]
                        for r in rows
                    ],
                )
            ],
            rows=rows,
        )


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
