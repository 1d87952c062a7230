"""Tree objects and manifests: the immutable Merkle DAG that snapshots are made of.

A **tree object** is one directory: a header with recursive totals, then one entry per name,
sorted by name bytes so the same directory always encodes to the same bytes (and so the same
digest). An entry carries everything ``stat`` and ``getfattr`` show of the child (mode, links,
owner, times, size, xattrs), the child's live inode number (so hard links in a snapshot share
one ``st_ino``), and its content: a subtree's digest, a large file's manifest digest, a small
file's extents inline, or a symlink's target.

A **manifest** is a large file's chunk list. Files of up to ``INLINE_EXTENTS`` chunks list them
in their entry instead: most files are small, and an object per file would cost a key, a
refcount and a lookup each.

Both are stored like chunks (BLAKE3-named, zstd-compressed, verified on read) with their kind
in the object header. A stored object holds one reference on each object it names; freeing it
releases them in turn (:func:`release`).
"""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass, field

from casfs.store import layout
from casfs.store.codec import digest_of
from casfs.store.store import Store, Tx
from casfs.tree.content import Extent

INLINE_EXTENTS = 4

# name length, mode, nlink, uid, gid, rdev, size, data_bytes, atime, mtime, ctime, ino, flags
_ENTRY = struct.Struct(">HIIIIQQQqqqQB")
_TOTALS = struct.Struct(">QQQI")  # files, dirs, bytes (recursive), entry count
_EXTENT = struct.Struct(">QI32s")  # offset, length, digest
_COUNT = struct.Struct(">H")
_XATTR = struct.Struct(">BI")  # name length, value length
_HAS_DIGEST, _HAS_EXTENTS, _HAS_TARGET, _RECUT = 1, 2, 4, 8


@dataclass(frozen=True, slots=True)
class Totals:
    """What a subtree holds, recursively: non-directories, directories, logical bytes."""

    files: int = 0
    dirs: int = 0
    bytes: int = 0

    def __add__(self, other: Totals) -> Totals:
        return Totals(self.files + other.files, self.dirs + other.dirs, self.bytes + other.bytes)


@dataclass(frozen=True, slots=True)
class Entry:
    name: bytes
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    data_bytes: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    digest: bytes = b""  # subtree (directory) or manifest (large file)
    extents: tuple[Extent, ...] = ()  # a small file's chunks
    target: bytes = b""  # a symlink's target
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    recut: bool = False  # chunks not those of one whole-file cut (see casfs.tree.identity)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    def refs(self) -> list[bytes]:
        """The objects this entry names (each holds one reference from the tree object)."""
        return ([self.digest] if self.digest else []) + [e.digest for e in self.extents]


@dataclass
class Tree:
    totals: Totals
    entries: list[Entry]
    _by_name: dict[bytes, Entry] | None = field(default=None, repr=False)

    def find(self, name: bytes) -> Entry | None:
        if self._by_name is None:
            self._by_name = {e.name: e for e in self.entries}
        return self._by_name.get(name)


def encode_tree(entries: list[Entry], totals: Totals) -> bytes:
    out = [_TOTALS.pack(totals.files, totals.dirs, totals.bytes, len(entries))]
    for e in sorted(entries, key=lambda e: e.name):
        flags = (
            (_HAS_DIGEST if e.digest else 0)
            | (_HAS_EXTENTS if e.extents else 0)
            | (_HAS_TARGET if e.target else 0)
            | (_RECUT if e.recut else 0)
        )
        out.append(
            _ENTRY.pack(
                len(e.name),
                e.mode,
                e.nlink,
                e.uid,
                e.gid,
                e.rdev,
                e.size,
                e.data_bytes,
                e.atime_ns,
                e.mtime_ns,
                e.ctime_ns,
                e.ino,
                flags,
            )
        )
        out.append(e.name)
        if e.digest:
            out.append(e.digest)
        if e.extents:
            out.append(_COUNT.pack(len(e.extents)))
            out.extend(_EXTENT.pack(x.offset, x.length, x.digest) for x in e.extents)
        if e.target:
            out.append(_COUNT.pack(len(e.target)))
            out.append(e.target)
        out.append(_COUNT.pack(len(e.xattrs)))
        for name, value in e.xattrs:
            out.append(_XATTR.pack(len(name), len(value)))
            out.append(name)
            out.append(value)
    return b"".join(out)


