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
M_ARENA_MAX = -8
# Above the 1 MiB read buffers and 64-256 KiB chunks, which then stay on the heap for reuse;
# larger buffers (write buffers of a whole file) still get their own mappings, freed at once.
MMAP_THRESHOLD = 4 << 20
# How much free heap may stay mapped: bounds what LMDB's freed dirty pages keep in RSS.
# One arena for all threads: chunks decoded in the codec pool and freed by the request thread
# (cache eviction) otherwise land in per-thread arenas that trim and refault on every cycle
# (50,000 minor faults per 256 MiB read, 0.6x the read rate); the GIL serializes most
# allocation anyway.
TRIM_THRESHOLD = 64 << 20
_done = False


def tune_malloc() -> None:
    global _done
    if _done:
        return
    _done = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        libc.mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass
