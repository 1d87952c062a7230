"""The on-disk layout of a casfs store: files in the store directory, LMDB databases, key formats.

This module is the only place that knows how keys and values are packed. Every integer in a
key is big-endian so that LMDB's byte order is numeric order (range scans by inode, offset and
cookie rely on it).

Store directory
---------------
=====================  ==================================================================
``casfs-store.json``   marker: ``{"format": 1, "uuid": ...}``; a directory without it is
                       not a store. Written once, atomically, by ``casfs init``.
``data.mdb``           the LMDB environment (all databases below)
``lock.mdb``           LMDB's reader table
``casfs.lock``         ``flock`` held by the one writer process; holds its PID as text
``reserve``            1 MiB of disk held back, given up so a delete can commit on a full
                       disk (see ``Store._hold_reserve``)
``imports/``           files caches of ``casfs import``, one per source directory
=====================  ==================================================================

LMDB databases
--------------
============  ============================  =====================================================
db            key                           value
============  ============================  =====================================================
meta          ascii name                    see ``META_*`` below: format, uuid, next inode,
                                            chunker parameters, zstd level, statistics counters
objects       digest (32, BLAKE3-256 of     1 header byte (``kind << 4 | codec``) + payload
              the plain bytes)              (raw bytes, or one zstd frame)
refs          digest                        refcount u64 + plain length u32, and for an object
                                            kept in a pack: pack id u64 + offset u32 of its
                                            bytes in the pack's plain text + kind u8. An
                                            object exists exactly when its refs row does;
                                            count >= 1.
inodes        ino u64                       packed :class:`casfs.tree.records.Inode`; a
                                            symlink's target follows the fixed part
dirents       parent u64 + name             child ino u64 + cookie u64
dircookies    parent u64 + cookie u64       child ino u64 + name (readdir order; cookies only
                                            grow, so a listing never skips or repeats)
extents       ino u64 + file offset u64     digest (32) + length u32. Missing ranges are holes.
                                            Every extent covers one whole chunk.
xattrs        ino u64 + name                value
orphans       ino u64                       empty. Inodes with nlink == 0 kept alive by a
                                            holder (open file, kernel lookup); freed at mount.
links         ino u64 + parent u64          u32 count of the names ``ino`` has in ``parent``.
                                            Only for non-directories with nlink >= 2; with one
                                            link the inode's ``parent`` field says where it is.
treecache     ino u64                       digest (32) + files u64 + dirs u64 + bytes u64: the
                                            live directory's tree object (totals recursive), or
                                            a large file's manifest. Holds one reference. A row
                                            exists only if every row below it does (a change
                                            deletes the rows on its path up to the root).
snapshots     name                          packed :class:`casfs.tree.snapshots.Snapshot`: id,
                                            creation time, root tree digest, root attributes,
                                            totals. Holds one reference to the root tree.
pins          digest                        u64 count: references held for the kernel on the
                                            content of deleted snapshots' files still open or
                                            known, and by an import until a tree object takes
                                            them over; all dropped at the next mount or import.
recut         ino u64                       empty. A regular file whose chunks may not be those
                                            one whole-file cut would give (written out of
                                            order); its content digest is found by reading it.
packs         pack id u64                   1 header byte (``KIND_PACK << 4 | codec``) + payload
                                            (raw, or one zstd frame) of: u32 n, n x u32 member
                                            lengths, the members' plain bytes end to end
packstat      pack id u64                   live members u32 + live plain bytes u32 + all
                                            plain bytes u32 + stored value length u32
============  ============================  =====================================================

Small objects (up to ``PACK_OBJECT_MAX`` plain bytes: chunks of small files, tree objects,
manifests) live in *packs*: the new small objects of a transaction are gathered, at its
commit, into packs of about ``PACK_TARGET`` plain bytes compressed as one zstd frame, so that
small files compress with each other's context and do not each round a value up to whole LMDB
pages. A packed object has no ``objects`` row; its ``refs`` row says where it is. When a
member's last reference goes, its pack's ``packstat`` row is updated; once less than half of
a pack's bytes are live, the live members are packed anew and the old pack deleted (see
:mod:`casfs.store.packs`).

Objects are chunks (file bytes), tree objects (one directory of a snapshot) and manifests
(a large file's chunk list); see :mod:`casfs.tree.merkle`. The refcount of an object is the
number of extents, tree objects, manifests, ``treecache`` rows, snapshot roots and pins that
name it; it changes in the same transaction as the references it counts.
"""

from __future__ import annotations

import struct

FORMAT_VERSION = 4
MARKER_FILE = "casfs-store.json"
LOCK_FILE = "casfs.lock"
RESERVE_FILE = "reserve"

DIGEST_SIZE = 32
ROOT_INO = 1

DB_NAMES = (
    b"meta",
    b"objects",
    b"refs",
    b"inodes",
    b"dirents",
    b"dircookies",
    b"extents",
    b"xattrs",
    b"orphans",
    b"links",
    b"treecache",
    b"snapshots",
    b"pins",
    b"recut",
    b"packs",
    b"packstat",
)

