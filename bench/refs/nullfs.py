"""A do-nothing pyfuse3 filesystem: the ceiling of a Python FUSE filesystem on this machine.

The root directory holds ``zero``, a 1 TiB regular file that reads as zeros. Any name can be
created (or opened with O_TRUNC); writes are accepted and dropped, only the file's size is
kept so that ``dd if=MNT/x`` reads back as many zeros as were written. One flat directory,
no permissions of its own (the kernel's ``default_permissions`` checks the modes).

Run: python bench/refs/nullfs.py MOUNTPOINT   (foreground; fusermount3 -u MOUNTPOINT ends it)
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time

import pyfuse3

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import ATTR_TIMEOUT, BLKSIZE, ENTRY_TIMEOUT, run  # noqa: E402

ROOT = pyfuse3.ROOT_INODE
ZERO_SIZE = 1 << 40
_ZEROS = bytes(1 << 20)


class NullFS(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self) -> None:
        super().__init__()
        self.names: dict[bytes, int] = {b"zero": ROOT + 1}
        self.sizes: dict[int, int] = {ROOT + 1: ZERO_SIZE}
        self.next_ino = ROOT + 2
        self.t = time.time_ns()

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = ENTRY_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        if ino == ROOT:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_nlink = 1
            a.st_size = self.sizes.get(ino, 0)
        a.st_uid = os.getuid()
        a.st_gid = os.getgid()
        a.st_blksize = BLKSIZE
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.t
        return a

    async def lookup(self, parent_inode, name, ctx):
        if parent_inode == ROOT and name in self.names:
            return self._attr(self.names[name])
        if name in (b".", b".."):
            return self._attr(ROOT)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def forget(self, inode_list):
        pass

    async def getattr(self, inode, ctx):
        if inode != ROOT and inode not in self.sizes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        if fields.update_size and inode != ROOT:
            self.sizes[inode] = attr.st_size
        return self._attr(inode)

    async def create(self, parent_inode, name, mode, flags, ctx):
        if parent_inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        ino = self.next_ino
        self.next_ino += 1
        self.names[name] = ino
        self.sizes[ino] = 0
        return pyfuse3.FileInfo(fh=ino, keep_cache=True), self._attr(ino)

    async def open(self, inode, flags, ctx):
        if inode == ROOT:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        n = max(0, min(size, self.sizes.get(fh, 0) - off))
        if n <= len(_ZEROS):
            return _ZEROS if n == len(_ZEROS) else _ZEROS[:n]
        return bytes(n)

    async def write(self, fh, off, buf):
        end = off + len(buf)
        if end > self.sizes.get(fh, 0):
            self.sizes[fh] = end
        return len(buf)

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        pass

    async def release(self, fh):
        pass

    async def unlink(self, parent_inode, name, ctx):
        if self.names.pop(name, None) is None:
            raise pyfuse3.FUSEError(errno.ENOENT)

    async def opendir(self, inode, ctx):
        if inode != ROOT:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        items = sorted(self.names.items())
        for i, (name, ino) in enumerate(items[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), i):
                return

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLKSIZE
        s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 40
        s.f_files = s.f_ffree = s.f_favail = 1 << 32
        s.f_namemax = 255
        return s


if __name__ == "__main__":
    run(NullFS(), "nullfs")
