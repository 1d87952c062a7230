"""Snapshots: named, immutable roots of the Merkle DAG (DESIGN §3).

A snapshot record holds its root directory as a tree-object entry (attributes, xattrs and
the root tree's digest), one reference on that tree, an id that is never reused (the mount
derives snapshot inode numbers from it) and its creation time. Creating one costs what
changed since the last: :class:`~casfs.tree.merkle.LiveDigests` keeps every unchanged
directory's tree object.
"""

from __future__ import annotations

import errno
import os
import struct
from collections import Counter
from dataclasses import dataclass

from casfs.errors import FsError
from casfs.store import layout
from casfs.store.store import Store, Tx
from casfs.tree import treeobjects
from casfs.tree.merkle import LiveDigests, entry_of
from casfs.tree.records import NAME_MAX, Inode
from casfs.tree.treeobjects import Entry, Totals

_HEAD = struct.Struct(">Qq")  # id, created (ns)
MAX_ID = (1 << 24) - 1  # snapshot ids share 24 bits of an inode number with the live ino
LIVE = b"@live"  # the live tree, where a snapshot name is asked for (diff)


@dataclass(frozen=True)
class Snapshot:
    name: bytes
    id: int
    created_ns: int
    root: Entry  # the root directory; root.digest is its tree object
    totals: Totals

    def pack(self) -> bytes:
        return _HEAD.pack(self.id, self.created_ns) + treeobjects.encode_tree(
            [self.root], self.totals
        )

    @classmethod
    def unpack(cls, name: bytes, value: bytes) -> Snapshot:
        sid, created = _HEAD.unpack_from(value)
        tree = treeobjects.decode_tree(bytes(value[_HEAD.size :]))
        return cls(name, sid, created, tree.entries[0], tree.totals)


def describe(snap: Snapshot, exclusive_bytes: int | None = None) -> dict:
    """A snapshot as JSON-ready data (what ``casfs snapshot --json`` prints)."""
    out = {
        "name": os.fsdecode(snap.name),
        "id": snap.id,
        "created_ns": snap.created_ns,
        "files": snap.totals.files,
        "dirs": snap.totals.dirs,
        "logical_bytes": snap.totals.bytes,
    }
    if exclusive_bytes is not None:
        out["exclusive_bytes"] = exclusive_bytes
    return out


def check_snapshot_name(name: bytes) -> None:
    """Snapshot names are directory names under .snap, and must be safe to print."""
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG, f"snapshot name of {len(name)} bytes")
    if not name or name in (b".", b".."):
        raise FsError(errno.EINVAL, f"invalid snapshot name {name!r}")
    if any(c < 0x20 or c == 0x7F or c == 0x2F for c in name):
        raise FsError(errno.EINVAL, f"snapshot name {name!r} has '/' or a control character")
    if name.startswith(b"@"):
        raise FsError(errno.EINVAL, "names starting with '@' are reserved (@live: the live tree)")


def get(tx: Tx, name: bytes) -> Snapshot | None:
    value = tx.get(b"snapshots", name)
    return Snapshot.unpack(name, value) if value is not None else None


def find(tx: Tx, name: bytes) -> Snapshot:
    snap = get(tx, name) if name and len(name) <= NAME_MAX else None
    if snap is None:
        raise FsError(errno.ENOENT, f"no snapshot named '{os.fsdecode(name)}'")
    return snap


def all_snapshots(tx: Tx) -> list[Snapshot]:
    """Every snapshot, oldest first."""
    snaps = [Snapshot.unpack(bytes(k), v) for k, v in tx.prefix(b"snapshots", b"")]
    return sorted(snaps, key=lambda s: (s.created_ns, s.id))


def live_root(tx: Tx, merkle: LiveDigests) -> tuple[Entry, Totals]:
    """The live tree as a snapshot would record it now (builds what is stale)."""
    digest, totals = merkle.build(tx)
    root = Inode.unpack(layout.ROOT_INO, tx.get(b"inodes", layout.ino_key(layout.ROOT_INO)))
    return entry_of(tx, root, b"", digest=digest), totals


def root_of(tx: Tx, merkle: LiveDigests, name: bytes) -> Entry:
    """The root entry of snapshot ``name``, or of the live tree for ``@live``."""
    return live_root(tx, merkle)[0] if name == LIVE else find(tx, name).root


