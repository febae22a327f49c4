"""The one place that decides where tensors live and in which dtype.

auto device: cuda > mps > cpu. auto dtype: bf16 on a GPU that supports it,
fp32 everywhere else. fp16 is allowed only when asked for, because it is the
main cause of NaN after pruning (overflow in activations that lost their
counterweights).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from llmprune.engine.core.errors import UserInputError

DEVICE_CHOICES = "auto|cpu|cuda|cuda:N|mps"
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class Placement:
    """Where the model runs and in which dtype its weights are kept."""

    device: torch.device
    dtype: torch.dtype

    @property
    def is_gpu(self) -> bool:
        return self.device.type in ("cuda", "mps")

    def describe(self) -> str:
        return f"{self.device} / {str(self.dtype).removeprefix('torch.')}"


def resolve_device(spec: str = "auto") -> torch.device:
    """Turn `auto|cpu|cuda|cuda:N|mps` into a torch.device that exists here."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserInputError("--device mps was asked for but MPS is not available", "use --device auto or cpu")
        return torch.device("mps")
    match = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if match:
        if not torch.cuda.is_available():
            raise UserInputError(
                f"--device {spec} was asked for but no CUDA GPU is visible", "use --device auto or cpu"
            )
        index = int(match.group(1) or 0)
        if index >= torch.cuda.device_count():
            raise UserInputError(
                f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible",
                f"use cuda:0..cuda:{torch.cuda.device_count() - 1}",
            )
        return torch.device("cuda", index)
    raise UserInputError(f"unknown device '{spec}'", f"use one of {DEVICE_CHOICES}")


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """Turn `auto|float32|bfloat16|float16` into a dtype suitable for `device`."""
    spec = (spec or "auto").strip().lower()
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
    spec = aliases.get(spec, spec)
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if spec not in _DTYPES:
        raise UserInputError(f"unknown dtype '{spec}'", f"use one of {'|'.join(DTYPE_CHOICES)}")
    return _DTYPES[spec]


def choose_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """Resolve both choices at once; every subcommand goes through here."""
    resolved = resolve_device(device)
    return Placement(device=resolved, dtype=resolve_dtype(dtype, resolved))


def available_memory_bytes(device: torch.device) -> int | None:
    """Free memory for new tensors on `device`: free GPU memory, or the OS's available RAM (None if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:  # Linux: MemAvailable counts reclaimable page cache, unlike MemFree
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
