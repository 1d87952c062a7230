"""Writing bytes into a file: cut once, then hash, compress and store group by group.

A write is widened to the extents it overlaps (and to the file's last extent when it
continues it: that one's end was forced by the end of the data, so re-cutting it with the new
bytes keeps sequential writes chunked exactly like one whole-file cut). The widened region is
cut once with FastCDC; its chunks are then handled in groups of about GROUP_BYTES:

    hash (pool)  ->  pick (store thread: which chunks are new)  ->  compress (pool)  ->  apply

``steps`` is a generator that yields the futures it waits on, so one body serves both the
synchronous model (which waits with ``future.result()``) and the mount (which awaits them
while it serves other requests). While group k compresses in the pool, group k-1 is applied
on the store's thread: CPU and LMDB work overlap. Each group is applied in its own
transaction, so a write of any size never holds more than a group of dirty pages.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

from casfs.store import layout
from casfs.store.packs import packable
from casfs.store.pipeline import Piece, settled, spans_of
from casfs.store.store import Tx
from casfs.tree.content import Content, Extent

GROUP_BYTES = 8 << 20
DEPTH = 4  # groups in the pool ahead of the one being applied


@dataclass
class Group:
    start: int  # file offsets covered by the group's chunks
    end: int
    spans: list[tuple[int, int]]  # (file offset, length) of each chunk


class Write:
    """One write's region and chunks. ``plan`` and ``apply`` need the store's thread."""

    def __init__(self, content: Content, ino: int, offset: int, data: memoryview) -> None:
        self.content = content
        self.ino = ino
        self.offset = offset
        self.data = data
        self.end = offset + len(data)
        self.start = offset
        self.stop = self.end
        self.keeps_cuts = False  # the file's chunks stay those of one whole-file cut
        self.into_empty = False  # the file had no bytes stored: nothing old to plan around
        self.head: Extent | None = None  # old extent whose bytes precede the write
        self.tail: Extent | None = None  # old extent whose bytes follow it
        self.plain: dict[bytes, bytes] = {}
        self.values: dict[bytes, bytes] = {}
        # (file offset, buffer) pieces of the region, in order; chunks never straddle two
        self.segments: list[tuple[int, bytes | bytearray | memoryview]] = []

    def plan(self, tx: Tx) -> None:
        c = self.content
        old = c.extents(tx, self.ino, self.offset, self.end)
        last = c.last_extent(tx, self.ino)
        if last is not None and last.end == self.offset and (not old or old[0] != last):
            old.insert(0, last)  # continue the file's last chunk
        if old and old[0].offset < self.offset:
            self.head = old[0]
        if old and old[-1].end > self.end:
            self.tail = old[-1]
        self.start = min(self.offset, old[0].offset if old else self.offset)
        self.stop = max(self.end, old[-1].end if old else self.end)
        for e in (self.head, self.tail):
            if e is None or e.digest in self.plain or e.digest in self.values:
                continue
            cached = c.cache.get(e.digest)
            if cached is not None:
                self.plain[e.digest] = cached
            else:
                self.values[e.digest] = c.store.load_value(tx, e.digest)

    def cut(self) -> list[Group]:
        """Cut the region (old head bytes, the new bytes, old tail bytes) into chunks (CPU;
        any thread). The new bytes are not copied: only the head and tail ends are cut from
        small joined buffers, up to a cut point past which cutting no longer depends on them
        (a chunk that starts at least ``max`` bytes before a buffer's end ended naturally)."""
        c = self.content
        for digest, value in self.values.items():  # at most two chunks: no fan-out here
            self.plain[digest] = c.store.codec.decode(digest, value)
        self.values = {}
        head = self.plain[self.head.digest][: self.offset - self.head.offset] if self.head else b""
        tail = self.plain[self.tail.digest][self.end - self.tail.offset :] if self.tail else b""
        cut = c.pipeline.chunker.cut
        reach = 2 * c.store.params.max
        data = self.data
        spans: list[tuple[int, int]] = []
        if (not head and not tail) or len(data) <= 2 * reach:
            region = bytes(head) + bytes(data) + bytes(tail) if head or tail else data
            self.segments = [(self.start, region)]
            spans = spans_of(self.start, cut(region))
        else:
            pos = self.offset  # file offset from which ``data`` still needs cutting
            self.segments = []
            if head:
                joined = bytes(head) + bytes(data[:reach])
                kept = settled(self.start, cut(joined), len(joined), reach // 2)
                spans += kept
                pos = kept[-1][0] + kept[-1][1]
                self.segments.append((self.start, joined[: pos - self.start]))
            rest = data[pos - self.offset :]
            lengths = cut(rest)
            if tail:
                kept = settled(pos, lengths, len(rest), reach // 2)
                spans += kept
                mid_end = kept[-1][0] + kept[-1][1]
                self.segments.append((pos, rest[: mid_end - pos]))
                end_part = bytes(rest[mid_end - pos :]) + bytes(tail)
                spans += spans_of(mid_end, cut(end_part))
                self.segments.append((mid_end, end_part))
            else:
                spans += spans_of(pos, lengths)
                self.segments.append((pos, rest))
        groups = [Group(self.start, self.start, [])]
        for off, length in spans:
            g = groups[-1]
            if g.end - g.start >= GROUP_BYTES:
                g = Group(off, off, [])
                groups.append(g)
            g.spans.append((off, length))
            g.end = off + length
        return groups

    def chunk(self, offset: int, length: int) -> memoryview:
        for start, buf in reversed(self.segments):
            if offset >= start:
                return memoryview(buf)[offset - start : offset - start + length]
        raise AssertionError(offset)

    def hash(self, group: Group) -> Future[list[Piece]]:
        return self.content.pipeline.hash_chunks(
            [(off, self.chunk(off, n)) for off, n in group.spans]
        )

    def pick(self, tx: Tx, pieces: list[Piece]) -> list[Piece]:
        """Chunks the store does not hold yet, each once, that are to be compressed on their
        own (small ones go to packs, compressed together at commit)."""
        seen: set[bytes] = set()
        new = []
        for p in pieces:
            if p.digest is not None and p.digest not in seen and not packable(p.length):
                seen.add(p.digest)
                if not self.content.store.has_object(tx, p.digest):
                    new.append(p)
        return new

    def compress(self, new: list[Piece]) -> Future[list[bytes]]:
        """Encoded values of ``new``, in the order given."""
        return self.content.pipeline.compress_async([self.chunk(p.offset, p.length) for p in new])

    def apply(self, tx: Tx, group: Group, pieces: list[Piece], values: dict[bytes, bytes]) -> int:
        """Replace the old extents that start inside the group with its chunks; returns the
        change in stored bytes. Old extents are read now, not at plan time, so the step can
        be retried (map growth) and needs no staleness check."""
        c = self.content
        first = group.start == self.start
        old = [
            e
            for e in c.extents(tx, self.ino, group.start, group.end)
            if first or e.offset >= group.start
        ]
        removed = c.remove(tx, self.ino, old)
        stored = 0
        store = c.store
        for p in pieces:
            if p.digest is None:
                continue  # all zeros: leave a hole
            plain = self.chunk(p.offset, p.length)
            store.add_ref(tx, p.digest, values.get(p.digest), p.length, plain)
            tx.put(
                b"extents",
                layout.extent_key(self.ino, p.offset),
                layout.extent_value(p.digest, p.length),
            )
            stored += p.length
        return stored - removed


def steps(
    write: Write,
    read_tx: Callable[[], AbstractContextManager[Tx]],
    apply_group: Callable[[Group, list[Piece], dict[bytes, bytes]], None],
) -> Iterator[Future]:
    """Drive a write; yields each future before its result is used.

    ``read_tx()`` gives a transaction to read in (on the store's thread); ``apply_group(group,
    pieces, values)`` applies one group in a write transaction. Up to DEPTH groups are hashed
    and compressing ahead of the one being applied, so the pool stays busy while this thread
    puts chunks into LMDB or waits for a commit's fsync.
    """
    if not write.into_empty:
        with read_tx() as tx:
            write.plan(tx)
    cutting = write.content.pipeline.submit(write.cut, weight=len(write.data))
    yield cutting
    groups = cutting.result()
    hashing = deque(write.hash(g) for g in groups[:DEPTH])
    compressing: deque[tuple[Group, list[Piece], list[Piece], Future]] = deque()
    for i, group in enumerate(groups):
        future = hashing.popleft()
        yield future
        pieces = future.result()
        if i + DEPTH < len(groups):
            hashing.append(write.hash(groups[i + DEPTH]))
        with read_tx() as tx:
            new = write.pick(tx, pieces)
        compressing.append((group, pieces, new, write.compress(new)))
        if len(compressing) >= DEPTH:
            yield from _apply(compressing.popleft(), apply_group)
    while compressing:
        yield from _apply(compressing.popleft(), apply_group)


def _apply(
    item: tuple[Group, list[Piece], list[Piece], Future],
    apply_group: Callable[[Group, list[Piece], dict[bytes, bytes]], None],
) -> Iterator[Future]:
    group, pieces, new, compressing = item
    yield compressing
    values = {p.digest: v for p, v in zip(new, compressing.result(), strict=True)}
    apply_group(group, pieces, values)


def run(write: Write, read_tx, apply_group) -> None:
    """Drive a write on this thread, waiting for each stage in turn."""
    for future in steps(write, read_tx, apply_group):
        future.result()


def truncate(content: Content, tx: Tx, ino: int, new_size: int) -> int:
    """Drop content at and past ``new_size`` (growing needs nothing: the rest is a hole);
    the chunk that straddles the new end is cut again. Returns the change in stored bytes."""
    doomed = content.extents(tx, ino, new_size)
    if not doomed:
        return 0
    first = doomed[0]
    keep = b""
    if first.offset < new_size:
        keep = content._chunks(tx, [first])[0][: new_size - first.offset]
    delta = -content.remove(tx, ino, doomed)
    if keep:
        w = Write(content, ino, first.offset, memoryview(keep))
        applied = []
        run(w, lambda: nullcontext(tx), lambda g, p, v: applied.append(w.apply(tx, g, p, v)))
        delta += sum(applied)
    return delta
