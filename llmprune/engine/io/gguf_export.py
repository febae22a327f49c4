"""`llmprune export`: any model llmprune reads, pruned or not, as one GGUF file for llama.cpp.

Uniform models are written as llama.cpp's `llama` architecture. Models whose
layers differ (non-uniform pruning) use `deci`, the architecture llama.cpp
built for NVIDIA's pruned Nemotron-NAS models: it reads head_count,
head_count_kv and feed_forward_length as per-layer arrays and builds each
layer with its own shapes, with optional attn_output/ffn_down biases (where
pruning compensation puts its biases). Metadata keys, tensor names and the
tokenizer follow llama.cpp's convert_hf_to_gguf.py for Llama.

Memory: a directory of safetensors (llmprune's own format, and what `.gguf`
inputs and the smollm2-135m alias are converted to) is streamed: tensor shapes
come from the file headers and each tensor is read, converted and written a
slice at a time. Other inputs (pickles, `.bin` state dicts, hub ids) are built
as a model first.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.paths import atomic_file, remove_stale_staging
from llmprune.engine.core.progress import CountProgress
from llmprune.engine.io.gguf_tensors import Entry, LayerDims, declare, layer_dims, plan_tensors, write_data
from llmprune.engine.io.tensor_store import SafetensorsStore, StateDictStore, TensorStore
from llmprune.engine.io.tokenizer_gguf import write_tokenizer

OUTTYPES = ("f32", "f16", "bf16", "q8_0")
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}  # llama.cpp's LlamaFileType


@dataclass
class ExportConfig:
    """What to export, and how."""

    model: str
    out: str
    outtype: str = "f16"  # f32 | f16 | bf16 | q8_0 (1-D tensors always f32)
    base_model: str | None = None  # architecture of a weights-only file
    trust_pickle: bool = False  # allow a whole pickled module (LLM-Pruner's pytorch_model.bin)
    overwrite: bool = False  # replace an existing GGUF file at `out`

    def validate(self) -> None:
        if self.outtype not in OUTTYPES:
            raise UserInputError(
                f"--outtype must be one of {', '.join(OUTTYPES)}, got '{self.outtype}'", "use --outtype f16"
            )
        if not str(self.out).endswith(".gguf"):
            raise UserInputError(f"the output file must end in .gguf, got '{self.out}'", "e.g. --gguf model.gguf")
        out = Path(self.out).expanduser()
        if out.is_dir():
            raise UserInputError(f"{out} is a directory", "name a .gguf file")
        from llmprune.engine.core.outputs import check_output_file

        # an existing GGUF file is replaced only with --overwrite; any other file never
        check_output_file(out, option="--gguf", ours=_is_gguf(out), overwrite=self.overwrite)


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


@dataclass
class ExportResult:
    """What was written."""

    path: str
    architecture: str  # llama | deci
    outtype: str
    tensors: int
    bytes: int
    parameters: int  # values in the file, padding included
    layers: list[dict]
    padded_layers: list[int] = field(default_factory=list)
    f16_fallbacks: list[str] = field(default_factory=list)
    not_exported: list[str] = field(default_factory=list)
    tokenizer: dict = field(default_factory=dict)
    streamed: bool = True
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Source:
    store: TensorStore
    config: dict
    tokenizer: Any
    streamed: bool


def _open_source(config: ExportConfig) -> _Source:
    """Tensors, config and tokenizer of the model spec, streamed where the format allows it."""
    import json

    from llmprune.engine.core.device import choose_placement
    from llmprune.engine.io.models import ALIASES, _load_tokenizer, alias_path, convert_gguf, load_model

    spec = str(config.model).strip()
    path = Path(spec).expanduser()
    directory = None
    if spec in ALIASES:
        directory = convert_gguf(alias_path(spec))
    elif path.is_file() and path.suffix == ".gguf":
        directory = convert_gguf(path)
    elif path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        directory = path
    if directory is not None:
        config_dict = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        store = SafetensorsStore(sorted(directory.glob("*.safetensors")))
        return _Source(store, config_dict, _load_tokenizer(directory), streamed=True)
    loaded = load_model(
        spec,
        base_model=config.base_model,
        trust_pickle=config.trust_pickle,
        placement=choose_placement("cpu", "float32"),
    )
    return _Source(
        StateDictStore(loaded.model.state_dict()), loaded.model.config.to_dict(), loaded.tokenizer, streamed=False
    )


def _rope(config: dict) -> tuple[float, dict]:
    """(rope theta, scaling parameters or {}) from either the transformers 4 or 5 config layout."""
    parameters = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    theta = config.get("rope_theta", parameters.get("rope_theta", 10000.0))
    merged = {**parameters, **scaling}
    kind = merged.get("rope_type", merged.get("type", "default"))
    return float(theta), ({} if kind in (None, "default") else {**merged, "rope_type": kind})


def llama3_rope_factors(theta: float, head_dim: int, scaling: dict) -> torch.Tensor:
    """Per-frequency divisors of Llama-3.1 rope scaling, as the converter writes `rope_freqs`."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = scaling.get("factor", 8.0)
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def _write_hyperparameters(
    writer: Any, config: dict, dims: list[LayerDims], head_dim: int, outtype: str, name: str
) -> None:
    import gguf

    uniform = len(set(dims)) == 1
    per_layer = (lambda values: values[0]) if uniform else list
    writer.add_type("model")
    writer.add_name(name)
    writer.add_block_count(len(dims))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_feed_forward_length(per_layer([d.ffn for d in dims]))
    writer.add_head_count(per_layer([d.heads for d in dims]))
    writer.add_head_count_kv(per_layer([d.kv_heads for d in dims]))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    writer.add_file_type(_FILE_TYPES[outtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_entries(writer: Any, config: dict, head_dim: int) -> list[Entry]:
    """Rope keys; Llama-3.1 scaling becomes a `rope_freqs` tensor, as in the converter."""
    import gguf

    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    kind = scaling.get("rope_type")
    if not kind:
        return []
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        return []
    if kind == "llama3":
        factors = llama3_rope_factors(theta, head_dim, scaling)
        return [Entry("rope_freqs.weight", tuple(factors.shape), gguf.GGMLQuantizationType.F32, constant=factors)]
    raise UserInputError(
        f"rope scaling '{kind}' is not supported by the GGUF export",
        "export a model with default, linear or llama3 rope",
    )


def _head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def export_gguf(config: ExportConfig, progress: CountProgress | None = None) -> ExportResult:
    """Write the model as a GGUF file (atomically: an interrupted export leaves no partial file)."""
    import gguf

    config.validate()
    start = time.perf_counter()
    source = _open_source(config)
    model_config = source.config
    head_dim = _head_dim(model_config)
    dims, padded = layer_dims(source.store, int(model_config["num_hidden_layers"]), head_dim)
    architecture = "llama" if len(set(dims)) == 1 and not padded else "deci"
    tied = bool(model_config.get("tie_word_embeddings", False)) or "lm_head.weight" not in source.store.names()
    entries, fallbacks, ignored = plan_tensors(source.store, dims, head_dim, config.outtype, tied)

    out = Path(config.out).expanduser()
    remove_stale_staging(out)  # what an export killed half-way left
    with atomic_file(out) as staging:
        writer = gguf.GGUFWriter(staging, architecture)
        _write_hyperparameters(
            writer, model_config, dims, head_dim, config.outtype, Path(config.model).name or config.model
        )
        entries = _rope_entries(writer, model_config, head_dim) + entries
        tokenizer_info = write_tokenizer(writer, source.tokenizer, int(model_config["vocab_size"]))
        for entry in entries:
            declare(writer, entry)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for done, entry in enumerate(entries, start=1):
            write_data(writer, entry, source.store, head_dim)
            if progress:
                progress(done, len(entries))
        writer.close()
    return ExportResult(
        path=str(out),
        architecture=architecture,
        outtype=config.outtype,
        tensors=len(entries),
        bytes=out.stat().st_size,
        parameters=sum(math.prod(entry.shape) for entry in entries),
        layers=[asdict(d) for d in dims],
        padded_layers=padded,
        f16_fallbacks=fallbacks,
        not_exported=ignored,
        tokenizer=tokenizer_info,
        streamed=source.streamed,
        seconds=round(time.perf_counter() - start, 2),
    )
