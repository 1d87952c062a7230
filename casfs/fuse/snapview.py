"""The read-only ``.snap`` view: every snapshot as a directory at the mount's root.

Inode numbers: live inodes are below ``SNAPDIR_INO`` (2^40 - 1); a snapshot's inode is its
id (never reused) in the top 24 bits and the live inode it was, in the low 40. So hard links
inside a snapshot share one number, and no two snapshots (or a snapshot and the live tree)
ever do. The kernel only learns numbers through lookup and readdir, which go through here:
``nodes`` keeps the entry of every number the kernel holds, until its last forget.

Snapshot content never changes, so the kernel may cache it for long. When a snapshot is
deleted, the content of its nodes the kernel still holds is pinned (one reference each, also
recorded in the ``pins`` table so a crash cannot leak it) until their last forget or release.
"""

from __future__ import annotations

import errno
import stat
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import pyfuse3

from casfs.store.store import Store, Tx
from casfs.tree import snapshots, treeobjects
from casfs.tree.content import Extent
from casfs.tree.fs import ROOT_INO, Filesystem
from casfs.tree.treeobjects import Entry, Tree

ID_SHIFT = 40
SNAPDIR_INO = (1 << ID_SHIFT) - 1
SNAP_TIMEOUT = 3600.0  # snapshot content is immutable
SNAPDIR_TIMEOUT = 1.0  # the list of snapshots changes
BLKSIZE = 128 << 10
# Decoded tree objects and manifests, bounded by entries (about 300 bytes each decoded): a
# walk over many snapshots revisits the same directories, and readdir asks for each one twice.
CACHED_ENTRIES = 100_000


def is_snapshot_ino(ino: int) -> bool:
    return ino >= SNAPDIR_INO


def snapshot_ino(sid: int, ino: int) -> int:
    return (sid << ID_SHIFT) | ino


@dataclass
class Node:
    sid: int
    entry: Entry
    parent: int  # the mount's inode number of the directory holding it
    pinned: list[bytes] = field(default_factory=list)
    attrs: pyfuse3.EntryAttributes | None = None  # built once: the entry never changes


class Lru(OrderedDict):
    """Least recently used out first, bounded by the total ``weight`` of its values."""

    def __init__(self, max_weight: int) -> None:
        super().__init__()
        self.max_weight = max_weight
        self.weight = 0

    def remember(self, key: Hashable, value: object, weight: int) -> None:
        if key in self:
            self.move_to_end(key)
            return
        self[key] = (value, weight)
        self.weight += weight
        while self.weight > self.max_weight and len(self) > 1:
            _, (_, w) = self.popitem(last=False)
            self.weight -= w

    def find(self, key: Hashable) -> object | None:
        found = self.get(key)
        if found is None:
            return None
        self.move_to_end(key)
        return found[0]


