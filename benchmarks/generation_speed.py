"""Generation tokens/s of a pruned model vs. the dense one, measured in one run.

Prunes SmolLM2-135M to --share fewer parameters (KV groups + MLP channels; by
default the same rate in every prunable layer, since speed depends on the
shapes only), then times greedy generation with a KV cache (batch 1,
--new-tokens) and a prefill forward pass (2 x 128 tokens), alternating dense
and pruned runs so that load on the machine affects both alike; reports the
median of --repeats runs.

    PYTHONPATH=. python benchmarks/generation_speed.py --share 0.2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from shared_data import CALIBRATION_TEXT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--share", type=float, default=0.2, help="share of all parameters removed")
    parser.add_argument(
        "--method",
        default="uniform",
        help=(
            "uniform (same rate in every prunable layer, L2 units: no calibration needed) or a layer-importance method"
        ),
    )
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--round-to", type=int, default=1)
    args = parser.parse_args()

    import torch

    from llmprune.engine.data import load_calibration_windows
    from llmprune.engine.io.models import load_model
    from llmprune.engine.pruning.allocate.cost import ParameterCost
    from llmprune.engine.pruning.allocate.plan import PlanOptions, make_plan
    from llmprune.engine.pruning.cut.prune_model import prune_model
    from llmprune.engine.pruning.scores.layer_importance import layer_importance

    dense = load_model(args.model)
    pruned = load_model(args.model).model
    # speed depends on the shapes only; the default plan needs calibration text, the uniform one does not
    windows = load_calibration_windows(dense.tokenizer, CALIBRATION_TEXT, args.samples, 128)
    counter = ParameterCost.of_model(pruned)
    target = round((1 - args.share) * counter.total)
    if args.method == "uniform":
        _, _, units = make_plan(
            [0.0] * len(counter.shapes),
            counter,
            PlanOptions(strategy="uniform"),
            prune_mlp=True,
            round_to=args.round_to,
            target_params=target,
        )
        outcome = prune_model(pruned, units, None, "magnitude")
    else:
        scores = layer_importance(pruned, windows, args.method).scores
        _, _, units = make_plan(
            scores, counter, PlanOptions(), prune_mlp=True, round_to=args.round_to, target_params=target
        )
        outcome = prune_model(pruned, units, windows)

    prompt = dense.tokenizer("The history of the city begins in the", return_tensors="pt")["input_ids"]
    prefill = windows.ids[:2]

    @torch.inference_mode()
    def generation_rate(model) -> float:
        start = time.perf_counter()
        out = model.generate(
            prompt,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=dense.tokenizer.eos_token_id,
        )
        return (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - start)

    @torch.inference_mode()
    def prefill_rate(model) -> float:
        start = time.perf_counter()
        model(input_ids=prefill, use_cache=False)
        return prefill.numel() / (time.perf_counter() - start)

    rates = {"dense_generate": [], "pruned_generate": [], "dense_prefill": [], "pruned_prefill": []}
    generation_rate(dense.model), generation_rate(pruned)  # warm-up
    for _ in range(args.repeats):
        for name, model in (("dense", dense.model), ("pruned", pruned)):
            rates[f"{name}_generate"].append(generation_rate(model))
            rates[f"{name}_prefill"].append(prefill_rate(model))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    print(
        json.dumps(
            {
                "model": args.model,
                "threads": torch.get_num_threads(),
                "params_dense": outcome.params_before,
                "params_pruned": outcome.params_after,
                "removed_share": round(outcome.removed_share, 4),
                **{f"{k}_tokens_per_s": round(v, 1) for k, v in medians.items()},
                "generate_speedup": round(medians["pruned_generate"] / medians["dense_generate"], 3),
                "prefill_speedup": round(medians["pruned_prefill"] / medians["dense_prefill"], 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
