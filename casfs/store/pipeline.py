"""The ingest and read-back pipelines: chunk, hash and compress on all cores; decode likewise.

Cutting is done by the caller's thread (FastCDC runs at GB/s); BLAKE3 and zstd release the
GIL, so chunks are hashed and compressed by a thread pool in groups of about a megabyte (a
task per 64 KiB chunk would cost more in scheduling than in work). A chunk that the store
already holds (in committed state, or earlier in the same call) is not compressed again, and
an all-zero chunk becomes a hole instead of an object.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from casfs.store.chunker import Chunker
from casfs.store.codec import digest_of
from casfs.store.store import Store

GROUP_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class Piece:
    """One chunk of ingested data. ``digest`` is None for an all-zero chunk (a hole);
    ``value`` is None when the store already has the object."""

    offset: int
    length: int
    digest: bytes | None
    value: bytes | None


class Pipeline:
    def __init__(self, store: Store, workers: int | None = None) -> None:
        self.store = store
        self.chunker = Chunker(store.params)
        self.workers = workers or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="casfs-codec")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    # -- ingest -----------------------------------------------------------------------------

    def encode(self, buf: bytes | bytearray | memoryview, base: int = 0) -> list[Piece]:
        """Cut ``buf`` into chunks and encode them; offsets are ``base`` + position in buf."""
        view = memoryview(buf)
        lengths = self.chunker.cut(view)
        groups: list[list[tuple[int, int]]] = [[]]
        size = 0
        pos = 0
        for length in lengths:
            if size >= GROUP_BYTES:
                groups.append([])
                size = 0
            groups[-1].append((pos, length))
            size += length
            pos += length
        if len(groups) == 1 or self.workers == 1:
            results = [self._encode_group(view, g) for g in groups]
        else:
            results = list(self._pool.map(lambda g: self._encode_group(view, g), groups))
        pieces: list[Piece] = []
        seen: set[bytes] = set()
        for group in results:
            for pos, length, digest, value in group:
                if digest is not None and value is not None:
                    if digest in seen:
                        value = None
                    else:
                        seen.add(digest)
                pieces.append(Piece(base + pos, length, digest, value))
        return pieces

    def _encode_group(
        self, view: memoryview, group: Sequence[tuple[int, int]]
    ) -> list[tuple[int, int, bytes | None, bytes | None]]:
        out = []
        codec = self.store.codec
        for pos, length in group:
            chunk = view[pos : pos + length]
            if _is_zero(chunk):
                out.append((pos, length, None, None))
                continue
            digest = digest_of(chunk)
            value = None if self.store.has_committed(digest) else codec.encode(chunk)
            out.append((pos, length, digest, value))
        return out

    # -- read-back --------------------------------------------------------------------------

    def decode_async(self, items: Sequence[tuple[bytes, bytes]]) -> Future[list[bytes]]:
        """Decode in the pool; the future's result (or CorruptObject) comes later."""
        decode = self.store.codec.decode
        return self._pool.submit(lambda: [decode(d, v) for d, v in items])

    def decode_many(self, items: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
        """Decode (digest, stored value) pairs, verifying each, on all cores: the caller's
        thread takes the first share and the pool the others (one task per share, not per
        chunk: a future costs about as much as decoding a small chunk)."""
        decode = self.store.codec.decode
        shares = min(self.workers, len(items) // 2)
        if shares < 2:
            return [decode(d, v) for d, v in items]
        step = -(-len(items) // shares)
        parts = [items[i : i + step] for i in range(0, len(items), step)]
        futures = [self._pool.submit(lambda p: [decode(d, v) for d, v in p], p) for p in parts[1:]]
        out = [decode(d, v) for d, v in parts[0]]
        for f in futures:
            out.extend(f.result())
        return out


_ZERO = bytes(1 << 20)


def _is_zero(chunk: memoryview) -> bool:
    n = len(chunk)
    if not n or chunk[0] or chunk[n - 1] or chunk[n // 2]:
        return False
    if n <= len(_ZERO):
        return chunk.tobytes() == _ZERO[:n]
    return chunk.tobytes().count(0) == n
