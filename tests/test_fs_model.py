"""The filesystem model (casfs.tree.fs) against Linux semantics: errnos, link counts, holes,
refcounts, xattrs, readdir cookies, held inodes. Every test ends with a clean fsck."""

from __future__ import annotations

import errno
import os
import random
import stat

import pytest
from conftest import assert_fsck_clean

from casfs.errors import FsError
from casfs.store.store import Store
from casfs.tree.fs import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INO,
    XATTR_CREATE,
    XATTR_REPLACE,
    Filesystem,
)
from casfs.tree.fsck import fsck
from casfs.tree.records import XATTR_SIZE_MAX

UID, GID = 1000, 1000
KiB, MiB = 1 << 10, 1 << 20


def rand(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def mkfile(fs: Filesystem, parent: int, name: bytes, data: bytes = b"", mode: int = 0o644) -> int:
    ino = fs.create(parent, name, mode, UID, GID).ino
    if data:
        assert fs.write(ino, 0, data) == len(data)
    return ino


def mkdir(fs: Filesystem, parent: int, name: bytes, mode: int = 0o755) -> int:
    return fs.mkdir(parent, name, mode, UID, GID).ino


def fails(code: int, fn, *args, **kwargs) -> None:
    with pytest.raises(FsError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == code, (
        f"{fn.__name__}: wanted {errno.errorcode[code]}, got {errno.errorcode[info.value.errno]}"
    )


def names(fs: Filesystem, ino: int) -> list[bytes]:
    return sorted(name for _, name, _ in fs.readdir(ino))


def nlink(fs: Filesystem, ino: int) -> int:
    return fs.getattr(ino).nlink


def whole(fs: Filesystem, ino: int) -> bytes:
    return fs.read(ino, 0, fs.getattr(ino).size)


# -- creation -------------------------------------------------------------------------------


def test_create_every_kind(store, fs):
    f = fs.create(ROOT_INO, b"file", 0o640, UID, GID)
    assert stat.S_ISREG(f.mode) and stat.S_IMODE(f.mode) == 0o640
    assert (f.nlink, f.uid, f.gid, f.size) == (1, UID, GID, 0)
    d = fs.mkdir(ROOT_INO, b"dir", 0o750, UID, GID)
    assert stat.S_ISDIR(d.mode) and stat.S_IMODE(d.mode) == 0o750 and d.nlink == 2
    fifo = fs.mknod(d.ino, b"fifo", stat.S_IFIFO | 0o600, UID, GID)
    assert stat.S_ISFIFO(fifo.mode) and fifo.nlink == 1
    dev = fs.mknod(d.ino, b"null", stat.S_IFCHR | 0o666, 0, 0, os.makedev(1, 3))
    assert stat.S_ISCHR(dev.mode) and dev.rdev == os.makedev(1, 3)
    plain = fs.mknod(ROOT_INO, b"plain", 0o600, UID, GID)  # no type bits: a regular file
    assert stat.S_ISREG(plain.mode)
    ln = fs.symlink(d.ino, b"link", b"../file", UID, GID)
    assert stat.S_ISLNK(ln.mode) and ln.size == len(b"../file")
    assert fs.readlink(ln.ino) == b"../file"
    fails(errno.EINVAL, fs.readlink, f.ino)
    fails(errno.EINVAL, fs.mknod, ROOT_INO, b"x", stat.S_IFDIR | 0o755, UID, GID)
    fails(errno.ENOENT, fs.symlink, ROOT_INO, b"empty", b"", UID, GID)
    fails(errno.ENAMETOOLONG, fs.symlink, ROOT_INO, b"long", b"x" * 4096, UID, GID)

    assert names(fs, ROOT_INO) == [b"dir", b"file", b"plain"]
    assert names(fs, d.ino) == [b"fifo", b"link", b"null"]
    assert fs.lookup(ROOT_INO, b"file").ino == f.ino
    assert fs.lookup(d.ino, b"..").ino == ROOT_INO
    assert fs.lookup(d.ino, b".").ino == d.ino
    assert fs.lookup(ROOT_INO, b"..").ino == ROOT_INO
    assert nlink(fs, ROOT_INO) == 3  # ".", its own entry, and dir's ".."
    assert len({f.ino, d.ino, fifo.ino, dev.ino, plain.ino, ln.ino, ROOT_INO}) == 7
    fails(errno.EINVAL, fs.read, fifo.ino, 0, 10)
    fails(errno.EISDIR, fs.read, d.ino, 0, 10)
    assert_fsck_clean(store)


def test_eexist(store, fs):
    mkfile(fs, ROOT_INO, b"f")
    mkdir(fs, ROOT_INO, b"d")
    for name in (b"f", b"d"):
        fails(errno.EEXIST, fs.create, ROOT_INO, name, 0o644, UID, GID)
        fails(errno.EEXIST, fs.mkdir, ROOT_INO, name, 0o755, UID, GID)
        fails(errno.EEXIST, fs.mknod, ROOT_INO, name, stat.S_IFIFO | 0o644, UID, GID)
        fails(errno.EEXIST, fs.symlink, ROOT_INO, name, b"target", UID, GID)
    assert names(fs, ROOT_INO) == [b"d", b"f"]
    assert nlink(fs, ROOT_INO) == 3
    assert_fsck_clean(store)


def test_enoent(store, fs):
    d = mkdir(fs, ROOT_INO, b"d")
    fails(errno.ENOENT, fs.lookup, ROOT_INO, b"missing")
    fails(errno.ENOENT, fs.unlink, ROOT_INO, b"missing")
    fails(errno.ENOENT, fs.rmdir, ROOT_INO, b"missing")
    fails(errno.ENOENT, fs.rename, ROOT_INO, b"missing", ROOT_INO, b"x")
    fails(errno.ENOENT, fs.getattr, 9999)
    fails(errno.ENOENT, fs.read, 9999, 0, 1)
    fails(errno.ENOENT, fs.write, 9999, 0, b"x")
    fails(errno.ENOENT, fs.getxattr, 9999, b"user.x")
    fs.rmdir(ROOT_INO, b"d")
    fails(errno.ENOENT, fs.getattr, d)
    fails(errno.ENOENT, fs.create, d, b"x", 0o644, UID, GID)
    fails(errno.ENOENT, fs.mkdir, d, b"x", 0o755, UID, GID)
    assert_fsck_clean(store)


def test_enotdir(store, fs):
    f = mkfile(fs, ROOT_INO, b"f")
    ln = fs.symlink(ROOT_INO, b"ln", b"f", UID, GID).ino
    for parent in (f, ln):
        fails(errno.ENOTDIR, fs.lookup, parent, b"x")
        fails(errno.ENOTDIR, fs.create, parent, b"x", 0o644, UID, GID)
        fails(errno.ENOTDIR, fs.mkdir, parent, b"x", 0o755, UID, GID)
        fails(errno.ENOTDIR, fs.readdir, parent)
        fails(errno.ENOTDIR, fs.unlink, parent, b"x")
    fails(errno.ENOTDIR, fs.rmdir, ROOT_INO, b"f")
    fails(errno.ENOTDIR, fs.rmdir, ROOT_INO, b"ln")
    fails(errno.ENOTDIR, fs.rename, ROOT_INO, b"f", f, b"x")
    assert_fsck_clean(store)


def test_name_length_limit(store, fs):
    ok, long = b"n" * 255, b"n" * 256
    d = mkdir(fs, ROOT_INO, b"d")
    f = mkfile(fs, d, ok, b"data")
    assert fs.lookup(d, ok).ino == f
    assert names(fs, d) == [ok]
    fails(errno.ENAMETOOLONG, fs.create, d, long, 0o644, UID, GID)
    fails(errno.ENAMETOOLONG, fs.mkdir, d, long, 0o755, UID, GID)
    fails(errno.ENAMETOOLONG, fs.mknod, d, long, stat.S_IFIFO | 0o644, UID, GID)
    fails(errno.ENAMETOOLONG, fs.symlink, d, long, b"t", UID, GID)
    fails(errno.ENAMETOOLONG, fs.lookup, d, long)
    fails(errno.ENAMETOOLONG, fs.link, f, d, long)
    fails(errno.ENAMETOOLONG, fs.rename, d, ok, d, long)
    fails(errno.ENAMETOOLONG, fs.unlink, d, long)
    fs.link(f, ROOT_INO, b"m" * 255)
    fs.rename(ROOT_INO, b"m" * 255, ROOT_INO, b"k" * 255)
    assert fs.lookup(ROOT_INO, b"k" * 255).ino == f
    for bad in (b"", b".", b"..", b"a/b", b"a\0b"):
        fails(errno.EINVAL, fs.create, d, bad, 0o644, UID, GID)
    assert names(fs, d) == [ok]
    assert_fsck_clean(store)


def test_non_utf8_names(store, fs):
    raw = b"caf\xe9-\xff\xfe"
    other = b"\x80\x81\x82"
    with pytest.raises(UnicodeDecodeError):
        raw.decode()
    f = mkfile(fs, ROOT_INO, raw, b"latin-1")
    d = mkdir(fs, ROOT_INO, b"\xc3\x28")
    assert fs.lookup(ROOT_INO, raw).ino == f
    assert names(fs, ROOT_INO) == sorted([raw, b"\xc3\x28"])
    fs.rename(ROOT_INO, raw, d, other)
    assert names(fs, d) == [other]
    assert whole(fs, fs.lookup(d, other).ino) == b"latin-1"
    fs.setxattr(f, b"user.\xff", b"v")
    assert fs.listxattr(f) == [b"user.\xff"]
    fs.unlink(d, other)
    fails(errno.ENOENT, fs.getattr, f)
    assert_fsck_clean(store)


# -- links and removal ----------------------------------------------------------------------


def test_link(store, fs):
    d = mkdir(fs, ROOT_INO, b"d")
    f = mkfile(fs, ROOT_INO, b"f", b"shared")
    before = fs.getattr(f)
    a = fs.link(f, d, b"a")
    assert a.ino == f and a.nlink == 2 and a.ctime_ns >= before.ctime_ns
    fs.link(f, ROOT_INO, b"b")
    assert nlink(fs, f) == 3
    assert fs.lookup(d, b"a").ino == fs.lookup(ROOT_INO, b"b").ino == f
    assert nlink(fs, d) == 2  # hard links to files do not count in the directory's links
    fails(errno.EPERM, fs.link, d, ROOT_INO, b"dirlink")
    fails(errno.EEXIST, fs.link, f, ROOT_INO, b"d")
    fails(errno.EEXIST, fs.link, d, ROOT_INO, b"f")  # Linux checks the new name first
    fs.unlink(ROOT_INO, b"f")
    assert nlink(fs, f) == 2
    fs.write(f, 6, b"+more")
    assert whole(fs, fs.lookup(ROOT_INO, b"b").ino) == b"shared+more"
    fs.unlink(d, b"a")
    assert nlink(fs, f) == 1 and whole(fs, f) == b"shared+more"
    fs.unlink(ROOT_INO, b"b")
    fails(errno.ENOENT, fs.getattr, f)
    assert store.stats().objects == 0
    assert_fsck_clean(store)


def test_unlink(store, fs):
    d = mkdir(fs, ROOT_INO, b"d")
    fails(errno.EISDIR, fs.unlink, ROOT_INO, b"d")
    f = mkfile(fs, d, b"f", rand(300 * KiB))
    assert store.stats().objects > 0
    mtime = fs.getattr(d).mtime_ns
    fs.unlink(d, b"f")
    assert fs.getattr(d).mtime_ns >= mtime
    fails(errno.ENOENT, fs.getattr, f)
    fails(errno.ENOENT, fs.lookup, d, b"f")
    assert store.stats().objects == 0
    assert store.stats().inodes == 2
    assert_fsck_clean(store)


def test_rmdir(store, fs):
    a = mkdir(fs, ROOT_INO, b"a")
    b = mkdir(fs, a, b"b")
    mkfile(fs, b, b"f")
    assert nlink(fs, ROOT_INO) == 3 and nlink(fs, a) == 3 and nlink(fs, b) == 2
    fails(errno.ENOTEMPTY, fs.rmdir, ROOT_INO, b"a")
    fails(errno.ENOTEMPTY, fs.rmdir, a, b"b")
    fails(errno.ENOTDIR, fs.rmdir, b, b"f")
    fails(errno.EINVAL, fs.rmdir, a, b".")
    fs.unlink(b, b"f")
    fs.rmdir(a, b"b")
    assert nlink(fs, a) == 2
    fails(errno.ENOENT, fs.getattr, b)
    fs.rmdir(ROOT_INO, b"a")
    assert nlink(fs, ROOT_INO) == 2
    assert names(fs, ROOT_INO) == []
    assert store.stats().inodes == 1
    assert_fsck_clean(store)


# -- rename ---------------------------------------------------------------------------------


def test_rename_plain(store, fs):
    a = mkdir(fs, ROOT_INO, b"a")
    b = mkdir(fs, ROOT_INO, b"b")
    f = mkfile(fs, a, b"f", b"content")
    fs.rename(a, b"f", a, b"g")
    assert names(fs, a) == [b"g"] and fs.lookup(a, b"g").ino == f
    fs.rename(a, b"g", b, b"h")
    assert names(fs, a) == [] and names(fs, b) == [b"h"]
    assert whole(fs, fs.lookup(b, b"h").ino) == b"content"
    sub = mkdir(fs, a, b"sub")
    assert nlink(fs, a) == 3 and nlink(fs, b) == 2
    fs.rename(a, b"sub", b, b"moved")
    assert nlink(fs, a) == 2 and nlink(fs, b) == 3
    assert fs.lookup(sub, b"..").ino == b
    assert fs.getattr(sub).nlink == 2
    assert_fsck_clean(store)


def test_rename_over_file_frees_replaced(store, fs):
    mkfile(fs, ROOT_INO, b"keep", rand(400 * KiB, 1))
    only_keep = store.stats().objects
    victim = mkfile(fs, ROOT_INO, b"victim", rand(400 * KiB, 2))
    assert store.stats().objects > only_keep
    fs.setxattr(victim, b"user.a", b"1")
    fs.rename(ROOT_INO, b"keep", ROOT_INO, b"victim")
    fails(errno.ENOENT, fs.getattr, victim)
    assert names(fs, ROOT_INO) == [b"victim"]
    assert whole(fs, fs.lookup(ROOT_INO, b"victim").ino) == rand(400 * KiB, 1)
    assert store.stats().objects == only_keep
    assert store.stats().inodes == 2
    assert_fsck_clean(store)


def test_rename_over_linked_file_keeps_it(store, fs):
    mkfile(fs, ROOT_INO, b"src", b"src")
    dst = mkfile(fs, ROOT_INO, b"dst", b"dst")
    fs.link(dst, ROOT_INO, b"other")
    fs.rename(ROOT_INO, b"src", ROOT_INO, b"dst")
    assert nlink(fs, dst) == 1
    assert whole(fs, fs.lookup(ROOT_INO, b"other").ino) == b"dst"
    assert whole(fs, fs.lookup(ROOT_INO, b"dst").ino) == b"src"
    assert_fsck_clean(store)


def test_rename_noreplace(store, fs):
    a = mkfile(fs, ROOT_INO, b"a", b"a")
    b = mkfile(fs, ROOT_INO, b"b", b"b")
    fails(errno.EEXIST, fs.rename, ROOT_INO, b"a", ROOT_INO, b"b", RENAME_NOREPLACE)
    assert fs.lookup(ROOT_INO, b"a").ino == a and fs.lookup(ROOT_INO, b"b").ino == b
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"c", RENAME_NOREPLACE)
    assert names(fs, ROOT_INO) == [b"b", b"c"]
    fails(
        errno.EINVAL, fs.rename, ROOT_INO, b"b", ROOT_INO, b"c", RENAME_NOREPLACE | RENAME_EXCHANGE
    )
    fails(errno.EINVAL, fs.rename, ROOT_INO, b"b", ROOT_INO, b"c", 0x100)
    assert_fsck_clean(store)


def test_rename_exchange_file_and_dir_across_directories(store, fs):
    p1 = mkdir(fs, ROOT_INO, b"p1")
    p2 = mkdir(fs, ROOT_INO, b"p2")
    f = mkfile(fs, p1, b"f", b"file")
    d = mkdir(fs, p2, b"d")
    mkfile(fs, d, b"inside")
    assert (nlink(fs, p1), nlink(fs, p2)) == (2, 3)
    fs.rename(p1, b"f", p2, b"d", RENAME_EXCHANGE)
    assert fs.lookup(p1, b"f").ino == d
    assert fs.lookup(p2, b"d").ino == f
    assert (nlink(fs, p1), nlink(fs, p2)) == (3, 2)
    assert fs.lookup(d, b"..").ino == p1
    assert names(fs, d) == [b"inside"]
    assert whole(fs, f) == b"file"
    fails(errno.ENOENT, fs.rename, p1, b"f", p2, b"missing", RENAME_EXCHANGE)
    # exchanging a directory with something inside it
    fails(errno.EINVAL, fs.rename, ROOT_INO, b"p1", d, b"inside", RENAME_EXCHANGE)
    fails(errno.EINVAL, fs.rename, d, b"inside", ROOT_INO, b"p1", RENAME_EXCHANGE)
    # two directories in one parent
    fs.rename(ROOT_INO, b"p1", ROOT_INO, b"p2", RENAME_EXCHANGE)
    assert fs.lookup(ROOT_INO, b"p1").ino == p2 and fs.lookup(ROOT_INO, b"p2").ino == p1
    assert nlink(fs, ROOT_INO) == 4
    assert_fsck_clean(store)


def test_rename_directory_errors(store, fs):
    a = mkdir(fs, ROOT_INO, b"a")
    b = mkdir(fs, a, b"b")
    mkdir(fs, b, b"c")
    full = mkdir(fs, ROOT_INO, b"full")
    mkfile(fs, full, b"x")
    empty = mkdir(fs, ROOT_INO, b"empty")
    mkfile(fs, ROOT_INO, b"file")
    fails(errno.EINVAL, fs.rename, ROOT_INO, b"a", a, b"x")
    fails(errno.EINVAL, fs.rename, ROOT_INO, b"a", b, b"x")
    fails(errno.ENOTEMPTY, fs.rename, ROOT_INO, b"a", ROOT_INO, b"full")
    fails(errno.ENOTDIR, fs.rename, ROOT_INO, b"a", ROOT_INO, b"file")
    fails(errno.EISDIR, fs.rename, ROOT_INO, b"file", ROOT_INO, b"empty")
    fails(errno.EISDIR, fs.rename, ROOT_INO, b"file", a, b"b")
    # a name over one of its own ancestors: Linux says ENOTEMPTY (the ancestor holds it)
    fails(errno.ENOTEMPTY, fs.rename, full, b"x", ROOT_INO, b"full")
    fails(errno.ENOTEMPTY, fs.rename, b, b"c", ROOT_INO, b"a")
    fails(errno.ENOTEMPTY, fs.rename, b, b"c", a, b"b")
    assert nlink(fs, ROOT_INO) == 5
    # directory over an empty directory in another parent
    fs.rename(a, b"b", ROOT_INO, b"empty")
    fails(errno.ENOENT, fs.getattr, empty)
    assert fs.lookup(ROOT_INO, b"empty").ino == b
    assert fs.lookup(b, b"..").ino == ROOT_INO
    assert nlink(fs, a) == 2 and nlink(fs, ROOT_INO) == 5
    # directory over an empty directory in the same parent
    mkdir(fs, ROOT_INO, b"e2")
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"e2")
    assert nlink(fs, ROOT_INO) == 5
    assert names(fs, ROOT_INO) == [b"e2", b"empty", b"file", b"full"]
    assert_fsck_clean(store)


