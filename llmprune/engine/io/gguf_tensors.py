"""Which tensors a GGUF file gets, under which names and types, and writing them a slice at a time.

Names and transforms follow llama.cpp's converter for Llama: q/k rows are
permuted from Hugging Face's rotate-half order to llama.cpp's interleaved rope
(`permute`); 1-D tensors stay f32; q8_0 falls back to f16 for a tensor whose
rows are not a multiple of the 32-value block (a pruned MLP width often is not),
as the converter does. A layer pruned to zero heads (or zero MLP channels) gets
one all-zero head (channel): it adds exactly nothing, except the output bias,
which llama.cpp then applies as transformers does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.io.tensor_store import TensorStore

_CHUNK_ELEMENTS = 16 << 20  # 64 MB of f32 per slice: peak memory stays near one slice, not one tensor
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_TENSOR = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class LayerDims:
    """A decoder layer as llama.cpp sees it (after padding empty parts)."""

    heads: int
    kv_heads: int
    ffn: int


@dataclass
class Entry:
    """One tensor of the output file."""

    name: str
    shape: tuple[int, ...]  # PyTorch order (rows first)
    qtype: Any  # gguf.GGMLQuantizationType
    source: str | None = None  # None: all zeros (padding) or `constant`
    permute_heads: int = 0  # >0: q/k rows are reordered for llama.cpp's rope, this many heads
    constant: torch.Tensor | None = None


def permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face rotate-half order -> llama.cpp's interleaved pairs, per head (the converter's permute)."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def layer_dims(store: TensorStore, layers: int, head_dim: int) -> tuple[list[LayerDims], list[int]]:
    """Heads, KV heads and MLP width of every layer, read from the tensor shapes; and the padded layers.

    An empty attention or MLP counts as one head / one channel (see the module docstring).
    """
    dims, padded = [], []
    for index in range(layers):
        prefix = f"model.layers.{index}."
        try:
            q = store.shape(prefix + "self_attn.q_proj.weight")[0]
            k = store.shape(prefix + "self_attn.k_proj.weight")[0]
            ffn = store.shape(prefix + "mlp.gate_proj.weight")[0]
        except KeyError as missing:
            raise UserInputError(
                f"the model has no tensor {missing.args[0]}", "export a complete Llama-style model"
            ) from None
        if 0 in (q, k, ffn):
            padded.append(index)
        dims.append(LayerDims(q // head_dim or 1, k // head_dim or 1, ffn or 1))
    return dims, padded


def _is_zero(store: TensorStore, name: str) -> bool:
    shape = store.shape(name)
    return not bool(store.rows(name, 0, shape[0] if shape else 1).any())


def _weight_type(shape: tuple[int, ...], outtype: str, fallbacks: list[str], name: str) -> Any:
    from gguf import GGMLQuantizationType as Q

    if len(shape) < 2 or outtype == "f32":
        return Q.F32
    if outtype == "q8_0":
        if shape[-1] % 32 == 0:
            return Q.Q8_0
        fallbacks.append(name)
        return Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16}[outtype]


def _layer_entry(
    store: TensorStore,
    index: int,
    part: str,
    kind: str,
    dims: LayerDims,
    head_dim: int,
    outtype: str,
    fallbacks: list[str],
) -> Entry | None:
    source = f"model.layers.{index}.{part}.{kind}"
    name = f"blk.{index}.{_LAYER_NAMES[part]}.{kind}"
    shape = store.shape(source)
    if kind == "bias" and _is_zero(store, source):
        return None  # a bias that carries nothing (stock-config siblings, padding): llama.cpp treats it as absent
    heads = {"self_attn.q_proj": dims.heads, "self_attn.k_proj": dims.kv_heads}.get(part, 0)
    if 0 in shape:  # a pruned-empty part: one all-zero head / channel instead (see module docstring)
        if kind == "bias":
            return None
        rows, cols = shape
        shape = (
            head_dim if rows == 0 and "attn" in part else 1 if rows == 0 else rows,
            head_dim if cols == 0 and "attn" in part else 1 if cols == 0 else cols,
        )
        return Entry(name, shape, _weight_type(shape, outtype, fallbacks, name))
    return Entry(name, shape, _weight_type(shape, outtype, fallbacks, name), source, heads)


def plan_tensors(
    store: TensorStore, dims: list[LayerDims], head_dim: int, outtype: str, tied: bool
) -> tuple[list[Entry], list[str], list[str]]:
    """(entries in file order, names kept f16 under q8_0, source tensors not exported)."""
    entries: list[Entry] = []
    fallbacks: list[str] = []
    ignored: list[str] = []
    for source in store.names():
        if source in _GLOBAL_NAMES:
            if source == "lm_head.weight" and tied:
                continue
            shape = store.shape(source)
            entries.append(
                Entry(
                    _GLOBAL_NAMES[source], shape, _weight_type(shape, outtype, fallbacks, _GLOBAL_NAMES[source]), source
                )
            )
            continue
        match = _LAYER_TENSOR.match(source)
        if match and int(match.group(1)) < len(dims) and match.group(2) in _LAYER_NAMES:
            index = int(match.group(1))
            entry = _layer_entry(
                store, index, match.group(2), match.group(3), dims[index], head_dim, outtype, fallbacks
            )
            if entry is not None:
                entries.append(entry)
        elif not _IGNORED.search(source):
            ignored.append(source)
    return entries, fallbacks, ignored


def _encode(values: torch.Tensor, qtype: Any) -> np.ndarray:
    import gguf

    array = values.contiguous().numpy().astype(np.float32, copy=False)
    if qtype == gguf.GGMLQuantizationType.F32:
        return array
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype)


def declare(writer: Any, entry: Entry) -> None:
    """Announce a tensor's name, shape and type in the header (its bytes come later)."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if entry.qtype in (Q.F32, Q.F16):
        dtype = np.float32 if entry.qtype == Q.F32 else np.float16
        writer.add_tensor_info(
            entry.name, entry.shape, np.dtype(dtype), int(np.prod(entry.shape)) * np.dtype(dtype).itemsize
        )
    else:
        byte_shape = gguf.quant_shape_to_byte_shape(entry.shape, entry.qtype)
        writer.add_tensor_info(
            entry.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=entry.qtype
        )


