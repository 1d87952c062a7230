"""File content: extents over chunks, with holes.

Every extent covers one whole stored chunk; ranges with no extent are holes and read as zeros.
A write re-chunks only the region it touches, widened to the extents it overlaps, so the
bytes newly stored for a 4 KiB overwrite in a 1 GiB file are about one chunk. A write that
continues the file's last extent re-cuts that extent together with the new bytes: the last
extent is the only one whose end was forced by the end of the data, so sequential writes give
exactly the chunks a whole-file cut would (and deduplicate with imported copies).
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass

from casfs.store import layout
from casfs.store.pipeline import Piece, Pipeline
from casfs.store.store import Store, Tx

# A write region larger than this is stored in pieces, each in its own pass, so that one
# call never holds gigabytes in memory (appends keep the canonical chunking, see above).
MAX_REGION = 32 << 20
# How far ahead of a sequential reader chunks are decoded in the background.
READ_AHEAD = 2 << 20


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
        """Plain bytes of each extent's chunk (cache, read-ahead, or decoded now)."""
        job = ReadJob(self, extents)
        job.plan(tx)
        job.resolve()
        job.remember()
        return [job.plain[e.digest] for e in extents]

    def _read_ahead(self, tx: Tx, ino: int, offset: int, end: int) -> None:
        """On sequential reads, start decoding the next READ_AHEAD bytes in the pool, so the
        caller's thread assembles this read while other cores decode the next."""
        if self._last_end.pop(ino, None) != offset:
            self._last_end[ino] = end
            return
        self._last_end[ino] = end
        if len(self._last_end) > 1024:
            self._last_end.clear()
        if len(self._inflight) > 512:  # abandoned read-ahead: let it go
            self._inflight.clear()
        items = []
        for e in self.extents(tx, ino, end, end + READ_AHEAD):
            if e.digest not in self._inflight and self.cache.get(e.digest) is None:
                items.append((e.digest, self.store.load_value(tx, e.digest)))
        if items:
            future = self.pipeline.decode_async(items)
            for index, (digest, _) in enumerate(items):
                self._inflight[digest] = (future, index)

    def read_job(self, tx: Tx, ino: int, size: int, offset: int, length: int) -> ReadJob:
        """Plan a read (on the store's thread); ``job.assemble()`` may then run anywhere."""
        end = min(size, offset + length)
        job = ReadJob(self, self.extents(tx, ino, offset, end) if offset < end else [], offset, end)
        job.plan(tx)
        if offset < end:
            self._read_ahead(tx, ino, offset, end)
        return job

    def read(self, tx: Tx, ino: int, size: int, offset: int, length: int) -> bytes:
        job = self.read_job(tx, ino, size, offset, length)
        data = job.assemble()
        job.remember()
        return data

    # -- write ------------------------------------------------------------------------------

    def write(self, tx: Tx, ino: int, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Store ``data`` at ``offset`` in one transaction (the caller updates the size). Like
        every method that changes extents, returns the change in stored (non-hole) bytes."""
        view = memoryview(data)
        delta = 0
        for start in range(0, len(view), MAX_REGION):
            delta += WriteJob(self, ino, offset + start, view[start : start + MAX_REGION]).run(tx)
        return delta

    def truncate(self, tx: Tx, ino: int, new_size: int) -> int:
        """Drop content at and past ``new_size`` (growing needs nothing: the rest is a hole)."""
        doomed = self.extents(tx, ino, new_size)
        if not doomed:
            return 0
        first = doomed[0]
        keep = b""
        if first.offset < new_size:
            keep = self._chunks(tx, [first])[0][: new_size - first.offset]
        removed = self._remove(tx, ino, doomed)
        return (self._store(tx, ino, first.offset, keep) if keep else 0) - removed

    def drop_all(self, tx: Tx, ino: int) -> int:
        return -self._remove(tx, ino, self.extents(tx, ino))

    def _remove(self, tx: Tx, ino: int, extents: list[Extent]) -> int:
        for e in extents:
            tx.delete(b"extents", layout.extent_key(ino, e.offset))
            self.store.drop_ref(tx, e.digest)
        return sum(e.length for e in extents)

    def _store(self, tx: Tx, ino: int, base: int, region: bytes | bytearray) -> int:
        job = WriteJob(self, ino, base, memoryview(region))
        job.start, job.region, job.old = base, region, []
        job.pieces = self.pipeline.cut_and_hash(region, base)
        job.pick(tx)
        job.compress()
        return job.store(tx)


class ReadJob:
    """The chunks a read needs: planned on the store's thread (``plan``), decoded and joined
    anywhere (``assemble``; decoding verifies every digest), and put in the chunk cache back
    on the store's thread (``remember``)."""

    def __init__(
        self, content: Content, extents: list[Extent], offset: int = 0, end: int = 0
    ) -> None:
        self.content = content
        self.extents = extents
        self.offset = offset
        self.end = end
        self.plain: dict[bytes, bytes] = {}
        self.values: dict[bytes, bytes] = {}
        self.pending: dict[bytes, tuple[Future[list[bytes]], int]] = {}
        self.fresh: list[bytes] = []

    def plan(self, tx: Tx) -> None:
        c = self.content
        for e in self.extents:
            d = e.digest
            if d in self.plain or d in self.values or d in self.pending:
                continue
            data = c.cache.get(d)
            if data is not None:
                self.plain[d] = data
            elif d in c._inflight:
                self.pending[d] = c._inflight.pop(d)
            else:
                self.values[d] = c.store.load_value(tx, d)

    @property
    def ready(self) -> bool:
        """True when assembling needs no decoding: cheap enough for the store's thread."""
        return not self.values and all(f.done() for f, _ in self.pending.values())

    def resolve(self) -> None:
        for d, (future, index) in self.pending.items():
            self.plain[d] = future.result()[index]
        self.fresh.extend(self.pending)
        self.pending = {}
        if self.values:
            decoded = self.content.pipeline.decode_many(list(self.values.items()))
            self.plain.update(zip(self.values, decoded, strict=True))
            self.fresh.extend(self.values)
            self.values = {}

    def assemble(self) -> bytes:
        self.resolve()
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


class StaleWrite(Exception):
    """The extents a write job planned against changed before it was applied."""


class WriteJob:
    """One write of at most MAX_REGION bytes, in stages, so that the CPU work can run on
    worker threads while the store's thread goes on serving other requests::

        plan(tx)  ->  cut()  ->  pick(tx)  ->  compress()  ->  apply(tx)

    The stages that take ``tx`` read or write LMDB and belong on the store's thread; ``cut``
    and ``compress`` touch only the job. ``run`` does all five in one transaction.
    """

    def __init__(self, content: Content, ino: int, offset: int, data: memoryview) -> None:
        self.content = content
        self.ino = ino
        self.offset = offset
        self.data = data
        self.start = offset
        self.old: list[Extent] = []
        self.old_plain: dict[bytes, bytes] = {}
        self.old_values: dict[bytes, bytes] = {}
        self.region: bytes | bytearray = b""
        self.pieces: list[Piece] = []
        self.new: list[Piece] = []
        self.values: dict[bytes, bytes] = {}

    def run(self, tx: Tx) -> int:
        self.plan(tx)
        self.cut()
        self.pick(tx)
        self.compress()
        return self.apply(tx)

    def plan(self, tx: Tx) -> None:
        """Find the extents the write overlaps (and the last one, if the write continues it)
        and fetch what is needed to rebuild the region around the new bytes."""
        c = self.content
        end = self.offset + len(self.data)
        old = c.extents(tx, self.ino, self.offset, end)
        tail = c.last_extent(tx, self.ino)
        if tail is not None and tail.end == self.offset and (not old or old[0] != tail):
            old.insert(0, tail)  # continue the last chunk: keep sequential writes canonical
        self.old = old
        self.start = min([self.offset] + [e.offset for e in old[:1]])
        for e in old:
            plain = c.cache.get(e.digest)
            if plain is not None:
                self.old_plain[e.digest] = plain
            elif e.digest not in self.old_values:
                self.old_values[e.digest] = c.store.load_value(tx, e.digest)

    def cut(self) -> None:
        """Rebuild the region (old bytes around the new ones), cut and hash it."""
        c = self.content
        if self.old_values:
            decoded = c.pipeline.decode_many(list(self.old_values.items()))
            self.old_plain.update(zip(self.old_values, decoded, strict=True))
        end = self.offset + len(self.data)
        stop = max([end] + [e.end for e in self.old[-1:]])
        if not self.old and self.start == self.offset:
            self.region = self.data  # nothing to merge: cut the caller's bytes as they are
        else:
            region = bytearray(stop - self.start)
            for e in self.old:
                region[e.offset - self.start : e.end - self.start] = self.old_plain[e.digest]
            region[self.offset - self.start : end - self.start] = self.data
            self.region = region
        self.pieces = c.pipeline.cut_and_hash(self.region, self.start)

    def pick(self, tx: Tx) -> None:
        """Which chunks the store does not hold yet (each once): only those are compressed."""
        seen: set[bytes] = set()
        self.new = []
        for p in self.pieces:
            if p.digest is not None and p.digest not in seen:
                seen.add(p.digest)
                if not self.content.store.has_object(tx, p.digest):
                    self.new.append(p)

    def compress(self) -> None:
        view = memoryview(self.region)
        chunks = [view[p.offset - self.start : p.offset - self.start + p.length] for p in self.new]
        values = self.content.pipeline.compress(chunks)
        self.values = {p.digest: v for p, v in zip(self.new, values, strict=True)}

    def apply(self, tx: Tx) -> int:
        """Replace the planned extents with the new chunks; the change in stored bytes."""
        c = self.content
        stop = self.start + len(self.region)
        if c.extents(tx, self.ino, self.start, stop) != self.old:
            raise StaleWrite(self.ino)
        removed = c._remove(tx, self.ino, self.old)  # first: new extents may reuse the keys
        return self.store(tx) - removed

    def store(self, tx: Tx) -> int:
        c = self.content
        stored = 0
        view = memoryview(self.region)
        for p in self.pieces:
            if p.digest is None:
                continue  # all zeros: leave a hole
            value = self.values.get(p.digest)
            if value is None and not c.store.has_object(tx, p.digest):
                # freed since pick (or earlier in this transaction): encode it now
                value = c.store.codec.encode(
                    view[p.offset - self.start : p.offset - self.start + p.length]
                )
                self.values[p.digest] = value
            c.store.add_ref(tx, p.digest, value, p.length)
            tx.put(
                b"extents",
                layout.extent_key(self.ino, p.offset),
                layout.extent_value(p.digest, p.length),
            )
            stored += p.length
        return stored