def test_rename_between_hard_links_is_a_no_op(store, fs):
    f = mkfile(fs, ROOT_INO, b"a", b"data")
    fs.link(f, ROOT_INO, b"b")
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"b")
    assert names(fs, ROOT_INO) == [b"a", b"b"]
    assert nlink(fs, f) == 2
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"a")
    assert names(fs, ROOT_INO) == [b"a", b"b"]
    # Linux refuses RENAME_NOREPLACE before it notices that both names are one inode
    fails(errno.EEXIST, fs.rename, ROOT_INO, b"a", ROOT_INO, b"b", RENAME_NOREPLACE)
    assert whole(fs, f) == b"data"
    assert_fsck_clean(store)


# -- attributes -----------------------------------------------------------------------------


def test_truncate_up_makes_a_hole(store, fs):
    data = rand(100 * KiB)
    f = mkfile(fs, ROOT_INO, b"f", data)
    before = fs.getattr(f)
    objects = store.stats().objects
    after = fs.setattr(f, size=MiB)
    assert after.size == MiB and after.data_bytes == before.data_bytes == len(data)
    assert after.mtime_ns >= before.mtime_ns and after.ctime_ns >= before.ctime_ns
    assert fs.read(f, 0, len(data)) == data
    assert fs.read(f, len(data), MiB) == bytes(MiB - len(data))
    assert fs.read(f, MiB - 10, 100) == bytes(10)
    assert store.stats().objects == objects
    assert_fsck_clean(store)


