"""Content identity: the ``user.casfs.digest`` of a regular file, the same for two files
exactly when their contents are equal (within one store, or stores with the same chunk
parameters), found without reading the data in the common case.

FastCDC cut points depend only on the bytes before them, so one cut of a whole file from its
first byte gives one chunk list per content: equal contents, equal lists. The digest is
BLAKE3 over the chunk parameters and that list in order: a stored chunk as (length, its
BLAKE3), and a run of all-zero chunks (stored as holes) as its length. Both sides are thus
a function of the bytes alone, and BLAKE3 makes unequal bytes give unequal digests.

Writes keep a file's chunks those of one whole-file cut when they go in order: a new file
written from its start, appends to a file ending in a stored chunk (the writer cuts that
chunk again with the new bytes), and truncation. Any other write (in the middle, past the
end, growing by truncate) marks the file in the ``recut`` table (snapshots carry the mark in
their entries); such a file's digest is found by reading and cutting it again, nothing stored
changes, and the mount remembers the result until the file changes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import blake3

if TYPE_CHECKING:  # (``casfs digest`` of a mounted file needs none of them)
    from casfs.store.chunker import ChunkParams
    from casfs.store.pipeline import Pipeline
    from casfs.tree.content import Extent

XATTR = b"user.casfs.digest"
RESERVED_PREFIX = b"user.casfs."  # names casfs serves itself: read-only, never stored
READ_BLOCK = 8 << 20

_DATA = struct.Struct(">cQ32s")
_ZEROS = struct.Struct(">cQ")


class _Digest:
    """The running digest of a chunk list; runs of zeros are merged as they come."""

    def __init__(self, params: ChunkParams) -> None:
        self.h = blake3.blake3(b"casfs-content-v1" + struct.pack(">QQQ", *_params(params)))
        self.pos = 0

    def chunk(self, offset: int, length: int, digest: bytes) -> None:
        self._zeros_until(offset)
        self.h.update(_DATA.pack(b"D", length, digest))
        self.pos = offset + length

    def _zeros_until(self, offset: int) -> None:
        if offset > self.pos:
            self.h.update(_ZEROS.pack(b"Z", offset - self.pos))
            self.pos = offset

    def finish(self, size: int) -> bytes:
        self._zeros_until(size)
        return self.h.hexdigest().encode()


def _params(p: ChunkParams) -> tuple[int, int, int]:
    return (p.min, p.avg, p.max)


def of_extents(params: ChunkParams, size: int, extents: list[Extent]) -> bytes:
    """The digest of a file whose extents are one whole-file cut (no ``recut`` mark)."""
    d = _Digest(params)
    for x in extents:
        d.chunk(x.offset, x.length, x.digest)
    return d.finish(size)


def by_reading(
    pipeline: Pipeline, size: int, read: Callable[[int, int], bytes]
) -> Iterator[bytes | None]:
    """The digest of a file of ``size`` bytes read with ``read(offset, length)``, cut again
    as one whole file. A generator: it yields None after each block read (so the mount can
    serve other requests) and the digest last."""
    d = _Digest(pipeline.store.params)
    blocks: list[bytes] = []

    def source() -> Iterator[bytes]:
        for offset in range(0, size, READ_BLOCK):
            block = read(offset, min(READ_BLOCK, size - offset))
            blocks.append(block)
            yield block

    for piece, _ in pipeline.cut_stream(source()):
        if piece.digest is not None:
            d.chunk(piece.offset, piece.length, piece.digest)
        if blocks:
            blocks.clear()
            yield None
    yield d.finish(size)


def run(steps: Iterator[bytes | None]) -> bytes:
    """Drive :func:`by_reading` to its end (outside the mount)."""
    *_, digest = steps
    assert digest is not None
    return digest


def steps(
    pipeline: Pipeline,
    size: int,
    extents: list[Extent],
    recut: bool,
    read: Callable[[int, int], bytes],
) -> Iterator[bytes | None]:
    """Steps to a file's digest (see :func:`by_reading`): from its extents at once, or by
    reading it when it carries the ``recut`` mark."""
    if recut:
        return by_reading(pipeline, size, read)
    return iter([of_extents(pipeline.store.params, size, extents)])
