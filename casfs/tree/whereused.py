"""Which files use a stored object: the paths a corruption report names.

No reverse index (object to files) is kept: every write would pay to maintain it, and only
corruption reports need it. So this is a scan: one pass over ``extents`` (and ``treecache``)
for the live tree, and a walk of every snapshot's tree objects and manifests. The walk visits
each distinct object once, whatever the number of snapshots sharing it: what lies below a tree
object is worked out once, by digest, and reused wherever that tree appears.

Live files are named ``/path``, snapshot files ``NAME:/path``. A path is not shown twice, and
each object gets at most ``limit`` of them: a chunk used by a million files needs no million
lines.
"""

from __future__ import annotations

from collections import Counter

from casfs.errors import CorruptObject
from casfs.store import layout
from casfs.store.store import Store, Tx
from casfs.tree import snapshots, treeobjects
from casfs.tree.parents import parents
from casfs.tree.records import Inode
from casfs.tree.treeobjects import Entry

# (path relative to a tree object, digest used there) for each use found below it
Hits = list[tuple[bytes, bytes]]


def where_used(
    store: Store, tx: Tx, digests: set[bytes], limit: int = 20
) -> dict[bytes, list[str]]:
    """For each of ``digests``, up to ``limit`` paths that use it: live files first, then
    snapshots oldest first. An object nothing names maps to an empty list."""
    out: dict[bytes, list[str]] = {d: [] for d in digests}
    if not digests:
        return out
    for digest, path in _live(tx, digests, limit):
        out[digest].append(_show(path))
    walk = _SnapshotWalk(store, tx, digests, limit)
    for snap in snapshots.all_snapshots(tx):
        for path, digest in walk.uses(snap.root, b"/"):
            if len(out[digest]) < limit:
                out[digest].append(f"{_show(snap.name)}:{_show(path)}")
    return out


def _show(name: bytes) -> str:
    return name.decode(errors="backslashreplace")


def _live(tx: Tx, digests: set[bytes], limit: int) -> list[tuple[bytes, bytes]]:
    """(digest, path) of the live files whose extents use one of ``digests``, and of the
    live directories and files whose cached tree object or manifest is one."""
    users: dict[bytes, set[int]] = {}
    for key, value in tx.prefix(b"extents", b""):
        digest = layout.read_extent_value(value)[0]
        if digest in digests:
            users.setdefault(bytes(digest), set()).add(layout.read_extent_key(key)[0])
    for key, value in tx.prefix(b"treecache", b""):
        digest = bytes(value[:32])
        if digest in digests:
            users.setdefault(digest, set()).add(layout.read_u64(key))
    found = []
    dirs: dict[int, bytes] = {layout.ROOT_INO: b"/"}
    for digest, inos in users.items():
        paths: set[bytes] = set()
        for ino in sorted(inos):
            paths.update(_live_paths(tx, ino, dirs))
            if len(paths) >= limit:
                break
        found.extend((digest, p) for p in sorted(paths)[:limit])
    return found


def _inode(tx: Tx, ino: int) -> Inode | None:
    value = tx.get(b"inodes", layout.ino_key(ino))
    return Inode.unpack(ino, value) if value is not None else None


def _names_in(tx: Tx, parent: int, ino: int) -> list[bytes]:
    """The names ``ino`` has in directory ``parent`` (found by scanning it)."""
    return [
        bytes(key[8:])
        for key, value in tx.prefix(b"dirents", layout.ino_key(parent))
        if layout.read_dirent_value(value)[0] == ino
    ]


def _dir_path(tx: Tx, ino: int, dirs: dict[int, bytes]) -> bytes | None:
    """A live directory's path, by walking up its parents (remembered in ``dirs``)."""
    chain = []
    while ino not in dirs:
        inode = _inode(tx, ino)
        if inode is None or not inode.parent or len(chain) > 4096:
            return None
        names = _names_in(tx, inode.parent, ino)
        if not names:
            return None
        chain.append((ino, names[0]))
        ino = inode.parent
    path = dirs[ino]
    for child, name in reversed(chain):
        path = dirs[child] = path.rstrip(b"/") + b"/" + name
    return path


def _live_paths(tx: Tx, ino: int, dirs: dict[int, bytes]) -> list[bytes]:
    inode = _inode(tx, ino)
    if inode is None:
        return [f"<missing inode {ino}>".encode()]
    if inode.is_dir:
        where = _dir_path(tx, ino, dirs)
        return [where if where is not None else f"<unreachable directory {ino}>".encode()]
    paths = []
    for parent in parents(tx, inode):
        where = _dir_path(tx, parent, dirs)
        if where is not None:
            paths.extend(where.rstrip(b"/") + b"/" + name for name in _names_in(tx, parent, ino))
    return paths or [f"<unlinked inode {ino}>".encode()]


class _SnapshotWalk:
    """Uses of ``digests`` below tree objects, each tree object decoded once (memoized)."""

    def __init__(self, store: Store, tx: Tx, digests: set[bytes], limit: int) -> None:
        self.store = store
        self.tx = tx
        self.digests = digests
        self.limit = limit
        self.below: dict[bytes, Hits] = {}  # tree digest -> uses below it (relative paths)
        self.in_manifest: dict[bytes, list[bytes]] = {}  # manifest digest -> digests it uses

    def uses(self, root: Entry, path: bytes) -> Hits:
        """Uses in the directory ``root`` (named ``path``) and everything below it."""
        hits: Hits = [(path, root.digest)] if root.digest in self.digests else []
        self._walk(root.digest)
        return hits + [(path + rel, d) for rel, d in self.below[root.digest]]

    def _walk(self, top: bytes) -> None:
        """Fill ``below`` for ``top`` and every tree under it, children first (a stack, not
        recursion: trees may be deeper than Python's recursion limit)."""
        stack: list[tuple[bytes, list[Entry] | None]] = [(top, None)]
        while stack:
            digest, entries = stack.pop()
            if digest in self.below:
                continue
            if entries is None:
                entries = self._entries(digest)
                stack.append((digest, entries))
                stack.extend((e.digest, None) for e in entries if e.is_dir and e.digest)
                continue
            self.below[digest] = self._compose(entries)

    def _entries(self, digest: bytes) -> list[Entry]:
        try:
            return treeobjects.load_tree(self.store, self.tx, digest).entries
        except CorruptObject:
            return []  # reported in its own right; what is below it cannot be named

    def _compose(self, entries: list[Entry]) -> Hits:
        hits: Hits = []
        count: Counter[bytes] = Counter()
        for e in entries:
            if e.is_dir:
                found = [(b"", e.digest)] if e.digest in self.digests else []
                found += [(b"/" + rel, d) for rel, d in self.below.get(e.digest, ())]
            elif e.is_reg:
                found = [(b"", d) for d in self._file_uses(e)]
            else:
                continue
            for rel, d in found:
                if count[d] < self.limit:
                    count[d] += 1
                    hits.append((e.name + rel, d))
        return hits

    def _file_uses(self, e: Entry) -> list[bytes]:
        used = [x.digest for x in e.extents]
        if e.digest:
            used.append(e.digest)
            if e.digest not in self.in_manifest:
                try:
                    extents = treeobjects.load_manifest(self.store, self.tx, e.digest)
                except CorruptObject:
                    extents = []
                self.in_manifest[e.digest] = [x.digest for x in extents if x.digest in self.digests]
            used += self.in_manifest[e.digest]
        return list(dict.fromkeys(d for d in used if d in self.digests))