def test_truncate_down_frees_chunks(store, fs):
    data = rand(2 * MiB)
    f = mkfile(fs, ROOT_INO, b"f", data)
    full = store.stats().objects
    assert full > 4
    attrs = fs.setattr(f, size=100 * KiB)
    assert attrs.size == 100 * KiB and attrs.data_bytes == 100 * KiB
    assert store.stats().objects < full
    assert whole(fs, f) == data[: 100 * KiB]
    fs.setattr(f, size=len(data))  # grows back as a hole, not the old bytes
    assert fs.read(f, 100 * KiB, MiB) == bytes(MiB)
    attrs = fs.setattr(f, size=0)
    assert attrs.size == 0 and attrs.data_bytes == 0
    assert store.stats().objects == 0
    fails(errno.EISDIR, fs.setattr, ROOT_INO, size=0)
    ln = fs.symlink(ROOT_INO, b"ln", b"f", UID, GID).ino
    fails(errno.EINVAL, fs.setattr, ln, size=0)
    fails(errno.EINVAL, fs.setattr, f, size=-1)
    assert_fsck_clean(store)


def test_chmod_chown_utimens(store, fs):
    f = mkfile(fs, ROOT_INO, b"f")
    d = mkdir(fs, ROOT_INO, b"d")
    attrs = fs.setattr(f, mode=stat.S_IFDIR | 0o4711)
    assert stat.S_ISREG(attrs.mode) and stat.S_IMODE(attrs.mode) == 0o4711
    attrs = fs.setattr(d, mode=0o1777)
    assert stat.S_ISDIR(attrs.mode) and stat.S_IMODE(attrs.mode) == 0o1777
    attrs = fs.setattr(f, uid=5, gid=6)
    assert (attrs.uid, attrs.gid) == (5, 6) and stat.S_IMODE(attrs.mode) == 0o4711
    ctime = attrs.ctime_ns
    attrs = fs.setattr(f, atime_ns=1_000_000_123, mtime_ns=2_000_000_456)
    assert (attrs.atime_ns, attrs.mtime_ns) == (1_000_000_123, 2_000_000_456)
    assert attrs.ctime_ns >= ctime
    assert fs.getattr(f) == attrs
    assert_fsck_clean(store)


