"""`--importance-method removal`: hidden-state reuse vs. the naive way, on the same samples.

The naive way runs the whole model once per skipped layer (plus once unmodified);
llmprune reuses the hidden states entering layer i, so only layers i+1.. are re-run.
Both give the same scores (checked here too).

    PYTHONPATH=. python benchmarks/analyze_speed.py --samples 8                   # the two loops, in this process
    PYTHONPATH=. python benchmarks/analyze_speed.py --whole-process --samples 16  # what a user waits for

`--whole-process` times what a user runs, each in a fresh process, alternately
(`--repeats` pairs, so that a busy machine does not favour one of them): the
command `llmprune analyze MODEL --importance-method removal` (start-up, loading,
the health check, the measurement, the plan, the JSON and the chart) against a
plain script that loads the same model and windows and runs the naive loop.
The figures go to benchmarks/results/analyze_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from results_file import table, write_results  # noqa: E402
from shared_data import CALIBRATION_TEXT  # noqa: E402

# the naive loop as a user would write it: load, read the windows, one forward per skipped layer
NAIVE_SCRIPT = """
import json, sys
from llmprune.engine.data import load_calibration_windows
from llmprune.engine.io.models import load_model
from llmprune.engine.pruning.scores.layer_importance import removal_importance_naive
model, text, samples, seq_len, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
loaded = load_model(model)
windows = load_calibration_windows(loaded.tokenizer, text, samples, seq_len)
print(json.dumps(removal_importance_naive(loaded.model, windows, batch).scores))
"""


def in_process(args: argparse.Namespace) -> None:
    import torch

    from llmprune.engine.data import load_calibration_windows
    from llmprune.engine.io.models import load_model
    from llmprune.engine.pruning.scores.layer_importance import layer_importance, removal_importance_naive

    torch.manual_seed(0)
    loaded = load_model(args.model)
    windows = load_calibration_windows(loaded.tokenizer, CALIBRATION_TEXT, args.samples, args.seq_len)
    fast = layer_importance(loaded.model, windows, "removal", args.batch_size)
    naive = removal_importance_naive(loaded.model, windows, args.batch_size)
    difference = max(abs(a - b) for a, b in zip(fast.scores, naive.scores, strict=True))
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


def _timed(command: list[str]) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{command[:4]} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds, done.stdout


def whole_process(args: argparse.Namespace) -> None:
    text = str(CALIBRATION_TEXT)
    with tempfile.TemporaryDirectory() as out:
        analyze = [
            sys.executable, "-m", "llmprune", "analyze", args.model, "--importance-method", "removal",
            "--importance-samples", str(args.samples), "--seq-len", str(args.seq_len), "--dataset", text,
            "--batch-size", str(args.batch_size), "--output", str(Path(out) / "plan.json"), "--overwrite", "--json",
        ]  # fmt: skip
        naive = [sys.executable, "-c", NAIVE_SCRIPT, args.model, text]
        naive += [str(args.samples), str(args.seq_len), str(args.batch_size)]
        analyze_seconds, naive_seconds, difference = [], [], 0.0
        for repeat in range(args.repeats):
            # alternate which goes first, so that neither always meets a warm or a busy machine
            pair = [("analyze", analyze), ("naive", naive)]
            for name, command in pair if repeat % 2 == 0 else pair[::-1]:
                seconds, stdout = _timed(command)
                if name == "analyze":
                    analyze_seconds.append(seconds)
                    reuse_scores = json.loads(stdout)["importance"]["scores"]
                else:
                    naive_seconds.append(seconds)
                    naive_scores = json.loads(stdout)
                print(f"{name}: {seconds:.1f} s", file=sys.stderr)
            difference = max(difference, *(abs(a - b) for a, b in zip(reuse_scores, naive_scores, strict=True)))
    speedups = [n / a for a, n in zip(analyze_seconds, naive_seconds, strict=True)]
    row = [
        args.model,
        f"{args.samples} x {args.seq_len}",
        args.repeats,
        round(statistics.median(analyze_seconds), 1),
        round(statistics.median(naive_seconds), 1),
        round(statistics.median(speedups), 2),
        f"{difference:.1e}",
    ]
    write_results(
        "analyze_speed",
        title="llmprune analyze --importance-method removal, as a whole process, against the naive loop",
        notes=(
            "Each run is a fresh process (start-up and model loading included); the pairs alternate their order."
            " The naive loop uses the model's own loss; llmprune's head works a vocabulary slice at a time"
            " (docs/commands/analyze.md)."
        ),
        tables=[
            table(
                "Median wall time of each whole process",
                ["model", "windows x tokens", "pairs", "analyze (s)", "naive (s)", "speedup", "max score diff"],
                [row],
            )
        ],
        analyze_seconds=analyze_seconds,
        naive_seconds=naive_seconds,
    )
    print(json.dumps({"row": row, "speedups": speedups}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--whole-process", action="store_true", help="time the command against a naive script")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of runs with --whole-process")
    args = parser.parse_args()
    whole_process(args) if args.whole_process else in_process(args)


if __name__ == "__main__":
    main()
