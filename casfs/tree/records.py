"""Inode records as stored in the ``inodes`` database."""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass, fields
from typing import Any

# mode, nlink, uid, gid, rdev, size, atime, mtime, ctime (ns), parent, next_cookie, data_bytes
_INODE = struct.Struct(">IIIIQQqqqQQQ")

NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536


@dataclass(frozen=True, slots=True)
class Inode:
    """One file's attributes. ``parent`` is kept for directories only (they have exactly one)
    so that rename can refuse to move a directory into its own subtree; ``next_cookie`` is a
    directory's next readdir cookie (cookies only grow). ``data_bytes`` counts the bytes held in
    extents (size less holes), for ``st_blocks``. ``target`` is a symlink's target."""

    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    parent: int = 0
    next_cookie: int = 1
    data_bytes: int = 0
    target: bytes = b""

    def pack(self) -> bytes:
        return (
            _INODE.pack(
                self.mode,
                self.nlink,
                self.uid,
                self.gid,
                self.rdev,
                self.size,
                self.atime_ns,
                self.mtime_ns,
                self.ctime_ns,
                self.parent,
                self.next_cookie,
                self.data_bytes,
            )
            + self.target
        )

    @classmethod
    def unpack(cls, ino: int, data: bytes) -> Inode:
        fields = _INODE.unpack_from(data)
        return cls(ino, *fields, target=bytes(data[_INODE.size :]))

    def but(self, **changes: Any) -> Inode:
        """A copy with ``changes``; spelled out because ``dataclasses.replace`` costs twice as
        much, and it runs several times for every file a mount creates or writes."""
        if not _FIELDS.issuperset(changes):
            raise TypeError(f"Inode has no field {sorted(set(changes) - _FIELDS)}")
        c = changes.get
        return Inode(
            self.ino,
            c("mode", self.mode),
            c("nlink", self.nlink),
            c("uid", self.uid),
            c("gid", self.gid),
            c("rdev", self.rdev),
            c("size", self.size),
            c("atime_ns", self.atime_ns),
            c("mtime_ns", self.mtime_ns),
            c("ctime_ns", self.ctime_ns),
            c("parent", self.parent),
            c("next_cookie", self.next_cookie),
            c("data_bytes", self.data_bytes),
            c("target", self.target),
        )

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)


_FIELDS = frozenset(f.name for f in fields(Inode)) - {"ino"}
