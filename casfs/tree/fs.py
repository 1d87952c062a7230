"""The filesystem model: POSIX operations over the store, with Linux errno semantics.

Every public method is one transaction (writes through :meth:`Store.run_write`, so a failed
operation changes nothing and the mount's group commit can batch them). Permission checks
are the kernel's (the mount uses ``default_permissions``); the model keeps the rules that are
the filesystem's own: link counts, setgid inheritance, timestamps, rename constraints.

Inode lifetime: an inode is freed when its link count is 0 and nothing holds it. The holder
test (``is_held``) is the mount's lookup counts and open handles; until it lets go the inode
sits in the ``orphans`` table, which :meth:`free_orphans` clears at the next mount after a
crash. :meth:`release` is the hook the holder calls when it lets go.
"""

from __future__ import annotations

import errno
import functools
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Concatenate, Generic, ParamSpec, Protocol, TypeVar

from casfs.errors import FsError
from casfs.store import layout
from casfs.store.pipeline import Pipeline
from casfs.store.store import Store, Tx
from casfs.tree import directory, identity, parents, treeobjects, writer
from casfs.tree.content import Content, Extent, file_extents
from casfs.tree.merkle import LiveDigests
from casfs.tree.records import NAME_MAX, XATTR_NAME_MAX, XATTR_SIZE_MAX, Inode
from casfs.tree.treeobjects import Entry

ROOT_INO = layout.ROOT_INO
SNAPDIR_NAME = b".snap"  # the mount shows snapshots there: no live entry may take the name
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
XATTR_CREATE = 1
XATTR_REPLACE = 2
WRITE_COMMIT_BYTES = 64 << 20  # a large write commits (durably) every this many bytes
INODES_KEPT = 4096  # decoded inodes kept for the write transactions (see Filesystem._inodes)

P = ParamSpec("P")
R = TypeVar("R")


class _Clearable(Protocol):
    def clear(self) -> None: ...


K = TypeVar("K", bound=_Clearable)


def now_ns() -> int:
    return time.time_ns()


def _writes(
    fn: Callable[Concatenate[Filesystem, Tx, P], R],
) -> Callable[Concatenate[Filesystem, P], R]:
    """Run the method in a write transaction (joined if one is open)."""

    @functools.wraps(fn)
    def wrapper(self: Filesystem, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.store.run_write(lambda tx: fn(self, tx, *args, **kwargs))

    return wrapper


def _reads(
    fn: Callable[Concatenate[Filesystem, Tx, P], R],
) -> Callable[Concatenate[Filesystem, P], R]:
    """Run the method in a read transaction (the open write transaction, if any)."""

    @functools.wraps(fn)
    def wrapper(self: Filesystem, *args: P.args, **kwargs: P.kwargs) -> R:
        with self.store.read() as tx:
            return fn(self, tx, *args, **kwargs)

    return wrapper


POSIX_ACL_PREFIX = b"system.posix_acl_"


def check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG, f"name of {len(name)} bytes")
    if not name or name in (b".", b"..") or b"/" in name or b"\0" in name:
        raise FsError(errno.EINVAL, f"invalid name {name!r}")


def make_root(tx: Tx, uid: int = 0, gid: int = 0, mode: int = 0o755) -> None:
    """Create the root directory in a new store (runs in the store's first transaction)."""
    t = now_ns()
    root = Inode(ROOT_INO, stat.S_IFDIR | mode, 2, uid, gid, 0, 0, t, t, t, ROOT_INO)
    tx.put(b"inodes", layout.ino_key(ROOT_INO), root.pack())
    tx.put(b"meta", layout.META_NEXT_INO, layout.u64(ROOT_INO + 1))
    tx.add_u64(layout.STAT_INODES, 1)


class UntilAbort(Generic[K]):
    """What this process learned from its write transactions (``value``: a set or a dict),
    emptied when one aborts: what an aborted transaction wrote never happened."""

    __slots__ = ("store", "value", "aborts")

    def __init__(self, store: Store, value: K) -> None:
        self.store = store
        self.value = value
        self.aborts = store.aborts

    def __call__(self) -> K:
        if self.aborts != self.store.aborts:
            self.value.clear()
            self.aborts = self.store.aborts
        return self.value


