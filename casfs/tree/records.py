"""Inode records as stored in the ``inodes`` database."""

from __future__ import annotations

import stat
import struct
from dataclasses import dataclass, replace

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

    def but(self, **changes: object) -> Inode:
        return replace(self, **changes)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)