def decode_tree(plain: bytes) -> Tree:
    files, dirs, nbytes, count = _TOTALS.unpack_from(plain)
    pos = _TOTALS.size
    entries = []
    for _ in range(count):
        (nlen, mode, nlink, uid, gid, rdev, size, data_bytes, at, mt, ct, ino, flags) = (
            _ENTRY.unpack_from(plain, pos)
        )
        pos += _ENTRY.size
        name = plain[pos : pos + nlen]
        pos += nlen
        digest = b""
        extents: tuple[Extent, ...] = ()
        target = b""
        if flags & _HAS_DIGEST:
            digest = plain[pos : pos + 32]
            pos += 32
        if flags & _HAS_EXTENTS:
            (n,) = _COUNT.unpack_from(plain, pos)
            pos += _COUNT.size
            extents = tuple(_unpack_extents(plain, pos, n))
            pos += n * _EXTENT.size
        if flags & _HAS_TARGET:
            (n,) = _COUNT.unpack_from(plain, pos)
            target = plain[pos + 2 : pos + 2 + n]
            pos += 2 + n
        (n,) = _COUNT.unpack_from(plain, pos)
        pos += _COUNT.size
        xattrs = []
        for _ in range(n):
            klen, vlen = _XATTR.unpack_from(plain, pos)
            pos += _XATTR.size
            xattrs.append((plain[pos : pos + klen], plain[pos + klen : pos + klen + vlen]))
            pos += klen + vlen
        entries.append(
            Entry(
                name,
                ino,
                mode,
                nlink,
                uid,
                gid,
                rdev,
                size,
                data_bytes,
                at,
                mt,
                ct,
                digest,
                extents,
                target,
                tuple(xattrs),
                bool(flags & _RECUT),
            )  # fmt: skip
        )
    return Tree(Totals(files, dirs, nbytes), entries)


def _unpack_extents(plain: bytes, pos: int, n: int) -> list[Extent]:
    return [Extent(o, n_, d) for o, n_, d in _EXTENT.iter_unpack(plain[pos : pos + n * 44])]


def encode_manifest(extents: list[Extent]) -> bytes:
    return b"".join(_EXTENT.pack(x.offset, x.length, x.digest) for x in extents)


def decode_manifest(plain: bytes) -> list[Extent]:
    return _unpack_extents(plain, 0, len(plain) // _EXTENT.size)


def refs_of(kind: int, plain: bytes) -> list[bytes]:
    if kind == layout.KIND_TREE:
        return [d for e in decode_tree(plain).entries for d in e.refs()]
    if kind == layout.KIND_MANIFEST:
        return [x.digest for x in decode_manifest(plain)]
    return []


def put(store: Store, tx: Tx, kind: int, plain: bytes, refs: list[bytes]) -> bytes:
    """Store an object (or count one more reference to it); returns its digest. A new
    object takes a reference on each of ``refs``, which must exist."""
    digest = digest_of(plain)
    if store.has_object(tx, digest):
        store.add_ref(tx, digest, None, len(plain))
        return digest
    store.add_ref(tx, digest, None, len(plain), plain, kind)
    for ref in refs:
        store.add_ref(tx, ref, None, 0)
    return digest


def release(store: Store, tx: Tx, digest: bytes) -> None:
    """Drop one reference; an object freed by it releases what it named, and so on down."""
    stack = [digest]
    while stack:
        d = stack.pop()
        value = store.drop_ref(tx, d)
        if value is None:
            continue
        kind, _, _ = layout.split_object(value)
        if kind != layout.KIND_CHUNK:
            stack.extend(refs_of(kind, store.codec.decode(d, value)))


def load_tree(store: Store, tx: Tx, digest: bytes) -> Tree:
    return decode_tree(store.load(tx, digest))


def load_manifest(store: Store, tx: Tx, digest: bytes) -> list[Extent]:
    return decode_manifest(store.load(tx, digest))
