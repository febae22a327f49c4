"""The searched allocation against the default prune: wikitext-2 and unseen pydoc PPL, and what the search cost.

    python benchmarks/search_quality.py --shares 0.2 --search-budget 12m
    python benchmarks/search_quality.py --shares 0.1,0.2,0.3 --methods default,search --refit-samples 256
    python benchmarks/search_quality.py --search-dataset wiki.valid.tokens,GPL-3,GFDL-1.3 --search-budget 650k
    python benchmarks/search_quality.py --shares 0.3 ... --append   # adds its rows to the results file's
    python benchmarks/search_quality.py ... --levels-from results/search_assembly.json   # no new search

SmolLM2-135M-Instruct, a share of *all* parameters removed, no fine-tuning. Calibration: 64 random windows
of 128 tokens of wikitext-2 *validation* (the default prune's cut, as benchmarks/quality.py); the search
selects on 64 more windows of the same text that share no token with them, or of --search-dataset
(`prune --search-dataset`: equal numbers of windows from each text it names). PPL at seq_len 128 over the
first --eval-windows windows of wikitext-2 *test* and of CPython's pydoc prose (never seen by either).
`search` is `prune --allocation search`: the search, then the default's layer pass at the searched sizes
(each layer cut and refitted on the inputs the pruned layers before it give). --refit-samples is the
prune's option, for both methods: the refit on that many windows of the calibration text (their first 64
are the cut's). --levels-from takes the sizes an earlier run's search found at each share (its `search`
rows' `levels`, the budget's tokens) instead of searching again, and cuts them as the product does.
--residual-correction is the prune's option, for both methods. The machine is shared: the 1-minute load
average at the start of each row is recorded next to its seconds.
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
from llmprune.engine.pruning.allocate.level import Level
from llmprune.engine.pruning.allocate.search import SearchOptions
from llmprune.engine.pruning.config import CalibrationOptions, PruneConfig, parse_search_budget
from llmprune.engine.pruning.global_path import CalibratedPruneOptions, InMemoryLayers, prune_to_target
from llmprune.engine.pruning.pipeline import refit_windows
from llmprune.engine.pruning.search_path import cut_in_order, prune_searched
from llmprune.engine.walk.layer_store import runner_for

RESULTS = Path(__file__).resolve().parent / "results" / "search_quality.json"


def count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shares", default="0.2", help="shares of all parameters removed, comma-separated")
    parser.add_argument("--methods", default="default,search", help="default and/or search, comma-separated")
    parser.add_argument("--search-budget", default="12m")
    parser.add_argument("--refit-samples", type=int, default=None, help="prune --refit-samples (default: its own)")
    parser.add_argument(
        "--residual-correction", type=float, default=0.0, help="prune --residual-correction, for both methods"
    )
    parser.add_argument(
        "--levels-from", type=Path, default=None, help="results file whose search rows' sizes to cut (no new search)"
    )
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
        if method != "dense" and args.residual_correction:
            row["correction"] = args.residual_correction
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
    calibration = CalibrationOptions(dataset=VALID, samples=args.calib_windows, refit_samples=args.refit_samples)
    # the product's policy for the refit's windows (`prune --refit-samples`), the same for both methods
    refit = refit_windows(PruneConfig(calibration=calibration), tokenizer, torch.device("cpu"), streamed=False)
    for share in (float(s) for s in args.shares.split(",")):
        for method in args.methods.split(","):
            model, _ = fresh()
            load, start = os.getloadavg()[0], time.perf_counter()
            if method == "default":
                runner = runner_for(model, 128)
                *_, refit_samples = prune_to_target(
                    InMemoryLayers(model),
                    cut.ids,
                    runner,
                    int(share * total),
                    CalibratedPruneOptions(correction=args.residual_correction),
                    refit_windows=refit,
                )
                measure("default", share, model, time.perf_counter() - start, load, refit_windows=refit_samples)
                continue
            if args.levels_from:
                earlier, index = earlier_search(args.levels_from, share, kind, value)
                levels = [Level.from_dict(d) for d in earlier["levels"]]
                *_, refit_samples = cut_in_order(
                    model, cut.ids, levels, refit_windows=refit, correction=args.residual_correction
                )
                extra = {k: earlier[k] for k in ("generations", "accepted", "tokens", "kl", "search_dataset")}
                measure(
                    "search", share, model, time.perf_counter() - start + earlier["seconds"], load,
                    refit_windows=refit_samples, levels_from=f"{args.levels_from.name}, row {index}", **extra,
                    levels=earlier["levels"],
                )  # fmt: skip
                continue
            options = SearchOptions(
                **({"budget_seconds": value} if kind == "seconds" else {"budget_tokens": int(value)})
            )
            if args.stages:
                options.stages = tuple(tuple(int(n) for n in stage.split("x")) for stage in args.stages.split(","))
            state = args.state / f"search-{share:g}.json" if args.state else None
            outcome = prune_searched(
                model, cut.ids, held_out.ids, int(share * total), options, state_path=state, refit_windows=refit,
                correction=args.residual_correction,
            )  # fmt: skip
            found = outcome.search
            extra = {
                "refit_windows": outcome.refit_samples,
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


def earlier_search(path: Path, share: float, kind: str, value: float) -> tuple[dict, int]:
    """The search row of an earlier results file at this share (and this many tokens, for a budget in tokens)."""
    rows = json.loads(path.read_text())["rows"]
    for index, row in enumerate(rows):
        if row["method"] == "search" and row["share"] == share and "levels" in row:
            # a search stops at the first generation past its token budget (659,456 tokens for 650k)
            if kind == "seconds" or abs(row["tokens"] / value - 1) < 0.02:
                return row, index
    raise SystemExit(f"{path} has no search row at {share:g} for that budget")


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

    def search_tokens(row: dict) -> str:
        return f"{row['tokens'] / 1e3:,.0f} k" if "tokens" in row else "–"

    result = {
        "title": (
            "Residual correction, with the default and the searched allocation"
            if any(r.get("correction") for r in rows)
            else "Searched allocation vs. the default prune"
        )
        + " (SmolLM2-135M, wikitext-2 and unseen pydoc)",
        "command": args.command,
        "machine": "2-core CPU, 24 GiB, shared with other jobs (load = 1-minute load average at the row's start)",
        "date": datetime.date.today().isoformat(),
        "notes": (
            f"No fine-tuning. Calibration: {args.calib_windows} random windows of 128 tokens of wikitext-2"
            f" validation; the search selects on {args.search_windows} held-out windows"
            f" {selection}, for the row's `search tokens`. PPL over the first {args.eval_windows} windows of 128"
            " tokens of wikitext-2 test and of pydoc. `search` is `prune --allocation search`: the searched sizes"
            " cut in order, as the default cuts; `refit windows`: the windows the least-squares refit ran on"
            " (`prune --refit-samples`; the first 64 are the cut's); `correction`: `prune --residual-correction`."
            " A row with `levels from` cut the sizes an"
            " earlier search found (same cut windows, selection text and budget) instead of searching again; its"
            " seconds add that search's. Seconds: the whole prune (for the search: database, search and cut)."
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
                    "refit windows",
                    "correction",
                    "generations",
                    "search tokens",
                    "levels from",
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
                        r.get("refit_windows", "–"),
                        r.get("correction", 0.0) if r["method"] != "dense" else "–",
                        r.get("generations", "–"),
                        search_tokens(r),
                        r.get("levels_from", "–"),
                        r["seconds"],
                        r["load"],
                    ]
                    for r in rows
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
