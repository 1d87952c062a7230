"""``casfs.workflows.exporter``: a snapshot written back to a local directory keeps everything.

The same tree is made twice, with os calls in a real directory and through the filesystem
model in a store; the store's snapshot is exported and the two real trees must compare equal
(:func:`treecompare.compare_trees`: bytes, modes, owners, ns times, xattrs, hard links,
devices, holes). The comparison itself is tested against the differences it must catch.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys

import pytest
from conftest import assert_fsck_clean, flip_byte
from treecompare import compare_trees

from casfs.errors import CasfsError, CorruptObject, FsError
from casfs.store import chunker
from casfs.store.codec import digest_of
from casfs.store.store import Store
from casfs.tree import snapshots
from casfs.tree.fs import ROOT_INO, Filesystem
from casfs.workflows import exporter
from casfs.workflows.exporter import export

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mknod, chown)")

T0 = 1_600_000_000_123_456_789  # explicit times: distinct, with nanoseconds
BIG = os.urandom(2 << 20)  # > INLINE_EXTENTS chunks: stored with a manifest
SPARSE_AT = 50 << 20


class Twin:
    """Makes every change both in a real directory and in the filesystem model."""

    def __init__(self, fs: Filesystem, root: bytes) -> None:
        self.fs = fs
        self.root = root
        self.inos: dict[bytes, int] = {b"": ROOT_INO}
        self.times: list[bytes] = [b""]  # paths whose times to set last, in creation order

    def real(self, rel: bytes) -> bytes:
        return os.path.join(self.root, rel) if rel else self.root

    def where(self, rel: bytes) -> tuple[int, bytes]:
        """(parent inode, name) of ``rel`` in the filesystem model."""
        parent, _, name = rel.rpartition(b"/")
        return self.inos[parent], name

    def mkdir(self, rel: bytes, mode: int = 0o755) -> None:
        os.mkdir(self.real(rel), 0o700)
        parent, name = self.where(rel)
        self.inos[rel] = self.fs.mkdir(parent, name, 0o700, 0, 0).ino
        self.times.append(rel)
        self.chmod(rel, mode)

    def file(self, rel: bytes, pieces: list[tuple[int, bytes]] = (), mode: int = 0o644) -> None:
        fd = os.open(self.real(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for offset, data in pieces:
                os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
        parent, name = self.where(rel)
        ino = self.inos[rel] = self.fs.create(parent, name, 0o600, 0, 0).ino
        for offset, data in pieces:
            self.fs.write(ino, offset, data)
        self.times.append(rel)
        self.chmod(rel, mode)

    def symlink(self, rel: bytes, target: bytes) -> None:
        os.symlink(target, self.real(rel))
        parent, name = self.where(rel)
        self.inos[rel] = self.fs.symlink(parent, name, target, 0, 0).ino
        self.times.append(rel)

    def mknod(self, rel: bytes, mode: int, rdev: int = 0) -> None:
        os.mknod(self.real(rel), mode, rdev)
        os.chmod(self.real(rel), stat.S_IMODE(mode))  # past the umask
        parent, name = self.where(rel)
        self.inos[rel] = self.fs.mknod(parent, name, mode, 0, 0, rdev).ino
        self.times.append(rel)

    def link(self, existing: bytes, rel: bytes) -> None:
        os.link(self.real(existing), self.real(rel), follow_symlinks=False)
        parent, name = self.where(rel)
        self.inos[rel] = self.fs.link(self.inos[existing], parent, name).ino

    def chmod(self, rel: bytes, mode: int) -> None:
        os.chmod(self.real(rel), mode)
        self.fs.setattr(self.inos[rel], mode=mode)

    def chown(self, rel: bytes, uid: int, gid: int) -> None:
        os.chown(self.real(rel), uid, gid, follow_symlinks=False)
        self.fs.setattr(self.inos[rel], uid=uid, gid=gid)

    def xattr(self, rel: bytes, key: bytes, value: bytes) -> None:
        os.setxattr(self.real(rel), key, value, follow_symlinks=False)
        self.fs.setxattr(self.inos[rel], key, value)

    def finish(self) -> None:
        """Give every path its own times, children before parents (the creation of a child
        moved its parent's), and make the read-only directory read-only."""
        for i, rel in reversed(list(enumerate(self.times))):
            atime, mtime = T0 + 7 * i + 3, T0 + 11 * i
            os.utime(self.real(rel), ns=(atime, mtime), follow_symlinks=False)
            self.fs.setattr(self.inos[rel], atime_ns=atime, mtime_ns=mtime)


def build(fs: Filesystem, src: bytes) -> Twin:
    """A tree with one of everything the exporter must keep."""
    os.mkdir(src)
    t = Twin(fs, src)
    t.chmod(b"", 0o755)
    t.mkdir(b"d")
    t.mkdir(b"d/sub", 0o750)
    t.mkdir(b"d/sub/deeper")
    t.file(b"d/sub/deeper/small", [(0, b"hello")])
    t.file(b"d/big", [(0, BIG)], 0o640)
    t.file(b"d/sparse", [(0, os.urandom(100_000)), (SPARSE_AT, os.urandom(100_000))])
    t.file(b"empty")
    t.file(b"d/zeros", [(0, os.urandom(1000)), (1000, bytes(300_000))])
    t.symlink(b"ln", b"d/sub/deeper/small")
    t.symlink(b"d/dangling", b"../nowhere")
    t.file(b"pair1", [(0, b"one inode, two names")])
    t.link(b"pair1", b"pair2")
    t.file(b"d/three", [(0, os.urandom(30_000))], 0o600)
    t.link(b"d/three", b"d/sub/three-b")
    t.link(b"d/three", b"three-c")
    t.xattr(b"d/sub/deeper/small", b"user.note", b"a value")
    t.xattr(b"d/sub/deeper/small", b"trusted.k", b"\x00binary\xff")
    t.xattr(b"d", b"user.dir", b"on a directory")
    t.xattr(b"ln", b"trusted.on-link", b"not followed")
    t.mknod(b"fifo", stat.S_IFIFO | 0o640)
    t.mknod(b"sock", stat.S_IFSOCK | 0o755)
    t.mknod(b"d/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    t.mknod(b"d/loop", stat.S_IFBLK | 0o660, os.makedev(7, 200))
    t.file(b"setuid", [(0, b"#!/bin/true\n")], 0o4755)
    t.chown(b"setuid", 1234, 5678)  # chown clears setuid: set the mode again
    t.chmod(b"setuid", 0o4755)
    t.file(b"setgid", [(0, b"g")], 0o2711)
    t.mkdir(b"sticky", 0o1777)
    t.mkdir(b"sgid-dir", 0o2755)
    t.chown(b"d/sub", 42, 43)
    t.chown(b"ln", 7, 8)
    t.file(b"\xff\xfe", [(0, b"not UTF-8")])
    t.mkdir(b"ro")
    t.file(b"ro/inside", [(0, b"in a read-only directory")], 0o444)
    t.mkdir(b"ro/sub")
    t.chmod(b"ro/sub", 0o555)
    t.chmod(b"ro", 0o555)
    t.finish()
    return t


def snap(fs: Filesystem, name: bytes = b"one") -> snapshots.Snapshot:
    return fs.store.run_write(lambda tx: snapshots.create(tx, fs.store, fs.merkle, name, T0))


@pytest.fixture
def made(fs, tmp_path):
    """(fs, source tree, snapshot) with everything in it."""
    src = os.fsencode(tmp_path / "src")
    build(fs, src)
    return fs, src, snap(fs)


def allocated(path: bytes) -> int:
    return os.lstat(path).st_blocks * 512


@root_only
def test_export_keeps_everything(made, tmp_path):
    fs, src, s = made
    out = os.fsencode(tmp_path / "out")
    calls = []
    result = export(fs.store, b"one", out, progress=lambda *a: calls.append(a))
    assert compare_trees(src, out, check_atime=True) == []
    assert (result.files, result.dirs, result.bytes) == (
        s.totals.files,
        s.totals.dirs,
        s.totals.bytes,
    )
    assert result.seconds >= 0
    # progress: done only grows, and ends at the total
    dones = [done for done, _, _ in calls]
    assert dones == sorted(dones) and calls[-1][:2] == (s.totals.bytes, s.totals.bytes)
    assert {total for _, total, _ in calls} == {s.totals.bytes}
    assert b"d/big" in {p for _, _, p in calls}
    # spot checks of what compare_trees covers, against what was written
    big = os.lstat(os.path.join(out, b"d/big"))
    assert big.st_mtime_ns % 1000 != 0 and stat.S_IMODE(big.st_mode) == 0o640
    assert os.lstat(os.path.join(out, b"setuid")).st_mode == stat.S_IFREG | 0o4755
    assert os.lstat(os.path.join(out, b"d/sub")).st_uid == 42
    assert os.lstat(os.path.join(out, b"d/null")).st_rdev == os.makedev(1, 3)
    assert os.getxattr(os.path.join(out, b"d/sub/deeper/small"), b"trusted.k") == b"\x00binary\xff"
    three = {
        os.lstat(os.path.join(out, p)).st_ino for p in (b"d/three", b"d/sub/three-b", b"three-c")
    }
    assert len(three) == 1
    with open(os.path.join(out, b"\xff\xfe"), "rb") as f:
        assert f.read() == b"not UTF-8"
    # holes stay holes: 50 MiB of size, a few hundred kB on disk
    sparse = os.path.join(out, b"d/sparse")
    assert os.lstat(sparse).st_size == SPARSE_AT + 100_000
    assert allocated(sparse) < 1 << 20
    # an all-zero chunk is stored as a hole: the export may take less room than the source
    assert allocated(os.path.join(out, b"d/zeros")) <= allocated(os.path.join(src, b"d/zeros"))
    assert_fsck_clean(fs.store)


@root_only
def test_export_a_subtree_and_a_single_file(made, tmp_path):
    fs, src, _ = made
    sub = os.fsencode(tmp_path / "sub")
    result = export(fs.store, b"one", sub, b"d/sub/deeper")
    assert compare_trees(os.path.join(src, b"d/sub/deeper"), sub, check_atime=True) == []
    assert (result.files, result.dirs, result.bytes) == (1, 0, 5)
    ro = os.fsencode(tmp_path / "ro")
    export(fs.store, b"one", ro, b"/ro/")
    assert compare_trees(os.path.join(src, b"ro"), ro) == []
    one = os.fsencode(tmp_path / "big")
    result = export(fs.store, b"one", one, b"d/big")
    assert compare_trees(os.path.join(src, b"d/big"), one, check_atime=True) == []
    assert (result.files, result.dirs, result.bytes) == (1, 0, len(BIG))
    link = os.fsencode(tmp_path / "link")
    export(fs.store, b"one", link, b"ln")
    assert os.readlink(link) == b"d/sub/deeper/small"
    assert os.getxattr(link, b"trusted.on-link", follow_symlinks=False) == b"not followed"
    # one name of a hard-linked file: its link count is now 1, nothing else changed
    three = os.fsencode(tmp_path / "three")
    export(fs.store, b"one", three, b"d/three")
    assert compare_trees(os.path.join(src, b"d/three"), three) == [".: link count 3 != 1"]


def test_destination_rules(fs, tmp_path):
    fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    ino = fs.create(ROOT_INO, b"f", 0o644, 0, 0).ino
    fs.write(ino, 0, b"new content")
    fs.create(fs.lookup(ROOT_INO, b"d").ino, b"inner", 0o644, 0, 0)
    snap(fs)
    out = tmp_path / "out"
    # an existing empty directory is fine
    out.mkdir()
    export(fs.store, b"one", str(out))
    assert sorted(os.listdir(out)) == ["d", "f"]
    # a non-empty one is refused without force, and left alone
    (out / "f").write_bytes(b"old")
    (out / "extra").write_bytes(b"kept")
    with pytest.raises(CasfsError, match=f"{out} exists; use --force to overwrite") as info:
        export(fs.store, b"one", str(out))
    assert info.value.errno == errno.EEXIST
    assert (out / "f").read_bytes() == b"old"
    # with force, conflicting names are replaced: a file, a directory where the snapshot has
    # a file, a symlink where it has a directory (never followed), a hard link (not written
    # through); other names stay
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(out / "d")
    (out / "d").symlink_to(outside)
    (out / "f").unlink()
    (out / "f").mkdir()
    (out / "f" / "below").write_bytes(b"x")
    export(fs.store, b"one", str(out), force=True)
    assert (out / "f").read_bytes() == b"new content"
    assert (out / "d").is_dir() and not (out / "d").is_symlink()
    assert os.listdir(outside) == []
    assert (out / "extra").read_bytes() == b"kept"
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (out / "f").unlink()
    os.link(victim, out / "f")
    export(fs.store, b"one", str(out), force=True)
    assert (out / "f").read_bytes() == b"new content" and victim.read_bytes() == b"untouched"
    # a single file onto an existing file, or an existing (even empty) directory
    target = tmp_path / "file"
    target.write_bytes(b"old")
    with pytest.raises(CasfsError, match="exists; use --force"):
        export(fs.store, b"one", str(target), b"f")
    export(fs.store, b"one", str(target), b"f", force=True)
    assert target.read_bytes() == b"new content"
    (tmp_path / "empty").mkdir()
    with pytest.raises(CasfsError, match="exists; use --force"):
        export(fs.store, b"one", str(tmp_path / "empty"), b"f")
    # a directory onto a file
    with pytest.raises(CasfsError, match="exists; use --force"):
        export(fs.store, b"one", str(target))
    export(fs.store, b"one", str(target), force=True)
    assert sorted(os.listdir(target)) == ["d", "f"]
    # dest may be a symlink to the directory to export into
    (tmp_path / "real").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "real")
    export(fs.store, b"one", str(tmp_path / "alias"))
    assert (tmp_path / "alias").is_symlink() and sorted(os.listdir(tmp_path / "real")) == ["d", "f"]
    # the parent must exist
    with pytest.raises(CasfsError, match="does not exist") as info:
        export(fs.store, b"one", str(tmp_path / "no" / "such"))
    assert info.value.errno == errno.ENOENT


def test_missing_snapshot_and_path(fs, tmp_path):
    fs.create(ROOT_INO, b"f", 0o644, 0, 0)
    snap(fs)
    out = str(tmp_path / "out")
    with pytest.raises(FsError, match="no snapshot named 'nope'") as info:
        export(fs.store, b"nope", out)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(CasfsError, match="'a/b' in snapshot 'one'") as info:
        export(fs.store, b"one", out, b"a/b")
    assert info.value.errno == errno.ENOENT
    with pytest.raises(CasfsError, match="'f' is not a directory") as info:
        export(fs.store, b"one", out, b"f/x")
    assert info.value.errno == errno.ENOTDIR
    with pytest.raises(CasfsError, match=r"'\.\.'"):
        export(fs.store, b"one", out, b"../x")
    assert not os.path.exists(out)  # nothing written


def test_corrupt_chunk_names_digest_and_file(tmp_path):
    path = str(tmp_path / "s")
    store = Filesystem.create_store(path)
    fs = Filesystem(store)
    data = os.urandom(20_000)  # incompressible: stored raw, so findable in data.mdb
    d = fs.mkdir(ROOT_INO, b"dir", 0o755, 0, 0).ino
    fs.write(fs.create(d, b"victim", 0o644, 0, 0).ino, 0, data)
    fs.write(fs.create(ROOT_INO, b"fine", 0o644, 0, 0).ino, 0, b"fine")
    snap(fs)
    first = chunker.Chunker(store.params).cut(data)[0]  # 20 kB may be cut in two
    fs.close()
    store.close()
    flip_byte(tmp_path / "s" / "data.mdb", data[:first])
    with Store(path, writer=False) as ro:
        with pytest.raises(CorruptObject) as info:
            export(ro, b"one", str(tmp_path / "out"))
    message = str(info.value)
    assert digest_of(data[:first]).hex() in message and "'dir/victim'" in message
    assert "\n" not in message and info.value.errno == errno.EIO


@root_only
def test_export_from_a_read_only_store(fs, tmp_path):
    src = os.fsencode(tmp_path / "src")
    build(fs, src)
    snap(fs)
    path = fs.store.path
    fs.store.close()  # the fixtures close it again: harmless
    with Store(path, writer=False) as ro:
        out = os.fsencode(tmp_path / "out")
        export(ro, b"one", out)
    assert compare_trees(src, out, check_atime=True) == []


_DELETE = """
import os, sys
from casfs.store.store import Store
from casfs.tree import snapshots
from casfs.tree.fs import ROOT_INO, Filesystem
s = Store(sys.argv[1])
fs = Filesystem(s)
s.run_write(lambda tx: snapshots.delete(tx, s, b"one"))
for i in range(4):  # new data, to take any page LMDB would hand out again
    fs.write(fs.create(ROOT_INO, b"new%d" % i, 0o644, 0, 0).ino, 0, os.urandom(4 << 20))
fs.close()
s.close()
"""


@root_only
def test_a_concurrent_delete_cannot_tear_the_export(fs, tmp_path, monkeypatch):
    """The snapshot is deleted (its objects freed, new data written) by another process
    while the export runs: the export's one read transaction still sees all of it."""
    src = os.fsencode(tmp_path / "src")
    twin = build(fs, src)
    snap(fs)
    for rel in (b"d/big", b"d/sparse", b"d/zeros"):  # only the snapshot holds these now
        fs.unlink(*twin.where(rel))
    path = fs.store.path
    fs.store.close()
    monkeypatch.setattr(exporter, "BATCH_BYTES", 64 << 10)  # many batches
    deleted = []

    def progress(done: int, total: int, rel: bytes) -> None:
        if not deleted:
            deleted.append(rel)
            r = subprocess.run([sys.executable, "-c", _DELETE, path], capture_output=True)
            assert r.returncode == 0, r.stderr.decode()

    with Store(path, writer=False) as ro:
        out = os.fsencode(tmp_path / "out")
        export(ro, b"one", out, progress=progress)
        assert deleted
        first = chunker.Chunker(ro.params).cut(BIG)[0]
        with ro.read() as tx:  # gone for a reader that starts now
            assert snapshots.get(tx, b"one") is None
            assert not ro.has_object(tx, digest_of(BIG[:first]))
    assert compare_trees(src, out, check_atime=True) == []


# -- the comparison itself --------------------------------------------------------------------


def _sample(root: bytes) -> None:
    os.mkdir(root)
    os.mkdir(os.path.join(root, b"dir"))
    with open(os.path.join(root, b"dir/file"), "wb") as f:
        f.write(b"some bytes" * 1000)
    os.setxattr(os.path.join(root, b"dir/file"), b"user.k", b"v")
    os.link(os.path.join(root, b"dir/file"), os.path.join(root, b"link"))
    with open(os.path.join(root, b"sparse"), "wb") as f:
        f.write(b"start")
        f.seek(20 << 20)
        f.write(b"end")
    with open(os.path.join(root, b"\xff"), "wb") as f:
        f.write(b"odd name")
    os.symlink(b"dir/file", os.path.join(root, b"sym"))
    for rel in (b"dir/file", b"sparse", b"\xff", b"sym", b"dir", b""):
        p = os.path.join(root, rel) if rel else root
        os.utime(p, ns=(T0 + 5, T0 + 1), follow_symlinks=False)


def _keep_mtime(path: bytes, change) -> None:
    st = os.lstat(path)
    change(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _rewrite(path: bytes, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _flip_byte(b: bytes) -> None:
    _keep_mtime(os.path.join(b, b"\xff"), lambda p: _rewrite(p, 3, b"X"))


def _mtime_plus_1ns(b: bytes) -> None:
    p = os.path.join(b, b"dir")
    st = os.lstat(p)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1))


def _break_link(b: bytes) -> None:
    """'link' becomes a copy (same bytes, mode, times, xattrs) instead of a second name."""

    def copy(root: bytes) -> None:
        p = os.path.join(root, b"link")
        shutil.copy2(p, p + b".tmp")
        os.rename(p + b".tmp", p)

    _keep_mtime(b, copy)


def _drop_xattr(b: bytes) -> None:
    os.removexattr(os.path.join(b, b"dir/file"), b"user.k")


def _fill_hole(b: bytes) -> None:
    _keep_mtime(os.path.join(b, b"sparse"), lambda p: _rewrite(p, 5, bytes((20 << 20) - 5)))


@pytest.mark.parametrize(
    "change, expect",
    [
        (_flip_byte, "\\xff: content differs from byte 3"),
        (_mtime_plus_1ns, "dir: mtime"),
        (_break_link, "hard links"),
        (_drop_xattr, "dir/file: xattr user.k b'v' != None"),
        (_fill_hole, "sparse: "),
    ],
)
def test_compare_trees_catches(tmp_path, change, expect):
    a, b = os.fsencode(tmp_path / "a"), os.fsencode(tmp_path / "b")
    _sample(a)
    r = subprocess.run(["cp", "-a", "--sparse=always", a, b], capture_output=True)
    assert r.returncode == 0, r.stderr
    assert compare_trees(a, b) == []  # (cp's reads moved a's access times)
    change(b)
    found = compare_trees(a, b)
    assert any(expect in line for line in found), found
    if change is _fill_hole:
        assert found == [
            f"sparse: {os.lstat(os.path.join(b, b'sparse')).st_blocks * 512} bytes allocated, "
            f"source only {os.lstat(os.path.join(a, b'sparse')).st_blocks * 512} (holes filled?)"
        ]
