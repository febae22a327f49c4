"""Layer-streamed analysis and pruning: the model stays on disk, one decoder layer at a time is in memory.

`StreamedLayers` is a `walk.layer_store.LayerStore` over a safetensors
model directory. The model is built once on the `meta` device (structure, no
memory); `load(i)` gives layer i real storage on the compute device and reads
its tensors from the safetensors files; `release(i)` writes the (pruned) layer
into its own shard of the output directory and returns it to `meta`. The
embedding is read only to embed the calibration tokens and then freed; the
output's embeddings, norm and LM head are copied file to file.

So memory holds one layer, the embedding for a moment, and the calibration
hidden states (windows × seq_len × hidden, twice), whatever the model's depth.
Because the pruning code is the same (`pruning.global_path.prune_globally`) and every
layer sees the same inputs, the streamed result equals the in-memory one.

The output is a sharded safetensors checkpoint (one shard per layer plus one
for embeddings/norm, and `model.safetensors.index.json`), stored in the
source's dtype unless `save_dtype` says otherwise (a bf16 model is pruned in
the compute dtype and written back as bf16), with the same config
and llmprune.json as `checkpoint.save_model` writes, so `load_model` and
`from_pretrained` read it as usual.
"""

from __future__ import annotations

import gc
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.core.paths import atomic_directory, atomic_write_json
from llmprune.engine.core.process_memory import return_freed_memory, serve_large_blocks_by_mmap
from llmprune.engine.io.architecture import LayerShape, is_uniform, layer_shape
from llmprune.engine.io.checkpoint import (
    PROVENANCE_FILE,
    REMOTE_CODE_FILE,
    describe_shapes,
    provenance_record,
    stored_dtype,
)
from llmprune.engine.io.consistency import check_config_matches_weights
from llmprune.engine.io.remote_code import modeling_llmprune
from llmprune.engine.io.safetensors_copy import copy_tensors, read_tensors, stored_elements
from llmprune.engine.walk.layer_store import LayerRunner

__all__ = ["StreamedLayers", "safetensors_index", "stream_source", "parameter_count", "model_bytes", "should_stream"]

INDEX_FILE = "model.safetensors.index.json"


