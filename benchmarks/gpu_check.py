"""The steps of benchmarks/gpu_check.sh: every one a `llmprune` command, timed, with its peak memory.

Peak memory: the process's peak RSS (/usr/bin/time -v) for every step, and on CUDA the peak
allocated GPU memory where the command reports it (prune's peak_memory_bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from llama3_8b import GB, LLMPRUNE, _target_params, _timed, checkpoint_for  # noqa: E402
from shared_data import CALIBRATION_TEXT, EVALUATION_TEXT  # noqa: E402

# (eval windows × seq_len, calibration windows, fine-tuning steps, 8B-shaped layers) per device
SIZES = {
    "cuda": {"eval_windows": 64, "seq_len": 512, "calib": 64, "steps": 50, "batch": 8, "layers": 32},
    "cpu": {"eval_windows": 4, "seq_len": 128, "calib": 8, "steps": 4, "batch": 2, "layers": 2},
}


def steps(device: str, work: Path, big: Path) -> list[tuple[str, list[str]]]:
    size = SIZES[device]
    dtype = ["--device", device, "--dtype", "bfloat16" if device == "cuda" else "float32"]
    pruned = work / "smollm2-pruned"
    train = [
        "--dataset",
        CALIBRATION_TEXT,
        "--samples",
        str(size["steps"] * size["batch"]),
        "--batch-size",
        str(size["batch"]),
        "--seq-len",
        str(size["seq_len"]),
        "--lr",
        "2e-5",
        "--save-every",
        "1000",
        "--no-tui",
        "--json",
    ]
    big_config = json.loads((big / "config.json").read_text())
    return [
        (
            "eval smollm2",
            [
                LLMPRUNE,
                "eval",
                "smollm2-135m",
                "--dataset",
                EVALUATION_TEXT,
                "--seq-len",
                str(size["seq_len"]),
                "--max-windows",
                str(size["eval_windows"]),
                "--batch-size",
                str(size["batch"]),
                *dtype,
                "--json",
            ],
        ),
        (
            "prune smollm2",
            [
                LLMPRUNE,
                "prune",
                "smollm2-135m",
                "--target-params",
                "0.8",
                "--no-stream",
                "--dataset",
                CALIBRATION_TEXT,
                "--importance-samples",
                str(size["calib"]),
                "--out",
                str(pruned),
                "--log-dir",
                str(work / "prune_log"),
                *dtype,
                "--json",
            ],
        ),
        (
            "finetune full",
            [LLMPRUNE, "finetune", str(pruned), "--method", "full", "--out", str(work / "ft-full"), *train, *dtype],
        ),
        (
            "finetune lora",
            [
                LLMPRUNE,
                "finetune",
                str(pruned),
                "--method",
                "lora",
                "--lr",
                "2e-4",
                "--out",
                str(work / "ft-lora"),
                *train,
                *dtype,
            ],
        ),
        *fsdp_steps(device, pruned, work, train),
        (
            "streamed prune 8B-shaped",
            [
                LLMPRUNE,
                "prune",
                str(big),
                "--target-params",
                _target_params(big_config),
                "--stream",
                "--dataset",
                CALIBRATION_TEXT,
                "--importance-samples",
                "4",
                "--seq-len",
                "64",
                "--out",
                str(work / "big-pruned"),
                "--log-dir",
                str(work / "prune_log"),
                *dtype,
                "--json",
            ],
        ),
        *plan_steps(work / "big-pruned", dtype),
    ]


# a dry run's exit code says whether the plan fits (0) or not (1): both are answers, not failures
PLAN_PREFIX = "plan "


def plan_steps(model: Path, dtype: list[str]) -> list[tuple[str, list[str]]]:
    """The memory plan of fine-tuning the pruned 8B-shaped model (6.5 B at 32 layers) on this device: full,
    full with gradient checkpointing, LoRA; micro-batch 1 x 2048 tokens (`finetune --dry-run` loads nothing)."""
    base = [LLMPRUNE, "finetune", str(model), "--dry-run", "--json", "--dataset", CALIBRATION_TEXT, "--seq-len", "2048"]
    return [
        (f"{PLAN_PREFIX}8B-pruned full", [*base, *dtype]),
        (f"{PLAN_PREFIX}8B-pruned full + gradient checkpointing", [*base, "--gradient-checkpointing", *dtype]),
        (f"{PLAN_PREFIX}8B-pruned lora", [*base, "--method", "lora", *dtype]),
    ]


def fsdp_steps(device: str, model: Path, work: Path, train: list[str]) -> list[tuple[str, list[str]]]:
    """A short FSDP fine-tune of the pruned SmolLM2 over every GPU, when there are two or more."""
    import torch

    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if gpus < 2:
        return []
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    return [
        (
            f"finetune fsdp x{gpus}",
            [
                accelerate,
                "launch",
                "--config_file",
                str(REPO / "accelerate" / "fsdp.yaml"),
                "--num_processes",
                str(gpus),
                "-m",
                "llmprune",
                "finetune",
                str(model),
                "--out",
                str(work / "ft-fsdp"),
                "--gradient-checkpointing",
                *train,
            ],
        )
    ]


def summary(name: str, output: dict | None) -> str:
    if not output:
        return ""
    if "ppl" in output:
        return f"PPL {output['ppl']:.3f}"
    if "params_after" in output:
        return (
            f"{output['params_before']:,} -> {output['params_after']:,} parameters; peak"
            f" {output['peak_memory_bytes'] / GB:.2f} GB"
        )
    if output.get("status") == "dry_run" and output.get("memory_plan"):
        plan = output["memory_plan"]
        free = plan["available_bytes"]
        return (
            f"plan {plan['needed_bytes'] / GB:.1f} GB of {'?' if free is None else f'{free / GB:.1f}'} GB free:"
            f" {'fits' if plan['fits'] else 'does not fit'}"
            + (f"; would fit: {plan['fixes'][0]['change']}" if plan["fixes"] else "")
        )
    if "status" in output:
        return f"{output['status']}, {output['steps']} steps, loss {output.get('final_loss')}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(SIZES), default="cuda")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("LLMPRUNE_BIG_DIR", "/tmp/llmprune-big")))
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    size = SIZES[args.device]
    big = checkpoint_for(args.work, size["layers"], None)
    work = args.work / f"gpu-check-{args.device}"
    shutil.rmtree(work, ignore_errors=True)
    rows = [_timed(name, command, work / "logs") for name, command in steps(args.device, work, big)]
    results = args.results or REPO / "benchmarks" / "results" / f"gpu_check_{args.device}.json"
    document = {
        "title": f"gpu_check.sh on {args.device}",
        "command": "benchmarks/gpu_check.sh" + ("" if args.device == "cuda" else f" --device {args.device}"),
        "machine": "2-core CPU, 24 GiB (shared)" if args.device == "cpu" else "one CUDA GPU",
        "date": date.today().isoformat(),
        "notes": (
            f"Sizes on {args.device}: {size}. The 8B-shaped model is Llama-3-8B-Instruct's config with {size['layers']}"
            " layers (random bf16 weights, built by benchmarks/llama3_8b.py). Peak RSS from /usr/bin/time -v; prune"
            " also reports its own peak (GPU memory on CUDA)."
        ),
        "tables": [
            {
                "caption": f"each step on {args.device}",
                "columns": ["step", "exit", "seconds", "peak RSS (GB)", "result"],
                "rows": [
                    [
                        r["step"],
                        r["exit_code"],
                        r["seconds"],
                        round(r["peak_rss_bytes"] / GB, 2) if r["peak_rss_bytes"] else None,
                        summary(r["step"], r["output"]),
                    ]
                    for r in rows
                ],
            }
        ],
        "steps": rows,
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(document, indent=1) + "\n")
    sys.exit(max(0 if r["step"].startswith(PLAN_PREFIX) and r["exit_code"] == 1 else r["exit_code"] for r in rows))


if __name__ == "__main__":
    main()
