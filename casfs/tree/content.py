"""File content: extents over chunks, with holes; reading it back.

Every extent covers one whole stored chunk; ranges with no extent are holes and read as zeros.
Writing is :mod:`casfs.tree.writer`'s job.
"""

from __future__ import annotations

import bisect
import errno
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from casfs.errors import CasfsError, CorruptObject
from casfs.store import layout
from casfs.store.packs import packable
from casfs.store.pipeline import Pipeline
from casfs.store.store import Store, Tx

# How far ahead of a sequential reader chunks are decoded in the background.
READ_AHEAD = 2 << 20
SMALL_READ = 64 << 10  # a read of at most this many bytes takes decoded packs' chunks inline


_ZEROS = bytes(1 << 20)


def _zeros(n: int) -> bytes | memoryview:
    return memoryview(_ZEROS)[:n] if n <= len(_ZEROS) else bytes(n)


@dataclass(frozen=True, slots=True)
class Extent:
    offset: int
    length: int
    digest: bytes

    @property
    def end(self) -> int:
        return self.offset + self.length


ExtentSource = Callable[[int, int], list[Extent]]


def overlapping(extents: list[Extent], start: int, end: int) -> list[Extent]:
    """The extents of a sorted list that overlap [start, end)."""
    i = max(bisect.bisect_right(extents, start, key=lambda e: e.offset) - 1, 0)
    out = []
    for e in extents[i:]:
        if e.offset >= end:
            break
        if e.end > start:
            out.append(e)
    return out


def file_extents(tx: Tx, ino: int) -> list[Extent]:
    """Every extent of a file, in order."""
    found = []
    for key, value in tx.prefix(b"extents", layout.ino_key(ino)):
        digest, length = layout.read_extent_value(value)
        found.append(Extent(layout.read_extent_key(key)[1], length, digest))
    return found


class ChunkCache:
    """Decoded chunks by digest, least recently used out first. Content-addressed data never
    changes, so an entry is never stale."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0

    def get(self, digest: bytes) -> bytes | None:
        data = self._items.get(digest)
        if data is not None:
            self._items.move_to_end(digest)
        return data

    def put(self, digest: bytes, data: bytes) -> None:
        if digest in self._items or len(data) > self.max_bytes:
            return
        self._items[digest] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self._bytes -= len(old)


class Content:
    def __init__(self, store: Store, pipeline: Pipeline, cache_bytes: int = 64 << 20) -> None:
        self.store = store
        self.pipeline = pipeline
        self.cache = ChunkCache(cache_bytes)
        self._inflight: dict[bytes, tuple[Future[list[bytes]], int]] = {}
        self._last_end: dict[int, int] = {}  # ino -> where its last read ended

    # -- extents ----------------------------------------------------------------------------

    def extents(self, tx: Tx, ino: int, start: int = 0, end: int | None = None) -> list[Extent]:
        """Extents that overlap [start, end), in order."""
        prefix = layout.ino_key(ino)
        first = layout.extent_key(ino, start)
        cur = tx.cursor(b"extents")
        # Position on the last extent starting at or before ``start`` (it may cover it),
        # else on the first one after.
        if not cur.set_range(first):
            if not cur.last():
                return []
        elif cur.key() != first and not cur.prev():
            cur.first()
        if not cur.key().startswith(prefix) and not cur.next():
            return []
        found: list[Extent] = []
        for key, value in cur:
            if not key.startswith(prefix):
                break
            _, offset = layout.read_extent_key(key)
            if end is not None and offset >= end:
                break
            digest, length = layout.read_extent_value(value)
            if offset + length > start:
                found.append(Extent(offset, length, digest))
        return found

    def last_extent(self, tx: Tx, ino: int) -> Extent | None:
        cur = tx.cursor(b"extents")
        if cur.set_range(layout.extent_key(ino + 1, 0)):
            ok = cur.prev()
        else:
            ok = cur.last()
        if not ok or not cur.key().startswith(layout.ino_key(ino)):
            return None
        _, offset = layout.read_extent_key(cur.key())
        digest, length = layout.read_extent_value(cur.value())
        return Extent(offset, length, digest)

    # -- read -------------------------------------------------------------------------------

    def _chunks(self, tx: Tx, extents: list[Extent]) -> list[bytes]:
        """Plain bytes of each extent's chunk (cache, read-ahead, or read now)."""
        job = ReadJob(self, extents)
        job.plan(tx)
        job.finish(tx)
        job.remember()
        return [job.plain[e.digest] for e in extents]

    def _read_ahead(
        self, ino: int, offset: int, end: int, source: ExtentSource, job: ReadJob
    ) -> None:
        """On sequential reads, start reading and decoding the next READ_AHEAD bytes in the
        pool, so that the caller's thread assembles this read while other cores prepare the
        next."""
        if self._last_end.pop(ino, None) != offset:
            self._last_end[ino] = end
            return
        self._last_end[ino] = end
        if len(self._last_end) > 1024:
            self._last_end.clear()
        if len(self._inflight) > 512:  # abandoned read-ahead: let it go
            self._inflight.clear()
        wanted = list(
            dict.fromkeys(
                e.digest
                for e in source(end, end + READ_AHEAD)
                if e.digest not in self._inflight
                and e.digest not in job.pending  # (the chunk that straddles ``end``)
                and e.digest not in job.plain
                and self.cache.get(e.digest) is None
            )
        )
        if wanted:
            future = self.pipeline.read_async(wanted)
            for index, digest in enumerate(wanted):
                self._inflight[digest] = (future, index)

    def read_job(
        self,
        tx: Tx,
        ino: int,
        size: int,
        offset: int,
        length: int,
        extents: list[Extent] | None = None,
    ) -> ReadJob:
        """Plan a read (on the store's thread): the pool reads and decodes what it needs
        (``job.futures()`` to wait for), then ``job.finish(tx)`` on the store's thread and
        ``job.assemble()`` anywhere, or ``job.complete(tx)`` for all of it. The extents are the
        live file's, or the given list (a snapshot's file, with ``ino`` its mount's inode
        number)."""

        def source(start: int, stop: int) -> list[Extent]:
            if extents is None:
                return self.extents(tx, ino, start, stop)
            return overlapping(extents, start, stop)

        end = min(size, offset + length)
        job = ReadJob(self, source(offset, end) if offset < end else [], offset, end)
        job.plan(tx)
        if offset < end:
            self._read_ahead(ino, offset, end, source, job)
        return job

    def read(self, tx: Tx, ino: int, size: int, offset: int, length: int) -> bytes:
        return self.read_job(tx, ino, size, offset, length).complete(tx)

    # -- removing ---------------------------------------------------------------------------

    def drop_all(self, tx: Tx, ino: int) -> int:
        return -self.remove(tx, ino, self.extents(tx, ino))

    def remove(self, tx: Tx, ino: int, extents: list[Extent]) -> int:
        """Delete extents and drop their chunks' references; returns the bytes removed."""
        for e in extents:
            tx.delete(b"extents", layout.extent_key(ino, e.offset))
            self.store.drop_ref(tx, e.digest)
        return sum(e.length for e in extents)


