"""What the last import of a source directory saw: the files cache that makes imports
incremental (as borg's files cache does).

One file per source directory in the store's ``imports/`` folder, written whole after each
import succeeds. For every path it keeps the snapshot inode number given to it and the (type,
size, mtime, ctime, inode) seen, so that importing an unchanged tree again yields the very same
tree objects (and so the same digests: no new objects, and a diff that skips it at once). A
path whose five values match is not read again: a file's content and a symlink's target are
taken from here (a file's once the store confirms it still holds those objects), and so is the
atime recorded when it was read, because reading it may have moved its atime (readlink always
can, and a file or directory opened by someone who may not use ``O_NOATIME``). The cache
holds no references, so it can never keep anything alive or be wrong for long: a damaged or
unreadable cache file is simply ignored (the import then reads everything).
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

import zstandard

from casfs.store.codec import digest_of
from casfs.tree.content import Extent

FOLDER = "imports"
_MAGIC = b"CASFSIC2"
# path length, snapshot ino, mode, size, mtime, ctime, source ino, atime, data bytes, extents,
# target length
_ROW = struct.Struct(">HQIQqqQqQHH")
_EXTENT = struct.Struct(">QI32s")


@dataclass(frozen=True, slots=True)
class Seen:
    """One path of the last import. For a regular file, ``digest`` names its manifest (large
    file) or ``extents`` lists its chunks (small file); a symlink has its ``target``. A
    ``mode`` of 0 never matches (a file that changed while it was read)."""

    ino: int
    mode: int = 0
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    source_ino: int = 0
    atime_ns: int = 0
    data_bytes: int = 0
    digest: bytes = b""
    extents: tuple[Extent, ...] = ()
    target: bytes = b""

    def matches(self, st: os.stat_result) -> bool:
        """The source path looks untouched since: same type, size, mtime, ctime and inode."""
        return (
            self.mode != 0
            and stat.S_IFMT(self.mode) == stat.S_IFMT(st.st_mode)
            and self.size == st.st_size
            and self.mtime_ns == st.st_mtime_ns
            and self.ctime_ns == st.st_ctime_ns
            and self.source_ino == st.st_ino
        )


def cache_path(store_path: str, source: bytes) -> str:
    """The cache file of the absolute source path ``source``."""
    name = digest_of(source).hex()[:32]
    return os.path.join(store_path, FOLDER, name)


def load(store_path: str, source: bytes) -> dict[bytes, Seen]:
    """The last import's paths (relative, '/'-separated), or {} when there is none usable."""
    try:
        with open(cache_path(store_path, source), "rb") as f:
            raw = zstandard.ZstdDecompressor().decompress(f.read())
        return _decode(raw, source)
    except (OSError, zstandard.ZstdError, struct.error, ValueError, IndexError):
        return {}


def save(store_path: str, source: bytes, seen: dict[bytes, Seen]) -> None:
    """Replace the cache of ``source`` (atomically: a crash leaves the old one or the new)."""
    folder = os.path.join(store_path, FOLDER)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = cache_path(store_path, source)
    data = zstandard.ZstdCompressor(level=3).compress(_encode(seen, source))
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _encode(seen: dict[bytes, Seen], source: bytes) -> bytes:
    out = [_MAGIC, struct.pack(">H", len(source)), source]
    for path, s in seen.items():
        row = (s.ino, s.mode, s.size, s.mtime_ns, s.ctime_ns, s.source_ino, s.atime_ns)
        out.append(_ROW.pack(len(path), *row, s.data_bytes, len(s.extents), len(s.target)))
        out.append(path)
        out.append(s.digest or bytes(32))
        out.extend(_EXTENT.pack(x.offset, x.length, x.digest) for x in s.extents)
        out.append(s.target)
    return b"".join(out)


def _decode(raw: bytes, source: bytes) -> dict[bytes, Seen]:
    if not raw.startswith(_MAGIC):
        raise ValueError("not a files cache")
    pos = len(_MAGIC)
    (n,) = struct.unpack_from(">H", raw, pos)
    pos += 2
    if raw[pos : pos + n] != source:
        raise ValueError("cache of another source")  # a hash collision of the file name
    pos += n
    seen: dict[bytes, Seen] = {}
    while pos < len(raw):
        plen, ino, mode, size, mt, ct, sino, at, data_bytes, nx, tlen = _ROW.unpack_from(raw, pos)
        pos += _ROW.size
        path = raw[pos : pos + plen]
        digest = raw[pos + plen : pos + plen + 32]
        pos += plen + 32
        extents = tuple(Extent(*x) for x in _EXTENT.iter_unpack(raw[pos : pos + nx * 44]))
        pos += nx * _EXTENT.size
        target = raw[pos : pos + tlen]
        pos += tlen
        if digest == bytes(32):
            digest = b""
        seen[path] = Seen(ino, mode, size, mt, ct, sino, at, data_bytes, digest, extents, target)
    return seen
