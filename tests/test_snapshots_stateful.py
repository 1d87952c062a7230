"""Stateful property test of snapshots: random interleavings of namespace and content changes
with snapshot create / delete / rollback / restore / diff, checked against an in-memory model.

The model is a tree of :class:`Node` objects (a hard link is one node under two names). A
snapshot's expected content is the model frozen when it was taken (:class:`Frozen` per path).
After every step:

* the live tree, read through the filesystem API, equals the model (contents, modes, xattrs,
  link counts, hard-link groups);
* every snapshot, read back from its tree objects and chunks alone, equals its frozen model
  (hard links: one ``ino`` per group, ``nlink`` = names; recorded totals);
* fsck is clean (refcounts exact, cached digests current).

Rules also check: ``diff`` between two snapshots and between a snapshot and the live tree
reports exactly the paths whose model entries differ; a rollback restores the snapshot's
times; deleting a snapshot frees its ``exclusive_bytes`` (exactly, but for packs of small
objects, whose space returns by pack).

Rollback may keep live inodes: the test only allows it to keep, at a place, the inode the
snapshot recorded there (an open file of it then sees the snapshot's content), requires it to
keep the inode of a name that names the snapshot's inode below directories that do too (the
promise of :func:`casfs.tree.restore.rollback`), and otherwise wants new inode numbers.
Inode numbers are tracked throughout: an operation that should keep one must.

The operations: create (files, directories, symlinks, fifos, device nodes), write at any
offset (holes; up to 450 KiB over 4 KiB chunks, so manifests; repeated, zero and copied
data, so shared chunks), truncate, unlink, rmdir, rename (over, RENAME_EXCHANGE), replacing
a directory by a new one, hard links, xattrs, chmod (setgid directories), chown; open files
(held inodes: written, truncated and linked after their last name is gone, released); closing
and reopening the store; building part of the live digests as the mount does; snapshot
create / delete, rollback, restore (with and without --force, and the ways it must fail),
diff.

A file's mtime is modelled as a token, renewed by whatever sets it (create, a non-empty write,
truncate) and carried over by restore and rollback; the test checks that one token is always
one mtime, so that ``diff`` (which compares non-directory mtimes) can be predicted exactly.

CASFS_HYPOTHESIS_EXAMPLES=1000 runs a longer search; CASFS_HYPOTHESIS_SHRINK=0 reports a
failure without shrinking it (which can take minutes).
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import shutil
import stat
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field

from conftest import assert_fsck_clean
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from casfs.errors import FsError
from casfs.store.store import Store
from casfs.tree import diff, restore, snapshots, treeobjects
from casfs.tree.fs import RENAME_EXCHANGE, ROOT_INO, Filesystem
from casfs.tree.treeobjects import Entry

KiB = 1 << 10
UID = GID = 0  # the creator; chown moves files to other owners
OWNERS = [0, 1000]
GROUPS = [0, 1000, 1001]
NAMES = [b"a", b"b", b"c", b"d"]
SNAP_NAMES = [b"s0", b"s1", b"s2", b"s3"]
XATTR_NAMES = [b"user.x", b"user.y"]
TARGETS = [b"a", b"../b/c", b"/elsewhere"]

Path = tuple[bytes, ...]
_serials = itertools.count(1)


def show(path: Path) -> bytes:
    """A path as snapshots and diff spell it: b"/a/b", the root b"/"."""
    return b"/" + b"/".join(path)


def is_within(top: Path, path: Path) -> bool:
    """Whether ``path`` is ``top`` or below it."""
    return path[: len(top)] == top


def make_data(seed: int, length: int, kind: str) -> bytes:
    rng = random.Random(seed)
    if kind == "zeros":
        return bytes(length)
    if kind == "repeat":  # the same chunks again and again: deduplication within a file
        unit = rng.randbytes(rng.choice([1, 7, 4096, 5000]))
        return (unit * (length // len(unit) + 1))[:length]
    return rng.randbytes(length)


KINDS = {
    stat.S_IFDIR: "dir",
    stat.S_IFREG: "file",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chardev",
}
SPECIAL = {"fifo": stat.S_IFIFO, "chardev": stat.S_IFCHR}


def kind_of(mode: int) -> str:
    kind = KINDS.get(stat.S_IFMT(mode))
    assert kind is not None, f"unexpected file type {mode:o}"
    return kind


def special_data(rdev: int) -> bytes:
    """How the model keeps a device node's number: as its content."""
    return b"rdev=%d" % rdev


@dataclass(eq=False)
class Node:
    """A live inode of the model. ``data``: a file's bytes, a symlink's target or a device
    node's number (:func:`special_data`)."""

    kind: str
    mode: int
    uid: int = UID
    gid: int = GID
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    data: bytes = b""
    mtime: int = 0  # token (non-directories only)
    children: dict[bytes, Node] | None = None
    serial: int = field(default_factory=lambda: next(_serials))
    ino: int | None = None  # the live inode's number, once seen


@dataclass(frozen=True)
class Frozen:
    """One path of a frozen tree (expected), or as read back (observed: ``group`` is the
    inode number, ``mtime`` nanoseconds)."""

    kind: str
    mode: int
    uid: int
    gid: int
    data: bytes | None
    xattrs: tuple[tuple[bytes, bytes], ...]
    nlink: int
    group: int
    mtime: int

    def meta(self) -> tuple:  # what diff calls metadata
        times = () if self.kind == "dir" else (self.mtime,)
        return (self.mode, self.uid, self.gid, self.xattrs, *times)


Tree = dict[Path, Frozen]


