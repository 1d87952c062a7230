"""A minimal, correct in-memory pyfuse3 filesystem: the reference for metadata-heavy work.

Files are bytearrays and directories are dicts, keyed by inode number. Lookup counts follow
the pyfuse3 rules (lookup, create, mkdir and every accepted ``readdir_reply`` add one,
``forget`` subtracts), and an unlinked inode is freed once no lookup or open refers to it.
Supports lookup, forget, getattr, setattr (mode, owner, times, size), create, open, read,
write, flush, fsync, release, mkdir, rmdir, unlink, rename, opendir, readdir, statfs.

Run: python bench/refs/memfs.py MOUNTPOINT   (foreground; fusermount3 -u MOUNTPOINT ends it)
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


class Node:
    __slots__ = (
        "ino",
        "mode",
        "uid",
        "gid",
        "nlink",
        "atime",
        "mtime",
        "ctime",
        "data",
        "entries",
        "parent",
        "lookups",
        "opens",
    )

    def __init__(self, ino: int, mode: int, uid: int, gid: int, parent: int) -> None:
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = 2 if stat.S_ISDIR(mode) else 1
        self.atime = self.mtime = self.ctime = time.time_ns()
        self.data = bytearray()
        self.entries: dict[bytes, int] | None = {} if stat.S_ISDIR(mode) else None
        self.parent = parent
        self.lookups = 0
        self.opens = 0


class MemFS(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self) -> None:
        super().__init__()
        root = Node(ROOT, stat.S_IFDIR | 0o755, os.getuid(), os.getgid(), ROOT)
        self.nodes: dict[int, Node] = {ROOT: root}
        self.next_ino = ROOT + 1
        self.handles: dict[int, int] = {}
        self.next_fh = 1

    # -- helpers ----------------------------------------------------------------------------

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _dir(self, ino: int) -> Node:
        node = self._node(ino)
        if node.entries is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return node

    def _attr(self, n: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = n.ino
        a.entry_timeout = ENTRY_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_mode = n.mode
        a.st_nlink = n.nlink
        a.st_uid = n.uid
        a.st_gid = n.gid
        a.st_size = len(n.data)
        a.st_blksize = BLKSIZE
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = n.atime
        a.st_mtime_ns = n.mtime
        a.st_ctime_ns = n.ctime
        return a

    def _known(self, n: Node) -> pyfuse3.EntryAttributes:
        n.lookups += 1
        return self._attr(n)

    def _maybe_free(self, n: Node) -> None:
        if n.nlink == 0 and n.lookups == 0 and n.opens == 0 and n.ino != ROOT:
            del self.nodes[n.ino]

    def _new(self, parent: Node, name: bytes, mode: int, ctx) -> Node:
        if name in parent.entries:
            raise pyfuse3.FUSEError(errno.EEXIST)
        n = Node(self.next_ino, mode, ctx.uid, ctx.gid, parent.ino)
        self.next_ino += 1
        self.nodes[n.ino] = n
        parent.entries[name] = n.ino
        parent.mtime = parent.ctime = n.ctime
        if n.entries is not None:
            parent.nlink += 1
        return n

    def _new_fh(self, n: Node) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = n.ino
        n.opens += 1
        return fh

    def _file(self, fh: int) -> Node:
        try:
            return self.nodes[self.handles[fh]]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def _remove_entry(self, parent: Node, name: bytes) -> Node:
        n = self._node(parent.entries.pop(name))
        now = time.time_ns()
        parent.mtime = parent.ctime = n.ctime = now
        if n.entries is not None:
            parent.nlink -= 1
            n.nlink = 0
        else:
            n.nlink -= 1
        self._maybe_free(n)
        return n

    # -- operations -------------------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx):
        parent = self._dir(parent_inode)
        if name == b".":
            return self._known(parent)
        if name == b"..":
            return self._known(self._node(parent.parent))
        ino = parent.entries.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._known(self.nodes[ino])

    async def forget(self, inode_list):
        for ino, count in inode_list:
            n = self.nodes.get(ino)
            if n is not None:
                n.lookups = max(0, n.lookups - count)
                self._maybe_free(n)

    async def getattr(self, inode, ctx):
        return self._attr(self._node(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        n = self._node(inode)
        now = time.time_ns()
        if fields.update_size:
            if n.entries is not None:
                raise pyfuse3.FUSEError(errno.EISDIR)
            size = attr.st_size
            if size < len(n.data):
                del n.data[size:]
            else:
                n.data.extend(bytes(size - len(n.data)))
            n.mtime = now
        if fields.update_mode:
            n.mode = (n.mode & ~0o7777) | (attr.st_mode & 0o7777)
        if fields.update_uid:
            n.uid = attr.st_uid
        if fields.update_gid:
            n.gid = attr.st_gid
        if fields.update_atime:
            n.atime = attr.st_atime_ns
        if fields.update_mtime:
            n.mtime = attr.st_mtime_ns
        n.ctime = now
        return self._attr(n)

    async def mkdir(self, parent_inode, name, mode, ctx):
        n = self._new(
            self._dir(parent_inode), name, stat.S_IFDIR | (mode & ~ctx.umask & 0o7777), ctx
        )
        return self._known(n)

    async def create(self, parent_inode, name, mode, flags, ctx):
        n = self._new(
            self._dir(parent_inode), name, stat.S_IFREG | (mode & ~ctx.umask & 0o7777), ctx
        )
        attr = self._known(n)
        return pyfuse3.FileInfo(fh=self._new_fh(n), keep_cache=True), attr

    async def open(self, inode, flags, ctx):
        n = self._node(inode)
        if n.entries is not None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=self._new_fh(n), keep_cache=True)

    async def read(self, fh, off, size):
        return bytes(self._file(fh).data[off : off + size])

    async def write(self, fh, off, buf):
        n = self._file(fh)
        data = n.data
        if off == len(data):
            data += buf
        else:
            if off > len(data):
                data.extend(bytes(off - len(data)))
            data[off : off + len(buf)] = buf
        n.mtime = n.ctime = time.time_ns()
        return len(buf)

    async def flush(self, fh):
        pass

    async def fsync(self, fh, datasync):
        pass

    async def release(self, fh):
        n = self.nodes.get(self.handles.pop(fh, 0))
        if n is not None:
            n.opens -= 1
            self._maybe_free(n)

    async def unlink(self, parent_inode, name, ctx):
        parent = self._dir(parent_inode)
        ino = parent.entries.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if self.nodes[ino].entries is not None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        self._remove_entry(parent, name)

    async def rmdir(self, parent_inode, name, ctx):
        parent = self._dir(parent_inode)
        ino = parent.entries.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        n = self.nodes[ino]
        if n.entries is None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if n.entries:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        self._remove_entry(parent, name)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        old, new = self._dir(parent_inode_old), self._dir(parent_inode_new)
        ino = old.entries.get(name_old)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        n = self.nodes[ino]
        target = new.entries.get(name_new)
        if target == ino:
            return
        if target is not None:
            t = self.nodes[target]
            if (t.entries is None) != (n.entries is None):
                raise pyfuse3.FUSEError(errno.EISDIR if t.entries is not None else errno.ENOTDIR)
            if t.entries:
                raise pyfuse3.FUSEError(errno.ENOTEMPTY)
            self._remove_entry(new, name_new)
        del old.entries[name_old]
        new.entries[name_new] = ino
        if n.entries is not None and old is not new:
            old.nlink -= 1
            new.nlink += 1
            n.parent = new.ino
        old.mtime = new.mtime = n.ctime = time.time_ns()

    async def opendir(self, inode, ctx):
        self._dir(inode)
        return inode

    async def readdir(self, fh, start_id, token):
        # Offsets are positions in the sorted listing: stable enough for a benchmark.
        d = self._dir(fh)
        names = sorted(d.entries)
        for i, name in enumerate(names[start_id:], start_id + 1):
            n = self.nodes[d.entries[name]]
            if not pyfuse3.readdir_reply(token, name, self._attr(n), i):
                return
            n.lookups += 1

    async def releasedir(self, fh):
        pass

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLKSIZE
        s.f_frsize = 4096
        s.f_blocks = s.f_bfree = s.f_bavail = 1 << 30
        s.f_files = len(self.nodes) + (1 << 32)
        s.f_ffree = s.f_favail = 1 << 32
        s.f_namemax = 255
        return s


if __name__ == "__main__":
    run(MemFS(), "memfs")
