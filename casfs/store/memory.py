"""Process-wide allocator tuning for streaming large buffers.

glibc serves allocations above its mmap threshold (128 KiB at first) with fresh mappings and
gives them back on free, so every megabyte-sized read or write buffer is faulted in page by
page again; on virtual machines a minor fault costs several microseconds, which halved read
throughput in bench/ingest.py. Raising the thresholds keeps such buffers on the heap for
reuse. Called once, by the first Store opened in the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_done = False


def tune_malloc() -> None:
    global _done
    if _done:
        return
    _done = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 64 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 256 << 20)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
