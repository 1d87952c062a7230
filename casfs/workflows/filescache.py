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

import marshal
import os
import stat
from typing import NamedTuple

import zstandard

from casfs.store.codec import digest_of

FOLDER = "imports"
_FORMAT = 4


class Seen(NamedTuple):
    """One path of the last import. For a regular file, ``digest`` names its manifest (large
    file) or ``extents`` lists its chunks as (offset, length, digest) (small file); a symlink
    has its ``target``; a directory has its tree object's ``digest`` and ``totals`` (files,
    dirs, bytes). A ``mode`` of 0 never matches (a file that changed while it was read, a
    directory with a child that could not be imported). Plain tuples inside, so the whole
    cache is one ``marshal`` call each way."""

    ino: int
    mode: int = 0
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    source_ino: int = 0
    atime_ns: int = 0
    data_bytes: int = 0
    digest: bytes = b""
    extents: tuple[tuple[int, int, bytes], ...] = ()
    target: bytes = b""
    totals: tuple[int, int, int] = (0, 0, 0)
    xattrs: tuple[tuple[bytes, bytes], ...] = ()

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


class Last:
    """The last import's paths (relative, '/'-separated) as stored: rows are made
    :class:`Seen` only when asked for."""

    def __init__(self, rows: dict[bytes, tuple]) -> None:
        self.rows = rows

    def get(self, rel: bytes) -> Seen | None:
        row = self.rows.get(rel)
        return Seen._make(row) if row is not None else None

    def __getitem__(self, rel: bytes) -> Seen:
        return Seen._make(self.rows[rel])

    def __contains__(self, rel: bytes) -> bool:
        return rel in self.rows


def cache_path(store_path: str, source: bytes, selection: bytes = b"") -> str:
    """The cache file of the absolute source path ``source`` imported with the selection
    whose key is ``selection`` (:meth:`Selection.key`; empty for a whole tree)."""
    name = digest_of(source + b"\0" + selection if selection else source).hex()[:32]
    return os.path.join(store_path, FOLDER, name)


def load(store_path: str, source: bytes, selection: bytes = b"") -> Last:
    """The last import of ``source`` with this selection, or an empty one when there is none
    usable."""
    try:
        with open(cache_path(store_path, source, selection), "rb") as f:
            raw = zstandard.ZstdDecompressor().decompress(f.read())
        fmt, stored_source, rows = marshal.loads(raw)
        if fmt != _FORMAT or stored_source != source or not isinstance(rows, dict):
            raise ValueError("a cache of another format or source")
        return Last(rows)
    except (OSError, zstandard.ZstdError, ValueError, EOFError, TypeError):
        return Last({})


def save(store_path: str, source: bytes, rows: dict[bytes, tuple], selection: bytes = b"") -> None:
    """Replace the cache of ``source`` (atomically: a crash leaves the old one or the new).
    ``rows`` are :class:`Seen` values or the plain tuples :attr:`Last.rows` holds."""
    folder = os.path.join(store_path, FOLDER)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    path = cache_path(store_path, source, selection)
    plain = {rel: tuple(row) for rel, row in rows.items()}
    data = zstandard.ZstdCompressor(level=1).compress(marshal.dumps((_FORMAT, source, plain)))
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
