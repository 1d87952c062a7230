"""Real-mount tests: every check goes through the kernel, with plain os/shutil/subprocess calls
on paths under a casfs mount made by ``casfs mount`` (see ``casfs_mount`` in conftest.py).
Each test ends with ``casfs umount`` and a clean ``casfs fsck``."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import stat
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    CasfsMount,
    assert_same_tree,
    casfs_cli,
    errno_of,
    is_mounted,
    poll,
    pread_all,
    read_file,
    renameat2,
    tree_digest,
    wait_gone,
    write_file,
)

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
NOBODY = 65534
# The test user must be able to run it: the venv's interpreter lives under /root.
SYSTEM_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


def fsync_path(path: os.PathLike | str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: os.PathLike | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MiB):
            h.update(block)
    return h.hexdigest()


def as_nobody(cwd: os.PathLike | str, code: str) -> dict:
    """Run ``code`` (which must print one JSON object) as user nobody with no groups. It
    starts in ``cwd`` (a path it could not reach itself: pytest's tmp dirs are 0700)."""
    r = subprocess.run(
        [SYSTEM_PYTHON, "-c", PROBE_PRELUDE + code],
        cwd=cwd,
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


PROBE_PRELUDE = """
import json, os
out = {}
def probe(label, fn, *args):
    try:
        fn(*args)
        out[label] = 0
    except OSError as exc:
        out[label] = exc.errno
def read(path):
    with open(path, "rb") as f:
        f.read()
def write(path):
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)
"""


# -- files and attributes ---------------------------------------------------------------------


def test_basic_file_ops_and_attributes(mounted: CasfsMount):
    m = mounted.mnt
    root_st = os.stat(m)
    assert stat.S_ISDIR(root_st.st_mode) and root_st.st_nlink == 2

    p = m / "hello.txt"
    write_file(p, b"hello world\n", 0o640)
    st = os.stat(p)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_size == 12 and st.st_nlink == 1
    assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid())
    assert st.st_dev == root_st.st_dev and st.st_ino != root_st.st_ino
    assert read_file(p) == b"hello world\n"

    with open(p, "r+b") as f:  # overwrite in the middle, append, read back before close
        f.seek(6)
        f.write(b"WORLD")
        f.seek(0, os.SEEK_END)
        f.write(b"more\n")
        f.flush()
        f.seek(0)
        assert f.read() == b"hello WORLD\nmore\n"
    assert os.stat(p).st_size == 17
    os.truncate(p, 5)
    assert read_file(p) == b"hello"
    os.truncate(p, 8)
    assert read_file(p) == b"hello\0\0\0"
    with open(p, "ab") as f:
        f.write(b"!")
    assert read_file(p) == b"hello\0\0\0!"

    # truncation on open, as the shell's ">" does it, also of bytes another handle wrote
    subprocess.run(f"printf 'hello world\\n' > {p} && printf 'x\\n' > {p}", shell=True, check=True)
    assert read_file(p) == b"x\n"
    fd = os.open(p, os.O_WRONLY)
    os.pwrite(fd, b"still buffered", 1000)
    fd2 = os.open(p, os.O_WRONLY | os.O_TRUNC)
    assert os.fstat(fd2).st_size == 0
    os.write(fd2, b"new")
    os.close(fd)
    os.close(fd2)
    assert read_file(p) == b"new"
    write_file(p, b"hello\0\0\0!")

    empty = m / "empty"
    empty.touch()
    assert os.stat(empty).st_size == 0 and os.stat(empty).st_blocks == 0 and read_file(empty) == b""
    assert errno_of(os.open, empty, os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    assert errno_of(os.stat, m / "missing") == errno.ENOENT
    assert errno_of(os.open, m / "missing" / "x", os.O_RDONLY) == errno.ENOENT
    assert errno_of(os.open, p / "x", os.O_RDONLY) == errno.ENOTDIR
    assert errno_of(os.open, m, os.O_WRONLY) == errno.EISDIR

    # directory link counts: 2 + subdirectories
    d = m / "d"
    os.mkdir(d)
    assert os.stat(d).st_nlink == 2
    os.mkdir(d / "a")
    os.mkdir(d / "b")
    assert os.stat(d).st_nlink == 4
    assert os.stat(m).st_nlink == 3
    os.rmdir(d / "a")
    assert os.stat(d).st_nlink == 3

    # st_blocks follows the stored (logical) data, buffered or flushed
    data = random.Random(1).randbytes(MiB + 1234)
    big = m / "big"
    with open(big, "wb") as f:
        f.write(data)
        f.flush()
        st = os.fstat(f.fileno())
        assert st.st_size == len(data)
        assert len(data) <= st.st_blocks * 512 < len(data) + 64 * KiB
        os.fsync(f.fileno())
    st = os.stat(big)
    assert len(data) <= st.st_blocks * 512 < len(data) + 64 * KiB
    assert read_file(big) == data
    shutil.copyfile(big, m / "big.copy")
    assert read_file(m / "big.copy") == data

    sparse = m / "sparse"
    with open(sparse, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(32 * MiB)
        f.write(b"x" * 4096)
    st = os.stat(sparse)
    assert st.st_size == 64 * MiB
    assert 0 < st.st_blocks * 512 <= 64 * KiB
    with open(sparse, "rb") as f:
        f.seek(32 * MiB - 10)
        assert f.read(4106 + 10) == bytes(10) + b"x" * 4096 + bytes(10)

    sv = os.statvfs(m)
    assert sv.f_namemax == 255 and sv.f_bsize > 0


def test_hard_links_across_directories(mounted: CasfsMount):
    m = mounted.mnt
    os.mkdir(m / "d1")
    os.mkdir(m / "d2")
    os.mkdir(m / "d2" / "deep")
    write_file(m / "d1" / "f", b"original")
    os.link(m / "d1" / "f", m / "d2" / "g")
    os.link(m / "d2" / "g", m / "d2" / "deep" / "h")
    names = [m / "d1" / "f", m / "d2" / "g", m / "d2" / "deep" / "h"]
    sts = [os.stat(n) for n in names]
    assert len({s.st_ino for s in sts}) == 1
    assert all(s.st_nlink == 3 for s in sts)

    with open(names[1], "r+b") as f:  # a write through one name shows through the others
        f.write(b"CHANGED!")
    assert all(read_file(n) == b"CHANGED!" for n in names)
    os.chmod(names[2], 0o600)
    assert all(stat.S_IMODE(os.stat(n).st_mode) == 0o600 for n in names)

    assert errno_of(os.link, names[0], names[1]) == errno.EEXIST
    assert errno_of(os.link, m / "d1", m / "d1link") == errno.EPERM
    assert errno_of(os.link, m / "nothing", m / "x") == errno.ENOENT

    os.unlink(names[0])
    assert not names[0].exists()
    assert os.stat(names[1]).st_nlink == 2
    ino = os.stat(names[1]).st_ino

    mounted.remount()  # identity survives: same inode number, same link count
    assert os.stat(names[1]).st_ino == os.stat(names[2]).st_ino == ino
    assert os.stat(names[2]).st_nlink == 2
    os.unlink(names[1])
    assert os.stat(names[2]).st_nlink == 1 and read_file(names[2]) == b"CHANGED!"


def test_mkdir_rmdir_rename(mounted: CasfsMount):
    m = mounted.mnt
    os.mkdir(m / "a")
    assert errno_of(os.mkdir, m / "a") == errno.EEXIST
    assert errno_of(os.mkdir, m / "no" / "x") == errno.ENOENT
    os.makedirs(m / "a" / "b" / "c")
    write_file(m / "a" / "b" / "c" / "file", b"payload")
    assert errno_of(os.rmdir, m / "a") == errno.ENOTEMPTY
    assert errno_of(os.rmdir, m / "a" / "b" / "c" / "file") == errno.ENOTDIR
    assert errno_of(os.rmdir, m / "zzz") == errno.ENOENT
    assert errno_of(os.unlink, m / "a") == errno.EISDIR

    # files: within a directory, across directories
    os.rename(m / "a" / "b" / "c" / "file", m / "a" / "b" / "c" / "file2")
    os.rename(m / "a" / "b" / "c" / "file2", m / "moved")
    assert read_file(m / "moved") == b"payload"
    assert os.listdir(m / "a" / "b" / "c") == []

    # a directory across directories: link counts of both parents and its ".."
    os.mkdir(m / "x")
    ino_x = os.stat(m / "x").st_ino
    os.rename(m / "a" / "b", m / "x" / "b")
    assert os.stat(m / "a").st_nlink == 2 and os.stat(m / "x").st_nlink == 3
    assert os.stat(m / "x" / "b" / "..").st_ino == ino_x
    assert os.path.isdir(m / "x" / "b" / "c")

    # into itself, or onto non-matching types
    assert errno_of(os.rename, m / "x", m / "x" / "b" / "x2") == errno.EINVAL
    write_file(m / "f1", b"one")
    write_file(m / "f2", b"two")
    assert errno_of(os.rename, m / "f1", m / "x") == errno.EISDIR
    assert errno_of(os.rename, m / "x", m / "f1") == errno.ENOTDIR
    assert errno_of(os.rename, m / "a", m / "x") == errno.ENOTEMPTY
    assert errno_of(os.rename, m / "nothing", m / "y") == errno.ENOENT

    # over an existing file: the target's old inode goes away
    ino_f1 = os.stat(m / "f1").st_ino
    os.rename(m / "f1", m / "f2")
    assert read_file(m / "f2") == b"one" and os.stat(m / "f2").st_ino == ino_f1
    assert not (m / "f1").exists()
    os.replace(m / "moved", m / "f2")
    assert read_file(m / "f2") == b"payload"
    # over an empty directory
    os.mkdir(m / "empty")
    os.rename(m / "a", m / "empty")
    assert not (m / "a").exists() and os.path.isdir(m / "empty")
    # onto a hard link of itself: nothing happens
    os.link(m / "f2", m / "f2link")
    os.rename(m / "f2", m / "f2link")
    assert (m / "f2").exists() and os.stat(m / "f2").st_nlink == 2

    assert sorted(os.listdir(m)) == ["empty", "f2", "f2link", "x"]
    os.rmdir(m / "empty")
    shutil.rmtree(m / "x")
    assert sorted(os.listdir(m)) == ["f2", "f2link"]
    assert os.stat(m).st_nlink == 2


def test_renameat2_flags(mounted: CasfsMount):
    m = mounted.mnt
    write_file(m / "a", b"aaa")
    write_file(m / "b", b"bbb")
    os.mkdir(m / "dir")
    write_file(m / "dir" / "inner", b"in")

    assert errno_of(renameat2, m / "a", m / "b", RENAME_NOREPLACE) == errno.EEXIST
    assert read_file(m / "a") == b"aaa" and read_file(m / "b") == b"bbb"
    renameat2(m / "a", m / "c", RENAME_NOREPLACE)
    assert not (m / "a").exists() and read_file(m / "c") == b"aaa"

    renameat2(m / "b", m / "c", RENAME_EXCHANGE)
    assert read_file(m / "b") == b"aaa" and read_file(m / "c") == b"bbb"
    # a file and a directory in different parents trade places
    renameat2(m / "b", m / "dir" / "inner", RENAME_EXCHANGE)
    assert read_file(m / "b") == b"in" and read_file(m / "dir" / "inner") == b"aaa"
    os.mkdir(m / "other")
    renameat2(m / "dir", m / "c", RENAME_EXCHANGE)
    assert read_file(m / "dir") == b"bbb" and read_file(m / "c" / "inner") == b"aaa"
    assert os.stat(m).st_nlink == 4  # root, c, other: the directory count is unchanged
    assert errno_of(renameat2, m / "b", m / "missing", RENAME_EXCHANGE) == errno.ENOENT
    assert (
        errno_of(renameat2, m / "b", m / "dir", RENAME_EXCHANGE | RENAME_NOREPLACE) == errno.EINVAL
    )
    assert errno_of(renameat2, m / "c", m / "c" / "inner", RENAME_EXCHANGE) == errno.EINVAL


def test_symlinks_and_readlink(mounted: CasfsMount):
    m = mounted.mnt
    os.mkdir(m / "d")
    write_file(m / "d" / "target", b"through the link")
    os.symlink("d/target", m / "rel")
    os.symlink(str(m / "d"), m / "abs")
    os.symlink("nowhere", m / "dangling")
    assert os.readlink(m / "rel") == "d/target"
    st = os.lstat(m / "rel")
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("d/target")
    assert read_file(m / "rel") == b"through the link"
    assert os.listdir(m / "abs") == ["target"]
    assert errno_of(os.stat, m / "dangling") == errno.ENOENT
    assert os.lstat(m / "dangling").st_size == 7
    assert errno_of(os.readlink, m / "d" / "target") == errno.EINVAL
    assert errno_of(os.symlink, "x", m / "rel") == errno.EEXIST
    long_target = "t" * 4095
    os.symlink(long_target, m / "long")
    assert os.readlink(m / "long") == long_target
    os.rename(m / "rel", m / "d" / "moved")  # now relative to d/: dangling
    assert os.readlink(m / "d" / "moved") == "d/target"
    assert errno_of(os.stat, m / "d" / "moved") == errno.ENOENT
    os.unlink(m / "abs")
    assert os.path.isdir(m / "d")


def test_mknod_fifo_and_special_files(mounted: CasfsMount):
    m = mounted.mnt
    fifo = m / "fifo"
    os.mkfifo(fifo, 0o640)
    st = os.stat(fifo)
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640

    got = []
    reader = threading.Thread(target=lambda: got.append(read_file(fifo)))
    reader.start()
    with open(fifo, "wb") as f:
        f.write(b"through the pipe")
    reader.join(10)
    assert got == [b"through the pipe"]

    os.mknod(m / "sock", stat.S_IFSOCK | 0o600)
    assert stat.S_ISSOCK(os.stat(m / "sock").st_mode)
    os.mknod(m / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    st = os.stat(m / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert errno_of(os.mkfifo, fifo) == errno.EEXIST
    mounted.remount()
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert os.stat(m / "null").st_rdev == os.makedev(1, 3)
    os.unlink(fifo)
    os.unlink(m / "sock")
    os.unlink(m / "null")
    assert os.listdir(m) == []


def test_xattrs(mounted: CasfsMount):
    m = mounted.mnt
    p = m / "f"
    write_file(p, b"x")
    os.mkdir(m / "d")
    os.symlink("f", m / "link")

    assert os.listxattr(p) == []
    os.setxattr(p, "user.one", b"1")
    os.setxattr(p, "user.bin", b"\0\xff\0 binary")
    os.setxattr(p, "user.empty", b"")
    assert os.getxattr(p, "user.one") == b"1"
    assert os.getxattr(p, "user.bin") == b"\0\xff\0 binary"
    assert os.getxattr(p, "user.empty") == b""
    assert sorted(os.listxattr(p)) == ["user.bin", "user.empty", "user.one"]

    assert errno_of(os.setxattr, p, "user.one", b"again", os.XATTR_CREATE) == errno.EEXIST
    assert os.getxattr(p, "user.one") == b"1"
    assert errno_of(os.setxattr, p, "user.new", b"v", os.XATTR_REPLACE) == errno.ENODATA
    assert "user.new" not in os.listxattr(p)
    os.setxattr(p, "user.one", b"replaced", os.XATTR_REPLACE)
    os.setxattr(p, "user.two", b"created", os.XATTR_CREATE)
    assert os.getxattr(p, "user.one") == b"replaced"
    assert os.getxattr(p, "user.two") == b"created"

    assert errno_of(os.getxattr, p, "user.missing") == errno.ENODATA
    assert errno_of(os.removexattr, p, "user.missing") == errno.ENODATA
    os.removexattr(p, "user.one")
    assert errno_of(os.getxattr, p, "user.one") == errno.ENODATA
    assert sorted(os.listxattr(p)) == ["user.bin", "user.empty", "user.two"]

    big = os.urandom(65536)
    os.setxattr(p, "user.big", big)
    assert os.getxattr(p, "user.big") == big
    assert errno_of(os.setxattr, p, "user.huge", bytes(65537)) == errno.E2BIG
    assert errno_of(os.setxattr, p, "user." + "n" * 251, b"v") == errno.ERANGE

    os.setxattr(m / "d", "user.dir", b"on a directory")
    assert os.getxattr(m / "d", "user.dir") == b"on a directory"
    # Linux allows user.* only on regular files and directories
    assert errno_of(os.setxattr, m / "link", "user.x", b"v", follow_symlinks=False) == errno.EPERM
    os.setxattr(m / "link", "user.via", b"followed")  # follows the link to f
    assert os.getxattr(p, "user.via") == b"followed"
    os.setxattr(p, "trusted.root", b"t")  # root may use trusted.*
    assert os.getxattr(p, "trusted.root") == b"t"

    ctime = os.stat(p).st_ctime_ns
    time.sleep(0.02)
    os.setxattr(p, "user.ctime", b"c")
    assert os.stat(p).st_ctime_ns > ctime

    mounted.remount()
    assert os.getxattr(p, "user.big") == big
    assert sorted(os.listxattr(p)) == sorted(
        ["user.bin", "user.empty", "user.two", "user.big", "user.via", "trusted.root", "user.ctime"]
    )
    assert os.listxattr(m / "d") == ["user.dir"]


def test_cp_preserves_modes(mounted: CasfsMount, tmp_path: Path):
    """``cp -a`` and ``cp -p`` set modes by writing system.posix_acl_access; casfs does not
    enforce ACLs, so it must refuse them (EOPNOTSUPP) and let cp fall back to chmod, or
    every copied file would keep cp's restrictive creation mode (0600/0700)."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_bytes(b"data")
    os.chmod(src / "sub" / "f", 0o644)
    os.chmod(src / "sub", 0o755)
    os.chmod(src / "sub" / "f", 0o640)  # not cp's default, so a fallback to umask shows
    m = mounted.mnt
    for flag in ("-a", "-p"):
        dest = m / flag.strip("-")
        subprocess.run(["cp", "-r", flag, str(src), str(dest)], check=True)
        assert stat.S_IMODE(os.stat(dest / "sub").st_mode) == 0o755
        assert stat.S_IMODE(os.stat(dest / "sub" / "f").st_mode) == 0o640
    p = m / "a" / "sub" / "f"
    entries = ((0x01, 6), (0x04, 4), (0x20, 4))  # user::rw- group::r-- other::r--
    acl = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in entries
    )
    assert errno_of(os.setxattr, p, "system.posix_acl_access", acl) == errno.EOPNOTSUPP
    assert not [n for n in os.listxattr(p) if n.startswith("system.")]


def test_readdir_2000_entries(mounted: CasfsMount):
    d = mounted.mnt / "many"
    os.mkdir(d)
    names = {f"entry-{i:05d}-{'x' * (i % 97)}" for i in range(2000)}
    for name in names:
        with open(d / name, "wb"):
            pass
    listed = os.listdir(d)
    assert len(listed) == 2000 and set(listed) == names
    with os.scandir(d) as it:
        entries = list(it)
    assert sorted(e.name for e in entries) == sorted(names)
    sample = entries[::97]
    assert all(e.inode() == os.stat(e.path).st_ino for e in sample)
    assert all(e.is_file() for e in entries)
    out = subprocess.run(["ls", "-1f", str(d)], capture_output=True, text=True, check=True)
    assert sorted(out.stdout.split()) == sorted(names | {".", ".."})

    # remove every other entry and list again: survivors exactly once
    gone = sorted(names)[::2]
    for name in gone:
        os.unlink(d / name)
    listed = os.listdir(d)
    assert len(listed) == 1000 and set(listed) == names - set(gone)
    mounted.remount()
    assert sorted(os.listdir(d)) == sorted(names - set(gone))


def test_readdir_while_the_directory_changes(mounted: CasfsMount):
    """Entries present for the whole listing appear exactly once, whatever is created and
    deleted meanwhile (readdir offsets are stable cookies, not positions)."""
    d = mounted.mnt / "busy"
    os.mkdir(d)
    keep = {f"keep-{i:04d}" for i in range(1500)}
    churn = [f"churn-{i:04d}" for i in range(600)]
    for name in sorted(keep) + churn:
        with open(d / name, "wb"):
            pass
    seen: list[str] = []
    created = 0
    with os.scandir(d) as it:
        for i, entry in enumerate(it):
            seen.append(entry.name)
            if i % 100 == 99:
                for _ in range(40):
                    if churn:
                        os.unlink(d / churn.pop())
                    with open(d / f"new-{created:04d}", "wb"):
                        pass
                    created += 1
    assert len(seen) == len(set(seen)), "a name was listed twice"
    assert keep <= set(seen)
    assert set(os.listdir(d)) == keep | set(churn) | {f"new-{i:04d}" for i in range(created)}


def test_open_unlinked_file_lives_until_close(mounted: CasfsMount):
    m = mounted.mnt
    write_file(m / "keep", b"a small file that stays")
    fsync_path(m / "keep")  # commit, so that the offline reader sees the starting point
    base = mounted.stats()
    data = random.Random(2).randbytes(3 * MiB)
    extra = random.Random(3).randbytes(MiB)

    fd = os.open(m / "doomed", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)  # commits: the offline stats reader sees the data now
        held = mounted.stats()
        assert held["objects"] > base["objects"] and held["inodes"] == base["inodes"] + 1

        os.unlink(m / "doomed")
        assert not (m / "doomed").exists() and os.listdir(m) == ["keep"]
        assert os.fstat(fd).st_nlink == 0
        assert pread_all(fd, len(data), 0) == data
        os.pwrite(fd, extra, len(data))  # still writable
        assert os.fstat(fd).st_size == len(data) + len(extra)
        os.fsync(fd)
        assert pread_all(fd, len(data) + len(extra), 0) == data + extra
        assert mounted.stats()["objects"] > held["objects"]
    finally:
        os.close(fd)

    # The kernel forgets the inode after the close; the timer commits the freeing.
    assert poll(lambda: mounted.stats()["objects"] == base["objects"]), mounted.stats()
    after = mounted.stats()
    assert after["inodes"] == base["inodes"]
    assert after["logical_bytes"] == base["logical_bytes"]
    assert read_file(m / "keep") == b"a small file that stays"


def test_rename_over_open_file(mounted: CasfsMount):
    m = mounted.mnt
    old = random.Random(4).randbytes(300 * KiB)
    write_file(m / "target", old)
    fsync_path(m / "target")
    base = mounted.stats()
    with open(m / "target", "rb") as f:
        write_file(m / "incoming", b"the new content")
        os.rename(m / "incoming", m / "target")
        assert read_file(m / "target") == b"the new content"
        assert f.read() == old  # the open file is the old inode
        f.seek(1000)
        assert f.read(10) == old[1000:1010]
        assert os.fstat(f.fileno()).st_nlink == 0
    assert os.listdir(m) == ["target"]
    assert read_file(m / "target") == b"the new content"
    assert poll(lambda: mounted.stats()["objects"] < base["objects"]), mounted.stats()
    assert poll(lambda: mounted.stats()["inodes"] == 2), mounted.stats()


# -- concurrency ------------------------------------------------------------------------------


def _writer_process(args: tuple[str, str, int, int]) -> tuple[str, int]:
    """Random writes to one file (own reference copy), plus this writer's stripe of a shared
    file. Returns the sha256 and length of what the private file must hold."""
    path, shared, index, seed = args
    rng = random.Random(seed)
    ref = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    sfd = os.open(shared, os.O_RDWR)
    try:
        for step in range(250):
            off = rng.randrange(0, 6 * MiB)
            n = rng.choice([1, 100, 4096, 65536, rng.randrange(1, 300 * KiB)])
            data = rng.randbytes(n) if rng.random() < 0.7 else bytes([step % 256]) * n
            os.pwrite(fd, data, off)
            if off > len(ref):
                ref.extend(bytes(off - len(ref)))
            ref[off : off + n] = data
            if rng.random() < 0.1:
                size = rng.randrange(0, 6 * MiB)
                os.ftruncate(fd, size)
                del ref[size:]
                ref.extend(bytes(size - len(ref)))
            if rng.random() < 0.2:
                roff = rng.randrange(0, len(ref) + 1)
                rlen = rng.randrange(0, 200 * KiB)
                got = pread_all(fd, rlen, roff)
                assert got == bytes(ref[roff : roff + rlen]), f"{path}: read mismatch at {step}"
            if rng.random() < 0.05:
                os.fsync(fd)
            # the shared file: this writer owns bytes [index MiB, index+1 MiB)
            soff = index * MiB + rng.randrange(0, MiB - 4096)
            os.pwrite(sfd, bytes([index + 1]) * 4096, soff)
    finally:
        os.close(sfd)
        os.close(fd)
    return hashlib.sha256(ref).hexdigest(), len(ref)


def test_concurrent_writer_processes(mounted: CasfsMount):
    m = mounted.mnt
    shared = m / "shared"
    write_file(shared, bytes(4 * MiB))
    jobs = [(str(m / f"w{i}"), str(shared), i, 1000 + i) for i in range(4)]
    with multiprocessing.get_context("fork").Pool(4) as pool:
        results = pool.map(_writer_process, jobs)
    for (path, _, _, _), (digest, size) in zip(jobs, results, strict=True):
        assert os.stat(path).st_size == size
        assert sha256_file(path) == digest, path
    data = read_file(shared)
    assert len(data) == 4 * MiB
    for i in range(4):
        stripe = data[i * MiB : (i + 1) * MiB]
        assert set(stripe) <= {0, i + 1} and stripe.count(i + 1) >= 4096
    mounted.remount()
    for (path, _, _, _), (digest, _) in zip(jobs, results, strict=True):
        assert sha256_file(path) == digest, path
    assert read_file(shared) == data


# -- big and strange files and names ----------------------------------------------------------


def test_sparse_5gib_file(mounted: CasfsMount):
    p = mounted.mnt / "sparse5g"
    size = 5 * GiB
    rng = random.Random(5)
    offsets = [0, GiB + 12345, 3 * GiB - 512 * KiB, size - MiB]
    blocks = {off: rng.randbytes(MiB) for off in offsets}
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for off, data in blocks.items():
            assert os.pwrite(fd, data, off) == MiB
        os.fsync(fd)
        st = os.fstat(fd)
        assert st.st_size == size
        assert 4 * MiB <= st.st_blocks * 512 <= 4 * MiB + 64 * KiB
        for off, data in blocks.items():
            assert pread_all(fd, MiB, off) == data, f"content at {off}"

        def zeros_at(off: int, n: int) -> None:
            assert pread_all(fd, n, off) == bytes(n), f"hole at {off} not zero"

        for off in offsets:  # the bytes right around each written block
            if off > 0:
                zeros_at(max(0, off - 64 * KiB), min(off, 64 * KiB))
            if off + MiB < size:
                zeros_at(off + MiB, 64 * KiB)
        for _ in range(40):
            off = rng.randrange(0, size - 64 * KiB)
            if all(off + 64 * KiB <= o or off >= o + MiB for o in offsets):
                zeros_at(off, 64 * KiB)
        assert pread_all(fd, 100, size) == b""
    finally:
        os.close(fd)

    stats = mounted.stats()
    assert stats["stored_bytes"] < 8 * MiB and stats["unique_bytes"] < 8 * MiB, stats
    assert stats["logical_bytes"] == 4 * MiB

    # cut in the middle, then grow again: the cut-off data must not come back
    os.truncate(p, 2 * GiB)
    assert os.stat(p).st_size == 2 * GiB
    os.truncate(p, size)
    with open(p, "rb") as f:
        f.seek(3 * GiB - 512 * KiB)
        assert f.read(MiB) == bytes(MiB)
        f.seek(GiB + 12345)
        assert f.read(MiB) == blocks[GiB + 12345]
    assert os.stat(p).st_blocks * 512 <= 2 * MiB + 64 * KiB
    mounted.remount()
    assert os.stat(p).st_size == size
    with open(p, "rb") as f:
        assert f.read(MiB) == blocks[0]
        f.seek(size - MiB)
        assert f.read() == bytes(MiB)


def test_name_length_limits(mounted: CasfsMount):
    m = mounted.mnt
    n255, n256 = "n" * 255, "n" * 256
    multibyte255, multibyte256 = "é" * 127 + "x", "é" * 128  # 255 and 256 bytes
    assert len(multibyte255.encode()) == 255 and len(multibyte256.encode()) == 256

    write_file(m / n255, b"long name")
    os.mkdir(m / ("d" * 255))
    os.symlink(n255, m / ("s" * 255))
    os.link(m / n255, m / ("l" * 255))
    write_file(m / multibyte255, b"accents")
    os.rename(m / multibyte255, m / ("r" * 255))
    assert read_file(m / ("s" * 255)) == b"long name"
    assert sorted(os.listdir(m)) == sorted(["n" * 255, "d" * 255, "s" * 255, "l" * 255, "r" * 255])

    for name in (n256, multibyte256):
        assert errno_of(os.open, m / name, os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
        assert errno_of(os.stat, m / name) == errno.ENAMETOOLONG
        assert errno_of(os.mkdir, m / name) == errno.ENAMETOOLONG
        assert errno_of(os.mkfifo, m / name) == errno.ENAMETOOLONG
        assert errno_of(os.symlink, "t", m / name) == errno.ENAMETOOLONG
        assert errno_of(os.link, m / n255, m / name) == errno.ENAMETOOLONG
        assert errno_of(os.rename, m / n255, m / name) == errno.ENAMETOOLONG
    assert read_file(m / n255) == b"long name"
    assert len(os.listdir(m)) == 5


def test_non_utf8_names(mounted: CasfsMount):
    m = os.fsencode(mounted.mnt)
    names = [
        b"\xff\xfe",
        b"caf\xe9",
        b"\x80abc",
        b"line\nbreak",
        b"sp ace",
        b"\x01\x7f\xc3",
        b"\xe9t\xe9",
    ]
    os.mkdir(m + b"/\xc0dir\xc1")
    for name in names:
        write_file(m + b"/" + name, name * 3)
        write_file(m + b"/\xc0dir\xc1/" + name, name)
    assert sorted(os.listdir(m)) == sorted(names + [b"\xc0dir\xc1"])
    assert sorted(os.listdir(m + b"/\xc0dir\xc1")) == sorted(names)
    for name in names:
        assert read_file(m + b"/" + name) == name * 3
    # str paths with surrogate escapes are the same names
    assert sorted(os.fsencode(n) for n in os.listdir(os.fsdecode(m))) == sorted(
        names + [b"\xc0dir\xc1"]
    )
    os.rename(m + b"/\xff\xfe", m + b"/\xfe\xff")
    os.symlink(b"\xc0dir\xc1/caf\xe9", m + b"/ln\xff")
    assert os.readlink(m + b"/ln\xff") == b"\xc0dir\xc1/caf\xe9"
    assert read_file(m + b"/ln\xff") == b"caf\xe9"
    mounted.remount()
    expected = sorted(
        [n for n in names if n != b"\xff\xfe"] + [b"\xfe\xff", b"\xc0dir\xc1", b"ln\xff"]
    )
    assert sorted(os.listdir(m)) == expected
    assert read_file(m + b"/\xfe\xff") == b"\xff\xfe" * 3


# -- permissions (default_permissions: the kernel checks) -------------------------------------


def test_permissions_enforced_for_other_users(mounted_shared: CasfsMount):
    m = mounted_shared.mnt
    os.mkdir(m / "private", 0o700)
    write_file(m / "private" / "secret", b"s3cret", 0o644)
    os.mkdir(m / "public", 0o755)
    write_file(m / "public" / "readme", b"hello", 0o644)
    write_file(m / "public" / "rootonly", b"no", 0o600)
    os.mkdir(m / "writable")
    os.chmod(m / "writable", 0o777)  # not through mkdir: the umask would take bits away
    got = as_nobody(
        m,
        """
probe("list_private", os.listdir, "private")
probe("stat_secret", os.stat, "private/secret")
probe("read_secret", read, "private/secret")
probe("list_public", os.listdir, "public")
probe("read_readme", read, "public/readme")
probe("write_readme", write, "public/readme")
probe("read_rootonly", read, "public/rootonly")
probe("create_in_public", write, "public/new")
probe("mkdir_in_root", os.mkdir, "newdir")
probe("chmod_readme", os.chmod, "public/readme", 0o666)
probe("create_in_writable", write, "writable/mine")
probe("unlink_readme", os.unlink, "public/readme")
print(json.dumps(out))
""",
    )
    assert got == {
        "list_private": errno.EACCES,
        "stat_secret": errno.EACCES,
        "read_secret": errno.EACCES,
        "list_public": 0,
        "read_readme": 0,
        "write_readme": errno.EACCES,
        "read_rootonly": errno.EACCES,
        "create_in_public": errno.EACCES,
        "mkdir_in_root": errno.EACCES,
        "chmod_readme": errno.EPERM,
        "create_in_writable": 0,
        "unlink_readme": errno.EACCES,
    }
    st = os.stat(m / "writable" / "mine")
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert read_file(m / "private" / "secret") == b"s3cret"  # root is not refused
    assert read_file(m / "public" / "readme") == b"hello"


def test_setgid_directory(mounted: CasfsMount):
    m = mounted.mnt
    d = m / "shared"
    os.mkdir(d)
    os.chown(d, -1, 4242)
    os.chmod(d, 0o2775)
    assert os.stat(d).st_mode & stat.S_ISGID
    write_file(d / "file", b"x")
    os.mkdir(d / "sub")
    os.mkfifo(d / "fifo")
    os.symlink("file", d / "link")
    assert os.stat(d / "file").st_gid == 4242
    assert not os.stat(d / "file").st_mode & stat.S_ISGID
    sub = os.stat(d / "sub")
    assert sub.st_gid == 4242 and sub.st_mode & stat.S_ISGID
    assert os.stat(d / "fifo").st_gid == 4242
    assert os.lstat(d / "link").st_gid == 4242
    write_file(d / "sub" / "deeper", b"y")  # inherited down the tree
    assert os.stat(d / "sub" / "deeper").st_gid == 4242
    write_file(m / "plain", b"z")  # outside: the creator's group
    assert os.stat(m / "plain").st_gid == os.getgid()


def test_sticky_directory(mounted_shared: CasfsMount):
    m = mounted_shared.mnt
    t = m / "tmp"
    os.mkdir(t)
    os.chmod(t, 0o1777)
    write_file(t / "rootfile", b"root's")
    os.chmod(t / "rootfile", 0o666)
    got = as_nobody(
        m,
        """
probe("unlink_root_file", os.unlink, "tmp/rootfile")
probe("rename_root_file", os.rename, "tmp/rootfile", "tmp/stolen")
probe("write_root_file", write, "tmp/rootfile")
probe("create_own", write, "tmp/mine")
probe("rename_own", os.rename, "tmp/mine", "tmp/mine2")
probe("unlink_own", os.unlink, "tmp/mine2")
print(json.dumps(out))
""",
    )
    assert got == {
        "unlink_root_file": errno.EPERM,
        "rename_root_file": errno.EPERM,
        "write_root_file": 0,  # mode 0666: writing is allowed, deleting is not
        "create_own": 0,
        "rename_own": 0,
        "unlink_own": 0,
    }
    assert sorted(os.listdir(t)) == ["rootfile"]
    os.unlink(t / "rootfile")  # root may


# -- timestamps -------------------------------------------------------------------------------


def test_timestamps(mounted: CasfsMount):
    m = mounted.mnt
    p = m / "f"
    write_file(p, b"first")
    st0 = os.stat(p)
    dir0 = os.stat(m)
    time.sleep(0.05)

    with open(p, "ab") as f:
        f.write(b" second")
    st1 = os.stat(p)
    assert st1.st_mtime_ns > st0.st_mtime_ns
    assert st1.st_ctime_ns > st0.st_ctime_ns
    time.sleep(0.05)

    os.chmod(p, 0o600)
    st2 = os.stat(p)
    assert st2.st_ctime_ns > st1.st_ctime_ns
    assert st2.st_mtime_ns == st1.st_mtime_ns

    exact = 1_234_567_890_123_456_789
    os.utime(p, ns=(exact - 1000, exact))
    st3 = os.stat(p)
    assert st3.st_mtime_ns == exact and st3.st_atime_ns == exact - 1000
    assert st3.st_ctime_ns >= st2.st_ctime_ns

    # a time in the future: ctime stays "now"
    future = time.time_ns() + 10**12
    os.utime(p, ns=(future, future))
    st4 = os.stat(p)
    assert st4.st_mtime_ns == future
    assert st4.st_ctime_ns <= time.time_ns()

    # cp -p / tar / rsync: write, then set the times while the data may still be buffered
    q = m / "copied"
    with open(q, "wb") as f:
        f.write(b"data " * 1000)
        f.flush()
        os.utime(f.fileno(), ns=(exact, exact))
        assert os.fstat(f.fileno()).st_mtime_ns == exact
    assert os.stat(q).st_mtime_ns == exact
    # ... and right after close, while the release may still be storing the data
    big = random.Random(8).randbytes(8 * MiB)
    for i in range(3):
        write_file(m / f"copied{i}", big)
        os.utime(m / f"copied{i}", ns=(exact + i, exact + i))
        assert os.stat(m / f"copied{i}").st_mtime_ns == exact + i
    time.sleep(1.5)  # past the flush timer
    assert os.stat(q).st_mtime_ns == exact
    for i in range(3):
        assert os.stat(m / f"copied{i}").st_mtime_ns == exact + i
        os.unlink(m / f"copied{i}")

    # the directory's mtime and ctime follow entries added and removed
    dir1 = os.stat(m)
    assert dir1.st_mtime_ns > dir0.st_mtime_ns and dir1.st_ctime_ns > dir0.st_ctime_ns
    time.sleep(0.05)
    os.unlink(q)
    assert os.stat(m).st_mtime_ns > dir1.st_mtime_ns

    before = {n: os.stat(m / n) for n in os.listdir(m)}
    mounted.remount()
    for n, st in before.items():
        again = os.stat(m / n)
        assert (again.st_mtime_ns, again.st_ctime_ns, again.st_atime_ns) == (
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_atime_ns,
        ), n
    assert os.stat(p).st_mtime_ns == future


# -- durability -------------------------------------------------------------------------------


def test_fsync_durability(mounted: CasfsMount):
    m = mounted.mnt
    rng = random.Random(6)
    files = {f"f{i}": rng.randbytes(rng.randrange(0, 2 * MiB)) for i in range(8)}
    os.mkdir(m / "sub")
    for name, data in files.items():
        fd = os.open(m / "sub" / name, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
    expected = {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}

    mounted.remount()
    assert {n: sha256_file(m / "sub" / n) for n in files} == expected

    # now without a clean unmount: fsync'ed data survives a killed daemon
    for name in ("g1", "g2"):
        data = rng.randbytes(MiB + 17)
        fd = os.open(m / "sub" / name, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
        expected[name] = hashlib.sha256(data).hexdigest()
    os.truncate(m / "sub" / "f0", 0)
    fd = os.open(m / "sub" / "f0", os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    expected["f0"] = hashlib.sha256(b"").hexdigest()
    mounted.crash()
    mounted.mount()
    assert {n: sha256_file(m / "sub" / n) for n in expected} == expected


def _build_tree(root: Path, seed: int) -> None:
    """A reproducible tree with every kind of thing casfs stores."""
    rng = random.Random(seed)
    root = Path(root)
    (root / "docs" / "deep" / "er").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "bin").mkdir(mode=0o750)
    text = b"".join(b"line %d of some compressible text\n" % i for i in range(60000))
    blobs = {
        "docs/empty.txt": b"",
        "docs/one": b"1",
        "docs/page": rng.randbytes(4095),
        "docs/chunky": rng.randbytes(65536 + 7),
        "docs/deep/big.bin": rng.randbytes(3 * MiB + 5),
        "docs/deep/text.txt": text,
        "docs/deep/er/text-copy.txt": text,  # dedup
        "bin/tool": rng.randbytes(20000),
    }
    for rel, data in blobs.items():
        write_file(root / rel, data)
    os.chmod(root / "bin" / "tool", 0o4755)
    os.chmod(root / "docs" / "page", 0o600)
    os.chmod(root / "empty", 0o1777)
    with open(root / "docs" / "sparse", "wb") as f:
        f.truncate(100 * MiB)
        f.seek(50 * MiB)
        f.write(rng.randbytes(10000))
    os.link(root / "docs" / "chunky", root / "bin" / "chunky-link")
    os.link(root / "docs" / "chunky", root / "docs" / "deep" / "er" / "chunky-link2")
    os.symlink("../docs/deep/text.txt", root / "bin" / "text-link")
    os.symlink("/nonexistent/target", root / "dangling")
    os.mkfifo(root / "docs" / "pipe")
    os.setxattr(root / "docs" / "one", "user.color", b"blue")
    os.setxattr(root / "docs" / "deep", "user.dir", rng.randbytes(300))
    write_file(os.fsencode(root) + b"/docs/na\xefve-\xff", b"latin-1 name")
    for i in range(50):
        write_file(root / "docs" / f"small-{i:02d}", rng.randbytes(rng.randrange(0, 3000)))
    os.utime(root / "docs" / "one", ns=(1_000_000_123, 2_000_000_456))


def test_persistence_across_remount(mounted: CasfsMount, tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    _build_tree(ref, 7)
    _build_tree(mounted.mnt, 7)
    assert_same_tree(ref, mounted.mnt)
    times_before = {
        rel: (st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for rel, st in _lstats(mounted.mnt).items()
    }
    digest_before = tree_digest(mounted.mnt)

    mounted.umount()
    r = mounted.fsck("--verify-data")
    assert r.returncode == 0, r.stdout + r.stderr
    mounted.mount()
    assert tree_digest(mounted.mnt) == digest_before
    assert_same_tree(ref, mounted.mnt)
    times_after = {
        rel: (st.st_mtime_ns, st.st_ctime_ns, st.st_ino) for rel, st in _lstats(mounted.mnt).items()
    }
    assert times_after == times_before
    assert os.stat(mounted.mnt / "docs" / "one").st_mtime_ns == 2_000_000_456
    # a copy made by the standard tools from the mount is the same tree again
    r = subprocess.run(["cp", "-a", f"{mounted.mnt}/.", str(tmp_path / "copy")])
    assert r.returncode == 0
    assert_same_tree(ref, tmp_path / "copy")


def _lstats(root: Path) -> dict[bytes, os.stat_result]:
    root_b = os.fsencode(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root_b):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root_b)] = os.lstat(path)
    return out


@pytest.mark.parametrize("how", ["SIGTERM", "SIGINT", "fusermount3"])
def test_daemon_stops_cleanly_on_signal_or_external_unmount(mounted: CasfsMount, how: str):
    """Buffered writes are stored and committed however the daemon is asked to stop."""
    data = random.Random(9).randbytes(3 * MiB)
    write_file(mounted.mnt / "unsynced", data)  # no fsync: still buffered or uncommitted
    pid = mounted.pid
    assert pid is not None
    if how == "fusermount3":
        subprocess.run(["fusermount3", "-u", str(mounted.mnt)], check=True)
    else:
        os.kill(pid, getattr(signal, how))
    assert wait_gone(pid), f"daemon {pid} did not exit after {how}"
    assert not is_mounted(mounted.mnt)
    mounted.pid = None
    mounted.assert_fsck_clean()
    if how == "fusermount3":
        # Known and harmless: the release of the file, still storing it when the unmount
        # came, answers a kernel that no longer waits, and pyfuse3 logs that as an error.
        errors = [
            line
            for line in mounted.log_text().splitlines()
            if " ERROR " in line and "fuse_release(): fuse_reply_* failed" not in line
        ]
        assert not errors, errors
        mounted.check_log = False
    mounted.mount()
    assert read_file(mounted.mnt / "unsynced") == data


@pytest.mark.parametrize("busy", [False, True])
def test_umount_while_busy(mounted: CasfsMount, busy: bool):
    """``casfs umount`` refuses a busy mount with one clear line and leaves it working."""
    write_file(mounted.mnt / "f", b"data")
    if not busy:
        mounted.umount()
        mounted.mount()
        assert read_file(mounted.mnt / "f") == b"data"
        return
    with open(mounted.mnt / "f", "rb") as f:
        r = casfs_cli("umount", mounted.mnt)
        assert r.returncode != 0 and "busy" in r.stderr and len(r.stderr.splitlines()) == 1
        assert f.read() == b"data"
    assert read_file(mounted.mnt / "f") == b"data"
