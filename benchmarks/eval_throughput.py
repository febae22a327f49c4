"""Evaluation throughput: llmprune's perplexity loop vs. a plain transformers loop.

    python benchmarks/eval_throughput.py [--windows 64] [--seq-len 128]

Both run in this one process on the same windows of wikitext-2 test; the
plain loop is the one-window-at-a-time `model(input_ids, labels=...)` most
scripts use. Prints tokens/s of each, the ratio, and that the PPLs agree.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from results_file import table, write_results

from llmprune.engine.data import load_evaluation_windows
from llmprune.engine.evaluate import perplexity
from llmprune.engine.io.models import load_model

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def plain_loop(model, windows) -> tuple[float, float]:
    start = time.perf_counter()
    losses = []
    with torch.no_grad():
        for window in windows.ids:
            losses.append(model(input_ids=window[None], labels=window[None]).loss.item())
    seconds = time.perf_counter() - start
    return math.exp(sum(losses) / len(losses)), windows.ids.numel() / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default=str(DATA))
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    args = parser.parse_args()

    loaded = load_model(args.model)
    windows = load_evaluation_windows(loaded.tokenizer, args.dataset, args.seq_len, args.windows)
    perplexity(loaded.model, load_evaluation_windows(loaded.tokenizer, args.dataset, args.seq_len, 2))  # warm-up

    plain_ppl, plain_tps = plain_loop(loaded.model, windows)
    rows = [("plain transformers loop (1 window/step)", plain_ppl, plain_tps)]
    for batch_size in (1, 8):
        result = perplexity(loaded.model, windows, batch_size=batch_size)
        rows.append((f"llmprune perplexity, batch {batch_size}", result.ppl, result.tokens_per_second))

    print(f"{args.model}, {args.windows} windows x {args.seq_len} tokens, torch threads {torch.get_num_threads()}")
    for name, ppl, tps in rows:
        print(f"{name:42s} PPL {ppl:8.3f}  {tps:8.0f} tokens/s  ratio vs plain {tps / plain_tps:5.2f}x")
    write_results(
        "eval_throughput",
        title=f"Evaluation throughput: llmprune's perplexity loop vs. a plain transformers loop ({args.model})",
        notes=(
            f"{args.windows} windows x {args.seq_len} tokens of `{Path(args.dataset).name}`, the same windows for every"
            f" loop, one process, {torch.get_num_threads()} torch threads. The plain loop is the one-window-at-a-time"
            " `model(input_ids, labels=...)` most scripts use; llmprune computes the loss from the logits itself (no"
            " label copy, fp32 NLL summed per window) and builds no KV cache. Tokens/s depend on the machine's load;"
            " the PPLs must agree."
        ),
        tables=[
            table(
                "Throughput",
                ["loop", "PPL", "tokens/s", "vs. plain"],
                [[name, round(ppl, 3), round(tps), f"{tps / plain_tps:.2f}x"] for name, ppl, tps in rows],
            )
        ],
        rows=[{"loop": name, "ppl": ppl, "tokens_per_second": tps} for name, ppl, tps in rows],
    )


if __name__ == "__main__":
    main()
