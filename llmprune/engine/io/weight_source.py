"""Where a checkpoint's tensors are, and reading them one at a time without building the model.

safetensors files are read tensor by tensor (`safe_open`); `.bin`/`.pt` state
dicts through the loader's `weights_only=True` reader; a `.gguf` (and the
`smollm2-135m` alias) is dequantised once by the loader into a cached
safetensors directory, which is then read like any directory. Hub ids are
loaded as models and their parameters read.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.io.checkpoint import read_provenance
from llmprune.engine.io.checkpoint_file import holds_whole_module, normalise_key, read_state_dict
from llmprune.engine.io.models import ALIASES, LoadedModel, alias_path, convert_gguf, load_model, resolve_config

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass
class WeightSource:
    """A checkpoint's tensors and the config that describes them.

    config_role: "weights" (the config of these very tensors), "base" (the
    architecture they were pruned from) or "none" (no config found).
    """

    kind: str  # alias | gguf | directory | llmprune | safetensors | state_dict | pickle | hub
    source: str
    files: list[Path] = field(default_factory=list)
    config: dict | None = None
    config_role: str = "none"
    config_origin: str | None = None
    provenance: dict = field(default_factory=dict)
    loaded: LoadedModel | None = None  # when the tensors come from a model already in memory


def _read_json_config(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserInputError(f"{path} is not valid JSON ({error})", "restore the file or re-save the model") from None


def _directory_source(directory: Path, kind: str, source: str) -> WeightSource:
    files = sorted(directory.glob("*.safetensors")) or sorted(
        p for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file()
    )
    if not files:
        raise UserInputError(
            f"{directory} holds no weights (no .safetensors, .bin or .pt file)",
            "pass a model directory or a weights file",
        )
    config_path = directory / "config.json"
    config = _read_json_config(config_path) if config_path.is_file() else None
    provenance = read_provenance(directory)
    if provenance and kind == "directory":
        kind = "llmprune"
    return WeightSource(
        kind, source, files, config, "weights" if config else "none", str(config_path) if config else None, provenance
    )


def _base_config(path: Path, base_model: str | None) -> tuple[dict | None, str | None]:
    """The architecture a weights-only file is read against: --base-model, else a config.json beside it."""
    if base_model:
        config, _ = resolve_config(base_model)
        return config.to_dict(), f"--base-model {base_model}"
    beside = path.parent / "config.json"
    if beside.is_file():
        return _read_json_config(beside), str(beside)
    return None, None


def locate_weights(
    spec: str, *, base_model: str | None = None, trust_pickle: bool = False, placement: Any = None
) -> WeightSource:
    """Resolve `spec` (anything the loader accepts) to the tensors to scan; bad input raises UserInputError."""
    spec = str(spec).strip()
    path = Path(spec).expanduser()
    if spec in ALIASES:
        return _directory_source(convert_gguf(alias_path(spec)), "alias", spec)
    if path.is_dir():
        return _directory_source(path, "directory", str(path))
    if path.is_file() and path.stat().st_size == 0:
        raise UserInputError(f"{path} is empty", "re-save or re-download the checkpoint")
    if path.is_file() and path.suffix == ".gguf":
        return _directory_source(convert_gguf(path), "gguf", str(path))
    if path.is_file() and path.suffix in _PICKLE_SUFFIXES and trust_pickle and holds_whole_module(path):
        # a pickled module (LLM-Pruner's): its own config describes it, its tensors give each layer's shape
        loaded = load_model(spec, base_model=base_model, trust_pickle=True, placement=placement)
        return WeightSource(
            "pickle", str(path), [], loaded.model.config.to_dict(), "weights", "the pickled module's config", {}, loaded
        )
    if path.is_file() and path.suffix in (".safetensors", *_PICKLE_SUFFIXES):
        config, origin = _base_config(path, base_model)
        kind = "safetensors" if path.suffix == ".safetensors" else "state_dict"
        return WeightSource(kind, str(path), [path], config, "base" if config else "none", origin)
    # hub ids, and every other spec: the loader resolves it or says clearly what is wrong
    loaded = load_model(spec, base_model=base_model, trust_pickle=trust_pickle, placement=placement)
    return WeightSource(
        loaded.kind,
        loaded.source,
        [],
        loaded.model.config.to_dict(),
        "weights",
        "the model's config",
        loaded.provenance,
        loaded,
    )


def _safetensors_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    from llmprune.engine.io.safetensors_copy import read_tensors

    if path.stat().st_size == 0:
        raise UserInputError(f"{path} is empty", "re-save or re-download the checkpoint")
    try:
        handle = safe_open(str(path), framework="pt")  # validates the header and the file's length
    except Exception as error:  # safetensors raises its own error type for every kind of damage
        raise UserInputError(
            f"{path} is not a readable safetensors file ({error})",
            "the file is truncated or corrupt: re-save or re-download it",
        ) from None
    with handle:
        names = list(handle.keys())
    # read with plain reads, not through the mapping: mapped pages would count as resident next to the copy
    for name in names:
        yield normalise_key(name), read_tensors(path, [name])[name]


def iter_tensors(source: WeightSource, trust_pickle: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) one at a time; names normalised as the loader does (no 'module.' prefix)."""
    if source.loaded is not None:
        yield from source.loaded.model.named_parameters()
        return
    for path in source.files:
        if path.suffix == ".safetensors":
            yield from _safetensors_tensors(path)
        else:
            state_dict, _ = read_state_dict(path, trust_pickle)
            # a tied lm_head shares the embedding's storage: count it once, as named_parameters() does
            seen: set[tuple[int, tuple[int, ...]]] = set()
            for name, tensor in state_dict.items():
                key = (tensor.data_ptr(), tuple(tensor.shape))
                if tensor.numel() and key in seen:
                    continue
                seen.add(key)
                yield name, tensor