# -- content --------------------------------------------------------------------------------


def test_write_past_eof_makes_a_hole(store, fs):
    f = mkfile(fs, ROOT_INO, b"f", b"head")
    tail = rand(200 * KiB)
    assert fs.write(f, 3 * MiB, tail) == len(tail)
    attrs = fs.getattr(f)
    assert attrs.size == 3 * MiB + len(tail)
    assert attrs.data_bytes == 4 + len(tail)
    assert fs.read(f, 0, 4) == b"head"
    assert fs.read(f, 4, 3 * MiB - 4) == bytes(3 * MiB - 4)
    assert fs.read(f, 3 * MiB - 2, 6) == b"\0\0" + tail[:4]
    assert fs.read(f, 3 * MiB, len(tail) + 100) == tail
    # fill part of the hole
    fs.write(f, MiB, b"middle")
    assert fs.read(f, MiB - 1, 8) == b"\0middle\0"
    assert fs.getattr(f).data_bytes == 4 + 6 + len(tail)
    assert fs.write(f, 10 * MiB, b"") == 0 and fs.getattr(f).size == attrs.size
    fails(errno.EINVAL, fs.write, f, -1, b"x")
    fails(errno.EISDIR, fs.write, ROOT_INO, 0, b"x")
    assert_fsck_clean(store)


