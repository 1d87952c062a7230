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
from dataclasses import dataclass

from casfs.store import layout
from casfs.store.pipeline import Pipeline
from casfs.store.store import Store, Tx

# A write region larger than this is stored in pieces, each in its own pass, so that one
# call never holds gigabytes in memory (appends keep the canonical chunking, see above).
MAX_REGION = 32 << 20


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
        missing = {}
        for e in extents:
            if self.cache.get(e.digest) is None and e.digest not in missing:
                missing[e.digest] = self.store.load_value(tx, e.digest)
        if missing:
            decoded = self.pipeline.decode_many(list(missing.items()))
            for digest, data in zip(missing, decoded, strict=True):
                self.cache.put(digest, data)
                missing[digest] = data
        return [self.cache.get(e.digest) or missing[e.digest] for e in extents]

    def read(self, tx: Tx, ino: int, size: int, offset: int, length: int) -> bytes:
        end = min(size, offset + length)
        if offset >= end:
            return b""
        out = bytearray(end - offset)
        extents = self.extents(tx, ino, offset, end)
        for e, data in zip(extents, self._chunks(tx, extents), strict=True):
            lo = max(e.offset, offset)
            hi = min(e.end, end)
            out[lo - offset : hi - offset] = data[lo - e.offset : hi - e.offset]
        return bytes(out)

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
