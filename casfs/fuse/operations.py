"""pyfuse3 Operations: a thin translation from kernel requests to the filesystem model.

What lives here is only kernel-facing state: lookup counts and open handles (``Pins``), file
handles, write buffers and the flusher. Errors from the model carry an errno and become
``FUSEError``; anything unexpected is logged and answered with EIO, never allowed to end the
request loop.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

import pyfuse3
import trio

from casfs.errors import CasfsError, CorruptObject
from casfs.fuse.flusher import FLUSH_AT, Flusher, InodeLocks, wait_future
from casfs.fuse.pins import Pins
from casfs.fuse.snapservice import SnapshotService
from casfs.fuse.snapview import SNAPDIR_INO, Lru, SnapView, is_snapshot_ino, snapshot_ino
from casfs.fuse.writeback import WriteBuffers
from casfs.store.store import Store
from casfs.tree import identity
from casfs.tree.content import ReadJob, ReadRaced
from casfs.tree.fs import ROOT_INO, SNAPDIR_NAME, Filesystem
from casfs.tree.records import Inode
from casfs.tree.whereused import where_used

log = logging.getLogger(__name__)
# Plans of one read: a rollback or restore may replace the file between planning a read and
# finishing it (see ReadRaced).
READ_ATTEMPTS = 3

P = ParamSpec("P")
R = TypeVar("R")

# The live tree changes only through this mount, and the kernel updates or invalidates its
# own cache on every change it makes, so attributes and entries can be cached for a while.
ATTR_TIMEOUT = 5.0
ENTRY_TIMEOUT = 5.0
BLKSIZE = 128 << 10
DIGESTS_KEPT = 4096  # content digests remembered (by inode and change time)
READDIR_BATCH = 256
DOT_COOKIES = 2
# (SetattrFields flag, EntryAttributes field, Filesystem.setattr keyword)
SETATTR_FIELDS = (
    ("update_mode", "st_mode", "mode"),
    ("update_uid", "st_uid", "uid"),
    ("update_gid", "st_gid", "gid"),
    ("update_atime", "st_atime_ns", "atime_ns"),
    ("update_mtime", "st_mtime_ns", "mtime_ns"),
    ("update_size", "st_size", "size"),
)  # readdir offsets 1 and 2 are "." and ".."; entry cookie c is offset c + 2


@dataclass(frozen=True)
class MountOptions:
    write_buffer: int = 256 << 20
    cache_bytes: int = 64 << 20
    allow_other: bool = False
    debug: bool = False


def fuse_errors(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Answer the kernel with the model's errno; log and answer EIO for anything else."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except CorruptObject as exc:
            _log_corrupt(args[0], fn.__name__, exc)  # args[0]: the CasfsOperations
            raise pyfuse3.FUSEError(errno.EIO) from None
        except CasfsError as exc:
            if exc.errno in (errno.EIO, errno.ENOSPC):
                log.error("%s: %s", fn.__name__, exc)
            raise pyfuse3.FUSEError(exc.errno) from None
        except Exception:
            log.exception("unexpected error in %s", fn.__name__)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _log_corrupt(ops: CasfsOperations, request: str, exc: CorruptObject) -> None:
    """Log a corrupt object with the paths that use it, once per object per mount.

    Finding the paths is a scan of the store (:mod:`casfs.tree.whereused`); it runs here, on
    the store's thread like every transaction of the mount, and only for the first failure:
    a reader retrying in a loop gets EIO without another scan or log line."""
    if exc.digest in ops.corrupt_reported:
        return
    ops.corrupt_reported.add(exc.digest)
    try:
        with ops.store.read() as tx:
            paths = where_used(ops.store, tx, {exc.digest})[exc.digest]
    except Exception:  # the report must never change the answer (EIO)
        log.exception("could not find the files using corrupt object %s", exc.digest.hex())
        paths = []
    log.error("%s: %s; used by %s", request, exc, ", ".join(paths) or "no file found")


class CasfsOperations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, fs: Filesystem, store: Store, options: MountOptions) -> None:
        super().__init__()
        self.fs = fs
        self.store = store
        self.options = options
        self.pins = Pins()
        fs.is_held = self.pins.is_held
        self.buffers = WriteBuffers(options.write_buffer)
        self.locks = InodeLocks()
        self.flusher = Flusher(fs, store, self.buffers, self.locks)
        self.handles: dict[int, int] = {}  # fh -> ino
        self._next_fh = 1
        self.snaps = SnapView(fs, store)
        self.digests = Lru(DIGESTS_KEPT)  # content digests worked out by reading (recut files)
        self.snapshots = SnapshotService(self)
        self.write_gate: trio.Event | None = None  # set while a snapshot is being taken
        self.corrupt_reported: set[bytes] = set()  # digests logged with their paths

    # -- helpers ----------------------------------------------------------------------------

    def entry(self, inode: Inode) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode.ino
        a.generation = 0
        a.entry_timeout = ENTRY_TIMEOUT
        a.attr_timeout = ATTR_TIMEOUT
        a.st_mode = inode.mode
        a.st_nlink = inode.nlink
        a.st_uid = inode.uid
        a.st_gid = inode.gid
        a.st_rdev = inode.rdev
        size, data, mtime, ctime = inode.size, inode.data_bytes, inode.mtime_ns, inode.ctime_ns
        for dirty in (self.flusher.flushing.get(inode.ino), self.buffers.get(inode.ino)):
            if dirty is not None:
                size = max(size, dirty.end)
                data += dirty.nbytes
                # bytes still buffered were written after any stored change of the times
                mtime = dirty.mtime_ns
                ctime = max(ctime, mtime)
        a.st_size = size
        a.st_blksize = BLKSIZE
        a.st_blocks = (min(data, size) + 511) // 512
        a.st_atime_ns = inode.atime_ns
        a.st_mtime_ns = mtime
        a.st_ctime_ns = ctime
        return a

    def _known(self, inode: Inode) -> pyfuse3.EntryAttributes:
        """Reply with an entry the kernel will hold: one more lookup."""
        self.pins.looked_up(inode.ino)
        return self.entry(inode)

    def _unpinned(self, ino: int) -> None:
        """Nothing in the kernel refers to ``ino`` any more: free it if it has no links."""
        if is_snapshot_ino(ino):
            self.snaps.release(ino)
            return
        if self._nlink(ino) == 0:
            self.flusher.drop(ino)
        self.fs.release(ino)
        self.locks.drop(ino)

    def _nlink(self, ino: int) -> int:
        try:
            return self.fs.getattr(ino).nlink
        except CasfsError:
            return 0

    def _new_fh(self, ino: int) -> int:
        fh = self._next_fh
        self._next_fh += 1
        self.handles[fh] = ino
        self.pins.opened(ino)
        return fh

    def _ino(self, fh: int) -> int:
        try:
            return self.handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF) from None

    def _known_snapshot(self, ino: int) -> pyfuse3.EntryAttributes:
        self.pins.looked_up(ino)
        return self.snaps.attributes(ino)

    @staticmethod
    def _read_only(*inos: int) -> None:
        """Snapshots cannot change: EROFS for everyone, root included."""
        if any(is_snapshot_ino(ino) for ino in inos):
            raise pyfuse3.FUSEError(errno.EROFS)

    def _raise_flush_error(self, ino: int) -> None:
        code = self.flusher.take_error(ino)
        if code is not None:
            raise pyfuse3.FUSEError(code)

    # -- lookups and attributes -------------------------------------------------------------

    @fuse_errors
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if is_snapshot_ino(parent_inode):
            ino = self.snaps.lookup(parent_inode, name)
            if not is_snapshot_ino(ino):  # ".." of .snap
                return self._known(self.fs.getattr(ino))
            return self._known_snapshot(ino)
        if parent_inode == ROOT_INO and name == SNAPDIR_NAME:
            return self._known_snapshot(SNAPDIR_INO)
        return self._known(self.fs.lookup(parent_inode, name))

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        try:
            for ino in self.pins.forget(inode_list):
                self._unpinned(ino)
        except Exception:
            log.exception("forget failed")  # forget must never raise

    @fuse_errors
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if is_snapshot_ino(inode):
            return self.snaps.attributes(inode)
        return self.entry(self.fs.getattr(inode))

    @fuse_errors
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        self._read_only(inode)
        changes = {
            key: getattr(attr, name) for flag, name, key in SETATTR_FIELDS if getattr(fields, flag)
        }
        if fields.update_size or fields.update_mtime:
            # Store buffered writes first: a truncate must apply after them, and their flush
            # would otherwise overwrite an explicit mtime (utime after write: cp -p, tar).
            async with self.locks(inode):
                await self.flusher.flush_locked(inode)
                return self.entry(self.fs.setattr(inode, **changes))
        return self.entry(self.fs.setattr(inode, **changes))

    @fuse_errors
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        if is_snapshot_ino(inode):
            entry = self.snaps.node(inode).entry
            if not stat.S_ISLNK(entry.mode):
                raise pyfuse3.FUSEError(errno.EINVAL)
            return entry.target
        return self.fs.readlink(inode)

    @fuse_errors
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        disk = os.statvfs(self.store.path)
        inodes = self.store.stats().inodes
        inside = self.store.free_inside() // disk.f_frsize  # freed pages of the data file
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLKSIZE
        s.f_frsize = disk.f_frsize
        s.f_blocks = disk.f_blocks
        s.f_bfree = disk.f_bfree + inside
        s.f_bavail = disk.f_bavail + inside
        s.f_ffree = s.f_favail = 1 << 32
        s.f_files = inodes + s.f_ffree
        s.f_namemax = 255
        return s

    # -- namespace --------------------------------------------------------------------------

    @fuse_errors
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._read_only(parent_inode)
        inode = self.fs.mknod(parent_inode, name, mode & ~ctx.umask, ctx.uid, ctx.gid, rdev)
        return self._known(inode)

    @fuse_errors
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        if parent_inode == SNAPDIR_INO:  # mkdir .snap/NAME takes a snapshot
            await self.snapshots.create(name)
            return self._known_snapshot(self.snaps.lookup(SNAPDIR_INO, name))
        self._read_only(parent_inode)
        return self._known(self.fs.mkdir(parent_inode, name, mode & ~ctx.umask, ctx.uid, ctx.gid))

    @fuse_errors
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._read_only(parent_inode)
        return self._known(self.fs.symlink(parent_inode, name, target, ctx.uid, ctx.gid))

    @fuse_errors
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        self._read_only(inode, new_parent_inode)
        return self._known(self.fs.link(inode, new_parent_inode, new_name))

    @fuse_errors
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._read_only(parent_inode)
        self.fs.unlink(parent_inode, name)

    @fuse_errors
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if parent_inode == SNAPDIR_INO:  # rmdir .snap/NAME deletes a snapshot
            try:
                await self.snapshots.delete(name)
            finally:
                self.snapshots.settle_soon()
            return
        self._read_only(parent_inode)
        if parent_inode == ROOT_INO and name == SNAPDIR_NAME:
            raise pyfuse3.FUSEError(errno.EBUSY)
        self.fs.rmdir(parent_inode, name)

    @fuse_errors
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self._read_only(parent_inode_old, parent_inode_new)
        if parent_inode_old == ROOT_INO and name_old == SNAPDIR_NAME:
            raise pyfuse3.FUSEError(errno.EBUSY)
        self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # -- files ------------------------------------------------------------------------------

    @fuse_errors
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if is_snapshot_ino(inode):
            return self._open_snapshot_file(inode, flags)
        node = self.fs.getattr(inode)
        if node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & os.O_TRUNC and node.is_reg:
            # libfuse asks for atomic_o_trunc: the kernel leaves the truncation to us. Bytes
            # written before this open (still buffered, maybe by another handle) go too:
            # drop them rather than store what is cut off at once.
            async with self.locks(inode):
                self.flusher.drop(inode)
                self.fs.setattr(inode, size=0)
        # The page cache stays valid across opens: every change goes through this mount.
        return pyfuse3.FileInfo(fh=self._new_fh(inode), keep_cache=True)

    def _open_snapshot_file(self, inode: int, flags: int) -> pyfuse3.FileInfo:
        if inode == SNAPDIR_INO or self.snaps.node(inode).entry.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=self._new_fh(inode), keep_cache=True)

    @fuse_errors
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        self._read_only(parent_inode)
        inode = self.fs.create(parent_inode, name, mode & ~ctx.umask, ctx.uid, ctx.gid)
        entry = self._known(inode)
        return pyfuse3.FileInfo(fh=self._new_fh(inode.ino), keep_cache=True), entry

    @fuse_errors
    async def read(self, fh: int, off: int, size: int) -> bytes:
        ino = self._ino(fh)
        if is_snapshot_ino(ino):
            return await self._read_snapshot_file(ino, off, size)
        async with self.locks(ino):
            for _ in range(READ_ATTEMPTS - 1):
                with contextlib.suppress(ReadRaced):  # the file was replaced: plan again
                    return await self._read_live(ino, off, size)
            return await self._read_live(ino, off, size)

    async def _read_live(self, ino: int, off: int, size: int) -> bytes:
        node = self.fs.getattr(ino)
        dirty = self.buffers.get(ino)
        length = min(size, max(node.size, dirty.end if dirty else 0) - off)
        if length <= 0:
            return b""
        with self.store.read() as tx:
            job = self.fs.content.read_job(tx, ino, node.size, off, length)
        data = await self._finish_read(job)
        if dirty is None:
            return data
        out = bytearray(data)
        out.extend(bytes(length - len(out)))  # buffered bytes past the stored end
        dirty.overlay(off, out)
        return bytes(out)

    async def _read_snapshot_file(self, ino: int, off: int, size: int) -> bytes:
        entry = self.snaps.node(ino).entry
        with self.store.read() as tx:
            extents = self.snaps.extents(tx, entry)
            job = self.fs.content.read_job(tx, ino, entry.size, off, size, extents)
        return await self._finish_read(job)

    async def _finish_read(self, job: ReadJob) -> bytes:
        """A planned read's bytes: the pool reads and decodes its chunks while this thread
        serves other requests."""
        for future in job.futures():
            await wait_future(future)
        if job.needs_store:  # (else no wait for a commit in progress)
            with self.store.read() as tx:
                job.finish(tx)
        else:
            job.finish(None)
        data = job.assemble()
        job.remember()
        return data

    @fuse_errors
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        ino = self._ino(fh)
        while self.write_gate is not None:  # a snapshot is being taken: it ends before this
            await self.write_gate.wait()
        self._raise_flush_error(ino)
        await self.flusher.make_room(ino, off, len(buf))
        while (dirty := self.buffers.get(ino)) is not None and not dirty.can_take(off, len(buf)):
            await self.flusher.flush(ino)  # changed while we waited for room
        self.buffers.add(ino, off, buf)
        self.flusher.written(ino)
        return len(buf)

    @fuse_errors
    async def flush(self, fh: int) -> None:
        self._raise_flush_error(self._ino(fh))

    @fuse_errors
    async def release(self, fh: int) -> None:
        ino = self.handles.pop(fh, None)
        if ino is None:
            return
        if not is_snapshot_ino(ino) and self._nlink(ino) > 0:
            if self.flusher.pending(ino) >= FLUSH_AT:
                await self.flusher.flush(ino)
            else:  # small: store it between requests (the kernel does not wait for release)
                self.flusher.flush_soon(ino)
        if self.pins.closed(ino):
            self._unpinned(ino)
        elif is_snapshot_ino(ino) and ino not in self.pins.opens:
            self.snaps.evict(ino)  # of a deleted snapshot: let the kernel forget it

    @fuse_errors
    async def fsync(self, fh: int, datasync: bool) -> None:
        ino = self._ino(fh)
        if is_snapshot_ino(ino):
            return
        await self.flusher.flush(ino)
        self._raise_flush_error(ino)
        self.flusher.commit(durable=True)

    # -- directories ------------------------------------------------------------------------

    @fuse_errors
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        if is_snapshot_ino(inode):
            if inode != SNAPDIR_INO and not self.snaps.node(inode).entry.is_dir:
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode
        if not self.fs.getattr(inode).is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    @fuse_errors
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        ino = fh
        if is_snapshot_ino(ino):
            self._readdir_snapshot(ino, start_id, token)
            return
        if start_id < DOT_COOKIES:
            node = self.fs.getattr(ino)
            dots = [(b".", node), (b"..", self.fs.getattr(node.parent or ino))]
            for offset, (name, attrs) in enumerate(dots[start_id:], start_id + 1):
                if not pyfuse3.readdir_reply(token, name, self.entry(attrs), offset):
                    return  # no lookup count for . and ..
        after = max(start_id - DOT_COOKIES, 0)
        while True:
            batch = self.fs.readdir(ino, after=after, limit=READDIR_BATCH)
            for cookie, name, child in batch:
                if not pyfuse3.readdir_reply(token, name, self.entry(child), cookie + DOT_COOKIES):
                    return
                self.pins.looked_up(child.ino)
            if len(batch) < READDIR_BATCH:
                return
            after = batch[-1][0]

    def _readdir_snapshot(self, ino: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Entries of .snap (cookie: snapshot id) or of a snapshot directory (cookie: index
        in its sorted tree object); both orders are fixed, so offsets stay valid."""
        snaps = self.snaps
        if ino == SNAPDIR_INO:
            here, up = snaps.snapdir_attributes(), self.entry(self.fs.getattr(ROOT_INO))
        else:
            node = snaps.node(ino)
            here = snaps.attributes(ino)
            up = here if node.parent not in snaps.nodes else snaps.attributes(node.parent)
            if node.parent == SNAPDIR_INO:
                up = snaps.snapdir_attributes()
        for offset, (name, attrs) in enumerate(
            [(b".", here), (b"..", up)][start_id:], start_id + 1
        ):
            if not pyfuse3.readdir_reply(token, name, attrs, offset):
                return
        after = max(start_id - DOT_COOKIES, 0)
        if ino == SNAPDIR_INO:
            for sid, snap in snaps.snapshot_list(after):
                child = snaps.remember(snapshot_ino(sid, ROOT_INO), sid, snap.root, SNAPDIR_INO)
                if not pyfuse3.readdir_reply(token, snap.name, snaps.attributes(child), sid + 2):
                    return
                self.pins.looked_up(child)
            return
        node = snaps.node(ino)
        entries = snaps.tree(node.entry.digest).entries
        for index in range(after, len(entries)):
            e = entries[index]
            child = snaps.remember(snapshot_ino(node.sid, e.ino), node.sid, e, ino)
            if not pyfuse3.readdir_reply(token, e.name, snaps.attributes(child), index + 3):
                return
            self.pins.looked_up(child)

    async def releasedir(self, fh: int) -> None:
        pass

    @fuse_errors
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.flusher.commit(durable=True)

    # -- extended attributes ----------------------------------------------------------------

    @fuse_errors
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # The kernel asks for security.capability before every write(): answer a missing
        # attribute without building an exception chain.
        if name == identity.XATTR:
            return await self._content_digest(inode)
        if is_snapshot_ino(inode):
            value = dict(self._snapshot_xattrs(inode)).get(name)
        elif self.fs.known_xattrless(inode):
            value = None
        else:
            value = self.fs.xattr(inode, name)
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    @fuse_errors
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        if is_snapshot_ino(inode):
            return [name for name, _ in self._snapshot_xattrs(inode)]
        return self.fs.listxattr(inode)

    async def _content_digest(self, ino: int) -> bytes:
        """``user.casfs.digest`` of a regular file (live: with its buffered bytes stored
        first). Not listed by listxattr, so copying tools do not carry it elsewhere."""
        if ino == SNAPDIR_INO:
            raise pyfuse3.FUSEError(errno.ENODATA)
        if is_snapshot_ino(ino):
            entry = self.snaps.node(ino).entry
            if not entry.is_reg:
                raise pyfuse3.FUSEError(errno.ENODATA)
            key = (ino, 0, 0)
            found = self.digests.find(key)
            if found is not None:
                return found

            def read(off: int, n: int) -> bytes:
                with self.store.read() as tx:
                    extents = self.snaps.extents(tx, entry)
                    return self.fs.content.read_job(tx, ino, entry.size, off, n, extents).complete(
                        tx
                    )

            with self.store.read() as tx:
                extents = [] if entry.recut else self.snaps.extents(tx, entry)
            steps = identity.steps(self.fs.pipeline, entry.size, extents, entry.recut, read)
        else:
            if not self.fs.getattr(ino).is_reg:
                raise pyfuse3.FUSEError(errno.ENODATA)
            await self.flusher.flush(ino)
            node = self.fs.getattr(ino)
            key = (ino, node.mtime_ns, node.ctime_ns)
            found = self.digests.find(key)
            if found is not None:
                return found
            steps = self.fs.digest_steps(ino)
        for digest in steps:  # reading a recut file: let other requests in between blocks
            if digest is None:
                await trio.sleep(0)
        self.digests.remember(key, digest, 1)
        return digest

    def _snapshot_xattrs(self, inode: int) -> tuple[tuple[bytes, bytes], ...]:
        return () if inode == SNAPDIR_INO else self.snaps.node(inode).entry.xattrs

    @fuse_errors
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self._read_only(inode)
        self.fs.setxattr(inode, name, value)

    @fuse_errors
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._read_only(inode)
        self.fs.removexattr(inode, name)