class SnapView:
    def __init__(self, fs: Filesystem, store: Store) -> None:
        self.fs = fs
        self.store = store
        self.nodes: dict[int, Node] = {}
        self.deleted: set[int] = set()  # ids of snapshots deleted while the kernel held nodes
        self._decoded = Lru(CACHED_ENTRIES)  # tree objects and manifests, by digest

    # -- attributes -------------------------------------------------------------------------

    def snapdir_attributes(self) -> pyfuse3.EntryAttributes:
        root = self.fs.getattr(ROOT_INO)
        with self.store.read() as tx:
            snaps = snapshots.all_snapshots(tx)
        t = max([s.created_ns for s in snaps], default=root.ctime_ns)
        a = self._attrs(SNAPDIR_INO, SNAPDIR_TIMEOUT)
        a.st_mode = stat.S_IFDIR | 0o555
        a.st_nlink = 2 + len(snaps)
        a.st_uid, a.st_gid = root.uid, root.gid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = t
        return a

    def attributes(self, ino: int) -> pyfuse3.EntryAttributes:
        if ino == SNAPDIR_INO:
            return self.snapdir_attributes()
        node = self.node(ino)
        if node.attrs is not None:
            return node.attrs
        e = node.entry
        a = node.attrs = self._attrs(ino, SNAP_TIMEOUT)
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_rdev = e.mode, e.nlink, e.uid, e.gid, e.rdev
        a.st_size = e.size
        a.st_blocks = (min(e.data_bytes, e.size) + 511) // 512
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = e.atime_ns, e.mtime_ns, e.ctime_ns
        return a

    @staticmethod
    def _attrs(ino: int, timeout: float) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = a.attr_timeout = timeout
        a.st_blksize = BLKSIZE
        return a

    def node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    # -- lookups ----------------------------------------------------------------------------

    def lookup(self, parent: int, name: bytes) -> int:
        """The inode number of ``name`` in snapshot directory ``parent`` (now known)."""
        if parent == SNAPDIR_INO:
            if name in (b".", b".."):
                return SNAPDIR_INO if name == b"." else ROOT_INO
            with self.store.read() as tx:
                snap = snapshots.get(tx, name) if 0 < len(name) <= 255 else None
            if snap is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self.remember(snapshot_ino(snap.id, ROOT_INO), snap.id, snap.root, SNAPDIR_INO)
        node = self.node(parent)
        if not node.entry.is_dir:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if name == b".":
            return parent
        if name == b"..":
            return node.parent
        child = self.tree(node.entry.digest).find(name)
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.remember(snapshot_ino(node.sid, child.ino), node.sid, child, parent)

    def remember(self, ino: int, sid: int, entry: Entry, parent: int) -> int:
        """Keep the entry of a number the kernel is about to learn (the caller counts the
        lookup)."""
        if ino not in self.nodes:
            node = self.nodes[ino] = Node(sid, entry, parent)
            if sid in self.deleted:
                self.store.run_write(lambda tx: self._pin(tx, node))
        return ino

    def tree(self, digest: bytes) -> Tree:
        tree = self._decoded.find(digest)
        if tree is None:
            with self.store.read() as tx:
                tree = treeobjects.load_tree(self.store, tx, digest)
            self._decoded.remember(digest, tree, 1 + len(tree.entries))
        return tree

    def snapshot_list(self, after: int) -> list[tuple[int, snapshots.Snapshot]]:
        """(readdir cookie, snapshot) past ``after``; cookies are ids, which only grow."""
        with self.store.read() as tx:
            snaps = snapshots.all_snapshots(tx)
        return sorted((s.id, s) for s in snaps if s.id > after)

    def extents(self, tx: Tx, entry: Entry) -> list[Extent]:
        if not entry.digest:
            return list(entry.extents)
        found = self._decoded.find(entry.digest)
        if found is None:
            found = treeobjects.load_manifest(self.store, tx, entry.digest)
            self._decoded.remember(entry.digest, found, 1 + len(found))
        return found

    # -- lifetime ---------------------------------------------------------------------------

    def release(self, ino: int) -> None:
        """The kernel let go of ``ino`` (last forget and release)."""
        node = self.nodes.pop(ino, None)
        if node is not None and node.pinned:
            self.store.run_write(lambda tx: self._unpin(tx, node))

    def pin_deleted(self, tx: Tx, snap: snapshots.Snapshot) -> None:
        """Before ``snap`` goes: keep what the kernel holds of it (same transaction)."""
        self.deleted.add(snap.id)
        for node in self.nodes.values():
            if node.sid == snap.id and not node.pinned:
                self._pin(tx, node)

    def evict(self, ino: int) -> None:
        """Ask the kernel to drop its cached name for a pinned node nothing has open: its
        forget then frees what only the deleted snapshot held. Otherwise the name may stay
        cached (and the space held) until memory pressure or the next mount."""
        node = self.nodes.get(ino)
        if node is not None and node.pinned and node.entry.name:
            pyfuse3.invalidate_entry_async(node.parent, node.entry.name, ignore_enoent=True)

    def evict_deleted(self, sid: int, is_open: Callable[[int], bool]) -> None:
        for ino, node in list(self.nodes.items()):
            if node.sid == sid and not is_open(ino):
                self.evict(ino)

    def _pin(self, tx: Tx, node: Node) -> None:
        node.pinned = node.entry.refs()
        snapshots.pin(tx, self.store, node.pinned)

    def _unpin(self, tx: Tx, node: Node) -> None:
        snapshots.unpin(tx, self.store, node.pinned)
        node.pinned = []
