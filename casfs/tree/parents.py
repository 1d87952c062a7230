"""Where an inode's names are: the directories that must learn when it changes.

A snapshot's tree objects hold each entry's attributes, so any change to an inode makes the
cached tree objects of every directory naming it stale (see :mod:`casfs.tree.merkle`). A
directory has one parent, kept in its inode. So does a file with one link. A file with more
links keeps a count per parent directory in ``links``; the inode's ``parent`` field is then
not used. The functions take the inode before the change and return it after (the caller
stores it).
"""

from __future__ import annotations

import struct

from casfs.store import layout
from casfs.store.store import Tx
from casfs.tree.records import Inode

_COUNT = struct.Struct(">I")


def parents(tx: Tx, inode: Inode) -> list[int]:
    """Every directory with a name for ``inode`` (none once its last link is gone)."""
    if inode.is_dir or inode.nlink <= 1:
        return [inode.parent] if inode.nlink and inode.parent else []
    prefix = layout.ino_key(inode.ino)
    return [layout.read_u64(key[8:]) for key, _ in tx.prefix(b"links", prefix)]


def _bump(tx: Tx, ino: int, parent: int, delta: int) -> None:
    key = layout.link_key(ino, parent)
    old = tx.get(b"links", key)
    count = (_COUNT.unpack(old)[0] if old else 0) + delta
    if count > 0:
        tx.put(b"links", key, _COUNT.pack(count))
    else:
        tx.delete(b"links", key)


def gained(tx: Tx, inode: Inode, parent: int) -> Inode:
    """A non-directory got one more name, in ``parent``."""
    if inode.nlink == 1:
        _bump(tx, inode.ino, inode.parent, +1)
    _bump(tx, inode.ino, parent, +1)
    return inode.but(nlink=inode.nlink + 1)


def lost(tx: Tx, inode: Inode, parent: int) -> Inode:
    """A non-directory lost its name in ``parent``."""
    if inode.nlink >= 2:
        _bump(tx, inode.ino, parent, -1)
        if inode.nlink == 2:  # back to one name: its parent goes into the inode
            (key, _), *_ = tx.prefix(b"links", layout.ino_key(inode.ino))
            tx.delete(b"links", key)
            return inode.but(nlink=1, parent=layout.read_u64(key[8:]))
    return inode.but(nlink=inode.nlink - 1)


def moved(tx: Tx, inode: Inode, old: int, new: int) -> Inode:
    """One of the inode's names moved from directory ``old`` to ``new``."""
    if inode.is_dir or inode.nlink <= 1:
        return inode.but(parent=new)
    if old != new:
        _bump(tx, inode.ino, old, -1)
        _bump(tx, inode.ino, new, +1)
    return inode
