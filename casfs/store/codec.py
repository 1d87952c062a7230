"""Chunk encoding: BLAKE3-256 addressing, zstd compression, and digest verification on decode.

Pure functions of their inputs, safe to call from worker threads: BLAKE3 and zstd release the
GIL, so a pool of threads keeps every core busy. zstd contexts are not thread-safe, hence one
per thread.
"""

from __future__ import annotations

import threading

import blake3
import zstandard

from casfs.errors import CorruptObject
from casfs.store import layout

# Compression must save at least this fraction to be kept; otherwise the chunk is stored raw
# (incompressible data then costs no decompression on read).
MIN_SAVING = 0.03


def digest_of(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def chunk_digest(chunk: bytes | memoryview) -> bytes | None:
    """A chunk's digest, or None for an all-zero chunk (stored as a hole, not an object)."""
    return None if _is_zero(chunk) else digest_of(chunk)


_ZERO = bytes(1 << 20)


def _is_zero(chunk: bytes | memoryview) -> bool:
    n = len(chunk)
    if not n or chunk[0] or chunk[n - 1] or chunk[n // 2]:
        return False
    plain = bytes(chunk)  # (comparing memoryviews goes byte by byte: 30x slower)
    return plain == _ZERO[:n] if n <= len(_ZERO) else plain.count(0) == n


class Codec:
    """Encodes plain chunks into ``objects`` values and back, for one zstd level."""

    def __init__(self, zstd_level: int) -> None:
        self.zstd_level = zstd_level
        self._local = threading.local()

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.zstd_level)
        return c

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        d = getattr(self._local, "d", None)
        if d is None:
            d = self._local.d = zstandard.ZstdDecompressor()
        return d

    def encode(self, plain: bytes | memoryview, kind: int = layout.KIND_CHUNK) -> bytes:
        """The ``objects`` value for ``plain``: header byte + zstd frame or raw bytes."""
        packed = self._compressor().compress(plain)
        if len(packed) <= len(plain) * (1 - MIN_SAVING):
            return layout.object_header(kind, layout.CODEC_ZSTD) + packed
        return layout.object_header(kind, layout.CODEC_RAW) + bytes(plain)

    def decompress(self, frame: bytes | memoryview) -> bytes:
        """One zstd frame's bytes (raises zstandard.ZstdError)."""
        return self._decompressor().decompress(frame)

    def decode(self, digest: bytes, value: bytes | memoryview) -> bytes:
        """Plain bytes of a stored object, verified against ``digest``.

        Raises :class:`CorruptObject` naming the digest when the bytes do not match: a flipped
        bit on disk becomes an error, never wrong data.
        """
        if len(value) < 1:
            raise CorruptObject(digest, "empty value")
        codec = value[0] & 0x0F
        payload = memoryview(value)[1:]
        if codec == layout.CODEC_RAW:
            plain = bytes(payload)
        elif codec == layout.CODEC_ZSTD:
            try:
                plain = self.decompress(payload)
            except zstandard.ZstdError as exc:
                raise CorruptObject(digest, f"zstd frame does not decode ({exc})") from None
        else:
            raise CorruptObject(digest, f"unknown codec {codec}")
        if digest_of(plain) != digest:
            raise CorruptObject(digest, "content does not match its digest")
        return plain
