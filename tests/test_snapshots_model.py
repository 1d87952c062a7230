"""Snapshots in the filesystem model: creation, sharing, deletion, diff, restore, rollback.
Every test ends with a clean fsck (refcounts exact, cached digests current)."""

from __future__ import annotations

import errno
import os

import pytest
from conftest import assert_fsck_clean

from casfs.errors import FsError
from casfs.tree import diff, restore, snapshots, treeobjects
from casfs.tree.fs import ROOT_INO

UID = GID = 0


def errno_of(fn, *args, **kwargs) -> int:
    try:
        fn(*args, **kwargs)
    except FsError as exc:
        return exc.errno
    return 0


def mkfile(fs, parent, name, data=b"", mode=0o644):
    ino = fs.create(parent, name, mode, UID, GID).ino
    if data:
        fs.write(ino, 0, data)
    return ino


def snap(fs, name, t=1):
    return fs.store.run_write(lambda tx: snapshots.create(tx, fs.store, fs.merkle, name, t))


def delete(fs, name):
    return fs.store.run_write(lambda tx: snapshots.delete(tx, fs.store, name))


def changes(fs, old, new):
    def run(tx):
        a = snapshots.find(tx, old).root
        b = (
            snapshots.live_root(tx, fs.merkle)[0]
            if new == b"@live"
            else snapshots.find(tx, new).root
        )
        return [(c.kind, c.path) for c in diff.diff(fs.store, tx, a, b)]

    return fs.store.run_write(run)


def listing(fs, name, path=b""):
    """{relative path: (mode, size, bytes or target)} of a snapshot, read from its objects."""
    out = {}
    with fs.store.read() as tx:
        stack = [(path, restore.resolve(fs.store, tx, snapshots.find(tx, name).root, path, name))]
        while stack:
            p, e = stack.pop()
            if e.is_dir:
                for c in treeobjects.load_tree(fs.store, tx, e.digest).entries:
                    stack.append((p + b"/" + c.name, c))
            extents = e.extents
            if e.digest and e.is_reg:
                extents = treeobjects.load_manifest(fs.store, tx, e.digest)
            data = bytearray(e.size)
            for x in extents:
                data[x.offset : x.end] = fs.store.load(tx, x.digest)
            out[p] = (e.mode, e.size, bytes(data) if e.is_reg else e.target, e.nlink)
    return out


@pytest.fixture
def tree(fs):
    d = fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID).ino
    sub = fs.mkdir(d, b"sub", 0o700, UID, GID).ino
    small = mkfile(fs, d, b"small", b"hello")
    big = mkfile(fs, sub, b"big", os.urandom(3 << 20))
    fs.link(small, sub, b"hardlink")
    fs.symlink(ROOT_INO, b"ln", b"d/small", UID, GID)
    fs.setxattr(small, b"user.k", b"v")
    return {"d": d, "sub": sub, "small": small, "big": big}


def test_snapshot_records_the_tree_and_shares_everything(fs, tree):
    before = fs.store.stats()
    s = snap(fs, b"one")
    assert s.totals.files == 4 and s.totals.dirs == 2
    assert s.totals.bytes == 5 + 5 + (3 << 20)
    got = listing(fs, b"one")
    assert got[b"/d/small"][2] == b"hello" and got[b"/d/small"][3] == 2
    assert got[b"/d/sub/hardlink"] == got[b"/d/small"]
    assert got[b"/ln"][2] == b"d/small"
    after = fs.store.stats()
    # only tree objects and one manifest are new; no chunk is stored twice
    assert after.stored_bytes - before.stored_bytes < 4096
    with fs.store.read() as tx:
        assert snapshots.exclusive_bytes(tx, fs.store, s.root.digest) == 0
    assert_fsck_clean(fs.store)


def test_snapshot_is_immutable_while_the_live_tree_changes(fs, tree):
    snap(fs, b"one")
    fs.write(tree["small"], 0, b"HELLO world")
    fs.unlink(tree["sub"], b"big")
    fs.mkdir(ROOT_INO, b"new", 0o755, UID, GID)
    got = listing(fs, b"one")
    assert got[b"/d/small"][2] == b"hello"
    assert len(got[b"/d/sub/big"][2]) == 3 << 20
    assert b"/new" not in got
    snap(fs, b"two")
    assert sorted(changes(fs, b"one", b"two")) == [
        ("added", b"/new"),
        ("modified", b"/d/small"),
        ("modified", b"/d/sub/hardlink"),
        ("removed", b"/d/sub/big"),
    ]
    assert_fsck_clean(fs.store)


def test_unchanged_subtrees_are_not_rebuilt(fs, tree):
    for i in range(20):
        sub = fs.mkdir(ROOT_INO, f"dir{i}".encode(), 0o755, UID, GID).ino
        for j in range(5):
            mkfile(fs, sub, f"f{j}".encode(), b"x" * j)
    snap(fs, b"one")
    made = []
    real_put = treeobjects.put

    def counting_put(store, tx, kind, plain, refs):
        made.append(kind)
        return real_put(store, tx, kind, plain, refs)

    treeobjects.put = counting_put
    try:
        fs.write(tree["small"], 0, b"J")  # d/small: rebuilds d, d/sub (its hard link) and /
        snap(fs, b"two")
    finally:
        treeobjects.put = real_put
    assert len(made) == 3
    assert_fsck_clean(fs.store)


def test_delete_frees_exactly_what_only_the_snapshot_held(fs, tree):
    base = fs.store.stats()
    snap(fs, b"one")
    fs.unlink(tree["sub"], b"big")  # its 3 MiB now live only in the snapshot
    with fs.store.read() as tx:
        held = snapshots.exclusive_bytes(tx, fs.store, snapshots.find(tx, b"one").root.digest)
    assert held >= 3 << 20
    before = fs.store.stats().stored_bytes
    delete(fs, b"one")
    freed = before - fs.store.stats().stored_bytes
    # small objects share packs: their space returns by pack, so exact within a few KiB
    assert abs(freed - held) <= 16 << 10, (freed, held)
    assert fs.store.stats().stored_bytes < base.stored_bytes - (3 << 20) + 4096
    assert_fsck_clean(fs.store)


def test_bad_and_duplicate_names(fs, tree):
    for bad in (b"", b".", b"..", b"a/b", b"x" * 256, b"new\nline", b"@live", b"@x"):
        assert errno_of(snap, fs, bad) in (errno.EINVAL, errno.ENAMETOOLONG)
    snap(fs, b"one")
    assert errno_of(snap, fs, b"one") == errno.EEXIST
    assert errno_of(delete, fs, b"missing") == errno.ENOENT
    assert_fsck_clean(fs.store)


def test_diff_against_live(fs, tree):
    snap(fs, b"one")
    assert changes(fs, b"one", b"@live") == []
    fs.setattr(tree["big"], mode=0o600)
    fs.rename(tree["d"], b"small", ROOT_INO, b"moved")
    assert sorted(changes(fs, b"one", b"@live")) == [
        ("added", b"/moved"),
        ("metadata", b"/d/sub/big"),
        ("removed", b"/d/small"),
    ]
    assert_fsck_clean(fs.store)


def test_restore_shares_data_and_keeps_hard_links(fs, tree):
    snap(fs, b"one")
    fs.store.run_write(lambda tx: fs.remove_tree(tx, ROOT_INO, b"d"))
    stored = fs.store.stats().stored_bytes
    fs.store.run_write(lambda tx: restore.restore(fs, tx, b"one", b"d", None, False))
    assert fs.store.stats().stored_bytes - stored < 4096  # no chunk copied
    d = fs.lookup(ROOT_INO, b"d")
    small = fs.lookup(d.ino, b"small")
    sub = fs.lookup(d.ino, b"sub")
    assert fs.lookup(sub.ino, b"hardlink").ino == small.ino and small.nlink == 2
    assert fs.read(small.ino, 0, 100) == b"hello"
    assert fs.getxattr(small.ino, b"user.k") == b"v"
    assert fs.lookup(sub.ino, b"big").size == 3 << 20
    assert sub.mode & 0o777 == 0o700
    assert changes(fs, b"one", b"@live") == []
    with pytest.raises(Exception) as exc:
        fs.store.run_write(lambda tx: restore.restore(fs, tx, b"one", b"d", None, False))
    assert exc.value.errno == errno.EEXIST
    fs.store.run_write(lambda tx: restore.restore(fs, tx, b"one", b"d/small", b"copy", False))
    assert fs.read(fs.lookup(ROOT_INO, b"copy").ino, 0, 100) == b"hello"
    assert_fsck_clean(fs.store)


def test_rollback(fs, tree):
    snap(fs, b"one")
    fs.write(tree["small"], 0, b"changed")
    fs.mkdir(ROOT_INO, b"extra", 0o755, UID, GID)
    fs.unlink(ROOT_INO, b"ln")
    fs.setattr(ROOT_INO, mode=0o700)
    fs.store.run_write(lambda tx: restore.rollback(fs, tx, b"one"))
    assert changes(fs, b"one", b"@live") == []
    assert listing(fs, b"one") == listing_live(fs)
    assert_fsck_clean(fs.store)


def listing_live(fs):
    snap(fs, b"probe")
    try:
        return listing(fs, b"probe")
    finally:
        delete(fs, b"probe")


def test_delete_then_recreate_and_many_snapshots(fs, tree):
    for i in range(10):
        mkfile(fs, tree["d"], f"n{i}".encode(), os.urandom(1000))
        snap(fs, f"s{i}".encode(), t=i)
    with fs.store.read() as tx:
        assert [s.name for s in snapshots.all_snapshots(tx)] == [
            f"s{i}".encode() for i in range(10)
        ]
    for i in range(0, 10, 2):
        delete(fs, f"s{i}".encode())
    assert_fsck_clean(fs.store)
    for i in range(1, 10, 2):
        assert len(listing(fs, f"s{i}".encode())[f"/d/n{i}".encode()][2]) == 1000
        delete(fs, f"s{i}".encode())
    fs.store.run_write(lambda tx: fs.remove_tree(tx, ROOT_INO, b"d"))
    assert_fsck_clean(fs.store)


def test_fsck_finds_a_stale_cached_digest(fs, tree):
    snap(fs, b"one")
    from casfs.store import layout
    from casfs.tree.fsck import fsck
    from casfs.tree.records import Inode

    def corrupt(tx):  # change a file behind the cache's back
        key = layout.ino_key(tree["small"])
        inode = Inode.unpack(tree["small"], tx.get(b"inodes", key))
        tx.put(b"inodes", key, inode.but(mode=inode.mode ^ 0o100).pack())

    fs.store.run_write(corrupt)
    problems = [p.message for p in fsck(fs.store).problems]
    assert problems and all("is stale" in m for m in problems)


def test_live_snap_name_is_reserved(fs):
    assert errno_of(fs.mkdir, ROOT_INO, b".snap", 0o755, UID, GID) == errno.EEXIST
    assert errno_of(fs.create, ROOT_INO, b".snap", 0o644, UID, GID) == errno.EEXIST
    mkfile(fs, ROOT_INO, b"f")
    assert errno_of(fs.rename, ROOT_INO, b"f", ROOT_INO, b".snap") == errno.EBUSY
    d = fs.mkdir(ROOT_INO, b"d", 0o755, UID, GID).ino
    fs.mkdir(d, b".snap", 0o755, UID, GID)  # only the root's is reserved
    assert_fsck_clean(fs.store)
