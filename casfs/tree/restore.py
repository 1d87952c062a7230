"""Restore and rollback: put snapshot content back into the live tree without copying data.

New live inodes take the snapshot entries' attributes and share their chunks (one more
reference each), so restoring gigabytes costs a metadata write per file and per chunk. Hard
links inside the restored subtree stay hard links.
"""

from __future__ import annotations

import errno
import stat
from dataclasses import dataclass

from casfs.errors import FsError
from casfs.store.store import Tx
from casfs.tree import directory, snapshots, treeobjects
from casfs.tree.fs import ROOT_INO, Filesystem
from casfs.tree.treeobjects import Entry


def resolve(fs: Filesystem, tx: Tx, root: Entry, path: bytes) -> Entry:
    """The entry at ``path`` (relative, '/'-separated) below a snapshot root."""
    entry = root
    for name in (n for n in path.split(b"/") if n and n != b"."):
        if not entry.is_dir:
            raise FsError(errno.ENOTDIR, path.decode(errors="replace"))
        if name == b"..":
            raise FsError(errno.EINVAL, "'..' in a snapshot path")
        found = treeobjects.load_tree(fs.store, tx, entry.digest).find(name)
        if found is None:
            raise FsError(errno.ENOENT, path.decode(errors="replace"))
        entry = found
    return entry


def materialize(fs: Filesystem, tx: Tx, entry: Entry, parent: int, name: bytes) -> int:
    """Create ``entry`` (and its subtree) as ``parent``/``name``; returns the new inode."""
    links: dict[int, int] = {}  # snapshot ino -> new live ino, for hard links
    dirs: list[tuple[int, Entry]] = []
    top = 0
    stack = [(parent, name, entry)]
    while stack:
        p, n, e = stack.pop()
        if not e.is_dir and e.ino in links:
            fs.add_name(tx, links[e.ino], p, n)
            continue
        ino = fs.place(tx, p, n, e).ino
        top = top or ino
        if e.is_dir:
            dirs.append((ino, e))
            tree = treeobjects.load_tree(fs.store, tx, e.digest)
            stack.extend((ino, c.name, c) for c in reversed(tree.entries))
        elif e.nlink > 1:
            links[e.ino] = ino
    for ino, e in dirs:  # adding entries moved their times: put the snapshot's back
        fs.set_times(tx, ino, e.atime_ns, e.mtime_ns)
    return top


@dataclass(frozen=True)
class Name:
    """A live directory entry that restore or rollback removed or created (so the mount can
    update the kernel's cache)."""

    parent: int
    name: bytes
    ino: int
    is_dir: bool


def _removed(fs: Filesystem, tx: Tx, parent: int, name: bytes) -> Name:
    ino = fs.lookup_in(tx, parent, name)
    return Name(parent, name, ino, stat.S_ISDIR(fs.mode_in(tx, ino)))


def restore(
    fs: Filesystem, tx: Tx, snapshot: bytes, path: bytes, dest: bytes | None, force: bool
) -> tuple[Name, Name | None]:
    """Copy ``path`` from a snapshot to ``dest`` (default: the same path) in the live tree.
    An existing destination is replaced only with ``force``. Returns the new entry and the
    one it replaced."""
    snap = snapshots.find(tx, snapshot)
    entry = resolve(fs, tx, snap.root, path)
    target = (dest if dest is not None else path).strip(b"/")
    if not target:
        raise FsError(errno.EINVAL, "cannot restore onto the root; use rollback")
    *dirs, name = target.split(b"/")
    parent = ROOT_INO
    for d in dirs:
        parent = fs.lookup_in(tx, parent, d)
    replaced = None
    if directory.find(tx, parent, name) is not None:
        if not force:
            raise FsError(errno.EEXIST, f"{target.decode(errors='replace')} exists (use --force)")
        replaced = _removed(fs, tx, parent, name)
        fs.remove_tree(tx, parent, name)
    ino = materialize(fs, tx, entry, parent, name)
    return Name(parent, name, ino, entry.is_dir), replaced


def rollback(fs: Filesystem, tx: Tx, snapshot: bytes) -> list[Name]:
    """Make the live tree equal to the snapshot. Returns the root entries that were removed."""
    snap = snapshots.find(tx, snapshot)
    removed = [_removed(fs, tx, ROOT_INO, name) for _, name, _ in directory.entries(tx, ROOT_INO)]
    for gone in removed:
        fs.remove_tree(tx, ROOT_INO, gone.name)
    for child in treeobjects.load_tree(fs.store, tx, snap.root.digest).entries:
        materialize(fs, tx, child, ROOT_INO, child.name)
    root = snap.root
    fs.set_root_attributes(tx, root.mode, root.uid, root.gid, root.xattrs)
    fs.set_times(tx, ROOT_INO, root.atime_ns, root.mtime_ns)
    assert stat.S_ISDIR(root.mode)
    return removed
