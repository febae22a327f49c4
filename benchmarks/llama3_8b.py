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
    "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
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
            (p + "self_attn.q_proj.weight", (q, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, q)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (mlp, hidden)), (p + "mlp.up_proj.weight", (mlp, hidden)),
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
    (staging / index_path.name).write_text(json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
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