def test_read_at_any_offset(store, fs):
    data = rand(3 * MiB + 12345)
    f = mkfile(fs, ROOT_INO, b"f", data)
    rng = random.Random(7)
    cases = [
        (0, 0),
        (0, 1),
        (0, len(data)),
        (0, 2 * len(data)),
        (len(data), 10),
        (len(data) - 1, 10),
        (len(data) + 5, 10),
        (12345, 0),
    ]
    cases += [(rng.randrange(len(data) + 100), rng.randrange(600 * KiB)) for _ in range(60)]
    for offset, length in cases:
        assert fs.read(f, offset, length) == data[offset : offset + length], (offset, length)
    # chunk boundaries exactly
    with store.read() as tx:
        extents = fs.content.extents(tx, f)
    assert len(extents) > 3
    for e in extents[1:4]:
        assert fs.read(f, e.offset - 3, 6) == data[e.offset - 3 : e.offset + 3]
        assert fs.read(f, e.offset, e.length) == data[e.offset : e.end]
    fails(errno.EINVAL, fs.read, f, -1, 1)
    fails(errno.EINVAL, fs.read, f, 0, -1)
    assert_fsck_clean(store)


def test_overwrite_in_place_and_across_chunks(store, fs):
    data = bytearray(rand(MiB, 3))
    f = mkfile(fs, ROOT_INO, b"f", data)
    for offset, piece in [(0, b"A" * 10), (500 * KiB, rand(200 * KiB, 4)), (MiB - 5, b"end-past")]:
        fs.write(f, offset, piece)
        end = offset + len(piece)
        data[len(data) : end] = bytes(max(0, end - len(data)))
        data[offset:end] = piece
        assert whole(fs, f) == data
    assert fs.getattr(f).size == len(data)
    assert_fsck_clean(store)


def test_partial_overwrite_is_local(store, fs):
    data = bytearray(os.urandom(64 * MiB))
    f = mkfile(fs, ROOT_INO, b"big", data)
    before = store.stats().stored_bytes
    assert before >= 64 * MiB
    with store.read() as tx:
        old = set(fs.content.extents(tx, f))
    offset = 32 * MiB + 12345
    patch = os.urandom(4 * KiB)
    fs.write(f, offset, patch)
    data[offset : offset + len(patch)] = patch
    grown = store.stats().stored_bytes - before
    assert grown < 3 * store.params.max, f"4 KiB overwrite stored {grown} new bytes"
    # and only the extents around the patch were rewritten
    with store.read() as tx:
        new = set(fs.content.extents(tx, f))
    rewritten = sum(e.length for e in new - old)
    assert 0 < rewritten < 3 * store.params.max, f"{rewritten} bytes re-chunked"
    lo, hi = offset - store.params.max, offset + len(patch) + store.params.max
    assert all(lo <= e.offset and e.end <= hi for e in new - old)
    assert (
        fs.read(f, offset - 100 * KiB, 300 * KiB) == data[offset - 100 * KiB : offset + 200 * KiB]
    )
    assert whole(fs, f) == data
    assert fs.getattr(f).data_bytes == len(data)
    assert_fsck_clean(store)


def test_sequential_writes_chunk_like_one_write(store, fs):
    data = os.urandom(8 * MiB)
    a = mkfile(fs, ROOT_INO, b"a", data)
    objects = store.stats().objects
    b = mkfile(fs, ROOT_INO, b"b")
    step = 100 * KiB
    for offset in range(0, len(data), step):
        fs.write(b, offset, data[offset : offset + step])
    with store.read() as tx:
        ea = fs.content.extents(tx, a)
        eb = fs.content.extents(tx, b)
    assert ea == eb
    assert [e.length for e in ea] == fs.pipeline.chunker.cut(data)
    assert store.stats().objects == objects
    assert whole(fs, b) == data
    assert_fsck_clean(store)


