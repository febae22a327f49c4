"""Peak memory while pruning SmolLM2-135M in place (CPU: peak RSS of this process).

Prints the RSS after importing the libraries, after loading the model, and the
peak after `prune_model` (20 % of all parameters, activation units on
--samples calibration windows), next to the size of the model's weights.

    PYTHONPATH=. python benchmarks/prune_memory.py --samples 8
"""

from __future__ import annotations

import argparse
import json
import resource

from shared_data import CALIBRATION_TEXT


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()

    from llmprune.engine.data import load_calibration_windows
    from llmprune.engine.io.models import load_model
    from llmprune.engine.pruning.allocate.cost import ParameterCost
    from llmprune.engine.pruning.allocate.plan import PlanOptions, make_plan
    from llmprune.engine.pruning.cut.prune_model import prune_model

    after_import = rss_mib()
    loaded = load_model(args.model)
    windows = load_calibration_windows(loaded.tokenizer, CALIBRATION_TEXT, args.samples, 128)
    after_load, peak_load = rss_mib(), peak_mib()
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 2**20
    counter = ParameterCost.of_model(loaded.model)
    _, _, units = make_plan(
        [0.0] * len(counter.shapes),
        counter,
        PlanOptions(strategy="uniform"),
        prune_mlp=True,
        target_params=round(0.8 * counter.total),
    )
    prune_model(loaded.model, units, windows, "activation")
    print(
        json.dumps(
            {
                "weights_mib": round(weights),
                "rss_after_import_mib": round(after_import),
                "rss_after_load_mib": round(after_load),
                "peak_before_pruning_mib": round(peak_load),
                "peak_after_pruning_mib": round(peak_mib()),
                "pruning_added_mib": round(peak_mib() - peak_load),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
