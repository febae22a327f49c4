"""What few calibration tokens cost, part by part: the allocation, the unit choice, or the refit.

    python benchmarks/refit_split.py
    python benchmarks/refit_split.py --runs 64/64/64,64/64/8 --output /tmp/split.json
    python benchmarks/refit_split.py --runs 64/64/128 --append   # adds its rows to the results file's

benchmarks/refit_calibration.py shows the default 20 % prune of SmolLM2-135M losing 14 % on wikitext with 8
calibration windows (1,024 tokens, fewer than the MLP's 1,536 inputs: the regime Llama-3-8B is in by
default) instead of 64. The default prune uses its calibration windows three times: to allocate (how many
units each layer keeps: `global_path.allocate_globally`), to choose the units (the greedy OBS order, on the
inputs each layer really receives) and to refit o_proj / down_proj (`cut.refit`). Each run here is
`A/S/F`: the windows for each of the three, the first A, S or F of the same 64 random windows of wikitext-2
validation (seed 0). The pass is the default's (`cut.layer_pass.prune_layers`: layers in order, on the
hidden states the pruned layers before give); when S and F differ it carries the refit's windows as a
second set of hidden states (its `refit_ids`). PPL on the first 256 windows of 128
tokens of wikitext-2 test and of CPython's pydoc prose (unseen).
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
from quality import count  # noqa: E402
from results_file import RESULTS, earlier_run, table, write_results  # noqa: E402
from shared_data import CALIBRATION_TEXT, wiki_and_pydoc_windows  # noqa: E402

from llmprune.engine.data import load_calibration_windows  # noqa: E402
from llmprune.engine.evaluate import perplexity  # noqa: E402
from llmprune.engine.io.models import load_model  # noqa: E402
from llmprune.engine.pruning.cut.layer_pass import prune_layers  # noqa: E402
from llmprune.engine.pruning.global_path import CalibratedPruneOptions, allocate_globally  # noqa: E402
from llmprune.engine.walk.layer_store import InMemoryLayers, runner_for  # noqa: E402

DEFAULT_RUNS = "64/64/64,8/8/8,8/64/64,64/8/64,64/64/8"
OPTIONS = CalibratedPruneOptions()  # the default prune's


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=DEFAULT_RUNS, help="A/S/F: windows to allocate / choose units / refit")
    parser.add_argument("--share", type=float, default=0.2, help="share of all parameters removed")
    parser.add_argument("--eval-windows", type=int, default=256)
    parser.add_argument("--output", type=Path, default=RESULTS / "refit_split.json", help="results file")
    parser.add_argument(
        "--append", action="store_true", help="keep the output file's rows and command, and add this run's after them"
    )
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    dense, tokenizer = loaded.model, loaded.tokenizer
    texts = wiki_and_pydoc_windows(tokenizer, 128, args.eval_windows)
    runs = [tuple(int(n) for n in run.split("/")) for run in args.runs.split(",")]
    windows = load_calibration_windows(tokenizer, CALIBRATION_TEXT, max(max(r) for r in runs), 128, seed=0).ids
    allocations: dict[int, list] = {}
    rows, command = earlier_run(args.output, args.append)
    for allocate, select, refit in runs:
        start = time.perf_counter()
        if allocate not in allocations:
            runner = runner_for(dense, 128)
            removed = int(args.share * count(dense))
            allocations[allocate] = allocate_globally(InMemoryLayers(dense), windows[:allocate], runner, removed)[1]
        model = copy.deepcopy(dense)
        prune_layers(
            InMemoryLayers(model),
            windows[:select],
            runner_for(model, 128),
            allocations[allocate],
            unit_score=OPTIONS.unit_score,
            compensation=OPTIONS.compensation,
            damping=OPTIONS.damping,
            refit_ids=None if refit == select else windows[:refit],  # the refit's own hidden states when they differ
        )
        ppl = {name: round(perplexity(model, w, batch_size=8).ppl, 2) for name, w in texts.items()}
        row = {
            "allocate": allocate,
            "select": select,
            "refit": refit,
            "params_m": round(count(model) / 1e6, 2),
            **{f"{name}_ppl": value for name, value in ppl.items()},
            "seconds": round(time.perf_counter() - start, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_results(
            "refit_split",
            path=args.output,
            command=command,
            title="Few calibration tokens, part by part: allocation, unit choice, refit (SmolLM2-135M, 20 %)",
            notes=(
                f"{args.share:.0%} of all parameters removed by the default prune, no fine-tuning. The calibration"
                " windows of each part (allocation, unit choice, refit) are the first N of the same 64 random windows"
                " of 128 tokens of wikitext-2 validation (seed 0); 8 windows = 1,024 tokens, fewer than the MLP's"
                f" 1,536 inputs. PPL on the first {args.eval_windows} windows of 128 tokens of wikitext-2 test and of"
                " CPython's pydoc prose (unseen). The first row is the default prune (64 windows), the second the"
                " default with 8."
            ),
            tables=[
                table(
                    "calibration windows for each part, params left, PPL",
                    ["allocation", "unit choice", "refit", "params (M)", "wiki PPL", "pydoc PPL"],
                    [
                        [r["allocate"], r["select"], r["refit"], r["params_m"], r["wiki_ppl"], r["pydoc_ppl"]]
                        for r in rows
                    ],
                )
            ],
            rows=rows,
        )
        del model


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