@pytest.mark.parametrize("step", [3 * MiB + 12345, 5 * MiB])
def test_large_sequential_writes_chunk_like_one_write(store, fs, step):
    """Writes larger than the joined head buffer: the head is cut apart from the new bytes
    and the cuts must still match a whole-file cut."""
    data = os.urandom(20 * MiB)
    b = mkfile(fs, ROOT_INO, b"b")
    for offset in range(0, len(data), step):
        fs.write(b, offset, data[offset : offset + step])
    with store.read() as tx:
        eb = fs.content.extents(tx, b)
    assert [e.length for e in eb] == fs.pipeline.chunker.cut(data)
    assert whole(fs, b) == data
    assert_fsck_clean(store)


def test_sequential_reader_sees_writes_between_its_reads(store, fs):
    """Chunks decoded ahead of a sequential reader must never stand in for bytes written
    since: overwrites, truncates and writes inside an open batch between its reads show in
    the next read."""
    rng = random.Random(7)
    data = bytearray(rand(12 * MiB, seed=3))
    f = mkfile(fs, ROOT_INO, b"f", bytes(data))
    step = 256 * KiB

    def write(at: int, patch: bytes) -> None:
        fs.write(f, at, patch)
        data.extend(bytes(max(0, at - len(data))))
        data[at : at + len(patch)] = patch

    offset = 0
    while offset < len(data):
        got = fs.read(f, offset, step)
        assert got == bytes(data[offset : offset + step]), offset
        offset += len(got) or step
        if rng.random() < 0.3:  # change bytes just ahead of the reader, in its window
            at = offset + rng.randrange(0, 3 * MiB)
            write(at, rand(rng.randrange(1, 300 * KiB), seed=offset))
        elif rng.random() < 0.1:  # the same inside a batch: read in the uncommitted tx
            store.begin_batch()
            try:
                for _ in range(2):
                    write(offset + rng.randrange(0, MiB), rand(64 * KiB, seed=-offset))
                    got = fs.read(f, offset, step)
                    assert got == bytes(data[offset : offset + step]), offset
                    offset += len(got)
            finally:
                store.commit_batch()
        elif rng.random() < 0.05:
            size = offset + rng.randrange(0, 4 * MiB)
            fs.setattr(f, size=size)
            data[size:] = b""
            data.extend(bytes(size - len(data)))
    assert whole(fs, f) == bytes(data)
    assert_fsck_clean(store)


def test_large_overwrite_inside_a_file(store, fs):
    """A multi-MiB overwrite with old bytes on both sides (head and tail)."""
    data = bytearray(os.urandom(24 * MiB))
    f = mkfile(fs, ROOT_INO, b"f", bytes(data))
    patch = os.urandom(6 * MiB + 777)
    at = 7 * MiB + 4321
    fs.write(f, at, patch)
    data[at : at + len(patch)] = patch
    assert whole(fs, f) == bytes(data)
    with store.read() as tx:
        extents = fs.content.extents(tx, f)
    assert sum(e.length for e in extents) == len(data)
    assert all(a.end == b.offset for a, b in zip(extents, extents[1:], strict=False))
    assert_fsck_clean(store)


# -- extended attributes --------------------------------------------------------------------


def test_xattrs(store, fs):
    f = mkfile(fs, ROOT_INO, b"f")
    assert fs.listxattr(f) == []
    fails(errno.ENODATA, fs.getxattr, f, b"user.a")
    fs.setxattr(f, b"user.b", b"2")
    fs.setxattr(f, b"user.a", b"1", XATTR_CREATE)
    fails(errno.EEXIST, fs.setxattr, f, b"user.a", b"x", XATTR_CREATE)
    fails(errno.ENODATA, fs.setxattr, f, b"user.c", b"x", XATTR_REPLACE)
    fs.setxattr(f, b"user.a", b"one", XATTR_REPLACE)
    fs.setxattr(f, b"user.empty", b"")
    fails(errno.EOPNOTSUPP, fs.setxattr, f, b"system.posix_acl_access", b"\x02")
    fails(errno.EOPNOTSUPP, fs.setxattr, f, b"system.posix_acl_default", b"\x02")
    assert fs.getxattr(f, b"user.a") == b"one"
    assert fs.getxattr(f, b"user.empty") == b""
    assert fs.listxattr(f) == [b"user.a", b"user.b", b"user.empty"]
    fs.removexattr(f, b"user.b")
    fails(errno.ENODATA, fs.removexattr, f, b"user.b")
    fails(errno.ENODATA, fs.getxattr, f, b"user.b")
    assert fs.listxattr(f) == [b"user.a", b"user.empty"]
    fails(errno.ERANGE, fs.setxattr, f, b"", b"x")
    fails(errno.ERANGE, fs.setxattr, f, b"u" * 256, b"x")
    fs.setxattr(f, b"u" * 255, b"x")
    fails(errno.E2BIG, fs.setxattr, f, b"user.big", bytes(XATTR_SIZE_MAX + 1))
    fs.setxattr(f, b"user.big", bytes(XATTR_SIZE_MAX))
    assert fs.getxattr(f, b"user.big") == bytes(XATTR_SIZE_MAX)
    fs.setxattr(ROOT_INO, b"user.root", b"r")
    assert fs.listxattr(ROOT_INO) == [b"user.root"]
    fs.unlink(ROOT_INO, b"f")  # its xattrs go with it (fsck reports leftovers)
    fails(errno.ENOENT, fs.listxattr, f)
    assert_fsck_clean(store)


# -- setgid directories ---------------------------------------------------------------------