# meta keys
META_FORMAT = b"format"
META_UUID = b"uuid"
META_NEXT_INO = b"next_ino"
META_CHUNK_MIN = b"chunk_min"
META_CHUNK_AVG = b"chunk_avg"
META_CHUNK_MAX = b"chunk_max"
META_ZSTD_LEVEL = b"zstd_level"
META_NEXT_SNAPSHOT = b"next_snapshot"  # snapshot ids are never reused (inode numbers)
META_NEXT_PACK = b"next_pack"  # pack ids are never reused (readers cache packs by id)
META_COMMITS = b"commits"  # bumped by Store.advance: a commit that only moves LMDB on
# Statistics counters, kept exact in the same transaction as the change they count, so that
# `casfs stats` and statfs never scan a table.
STAT_OBJECTS = b"stat.objects"  # number of stored objects
STAT_STORED_BYTES = b"stat.stored_bytes"  # bytes of object values on disk (header + payload)
STAT_PLAIN_BYTES = b"stat.plain_bytes"  # uncompressed bytes of all unique objects
STAT_REFERENCED_BYTES = b"stat.referenced_bytes"  # plain bytes summed over every reference
STAT_INODES = b"stat.inodes"  # number of inode records
STATS = (STAT_OBJECTS, STAT_STORED_BYTES, STAT_PLAIN_BYTES, STAT_REFERENCED_BYTES, STAT_INODES)

# object header: kind in the high nibble, codec in the low nibble
KIND_CHUNK = 0
KIND_TREE = 1
KIND_MANIFEST = 2
KIND_PACK = 3
CODEC_RAW = 0
CODEC_ZSTD = 1

_U64 = struct.Struct(">Q")
_U64_U64 = struct.Struct(">QQ")
_REF = struct.Struct(">QI")
_PACKED_AT = struct.Struct(">QIB")
_PACKSTAT = struct.Struct(">IIII")
_EXTENT = struct.Struct(">32sI")


def u64(n: int) -> bytes:
    return _U64.pack(n)


def read_u64(b: bytes) -> int:
    return _U64.unpack(b)[0]


def ino_key(ino: int) -> bytes:
    return _U64.pack(ino)


def dirent_key(parent: int, name: bytes) -> bytes:
    return _U64.pack(parent) + name


def dirent_value(child: int, cookie: int) -> bytes:
    return _U64_U64.pack(child, cookie)


def read_dirent_value(b: bytes) -> tuple[int, int]:
    return _U64_U64.unpack(b)


def cookie_key(parent: int, cookie: int) -> bytes:
    return _U64_U64.pack(parent, cookie)


def read_cookie_key(b: bytes) -> tuple[int, int]:
    return _U64_U64.unpack(b)


def cookie_value(child: int, name: bytes) -> bytes:
    return _U64.pack(child) + name


def read_cookie_value(b: bytes) -> tuple[int, bytes]:
    return _U64.unpack_from(b)[0], bytes(b[8:])


def extent_key(ino: int, offset: int) -> bytes:
    return _U64_U64.pack(ino, offset)


def read_extent_key(b: bytes) -> tuple[int, int]:
    return _U64_U64.unpack(b)


def extent_value(digest: bytes, length: int) -> bytes:
    return _EXTENT.pack(digest, length)


def read_extent_value(b: bytes) -> tuple[bytes, int]:
    return _EXTENT.unpack(b)


def ref_value(count: int, plain_len: int, packed_at: bytes = b"") -> bytes:
    """A refs value; ``packed_at`` is the location part of a packed object's row."""
    return _REF.pack(count, plain_len) + packed_at


def read_ref_value(b: bytes) -> tuple[int, int]:
    """(count, plain length) of a refs value."""
    return _REF.unpack_from(b)


def with_count(ref: bytes, count: int) -> bytes:
    """``ref`` with its count replaced (plain length and location kept)."""
    return _REF.pack(count, _REF.unpack_from(ref)[1]) + ref[_REF.size :]


def with_location(ref: bytes, at: bytes) -> bytes:
    """``ref`` with its location part replaced by ``at`` (see :func:`packed_at`)."""
    return ref[: _REF.size] + at


def packed_at(pack: int, offset: int, kind: int) -> bytes:
    return _PACKED_AT.pack(pack, offset, kind)


def read_packed_at(ref: bytes) -> tuple[int, int, int] | None:
    """(pack id, offset, object kind) of a packed object's refs value; None for an object
    with an ``objects`` row. Pack id 0: not packed yet (in its transaction's pending map)."""
    if len(ref) <= _REF.size:
        return None
    return _PACKED_AT.unpack_from(ref, _REF.size)


def packstat_value(live: int, live_bytes: int, plain_bytes: int, stored: int) -> bytes:
    return _PACKSTAT.pack(live, live_bytes, plain_bytes, stored)


def read_packstat(b: bytes) -> tuple[int, int, int, int]:
    """(live members, live plain bytes, all plain bytes, stored value length)."""
    return _PACKSTAT.unpack(b)


def link_key(ino: int, parent: int) -> bytes:
    return _U64_U64.pack(ino, parent)


def xattr_key(ino: int, name: bytes) -> bytes:
    return _U64.pack(ino) + name


def object_header(kind: int, codec: int) -> bytes:
    return bytes(((kind << 4) | codec,))


def split_object(value: bytes) -> tuple[int, int, bytes]:
    """(kind, codec, payload) of an ``objects`` value."""
    head = value[0]
    return head >> 4, head & 0x0F, value[1:]
