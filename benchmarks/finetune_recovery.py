"""Recovery: fine-tune a pruned model on wikitext-2 validation and compare its wikitext-2 test PPL.

    python benchmarks/finetune_recovery.py PRUNED_DIR [--samples 200] [--seq-len 128] [--lr 3e-5] [--eval-windows 64]
        [--batch-size 1] [--grad-accum 1] [--epochs 1]

PRUNED_DIR is e.g. the output of
`llmprune prune smollm2-135m --ratio 0.2 --prune-mlp --save-model --out PRUNED_DIR`.
Training reads only the validation text; PPL is measured on the first
--eval-windows windows of the test text before and after, in the same
process, with the guards and checkpoints of `llmprune finetune`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from shared_data import CALIBRATION_TEXT, EVALUATION_TEXT  # noqa: E402  (benchmarks/ is the script's directory)

from llmprune.engine.finetune.train import FinetuneConfig, run_finetune


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    out = args.out or str(Path(tempfile.mkdtemp(prefix="llmprune-recovery-")) / "run")
    config = FinetuneConfig(
        model=args.model,
        dataset=CALIBRATION_TEXT,
        samples=args.samples,
        seq_len=args.seq_len,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        epochs=args.epochs,
        test_before=True,
        test_after=True,
        eval_dataset=EVALUATION_TEXT,
        eval_windows=args.eval_windows,
        out=out,
    )
    result = run_finetune(config)
    print(
        json.dumps(
            {
                k: result.to_dict()[k]
                for k in (
                    "status",
                    "steps",
                    "ppl_before",
                    "ppl_after",
                    "best_loss",
                    "final_loss",
                    "tokens_per_second",
                    "seconds",
                    "rollbacks",
                    "run_dir",
                )
            },
            indent=2,
        )
    )
    print(
        f"wikitext-2 test PPL ({args.eval_windows} x {args.seq_len} tokens): {result.ppl_before:.2f} ->"
        f" {result.ppl_after:.2f} after {result.steps} steps (lr {args.lr}, {args.samples} windows of wiki.valid, batch"
        f" {args.batch_size} x {args.grad_accum}, {args.epochs} epoch(s), {result.seconds:.0f} s)"
    )


if __name__ == "__main__":
    main()
