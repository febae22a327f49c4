"""`--importance-method removal`: hidden-state reuse vs. the naive way, on the same samples, in one run.

The naive way runs the whole model once per skipped layer (plus once unmodified);
llmprune reuses the hidden states entering layer i, so only layers i+1.. are re-run.
Both give the same scores (checked here too).

    PYTHONPATH=. python benchmarks/analyze_speed.py --samples 8
"""

from __future__ import annotations

import argparse
import json

from shared_data import CALIBRATION_TEXT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()

    import torch

    from llmprune.engine.data import load_calibration_windows
    from llmprune.engine.io.models import load_model
    from llmprune.engine.pruning.scores.layer_importance import layer_importance, removal_importance_naive

    torch.manual_seed(0)
    loaded = load_model(args.model)
    windows = load_calibration_windows(loaded.tokenizer, CALIBRATION_TEXT, args.samples, args.seq_len)
    # alternate the order so that a busy machine does not favour one of them
    fast = layer_importance(loaded.model, windows, "removal", args.batch_size)
    naive = removal_importance_naive(loaded.model, windows, args.batch_size)
    difference = max(abs(a - b) for a, b in zip(fast.scores, naive.scores, strict=False))
    result = {
        "model": args.model,
        "samples": args.samples,
        "seq_len": args.seq_len,
        "threads": torch.get_num_threads(),
        "reuse_seconds": round(fast.seconds, 2),
        "naive_seconds": round(naive.seconds, 2),
        "speedup": round(naive.seconds / fast.seconds, 2),
        "reuse_layer_passes": fast.layer_passes,
        "naive_layer_passes": naive.layer_passes,
        "max_score_difference": difference,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