class ReadRaced(CasfsError):
    """A chunk a read planned is gone when the read finishes in a later transaction: the
    file changed in between (a rollback or restore replaces files without their inode
    locks). The caller plans the read again."""

    def __init__(self, digest: bytes) -> None:
        super().__init__(f"chunk {digest.hex()} went away during the read", errno.EIO)
        self.digest = digest


class ReadJob:
    """The chunks a read needs: planned on the store's thread (``plan``: from the chunk cache,
    the read-ahead, or a new task in the pool), waited for (``futures``), completed on
    the store's thread (``finish``: what the pool could not see, chunks of the open batch, is
    loaded there), joined anywhere (``assemble``) and put in the chunk cache back on the
    store's thread (``remember``)."""

    def __init__(
        self, content: Content, extents: list[Extent], offset: int = 0, end: int = 0
    ) -> None:
        self.content = content
        self.extents = extents
        self.offset = offset
        self.end = end
        self.plain: dict[bytes, bytes] = {}
        self.pending: dict[bytes, tuple[Future[list[bytes | CorruptObject | None]], int]] = {}
        self.fresh: list[bytes] = []

    def plan(self, tx: Tx) -> None:
        c = self.content
        wanted: dict[bytes, None] = {}  # (ordered, no repeats)
        # A small read takes packed chunks from packs decoded already, here: a hop to the
        # read threads costs more (a large one leaves even that work to them).
        small = sum(e.length for e in self.extents) <= SMALL_READ
        for e in self.extents:
            d = e.digest
            if d in self.plain or d in self.pending or d in wanted:
                continue
            data = c.cache.get(d)
            if data is None and small and packable(e.length):
                data = c.store.packed_if_decoded(tx, d)
            if data is not None:
                self.plain[d] = data
            elif d in c._inflight:
                self.pending[d] = c._inflight.pop(d)
            else:
                wanted[d] = None
        if wanted:
            future = c.pipeline.read_async(list(wanted))
            for index, d in enumerate(wanted):
                self.pending[d] = (future, index)

    def futures(self) -> list[Future]:
        return list({id(f): f for f, _ in self.pending.values()}.values())

    @property
    def needs_store(self) -> bool:
        """True when finishing must load something the pool could not see (the pool's work
        done): only then does :meth:`finish` need a transaction."""
        return any(f.result()[i] is None for f, i in self.pending.values())

    def finish(self, tx: Tx | None) -> None:
        """Take the pool's results (waiting for them if need be); load and decode here, in
        ``tx`` (the store's thread's), what it could not see. Raises CorruptObject for a
        chunk that does not verify."""
        store = self.content.store
        for d, (future, index) in self.pending.items():
            got = future.result()[index]
            if got is None:  # in the open batch (or gone): the owner's transaction sees it
                assert tx is not None, "needs_store: finish in a transaction"
                if not store.has_object(tx, d):
                    raise ReadRaced(d)
                got = store.load(tx, d)
            elif isinstance(got, CorruptObject):
                raise got
            self.plain[d] = got
        store.mapped.touched()  # what the pool's lookups mapped (it unmaps the values itself)
        self.fresh.extend(self.pending)
        self.pending = {}

    def complete(self, tx: Tx) -> bytes:
        """The read's bytes, from planned to remembered, on the store's thread."""
        self.finish(tx)
        data = self.assemble()
        self.remember()
        return data

    def assemble(self) -> bytes:
        assert not self.pending, "finish() first"
        parts: list[bytes | memoryview] = []
        pos = self.offset
        for e in self.extents:
            lo = max(e.offset, self.offset)
            if lo > pos:
                parts.append(_zeros(lo - pos))
            pos = min(e.end, self.end)
            parts.append(memoryview(self.plain[e.digest])[lo - e.offset : pos - e.offset])
        if self.end > pos:
            parts.append(_zeros(self.end - pos))
        return b"".join(parts)  # the one copy

    def remember(self) -> None:
        for d in self.fresh:
            self.content.cache.put(d, self.plain[d])
