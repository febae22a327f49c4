"""Llama-3-8B-shaped checkpoint on a machine smaller than the model: every step's wall time and peak RSS.

    python benchmarks/llama3_8b.py --dir /work/big-models            # build once (16 GB), then run the steps
    python benchmarks/llama3_8b.py --dir /tmp/small --layers 2        # the same widths, 2 layers (~2.9 GB)
    python benchmarks/llama3_8b.py --dir /work/big-models --rope-scaling llama3 --layers 4   # 3.1-style config

No model hub is reachable, so the checkpoint is built: Llama-3-8B-Instruct's exact config.json
(32 layers, hidden 4096, 32 query / 8 KV heads, head_dim 128, MLP 14,336, untied 128,256-token
vocabulary, rope θ 500,000), random weights at a realistic scale (std 0.02, norms 1), bf16
sharded safetensors with an index, written tensor by tensor (never the whole model, nor a whole
shard, in memory), and SmolLM2's tokenizer (its ids fit the vocabulary). `--rope-scaling llama3`
writes Llama-3.1-8B-Instruct's config instead (rope_scaling of type llama3, 128 k positions).

Every step is the `llmprune` command a user types, run in its own process under
`/usr/bin/time -v` (peak RSS = its maximum resident set size); the figures go to
benchmarks/results/llama3_8b.json (or --results).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from shared_data import CALIBRATION_TEXT, EVALUATION_TEXT  # noqa: E402

LLAMA3_8B_INSTRUCT = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}
# what Llama-3.1-8B-Instruct's config.json changes
LLAMA31_CHANGES = {
    "eos_token_id": [128001, 128008, 128009],
    "max_position_embeddings": 131072,
    "rope_scaling": {
        "factor": 8.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "transformers_version": "4.43.0.dev0",
}
SHARDS = 4  # as on the hub: model-0000k-of-00004.safetensors
GB = 1e9


# ------------------------------------------------------------------ building the checkpoint


def model_config(layers: int, rope_scaling: str | None) -> dict:
    config = dict(LLAMA3_8B_INSTRUCT, num_hidden_layers=layers)
    if rope_scaling == "llama3":
        config.update(LLAMA31_CHANGES)
    return config


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint in hub order (embedding, layers, norm, head)."""
    hidden, mlp, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    names = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (q, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, q)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (mlp, hidden)),
            (p + "mlp.up_proj.weight", (mlp, hidden)),
            (p + "mlp.down_proj.weight", (hidden, mlp)),
        ]
    return names + [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _split_shards(tensors: list[tuple[str, tuple[int, ...]]], shards: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors, about equal bytes per shard."""
    total = sum(_numel(shape) for _, shape in tensors)
    groups: list[list] = [[]]
    done = 0
    for name, shape in tensors:
        if done >= total * len(groups) / shards and len(groups) < shards:
            groups.append([])
        groups[-1].append((name, shape))
        done += _numel(shape)
    return groups


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    """One bf16 safetensors file, written tensor by tensor (the header is known before any data)."""
    import torch

    header, offset = {}, 0
    for name, shape in tensors:
        size = _numel(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name, shape in tensors:
            if name.endswith("norm.weight"):
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:  # a row at a time would be slow; a whole matrix is at most 2 GB in fp32 (the embedding)
                tensor = torch.randn(shape, generator=generator).mul_(0.02).to(torch.bfloat16)
            out.write(tensor.view(torch.int16).numpy().tobytes())
            del tensor


def build_checkpoint(directory: Path, layers: int, rope_scaling: str | None) -> None:
    """config.json, tokenizer, shards and index; skipped when the directory is already complete."""
    from transformers import AutoTokenizer

    from llmprune.engine.io.models import alias_path, convert_gguf

    config = model_config(layers, rope_scaling)
    index_path = directory / "model.safetensors.index.json"
    if index_path.is_file() and json.loads((directory / "config.json").read_text()) == config:
        return
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    tensors = tensor_shapes(config)
    groups = _split_shards(tensors, SHARDS)
    weight_map = {}
    for number, group in enumerate(groups, start=1):
        file = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        _write_shard(staging / file, group, seed=number)
        weight_map.update({name: file for name, _ in group})
    total_size = 2 * sum(_numel(shape) for _, shape in tensors)
    (staging / index_path.name).write_text(
        json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2)
    )
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    AutoTokenizer.from_pretrained(str(convert_gguf(alias_path("smollm2-135m")))).save_pretrained(staging)
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


def link_weights(source: Path, directory: Path, config: dict) -> None:
    """The same weights under another config.json (hard links: no second copy on disk)."""
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in source.iterdir():
        if path.name != "config.json":
            os.link(path, staging / path.name)
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(directory, ignore_errors=True)
    staging.rename(directory)


def checkpoint_for(root: Path, layers: int, rope_scaling: str | None) -> Path:
    """Build (or find) the checkpoint; a 3.1-style one shares the 3-style one's weights."""
    plain = root / f"llama3-8b-{layers}L"
    build_checkpoint(plain, layers, None)
    if rope_scaling is None:
        return plain
    variant = root / f"llama3.1-8b-{layers}L"
    config = model_config(layers, rope_scaling)
    if not (variant / "config.json").is_file() or json.loads((variant / "config.json").read_text()) != config:
        link_weights(plain, variant, config)
    return variant


# ------------------------------------------------------------------ running the steps

LLMPRUNE = str(Path(sys.executable).with_name("llmprune"))
FULL_TARGET = 6.5e9  # the target for the 32-layer model; smaller variants remove the same per layer


def _target_params(config: dict) -> str:
    """--target-params: 6.5B for 32 layers; with fewer layers, the same parameters removed per layer."""
    full = sum(_numel(shape) for _, shape in tensor_shapes(dict(config, num_hidden_layers=32)))
    total = sum(_numel(shape) for _, shape in tensor_shapes(config))
    return (
        "6.5B"
        if config["num_hidden_layers"] == 32
        else str(int(total - (full - FULL_TARGET) * config["num_hidden_layers"] / 32))
    )


def _timed(name: str, command: list[str], log: Path) -> dict:
    """Run one step under /usr/bin/time -v: wall seconds, peak RSS, exit code, its --json output."""
    log.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    done = subprocess.run(
        ["nice", "-n", "5", "/usr/bin/time", "-v", *command],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    seconds = time.perf_counter() - started
    (log / f"{name}.out").write_text(done.stdout)
    (log / f"{name}.err").write_text(done.stderr)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    try:
        output = json.loads(done.stdout) if done.stdout.strip().startswith("{") else None
    except json.JSONDecodeError:
        output = None
    row = {
        "step": name,
        "command": " ".join(command),
        "exit_code": done.returncode,
        "seconds": round(seconds, 1),
        "peak_rss_bytes": int(peak.group(1)) * 1024 if peak else None,
        "output": output,
    }
    print(
        f"{name:<22} exit {done.returncode}  {seconds:7.1f} s  peak RSS"
        f" {row['peak_rss_bytes'] / GB if peak else float('nan'):.2f} GB",
        flush=True,
    )
    return row


def _du(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = torch.arange(1, 17)[None]
with torch.no_grad():
    logits = model(input_ids=ids).logits
dtype, finite = str(next(model.parameters()).dtype), str(bool(torch.isfinite(logits).all())).lower()
print('{"dtype": "%s", "finite": %s, "shape": %s}' % (dtype, finite, list(logits.shape)))
"""


def run_steps(model_dir: Path, work: Path, reload: bool, record, only: set[str] | None = None) -> dict:
    """Every step on `model_dir` (the pruned model goes to work/pruned); `record(run)` after each step.

    `only`: the names of the steps to run (e.g. {"prune"}: the pruning core's figure alone); None runs all.

    The order puts what the memory targets are about first (prune, eval, export), so that an
    interrupted run on a busy machine still has them.
    """
    config = json.loads((model_dir / "config.json").read_text())
    out, log, gguf = work / "pruned", work / "logs", work / "pruned.gguf"
    shutil.rmtree(out, ignore_errors=True)
    calib = ["--dataset", CALIBRATION_TEXT, "--importance-samples", "4", "--seq-len", "64"]
    # analyze's default plan protects the first and last layer: a 2- or 3-layer variant needs all layers prunable
    plan = ["--layer-start", "0"] if config["num_hidden_layers"] < 4 else []
    steps = [
        ("doctor", [LLMPRUNE, "doctor", str(model_dir), "--json"]),
        (
            "prune",
            [
                LLMPRUNE,
                "prune",
                str(model_dir),
                "--target-params",
                _target_params(config),
                "--stream",
                "--save-model",
                "--out",
                str(out),
                "--log-dir",
                str(work / "prune_log"),
                *calib,
                "--json",
            ],
        ),
        (
            "eval (pruned)",
            [LLMPRUNE, "eval", str(out), "--stream", "--max-windows", "2", "--dataset", EVALUATION_TEXT, "--json"],
        ),
        ("export --gguf", [LLMPRUNE, "export", str(out), "--gguf", str(gguf), "--json"]),
        ("doctor --test-forward", [LLMPRUNE, "doctor", str(out), "--test-forward", "--stream", "--json"]),
        (
            "eval (source)",
            [
                LLMPRUNE,
                "eval",
                str(model_dir),
                "--stream",
                "--max-windows",
                "2",
                "--dataset",
                EVALUATION_TEXT,
                "--json",
            ],
        ),
        (
            "analyze",
            [
                LLMPRUNE,
                "analyze",
                str(model_dir),
                "--importance-method",
                "block-influence",
                "--stream",
                *calib,
                *plan,
                "--output",
                str(work / "layer_importance_config.json"),
                "--json",
            ],
        ),
    ]
    if reload:  # the whole pruned model in memory: only for the few-layer variants on this machine
        steps.append(("transformers reload", [sys.executable, "-c", RELOAD, str(out)]))
    if only is not None:
        steps = [(name, command) for name, command in steps if name in only]
    run = {
        "layers": config["num_hidden_layers"],
        "rope_scaling": config.get("rope_scaling"),
        "steps": [],
        "source_bytes": _du(model_dir),
    }
    for name, command in steps:
        row = _timed(name, command, log)
        run["steps"].append(row)
        if name == "prune":
            pruned = row["output"] or {}
            run.update({key: pruned.get(key) for key in ("params_before", "params_after", "gqa", "peak_rss_by_phase")})
            run["pruned_bytes"] = _du(out) if out.is_dir() else None
            run["pruned_dtype"] = json.loads((out / "config.json").read_text()).get("dtype") if out.is_dir() else None
        if name.startswith("export"):
            run["gguf_bytes"] = gguf.stat().st_size if gguf.is_file() else None
            gguf.unlink(missing_ok=True)  # measured; its GBs of disk are better left free
        record(run)
    return run


def _figure(row: dict) -> str:
    """The one figure a step is run for."""
    out = row["output"] or {}
    if row["step"].startswith("eval"):
        return (
            f"PPL {out.get('ppl', float('nan')):.4g} ({out.get('windows')} windows × {out.get('seq_len')} tokens)"
            if out
            else ""
        )
    if row["step"].startswith("doctor"):
        forward = out.get("forward")
        return (
            ("healthy" if out.get("ok") else "UNHEALTHY") + (f"; forward ok: {forward.get('ok')}" if forward else "")
            if out
            else ""
        )
    if row["step"] == "prune" and out:
        return f"{out['params_before'] / 1e9:.3f} B -> {out['params_after'] / 1e9:.3f} B parameters; {out['gqa']}"
    if row["step"].startswith("export") and out:
        return ", ".join(f"{k}: {v}" for k, v in out.items() if k in ("architecture", "tensors", "outtype", "bytes"))
    if row["step"] == "transformers reload" and out:
        return f"{out['dtype']}, finite logits: {out['finite']}"
    return ""


def results_document(runs: dict, command: str) -> dict:
    tables = []
    for key, run in runs.items():
        rows = [
            [
                r["step"],
                r["exit_code"],
                r["seconds"],
                round(r["peak_rss_bytes"] / GB, 2) if r["peak_rss_bytes"] else None,
                _figure(r),
                "`" + r["command"].replace(str(Path(r["command"].split()[0]).parent) + "/", "") + "`",
            ]
            for r in run["steps"]
        ]
        tables.append(
            {
                "caption": f"{key}: each step's wall time and peak RSS (/usr/bin/time -v)",
                "columns": ["step", "exit", "seconds", "peak RSS (GB)", "result", "command"],
                "rows": rows,
            }
        )
        phases = run.get("peak_rss_by_phase") or {}
        size_rows = [
            [
                "parameters",
                f"{run['params_before']:,}" if run.get("params_before") else None,
                f"{run['params_after']:,}" if run.get("params_after") else None,
            ],
            [
                "weights on disk (GB)",
                round(run["source_bytes"] / GB, 2),
                round(run["pruned_bytes"] / GB, 2) if run.get("pruned_bytes") else None,
            ],
            ["dtype on disk", "bfloat16", run.get("pruned_dtype")],
            [
                "GGUF export of the pruned model (GB, f16)",
                None,
                round(run["gguf_bytes"] / GB, 2) if run.get("gguf_bytes") else None,
            ],
        ]
        size_rows += [
            [f"prune peak RSS, phase {name} (GB)", None, round(peak / GB, 2)] for name, peak in phases.items()
        ]
        tables.append({"caption": f"{key}: source vs. pruned", "columns": ["", "source", "pruned"], "rows": size_rows})
    return {
        "title": "Llama-3-8B-shaped checkpoint on a 2-core, 24 GiB machine",
        "command": command,
        "machine": "2-core CPU, 24 GiB (shared)",
        "date": date.today().isoformat(),
        "notes": (
            "A random checkpoint with Llama-3-8B-Instruct's exact config.json (bf16, sharded safetensors with an index,"
            " 16 GB; its fp32 copy would not fit this machine), built by the script. Every step is the `llmprune`"
            " command, run alone under `nice -n 5 /usr/bin/time -v` on a machine shared with other jobs (wall times"
            " vary with the load). Calibration: 4 windows × 64 tokens of wikitext-2 validation; evaluation: 2 windows ×"
            " 2048 tokens of wikitext-2 test (the PPL of random weights is near the vocabulary size: the figure shows"
            " the streamed path runs, not quality). Variants with fewer layers keep every width and remove the same"
            " parameters per layer."
        ),
        "tables": tables,
        "runs": runs,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dir", type=Path, required=True, help="where the checkpoint and the outputs go (outside the repository)"
    )
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument(
        "--rope-scaling", choices=["llama3"], default=None, help="Llama-3.1-style config (rope_scaling of type llama3)"
    )
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument(
        "--steps", default=None, help="comma-separated step names to run (e.g. prune), recorded as a run of their own"
    )
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results" / "llama3_8b.json")
    args = parser.parse_args()
    model_dir = checkpoint_for(args.dir, args.layers, args.rope_scaling)
    if args.build_only:
        return
    key = f"{'Llama-3.1' if args.rope_scaling else 'Llama-3'}-8B shape, {args.layers} layers"
    only = {name.strip() for name in args.steps.split(",")} if args.steps else None
    if only:
        key += f", {', '.join(sorted(only))} only ({date.today().isoformat()})"
    command = "python benchmarks/llama3_8b.py " + " ".join(
        a.replace(str(args.dir), "DIR") for a in sys.argv[1:] if not a.startswith("--results")
    )

    def record(run: dict) -> None:
        previous = json.loads(args.results.read_text()) if args.results.is_file() else {}
        runs = {**previous.get("runs", {}), key: run}
        commands = {**previous.get("commands", {}), key: command}
        document = results_document(runs, "; ".join(commands.values()))
        document["commands"] = commands
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(document, indent=1) + "\n")

    run_steps(model_dir, args.dir / "runs" / model_dir.name, reload=args.layers <= 4, record=record, only=only)


if __name__ == "__main__":
    main()
