"""Saving and reloading models in llmprune's format (safetensors, never pickle).

A saved directory holds the weights (safetensors), `config.json`, the
tokenizer, and `llmprune.json` (per-layer shapes and provenance: what was
pruned, from which base model, with which options, PPL before/after).

- Uniform shapes: a stock Llama config that any tool loads, no remote code.
- Non-uniform shapes: `config.layer_shapes` plus an `auto_map` to the
  `modeling_llmprune.py` copied alongside, so
  `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works.

Both are written atomically: an interrupted save leaves the previous
directory (or none) in place, never a half-written one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune._version import __version__
from llmprune.engine.core.paths import atomic_directory, atomic_write_json
from llmprune.engine.io.architecture import LayerShape, fits_stock_config, is_uniform, layer_shapes
from llmprune.engine.io.remote_code import modeling_llmprune

PROVENANCE_FILE = "llmprune.json"
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
REMOTE_CODE_FILE = "modeling_llmprune.py"
AUTO_MAP = {"AutoModelForCausalLM": "modeling_llmprune.LlmpruneLlamaForCausalLM"}


def _add_zero_bias(linear: nn.Linear) -> None:
    if linear.bias is None:
        linear.bias = nn.Parameter(
            torch.zeros(linear.out_features, dtype=linear.weight.dtype, device=linear.weight.device)
        )


def _make_stock_compatible(model: nn.Module, shape: LayerShape) -> None:
    """A stock Llama config has one bias flag for all of q/k/v/o (and one for gate/up/down).

    When pruning compensation added output biases, give the sibling projections
    zero biases so that the flag holds (describe_shapes sets it); this changes no output.
    """
    for layer in model.model.layers:
        if shape.o_proj_bias:
            for proj in (
                layer.self_attn.q_proj,
                layer.self_attn.k_proj,
                layer.self_attn.v_proj,
                layer.self_attn.o_proj,
            ):
                _add_zero_bias(proj)
        if shape.down_proj_bias:
            for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                _add_zero_bias(proj)


def make_stock_compatible(model: nn.Module) -> None:
    """Give a uniform model the zero sibling biases its stock config will demand (no-op otherwise).

    Done before counting parameters, so that reports count what transformers
    counts in the saved folder.
    """
    shapes = layer_shapes(model)
    if fits_stock_config(shapes, model.config.hidden_size):
        _make_stock_compatible(model, shapes[0])


def describe_shapes(config: Any, shapes: list[LayerShape]) -> None:
    """Make `config` describe these per-layer shapes: stock fields if uniform, else layer_shapes + auto_map.

    Uniform shapes with output biases also set attention_bias/mlp_bias; the
    sibling projections must then carry (zero) biases, see _make_stock_compatible.
    """
    for stale in ("layer_shapes", "auto_map"):
        if hasattr(config, stale):
            delattr(config, stale)
    if fits_stock_config(shapes, config.hidden_size):
        first = shapes[0]
        config.num_attention_heads = first.num_attention_heads
        config.num_key_value_heads = first.num_key_value_heads
        config.intermediate_size = first.intermediate_size
        config.head_dim = first.head_dim
        config.attention_bias = bool(config.attention_bias or first.o_proj_bias)
        config.mlp_bias = bool(getattr(config, "mlp_bias", False) or first.down_proj_bias)
    else:
        config.head_dim = shapes[0].head_dim
        config.layer_shapes = [shape.to_dict() for shape in shapes]
        config.auto_map = dict(AUTO_MAP)
    config.architectures = ["LlamaForCausalLM"]


def provenance_record(shapes: list[LayerShape], num_parameters: int, provenance: dict | None) -> dict:
    """The content of llmprune.json."""
    return {
        "llmprune_version": __version__,
        "uniform": is_uniform(shapes),
        "layer_shapes": [shape.to_dict() for shape in shapes],
        "num_parameters": num_parameters,
        **(provenance or {}),
    }


def stored_dtype(directory: str | Path) -> torch.dtype | None:
    """The floating dtype a directory's safetensors weights are stored in (the most common one), None if unknown."""
    from llmprune.engine.io.safetensors_copy import stored_dtype_names

    counts: dict[str, int] = {}
    for path in Path(directory).glob("*.safetensors"):
        try:
            names = stored_dtype_names(path)
        except Exception:  # an unreadable file is doctor's business, not the saver's
            continue
        for name in names.values():
            counts[name] = counts.get(name, 0) + 1
    floating = [name for name in sorted(counts, key=counts.get, reverse=True) if name in _SAFETENSORS_DTYPES]
    return _SAFETENSORS_DTYPES[floating[0]] if floating else None


def resolve_save_dtype(
    spec: str | torch.dtype | None, source_dtype: torch.dtype | None, model_dtype: torch.dtype
) -> torch.dtype:
    """--save-dtype: auto keeps the source's stored dtype (bf16 in -> bf16 out), else the model's own."""
    if isinstance(spec, torch.dtype):
        return spec
    if spec in (None, "auto"):
        return source_dtype or model_dtype
    if spec not in SAVE_DTYPES:
        from llmprune.engine.core.errors import UserInputError

        raise UserInputError(f"unknown --save-dtype '{spec}'", f"use one of {'|'.join(SAVE_DTYPES)}")
    return getattr(torch, spec)


def save_model(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    provenance: dict | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` (pruned or not) so that it reloads anywhere; returns the directory.

    `dtype`: the dtype of the saved weights (default: the model's); the model in
    memory is left as it is (a cast copy of its state dict is written).
    """
    out_dir = Path(out_dir)
    make_stock_compatible(model)
    shapes = layer_shapes(model)
    describe_shapes(model.config, shapes)
    record = provenance_record(shapes, sum(p.numel() for p in model.parameters()), provenance)
    model_dtype = next(model.parameters()).dtype
    dtype = dtype or model_dtype
    with atomic_directory(out_dir) as staging:
        if dtype == model_dtype:
            model.save_pretrained(staging, safe_serialization=True)
        else:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
            model.save_pretrained(staging, safe_serialization=True, state_dict=state)
            del state
            # save_pretrained writes the in-memory model's dtype into config.json: state the saved one
            config_path = staging / "config.json"
            written = json.loads(config_path.read_text(encoding="utf-8"))
            written["dtype"] = str(dtype).removeprefix("torch.")
            atomic_write_json(config_path, written)
        if not fits_stock_config(shapes, model.config.hidden_size):
            shutil.copyfile(modeling_llmprune.__file__, staging / REMOTE_CODE_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        atomic_write_json(staging / PROVENANCE_FILE, record)
    return out_dir


def read_provenance(directory: str | Path) -> dict:
    """The llmprune.json of a saved directory, or {} for a plain HF directory."""
    path = Path(directory) / PROVENANCE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def has_layer_shapes(config_dict: dict) -> bool:
    return bool(config_dict.get("layer_shapes"))


def model_class_for(config_dict: dict):
    """The class that builds this config: per-layer shapes need the llmprune subclass."""
    if has_layer_shapes(config_dict):
        return modeling_llmprune.LlmpruneLlamaForCausalLM
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM
