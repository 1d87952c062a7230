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
from casfs.store.pipeline import Pipeline
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
        """Plain bytes of each extent's chunk: from the cache, from read-ahead, or decoded
        now (on all cores)."""
        got: dict[bytes, bytes] = {}
        missing: dict[bytes, bytes] = {}
        for e in extents:
            d = e.digest
            if d in got or d in missing:
                continue
            data = self.cache.get(d)
            pending = self._inflight.pop(d, None) if data is None else None
            if pending is not None:
                future, index = pending
                data = future.result()[index]
                self.cache.put(d, data)
            if data is None:
                missing[d] = self.store.load_value(tx, d)
            else:
                got[d] = data
        if missing:
            decoded = self.pipeline.decode_many(list(missing.items()))
            for d, data in zip(missing, decoded, strict=True):
                self.cache.put(d, data)
                got[d] = data
        return [got[e.digest] for e in extents]

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

    def read(self, tx: Tx, ino: int, size: int, offset: int, length: int) -> bytes:
        end = min(size, offset + length)
        if offset >= end:
            return b""
        extents = self.extents(tx, ino, offset, end)
        self._read_ahead(tx, ino, offset, end)
        parts: list[bytes | memoryview] = []
        pos = offset
        for e, data in zip(extents, self._chunks(tx, extents), strict=True):
            lo = max(e.offset, offset)
            if lo > pos:
                parts.append(_zeros(lo - pos))
            pos = min(e.end, end)
            parts.append(memoryview(data)[lo - e.offset : pos - e.offset])
        if end > pos:
            parts.append(_zeros(end - pos))
        return b"".join(parts)  # the one copy

    # -- write ------------------------------------------------------------------------------

    def write(self, tx: Tx, ino: int, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Store ``data`` at ``offset`` (the caller updates the size). Like every method that
        changes extents, returns the change in the file's stored (non-hole) bytes."""
        view = memoryview(data)
        delta = 0
        for start in range(0, len(view), MAX_REGION):
            delta += self._write_region(tx, ino, offset + start, view[start : start + MAX_REGION])
        return delta

    def _write_region(self, tx: Tx, ino: int, offset: int, data: memoryview) -> int:
        end = offset + len(data)
        old = self.extents(tx, ino, offset, end)
        tail = self.last_extent(tx, ino)
        if tail is not None and tail.end == offset and (not old or old[0] != tail):
            old.insert(0, tail)  # continue the last chunk: keep sequential writes canonical
        start = min([offset] + [e.offset for e in old[:1]])
        stop = max([end] + [e.end for e in old[-1:]])
        region = bytearray(stop - start)
        for e, chunk in zip(old, self._chunks(tx, old), strict=True):
            region[e.offset - start : e.end - start] = chunk
        region[offset - start : end - start] = data
        removed = self._remove(tx, ino, old)  # first: new extents may reuse the same keys
        return self._store(tx, ino, start, region) - removed

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
        stored = 0
        for piece in self.pipeline.encode(region, base):
            if piece.digest is None:
                continue  # all zeros: leave a hole
            value = piece.value
            if value is None and not self.store.has_object(tx, piece.digest):
                # committed before, but freed earlier in this transaction
                plain = memoryview(region)[piece.offset - base : piece.offset - base + piece.length]
                value = self.store.codec.encode(plain)
            self.store.add_ref(tx, piece.digest, value, piece.length)
            tx.put(
                b"extents",
                layout.extent_key(ino, piece.offset),
                layout.extent_value(piece.digest, piece.length),
            )
            stored += piece.length
        return stored
