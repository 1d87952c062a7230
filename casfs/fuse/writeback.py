"""Per-inode write buffers in bounded memory.

``write`` calls land here and return at memory speed; the data is chunked, hashed,
compressed and committed later, in large pieces, by the mount's flusher (see flusher.py for
when). Sequential writes grow one buffer; a write inside a buffered range overwrites it in
place; a write that touches no buffered range starts another; a write that spans several
ranges, or past MAX_RANGES per file, has the file flushed first, so the number of ranges (and
the cost of overlaying them on reads) stays small.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

MAX_RANGES = 64


@dataclass
class DirtyFile:
    ino: int
    ranges: dict[int, bytearray] = field(default_factory=dict)  # start -> bytes, disjoint
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

    def add(self, offset: int, data: bytes) -> int:
        """Buffer a write (``can_take`` must allow it); returns how much the buffer grew."""
        touched = self._touched(offset, len(data))
        if touched:
            buf = self.ranges[touched[0]]
            before = len(buf)
            rel = offset - touched[0]
            buf[rel : rel + len(data)] = data
            grown = len(buf) - before
        else:
            self.ranges[offset] = bytearray(data)
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
                out[lo - offset : hi - offset] = memoryview(buf)[lo - start : hi - start]


class WriteBuffers:
    """All dirty files of a mount, with the byte total the memory limit is checked against."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.files: dict[int, DirtyFile] = {}
        self.total = 0

    def get(self, ino: int) -> DirtyFile | None:
        return self.files.get(ino)

    def add(self, ino: int, offset: int, data: bytes) -> DirtyFile:
        dirty = self.files.get(ino)
        if dirty is None:
            dirty = self.files[ino] = DirtyFile(ino)
        self.total += dirty.add(offset, data)
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