def freeze(root: Node) -> Tree:
    names: dict[int, int] = defaultdict(int)
    found: list[tuple[Path, Node]] = []
    stack: list[tuple[Path, Node]] = [((), root)]
    while stack:
        path, node = stack.pop()
        found.append((path, node))
        names[node.serial] += 1
        if node.children is not None:
            stack.extend((path + (n,), c) for n, c in node.children.items())
    out = {}
    for path, node in found:
        if node.kind == "dir":
            assert node.children is not None
            nlink = 2 + sum(c.kind == "dir" for c in node.children.values())
        else:
            nlink = names[node.serial]
        out[path] = Frozen(
            node.kind,
            node.mode,
            node.uid,
            node.gid,
            None if node.kind == "dir" else node.data,
            tuple(sorted(node.xattrs.items())),
            nlink,
            node.serial,
            node.mtime,
        )
    return out


def children_of(tree: Tree) -> dict[Path, list[Path]]:
    kids: dict[Path, list[Path]] = defaultdict(list)
    for p in tree:
        if p:
            kids[p[:-1]].append(p)
    return kids


def thaw(tree: Tree, top: Path) -> Node:
    """New model nodes for the subtree of a frozen tree at ``top`` (hard links inside it
    stay one node, as restore keeps them)."""
    kids = children_of(tree)
    by_group: dict[int, Node] = {}

    def build(path: Path) -> Node:
        f = tree[path]
        if f.kind != "dir" and f.group in by_group:
            return by_group[f.group]
        node = Node(f.kind, f.mode, f.uid, f.gid, dict(f.xattrs), f.data or b"", f.mtime)
        if f.kind == "dir":
            node.children = {p[-1]: build(p) for p in kids[path]}
        else:
            by_group[f.group] = node
        return node

    return build(top)


def groups(tree: Tree) -> set[frozenset[Path]]:
    by: dict[int, set[Path]] = defaultdict(set)
    for p, f in tree.items():
        if f.kind != "dir":
            by[f.group].add(p)
    return {frozenset(v) for v in by.values()}


def expected_changes(old: Tree, new: Tree) -> dict[bytes, list[frozenset[str]]]:
    """What diff must report: per path, the allowed kinds of each change there."""
    out: dict[bytes, list[frozenset[str]]] = defaultdict(list)
    if old[()].meta() != new[()].meta():
        out[b"/"].append(frozenset([diff.METADATA]))
    kids_old, kids_new = children_of(old), children_of(new)

    def whole(tree: Tree, kids: dict[Path, list[Path]], path: Path, kind: str) -> None:
        out[show(path)].append(frozenset([kind]))
        for c in kids[path]:
            whole(tree, kids, c, kind)

    stack: list[Path] = [()]
    while stack:
        path = stack.pop()
        for c in {*kids_old[path], *kids_new[path]}:
            x, y = old.get(c), new.get(c)
            if x is None or y is None or x.kind != y.kind:
                if x is not None:
                    whole(old, kids_old, c, diff.REMOVED)
                if y is not None:
                    whole(new, kids_new, c, diff.ADDED)
            elif x.kind == "dir":
                if x.meta() != y.meta():
                    out[show(c)].append(frozenset([diff.METADATA]))
                stack.append(c)
            elif x.data != y.data:
                out[show(c)].append(frozenset([diff.MODIFIED]))
            elif x.mtime != y.mtime:
                # rewritten with the same bytes: the chunks may or may not be cut the same way
                out[show(c)].append(frozenset([diff.MODIFIED, diff.METADATA]))
            elif x.meta() != y.meta():
                out[show(c)].append(frozenset([diff.METADATA]))
    return out


names = st.sampled_from(NAMES)
small_sizes = st.integers(0, 8 * KiB)
data_specs = st.tuples(
    st.integers(0, 2**32 - 1),
    st.one_of(
        small_sizes,
        small_sizes,
        small_sizes,
        st.integers(0, 64 * KiB),
        st.integers(250 * KiB, 450 * KiB),
    ),  # fmt: skip
    st.sampled_from(["random", "random", "zeros", "repeat", "copy"]),
)
offsets = st.one_of(st.just(0), st.integers(0, 16 * KiB), st.integers(0, 200 * KiB))
trunc_sizes = st.one_of(st.just(0), st.integers(0, 16 * KiB), st.integers(0, 300 * KiB))
modes = st.one_of(st.integers(0, 0o7777), st.sampled_from([0o2755, 0o2775, 0o755]))


class SnapshotMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="casfs-snap-")
        # small chunks: a few tens of KiB make a file of more than INLINE_EXTENTS chunks
        self.path = os.path.join(self.tmp, "store")
        self.store = Filesystem.create_store(self.path, chunk_avg=4096)
        self.held: dict[int, Node] = {}  # open files (inode number -> model node)
        self.fs = Filesystem(self.store, workers=2, is_held=self.held.__contains__)
        root = self.fs.getattr(ROOT_INO)
        self.root = Node("dir", root.mode, children={}, ino=ROOT_INO)
        self.snaps: dict[bytes, Tree] = {}
        self.created: dict[bytes, int] = {}  # snapshot name -> created_ns (a counter)
        self.clock = itertools.count(1)
        self.tokens = itertools.count(1)
        self.token_mtime: dict[int, int] = {}  # model mtime token -> the mtime it stands for
        self.seen_inos: set[int] = {ROOT_INO}  # inode numbers are never used twice

    def teardown(self) -> None:
        try:
            assert_fsck_clean(self.store)
        finally:
            try:
                self.fs.close()
                self.store.close()
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the model --------------------------------------------------------------------------

    def node(self, path: Path) -> Node | None:
        node = self.root
        for name in path:
            if node.children is None or name not in node.children:
                return None
            node = node.children[name]
        return node

    def paths(self, kind: str | None = None, root: bool = False) -> list[Path]:
        out = []
        stack: list[tuple[Path, Node]] = [((), self.root)]
        while stack:
            path, node = stack.pop()
            if (root or path) and (kind is None or node.kind == kind):
                out.append(path)
            if node.children is not None:
                stack.extend((path + (n,), c) for n, c in node.children.items())
        return sorted(out)

    def slot(self, data: st.DataObject) -> Path:
        """A name in an existing directory: mostly a free one, sometimes any."""
        dirs = self.paths("dir", root=True)
        free = [d + (n,) for d in dirs for n in NAMES if n not in self.node(d).children]
        if free and data.draw(st.integers(0, 3), label="free name") > 0:
            return data.draw(st.sampled_from(free), label="free slot")
        d = data.draw(st.sampled_from(dirs), label="directory")
        return d + (data.draw(names, label="name"),)

    def some_path(self, data: st.DataObject, kind: str | None = None, root: bool = False):
        """Mostly an existing path of that kind, sometimes any existing path."""
        wanted = self.paths(kind, root)
        anything = self.paths(None, root)
        if not anything:
            return None
        if wanted and data.draw(st.integers(0, 4), label="of kind") > 0:
            return data.draw(st.sampled_from(wanted), label="path")
        return data.draw(st.sampled_from(anything), label="any path")

    def token(self) -> int:
        return next(self.tokens)

    def walk(self) -> list[tuple[Path, Node]]:
        out: list[tuple[Path, Node]] = []
        stack: list[tuple[Path, Node]] = [((), self.root)]
        while stack:
            path, node = stack.pop()
            out.append((path, node))
            if node.children is not None:
                stack.extend((path + (n,), c) for n, c in node.children.items())
        return out

    def linked(self, node: Node) -> bool:
        """Whether a node still has a name in the live tree."""
        stack = [self.root]
        while stack:
            n = stack.pop()
            if n is node:
                return True
            stack.extend(n.children.values() if n.children is not None else ())
        return False

    def apply_write(self, node: Node, offset: int, buf: bytes) -> None:
        if buf:
            old = node.data.ljust(offset, b"\0")
            node.data = old[:offset] + buf + old[offset + len(buf) :]
            node.mtime = self.token()

    def apply_truncate(self, node: Node, size: int) -> None:
        node.data = node.data[:size].ljust(size, b"\0")
        node.mtime = self.token()

    def draw_data(self, data: st.DataObject, spec: tuple, default: bytes) -> bytes:
        if spec[2] != "copy":
            return make_data(*spec)
        # another file's bytes: chunks shared between files
        source = self.node(data.draw(st.sampled_from(self.paths("file") or [()]), label="copy"))
        return source.data if source is not None and source.kind == "file" else default

    # -- the filesystem ---------------------------------------------------------------------

    def ino(self, path: Path) -> int:
        ino = ROOT_INO
        for name in path:
            ino = self.fs.lookup(ino, name).ino
        return ino

    def fails(self, what: str, fn, *args, **kwargs) -> int:
        """The model says this fails: the filesystem must refuse it (and change nothing,
        which the invariants check). Returns the errno."""
        try:
            fn(*args, **kwargs)
        except FsError as exc:
            return exc.errno
        raise AssertionError(f"{what}: succeeded, the model expected a failure")

    def write_tx(self, fn):
        return self.store.run_write(fn)

    # -- reading trees back -----------------------------------------------------------------

    def observe_token(self, where: bytes, token: int, mtime_ns: int) -> None:
        seen = self.token_mtime.setdefault(token, mtime_ns)
        assert seen == mtime_ns, (
            f"{where!r}: mtime {mtime_ns}, expected {seen} (kept since the model's last change)"
        )

    def read_snapshot(self, tx, root: Entry) -> tuple[Tree, dict[Path, Entry]]:
        """A snapshot from its tree objects and chunks only."""
        out: Tree = {}
        entries: dict[Path, Entry] = {}
        totals: dict[Path, treeobjects.Totals] = {}
        stack: list[tuple[Path, Entry]] = [((), root)]
        while stack:
            path, e = stack.pop()
            entries[path] = e
            kind = kind_of(e.mode)
            content: bytes | None = None
            if kind == "dir":
                tree = treeobjects.load_tree(self.store, tx, e.digest)
                listed = [c.name for c in tree.entries]
                assert listed == sorted(set(listed)), f"{show(path)!r}: entries unsorted"
                totals[path] = tree.totals
                stack.extend((path + (c.name,), c) for c in tree.entries)
            elif kind == "file":
                extents = (
                    treeobjects.load_manifest(self.store, tx, e.digest)
                    if e.digest
                    else list(e.extents)
                )
                assert e.digest or len(extents) <= treeobjects.INLINE_EXTENTS
                buf = bytearray(e.size)
                end = 0
                for x in extents:
                    assert x.offset >= end and x.end <= e.size, f"{show(path)!r}: bad extents"
                    chunk = self.store.load(tx, x.digest)
                    assert len(chunk) == x.length
                    buf[x.offset : x.end] = chunk
                    end = x.end
                assert e.data_bytes == sum(x.length for x in extents)
                content = bytes(buf)
            elif kind == "symlink":
                content = e.target
            else:
                content = special_data(e.rdev)
            out[path] = Frozen(
                kind, e.mode, e.uid, e.gid, content, e.xattrs, e.nlink, e.ino, e.mtime_ns
            )
        for top, recorded in totals.items():  # each tree object's recursive totals
            below = [f for p, f in out.items() if len(p) > len(top) and is_within(top, p)]
            counted = treeobjects.Totals(
                sum(f.kind != "dir" for f in below),
                sum(f.kind == "dir" for f in below),
                sum(len(f.data or b"") for f in below if f.kind == "file"),
            )
            assert recorded == counted, f"{show(top)!r}: totals {recorded}, counted {counted}"
        return out, entries

    def read_live(self) -> Tree:
        out: Tree = {}

        def describe(path: Path, inode) -> None:
            kind = kind_of(inode.mode)
            content = None
            if kind == "file":
                content = self.fs.read(inode.ino, 0, inode.size + 1)
                assert len(content) == inode.size
            elif kind == "symlink":
                content = self.fs.readlink(inode.ino)
            elif kind != "dir":
                content = special_data(inode.rdev)
            xattrs = tuple(
                (n, self.fs.getxattr(inode.ino, n)) for n in self.fs.listxattr(inode.ino)
            )
            out[path] = Frozen(kind, inode.mode, inode.uid, inode.gid, content, xattrs,
                               inode.nlink, inode.ino, inode.mtime_ns)  # fmt: skip

        stack = [((), self.fs.getattr(ROOT_INO))]
        while stack:
            path, inode = stack.pop()
            describe(path, inode)
            if inode.is_dir:
                for _, name, child in self.fs.readdir(inode.ino):
                    stack.append((path + (name,), child))
        return out

    def compare(self, what: str, expected: Tree, observed: Tree) -> None:
        missing = sorted(show(p) for p in expected.keys() - observed.keys())
        extra = sorted(show(p) for p in observed.keys() - expected.keys())
        assert not missing and not extra, f"{what}: missing {missing}, unexpected {extra}"
        for p, want in expected.items():
            got = observed[p]
            where = f"{what} {show(p)!r}"
            assert got.kind == want.kind, f"{where}: a {got.kind}, expected a {want.kind}"
            assert got.mode == want.mode, f"{where}: mode {got.mode:o}, expected {want.mode:o}"
            assert (got.uid, got.gid) == (want.uid, want.gid), (
                f"{where}: owner {got.uid}:{got.gid}, expected {want.uid}:{want.gid}"
            )
            if got.data != want.data:
                raise AssertionError(
                    f"{where}: content differs ({len(got.data or b'')} bytes, expected "
                    f"{len(want.data or b'')}"
                    + (f", first difference at {_first_difference(got.data, want.data)})"
                       if want.kind == "file" else f": {got.data!r} != {want.data!r})")
                )  # fmt: skip
            assert got.xattrs == want.xattrs, f"{where}: xattrs {got.xattrs}, not {want.xattrs}"
            assert got.nlink == want.nlink, f"{where}: nlink {got.nlink}, expected {want.nlink}"
            if want.kind != "dir":
                self.observe_token(where.encode(), want.mtime, got.mtime)
        want_groups, got_groups = groups(expected), groups(observed)
        assert got_groups == want_groups, (
            f"{what}: hard-link groups differ: expected "
            f"{sorted(sorted(map(show, g)) for g in want_groups if len(g) > 1)}, got "
            f"{sorted(sorted(map(show, g)) for g in got_groups if len(g) > 1)}"
        )

    def check_diff(self, what: str, old: Tree, new: Tree, a: Entry, b: Entry) -> None:
        with self.store.read() as tx:
            got = diff.diff(self.store, tx, a, b)
        actual: dict[bytes, list[str]] = defaultdict(list)
        for c in got:
            actual[c.path].append(c.kind)
            path = tuple(c.path.split(b"/")[1:]) if c.path != b"/" else ()
            entry = (new if c.kind == diff.ADDED else old).get(path)
            assert entry is None or c.is_dir == (entry.kind == "dir"), f"{what}: {c}"
        want = expected_changes(old, new)
        wrong = []
        for path in sorted(actual.keys() | want.keys()):
            kinds, allowed = actual.get(path, []), want.get(path, [])
            if len(kinds) != len(allowed):
                wrong.append((path, kinds, [sorted(s) for s in allowed]))
            elif len(kinds) == 1 and kinds[0] not in allowed[0]:
                wrong.append((path, kinds, [sorted(s) for s in allowed]))
            elif len(kinds) > 1 and sorted(kinds) != sorted(k for s in allowed for k in s):
                wrong.append((path, kinds, [sorted(s) for s in allowed]))
        assert not wrong, f"{what}: diff differs from the model (path, got, expected): {wrong}"

    # -- rules: the live tree ---------------------------------------------------------------

    @initialize(
        data=st.data(),
        kinds=st.lists(st.sampled_from(["file", "file", "dir", "dir", "link"]), min_size=3,
                       max_size=10),
    )  # fmt: skip
    def populate(self, data, kinds):
        """Start from a small tree (with hard links), so that most operations meet something."""
        for kind in kinds:
            path = self.slot(data)
            parent = self.node(path[:-1])
            assert parent is not None and parent.children is not None
            if path[-1] in parent.children:
                continue
            pino = self.ino(path[:-1])
            files = [p for p in self.paths("file") if p[:-1] != path[:-1]]
            if kind == "link" and files:
                src = data.draw(st.sampled_from(files), label="link to")
                self.fs.link(self.ino(src), pino, path[-1])
                parent.children[path[-1]] = self.node(src)
            elif kind == "dir":
                self.fs.mkdir(pino, path[-1], 0o755, UID, GID)
                parent.children[path[-1]] = Node("dir", stat.S_IFDIR | 0o755, children={})
            else:
                seed, size = data.draw(st.integers(0, 2**32 - 1)), data.draw(small_sizes)
                content = make_data(seed, size, "random")
                ino = self.fs.create(pino, path[-1], 0o644, UID, GID).ino
                self.fs.write(ino, 0, content)
                parent.children[path[-1]] = Node(
                    "file", stat.S_IFREG | 0o644, data=content, mtime=self.token()
                )

    @rule(
        data=st.data(),
        mode=modes,
        kind=st.sampled_from(["file", "file", "file", "dir", "dir", "symlink", "fifo", "chardev"]),
    )
    def create(self, data, mode, kind):
        path = self.slot(data)
        parent = self.node(path[:-1])
        assert parent is not None and parent.children is not None
        pino, name = self.ino(path[:-1]), path[-1]
        gid = parent.gid if parent.mode & stat.S_ISGID else GID  # BSD group semantics
        if kind == "file":
            args = (self.fs.create, pino, name, mode, UID, GID)
            new = Node("file", stat.S_IFREG | stat.S_IMODE(mode), gid=gid, mtime=self.token())
        elif kind == "dir":
            args = (self.fs.mkdir, pino, name, mode, UID, GID)
            mode = stat.S_IFDIR | stat.S_IMODE(mode) | (parent.mode & stat.S_ISGID)
            new = Node("dir", mode, gid=gid, children={})
        elif kind == "symlink":
            target = data.draw(st.sampled_from(TARGETS), label="target")
            args = (self.fs.symlink, pino, name, target, UID, GID)
            new = Node("symlink", stat.S_IFLNK | 0o777, gid=gid, data=target, mtime=self.token())
        else:
            rdev = 0 if kind == "fifo" else data.draw(st.sampled_from([0x0103, 0x0501]))
            mode = SPECIAL[kind] | stat.S_IMODE(mode)
            args = (self.fs.mknod, pino, name, mode, UID, GID, rdev)
            new = Node(kind, mode, gid=gid, data=special_data(rdev), mtime=self.token())
        if name in parent.children:
            assert self.fails(f"create {kind} {show(path)!r}", *args) == errno.EEXIST
            return
        args[0](*args[1:])
        parent.children[name] = new

    @rule(data=st.data(), offset=offsets, spec=data_specs)
    def write(self, data, offset, spec):
        path = self.some_path(data, "file")
        if path is None:
            return
        node = self.node(path)
        assert node is not None
        buf = self.draw_data(data, spec, b"")
        ino = self.ino(path)
        if node.kind != "file":
            self.fails(f"write {show(path)!r}", self.fs.write, ino, offset, b"x")
            return
        assert self.fs.write(ino, offset, buf) == len(buf)
        self.apply_write(node, offset, buf)

    @rule(data=st.data(), size=trunc_sizes)
    def truncate(self, data, size):
        path = self.some_path(data, "file")
        if path is None:
            return
        node = self.node(path)
        assert node is not None
        if node.kind != "file":
            self.fails(f"truncate {show(path)!r}", self.fs.setattr, self.ino(path), size=size)
            return
        self.fs.setattr(self.ino(path), size=size)
        self.apply_truncate(node, size)

    @rule(data=st.data())
    def unlink(self, data):
        path = self.some_path(data, "file")
        if path is None:
            return
        parent, node = self.node(path[:-1]), self.node(path)
        assert parent is not None and node is not None
        if node.kind == "dir":
            self.fails(f"unlink {show(path)!r}", self.fs.unlink, self.ino(path[:-1]), path[-1])
            return
        self.fs.unlink(self.ino(path[:-1]), path[-1])
        del parent.children[path[-1]]

    @rule(data=st.data())
    def rmdir(self, data):
        path = self.some_path(data, "dir")
        if path is None:
            return
        parent, node = self.node(path[:-1]), self.node(path)
        assert parent is not None and node is not None
        if node.kind != "dir" or node.children:
            self.fails(f"rmdir {show(path)!r}", self.fs.rmdir, self.ino(path[:-1]), path[-1])
            return
        self.fs.rmdir(self.ino(path[:-1]), path[-1])
        del parent.children[path[-1]]

    @rule(data=st.data(), exchange=st.sampled_from([False, False, False, True]))
    def rename(self, data, exchange):
        src = self.some_path(data)
        if src is None:
            return
        if data.draw(st.booleans(), label="onto an existing path"):
            dst = data.draw(st.sampled_from(self.paths()), label="dst")
        else:
            dst = self.slot(data)
        sp, dp = self.node(src[:-1]), self.node(dst[:-1])
        assert sp is not None and dp is not None and sp.children is not None
        s, d = sp.children[src[-1]], dp.children.get(dst[-1])
        call = (self.fs.rename, self.ino(src[:-1]), src[-1], self.ino(dst[:-1]), dst[-1])
        what = f"rename {show(src)!r} -> {show(dst)!r}" + (" (exchange)" if exchange else "")
        if exchange:
            ok = d is not None and (
                src[:-1] == dst[:-1]
                or not (s.kind == "dir" and is_within(src, dst[:-1]))
                and not (d.kind == "dir" and is_within(dst, src[:-1]))
            )
            if not ok:
                self.fails(what, *call, RENAME_EXCHANGE)
                return
            call[0](*call[1:], RENAME_EXCHANGE)
            sp.children[src[-1]], dp.children[dst[-1]] = d, s
            return
        if d is s:  # the same name, or two links of one file: nothing happens
            call[0](*call[1:])
            return
        ok = not (s.kind == "dir" and is_within(src, dst[:-1]))
        if d is not None:
            ok = ok and not (d.kind == "dir" and is_within(dst, src[:-1]))
            ok = ok and (s.kind == "dir") == (d.kind == "dir") and not d.children
        if not ok:
            self.fails(what, *call)
            return
        call[0](*call[1:])
        del sp.children[src[-1]]
        dp.children[dst[-1]] = s

    @rule(data=st.data())
    def replace_dir(self, data):
        """``mv d elsewhere && mkdir d``: the same path, another directory inode."""
        dirs = self.paths("dir")
        if not dirs:
            return
        src = data.draw(st.sampled_from(dirs), label="directory")
        dst = self.slot(data)
        sp, dp = self.node(src[:-1]), self.node(dst[:-1])
        assert sp is not None and dp is not None and sp.children is not None
        if is_within(src, dst) or dst[-1] in dp.children:
            return
        self.fs.rename(self.ino(src[:-1]), src[-1], self.ino(dst[:-1]), dst[-1])
        self.fs.mkdir(self.ino(src[:-1]), src[-1], 0o755, UID, GID)
        dp.children[dst[-1]] = sp.children[src[-1]]
        gid = sp.gid if sp.mode & stat.S_ISGID else GID
        mode = stat.S_IFDIR | 0o755 | (sp.mode & stat.S_ISGID)
        sp.children[src[-1]] = Node("dir", mode, gid=gid, children={})

    @rule(data=st.data())
    def link(self, data):
        src = self.some_path(data, "file")
        if src is None:
            return
        dst = self.slot(data)
        s, dp = self.node(src), self.node(dst[:-1])
        assert s is not None and dp is not None and dp.children is not None
        call = (self.fs.link, self.ino(src), self.ino(dst[:-1]), dst[-1])
        if s.kind == "dir" or dst[-1] in dp.children:
            self.fails(f"link {show(src)!r} -> {show(dst)!r}", *call)
            return
        call[0](*call[1:])
        dp.children[dst[-1]] = s

    @rule(
        data=st.data(),
        name=st.sampled_from(XATTR_NAMES),
        value=st.one_of(st.binary(max_size=8), st.binary(min_size=200, max_size=400)),
        remove=st.sampled_from([False, False, True]),
    )
    def xattr(self, data, name, value, remove):
        path = self.some_path(data, root=True)
        if path is None:
            path = ()
        node = self.node(path)
        assert node is not None
        ino = self.ino(path)
        if not remove:
            self.fs.setxattr(ino, name, value)
            node.xattrs[name] = value
        elif name not in node.xattrs:
            assert self.fails("removexattr", self.fs.removexattr, ino, name) == errno.ENODATA
        else:
            self.fs.removexattr(ino, name)
            del node.xattrs[name]

    @rule(
        data=st.data(),
        mode=st.none() | modes,
        owner=st.none() | st.tuples(st.sampled_from(OWNERS), st.sampled_from(GROUPS)),
    )
    def set_attributes(self, data, mode, owner):
        """chmod (not of a symlink) and chown."""
        path = self.some_path(data, root=True) or ()
        node = self.node(path)
        assert node is not None
        if mode is not None and node.kind != "symlink":
            self.fs.setattr(self.ino(path), mode=mode)
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(mode)
        if owner is not None:
            self.fs.setattr(self.ino(path), uid=owner[0], gid=owner[1])
            node.uid, node.gid = owner

    # -- rules: open files (held inodes outlive their last name) ----------------------------

    @rule(data=st.data())
    def open_file(self, data):
        path = self.some_path(data, "file")
        node = self.node(path) if path is not None else None
        if node is not None and node.kind == "file":
            self.held[self.ino(path)] = node

    @precondition(lambda self: self.held)
    @rule(
        data=st.data(),
        action=st.sampled_from(["write", "write", "truncate", "link"]),
        offset=offsets,
        spec=data_specs,
        size=trunc_sizes,
    )
    def use_open_file(self, data, action, offset, spec, size):
        """Write, truncate or link an open file, whether it still has a name or not."""
        ino = data.draw(st.sampled_from(sorted(self.held)), label="handle")
        node = self.held[ino]
        if action == "link":
            dst = self.slot(data)
            dp = self.node(dst[:-1])
            assert dp is not None and dp.children is not None
            call = (self.fs.link, ino, self.ino(dst[:-1]), dst[-1])
            if dst[-1] in dp.children or not self.linked(node):
                self.fails(f"link handle {ino} -> {show(dst)!r}", *call)
                return
            call[0](*call[1:])
            dp.children[dst[-1]] = node
        elif action == "truncate":
            self.fs.setattr(ino, size=size)
            self.apply_truncate(node, size)
        else:
            buf = self.draw_data(data, spec, b"y")
            assert self.fs.write(ino, offset, buf) == len(buf)
            self.apply_write(node, offset, buf)
        assert self.fs.read(ino, 0, len(node.data) + 1) == node.data

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def close_file(self, data):
        ino = data.draw(st.sampled_from(sorted(self.held)), label="handle")
        node = self.held.pop(ino)
        assert self.fs.release(ino) == (not self.linked(node)), f"release of {ino}"

    # -- rules: snapshots -------------------------------------------------------------------

    def latest(self, but: bytes | None = None) -> bytes | None:
        names_ = [n for n in self.snaps if n != but]
        return max(names_, key=self.created.__getitem__) if names_ else None

    def entry(self, name: bytes) -> Entry:
        with self.store.read() as tx:
            return snapshots.find(tx, name).root

    @rule(name=st.sampled_from(SNAP_NAMES))
    def snapshot(self, name):
        t = next(self.clock)

        def make(tx):
            return snapshots.create(tx, self.store, self.fs.merkle, name, t)

        if name in self.snaps:
            assert self.fails(f"snapshot {name!r}", self.write_tx, make) == errno.EEXIST
            return
        snap = self.write_tx(make)
        self.snaps[name] = freeze(self.root)
        self.created[name] = t
        tree = self.snaps[name]
        files = [f for p, f in tree.items() if p and f.kind != "dir"]
        assert snap.totals == treeobjects.Totals(
            len(files),
            sum(f.kind == "dir" for p, f in tree.items() if p),
            sum(len(f.data or b"") for f in files if f.kind == "file"),
        ), f"snapshot {name!r}: totals {snap.totals}"
        previous = self.latest(but=name)
        if previous is not None:  # what changed since the one before
            self.check_diff(
                f"diff {previous!r} -> {name!r}",
                self.snaps[previous],
                tree,
                self.entry(previous),
                snap.root,
            )

    @precondition(lambda self: self.snaps)
    @rule(name=st.sampled_from(SNAP_NAMES))
    def delete_snapshot(self, name):
        def delete(tx):
            return snapshots.delete(tx, self.store, name)

        if name not in self.snaps:
            assert self.fails(f"delete {name!r}", self.write_tx, delete) == errno.ENOENT
            return
        before = self.store.stats().stored_bytes
        with self.store.read() as tx:
            held = snapshots.exclusive_bytes(tx, self.store, snapshots.find(tx, name).root.digest)
            # small objects share packs, whose space returns by pack: exact up to packs
            slack = sum(len(v) for _, v in tx.prefix(b"packs", b""))
        self.write_tx(delete)
        freed = before - self.store.stats().stored_bytes
        assert abs(freed - held) <= slack, (
            f"deleting {name!r} freed {freed} bytes, exclusive_bytes said {held}"
        )
        del self.snaps[name]

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def rollback(self, data):
        """The live tree becomes the snapshot's. Which inodes it keeps is the filesystem's
        choice, within limits: a kept inode is the one the snapshot recorded at that place
        (an open file of it sees the snapshot's content), any other is new; a name that
        still names the snapshot's inode, below directories that do too, keeps it."""
        name = data.draw(st.sampled_from(sorted(self.snaps)), label="snapshot")
        with self.store.read() as tx:
            _, entries = self.read_snapshot(tx, snapshots.find(tx, name).root)
        before = {path: node.ino for path, node in self.walk()}
        old_nodes = {n.ino: n for _, n in self.walk() if n.kind != "dir"} | self.held
        self.write_tx(lambda tx: restore.rollback(self.fs, tx, name))
        live = self.read_live()
        self.root = thaw(self.snaps[name], ())
        self.root.ino = ROOT_INO
        chosen: dict[int, Node] = {}  # model serial -> the node that stands for it now
        for path, node in self.walk():
            if node.children is None:
                continue
            for child_name, child in list(node.children.items()):
                p = path + (child_name,)
                got = live.get(p)
                if got is None:
                    continue  # compared below
                where = f"after rollback to {name!r}, {show(p)!r}"
                if got.group != entries[p].ino:
                    assert got.group not in self.seen_inos, (
                        f"{where} is inode {got.group}: neither the snapshot's "
                        f"({entries[p].ino}) nor a new one"
                    )
                if all(before.get(p[:i]) == entries[p[:i]].ino for i in range(1, len(p) + 1)):
                    assert got.group == entries[p].ino, (
                        f"{where} named inode {entries[p].ino} as in the snapshot, now {got.group}"
                    )
                if child.kind == "dir":
                    child.ino = got.group
                    continue
                if child.serial not in chosen:
                    old = old_nodes.get(got.group)
                    if old is not None:  # kept: the snapshot's state in the old inode
                        old.mode, old.uid, old.gid = child.mode, child.uid, child.gid
                        old.xattrs, old.data, old.mtime = child.xattrs, child.data, child.mtime
                        chosen[child.serial] = old
                    else:
                        child.ino = got.group
                        chosen[child.serial] = child
                node.children[child_name] = chosen[child.serial]
        self.seen_inos.update(f.group for f in live.values())
        # the live tree is the snapshot's again: its times too, and diff sees no change
        for path, e in entries.items():
            inode = self.fs.getattr(self.ino(path))
            assert (inode.mtime_ns, inode.atime_ns) == (e.mtime_ns, e.atime_ns), (
                f"after rollback to {name!r}, {show(path)!r} has other times than the snapshot"
            )
        root = self.write_tx(lambda tx: snapshots.live_root(tx, self.fs.merkle)[0])
        with self.store.read() as tx:
            changes = diff.diff(self.store, tx, self.entry(name), root)
        assert changes == [], f"after rollback to {name!r}, diff reports {changes}"

    @precondition(lambda self: self.snaps)
    @rule(
        data=st.data(),
        force=st.booleans(),
        how=st.sampled_from(["ok", "ok", "ok", "ok", "no source", "not a directory", "root"]),
    )
    def restore_path(self, data, force, how):
        if how != "ok":
            self.restore_fails(data, how)
            return
        name = data.draw(st.sampled_from(sorted(self.snaps)), label="snapshot")
        tree = self.snaps[name]
        src = data.draw(st.sampled_from(sorted(tree)), label="source")
        dst = self.slot(data)
        parent = self.node(dst[:-1])
        assert parent is not None and parent.children is not None

        def run(tx):
            return restore.restore(self.fs, tx, name, b"/".join(src), b"/".join(dst), force)

        what = f"restore {name!r}:{show(src)!r} to {show(dst)!r}"
        if dst[-1] in parent.children and not force:
            assert self.fails(what, self.write_tx, run) == errno.EEXIST
            return
        self.write_tx(run)
        parent.children[dst[-1]] = thaw(tree, src)

    def restore_fails(self, data, how):
        name = data.draw(st.sampled_from(sorted(self.snaps)), label="snapshot")
        tree = self.snaps[name]
        src, dst = data.draw(st.sampled_from(sorted(tree)), label="source"), self.slot(data)
        want = errno.ENOENT
        if how == "no source":
            src = data.draw(st.sampled_from(sorted(tree)), label="parent") + (b"missing",)
            want = errno.ENOTDIR if tree[src[:-1]].kind != "dir" else errno.ENOENT
        elif how == "not a directory":
            nondirs = [p for p in self.paths() if self.node(p).kind != "dir"]
            if not nondirs:
                return
            dst = data.draw(st.sampled_from(nondirs), label="file") + (b"x",)
            want = errno.ENOTDIR
        else:
            dst, want = (), errno.EINVAL

        def run(tx):
            return restore.restore(self.fs, tx, name, b"/".join(src), b"/".join(dst), True)

        got = self.fails(f"restore {name!r}:{show(src)!r} to {show(dst)!r}", self.write_tx, run)
        assert got == want, f"restore ({how}): {errno.errorcode[got]}"

    @rule(now=st.integers(0, 3))
    def reopen(self, now):
        """Close and open the store again: cached digests and snapshots are on disk."""
        if now:
            return  # (a rule without arguments would be drawn far too often)
        orphans = sum(not self.linked(node) for node in self.held.values())
        self.fs.close()
        self.store.close()
        self.held.clear()  # the handles are gone: their unlinked files are freed now
        self.store = Store(self.path)
        self.fs = Filesystem(self.store, workers=2, is_held=self.held.__contains__)
        assert self.fs.free_orphans() == orphans

    @rule(steps=st.integers(1, 6))
    def prepare_some(self, steps):
        """Build part of the live tree's digests, a step per transaction, as the mount does
        before a snapshot (what a later change makes stale again must be dropped)."""
        stack = [ROOT_INO]
        for _ in range(steps):
            if not stack:
                break
            self.write_tx(lambda tx: self.fs.merkle.step(tx, stack))

    @precondition(lambda self: self.snaps)
    @rule(data=st.data())
    def diff_trees(self, data):
        """diff of a snapshot against another one or the live tree (which builds the stale
        part of the live tree's digests)."""
        a = data.draw(st.sampled_from(sorted(self.snaps)), label="old")
        b = data.draw(st.sampled_from([*sorted(self.snaps), None]), label="new (None: live)")
        if b is None:
            root = self.write_tx(lambda tx: snapshots.live_root(tx, self.fs.merkle)[0])
            self.check_diff(f"diff {a!r} -> live", self.snaps[a], freeze(self.root),
                            self.entry(a), root)  # fmt: skip
        else:
            self.check_diff(
                f"diff {a!r} -> {b!r}", self.snaps[a], self.snaps[b], self.entry(a), self.entry(b)
            )

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def live_tree_matches_the_model(self):
        live = self.read_live()
        self.compare("live", freeze(self.root), live)
        for path, node in self.walk():  # inode numbers: kept, or new
            got = live[path].group
            if node.ino is None:
                assert got not in self.seen_inos, f"{show(path)!r}: inode {got} used again"
                node.ino = got
                self.seen_inos.add(got)
            assert node.ino == got, f"{show(path)!r}: inode {got}, was {node.ino}"
        orphans = sorted(ino for ino, node in self.held.items() if not self.linked(node))
        assert sorted(self.fs.orphans()) == orphans
        for ino, node in self.held.items():  # open files: linked or not, their content
            assert self.fs.read(ino, 0, len(node.data) + 1) == node.data, f"open inode {ino}"

    @invariant()
    def snapshots_match_their_models(self):
        with self.store.read() as tx:
            recorded = {s.name: s for s in snapshots.all_snapshots(tx)}
            assert sorted(recorded) == sorted(self.snaps)
            for name, tree in self.snaps.items():
                observed, _ = self.read_snapshot(tx, recorded[name].root)
                self.compare(f"snapshot {name.decode()}", tree, observed)

    @invariant()
    def fsck_clean(self):
        assert_fsck_clean(self.store)


