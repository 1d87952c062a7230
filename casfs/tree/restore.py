"""Restore and rollback: put snapshot content back into the live tree without copying data.

New live inodes take the snapshot entries' attributes and share their chunks (one more
reference each), so restoring gigabytes costs a metadata write per file and per chunk. Hard
links inside the restored subtree stay hard links.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from casfs.errors import FsError
from casfs.store.store import Store, Tx
from casfs.tree import directory, snapshots, treeobjects
from casfs.tree.fs import ROOT_INO, Filesystem
from casfs.tree.treeobjects import Entry


def resolve(store: Store, tx: Tx, root: Entry, path: bytes, snapshot: bytes) -> Entry:
    """The entry at ``path`` (relative, '/'-separated) below the root of ``snapshot``."""
    entry = root
    seen: list[bytes] = []
    parts = [n for n in path.split(b"/") if n and n != b"."]
    for part in parts:
        where = f"{_show(b'/'.join(parts))!r} in snapshot {_show(snapshot)!r}"
        if len(seen) + 1 < len(parts):
            where += f" (no {_show(b'/'.join([*seen, part]))!r})"
        if part == b"..":
            raise FsError(errno.EINVAL, f"'..' in snapshot path {_show(path)!r}")
        if not entry.is_dir:
            raise FsError(errno.ENOTDIR, f"{_show(b'/'.join(seen))!r} is not a directory")
        found = treeobjects.load_tree(store, tx, entry.digest).find(part)
        if found is None:
            raise FsError(errno.ENOENT, where)
        entry = found
        seen.append(part)
    return entry


def _show(path: bytes) -> str:
    return path.decode(errors="backslashreplace")


def materialize(
    fs: Filesystem,
    tx: Tx,
    entry: Entry,
    parent: int,
    name: bytes,
    links: dict[int, int] | None = None,
    reuse: Callable[[Entry], int | None] | None = None,
) -> int:
    """Create ``entry`` (and its subtree) as ``parent``/``name``; returns the new inode.
    Hard links stay hard links: ``links`` maps snapshot inode numbers to the live inodes
    that hold them (updated here). ``reuse`` may name such a live inode when ``links`` does
    not have it yet (rollback: the file's own inode, if it is still live)."""
    links = {} if links is None else links
    dirs: list[tuple[int, Entry]] = []
    top = 0
    stack = [(parent, name, entry)]
    while stack:
        p, n, e = stack.pop()
        if not e.is_dir:
            target = reuse(e) if reuse is not None else links.get(e.ino)
            if target is not None:
                fs.add_name(tx, target, p, n)
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
    entry = resolve(fs.store, tx, snap.root, path, snapshot)
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
            raise FsError(errno.EEXIST, f"{os.fsdecode(target)} exists (use --force)")
        replaced = _removed(fs, tx, parent, name)
        fs.remove_tree(tx, parent, name)
    ino = materialize(fs, tx, entry, parent, name)
    return Name(parent, name, ino, entry.is_dir), replaced


def rollback(fs: Filesystem, tx: Tx, snapshot: bytes) -> tuple[list[Name], set[int]]:
    """Make the live tree equal to the snapshot, changing only what differs.

    Both trees are walked together from the root. A live directory whose cached digest equals
    the snapshot's is equal down to its inode numbers and is skipped; an entry that still
    names the inode it named in the snapshot is reset in place (:meth:`Filesystem.reset`),
    keeping its inode number (so the kernel's caches and open files stay valid); any other
    name is removed, and what the snapshot has there is linked (a hard link whose inode is
    still live) or created anew. Returns the entries removed and the inodes changed in place
    (the mount drops the kernel's cached pages of those)."""
    snap = snapshots.find(tx, snapshot)
    fs.merkle.build(tx)
    removed: list[Name] = []
    changed: set[int] = set()
    links: dict[int, int] = {}  # snapshot ino -> live ino holding its content now

    def live_for(e: Entry) -> int | None:
        """The live inode that holds snapshot file ``e`` now: the one it was, reset on first
        use, while it still has a name. (So a snapshot inode never gets two live copies.)"""
        if e.ino not in links and fs.is_linkable(tx, e.ino, e.mode):
            links[e.ino] = e.ino
            if fs.reset(tx, e.ino, e):
                changed.add(e.ino)
        return links.get(e.ino)

    reset: list[tuple[int, Entry]] = []  # directories to give the snapshot's attributes last
    stack: list[tuple[int, Entry]] = [(ROOT_INO, snap.root)]
    while stack:
        ino, want = stack.pop()
        reset.append((ino, want))
        cached = fs.merkle.cached(tx, ino)
        if cached is not None and cached[0] == want.digest:
            continue  # equal subtree
        tree = treeobjects.load_tree(fs.store, tx, want.digest)
        for _, name, child in list(directory.entries(tx, ino)):
            e = tree.find(name)
            if e is None or e.ino != child:
                removed.append(_removed(fs, tx, ino, name))
                fs.remove_tree(tx, ino, name)
        for e in tree.entries:
            child = directory.find(tx, ino, e.name)
            if child is not None:  # the same inode as in the snapshot
                if e.is_dir:
                    stack.append((child, e))
                else:
                    live_for(e)
                continue
            target = None if e.is_dir else live_for(e)
            if target is not None:
                fs.add_name(tx, target, ino, e.name)
            else:
                materialize(fs, tx, e, ino, e.name, links, live_for)
    for ino, e in reversed(reset):  # children first: their changes moved the times
        if fs.reset(tx, ino, e):
            changed.add(ino)
    return removed, changed
