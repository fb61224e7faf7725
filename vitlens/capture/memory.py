"""Handing freed memory back to the operating system (glibc keeps it otherwise).

A capture frees large tensors step by step (the autograd graph after the
backward pass, each block's records once the LRP walk has passed it). glibc
serves tensors below its mmap threshold from its heap and keeps what they
free, so the process's resident memory would stay at the forward pass's
high-water mark while the outputs fill on top of it. ``malloc_trim`` returns
the free pages. ``VITLENS_MALLOC_TRIM=0`` turns all of this off (benchmarks
compare both).
"""

from __future__ import annotations

import os
from typing import Any

_LIBC: Any = None


def _libc() -> Any:
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc: nothing to do
            _LIBC = False
    return _LIBC


def enabled() -> bool:
    return os.environ.get("VITLENS_MALLOC_TRIM", "1") != "0"


def trim_heap() -> None:
    """Return the heap's free pages to the OS (no-op off glibc or with ``VITLENS_MALLOC_TRIM=0``)."""
    if enabled() and _libc():
        _LIBC.malloc_trim(0)


def release_memory() -> None:
    """After a streamed batch: collect reference cycles (batch trees hold some), then trim.

    Without it, a long stream's RSS climbs with allocator retention although
    nothing leaks.
    """
    if not enabled():
        return
    import gc

    gc.collect()  # batch trees hold reference cycles: free them now, not at some later gc pass
    trim_heap()
