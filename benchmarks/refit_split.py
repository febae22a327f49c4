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
validation (seed 0). The pass below is the default's (`cut.layer_pass.prune_layers`: layers in order, on
the hidden states the pruned layers before give), except that it carries two sets of hidden states, one
for choosing the units and one for refitting, when S and F differ. PPL on the first 256 windows of 128
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
from llmprune.engine.io.architecture import attention_counts  # noqa: E402
from llmprune.engine.io.models import load_model  # noqa: E402
from llmprune.engine.pruning.cut.compensation import (  # noqa: E402
    CompensationContext,
    compensation_step,
    ensure_bias,
)
from llmprune.engine.pruning.cut.surgery import prune_kv_groups, prune_mlp_channels  # noqa: E402
from llmprune.engine.pruning.global_path import CalibratedPruneOptions, allocate_globally  # noqa: E402
from llmprune.engine.pruning.scores import statistics  # noqa: E402
from llmprune.engine.pruning.scores.units import get_unit_score, top_units  # noqa: E402
from llmprune.engine.walk.layer_store import InMemoryLayers, runner_for  # noqa: E402

DEFAULT_RUNS = "64/64/64,8/8/8,8/64/64,64/8/64,64/64/8"
OPTIONS = CalibratedPruneOptions()  # the default prune's


def _inputs(linear: torch.nn.Linear, run) -> statistics.InputStatistics:
    with statistics.record_inputs(linear, gram=True) as stats:
        run()
    return stats


@torch.no_grad()
def split_pass(model, plans, select_ids: torch.Tensor, refit_ids: torch.Tensor) -> None:
    """The default pruning pass, choosing units on `select_ids` and refitting on `refit_ids`.

    Each set of windows has its own hidden states through the pruned layers: "select" always, "refit" only
    when its windows differ (the default pass is then exactly `prune_layers`).
    """
    runner = runner_for(model, select_ids.shape[1])
    score, refit = get_unit_score(OPTIONS.unit_score), compensation_step(OPTIONS.compensation)
    streams = {"select": model.model.embed_tokens(select_ids)}
    if refit_ids is not select_ids:
        streams["refit"] = model.model.embed_tokens(refit_ids)

    def cut(index, layer, projection, block, inputs, choose):
        linear = getattr(layer.self_attn if projection == "o_proj" else layer.mlp, projection)
        stats = {name: _inputs(linear, lambda h=h: block(layer, h)) for name, h in inputs.items()}
        weight, bias = linear.weight.data.clone(), linear.bias.data.clone()
        columns = choose(stats["select"])  # cuts the layer: the projection is a new, narrower module
        sliced = getattr(layer.self_attn if projection == "o_proj" else layer.mlp, projection)
        fit_on = stats.get("refit", stats["select"])
        refit(CompensationContext(index, layer, projection, sliced, weight, bias, fit_on, columns, OPTIONS.damping))

    for index, plan in enumerate(plans):
        layer = model.model.layers[index]
        ensure_bias(layer.self_attn.o_proj)
        ensure_bias(layer.mlp.down_proj)
        heads, kv_heads, head_dim = attention_counts(layer)
        per_group = heads // kv_heads
        if plan.groups < kv_heads:

            def groups(stats, layer=layer, plan=plan, per_group=per_group, head_dim=head_dim):
                kept = top_units(score.kv_groups(layer, stats, keep=plan.groups), plan.groups)
                prune_kv_groups(layer, kept)
                return [
                    (g * per_group + j) * head_dim + d for g in kept for j in range(per_group) for d in range(head_dim)
                ]

            cut(index, layer, "o_proj", runner.attention_block, streams, groups)
        middle = {name: runner.attention_block(layer, h) for name, h in streams.items()}
        if plan.channels < layer.mlp.down_proj.in_features:

            def channels(stats, layer=layer, plan=plan):
                kept = top_units(score.mlp_channels(layer, stats, keep=plan.channels), plan.channels)
                prune_mlp_channels(layer, kept)
                return kept

            cut(index, layer, "down_proj", runner.mlp_block, middle, channels)
        streams = {name: runner.mlp_block(layer, m) for name, m in middle.items()}


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
        select_ids = windows[:select]
        split_pass(model, allocations[allocate], select_ids, select_ids if refit == select else windows[:refit])
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
