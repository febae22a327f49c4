"""Recovery after pruning, measured honestly: CE vs. KD fine-tunes at equal tokens, next to the dense model.

    nice -n 5 .venv/bin/python benchmarks/recovery.py [--pruned DIR] [--steps 100] [--batch-size 8] [--seq-len 128]
        [--lr 1e-4] [--kd-temperature 1] [--kd-weight 1 0.5] [--kd-top-k K] [--eval-windows 256] [--work DIR]

Models: the dense SmolLM2-135M and the default 20 % pruned one (`llmprune prune smollm2-135m
--target-params 107.6M --importance-samples 64 --dataset wiki.valid`; made here unless --pruned
is given). Fine-tunes, all on the same windows of wikitext-2 *validation* (steps x batch x seq_len
tokens): the dense model and the pruned model with the LM loss (CE), and the pruned model distilled
from the dense one (KD, `finetune --teacher smollm2-135m`), once per --kd-weight (1: KD alone;
0.5: half KD, half LM loss). Each model is measured before and
after on wikitext-2 *test* and on CPython's `pydoc_data.topics` prose, which neither training nor
calibration sees. Every arm is kept in --work/state.json, so a rerun continues where it stopped.
Writes benchmarks/results/recovery.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from shared_data import CALIBRATION_TEXT, EVALUATION_TEXT, REPO

DENSE = "smollm2-135m"
PRUNE_ARGS = ["--target-params", "107.6M", "--importance-samples", "64", "--dataset", CALIBRATION_TEXT]
TEXTS = {"wiki": EVALUATION_TEXT, "pydoc": "pydoc"}
# arm -> (model it starts from, distil from the dense model?); pruned/KD runs once per --kd-weight
ARMS = {"dense/CE": ("dense", False), "pruned/CE": ("pruned", False), "pruned/KD": ("pruned", True)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pruned", default=None, help="an existing pruned model folder (default: prune here)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--kd-temperature", type=float, default=1.0)
    parser.add_argument(
        "--kd-weight",
        type=float,
        nargs="+",
        default=[1.0, 0.5],
        help="one KD arm per weight (1: distillation only, the finetune default; 0.5: half LM loss)",
    )
    parser.add_argument("--kd-top-k", type=int, default=None)
    parser.add_argument("--eval-windows", type=int, default=256)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/llmprune-recovery"))
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "recovery.json")
    parser.add_argument(
        "--note", default="", help="a sentence appended to the results notes (e.g. why the budget was cut)"
    )
    return parser.parse_args()


class State:
    """Finished measurements, kept on disk after each one (keyed by what they depend on)."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str) -> dict | None:
        return self.data.get(key)

    def put(self, key: str, value: dict) -> None:
        self.data[key] = value
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def prune(work: Path) -> tuple[str, str]:
    out = work / "pruned-20"
    command = ["llmprune", "prune", DENSE, *PRUNE_ARGS, "--out", str(out)]
    if not (out / "config.json").is_file():
        print("pruning:", shlex.join(command), flush=True)
        subprocess.run(
            [str(Path(sys.executable).parent / "llmprune"), *command[1:]], check=True, stdout=subprocess.DEVNULL
        )
    return str(out), shlex.join(command)


def measure(model_spec: str, args: argparse.Namespace) -> dict:
    """PPL on each evaluation text (the first --eval-windows windows of --seq-len tokens)."""
    from llmprune.engine.data import load_evaluation_windows
    from llmprune.engine.evaluate import perplexity
    from llmprune.engine.io.models import load_model

    loaded = load_model(model_spec)
    result = {"parameters": sum(p.numel() for p in loaded.model.parameters())}
    for name, source in TEXTS.items():
        windows = load_evaluation_windows(loaded.tokenizer, source, args.seq_len, args.eval_windows)
        measured = perplexity(loaded.model, windows, batch_size=8)
        result[name] = measured.ppl
        result[f"{name}_windows"] = measured.windows
    return result


