"""Training throughput: llmprune's guarded loop vs. a plain transformers training loop.

    python benchmarks/finetune_throughput.py [--model smollm2-135m] [--steps 12] [--seq-len 128] [--rounds 2]

Both run in this one process, on the same windows of wikitext-2 validation,
with the same settings (AdamW, lr 1e-5, cosine schedule, clipping at 1.0,
batch 1, fp32 on CPU). The plain loop is the usual
`loss.backward(); clip_grad_norm_; optimizer.step(); scheduler.step()` with
`loss.item()` for logging. llmprune's loop runs with every guard, the
metrics.jsonl line and the training log of each step; its step time is read
from metrics.jsonl, so model loading, the health check and the start/final
checkpoints are not counted (the plain loop has none of them). The two loops
alternate for --rounds rounds so that a busy machine slows both alike; the
median step time of each gives tokens/s.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from llmprune.engine.data import load_calibration_windows
from llmprune.engine.finetune.train import FinetuneConfig, finetune_model, make_scheduler
from llmprune.engine.io.models import load_model

DATA = (
    Path(os.environ.get("LLMPRUNE_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    / "wikitext-2"
    / "wiki.valid.tokens"
)


def plain_loop(model, windows, config: FinetuneConfig) -> list[float]:
    """Step times (s) of the plain transformers loop."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = make_scheduler(optimizer, config, len(windows))
    times = []
    for window in windows.ids:
        tick = time.perf_counter()
        ids = window[None]
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - tick)
    return times


def guarded_loop(model, tokenizer, windows, config: FinetuneConfig) -> list[float]:
    """Step times (s) of llmprune's loop, read from its metrics.jsonl."""
    with tempfile.TemporaryDirectory() as out:
        config = dataclasses.replace(config, out=str(Path(out) / "run"))
        finetune_model(model, tokenizer, config, train_windows=windows)
        lines = [json.loads(line) for line in Path(config.out, "metrics.jsonl").read_text().splitlines()]
    tokens = config.batch_size * config.seq_len
    return [tokens / line["tokens_per_second"] for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default=str(DATA))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    loaded = load_model(args.model)
    base_state = copy.deepcopy(loaded.model.state_dict())
    windows = load_calibration_windows(loaded.tokenizer, args.dataset, args.steps, args.seq_len, seed=0)
    config = FinetuneConfig(samples=args.steps, seq_len=args.seq_len, lr=1e-5, max_grad_norm=1.0, save_every=10_000)
    plain, guarded = [], []
    for _ in range(args.rounds):
        loaded.model.load_state_dict(base_state)
        plain += plain_loop(loaded.model, windows, config)[1:]  # the first step warms up the allocator
        loaded.model.load_state_dict(base_state)
        guarded += guarded_loop(loaded.model, loaded.tokenizer, windows, config)[1:]
    tokens = args.seq_len
    plain_tps, guarded_tps = tokens / statistics.median(plain), tokens / statistics.median(guarded)
    print(
        f"model {args.model}, seq_len {args.seq_len}, batch 1, {len(plain)} timed steps per loop, torch threads"
        f" {torch.get_num_threads()}"
    )
    print(f"plain transformers loop : {plain_tps:8.1f} tokens/s")
    print(f"llmprune guarded loop   : {guarded_tps:8.1f} tokens/s")
    print(f"ratio guarded/plain     : {guarded_tps / plain_tps:8.3f}")


if __name__ == "__main__":
    main()