def _first_difference(a: bytes | None, b: bytes | None) -> int:
    a, b = a or b"", b or b""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), len(b))


# A failure is shrunk for up to about five minutes (each example is slow: every step reads
# every snapshot back and runs fsck); CASFS_HYPOTHESIS_SHRINK=0 reports it unshrunk at once.
SnapshotMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("CASFS_HYPOTHESIS_EXAMPLES", "250")),
    stateful_step_count=40,
    deadline=None,
    report_multiple_bugs=False,
    phases=[
        p for p in Phase if p != Phase.shrink or os.environ.get("CASFS_HYPOTHESIS_SHRINK") != "0"
    ],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
TestSnapshotMachine = SnapshotMachine.TestCase


def test_rollback_keeps_hard_links_between_top_level_entries(fs):
    """/a and /b are one file: rollback must not split them (rollback once materialized each
    top-level entry on its own)."""
    ino = fs.create(ROOT_INO, b"a", 0o644, UID, GID).ino
    fs.write(ino, 0, b"x")
    fs.link(ino, ROOT_INO, b"b")
    fs.store.run_write(lambda tx: snapshots.create(tx, fs.store, fs.merkle, b"s", 1))
    fs.unlink(ROOT_INO, b"a")
    fs.store.run_write(lambda tx: restore.rollback(fs, tx, b"s"))
    a, b = fs.lookup(ROOT_INO, b"a"), fs.lookup(ROOT_INO, b"b")
    assert (a.ino, a.nlink) == (b.ino, 2)
    assert fs.read(a.ino, 0, 10) == b"x"
    assert_fsck_clean(fs.store)