def finetune(model_spec: str, kd_weight: float | None, run_dir: Path, args: argparse.Namespace) -> dict:
    """One arm's fine-tune; with a KD weight, distilled from the dense model."""
    from llmprune.engine.finetune.train import FinetuneConfig, run_finetune

    config = FinetuneConfig(
        model=model_spec,
        dataset=CALIBRATION_TEXT,
        samples=args.steps * args.batch_size,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        schedule="cosine",
        save_every=25,
        out=str(run_dir),
        resume=(run_dir / "checkpoints" / "latest.json").is_file(),
        teacher=DENSE if kd_weight is not None else None,
        kd_temperature=args.kd_temperature,
        kd_weight=1.0 if kd_weight is None else kd_weight,
        kd_top_k=args.kd_top_k,
    )
    result = run_finetune(config, lambda event: _progress(event, run_dir.name))
    if result.status != "completed":
        raise SystemExit(f"{run_dir.name}: fine-tuning ended {result.status}: {result.message}")
    return {
        "model_dir": result.model_dir,
        "seconds": result.seconds,
        "steps": result.steps,
        "tokens": result.steps * args.batch_size * args.seq_len,
        "final_loss": result.final_loss,
    }


def _progress(event, name: str) -> None:
    from llmprune.engine.core.events import StepMetrics

    if isinstance(event, StepMetrics) and (event.step % 10 == 0 or event.step == 1):
        parts = f" (KD {event.kd_loss:.3f}, LM {event.lm_loss:.3f})" if event.kd_loss is not None else ""
        print(
            f"  {name} step {event.step} loss {event.loss:.4f}{parts} {event.tokens_per_second:.0f} tok/s", flush=True
        )


def runs(arms: list[str], args: argparse.Namespace) -> list[tuple[str, float | None]]:
    """(arm, KD weight or None) for every fine-tune to make: one pruned/KD run per --kd-weight."""
    return [(arm, weight) for arm in arms for weight in (args.kd_weight if ARMS[arm][1] else [None])]


def arm_key(arm: str, kd_weight: float | None, args: argparse.Namespace) -> str:
    budget = f"{args.steps}x{args.batch_size}x{args.seq_len}|lr{args.lr:g}|warmup{args.warmup_steps}"
    if kd_weight is not None:
        budget += f"|T{args.kd_temperature:g}|w{kd_weight:g}|k{args.kd_top_k}"
    return f"{arm}|{budget}|eval{args.eval_windows}"


def main() -> None:
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    state = State(args.work / "state.json")
    pruned, prune_command = (args.pruned, "(given: --pruned)") if args.pruned else prune(args.work)
    models = {"dense": DENSE, "pruned": pruned}
    for name, spec in models.items():
        key = f"{name}/none|eval{args.eval_windows}"
        if state.get(key) is None:
            print(f"measuring {name} before fine-tuning", flush=True)
            state.put(key, measure(spec, args))
        print(f"{name}: {state.get(key)}", flush=True)
    for arm, kd_weight in runs(args.arms, args):
        key = arm_key(arm, kd_weight, args)
        if state.get(key) is None:
            tag = key.split("|eval")[0].replace("/", "-").replace("|", "_")
            print(f"fine-tuning {arm} ({key})", flush=True)
            trained = finetune(models[ARMS[arm][0]], kd_weight, args.work / tag, args)
            state.put(key, {**trained, **measure(trained["model_dir"], args)})
        print(f"{key}: {state.get(key)}", flush=True)
    write_results(args, state, prune_command)


