"""Keeping the process's resident memory close to what is really alive (glibc only; no-ops elsewhere).

A layer-streamed run allocates and frees a layer's worth of tensors per layer.
glibc serves such blocks from its heap once its dynamic mmap threshold has
risen (it rises after every large free, up to 32 MiB), and a heap keeps freed
blocks as resident memory. Two knobs stop that:

- `serve_large_blocks_by_mmap`: a fixed 1 MiB threshold (M_MMAP_THRESHOLD),
  so every tensor above it gets its own mapping and goes back to the system on
  free. Costs a page fault per fresh page; streaming is bound by I/O and
  matmuls, not by that.
- `return_freed_memory`: malloc_trim(0), for the small blocks that remain.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["serve_large_blocks_by_mmap", "return_freed_memory"]

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
_LARGE_BLOCK = 1 << 20


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def serve_large_blocks_by_mmap() -> bool:
    """Allocations of 1 MiB and more get their own mapping from now on (process-wide). True if applied."""
    return _LIBC is not None and _LIBC.mallopt(_M_MMAP_THRESHOLD, _LARGE_BLOCK) == 1


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