class Filesystem:
    def __init__(
        self,
        store: Store,
        *,
        is_held: Callable[[int], bool] | None = None,
        cache_bytes: int = 64 << 20,
        workers: int | None = None,
    ) -> None:
        self.store = store
        self.pipeline = Pipeline(store, workers)
        self.content = Content(store, self.pipeline, cache_bytes)
        self.merkle = LiveDigests(store)
        self.is_held: Callable[[int], bool] = is_held or (lambda ino: False)
        # Live inodes found to have no xattrs (every xattr write discards its inode). The
        # kernel asks for security.capability before every write(): this answers without
        # the store, also while a batch commits on the commit thread.
        self._xattrless = UntilAbort(store, set[int]())
        # Inodes as this process's write transactions last read or wrote them (only this
        # module writes the inodes table): a mount reads a file's inode several times for
        # each request. Read-only transactions, which may be older, never use it.
        self._inodes = UntilAbort(store, dict[int, Inode]())

    @classmethod
    def create_store(cls, path: str, **options: int) -> Store:
        return Store.create(path, initialize=make_root, **options)

    def close(self) -> None:
        self.pipeline.close()

    # -- records ----------------------------------------------------------------------------

    def _get(self, tx: Tx, ino: int) -> Inode:
        if tx.write and (inode := self._inodes().get(ino)) is not None:
            return inode
        data = tx.get(b"inodes", layout.ino_key(ino))
        if data is None:
            raise FsError(errno.ENOENT, f"inode {ino}")
        inode = Inode.unpack(ino, data)
        if tx.write:
            self._keep(inode)
        return inode

    def _put(self, tx: Tx, inode: Inode) -> Inode:
        tx.put(b"inodes", layout.ino_key(inode.ino), inode.pack())
        self._keep(inode)
        self.merkle.changed(tx, inode, lambda ino: self._get(tx, ino))
        return inode

    def _keep(self, inode: Inode) -> None:
        kept = self._inodes()
        kept[inode.ino] = inode
        if len(kept) > INODES_KEPT:
            del kept[next(iter(kept))]  # the oldest

    def _content_changed(self, tx: Tx, ino: int) -> None:
        self.merkle.drop(tx, ino)

    def _dir(self, tx: Tx, ino: int, *, for_new_entry: bool = False) -> Inode:
        inode = self._get(tx, ino)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR, f"inode {ino}")
        if for_new_entry and inode.nlink == 0:
            raise FsError(errno.ENOENT, f"directory {ino} was removed")
        return inode

    def _child(self, tx: Tx, parent: int, name: bytes) -> int:
        self._dir(tx, parent)
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG, f"name of {len(name)} bytes")
        child = directory.find(tx, parent, name)
        if child is None:
            raise FsError(errno.ENOENT, repr(name))
        return child

    def _touch_dir(self, tx: Tx, ino: int, nlink_delta: int = 0, t: int | None = None) -> None:
        t = t or now_ns()
        d = self._get(tx, ino)
        self._put(tx, d.but(nlink=d.nlink + nlink_delta, mtime_ns=t, ctime_ns=t))

    def _check_new_name(self, tx: Tx, parent_ino: int, name: bytes) -> Inode:
        """The parent directory, if ``name`` may be added to it."""
        check_name(name)
        parent = self._dir(tx, parent_ino, for_new_entry=True)
        if directory.find(tx, parent_ino, name) is not None or (
            parent_ino == ROOT_INO and name == SNAPDIR_NAME
        ):
            raise FsError(errno.EEXIST, repr(name))
        return parent

    def _new_inode(
        self,
        tx: Tx,
        parent_ino: int,
        name: bytes,
        mode: int,
        uid: int,
        gid: int,
        rdev: int = 0,
        target: bytes = b"",
    ) -> Inode:
        parent = self._check_new_name(tx, parent_ino, name)
        is_dir = stat.S_ISDIR(mode)
        if parent.mode & stat.S_ISGID:  # BSD group semantics of a setgid directory
            gid = parent.gid
            if is_dir:
                mode |= stat.S_ISGID
        ino = tx.get_u64(layout.META_NEXT_INO)
        tx.put(b"meta", layout.META_NEXT_INO, layout.u64(ino + 1))
        tx.add_u64(layout.STAT_INODES, 1)
        t = now_ns()
        inode = Inode(
            ino,
            mode,
            2 if is_dir else 1,
            uid,
            gid,
            rdev,
            len(target),
            t,
            t,
            t,
            parent=parent_ino,
            target=target,
        )
        self._put(tx, inode)
        parent = directory.add(tx, parent, name, ino)
        self._put(tx, parent.but(nlink=parent.nlink + is_dir, mtime_ns=t, ctime_ns=t))
        return inode

    def _unlinked(self, tx: Tx, inode: Inode) -> None:
        """``inode`` lost a link (already stored): free it, or park it as an orphan."""
        if inode.nlink > 0:
            return
        tx.put(b"orphans", layout.ino_key(inode.ino), b"")
        if not self.is_held(inode.ino):
            self._free(tx, inode.ino)

    def _is_recut(self, tx: Tx, ino: int) -> bool:
        return tx.get(b"recut", layout.ino_key(ino)) is not None

    def _set_recut(self, tx: Tx, ino: int, recut: bool) -> None:
        """Mark (or clear) a file whose chunks may differ from one whole-file cut."""
        if recut:
            tx.put(b"recut", layout.ino_key(ino), b"")
        else:
            tx.delete(b"recut", layout.ino_key(ino))

    def _free(self, tx: Tx, ino: int) -> None:
        self._xattrs_changed(ino)
        self._set_recut(tx, ino, False)
        self.merkle.drop(tx, ino)
        self.content.drop_all(tx, ino)
        for key, _ in list(tx.prefix(b"xattrs", layout.ino_key(ino))):
            tx.delete(b"xattrs", key)
        tx.delete(b"orphans", layout.ino_key(ino))
        self._inodes().pop(ino, None)
        if tx.delete(b"inodes", layout.ino_key(ino)):
            tx.add_u64(layout.STAT_INODES, -1)

    # -- lookups and attributes -------------------------------------------------------------

    @_reads
    def getattr(self, tx: Tx, ino: int) -> Inode:
        return self._get(tx, ino)

    @_reads
    def lookup(self, tx: Tx, parent: int, name: bytes) -> Inode:
        if name == b".":
            return self._dir(tx, parent)
        if name == b"..":
            return self._get(tx, self._dir(tx, parent).parent)
        return self._get(tx, self._child(tx, parent, name))

    @_reads
    def readlink(self, tx: Tx, ino: int) -> bytes:
        inode = self._get(tx, ino)
        if not inode.is_symlink:
            raise FsError(errno.EINVAL, f"inode {ino} is not a symlink")
        return inode.target

    @_reads
    def readdir(
        self, tx: Tx, ino: int, after: int = 0, limit: int | None = None
    ) -> list[tuple[int, bytes, Inode]]:
        """(cookie, name, attributes) of entries with cookies above ``after``; resume a
        listing by passing the last cookie returned."""
        self._dir(tx, ino)
        out = []
        for cookie, name, child in directory.entries(tx, ino, after):
            out.append((cookie, name, self._get(tx, child)))
            if limit is not None and len(out) >= limit:
                break
        return out

    @_writes
    def setattr(
        self,
        tx: Tx,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> Inode:
        inode = self._get(tx, ino)
        t = now_ns()
        changes: dict[str, int] = {"ctime_ns": t}
        if size is not None:
            if inode.is_dir:
                raise FsError(errno.EISDIR, f"inode {ino}")
            if not inode.is_reg:
                raise FsError(errno.EINVAL, f"inode {ino} is not a regular file")
            if size < 0:
                raise FsError(errno.EINVAL, "negative size")
            self._content_changed(tx, ino)
            if size < inode.size:
                changes["data_bytes"] = inode.data_bytes + writer.truncate(
                    self.content, tx, ino, size
                )
            # Cutting a file shorter keeps its cuts; zeros appended to stored chunks do not.
            if size == 0 or (size > inode.size and self.content.last_extent(tx, ino)):
                self._set_recut(tx, ino, size > 0)
            changes["size"] = size
            changes["mtime_ns"] = t
        if mode is not None:
            changes["mode"] = stat.S_IFMT(inode.mode) | stat.S_IMODE(mode)
        if uid is not None:
            changes["uid"] = uid
        if gid is not None:
            changes["gid"] = gid
        if atime_ns is not None:
            changes["atime_ns"] = atime_ns
        if mtime_ns is not None:
            changes["mtime_ns"] = mtime_ns
        return self._put(tx, inode.but(**changes))

    # -- namespace --------------------------------------------------------------------------

    @_writes
    def mknod(
        self, tx: Tx, parent: int, name: bytes, mode: int, uid: int, gid: int, rdev: int = 0
    ) -> Inode:
        """Create a regular file, fifo, socket or device node (``mode`` carries the type)."""
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK):
            raise FsError(errno.EINVAL, f"cannot mknod file type {kind:o}")
        inode = self._new_inode(tx, parent, name, kind | stat.S_IMODE(mode), uid, gid, rdev)
        self._xattrless().add(inode.ino)  # so the first write's capability check is free
        return inode

    def create(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        return self.mknod(parent, name, stat.S_IFREG | stat.S_IMODE(mode), uid, gid)

    @_writes
    def mkdir(self, tx: Tx, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        return self._new_inode(tx, parent, name, stat.S_IFDIR | stat.S_IMODE(mode), uid, gid)

    @_writes
    def symlink(self, tx: Tx, parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Inode:
        if not target or len(target) > 4095:
            raise FsError(errno.ENAMETOOLONG if target else errno.ENOENT, "symlink target")
        return self._new_inode(tx, parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    @_writes
    def link(self, tx: Tx, ino: int, new_parent: int, new_name: bytes) -> Inode:
        inode = self._get(tx, ino)
        parent = self._check_new_name(tx, new_parent, new_name)  # Linux checks the name first
        if inode.is_dir:
            raise FsError(errno.EPERM, "hard link to a directory")
        if inode.nlink == 0:
            raise FsError(errno.ENOENT, f"inode {ino} was removed")
        t = now_ns()
        self._put(tx, directory.add(tx, parent, new_name, ino).but(mtime_ns=t, ctime_ns=t))
        return self._put(tx, parents.gained(tx, inode, new_parent).but(ctime_ns=t))

    @_writes
    def unlink(self, tx: Tx, parent: int, name: bytes) -> None:
        child = self._get(tx, self._child(tx, parent, name))
        if child.is_dir:
            raise FsError(errno.EISDIR, repr(name))
        t = now_ns()
        directory.remove(tx, parent, name)
        self._touch_dir(tx, parent, t=t)
        child = self._put(tx, parents.lost(tx, child, parent).but(ctime_ns=t))
        self._unlinked(tx, child)

    @_writes
    def rmdir(self, tx: Tx, parent: int, name: bytes) -> None:
        if name == b".":
            raise FsError(errno.EINVAL, "rmdir .")
        child = self._get(tx, self._child(tx, parent, name))
        if not child.is_dir:
            raise FsError(errno.ENOTDIR, repr(name))
        if not directory.is_empty(tx, child.ino):
            raise FsError(errno.ENOTEMPTY, repr(name))
        t = now_ns()
        directory.remove(tx, parent, name)
        self._touch_dir(tx, parent, nlink_delta=-1, t=t)
        self._unlinked(tx, self._put(tx, child.but(nlink=0, ctime_ns=t)))

    def _is_ancestor(self, tx: Tx, ancestor: int, ino: int) -> bool:
        """Whether directory ``ancestor`` is ``ino`` or lies on its path to the root."""
        while True:
            if ino == ancestor:
                return True
            if ino == ROOT_INO:
                return False
            ino = self._get(tx, ino).parent

    @_writes
    def rename(
        self, tx: Tx, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT) or (
            flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE
        ):
            raise FsError(errno.EINVAL, f"rename flags {flags:#x}")
        if flags & RENAME_WHITEOUT:
            raise FsError(errno.EINVAL, "RENAME_WHITEOUT is not supported")
        for n in (name, new_name):
            if n in (b".", b".."):
                raise FsError(errno.EINVAL if n == b"." else errno.ENOTEMPTY, "rename of . or ..")
        src = self._get(tx, self._child(tx, parent, name))
        check_name(new_name)
        self._dir(tx, new_parent, for_new_entry=True)
        if new_parent == ROOT_INO and new_name == SNAPDIR_NAME:
            raise FsError(errno.EBUSY, "the name .snap is reserved for snapshots")
        dst_ino = directory.find(tx, new_parent, new_name)
        t = now_ns()
        if flags & RENAME_EXCHANGE:
            if dst_ino is None:
                raise FsError(errno.ENOENT, repr(new_name))
            self._exchange(tx, parent, name, src, new_parent, new_name, self._get(tx, dst_ino), t)
            return
        if dst_ino is not None and flags & RENAME_NOREPLACE:
            raise FsError(errno.EEXIST, repr(new_name))  # even for two links of one inode
        if dst_ino == src.ino:
            return  # both names already link the same inode: POSIX says do nothing
        if src.is_dir and self._is_ancestor(tx, src.ino, new_parent):
            raise FsError(errno.EINVAL, "cannot move a directory into itself")
        if dst_ino is not None:
            dst = self._get(tx, dst_ino)
            if dst.is_dir and self._is_ancestor(tx, dst.ino, parent):
                # the target is an ancestor of the source: Linux answers ENOTEMPTY first
                raise FsError(errno.ENOTEMPTY, repr(new_name))
            if src.is_dir and not dst.is_dir:
                raise FsError(errno.ENOTDIR, repr(new_name))
            if not src.is_dir and dst.is_dir:
                raise FsError(errno.EISDIR, repr(new_name))
            if dst.is_dir and not directory.is_empty(tx, dst.ino):
                raise FsError(errno.ENOTEMPTY, repr(new_name))
        directory.remove(tx, parent, name)
        if dst_ino is not None:
            directory.retarget(tx, new_parent, new_name, src.ino)
            dst = dst.but(nlink=0) if dst.is_dir else parents.lost(tx, dst, new_parent)
            self._touch_dir(tx, new_parent, nlink_delta=-dst.is_dir, t=t)
            self._unlinked(tx, self._put(tx, dst.but(ctime_ns=t)))
        else:
            self._put(tx, directory.add(tx, self._get(tx, new_parent), new_name, src.ino))
        if src.is_dir and parent != new_parent:
            self._touch_dir(tx, parent, nlink_delta=-1, t=t)
            self._touch_dir(tx, new_parent, nlink_delta=+1, t=t)
        else:
            self._touch_dir(tx, parent, t=t)
            self._touch_dir(tx, new_parent, t=t)
        self._put(tx, parents.moved(tx, self._get(tx, src.ino), parent, new_parent).but(ctime_ns=t))

    def _exchange(
        self,
        tx: Tx,
        parent: int,
        name: bytes,
        src: Inode,
        new_parent: int,
        new_name: bytes,
        dst: Inode,
        t: int,
    ) -> None:
        if parent != new_parent:
            if src.is_dir and self._is_ancestor(tx, src.ino, new_parent):
                raise FsError(errno.EINVAL, "cannot move a directory into itself")
            if dst.is_dir and self._is_ancestor(tx, dst.ino, parent):
                raise FsError(errno.EINVAL, "cannot move a directory into itself")
        directory.retarget(tx, parent, name, dst.ino)
        directory.retarget(tx, new_parent, new_name, src.ino)
        moved = int(src.is_dir) - int(dst.is_dir)
        if parent != new_parent:
            self._touch_dir(tx, parent, nlink_delta=-moved, t=t)
            self._touch_dir(tx, new_parent, nlink_delta=moved, t=t)
        else:
            self._touch_dir(tx, parent, t=t)
        if src.ino != dst.ino:  # two links of one file: nothing moves
            src = parents.moved(tx, self._get(tx, src.ino), parent, new_parent)
            dst = parents.moved(tx, self._get(tx, dst.ino), new_parent, parent)
        self._put(tx, src.but(ctime_ns=t))
        self._put(tx, dst.but(ctime_ns=t))

    # -- content ----------------------------------------------------------------------------

    def digest_steps(self, ino: int) -> Iterator[bytes | None]:
        """Steps to regular file ``ino``'s content digest (:mod:`casfs.tree.identity`)."""
        with self.store.read() as tx:
            inode = self._regular(tx, ino)
            recut = self._is_recut(tx, ino)
            extents = [] if recut else file_extents(tx, ino)
        read = functools.partial(self.read, ino)
        return identity.steps(self.pipeline, inode.size, extents, recut, read)

    def _regular(self, tx: Tx, ino: int) -> Inode:
        inode = self._get(tx, ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR, f"inode {ino}")
        if not inode.is_reg:
            raise FsError(errno.EINVAL, f"inode {ino} is not a regular file")
        return inode

    @_reads
    def read(self, tx: Tx, ino: int, offset: int, length: int) -> bytes:
        inode = self._regular(tx, ino)
        if offset < 0 or length < 0:
            raise FsError(errno.EINVAL, "negative offset or length")
        return self.content.read(tx, ino, inode.size, offset, length)

    def write(
        self,
        ino: int,
        offset: int,
        data: bytes | bytearray | memoryview,
        mtime_ns: int | None = None,
    ) -> int:
        """Write ``data`` at ``offset`` (past the end leaves a hole). A write larger than a
        group (see :mod:`casfs.tree.writer`) commits group by group, like a real filesystem's,
        not atomically. ``mtime_ns`` is when the bytes were written, if before now (buffered)."""
        steps = self.write_steps(ino, offset, data, mtime_ns)
        if self.store.in_batch:  # the caller commits (the mount's group commit)
            for future in steps:
                future.result()
            return len(data)
        # One durable commit per WRITE_COMMIT_BYTES, not per group: each costs an fsync.
        self.store.begin_batch()
        try:
            for future in steps:
                future.result()
                if self.store.batch_bytes >= WRITE_COMMIT_BYTES:
                    self.store.commit_batch(durable=False)
                    self.store.begin_batch()
        finally:
            self.store.commit_batch()
        return len(data)

    def write_steps(
        self,
        ino: int,
        offset: int,
        data: bytes | bytearray | memoryview,
        mtime_ns: int | None = None,
    ) -> Iterator[Future]:
        """The write as a generator of futures to wait for, each before the next step: the
        mount awaits them while it serves other requests."""
        if offset < 0:
            raise FsError(errno.EINVAL, "negative offset")
        with self.store.read() as tx:
            size = self._regular(tx, ino).size
            last = self.content.last_extent(tx, ino) if offset == size and size else None
        view = memoryview(data).cast("B")
        if not view:
            return iter(())
        w = writer.Write(self.content, ino, offset, view)
        # Appending to a file that ends in a stored chunk re-cuts that chunk with the new bytes,
        # as one whole-file cut would; any other write may leave other cuts (identity.py).
        w.keeps_cuts = offset == size and (size == 0 or (last is not None and last.end == size))
        w.into_empty = size == 0  # (no extent ends past the size: fsck checks it)

        def apply_group(group: writer.Group, pieces: list, values: dict) -> None:
            self.store.run_write(
                lambda tx: self._apply_group(tx, w, group, pieces, values, mtime_ns)
            )
            self.store.batch_bytes += group.end - group.start  # once, even if run_write retried

        return writer.steps(w, self.store.read, apply_group)

    def _apply_group(
        self,
        tx: Tx,
        w: writer.Write,
        group: writer.Group,
        pieces: list,
        values: dict,
        mtime_ns: int | None,
    ) -> None:
        inode = self._regular(tx, w.ino)
        delta = w.apply(tx, group, pieces, values)
        self._content_changed(tx, w.ino)
        if not w.keeps_cuts:
            self._set_recut(tx, w.ino, True)
        t = now_ns()
        self._put(
            tx,
            inode.but(
                size=max(inode.size, min(group.end, w.end)),
                data_bytes=inode.data_bytes + delta,
                mtime_ns=mtime_ns or t,
                ctime_ns=max(inode.ctime_ns, mtime_ns or t),
            ),
        )

    # -- extended attributes ----------------------------------------------------------------

    @_reads
    def getxattr(self, tx: Tx, ino: int, name: bytes) -> bytes:
        value = self._xattr(tx, ino, name)
        if value is None:
            raise FsError(errno.ENODATA, repr(name))
        return value

    def known_xattrless(self, ino: int) -> bool:
        """``ino`` has no xattrs, known without reading the store."""
        return ino in self._xattrless()

    def _xattrs_changed(self, ino: int) -> None:
        self._xattrless().discard(ino)

    @_reads
    def xattr(self, tx: Tx, ino: int, name: bytes) -> bytes | None:
        """An extended attribute's value, or None when it is not set (ENOENT if no inode)."""
        value = self._xattr(tx, ino, name)
        if value is None and tx.write and not any(tx.prefix(b"xattrs", layout.ino_key(ino))):
            self._xattrless().add(ino)  # learned from the batch the mount works in
        return value

    def _xattr(self, tx: Tx, ino: int, name: bytes) -> bytes | None:
        value = tx.get(b"xattrs", layout.xattr_key(ino, name))
        if value is None and tx.get(b"inodes", layout.ino_key(ino)) is None:
            raise FsError(errno.ENOENT, f"inode {ino}")
        return value

    @_reads
    def listxattr(self, tx: Tx, ino: int) -> list[bytes]:
        self._get(tx, ino)
        return [key[8:] for key, _ in tx.prefix(b"xattrs", layout.ino_key(ino))]

    @_writes
    def setxattr(self, tx: Tx, ino: int, name: bytes, value: bytes, flags: int = 0) -> None:
        inode = self._get(tx, ino)
        if not name or len(name) > XATTR_NAME_MAX:
            raise FsError(errno.ERANGE, "xattr name length")
        if len(value) > XATTR_SIZE_MAX:
            raise FsError(errno.E2BIG, "xattr value length")
        if name.startswith(identity.RESERVED_PREFIX):
            raise FsError(errno.EPERM, f"{name.decode(errors='replace')} is casfs's, read-only")
        if name.startswith(POSIX_ACL_PREFIX):
            # ACLs are not enforced (the mount does not enable them); refusing them, as ext4
            # mounted noacl does, makes cp -a and tar fall back to chmod, so modes stay right
            raise FsError(errno.EOPNOTSUPP, "POSIX ACLs are not supported")
        key = layout.xattr_key(ino, name)
        exists = tx.get(b"xattrs", key) is not None
        if flags & XATTR_CREATE and exists:
            raise FsError(errno.EEXIST, repr(name))
        if flags & XATTR_REPLACE and not exists:
            raise FsError(errno.ENODATA, repr(name))
        self._xattrs_changed(ino)
        tx.put(b"xattrs", key, bytes(value))
        self._put(tx, inode.but(ctime_ns=now_ns()))

    @_writes
    def removexattr(self, tx: Tx, ino: int, name: bytes) -> None:
        inode = self._get(tx, ino)
        if name.startswith(identity.RESERVED_PREFIX):
            raise FsError(errno.EPERM, f"{name.decode(errors='replace')} is casfs's, read-only")
        if not tx.delete(b"xattrs", layout.xattr_key(ino, name)):
            raise FsError(errno.ENODATA, repr(name))
        self._put(tx, inode.but(ctime_ns=now_ns()))

    # -- whole subtrees (restore, rollback) --------------------------------------------------

    def place(self, tx: Tx, parent: int, name: bytes, entry: Entry) -> Inode:
        """A new inode named ``name`` with a snapshot entry's attributes, xattrs and content
        (its chunks gain a reference each: no byte is copied). The directory's own times are
        the caller's to set once its entries are in (:meth:`set_times`)."""
        inode = self._new_inode(
            tx, parent, name, entry.mode, entry.uid, entry.gid, entry.rdev, entry.target
        )
        for key, value in entry.xattrs:  # (a new inode number: known to no cache)
            tx.put(b"xattrs", layout.xattr_key(inode.ino, key), value)
        if entry.is_reg:
            self._put_extents(tx, inode.ino, self._snapshot_extents(tx, entry))
            self._set_recut(tx, inode.ino, entry.recut)
        inode = inode.but(
            mode=entry.mode,
            gid=entry.gid,
            size=entry.size,
            data_bytes=entry.data_bytes if entry.is_reg else 0,
            atime_ns=entry.atime_ns,
            mtime_ns=entry.mtime_ns,
        )
        return self._put(tx, inode)

    def _snapshot_extents(self, tx: Tx, entry: Entry) -> list[Extent]:
        if entry.digest:
            return treeobjects.load_manifest(self.store, tx, entry.digest)
        return list(entry.extents)

    def _put_extents(self, tx: Tx, ino: int, extents: list[Extent]) -> None:
        for e in extents:
            tx.put(b"extents", layout.extent_key(ino, e.offset),
                   layout.extent_value(e.digest, e.length))  # fmt: skip
            self.store.add_ref(tx, e.digest, None, e.length)

    def is_linkable(self, tx: Tx, ino: int, mode: int) -> bool:
        """Whether ``ino`` is a live non-directory of ``mode``'s type that may get a name."""
        data = tx.get(b"inodes", layout.ino_key(ino))
        if data is None:
            return False
        inode = Inode.unpack(ino, data)
        return inode.nlink > 0 and not inode.is_dir and stat.S_IFMT(inode.mode) == stat.S_IFMT(mode)

    def reset(self, tx: Tx, ino: int, entry: Entry) -> bool:
        """Make live inode ``ino`` (the one ``entry`` was taken from) equal to the entry again:
        attributes, xattrs and content. What is already equal is not written, so unchanged
        inodes keep their cached digests. True when something changed."""
        inode = self._get(tx, ino)
        rows = list(tx.prefix(b"xattrs", layout.ino_key(ino)))
        if tuple((key[8:], value) for key, value in rows) != entry.xattrs:
            self._xattrs_changed(ino)
            for key, _ in rows:
                tx.delete(b"xattrs", key)
            for key, value in entry.xattrs:
                tx.put(b"xattrs", layout.xattr_key(ino, key), value)
            inode = inode.but(ctime_ns=now_ns())
        data_bytes = inode.data_bytes
        if inode.is_reg:
            extents = self._snapshot_extents(tx, entry)
            same = self.content.extents(tx, ino) == extents
            if not same or self._is_recut(tx, ino) != entry.recut:
                if not same:
                    self.content.drop_all(tx, ino)
                    self._put_extents(tx, ino, extents)
                    data_bytes = entry.data_bytes
                self._content_changed(tx, ino)
                self._set_recut(tx, ino, entry.recut)
                # new content is a change of the inode (and the mount keys what it remembers
                # of a file's content on its ctime), even when the attributes end up equal
                inode = inode.but(ctime_ns=now_ns())
        want = inode.but(
            mode=entry.mode,
            uid=entry.uid,
            gid=entry.gid,
            size=entry.size,
            atime_ns=entry.atime_ns,
            mtime_ns=entry.mtime_ns,
            data_bytes=data_bytes,
        )
        if want == self._get(tx, ino):
            return False
        self._put(tx, want)
        return True

    def add_name(self, tx: Tx, ino: int, parent: int, name: bytes) -> Inode:
        """One more hard link, inside the caller's transaction."""
        return Filesystem.link.__wrapped__(self, tx, ino, parent, name)

    def lookup_in(self, tx: Tx, parent: int, name: bytes) -> int:
        """The inode ``name`` names in directory ``parent``, inside the caller's transaction."""
        return self._child(tx, parent, name)

    def mode_in(self, tx: Tx, ino: int) -> int:
        return self._get(tx, ino).mode

    def set_times(self, tx: Tx, ino: int, atime_ns: int, mtime_ns: int) -> None:
        self._put(tx, self._get(tx, ino).but(atime_ns=atime_ns, mtime_ns=mtime_ns))

    def remove_tree(self, tx: Tx, parent: int, name: bytes) -> None:
        """Remove ``name`` and, if it is a directory, everything below it (``rm -r``), inside
        the caller's transaction. Inodes something still holds become orphans as usual."""
        unlink = Filesystem.unlink.__wrapped__
        rmdir = Filesystem.rmdir.__wrapped__
        stack = [(parent, name)]
        while stack:
            p, n = stack[-1]
            child = self._get(tx, self._child(tx, p, n))
            if not child.is_dir:
                unlink(self, tx, p, n)
                stack.pop()
            elif directory.is_empty(tx, child.ino):
                rmdir(self, tx, p, n)
                stack.pop()
            else:
                stack.extend((child.ino, e[1]) for e in directory.entries(tx, child.ino))

    # -- inode lifetime ---------------------------------------------------------------------

    @_writes
    def release(self, tx: Tx, ino: int) -> bool:
        """The holder let go of ``ino``: free it if it has no links. True when freed."""
        data = tx.get(b"inodes", layout.ino_key(ino))
        if data is None or Inode.unpack(ino, data).nlink > 0 or self.is_held(ino):
            return False
        self._free(tx, ino)
        return True

    @_writes
    def free_orphans(self, tx: Tx) -> int:
        """Free every unlinked inode nobody holds (at mount, after a crash). Returns how many."""
        freed = 0
        for key, _ in list(tx.prefix(b"orphans", b"")):
            ino = layout.read_u64(key)
            if not self.is_held(ino):
                self._free(tx, ino)
                freed += 1
        return freed

    @_reads
    def orphans(self, tx: Tx) -> list[int]:
        return [layout.read_u64(key) for key, _ in tx.prefix(b"orphans", b"")]
