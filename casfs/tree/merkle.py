"""The live tree's digests, cached so that a snapshot costs O(what changed) (DESIGN §3).

``treecache`` maps a live directory to the digest of its tree object, and a large file to
the digest of its manifest; each row holds one reference on its object. The invariant: when
an inode has no row, none of its ancestors has one. So a change deletes rows from the changed
inode upwards and stops at the first directory without a row: after the first change below a
directory, further changes there cost one lookup.

Building (:meth:`LiveDigests.step`) goes bottom-up and composes a directory only when all its
subdirectories have rows, each step in its own short transaction. The mount runs the steps
between requests; a concurrent change just deletes rows again, and the final, synchronous
pass (the snapshot's point in time) redoes only those.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from casfs.store import layout
from casfs.store.store import Store, Tx
from casfs.tree import directory, parents, treeobjects
from casfs.tree.content import file_extents
from casfs.tree.records import Inode
from casfs.tree.treeobjects import INLINE_EXTENTS, Entry, Totals

_ROW = struct.Struct(">32sQQQ")  # digest, files, dirs, bytes


def entry_of(tx: Tx, inode: Inode, name: bytes, digest: bytes = b"", extents: tuple = ()) -> Entry:
    """An inode's tree-object entry (content given by the caller)."""
    rows = tx.prefix(b"xattrs", layout.ino_key(inode.ino))
    xattrs = tuple((key[8:], value) for key, value in rows)
    return Entry(
        name,
        inode.ino,
        inode.mode,
        inode.nlink,
        inode.uid,
        inode.gid,
        inode.rdev,
        inode.size,
        inode.data_bytes,
        inode.atime_ns,
        inode.mtime_ns,
        inode.ctime_ns,
        digest=digest,
        extents=extents,
        target=inode.target,
        xattrs=xattrs,
        recut=inode.is_reg and tx.get(b"recut", layout.ino_key(inode.ino)) is not None,
    )


class LiveDigests:
    def __init__(self, store: Store) -> None:
        self.store = store

    # -- the cache --------------------------------------------------------------------------

    def cached(self, tx: Tx, ino: int) -> tuple[bytes, Totals] | None:
        row = tx.get(b"treecache", layout.ino_key(ino))
        if row is None:
            return None
        digest, files, dirs, nbytes = _ROW.unpack(row)
        return digest, Totals(files, dirs, nbytes)

    def _set(self, tx: Tx, ino: int, digest: bytes, totals: Totals) -> None:
        row = _ROW.pack(digest, totals.files, totals.dirs, totals.bytes)
        tx.put(b"treecache", layout.ino_key(ino), row)

    def drop(self, tx: Tx, ino: int) -> bool:
        """Forget ``ino``'s own digest (its content changed, or it is freed). True if it had
        one."""
        key = layout.ino_key(ino)
        row = tx.get(b"treecache", key)
        if row is None:
            return False
        tx.delete(b"treecache", key)
        treeobjects.release(self.store, tx, row[:32])
        return True

    def changed(self, tx: Tx, inode: Inode, get: Callable[[int], Inode]) -> None:
        """``inode`` (as now stored) changed: the directories naming it, and theirs, are stale.
        A directory's own tree object is stale too (its entries or attributes changed)."""
        if inode.is_dir:
            self._stale_upwards(tx, inode.ino, get)
            return
        for parent in parents.parents(tx, inode):
            self._stale_upwards(tx, parent, get)

    def _stale_upwards(self, tx: Tx, ino: int, get: Callable[[int], Inode]) -> None:
        while self.drop(tx, ino) and ino != layout.ROOT_INO:
            ino = get(ino).parent

    # -- building ---------------------------------------------------------------------------

    def build(self, tx: Tx, ino: int = layout.ROOT_INO) -> tuple[bytes, Totals]:
        """Bring ``ino``'s subtree up to date in this transaction; its digest and totals."""
        stack = [ino]
        while stack:
            self.step(tx, stack)
        found = self.cached(tx, ino)
        assert found is not None
        return found

    def step(self, tx: Tx, stack: list[int]) -> None:
        """One unit of building: compose the directory on top of ``stack`` if its
        subdirectories are all cached, else push the ones that are not. ``stack`` changes
        only after the transaction's work (a retried step starts from the same stack)."""
        ino = stack[-1]
        data = tx.get(b"inodes", layout.ino_key(ino))
        if data is None or self.cached(tx, ino) is not None:
            stack.pop()
            return
        inode = Inode.unpack(ino, data)
        if not inode.is_dir or inode.nlink == 0:
            stack.pop()
            return
        entries, totals, missing = self.compose(tx, inode)
        if missing:
            stack.extend(missing)
            return
        refs = [d for e in entries for d in e.refs()]
        plain = treeobjects.encode_tree(entries, totals)
        digest = treeobjects.put(self.store, tx, layout.KIND_TREE, plain, refs)
        self._set(tx, ino, digest, totals)
        stack.pop()

    def compose(
        self, tx: Tx, inode: Inode, store_manifests: bool = True
    ) -> tuple[list[Entry], Totals, list[int]]:
        """A directory's entries and totals, or (when some are not cached yet) the
        subdirectories to build first. Without ``store_manifests`` (fsck) a large file with
        no cached manifest is listed as missing too."""
        entries: list[Entry] = []
        missing: list[int] = []
        totals = Totals()
        for _, name, child_ino in directory.entries(tx, inode.ino):
            child = Inode.unpack(child_ino, tx.get(b"inodes", layout.ino_key(child_ino)))
            if child.is_dir:
                found = self.cached(tx, child_ino)
                if found is None:
                    missing.append(child_ino)
                    continue
                entries.append(entry_of(tx, child, name, digest=found[0]))
                totals += found[1] + Totals(dirs=1)
            elif missing:
                continue  # this pass only finds what to build first
            elif child.is_reg:
                entry = self._file_entry(tx, child, name, store_manifests)
                if entry is None:
                    missing.append(child_ino)
                    continue
                entries.append(entry)
                totals += Totals(files=1, bytes=child.size)
            else:
                entries.append(entry_of(tx, child, name))
                totals += Totals(files=1)
        return entries, totals, missing

    def _file_entry(self, tx: Tx, inode: Inode, name: bytes, store: bool) -> Entry | None:
        found = self.cached(tx, inode.ino)
        if found is not None:
            return entry_of(tx, inode, name, digest=found[0])
        extents = file_extents(tx, inode.ino)
        if len(extents) <= INLINE_EXTENTS:
            return entry_of(tx, inode, name, extents=tuple(extents))
        if not store:
            return None
        plain = treeobjects.encode_manifest(extents)
        refs = [e.digest for e in extents]
        digest = treeobjects.put(self.store, tx, layout.KIND_MANIFEST, plain, refs)
        self._set(tx, inode.ino, digest, Totals(files=1, bytes=inode.size))
        return entry_of(tx, inode, name, digest=digest)
