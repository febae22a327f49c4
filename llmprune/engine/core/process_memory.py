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

`PhasePeaks` records the peak resident set size of each phase of a run
(loading, measuring, pruning, saving), so that a report can say what holds
the memory, not only how much.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

__all__ = ["serve_large_blocks_by_mmap", "return_freed_memory", "peak_rss", "current_rss", "PhasePeaks"]

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


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """The process's peak resident set size so far in bytes (VmHWM; ru_maxrss where /proc is missing)."""
    kib = _status_kib("VmHWM:")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib * 1024


def current_rss() -> int:
    """Resident set size now, in bytes (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class PhasePeaks:
    """Peak RSS per phase: `enter(name)` ends the current phase and starts the next; `close()` ends the last.

    The kernel keeps one high-water mark per process (VmHWM). When a phase raises
    it, the phase's peak is exactly the new mark; otherwise (a later phase that
    stays below an earlier one) it is the highest RSS sampled every `interval`
    seconds by a background thread, so it can miss a spike shorter than that.
    The mark itself is never reset, so /usr/bin/time and ru_maxrss stay right.
    """

    def __init__(self, interval: float = 0.01):
        self.peaks: dict[str, int] = {}
        self._interval = interval
        self._phase: str | None = None
        self._mark_at_start = 0
        self._sampled = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._sampled = max(self._sampled, current_rss())

    def enter(self, name: str) -> None:
        if name == self._phase:
            return
        self._end_phase()
        self._phase, self._mark_at_start, self._sampled = name, peak_rss(), current_rss()
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, name="llmprune-rss", daemon=True)
            self._thread.start()

    def _end_phase(self) -> None:
        if self._phase is None:
            return
        mark = peak_rss()
        peak = mark if mark > self._mark_at_start else max(self._sampled, current_rss())
        self.peaks[self._phase] = max(self.peaks.get(self._phase, 0), peak)
        self._phase = None

    def close(self) -> dict[str, int]:
        """End the last phase, stop sampling; returns {phase: peak bytes} in the order the phases ran."""
        self._end_phase()
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        return dict(self.peaks)

    def __enter__(self) -> PhasePeaks:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
