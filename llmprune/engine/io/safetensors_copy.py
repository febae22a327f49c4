"""Copying stored tensors into a new safetensors file without loading them.

`safetensors.torch.save_file` needs every tensor in memory. A streamed prune
passes the embedding, final norm and LM head through unchanged, and for big
models those are gigabytes (Llama-3-70B: 4.2 GB in bf16), so they are copied
from the source files byte for byte, a chunk at a time, instead. The format
(safetensors' documented layout): an 8-byte little-endian header length, a
JSON header naming each tensor's dtype, shape and byte range, then the data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from llmprune.engine.core.errors import UserInputError

__all__ = ["read_header", "stored_elements", "stored_dtype_names", "read_tensors", "copy_tensors"]

_CHUNK = 16 << 20
_ALIGN = 8  # safetensors pads the header so that the data starts 8-byte aligned
# safetensors dtype -> torch dtype name
_TORCH_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data starts."""
    with open(path, "rb") as handle:
        try:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        except (struct.error, ValueError, MemoryError, OverflowError):  # ValueError covers bad JSON and UTF-8
            raise UserInputError(
                f"{path} is not a readable safetensors file (damaged header)", "re-save or download the model again"
            ) from None
    if not isinstance(header, dict):
        raise UserInputError(
            f"{path} is not a readable safetensors file (damaged header)", "re-save or download the model again"
        )
    return header, 8 + length


def _elements(entry: dict) -> int:
    count = 1
    for size in entry["shape"]:
        count *= size
    return count


def stored_elements(path: Path) -> dict[str, int]:
    """Tensor name -> element count, from the file's header alone (no tensor is read)."""
    header, _ = read_header(path)
    return {name: _elements(entry) for name, entry in header.items() if name != "__metadata__"}


def stored_dtype_names(path: Path) -> dict[str, str]:
    """Tensor name -> its stored dtype as the header spells it (BF16, F32, ...), from the header alone."""
    header, _ = read_header(path)
    return {name: entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


def read_tensors(path: Path, names: list[str]) -> dict:
    """The named tensors of one file, read with plain file reads into fresh tensors.

    Not `safe_open(...).get_tensor`: that maps the file, and the mapped pages it
    touches count as resident until the file is closed, so a 1 GB embedding
    costs 2 GB of RSS while it is read. Here each tensor is its own bytes, once.
    """
    import torch

    header, data_start = read_header(path)
    tensors = {}
    with open(path, "rb") as handle:
        for name in names:
            entry = header[name]
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in _TORCH_DTYPES:  # a rarer dtype (fp8, ...): safetensors' own reader
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as mapped:
                    tensors[name] = mapped.get_tensor(name)
                continue
            tensor = torch.empty(entry["shape"], dtype=getattr(torch, _TORCH_DTYPES[entry["dtype"]]))
            handle.seek(data_start + begin)
            view = memoryview(tensor.view(-1).view(torch.uint8).numpy()) if tensor.numel() else memoryview(b"")
            if handle.readinto(view) != end - begin:
                raise UserInputError(f"{path} ends inside tensor {name}", "re-save or download the model again")
            tensors[name] = tensor
    return tensors


def copy_tensors(sources: dict[str, Path], destination: Path, metadata: dict[str, str] | None = None) -> int:
    """Write the named tensors (name -> file that holds it) into `destination`; returns the elements copied."""
    headers = {path: read_header(path) for path in set(sources.values())}
    layout, offset, elements = {}, 0, 0
    for name, path in sources.items():
        entry = headers[path][0][name]
        begin, end = entry["data_offsets"]
        layout[name] = {
            "dtype": entry["dtype"],
            "shape": entry["shape"],
            "data_offsets": [offset, offset + end - begin],
        }
        offset += end - begin
        elements += _elements(entry)
    if metadata:
        layout["__metadata__"] = metadata
    encoded = json.dumps(layout, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % _ALIGN)
    with open(destination, "wb") as out:
        out.write(struct.pack("<Q", len(encoded)))
        out.write(encoded)
        for name, path in sources.items():
            header, data_start = headers[path]
            begin, end = header[name]["data_offsets"]
            with open(path, "rb") as source:
                source.seek(data_start + begin)
                remaining = end - begin
                while remaining:
                    chunk = source.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise ValueError(f"{path} ends inside tensor {name}")
                    out.write(chunk)
                    remaining -= len(chunk)
    return elements
