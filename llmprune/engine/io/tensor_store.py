"""Named tensors whose shapes are known up front and whose data is read one at a time.

A GGUF file lists every tensor's shape before the first byte of data, and an
export must not hold the model in memory (a 16 GB checkpoint on a 16 GB
machine): safetensors files give shapes from their headers and each tensor on
request. A model that had to be built in memory anyway (a pickled module, a
`.bin` state dict, a hub id) is served from its state dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from llmprune.engine.core.errors import UserInputError
from llmprune.engine.io.safetensors_copy import read_header


class TensorStore(Protocol):
    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class SafetensorsStore:
    """The tensors of one or more safetensors files (a sharded checkpoint).

    Rows are read with plain file reads at the offsets of the header, not through
    a memory map: mapped pages of a 16 GB file would count as resident memory.
    """

    def __init__(self, files: list[Path]) -> None:
        self._entries: dict[str, tuple[Path, int, dict]] = {}
        for path in files:
            header, data_start = read_header(path)
            for name, entry in header.items():
                if name != "__metadata__":
                    self._entries[_strip_wrapper(name)] = (path, data_start, entry)

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][2]["shape"])

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        path, data_start, entry = self._entries[name]
        dtype = _DTYPES.get(entry["dtype"])
        if dtype is None:
            raise UserInputError(
                f"{path}: tensor {name} is stored as {entry['dtype']}", "export models stored in f32, f16 or bf16"
            )
        shape = list(entry["shape"]) or [1]
        row_bytes = torch.finfo(dtype).bits // 8
        for size in shape[1:]:
            row_bytes *= size
        begin = entry["data_offsets"][0] + start * row_bytes
        with open(path, "rb") as handle:
            handle.seek(data_start + begin)
            data = bytearray(handle.read((stop - start) * row_bytes))
        if len(data) != (stop - start) * row_bytes:
            raise UserInputError(
                f"{path} ends inside tensor {name}", "the file is truncated: re-save or download it again"
            )
        return torch.frombuffer(data, dtype=dtype).reshape(stop - start, *shape[1:]).float()


class StateDictStore:
    """Tensors of a model already in memory."""

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self._tensors = {_strip_wrapper(k): v for k, v in state_dict.items()}

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        tensor = self._tensors[name].detach()
        return (tensor.reshape(1) if tensor.dim() == 0 else tensor)[start:stop].float()


def _strip_wrapper(name: str) -> str:
    for prefix in ("module.", "base_model.model."):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return name