def _slices(entry: Entry, store: TensorStore, head_dim: int):
    """The entry's values, a few rows at a time (whole heads when rows are permuted)."""
    if entry.constant is not None:
        yield entry.constant
        return
    rows = entry.shape[0]
    cols = int(np.prod(entry.shape[1:])) if len(entry.shape) > 1 else 1
    step = max(1, _CHUNK_ELEMENTS // cols)
    if entry.permute_heads:
        step = max(head_dim, step - step % head_dim)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        if entry.source is None:
            yield torch.zeros((stop - start, *entry.shape[1:]))
            continue
        values = store.rows(entry.source, start, stop)
        yield permute(values, (stop - start) // head_dim) if entry.permute_heads else values


def write_data(writer: Any, entry: Entry, store: TensorStore, head_dim: int) -> int:
    """Write one tensor's bytes, slice by slice, where the header said they would be; returns the byte count.

    GGUFWriter.write_tensor_data takes a whole array; this is the same steps
    (align, write, pad, mark the tensor written) for an array given in slices.
    """
    from gguf.gguf_writer import WriterState

    out = writer.fout[0]
    info = writer.tensors[0].pop(entry.name)
    writer.write_padding(out, out.tell())
    written = 0
    for values in _slices(entry, store, head_dim):
        encoded = _encode(values, entry.qtype)
        encoded.tofile(out)
        written += encoded.nbytes
    if written != info.nbytes:
        raise RuntimeError(f"{entry.name}: wrote {written} bytes, the header says {info.nbytes}")
    writer.write_padding(out, written)
    writer.state = WriterState.WEIGHTS
    return written
