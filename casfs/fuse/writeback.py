"""Per-inode write buffers in bounded memory.

``write`` calls land here and return at memory speed; the data is chunked, hashed,
compressed and committed later, in large pieces, by the mount's flusher (see flusher.py for
when). Sequential writes grow one buffer; a write inside a buffered range overwrites it in
place; a write that touches no buffered range starts another; a write that spans several
ranges, or past MAX_RANGES per file, has the file flushed first, so the number of ranges (and
the cost of overlaying them on reads) stays small.

Memory: a range starts as a bytearray of what was written. One that grows past STREAM_BYTES
(a file written sequentially) moves to a buffer from a small pool of anonymous maps, reused
from flush to flush: grown by reallocation, every page of a fresh buffer was faulted in
again, a fifth of the request thread's time while writing a large file. The maps ask for
huge pages, so a fresh one faults in 2 MiB at a time.
"""

from __future__ import annotations

import mmap
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

MAX_RANGES = 64
STREAM_BYTES = 1 << 20
# A pooled buffer's size: address space; only the pages a range fills are ever touched. A
# range that outgrows it goes back to a bytearray.
POOL_BUFFER_BYTES = 64 << 20
POOL_KEEP = 2  # free buffers kept for the next ranges
POOL_IDLE = 5.0  # seconds without writes after which the free buffers are given back


class Range:
    """The bytes of one buffered range: ``mem[:n]``."""

    __slots__ = ("mem", "n", "pooled")

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.mem: bytearray | mmap.mmap = bytearray(data)
        self.n = len(data)
        self.pooled = False

    def __len__(self) -> int:
        return self.n

    def view(self) -> memoryview:
        return memoryview(self.mem)[: self.n]

    def write(self, rel: int, data: bytes | memoryview, pool: BufferPool) -> None:
        """Copy ``data`` in at ``rel`` (at most ``n``: ranges stay contiguous)."""
        end = rel + len(data)
        if end > len(self.mem):
            if not self.pooled and end > STREAM_BYTES and end <= POOL_BUFFER_BYTES:
                mem = pool.take()
                mem[: self.n] = self.mem[: self.n]
                self.mem, self.pooled = mem, True
            elif self.pooled:  # outgrew its buffer
                self.mem, self.pooled = bytearray(self.mem[: self.n]), False
        if end <= len(self.mem):
            self.mem[rel:end] = data
        else:  # a bytearray, grown by the write
            self.mem[rel:] = data
        self.n = max(self.n, end)


class BufferPool:
    """Anonymous maps of POOL_BUFFER_BYTES for ranges that stream (module docstring)."""

    def __init__(self) -> None:
        self.free: list[mmap.mmap] = []
        self.last_use = 0.0

    def take(self) -> mmap.mmap:
        self.last_use = time.monotonic()
        if self.free:
            return self.free.pop()
        mem = mmap.mmap(-1, POOL_BUFFER_BYTES)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                mem.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # no transparent huge pages here: 4 KiB faults
                pass
        return mem

    def give_back(self, ranges: Iterable[Range]) -> None:
        """Ranges whose bytes are stored (or dropped): their buffers may be reused. Nothing
        may read a range after this."""
        for r in ranges:
            if r.pooled:
                if len(self.free) < POOL_KEEP:
                    self.free.append(r.mem)  # type: ignore[arg-type]
                r.mem, r.n, r.pooled = bytearray(), 0, False

    def trim(self) -> None:
        """Free the kept buffers once no range has needed one for POOL_IDLE seconds."""
        if self.free and time.monotonic() - self.last_use >= POOL_IDLE:
            self.free.clear()


@dataclass
class DirtyFile:
    ino: int
    ranges: dict[int, Range] = field(default_factory=dict)  # start -> bytes, disjoint
    nbytes: int = 0
    end: int = 0  # end of the furthest buffered byte
    mtime_ns: int = 0  # time of the last write: the file's mtime once flushed
    since: float = 0.0  # monotonic time of the first unflushed write

    def _touched(self, offset: int, length: int) -> list[int]:
        """Starts of the ranges a write overlaps or continues (ends exactly where it starts)."""
        stop = offset + length
        return [
            start
            for start, buf in self.ranges.items()
            if start < stop and offset <= start + len(buf) and not (length == 0 and start > offset)
        ]

    def can_take(self, offset: int, length: int) -> bool:
        """Whether a write can be buffered without flushing first: it may start a new range,
        or overwrite or extend one range it starts inside (or right after)."""
        touched = self._touched(offset, length)
        if not touched:
            return len(self.ranges) < MAX_RANGES
        return len(touched) == 1 and touched[0] <= offset

    def overlaps(self, offset: int, length: int) -> bool:
        stop = offset + length
        return any(start < stop and offset < start + len(buf) for start, buf in self.ranges.items())

    def add(self, offset: int, data: bytes, pool: BufferPool) -> int:
        """Buffer a write (``can_take`` must allow it); returns how much the buffer grew."""
        touched = self._touched(offset, len(data))
        if touched:
            buf = self.ranges[touched[0]]
            before = len(buf)
            buf.write(offset - touched[0], data, pool)
            grown = len(buf) - before
        else:
            self.ranges[offset] = Range(data)
            grown = len(data)
        self.nbytes += grown
        self.end = max(self.end, offset + len(data))
        self.mtime_ns = time.time_ns()
        if not self.since:
            self.since = time.monotonic()
        return grown

    def overlay(self, offset: int, out: bytearray) -> None:
        """Copy buffered bytes over ``out``, which holds the file from ``offset`` on."""
        stop = offset + len(out)
        for start, buf in self.ranges.items():
            lo, hi = max(start, offset), min(start + len(buf), stop)
            if lo < hi:
                out[lo - offset : hi - offset] = buf.view()[lo - start : hi - start]


class WriteBuffers:
    """All dirty files of a mount, with the byte total the memory limit is checked against."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.files: dict[int, DirtyFile] = {}
        self.total = 0
        self.pool = BufferPool()

    def get(self, ino: int) -> DirtyFile | None:
        return self.files.get(ino)

    def add(self, ino: int, offset: int, data: bytes) -> DirtyFile:
        dirty = self.files.get(ino)
        if dirty is None:
            dirty = self.files[ino] = DirtyFile(ino)
        self.total += dirty.add(offset, data, self.pool)
        return dirty

    def take(self, ino: int) -> DirtyFile | None:
        """Remove and return a file's buffers (to flush or to drop them)."""
        dirty = self.files.pop(ino, None)
        if dirty is not None:
            self.total -= dirty.nbytes
        return dirty

    def largest(self) -> int | None:
        if not self.files:
            return None
        return max(self.files.values(), key=lambda d: d.nbytes).ino

    def older_than(self, seconds: float) -> list[int]:
        now = time.monotonic()
        return [d.ino for d in self.files.values() if now - d.since >= seconds]
