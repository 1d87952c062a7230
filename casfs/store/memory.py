"""Process memory: allocator tuning for streaming large buffers, and LMDB's mapped pages.

glibc serves allocations above its mmap threshold (128 KiB at first) with fresh mappings and
gives them back on free, so every megabyte-sized read or write buffer is faulted in page by
page again; on virtual machines a minor fault costs several microseconds, which halved read
throughput in bench/ingest.py. Raising the thresholds keeps such buffers on the heap for
reuse. Called once, by the first Store opened in the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import resource
import threading
from collections.abc import Iterator

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
    """The C library's functions, as this process already has them (dlopen of no file:
    ctypes.util.find_library would import subprocess and run ldconfig, ~15 ms a command)."""
    return ctypes.CDLL(None, use_errno=True)


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


def _minor_faults() -> int:
    """Minor page faults of this process so far (one syscall)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


_PAGE = os.sysconf("SC_PAGE_SIZE")
_statm: tuple[int, int] | None = None  # (pid, descriptor of its /proc/self/statm)


def _file_resident() -> int:
    """Bytes of file-backed (and shared) pages this process has mapped and resident: the
    third field of /proc/self/statm, read again through one open descriptor (2 µs, against
    14 µs opening it each time). 0 where there is no /proc."""
    global _statm
    try:
        if _statm is None or _statm[0] != os.getpid():  # first use, or a forked child
            if _statm is not None:
                with contextlib.suppress(OSError):  # the parent's (unless closed since)
                    os.close(_statm[1])
            _statm = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY))
        return int(os.pread(_statm[1], 128, 0).split()[2]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class _Buffer(ctypes.Structure):
    """CPython's Py_buffer: where a buffer's bytes are (a read-only memoryview has no other
    way to tell its address to ctypes)."""

    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.py_object),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


def _address(view: memoryview) -> int:
    """The address of a buffer's first byte (PyObject_GetBuffer; released at once)."""
    api = ctypes.pythonapi
    info = _Buffer()
    if api.PyObject_GetBuffer(ctypes.py_object(view), ctypes.byref(info), 0) != 0:
        raise BufferError("no buffer")
    try:
        return info.buf or 0
    finally:
        api.PyBuffer_Release(ctypes.byref(info))


def _page_runs(views: list[memoryview]) -> list[tuple[int, int]]:
    """The pages under ``views`` as runs of adjacent pages, [lo, hi) each: one madvise a run
    (the chunks of a file written in order lie one after another in the map). Each
    madvise(DONTNEED) flushes the TLB of every core running a thread of this process, so
    one a value cost the other readers too."""
    spans = sorted((at & ~(_PAGE - 1), at + len(view)) for view in views if (at := _address(view)))
    runs: list[tuple[int, int]] = []
    for lo, hi in spans:
        if runs and lo <= -(-runs[-1][1] // _PAGE) * _PAGE:  # starts by the last run's page
            runs[-1] = (runs[-1][0], max(runs[-1][1], hi))
        else:
            runs.append((lo, hi))
    return runs


class MappedFile:
    """Keeps this process's mappings of one file (LMDB's data file) out of its RSS.

    LMDB reads its B-tree through a read-only shared map, and a page fault there maps the
    whole large folio around the page (up to 2 MiB on Linux 6.18) and leaves it mapped: each
    random key looked up while storing a chunk maps about a megabyte (an 8 MiB group of
    chunks mapped 180 MiB), and every page ever read stays counted in the RSS. The pages are
    clean page-cache pages (the map is read-only), so dropping the mappings
    (``madvise(MADV_DONTNEED)``) loses nothing; a later touch costs a minor fault.

    ``touched()`` is cheap (a getrusage) and is called wherever the store goes through the
    map. Every ``max_faults`` minor faults it reads how many file pages the process has
    mapped (/proc/self/statm) and unmaps once they grew by ``max_mapped`` since the last
    time, which bounds what stays mapped to that plus ``max_faults`` folios. Unmapping at a
    fault count alone dropped the B-tree's hot pages over and over in metadata work on a
    large store (a snapshot of a 100,000-file tree spent a sixth of its time faulting them
    in again) although the whole database would have fit the budget. The mapping's address is
    found in /proc/self/maps once and checked through /proc/self/map_files before each use:
    LMDB maps the file anew when the map grows, and advising a stale range would zero
    whatever memory took its place. Only the thread that may grow the map calls this.
    """

    def __init__(self, path: str, max_faults: int = 16, max_mapped: int = 32 << 20) -> None:
        self.path = os.path.realpath(path)
        self.max_faults = max_faults
        self.max_mapped = max_mapped
        self._ranges: list[tuple[int, int]] = []
        self._faults = _minor_faults()
        self._resident = _file_resident()  # file pages mapped after the last unmap

    def touched(self) -> None:
        faults = _minor_faults()
        if faults - self._faults < self.max_faults:
            return
        self._faults = faults
        if _file_resident() - self._resident >= self.max_mapped:
            self.unmap()

    def release(self, views: list[memoryview]) -> None:
        """Unmap the pages under ``views`` (values just read through the map, still valid):
        a thread that streams values through the map drops each one's pages as it goes, so
        that :meth:`unmap`'s sweep of the whole map (which costs every thread of the process
        its mappings, hot B-tree pages included) comes far less often: what still grows is
        the folios mapped around the B-tree pages of each lookup."""
        libc = _libc()
        for lo, hi in _page_runs(views):
            libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED)

    def unmap(self) -> int:
        """Drop every mapping of the file now; returns the bytes of address space advised."""
        advised = 0
        try:
            if not self._ranges or not self._still_mapped():
                self._ranges = self._find()
            libc = _libc()
            for lo, hi in self._ranges:
                if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_DONTNEED) == 0:
                    advised += hi - lo
        except (OSError, AttributeError):  # no /proc or not glibc: RSS just stays higher
            self._ranges = []
        self._faults = _minor_faults()
        self._resident = _file_resident()
        return advised

    def _still_mapped(self) -> bool:
        try:
            return all(
                os.readlink(f"/proc/self/map_files/{lo:x}-{hi:x}") == self.path
                for lo, hi in self._ranges
            )
        except OSError:
            return False

    def _find(self) -> list[tuple[int, int]]:
        ranges = []
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                if line.rstrip("\n").endswith(" " + self.path):
                    lo, hi = (int(x, 16) for x in line.split(maxsplit=1)[0].split("-"))
                    ranges.append((lo, hi))
        return ranges


class MapUsers:
    """Threads that read LMDB's map outside the owner's transactions (``shared``), and the
    owner's changes of the map itself (``exclusive``): growing it (or adopting another
    process's size) and closing the environment unmap it, which would pull the pages from
    under such a reader. The owner's own transactions need no guard: it never resizes while
    one of them is open."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._changing = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._changing:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            while self._changing:  # (one change at a time)
                self._cond.wait()
            self._changing = True
            while self._readers:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._changing = False
                self._cond.notify_all()