def write_results(args: argparse.Namespace, state: State, prune_command: str) -> None:
    before = {name: state.get(f"{name}/none|eval{args.eval_windows}") for name in ("dense", "pruned")}
    after = {key: state.get(key) for key in (arm_key(arm, weight, args) for arm, weight in runs(list(ARMS), args))}
    dense_ce, pruned_ce = after[arm_key("dense/CE", None, args)], after[arm_key("pruned/CE", None, args)]
    rows = []

    def row(model: str, tune: str, measured: dict | None, same_budget: dict | None) -> None:
        if measured is None:
            return
        ratios = [_ratio(measured, reference, text) for reference in (same_budget, before["dense"]) for text in TEXTS]
        rows.append([model, tune, round(measured["wiki"], 2), round(measured["pydoc"], 2), *ratios, _seconds(measured)])

    row("dense", "none", before["dense"], before["dense"])
    row("dense", "CE", dense_ce, dense_ce)
    row("pruned 20 %", "none", before["pruned"], before["dense"])
    row("pruned 20 %", "CE", pruned_ce, dense_ce)
    for weight in args.kd_weight:
        # distilling the dense model from itself leaves it as it is: its "same fine-tune" is no fine-tune
        label = "KD" if weight == 1 else f"KD {weight:g} + CE {1 - weight:g}"
        row("pruned 20 %", label, after[arm_key("pruned/KD", weight, args)], before["dense"])
    tokens = args.steps * args.batch_size * args.seq_len
    results = {
        "title": "Recovery after pruning: CE vs. distillation at equal tokens, next to the dense model",
        "command": "nice -n 5 .venv/bin/python " + shlex.join(["benchmarks/recovery.py", *sys.argv[1:]]),
        "prune_command": prune_command,
        "machine": "2-core CPU, 24 GiB",
        "date": date.today().isoformat(),
        "notes": _notes(args, tokens),
        "tables": [
            {
                "caption": (
                    f"PPL before and after {tokens:,}-token fine-tunes (lower is better); x dense: PPL / dense PPL"
                ),
                "columns": [
                    "model",
                    "fine-tune",
                    "wiki-2 test PPL",
                    "pydoc PPL",
                    "x dense, same fine-tune (wiki)",
                    "x dense, same fine-tune (pydoc)",
                    "x untouched dense (wiki)",
                    "x untouched dense (pydoc)",
                    "fine-tune seconds",
                ],
                "rows": rows,
            }
        ],
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "measurements": {"before": before, "after": after},
        "python": platform.python_version(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1) + "\n")
    for r in rows:
        print(" | ".join("—" if v is None else str(v) for v in r))
    print(f"wrote {args.output}")


def _ratio(measured: dict, reference: dict | None, text: str) -> float | None:
    return round(measured[text] / reference[text], 3) if reference else None


def _seconds(measured: dict) -> int | None:
    return round(measured["seconds"]) if "seconds" in measured else None


def _notes(args: argparse.Namespace, tokens: int) -> str:
    weights = " and ".join(f"{w:g}" for w in args.kd_weight)
    kd = f"T={args.kd_temperature:g}, KD weight {weights}" + (f", top {args.kd_top_k} logits" if args.kd_top_k else "")
    return (
        f"SmolLM2-135M-Instruct and its default 20 % prune (107.6 M parameters). Every fine-tune: {args.steps} steps x"
        f" {args.batch_size} x {args.seq_len} tokens = {tokens:,} tokens of wikitext-2 *validation* (the same windows"
        f" for every arm), AdamW lr {args.lr:g}, {args.warmup_steps} warm-up steps then cosine, full fine-tune in fp32."
        f" KD: `--teacher smollm2-135m` ({kd}). PPL at seq_len {args.seq_len} over the first {args.eval_windows}"
        " windows of wikitext-2 *test* and of CPython's `pydoc_data.topics` (neither is seen in calibration or"
        ' training). "x dense, same fine-tune" divides by the dense model after the same budget: the CE-fine-tuned'
        " dense model for the CE rows, the untouched dense model for the rows without fine-tuning and for KD"
        " (distilling the dense model from itself leaves it unchanged). Seconds: the fine-tune only, on a 2-core CPU"
        " shared with other jobs." + (f" {args.note}" if args.note else "")
    )


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"{time.perf_counter() - started:.0f} s in all")