def create(tx: Tx, store: Store, merkle: LiveDigests, name: bytes, created_ns: int) -> Snapshot:
    """Record the live tree as it is in ``tx`` (one point in time) under ``name``."""
    check_free(tx, name)
    root, totals = live_root(tx, merkle)
    return record(tx, store, name, root, totals, created_ns)


def check_free(tx: Tx, name: bytes) -> None:
    """``name`` may be given to a new snapshot."""
    check_snapshot_name(name)
    if tx.get(b"snapshots", name) is not None:
        raise FsError(errno.EEXIST, f"snapshot '{os.fsdecode(name)}' exists")


def record(
    tx: Tx,
    store: Store,
    name: bytes,
    root: Entry,
    totals: Totals,
    created_ns: int,
    take_ref: bool = True,
) -> Snapshot:
    """Name the tree under ``root`` as a snapshot. The record holds one reference on the root
    tree object: a new one, or (``take_ref=False``) one the caller hands over."""
    check_free(tx, name)
    sid = tx.get_u64(layout.META_NEXT_SNAPSHOT) or 1
    if sid > MAX_ID:
        raise FsError(errno.ENOSPC, "snapshot ids are used up")
    tx.put(b"meta", layout.META_NEXT_SNAPSHOT, layout.u64(sid + 1))
    if take_ref:
        store.add_ref(tx, root.digest, None, 0)
    snap = Snapshot(name, sid, created_ns, root, totals)
    tx.put(b"snapshots", name, snap.pack())
    return snap


def delete(tx: Tx, store: Store, name: bytes) -> Snapshot:
    """Remove a snapshot and free what only it held. (The mount pins what the kernel still
    uses first; see :mod:`casfs.fuse.snapview`.)"""
    snap = find(tx, name)
    tx.delete(b"snapshots", name)
    treeobjects.release(store, tx, snap.root.digest)
    return snap


def pin(tx: Tx, store: Store, digests: list[bytes]) -> None:
    """Hold one reference on each object for the kernel or an import (``pins`` table; see
    :mod:`casfs.fuse.snapview`)."""
    for digest in digests:
        store.add_ref(tx, digest, None, 0)
        adjust_pin(tx, digest, 1)


def unpin(tx: Tx, store: Store, digests: list[bytes]) -> None:
    for digest in digests:
        adjust_pin(tx, digest, -1)
        treeobjects.release(store, tx, digest)


def adjust_pin(tx: Tx, digest: bytes, delta: int) -> None:
    """Count ``delta`` more references as held by pins (the caller takes or drops the
    references themselves). Imports pin what they hold until a tree object takes it over."""
    left = _pins(tx, digest) + delta
    if left > 0:
        tx.put(b"pins", digest, layout.u64(left))
    else:
        tx.delete(b"pins", digest)


def drop_pins(tx: Tx, store: Store) -> int:
    """Release every pin (at mount or an offline import: the kernel or import that held
    them is gone). Returns how many."""
    rows = [(bytes(k), layout.read_u64(v)) for k, v in tx.prefix(b"pins", b"")]
    for digest, count in rows:
        tx.delete(b"pins", digest)
        for _ in range(count):
            treeobjects.release(store, tx, digest)
    return sum(count for _, count in rows)


def _pins(tx: Tx, digest: bytes) -> int:
    value = tx.get(b"pins", digest)
    return layout.read_u64(value) if value else 0


def exclusive_bytes(tx: Tx, store: Store, root: bytes) -> int:
    """Stored bytes that deleting the snapshot rooted at ``root`` would free: the objects
    whose every reference comes from the snapshot itself or from such objects. Only those
    objects are opened, so a snapshot that shares everything costs one lookup."""
    if _refcount(tx, root) != 1:
        return 0  # the live tree (or another snapshot) has the same root
    from_inside: Counter[bytes] = Counter()
    ready = [root]
    total = 0
    while ready:
        digest = ready.pop()
        kind, stored = store.object_info(tx, digest)
        total += stored
        if kind == layout.KIND_CHUNK:
            continue
        for ref in treeobjects.refs_of(kind, store.load(tx, digest)):
            from_inside[ref] += 1
            if from_inside[ref] == _refcount(tx, ref):
                ready.append(ref)
    return total


def _refcount(tx: Tx, digest: bytes) -> int:
    ref = tx.get(b"refs", digest)
    return layout.read_ref_value(ref)[0] if ref else 0