def test_setgid_directory_inheritance(store, fs):
    d = fs.mkdir(ROOT_INO, b"shared", 0o2775, UID, 50)
    assert stat.S_IMODE(d.mode) == 0o2775
    f = fs.create(d.ino, b"f", 0o644, UID, GID)
    assert f.gid == 50 and not f.mode & stat.S_ISGID
    sub = fs.mkdir(d.ino, b"sub", 0o755, UID, GID)
    assert sub.gid == 50 and sub.mode & stat.S_ISGID
    deeper = fs.mknod(sub.ino, b"fifo", stat.S_IFIFO | 0o600, UID, GID)
    assert deeper.gid == 50
    plain = fs.mkdir(ROOT_INO, b"plain", 0o755, UID, GID)
    assert plain.gid == GID and not plain.mode & stat.S_ISGID
    assert fs.create(plain.ino, b"g", 0o644, UID, GID).gid == GID
    assert_fsck_clean(store)


# -- readdir --------------------------------------------------------------------------------


def test_readdir_cookies_are_stable_under_change(store, fs):
    d = mkdir(fs, ROOT_INO, b"d")
    initial = [b"f%03d" % i for i in range(100)]
    for name in initial:
        mkfile(fs, d, name)
    rng = random.Random(42)
    present = set(initial)
    removed: set[bytes] = set()
    added: set[bytes] = set()
    seen: list[bytes] = []
    cookies: list[int] = []
    cookie = 0
    for page in range(100):
        batch = fs.readdir(d, after=cookie, limit=10)
        if not batch:
            break
        assert len(batch) <= 10
        for c, name, attrs in batch:
            assert name in present, f"{name!r} listed but not present"
            assert attrs.ino == fs.lookup(d, name).ino
            seen.append(name)
            cookies.append(c)
        cookie = batch[-1][0]
        listed = set(seen)
        unlisted = sorted(present - listed)
        for name in rng.sample(unlisted, min(2, len(unlisted))):  # not yet listed
            fs.unlink(d, name)
            present.discard(name)
            removed.add(name)
        for name in rng.sample(sorted(listed & present), min(2, len(listed & present))):
            fs.unlink(d, name)  # already listed
            present.discard(name)
            removed.add(name)
        for i in range(3):
            name = b"new-%02d-%d" % (page, i)
            mkfile(fs, d, name)
            present.add(name)
            added.add(name)
    assert cookies == sorted(cookies) and len(set(cookies)) == len(cookies)
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    throughout = set(initial) - removed
    assert throughout <= set(seen), f"missed {sorted(throughout - set(seen))}"
    assert set(seen) <= set(initial) | added
    assert_fsck_clean(store)


def test_readdir_limit_and_resume(store, fs):
    d = mkdir(fs, ROOT_INO, b"d")
    for i in range(25):
        mkfile(fs, d, b"%02d" % i)
    out, cookie = [], 0
    while page := fs.readdir(d, after=cookie, limit=7):
        out += [name for _, name, _ in page]
        cookie = page[-1][0]
    assert sorted(out) == [b"%02d" % i for i in range(25)]
    assert fs.readdir(d, after=cookie) == []
    fails(errno.ENOTDIR, fs.readdir, mkfile(fs, ROOT_INO, b"f"))
    assert_fsck_clean(store)


# -- held inodes and orphans ----------------------------------------------------------------


@pytest.fixture
def held_fs(store):
    held: set[int] = set()
    f = Filesystem(store, is_held=lambda ino: ino in held)
    f.held = held  # type: ignore[attr-defined]
    try:
        yield f
    finally:
        f.close()


def test_unlinked_held_file_lives_until_release(store, held_fs):
    fs, held = held_fs, held_fs.held
    data = rand(500 * KiB)
    f = mkfile(fs, ROOT_INO, b"f", data)
    held.add(f)
    fs.unlink(ROOT_INO, b"f")
    fails(errno.ENOENT, fs.lookup, ROOT_INO, b"f")
    attrs = fs.getattr(f)
    assert attrs.nlink == 0 and attrs.size == len(data)
    assert fs.read(f, 0, len(data)) == data
    fs.write(f, len(data), b"still writable")  # an open file keeps working
    assert fs.read(f, len(data), 100) == b"still writable"
    assert fs.orphans() == [f]
    fails(errno.ENOENT, fs.link, f, ROOT_INO, b"back")
    report = fsck(store)
    assert report.clean, report.problems
    assert [p.kind for p in report.notes] == ["orphan"]
    assert fs.release(f) is False  # still held
    held.discard(f)
    assert fs.release(f) is True
    fails(errno.ENOENT, fs.getattr, f)
    assert fs.orphans() == []
    assert store.stats().objects == 0 and store.stats().inodes == 1
    assert fs.release(f) is False  # already gone
    assert_fsck_clean(store)


def test_release_of_a_linked_inode_keeps_it(store, held_fs):
    f = mkfile(held_fs, ROOT_INO, b"f", b"x")
    assert held_fs.release(f) is False
    assert whole(held_fs, f) == b"x"
    assert_fsck_clean(store)


def test_held_directory_and_rename_victim(store, held_fs):
    fs, held = held_fs, held_fs.held
    d = mkdir(fs, ROOT_INO, b"d")
    held.add(d)
    fs.rmdir(ROOT_INO, b"d")
    assert fs.getattr(d).nlink == 0
    fails(errno.ENOENT, fs.create, d, b"x", 0o644, UID, GID)
    fails(errno.ENOENT, fs.mkdir, d, b"x", 0o755, UID, GID)
    assert fs.readdir(d) == []
    mkfile(fs, ROOT_INO, b"src", b"new")
    victim = mkfile(fs, ROOT_INO, b"dst", b"old")
    held.add(victim)
    fs.rename(ROOT_INO, b"src", ROOT_INO, b"dst")
    assert whole(fs, victim) == b"old"
    assert sorted(fs.orphans()) == sorted([d, victim])
    assert fsck(store).clean
    assert {p.kind for p in fsck(store).notes} == {"orphan"}
    held.clear()
    assert fs.release(d) and fs.release(victim)
    assert store.stats().inodes == 2
    assert_fsck_clean(store)


def test_free_orphans_after_crash(tmp_path):
    path = str(tmp_path / "store")
    store = Filesystem.create_store(path)
    held: set[int] = set()
    fs = Filesystem(store, is_held=lambda ino: ino in held)
    inos = [mkfile(fs, ROOT_INO, b"f%d" % i, rand(200 * KiB, i)) for i in range(3)]
    d = mkdir(fs, ROOT_INO, b"d")
    held.update(inos[:2] + [d])
    for i in range(3):
        fs.unlink(ROOT_INO, b"f%d" % i)
    fs.rmdir(ROOT_INO, b"d")
    assert sorted(fs.orphans()) == sorted(inos[:2] + [d])
    assert store.stats().objects > 0
    fs.close()
    store.close()  # the mount dies: its holds are gone

    store = Store(path)
    fs = Filesystem(store)
    try:
        assert sorted(fs.orphans()) == sorted(inos[:2] + [d])
        assert fsck(store).clean
        assert {p.kind for p in fsck(store).notes} == {"orphan"}
        assert fs.free_orphans() == 3
        assert fs.orphans() == []
        assert fs.free_orphans() == 0
        for ino in inos + [d]:
            fails(errno.ENOENT, fs.getattr, ino)
        assert store.stats().objects == 0 and store.stats().inodes == 1
        assert_fsck_clean(store)
    finally:
        fs.close()
        store.close()


def test_free_orphans_spares_held(store, held_fs):
    fs, held = held_fs, held_fs.held
    a = mkfile(fs, ROOT_INO, b"a", b"a")
    b = mkfile(fs, ROOT_INO, b"b", b"b")
    held.update((a, b))
    fs.unlink(ROOT_INO, b"a")
    fs.unlink(ROOT_INO, b"b")
    held.discard(a)
    assert fs.free_orphans() == 1
    assert fs.orphans() == [b]
    fails(errno.ENOENT, fs.getattr, a)
    held.clear()
    assert fs.free_orphans() == 1
    assert_fsck_clean(store)


def test_inodes_without_xattrs_are_known_without_the_store(store, fs):
    """The kernel asks for security.capability before every write(); the mount answers from
    memory for inodes known to have no xattrs, and forgets that at any xattr change or abort."""
    ino = fs.create(ROOT_INO, b"f", 0o644, UID, GID).ino
    store.begin_batch()  # as in the mount: what is learned is the batch's state
    try:
        assert fs.xattr(ino, b"security.capability") is None
        assert fs.known_xattrless(ino)
        fs.setxattr(ino, b"user.a", b"1")
        assert not fs.known_xattrless(ino)
        assert fs.xattr(ino, b"security.capability") is None  # has user.a: not learned
        assert not fs.known_xattrless(ino)
        fs.removexattr(ino, b"user.a")
        assert fs.xattr(ino, b"security.capability") is None
        assert fs.known_xattrless(ino)
        with pytest.raises(FsError):  # an operation that fails aborts its transaction
            fs.setxattr(ino, b"user.b", b"2", XATTR_REPLACE)
        assert not fs.known_xattrless(ino)
    finally:
        store.commit_batch()


def test_inodes_kept_in_memory_follow_aborts_and_frees(store, fs):
    """Write transactions take inodes from memory once read or written there; what an
    aborted transaction wrote, a freed inode and an aborted batch are never served."""
    ino = fs.create(ROOT_INO, b"f", 0o644, UID, GID).ino
    store.begin_batch()  # as in the mount: reads go through the batch's transactions
    try:
        fs.setattr(ino, mode=0o600)

        def change_then_fail(tx):
            fs._put(tx, fs._get(tx, ino).but(mode=0o640, size=7))
            raise FsError(errno.EIO, "after the change")

        with pytest.raises(FsError):
            store.run_write(change_then_fail)
        assert (stat.S_IMODE(fs.getattr(ino).mode), fs.getattr(ino).size) == (0o600, 0)
    finally:
        store.commit_batch()
    store.begin_batch()
    fs.setattr(ino, mode=0o611)
    assert stat.S_IMODE(fs.getattr(ino).mode) == 0o611
    store.abort_batch()
    assert stat.S_IMODE(fs.getattr(ino).mode) == 0o600
    store.begin_batch()
    try:
        fs.unlink(ROOT_INO, b"f")
        fails(errno.ENOENT, fs.getattr, ino)
    finally:
        store.commit_batch()
    fails(errno.ENOENT, fs.getattr, ino)
    assert_fsck_clean(store)


def test_a_commit_that_fails_is_forgotten_before_the_retry(store, fs, monkeypatch):
    """A commit that fails on a full map is retried from the start once the map has grown.
    The failed transaction is gone, and so must be the inodes it wrote from memory: else
    the retry takes a link off a count already lowered, and frees a file still named."""
    import lmdb

    from casfs.store.store import Tx

    ino = fs.create(ROOT_INO, b"f", 0o644, UID, GID).ino
    fs.link(ino, ROOT_INO, b"g")
    real_commit, failures = Tx.commit, [1]

    def commit_once_full(tx):
        if failures and tx.parent is None:
            failures.pop()
            tx.txn.abort()  # as LMDB leaves a transaction whose commit found the map full
            raise lmdb.MapFullError("test: map full")
        real_commit(tx)

    monkeypatch.setattr(Tx, "commit", commit_once_full)
    fs.unlink(ROOT_INO, b"f")
    assert not failures, "the commit never failed: the test tested nothing"
    assert fs.lookup(ROOT_INO, b"g").nlink == 1
    assert fs.getattr(ino).nlink == 1
    assert_fsck_clean(store)