def test_rollback_of_a_recreated_directory_keeps_the_hard_link_beside_it(fs):
    """/b and /a/c are one file; /a is then replaced by a new directory and /b rewritten.
    Rollback once made a new inode for /a/c and then skipped /b (post-snapshot content, two
    files), found by SnapshotMachine."""
    a = fs.mkdir(ROOT_INO, b"a", 0o755, UID, GID).ino
    b = fs.create(ROOT_INO, b"b", 0o644, UID, GID).ino
    fs.write(b, 0, b"old")
    fs.link(b, a, b"c")
    fs.store.run_write(lambda tx: snapshots.create(tx, fs.store, fs.merkle, b"s", 1))
    fs.unlink(a, b"c")
    fs.rmdir(ROOT_INO, b"a")
    fs.mkdir(ROOT_INO, b"a", 0o755, UID, GID)
    fs.write(b, 0, b"new")
    fs.store.run_write(lambda tx: restore.rollback(fs, tx, b"s"))
    x = fs.lookup(ROOT_INO, b"b")
    y = fs.lookup(fs.lookup(ROOT_INO, b"a").ino, b"c")
    assert_fsck_clean(fs.store)
    assert fs.read(x.ino, 0, 10) == b"old"
    assert (x.ino, x.nlink) == (y.ino, 2)
    assert x.ino == b  # /b named this inode in the snapshot and still does: it is kept


def test_rollback_keeps_the_inode_of_an_unchanged_name(fs):
    """/a/x and /c/x are one file; /a is moved away and a new /a made. /c and /c/x never
    changed, so rollback must keep /c/x's inode (open files of it stay valid)."""
    a = fs.mkdir(ROOT_INO, b"a", 0o755, UID, GID).ino
    c = fs.mkdir(ROOT_INO, b"c", 0o755, UID, GID).ino
    x = fs.create(a, b"x", 0o644, UID, GID).ino
    fs.write(x, 0, b"old")
    fs.link(x, c, b"x")
    fs.store.run_write(lambda tx: snapshots.create(tx, fs.store, fs.merkle, b"s", 1))
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"z")
    fs.mkdir(ROOT_INO, b"a", 0o755, UID, GID)
    fs.store.run_write(lambda tx: restore.rollback(fs, tx, b"s"))
    cx = fs.lookup(c, b"x")
    assert (cx.ino, cx.nlink) == (x, 2)
    assert fs.lookup(fs.lookup(ROOT_INO, b"a").ino, b"x").ino == x
    assert_fsck_clean(fs.store)
