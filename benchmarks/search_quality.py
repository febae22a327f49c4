"""The searched allocation against the default prune: wikitext-2 and unseen pydoc PPL, and what the search cost.

    python benchmarks/search_quality.py --shares 0.2 --search-budget 12m
    python benchmarks/search_quality.py --shares 0.1,0.2,0.3 --methods default,search --in-order
    python benchmarks/search_quality.py --search-dataset wiki.valid.tokens,GPL-3,GFDL-1.3 --search-budget 650k
    python benchmarks/search_quality.py --shares 0.3 ... --append   # adds its rows to the results file's

SmolLM2-135M-Instruct, a share of *all* parameters removed, no fine-tuning. Calibration: 64 random windows
of 128 tokens of wikitext-2 *validation* (the default prune's cut, as benchmarks/quality.py); the search
selects on 64 more windows of the same text that share no token with them, or of --search-dataset
(`prune --search-dataset`: equal numbers of windows from each text it names). PPL at seq_len 128 over the
first --eval-windows windows of wikitext-2 *test* and of CPython's pydoc prose (never seen by either).
`search` assembles the model from the level database (each layer refitted on dense inputs, what the search
measured); `search+in-order` (--in-order) runs the default's layer pass at the searched sizes instead
(each layer refitted on the inputs the pruned layers before it give). The machine is shared: the 1-minute
load average at the start of each row is recorded next to its seconds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch
from results_file import earlier_run  # noqa: E402
from shared_data import CALIBRATION_TEXT as VALID  # noqa: E402  (benchmarks/ is the script's directory)
from shared_data import wiki_and_pydoc_windows  # noqa: E402

from llmprune.engine.data import calibration_and_held_out
from llmprune.engine.evaluate import perplexity
from llmprune.engine.io.models import load_model
from llmprune.engine.pruning.allocate.search import SearchOptions
from llmprune.engine.pruning.config import parse_search_budget
from llmprune.engine.pruning.global_path import CalibratedPruneOptions, InMemoryLayers, prune_to_target
from llmprune.engine.pruning.search_path import prune_searched, refit_in_order
from llmprune.engine.walk.layer_store import runner_for

RESULTS = Path(__file__).resolve().parent / "results" / "search_quality.json"


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", default="0.2", help="shares of all parameters removed, comma-separated")
    parser.add_argument("--methods", default="default,search", help="default and/or search, comma-separated")
    parser.add_argument("--search-budget", default="12m")
    parser.add_argument("--in-order", action="store_true", help="also the in-order refit at the searched sizes")
    parser.add_argument("--eval-windows", type=int, default=256)
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--search-windows", type=int, default=64)
    parser.add_argument(
        "--search-dataset",
        default=None,
        help="text the search selects on (prune --search-dataset); default: held-out windows of the calibration text",
    )
    parser.add_argument(
        "--stages", default=None, help="selection stages as WINDOWSxSURVIVORS,... (default: the search's)"
    )
    parser.add_argument("--dense", default=None, help="'wiki,pydoc' dense PPL already measured (skips that row)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument(
        "--state",
        type=Path,
        default=None,
        help="folder for the search states (one per share): a rerun with a larger budget continues each search",
    )
    parser.add_argument(
        "--append", action="store_true", help="keep the output file's rows and command, and add this run's after them"
    )
    args = parser.parse_args()

    def fresh():
        loaded = load_model("smollm2-135m")
        return loaded.model.float().eval(), loaded.tokenizer

    model, tokenizer = fresh()
    # the product's windows (`prune --allocation search`): the cut's are the default prune's
    cut, held_out = calibration_and_held_out(
        tokenizer, VALID, args.calib_windows, args.search_windows, 128, 0, args.search_dataset
    )
    texts = wiki_and_pydoc_windows(tokenizer, 128, args.eval_windows)
    total = count(model)
    rows, args.command = earlier_run(args.output, args.append)

    def measure(method: str, share: float, pruned, seconds: float, load: float, **extra) -> None:
        ppl = {name: perplexity(pruned, windows, 8).ppl for name, windows in texts.items()}
        row = {"method": method, "share": share, "params_m": round(count(pruned) / 1e6, 2),
               "wiki": round(ppl["wiki"], 2), "pydoc": round(ppl["pydoc"], 2), "seconds": round(seconds, 1),
               "load": round(load, 2), **extra}  # fmt: skip
        print(json.dumps(row), flush=True)
        rows.append(row)
        write(args, rows)

    if any(r["method"] == "dense" for r in rows):
        pass  # measured by the run appended to
    elif args.dense:
        wiki, pydoc = (float(v) for v in args.dense.split(","))
        rows.append({"method": "dense", "share": 0.0, "params_m": round(total / 1e6, 2), "wiki": wiki,
                     "pydoc": pydoc, "seconds": 0.0, "load": None})  # fmt: skip
    else:
        measure("dense", 0.0, model, 0.0, os.getloadavg()[0])
    kind, value = parse_search_budget(args.search_budget)
    for share in (float(s) for s in args.shares.split(",")):
        for method in args.methods.split(","):
            model, _ = fresh()
            load, start = os.getloadavg()[0], time.perf_counter()
            if method == "default":
                runner = runner_for(model, 128)
                prune_to_target(InMemoryLayers(model), cut.ids, runner, int(share * total), CalibratedPruneOptions())
                measure("default", share, model, time.perf_counter() - start, load)
                continue
            options = SearchOptions(
                **({"budget_seconds": value} if kind == "seconds" else {"budget_tokens": int(value)})
            )
            if args.stages:
                options.stages = tuple(tuple(int(n) for n in stage.split("x")) for stage in args.stages.split(","))
            state = args.state / f"search-{share:g}.json" if args.state else None
            outcome = prune_searched(model, cut.ids, held_out.ids, int(share * total), options, state_path=state)
            found = outcome.search
            extra = {
                "generations": found.generations,
                "accepted": sum(c["accepted"] for c in found.curve),
                "tokens": found.tokens,
                "start": found.start,
                "start_kl": found.start_fitness,
                "kl": found.fitness,
                "kept_start": found.kept_start,
                "resumed_from": found.resumed_from,
                "curve": [round(c["fitness"], 4) for c in found.curve],  # the parent's KL, generation by generation
                "stages": [list(stage) for stage in options.stages],
                "search_dataset": held_out.source,
                "dropped": outcome.dropped_layers,
                "levels": [lv.to_dict() for lv in found.allocation],
            }
            measure("search", share, model, time.perf_counter() - start, load, **extra)
            if args.in_order:
                model, _ = fresh()
                load, begin = os.getloadavg()[0], time.perf_counter()
                refit_in_order(model, cut.ids, found.allocation)
                measure(
                    "search+in-order",
                    share,
                    model,
                    time.perf_counter() - begin + found.seconds,
                    load,
                    tokens=found.tokens,
                )


def write(args, rows: list[dict]) -> None:
    from llmprune.engine.core.paths import atomic_write_text

    dense = next((r for r in rows if r["method"] == "dense"), None)
    selection = (
        f"of {args.search_dataset} (equal numbers from each; none shares a token with the cut)"
        if args.search_dataset
        else "of the same text (no token shared)"
    )

    def times(row, text):
        return round(row[text] / dense[text], 2) if dense else None

    def search_tokens(index: int) -> str:
        """The tokens the row's search forwarded (an in-order row's: those of the search row before it)."""
        row = rows[index]
        if row["method"] == "search+in-order" and "tokens" not in row:
            row = next((r for r in reversed(rows[:index]) if r["method"] == "search"), row)
        return f"{row['tokens'] / 1e3:,.0f} k" if "tokens" in row else "–"

    result = {
        "title": "Searched allocation vs. the default prune (SmolLM2-135M, wikitext-2 and unseen pydoc)",
        "command": args.command,
        "machine": "2-core CPU, 24 GiB, shared with other jobs (load = 1-minute load average at the row's start)",
        "date": datetime.date.today().isoformat(),
        "notes": (
            f"No fine-tuning. Calibration: {args.calib_windows} random windows of 128 tokens of wikitext-2"
            f" validation; the search selects on {args.search_windows} held-out windows"
            f" {selection}, for the row's `search tokens`. PPL over the first {args.eval_windows} windows of 128"
            " tokens of wikitext-2 test and of pydoc. `search` is the model the search measured (each layer"
            " refitted on the dense model's inputs); `search+in-order` refits the searched sizes in order, as the"
            " default does. Seconds: the whole prune (for the search: database, search and assembly)."
        ),
        "tables": [
            {
                "caption": "method, share of all parameters removed, parameters left, PPL, x dense, seconds, load",
                "columns": [
                    "method",
                    "removed",
                    "params left (M)",
                    "wiki PPL",
                    "pydoc PPL",
                    "x dense (wiki)",
                    "x dense (pydoc)",
                    "generations",
                    "search tokens",
                    "seconds",
                    "load",
                ],  # fmt: skip
                "rows": [
                    [
                        r["method"],
                        f"{r['share']:.0%}",
                        r["params_m"],
                        r["wiki"],
                        r["pydoc"],
                        times(r, "wiki"),
                        times(r, "pydoc"),
                        r.get("generations", "–"),
                        search_tokens(i) if r["method"].startswith("search") else "–",
                        r["seconds"],
                        r["load"],
                    ]
                    for i, r in enumerate(rows)
                ],  # fmt: skip
            }
        ],
        "rows": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
