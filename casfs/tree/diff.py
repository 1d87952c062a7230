"""What changed between two snapshots (or a snapshot and the live tree).

Walks both Merkle trees together and skips every pair of subtrees with equal digests, so the
cost follows the size of the change, not of the trees. A directory whose only change is its
mtime (because its entries changed) is not reported itself: its changed entries are.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from casfs.store.store import Store, Tx
from casfs.tree import treeobjects
from casfs.tree.treeobjects import Entry

ADDED, REMOVED, MODIFIED, METADATA = "added", "removed", "modified", "metadata"


@dataclass(frozen=True)
class Change:
    kind: str
    path: bytes
    is_dir: bool

    def describe(self) -> dict:
        return {"kind": self.kind, "path": os.fsdecode(self.path), "dir": self.is_dir}


def _content(e: Entry) -> tuple:
    return (stat.S_IFMT(e.mode), e.size, e.digest, e.extents, e.target, e.rdev)


def _metadata(e: Entry) -> tuple:
    times = () if e.is_dir else (e.mtime_ns,)
    return (e.mode, e.uid, e.gid, e.xattrs, *times)


def diff(store: Store, tx: Tx, old: Entry, new: Entry) -> list[Change]:
    """Changes from root entry ``old`` to ``new``, sorted by path."""
    changes: list[Change] = []
    if _metadata(old) != _metadata(new):
        changes.append(Change(METADATA, b"/", True))
    stack = [(b"", old.digest, new.digest)]
    while stack:
        path, a, b = stack.pop()
        if a == b:
            continue
        old_tree = treeobjects.load_tree(store, tx, a)
        new_tree = treeobjects.load_tree(store, tx, b)
        for name in sorted({e.name for e in old_tree.entries} | {e.name for e in new_tree.entries}):
            x, y = old_tree.find(name), new_tree.find(name)
            child = path + b"/" + name
            if x is None or y is None or stat.S_IFMT(x.mode) != stat.S_IFMT(y.mode):
                if x is not None:
                    _whole(store, tx, REMOVED, child, x, changes)
                if y is not None:
                    _whole(store, tx, ADDED, child, y, changes)
            elif x.is_dir:
                if _metadata(x) != _metadata(y):
                    changes.append(Change(METADATA, child, True))
                stack.append((child, x.digest, y.digest))
            elif _content(x) != _content(y):
                changes.append(Change(MODIFIED, child, False))
            elif _metadata(x) != _metadata(y):
                changes.append(Change(METADATA, child, False))
    changes.sort(key=lambda c: c.path)
    return changes


def _whole(store: Store, tx: Tx, kind: str, path: bytes, entry: Entry, out: list[Change]) -> None:
    """``entry`` and everything below it, all added or all removed."""
    stack = [(path, entry)]
    while stack:
        p, e = stack.pop()
        out.append(Change(kind, p, e.is_dir))
        if e.is_dir:
            tree = treeobjects.load_tree(store, tx, e.digest)
            stack.extend((p + b"/" + c.name, c) for c in tree.entries)