def safetensors_index(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it (single file or sharded with an index)."""
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise UserInputError(
            f"{directory} has no safetensors weights",
            "streaming reads model.safetensors (or a sharded index); re-save the model",
        )
    return {name: single for name in stored_elements(single)}


def stream_source(spec: str) -> Path | None:
    """The safetensors directory a streamed run reads for this model spec (None: it cannot stream)."""
    from llmprune.engine.io.models import ALIASES, alias_path, convert_gguf

    if spec in ALIASES:
        return convert_gguf(alias_path(spec))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return convert_gguf(path)
    if path.is_dir() and ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()):
        return path
    return None


def parameter_count(directory: str | Path) -> int:
    """Parameters stored in the directory's safetensors (a tied LM head is stored, and counted, once)."""
    return sum(_stored_elements(safetensors_index(Path(directory))).values())


def _stored_elements(files: dict[str, Path]) -> dict[str, int]:
    """Element count of every tensor in `files` (name -> file), one header read per file."""
    counts: dict[str, int] = {}
    for path in set(files.values()):
        counts.update(stored_elements(path))
    return {name: counts[name] for name in files}


def model_bytes(directory: Path) -> int:
    """Size of the weights on disk (what loading the whole model would need, at the stored dtype)."""
    return sum(path.stat().st_size for path in set(safetensors_index(directory).values()))


def should_stream(directory: Path, device: torch.device, headroom: float = 1.5) -> bool:
    """True when the whole model (with `headroom` for activations and copies) would not fit the device."""
    need = model_bytes(directory) * headroom
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return need > free
    try:
        import os

        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return False
    return need > free


@dataclass
class _Output:
    directory: Path
    staging: Path
    weight_map: dict[str, str] = field(default_factory=dict)
    shapes: dict[int, LayerShape] = field(default_factory=dict)
    parameters: int = 0


class StreamedLayers:
    """Decoder layers read one at a time from a safetensors model directory (and optionally written out)."""

    def __init__(
        self,
        directory: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        output: str | Path | None = None,
        save_dtype: torch.dtype | None = None,
        phases: Any = None,
    ):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.directory = Path(directory)
        if not (self.directory / "config.json").is_file():
            raise UserInputError(
                f"{self.directory} is not a model directory (no config.json)",
                "streaming needs a Hugging Face or llmprune directory with safetensors weights",
            )
        self.device = torch.device(device)
        self.dtype = dtype
        self.files = safetensors_index(self.directory)
        self.config = AutoConfig.from_pretrained(str(self.directory))
        check_config_matches_weights(self.directory, self.config.to_dict())
        with torch.device("meta"):
            if getattr(self.config, "layer_shapes", None):
                self.skeleton = modeling_llmprune.LlmpruneLlamaForCausalLM(self.config)
            else:
                self.skeleton = AutoModelForCausalLM.from_config(self.config)
        self.output_directory = Path(output) if output is not None else None
        # what the output is stored in: the source's own dtype unless asked otherwise (bf16 in -> bf16 out)
        self.save_dtype = save_dtype or stored_dtype(self.directory) or dtype
        self.phases = phases  # a process_memory.PhasePeaks (or None): pruning starts a phase of its own
        self._output: _Output | None = None
        # layers come and go: without this, freed layers stay resident in the heap (see process_memory)
        serve_large_blocks_by_mmap()

    # -------------------------------------------------------- reading

    @property
    def num_layers(self) -> int:
        return len(self.skeleton.model.layers)

    def read_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every stored tensor whose name starts with `prefix` (the prefix stripped), read from disk to the CPU."""
        names = [name for name in self.files if name.startswith(prefix)]
        tensors = {}
        for path in {self.files[name] for name in names}:
            read = read_tensors(path, [name for name in names if self.files[name] == path])
            tensors.update({name[len(prefix) :]: tensor for name, tensor in read.items()})
        return tensors

    def runner(self, seq_len: int, batch_size: int = 8) -> LayerRunner:
        rotary = type(self.skeleton.model.rotary_emb)(self.config).to(self.device)
        return LayerRunner(self.config, rotary, seq_len, self.device, self.dtype, batch_size)

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.read_tensors("model.embed_tokens.")["weight"]
        hidden = torch.nn.functional.embedding(ids, weight).to(self.device, self.dtype)
        del weight
        return hidden

    def load(self, index: int) -> nn.Module:
        layer = self.skeleton.model.layers[index]
        state = self.read_tensors(f"model.layers.{index}.")
        for name in state:  # converted one by one: the stored copy of each goes as soon as its converted one exists
            state[name] = state[name].to(self.device, self.dtype)
        # always the stored (unpruned) weights: release() put a fresh meta layer in the skeleton.
        # assign: the tensors just read become the parameters (filling allocated storage would hold the layer twice)
        layer.load_state_dict(state, strict=True, assign=True)
        return layer

    def release(self, index: int, layer: nn.Module, changed: bool) -> None:
        if self._output is not None:
            self._write_layer(index, layer)
        # back to meta: the layer's memory is freed; a later load rebuilds it from the original weights.
        # The caller's loop variable still names the released layer until its next load(): emptying the
        # module in place frees its weights now, so that two layers are never in memory at once
        layer.to("meta")
        self.skeleton.model.layers[index] = self._fresh_layer(index)
        # a forward pass leaves reference cycles around the layer's modules; without a collection the
        # freed layers pile up until Python's allocation-count trigger fires (~10 MB per layer measured)
        del layer
        gc.collect()
        return_freed_memory()

    def _fresh_layer(self, index: int) -> nn.Module:
        with torch.device("meta"):
            layer = type(self.skeleton.model.layers[index])(self.config, index)
        shapes = getattr(self.config, "layer_shapes", None)
        if shapes:
            holder = _Holder(layer, self.config)
            modeling_llmprune.apply_layer_shapes(holder, [shapes[index]])
        return layer

    # -------------------------------------------------------- writing

    def begin_pruning(self) -> None:
        """From now on released layers are written to the output (atomically: nothing appears until `finish_output`)."""
        if self.phases is not None:
            self.phases.enter("prune")
        if self.output_directory is None:
            return
        self._context = atomic_directory(self.output_directory)
        staging = self._context.__enter__()
        self._output = _Output(self.output_directory, staging)

    def abort_output(self, error: BaseException) -> None:
        """Throw the half-written output away (the staging directory), keeping what was there before."""
        if self._output is not None:
            self._output = None
            self._context.__exit__(type(error), error, error.__traceback__)

    def _save_shard(self, file: str, tensors: dict[str, torch.Tensor]) -> None:
        out = self._output
        save_file(
            {k: v.detach().to("cpu", self.save_dtype).contiguous() for k, v in tensors.items()},
            str(out.staging / file),
            metadata={"format": "pt"},
        )
        out.weight_map.update({name: file for name in tensors})
        out.parameters += sum(t.numel() for t in tensors.values())

    def _write_layer(self, index: int, layer: nn.Module) -> None:
        tensors = {f"model.layers.{index}.{name}": tensor for name, tensor in layer.state_dict().items()}
        self._save_shard(f"model-layer-{index:05d}.safetensors", tensors)
        self._output.shapes[index] = layer_shape(layer)

    @property
    def output_shapes(self) -> list[LayerShape]:
        """Shapes of the layers written so far, in order."""
        return [self._output.shapes[i] for i in sorted(self._output.shapes)]

    def output_parameters(self) -> int:
        """Parameters the finished output will hold (layers written, plus embeddings/norm and stock zero biases)."""
        shapes = self.output_shapes
        rest = sum(
            count for name, count in _stored_elements(self.files).items() if not name.startswith("model.layers.")
        )
        extra = self._stock_zero_biases(shapes[0]) if len(shapes) == self.num_layers and is_uniform(shapes) else {}
        return self._output.parameters + rest + sum(t.numel() for t in extra.values())

    def finish_output(self, tokenizer: Any = None, provenance: dict | None = None) -> Path:
        """Write embeddings, norm, config, index and llmprune.json; make the directory appear."""
        out = self._output
        if out is None or len(out.shapes) != self.num_layers:
            raise RuntimeError("finish_output needs every layer released after begin_pruning")
        # embeddings, final norm and LM head pass through unchanged: copied from disk, never loaded
        rest = {name: path for name, path in self.files.items() if not name.startswith("model.layers.")}
        if stored_dtype(self.directory) == self.save_dtype:
            out.parameters += copy_tensors(rest, out.staging / "model-rest.safetensors", metadata={"format": "pt"})
            out.weight_map.update({name: "model-rest.safetensors" for name in rest})
        else:  # another dtype asked for (--save-dtype): read and cast them, one tensor at a time in memory
            for name in rest:
                self._save_shard(
                    f"model-rest-{len(out.weight_map):05d}.safetensors", {name: self.read_tensors(name)[""]}
                )
        shapes = [out.shapes[i] for i in range(self.num_layers)]
        if is_uniform(shapes) and (biases := self._stock_zero_biases(shapes[0])):
            self._save_shard("model-zero-biases.safetensors", biases)
        config = self.config
        describe_shapes(config, shapes)
        config.num_hidden_layers = self.num_layers
        config.dtype = self.save_dtype
        config.save_pretrained(out.staging)
        if not is_uniform(shapes):
            shutil.copyfile(modeling_llmprune.__file__, out.staging / REMOTE_CODE_FILE)
        atomic_write_json(out.staging / INDEX_FILE, {"metadata": {"total_size": 0}, "weight_map": out.weight_map})
        if tokenizer is not None:
            tokenizer.save_pretrained(out.staging)
        atomic_write_json(out.staging / PROVENANCE_FILE, provenance_record(shapes, out.parameters, provenance))
        self._context.__exit__(None, None, None)
        self._output = None
        return out.directory

    def _stock_zero_biases(self, shape: LayerShape) -> dict[str, torch.Tensor]:
        """The zero sibling biases a stock config's attention_bias/mlp_bias flags demand (see checkpoint)."""
        extra = {}
        q = shape.num_attention_heads * shape.head_dim
        kv = shape.num_key_value_heads * shape.head_dim
        for index in range(self.num_layers):
            prefix = f"model.layers.{index}."
            if shape.o_proj_bias:
                for name, size in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
                    key = f"{prefix}self_attn.{name}.bias"
                    if key not in self._output.weight_map:
                        extra[key] = torch.zeros(size, dtype=self.save_dtype)
            if shape.down_proj_bias:
                for name in ("gate_proj", "up_proj"):
                    key = f"{prefix}mlp.{name}.bias"
                    if key not in self._output.weight_map:
                        extra[key] = torch.zeros(shape.intermediate_size, dtype=self.save_dtype)
        return extra


class _Holder(nn.Module):
    """Lets apply_layer_shapes resize a single layer (it expects model.model.layers and model.config)."""

    def __init__(self, layer: nn.Module, config: Any):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([layer])
        self.config = config
