"""Process memory: allocator tuning for streaming large buffers, and LMDB's mapped pages.

glibc serves allocations above its mmap threshold (128 KiB at first) with fresh mappings and
gives them back on free, so every megabyte-sized read or write buffer is faulted in page by
page again; on virtual machines a minor fault costs several microseconds, which halved read
throughput in bench/ingest.py. Raising the thresholds keeps such buffers on the heap for
reuse. Called once, by the first Store opened in the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MADV_DONTNEED = 4
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


@functools.cache
def _libc() -> ctypes.CDLL:
    """glibc, found once (find_library runs ldconfig in a subprocess)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def tune_malloc() -> None:
    global _done
    if _done:
        return
    _done = True
    try:
        libc = _libc()
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        libc.mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def unmap_cached_pages(path: str) -> int:
    """Drop this process's page mappings of ``path`` (LMDB's data file); returns the bytes of
    address space advised.

    LMDB reads its B-tree through a read-only shared map, and each page fault maps the cached
    pages around it too (fault-around, whole large folios), so every page near one ever read
    stays mapped and counts in the process's RSS: writing 1.5 GiB left 706 MiB of the data
    file mapped, and 8 MiB of duplicate data, only looked up, mapped 50 MiB. The pages stay
    in the page cache (the map is read-only: nothing in it is dirty), so dropping the
    mappings loses nothing; a later touch costs a minor fault."""
    real = os.path.realpath(path)
    advised = 0
    try:
        libc = _libc()
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                if not line.rstrip("\n").endswith(" " + real):
                    continue
                lo, hi = (int(x, 16) for x in line.split(maxsplit=1)[0].split("-"))
                if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED) == 0:
                    advised += hi - lo
    except (OSError, AttributeError):  # no /proc or not glibc: RSS just stays higher
        pass
    return advised
