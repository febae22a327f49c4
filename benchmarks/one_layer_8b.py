"""One decoder layer at Llama-3-8B widths, pruned streamed with the default path: peak RSS and wall time.

    python benchmarks/one_layer_8b.py --label "this branch"      # builds /tmp/one_layer_8b once (~0.8 GB)

The whole 32-layer 8B-shaped prune (benchmarks/llama3_8b.py) takes half an hour or more; the pruning
core's memory and time are set by its widest matrices, which one layer already has: hidden 4096,
32 query / 8 KV heads of 128, MLP 14,336 (down_proj's augmented Hessian is 14,337²). The checkpoint
is built like llama3_8b.py's (random bf16 weights at std 0.02, written tensor by tensor) with
SmolLM2's 49,152-token vocabulary instead of 128,256, so that the embedding and head stay small.
The step is the `llmprune prune` a user types, with llama3_8b.py's calibration (4 windows × 64
tokens) and target (the parameters the 6.5B target removes from each of the 32 layers), run in
its own process under `/usr/bin/time -v`. Each run is recorded under its --label in
benchmarks/results/one_layer_8b.json, so the figures before and after a change sit side by side.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from llama3_8b import FULL_TARGET, GB, LLMPRUNE, _numel, _timed, _write_shard, model_config, tensor_shapes  # noqa: E402
from results_file import table, write_results  # noqa: E402
from shared_data import CALIBRATION_TEXT  # noqa: E402

VOCAB = 49152  # SmolLM2's tokenizer
RESULTS = REPO / "benchmarks" / "results" / "one_layer_8b.json"


def layer_config() -> dict:
    return dict(model_config(1, None), vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)


def target_params(config: dict) -> int:
    """The 1-layer model less what the 6.5B target removes from each layer of the 32-layer 8B model."""
    full = sum(_numel(shape) for _, shape in tensor_shapes(model_config(32, None)))
    total = sum(_numel(shape) for _, shape in tensor_shapes(config))
    return int(total - (full - FULL_TARGET) / 32)


def build(directory: Path) -> Path:
    """config.json, tokenizer, one shard and its index; kept when already complete."""
    from transformers import AutoTokenizer

    from llmprune.engine.io.models import alias_path, convert_gguf

    config = layer_config()
    if (directory / "config.json").is_file() and json.loads((directory / "config.json").read_text()) == config:
        return directory
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tensors = tensor_shapes(config)
    file = "model-00001-of-00001.safetensors"
    _write_shard(staging / file, tensors, seed=1)
    index = {
        "metadata": {"total_size": 2 * sum(_numel(shape) for _, shape in tensors)},
        "weight_map": {name: file for name, _ in tensors},
    }
    (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    AutoTokenizer.from_pretrained(str(convert_gguf(alias_path("smollm2-135m")))).save_pretrained(staging)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)
    return directory


def record(runs: dict, command: str) -> None:
    """benchmarks/results/one_layer_8b.json: one row per labelled run."""
    rows = [
        [
            label,
            r["exit_code"],
            r["seconds"],
            r.get("cpu_seconds"),
            round(r["peak_rss_bytes"] / GB, 2) if r["peak_rss_bytes"] else None,
            ", ".join(f"{k} {v / GB:.2f}" for k, v in (r.get("peak_rss_by_phase") or {}).items()) or None,
            f"{r['params_before']:,} -> {r['params_after']:,}" if r.get("params_after") else None,
            ", ".join(f"{k}: {v}" for k, v in (r.get("compensation") or {}).items()) or None,
        ]
        for label, r in runs.items()
    ]
    write_results(
        "one_layer_8b",
        title="One decoder layer at Llama-3-8B widths, pruned streamed (the pruning core's quick check)",
        command=f"python benchmarks/one_layer_8b.py --label LABEL  # runs: {command}",
        notes=(
            "One Llama-3-8B-Instruct decoder layer (hidden 4096, 32 query / 8 KV heads of 128, MLP 14,336) with a"
            " 49,152-token vocabulary, random bf16 weights, built by the script; `llmprune prune --stream` with the"
            " default scores and compensation, 4 × 64 calibration tokens of wikitext-2 validation, the parameters"
            " the 6.5B target removes per layer of the 32-layer model. One process under `/usr/bin/time -v` on a"
            " machine shared with other jobs: wall times vary with the load (the two runs below ran with a load"
            " average of 8-13 on 2 cores), CPU seconds (user + system) much less. Run it after every change to the"
            " pruning core: the 32-layer figures of llama3_8b.py scale from it (about 32 × the per-layer work)."
        ),
        tables=[
            table(
                "Each run: wall time and peak RSS of the whole `llmprune prune` process",
                [
                    "run",
                    "exit",
                    "seconds",
                    "CPU seconds",
                    "peak RSS (GB)",
                    "peak by phase (GB)",
                    "parameters",
                    "compensation",
                ],
                rows,
            )
        ],
        runs=runs,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/one_layer_8b"), help="outside the repository")
    parser.add_argument("--label", default="this checkout", help="the row this run is recorded under")
    parser.add_argument(
        "--refit-samples", type=int, default=None, help="windows for the refit (default: the prune's own choice)"
    )
    parser.add_argument(
        "--residual-correction", type=float, default=None, help="prune --residual-correction (default: the prune's)"
    )
    args = parser.parse_args()
    model_dir = build(args.dir / "model")
    config = json.loads((model_dir / "config.json").read_text())
    out = args.dir / "pruned"
    shutil.rmtree(out, ignore_errors=True)
    command = [
        LLMPRUNE,
        "prune",
        str(model_dir),
        "--target-params",
        str(target_params(config)),
        "--stream",
        "--save-model",
        "--out",
        str(out),
        "--log-dir",
        str(args.dir / "log"),
        "--dataset",
        CALIBRATION_TEXT,
        "--importance-samples",
        "4",
        "--seq-len",
        "64",
        *(["--refit-samples", str(args.refit_samples)] if args.refit_samples else []),
        *(["--residual-correction", str(args.residual_correction)] if args.residual_correction is not None else []),
        "--json",
    ]
    row = _timed("prune", command, args.dir / "logs")
    pruned = row["output"] or {}
    # CPU seconds (user + system) say what the work costs on a machine shared with other jobs, where wall time varies
    log = (args.dir / "logs" / "prune.err").read_text()
    cpu = sum(float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", log))
    layers = pruned.get("layers") or [{}]
    run = {
        "exit_code": row["exit_code"],
        "seconds": row["seconds"],
        "cpu_seconds": round(cpu, 1),
        "peak_rss_bytes": row["peak_rss_bytes"],
        "peak_rss_by_phase": pruned.get("peak_rss_by_phase"),
        "params_before": pruned.get("params_before"),
        "params_after": pruned.get("params_after"),
        "compensation": layers[0].get("compensation") if isinstance(layers[0], dict) else None,
        "command": " ".join(command).replace(str(args.dir), "DIR").replace(LLMPRUNE, "llmprune"),
    }
    previous = json.loads(RESULTS.read_text()).get("runs", {}) if RESULTS.is_file() else {}
    record({**previous, args.label: run}, run["command"])
    print(json.dumps(run, indent=1))


if __name__ == "__main__":
    main()
