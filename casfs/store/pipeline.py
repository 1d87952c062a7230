"""The ingest and read-back pipelines: chunk, hash and compress on all cores; decode likewise.

Cutting is done by the caller's thread (FastCDC runs at GB/s); BLAKE3 and zstd release the
GIL, so chunks are hashed, compressed and decoded by a thread pool, one share of the work per
core (a task per 64 KiB chunk would cost more in scheduling than in work). An all-zero chunk
becomes a hole instead of an object. Which chunks are new, and so need compressing, is the
store's question, asked by the caller between ``cut_and_hash`` and ``compress``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from casfs.store.chunker import Chunker
from casfs.store.codec import digest_of
from casfs.store.store import Store

# Work smaller than this runs on the calling thread: a thread hop costs more.
SPREAD_MIN_BYTES = 256 << 10
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Piece:
    """One chunk of a cut buffer; ``digest`` is None for an all-zero chunk (a hole)."""

    offset: int
    length: int
    digest: bytes | None


class Pipeline:
    """The CPU-heavy steps, spread over a thread pool. Nothing here touches LMDB: the store's
    transactions stay on the thread that owns them."""

    def __init__(self, store: Store, workers: int | None = None) -> None:
        self.store = store
        self.chunker = Chunker(store.params)
        self.workers = workers or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="casfs-codec")

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def _spread(
        self, fn: Callable[[Sequence[T]], list[R]], items: Sequence[T], weight: int
    ) -> list[R]:
        """``fn`` over ``items`` in one share per core (this thread takes the first), or all
        here when the work (``weight`` bytes) is too small to be worth a thread hop."""
        shares = min(self.workers, len(items))
        if shares < 2 or weight < SPREAD_MIN_BYTES:
            return fn(items)
        step = -(-len(items) // shares)
        parts = [items[i : i + step] for i in range(0, len(items), step)]
        futures = [self._pool.submit(fn, part) for part in parts[1:]]
        out = fn(parts[0])
        for f in futures:
            out.extend(f.result())
        return out

    # -- ingest -----------------------------------------------------------------------------

    def cut_and_hash(self, buf: bytes | bytearray | memoryview, base: int = 0) -> list[Piece]:
        """Cut ``buf`` into chunks and hash them; offsets are ``base`` + position in buf."""
        view = memoryview(buf)
        spans = []
        pos = 0
        for length in self.chunker.cut(view):
            spans.append((pos, length))
            pos += length

        def hash_spans(part: Sequence[tuple[int, int]]) -> list[Piece]:
            out = []
            for p, n in part:
                chunk = view[p : p + n]
                out.append(Piece(base + p, n, None if _is_zero(chunk) else digest_of(chunk)))
            return out

        return self._spread(hash_spans, spans, len(view))

    def compress(self, chunks: Sequence[memoryview | bytes]) -> list[bytes]:
        """``objects`` values for plain chunks, on all cores."""
        encode = self.store.codec.encode
        return self._spread(lambda part: [encode(c) for c in part], chunks, sum(map(len, chunks)))

    # -- read-back --------------------------------------------------------------------------

    def decode_async(self, items: Sequence[tuple[bytes, bytes]]) -> Future[list[bytes]]:
        """Decode in the pool; the future's result (or CorruptObject) comes later."""
        decode = self.store.codec.decode
        return self._pool.submit(lambda: [decode(d, v) for d, v in items])

    def decode_many(self, items: Sequence[tuple[bytes, bytes]]) -> list[bytes]:
        """Decode (digest, stored value) pairs, verifying each, on all cores."""
        decode = self.store.codec.decode
        return self._spread(
            lambda part: [decode(d, v) for d, v in part], items, sum(len(v) for _, v in items)
        )


_ZERO = bytes(1 << 20)


def _is_zero(chunk: memoryview) -> bool:
    n = len(chunk)
    if not n or chunk[0] or chunk[n - 1] or chunk[n // 2]:
        return False
    if n <= len(_ZERO):
        return chunk.tobytes() == _ZERO[:n]
    return chunk.tobytes().count(0) == n
