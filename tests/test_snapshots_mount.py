"""Snapshots through a real mount: the read-only ``MOUNT/.snap`` view, ``mkdir``/``rmdir`` in
it, and ``casfs snapshot``/``diff``/``rollback``/``restore`` run as a user runs them, against
the mountpoint, against the store while it is mounted (routed through the mount's control
socket) and against the store offline. Every check goes through the kernel; each test ends
with ``casfs umount`` and a clean ``casfs fsck`` (see ``casfs_mount`` in conftest.py)."""

from __future__ import annotations

import errno
import json
import os
import random
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import (
    CasfsMount,
    assert_same_tree,
    casfs_cli,
    errno_of,
    poll,
    pread_all,
    read_file,
    renameat2,
    tree_digest,
    write_all,
    write_file,
)

KiB, MiB = 1 << 10, 1 << 20
PACK_SLACK = 16 * KiB  # space of freed small objects returns by pack (casfs.store.packs)
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2


# -- helpers ----------------------------------------------------------------------------------


def cli_ok(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    """``casfs ARGS`` must succeed, quietly."""
    r = casfs_cli(*args)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.returncode == 0, f"casfs {' '.join(map(str, args))}: {r.stderr.strip()}"
    assert r.stderr == "", r.stderr
    return r


def assert_one_line_error(r: subprocess.CompletedProcess, fragment: str = "") -> str:
    assert r.returncode != 0, f"expected a failure, got: {r.stdout!r}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("casfs "), lines[0]
    assert fragment in lines[0], lines[0]
    assert r.stdout == "", r.stdout
    return lines[0]


def cli_many(*commands: tuple) -> list[subprocess.CompletedProcess]:
    """Run several ``casfs`` commands at once (they are slow to start), in order of results.
    Only for commands that may run concurrently (e.g. ones that all fail)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "casfs_cli.main", *map(str, cmd)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for cmd in commands
    ]
    out = []
    for cmd, p in zip(commands, procs, strict=True):
        stdout, stderr = p.communicate(timeout=120)
        out.append(subprocess.CompletedProcess(list(cmd), p.returncode, stdout, stderr))
    return out


def snapshot_rows(target: os.PathLike | str) -> dict[str, dict]:
    rows = json.loads(cli_ok("snapshot", target, "--json").stdout)
    return {row["name"]: row for row in rows}


def diff_lines(target: os.PathLike | str, old: str, new: str) -> list[str]:
    return cli_ok("diff", target, old, new).stdout.splitlines()


def log_records(m: CasfsMount) -> list[str]:
    """The daemon log as records: a timestamped line and its continuation lines."""
    records: list[str] = []
    for line in m.log_text().splitlines():
        if re.match(r"\d{4}-\d\d-\d\d ", line) or not records:
            records.append(line)
        else:
            records[-1] += "\n" + line
    return records


def log_problems(m: CasfsMount) -> list[str]:
    bad = []
    for rec in log_records(m):
        head = rec.split("\n", 1)[0]
        if " ERROR " in head or " CRITICAL " in head or "Traceback" in rec:
            bad.append(rec)
    return bad


def umount_and_check_log(m: CasfsMount) -> None:
    """For tests that set ``check_log = False`` to check the log in the test body (a failure
    there is the test's, not its teardown's): unmount (everything is flushed and logged),
    then no error and no traceback may be in the log."""
    m.umount()
    bad = log_problems(m)
    assert not bad, "the daemon logged errors:\n" + "\n".join(bad[:10])


def digest_without_nlink(root: Path) -> dict[bytes, tuple]:
    return {rel: (mode, content, xattrs) for rel, (mode, content, xattrs, _, _) in
            tree_digest(root).items()}  # fmt: skip


def lstats(root: Path) -> dict[bytes, os.stat_result]:
    root_b = os.fsencode(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root_b):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root_b)] = os.lstat(path)
    return out


RICH_BIG = random.Random(20).randbytes(5 * MiB)
RICH_DEEP = random.Random(21).randbytes(300 * KiB + 7)


def build_rich_tree(root: Path) -> None:
    """Nested directories, a hard-link pair across directories, symlinks, a fifo, user
    xattrs on a file and a directory, a sparse file, a 5 MiB random file, odd names."""
    os.makedirs(root / "a" / "b" / "c")
    os.mkdir(root / "empty")
    write_file(root / "a" / "file1", b"first file\n")
    os.setxattr(root / "a" / "file1", "user.k", b"value")
    os.setxattr(root / "a" / "file1", "user.bin", b"\0\xff\0")
    os.setxattr(root / "a", "user.dir", b"on a directory")
    write_file(root / "a" / "b" / "c" / "deep", RICH_DEEP, 0o600)
    write_file(root / "a" / "hl1", b"hard-linked content")
    os.link(root / "a" / "hl1", root / "a" / "b" / "hl2")
    os.symlink("a/file1", root / "link")
    os.symlink("nowhere", root / "dangling")
    os.mkfifo(root / "a" / "fifo", 0o640)
    with open(root / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(8 * MiB)  # past the end, then write: a hole in between
        f.write(b"tail")
    write_file(root / "big", RICH_BIG)
    write_file(root / "space name é", b"utf-8 name")
    os.chmod(root / "a" / "b", 0o750)


# -- 1. create, list, delete ------------------------------------------------------------------


def test_create_list_and_delete_snapshots(mounted: CasfsMount):
    m = mounted.mnt
    snap = m / ".snap"
    write_file(m / "f1", b"12345")
    os.mkdir(m / "d")
    write_file(m / "d" / "f2", b"abc")

    # .snap is hidden like ZFS snapdir=hidden, but reachable by name
    assert sorted(os.listdir(m)) == ["d", "f1"]
    ls = subprocess.run(["ls", "-a", str(m)], capture_output=True, text=True, check=True)
    assert ".snap" not in ls.stdout.split()
    st = os.stat(snap)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o555
    assert st.st_dev == os.stat(m).st_dev
    assert os.stat(snap / "..").st_ino == os.stat(m).st_ino
    assert os.listdir(snap) == []
    assert cli_ok("snapshot", m).stdout == "no snapshots\n"
    assert json.loads(cli_ok("snapshot", m, "--json").stdout) == []

    t0 = time.time_ns()
    os.mkdir(snap / "one")  # mkdir takes a snapshot
    r = cli_ok("snapshot", m, "two")
    t1 = time.time_ns()
    assert re.fullmatch(r"created snapshot two: 2 files, 8 B, in \d+\.\d\d s\n", r.stdout), r.stdout
    info = json.loads(cli_ok("snapshot", m, "three", "--json").stdout)
    assert info["name"] == "three" and info["files"] == 2 and info["logical_bytes"] == 8
    assert sorted(os.listdir(snap)) == ["one", "three", "two"]
    ls = subprocess.run(["ls", str(snap)], capture_output=True, text=True, check=True)
    assert ls.stdout.split() == ["one", "three", "two"]
    assert sorted(os.listdir(m)) == ["d", "f1"]
    for name in ("one", "two", "three"):
        assert read_file(snap / name / "f1") == b"12345"
        assert read_file(snap / name / "d" / "f2") == b"abc"

    rows = json.loads(cli_ok("snapshot", m, "--json").stdout)
    assert [r["name"] for r in rows] == ["one", "two", "three"]  # oldest first
    for row in rows:
        assert {"name", "created_ns", "files", "logical_bytes", "exclusive_bytes"} <= row.keys()
        assert row["files"] == 2 and row["logical_bytes"] == 8
        assert row["exclusive_bytes"] == 0  # everything is shared with the live tree
    assert t0 <= rows[0]["created_ns"] <= rows[1]["created_ns"] <= t1
    assert rows[1]["created_ns"] <= rows[2]["created_ns"] <= time.time_ns()
    table = cli_ok("snapshot", m).stdout.splitlines()
    assert table[0].split() == ["NAME", "CREATED", "FILES", "LOGICAL", "ONLY", "HERE"]
    assert [line.split()[0] for line in table[1:]] == ["one", "two", "three"]

    # a snapshot holds its own bytes once the live tree moves on
    write_file(m / "f1", bytes(200 * KiB))
    os.unlink(m / "d" / "f2")
    assert read_file(snap / "one" / "f1") == b"12345"
    assert read_file(snap / "two" / "d" / "f2") == b"abc"

    old_ino = os.stat(snap / "one").st_ino
    os.rmdir(snap / "one")  # rmdir deletes
    assert not os.path.exists(snap / "one")
    assert sorted(os.listdir(snap)) == ["three", "two"]
    assert list(snapshot_rows(m)) == ["two", "three"]
    assert cli_ok("snapshot", "-d", m, "two").stdout == "deleted snapshot two\n"
    assert not os.path.exists(snap / "two")
    info = json.loads(cli_ok("snapshot", "-d", m, "three", "--json").stdout)
    assert info["name"] == "three"
    assert os.listdir(snap) == [] and not os.path.exists(snap / "three")
    assert cli_ok("snapshot", m).stdout == "no snapshots\n"

    os.mkdir(snap / "one")  # the same name again is a new snapshot: ids are never reused
    assert os.stat(snap / "one").st_ino != old_ino
    assert read_file(snap / "one" / "f1") == bytes(200 * KiB)
    assert sorted(os.listdir(m)) == ["d", "f1"]


# -- 2. content ---------------------------------------------------------------------------------


def test_snapshot_content_equals_live_tree_and_never_changes(mounted: CasfsMount, tmp_path):
    m = mounted.mnt
    expected = tmp_path / "expected"
    expected.mkdir()
    build_rich_tree(expected)
    build_rich_tree(m)
    os.setxattr(m, "user.root", b"root xattr")
    assert_same_tree(expected, m)
    live_before = lstats(m)
    root_before = os.stat(m)

    cli_ok("snapshot", m, "cli")
    os.mkdir(m / ".snap" / "mkdir")
    for name in ("cli", "mkdir"):
        s = m / ".snap" / name
        assert_same_tree(expected, s)
        st = os.stat(s)  # the root directory's own attributes and xattrs
        assert (st.st_mode, st.st_uid, st.st_gid) == (
            root_before.st_mode,
            root_before.st_uid,
            root_before.st_gid,
        )
        assert os.getxattr(s, "user.root") == b"root xattr"
        for rel, lst in lstats(s).items():  # times and sizes as they were
            live = live_before[rel]
            assert lst.st_mtime_ns == live.st_mtime_ns, rel
            assert (lst.st_uid, lst.st_gid) == (live.st_uid, live.st_gid), rel
            if stat.S_ISREG(lst.st_mode) or stat.S_ISLNK(lst.st_mode):
                assert lst.st_size == live.st_size, rel
            if stat.S_ISREG(lst.st_mode):
                assert lst.st_blocks == live.st_blocks, rel
    sparse = os.stat(m / ".snap" / "cli" / "sparse")
    assert sparse.st_size == 8 * MiB + 4 and sparse.st_blocks * 512 <= 64 * KiB
    with open(m / ".snap" / "cli" / "sparse", "rb") as f:
        f.seek(4 * MiB)
        assert f.read(16) == bytes(16)

    # change everything in the live tree; the snapshots stay as they were
    write_file(m / "a" / "file1", b"changed")
    with open(m / "big", "r+b") as f:
        f.seek(MiB)
        f.write(b"X" * 100)
        f.seek(0, os.SEEK_END)
        f.write(b"appended")
    os.unlink(m / "a" / "hl1")
    with open(m / "a" / "b" / "hl2", "ab") as f:
        f.write(b" + more")
    os.rmdir(m / "empty")
    os.setxattr(m / "a" / "file1", "user.k", b"new value")
    os.removexattr(m / "a", "user.dir")
    os.chmod(m / "a" / "b" / "c" / "deep", 0o644)
    os.truncate(m / "sparse", 10)
    os.rename(m / "a" / "b", m / "b_moved")
    os.unlink(m / "link")
    os.symlink("big", m / "link")
    write_file(m / "new", b"new file")
    os.setxattr(m, "user.root", b"changed")
    os.chmod(m, 0o700)
    for name in ("cli", "mkdir"):
        assert_same_tree(expected, m / ".snap" / name)
        assert os.getxattr(m / ".snap" / name, "user.root") == b"root xattr"
        assert stat.S_IMODE(os.stat(m / ".snap" / name).st_mode) == 0o755
    assert tree_digest(m) != tree_digest(expected)
    mounted.remount()  # and after a remount
    assert_same_tree(expected, m / ".snap" / "cli")
    assert_same_tree(expected, m / ".snap" / "mkdir")


# -- 3. read-only ---------------------------------------------------------------------------


def test_snapshots_are_read_only(mounted: CasfsMount):
    m = mounted.mnt
    os.mkdir(m / "d")
    os.mkdir(m / "e")
    write_file(m / "a", b"content")
    write_file(m / "d" / "inner", b"in d")
    os.setxattr(m / "a", "user.x", b"1")
    os.setxattr(m, "user.rootx", b"r")
    os.symlink("a", m / "sl")
    cli_ok("snapshot", m, "ro")
    S = m / ".snap" / "ro"
    snap_before = tree_digest(S)
    snap_st = os.stat(S)
    live_before = tree_digest(m)

    def open_close(path, flags, mode=0o644):
        os.close(os.open(path, flags, mode))

    probes = {
        "open O_WRONLY": lambda: open_close(S / "a", os.O_WRONLY),
        "open O_RDWR": lambda: open_close(S / "a", os.O_RDWR),
        "open O_APPEND": lambda: open_close(S / "a", os.O_WRONLY | os.O_APPEND),
        "open O_RDONLY|O_TRUNC": lambda: open_close(S / "a", os.O_RDONLY | os.O_TRUNC),
        "open O_WRONLY|O_TRUNC": lambda: open_close(S / "a", os.O_WRONLY | os.O_TRUNC),
        "truncate": lambda: os.truncate(S / "a", 0),
        "create": lambda: open_close(S / "new", os.O_WRONLY | os.O_CREAT),
        "create in subdir": lambda: open_close(S / "d" / "new", os.O_WRONLY | os.O_CREAT),
        "O_CREAT of existing": lambda: open_close(S / "a", os.O_WRONLY | os.O_CREAT),
        "mkdir": lambda: os.mkdir(S / "newdir"),
        "mkdir in subdir": lambda: os.mkdir(S / "d" / "newdir"),
        "unlink": lambda: os.unlink(S / "a"),
        "unlink in subdir": lambda: os.unlink(S / "d" / "inner"),
        "unlink symlink": lambda: os.unlink(S / "sl"),
        "rmdir empty": lambda: os.rmdir(S / "e"),
        "rename within": lambda: os.rename(S / "a", S / "a2"),
        "rename within to subdir": lambda: os.rename(S / "a", S / "d" / "a2"),
        "rename out of": lambda: os.rename(S / "a", m / "a_out"),
        "rename dir out of": lambda: os.rename(S / "d", m / "d_out"),
        "rename into": lambda: os.rename(m / "a", S / "a_in"),
        "rename into, replacing": lambda: os.rename(m / "a", S / "d" / "inner"),
        "exchange with live": lambda: renameat2(m / "a", S / "a", RENAME_EXCHANGE),
        "rename snapshot root in .snap": lambda: os.rename(S, m / ".snap" / "renamed"),
        "rename snapshot root out": lambda: os.rename(S, m / "out"),
        "chmod": lambda: os.chmod(S / "a", 0o600),
        "chmod dir": lambda: os.chmod(S / "d", 0o700),
        "chown": lambda: os.chown(S / "a", 1, 1),
        "lchown symlink": lambda: os.chown(S / "sl", 1, 1, follow_symlinks=False),
        "utime": lambda: os.utime(S / "a", (1, 1)),
        "utime now": lambda: os.utime(S / "a"),
        "setxattr new": lambda: os.setxattr(S / "a", "user.new", b"v"),
        "setxattr replace": lambda: os.setxattr(S / "a", "user.x", b"v"),
        "removexattr": lambda: os.removexattr(S / "a", "user.x"),
        "link within": lambda: os.link(S / "a", S / "a_link"),
        "link out of": lambda: os.link(S / "a", m / "a_link"),
        "link into": lambda: os.link(m / "a", S / "a_link"),
        "symlink": lambda: os.symlink("a", S / "sl2"),
        "mkfifo": lambda: os.mkfifo(S / "fifo"),
        "mknod socket": lambda: os.mknod(S / "sock", stat.S_IFSOCK | 0o600),
        # the snapshot's root directory itself
        "root chmod": lambda: os.chmod(S, 0o700),
        "root chown": lambda: os.chown(S, 1, 1),
        "root utime": lambda: os.utime(S, (1, 1)),
        "root setxattr": lambda: os.setxattr(S, "user.y", b"v"),
        "root removexattr": lambda: os.removexattr(S, "user.rootx"),
        # .snap itself
        ".snap chmod": lambda: os.chmod(m / ".snap", 0o755),
        ".snap utime": lambda: os.utime(m / ".snap"),
        ".snap setxattr": lambda: os.setxattr(m / ".snap", "user.y", b"v"),
        ".snap create file": lambda: open_close(m / ".snap" / "f", os.O_WRONLY | os.O_CREAT),
        ".snap symlink": lambda: os.symlink("x", m / ".snap" / "sl"),
        ".snap mkfifo": lambda: os.mkfifo(m / ".snap" / "fifo"),
        ".snap link into": lambda: os.link(m / "a", m / ".snap" / "a"),
        ".snap rename into": lambda: os.rename(m / "d", m / ".snap" / "d"),
    }
    got = {label: errno_of(fn) for label, fn in probes.items()}
    wrong = {k: errno.errorcode.get(v, v) for k, v in got.items() if v != errno.EROFS}
    assert not wrong, f"expected EROFS, got: {wrong}"

    # what the kernel answers itself, and the special rules for the name .snap
    expect = {
        "O_CREAT|O_EXCL of existing": (
            lambda: open_close(S / "a", os.O_WRONLY | os.O_CREAT | os.O_EXCL),
            errno.EEXIST,
        ),
        "unlink of a snapshot": (lambda: os.unlink(m / ".snap" / "ro"), errno.EISDIR),
        "rmdir .snap": (lambda: os.rmdir(m / ".snap"), errno.EBUSY),
        "rename .snap": (lambda: os.rename(m / ".snap", m / "snap2"), errno.EBUSY),
        "rename .snap into a dir": (lambda: os.rename(m / ".snap", m / "d" / "s"), errno.EBUSY),
        "exchange .snap": (lambda: renameat2(m / ".snap", m / "e", RENAME_EXCHANGE), errno.EBUSY),
        "exchange onto .snap": (
            lambda: renameat2(m / "e", m / ".snap", RENAME_EXCHANGE),
            errno.EBUSY,
        ),
        "mkdir .snap": (lambda: os.mkdir(m / ".snap"), errno.EEXIST),
        "create .snap O_EXCL": (
            lambda: open_close(m / ".snap", os.O_WRONLY | os.O_CREAT | os.O_EXCL),
            errno.EEXIST,
        ),
        "create .snap": (lambda: open_close(m / ".snap", os.O_WRONLY | os.O_CREAT), errno.EISDIR),
        "symlink .snap": (lambda: os.symlink("x", m / ".snap"), errno.EEXIST),
        "mkfifo .snap": (lambda: os.mkfifo(m / ".snap"), errno.EEXIST),
        "link .snap": (lambda: os.link(m / "a", m / ".snap"), errno.EEXIST),
        "unlink .snap": (lambda: os.unlink(m / ".snap"), errno.EISDIR),
        # a file onto a directory: the kernel's EISDIR comes first
        "rename file onto .snap": (lambda: os.rename(m / "a", m / ".snap"), errno.EISDIR),
        "rename empty dir onto .snap": (lambda: os.rename(m / "e", m / ".snap"), errno.EBUSY),
        "rename dir onto .snap": (lambda: os.rename(m / "d", m / ".snap"), errno.EBUSY),
        "rename NOREPLACE onto .snap": (
            lambda: renameat2(m / "e", m / ".snap", RENAME_NOREPLACE),
            errno.EEXIST,
        ),
    }
    got = {label: errno_of(fn) for label, (fn, _) in expect.items()}
    wrong = {
        k: (errno.errorcode.get(v, v), errno.errorcode[expect[k][1]])
        for k, v in got.items()
        if v != expect[k][1]
    }
    assert not wrong, f"(got, expected): {wrong}"

    # nothing changed, in the snapshot or in the live tree
    assert tree_digest(S) == snap_before
    assert os.stat(S).st_mode == snap_st.st_mode and os.getxattr(S, "user.rootx") == b"r"
    assert os.listdir(m / ".snap") == ["ro"]
    assert tree_digest(m) == live_before
    assert sorted(os.listdir(m)) == ["a", "d", "e", "sl"]
    # reading works
    assert read_file(S / "a") == b"content" and os.getxattr(S / "a", "user.x") == b"1"
    assert os.readlink(S / "sl") == "a" and read_file(S / "sl") == b"content"
    # ".snap" is reserved at the root only
    os.mkdir(m / "d" / ".snap")
    write_file(m / "d" / ".snap" / "x", b"ordinary")
    assert sorted(os.listdir(m / "d")) == [".snap", "inner"]
    os.rename(m / "d" / ".snap", m / "e" / ".snap")
    assert read_file(m / "e" / ".snap" / "x") == b"ordinary"


# -- 4. inode numbers and standard tools -----------------------------------------------------


def test_inode_numbers_du_tar_rsync(mounted: CasfsMount, tmp_path):
    m = mounted.mnt
    big = random.Random(40).randbytes(MiB)
    os.makedirs(m / "d" / "sub")
    write_file(m / "d" / "f", big)
    os.link(m / "d" / "f", m / "d" / "sub" / "g")
    write_file(m / "x", b"small")
    os.setxattr(m / "x", "user.tag", b"t")
    os.symlink("d/f", m / "sl")
    cli_ok("snapshot", m, "s1")
    write_file(m / "x", b"changed")  # f is the same in s1, s2 and the live tree
    cli_ok("snapshot", m, "s2")
    s1, s2 = m / ".snap" / "s1", m / ".snap" / "s2"

    # hard links inside one snapshot: one number, the right link count
    f1, g1 = os.stat(s1 / "d" / "f"), os.stat(s1 / "d" / "sub" / "g")
    assert f1.st_ino == g1.st_ino and f1.st_nlink == g1.st_nlink == 2
    assert os.stat(s1 / "x").st_nlink == 1 and os.stat(s1 / "x").st_ino != f1.st_ino
    # the same file in two snapshots and the live tree: three numbers
    for rel in ("d/f", "x", "d", "sl"):
        inos = {os.lstat(p / rel).st_ino for p in (m, s1, s2)}
        assert len(inos) == 3, (rel, inos)
    assert len({os.stat(p).st_ino for p in (m, m / ".snap", s1, s2)}) == 4
    # one device for everything
    devs = {os.lstat(p).st_dev for p in (m, m / ".snap", s1, s2, s1 / "d" / "f", m / "d" / "f")}
    assert len(devs) == 1
    # readdir's numbers are stat's; ".." leads back up
    with os.scandir(s1 / "d") as it:
        for entry in it:
            assert entry.inode() == os.lstat(entry.path).st_ino, entry.path
    assert os.stat(s1 / "d" / "..").st_ino == os.stat(s1).st_ino
    assert os.stat(s1 / "..").st_ino == os.stat(m / ".snap").st_ino
    assert os.stat(s1 / "d" / "sub" / ".." / "..").st_ino == os.stat(s1).st_ino

    # du counts a hard-linked file once per snapshot, and each snapshot's copy separately
    def du_kib(path: Path) -> int:
        r = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        return int(r.stdout.split()[0])

    assert 1024 <= du_kib(s1) < 1024 + 64
    assert 2048 <= du_kib(m / ".snap") < 2048 + 128

    # tar of all of .snap, extracted elsewhere: the same trees (hard links only within one)
    archive = tmp_path / "snap.tar"
    r = subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=user.*", "-cf", str(archive), "-C"]
        + [str(m / ".snap"), "."],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    out = tmp_path / "untarred"
    out.mkdir()
    r = subprocess.run(
        ["tar", "--xattrs", "--xattrs-include=user.*", "-xf", str(archive), "-C", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert_same_tree(m / ".snap", out)
    r = subprocess.run(["tar", "-cf", "-", "-C", str(m / ".snap"), "."], capture_output=True)
    assert r.returncode == 0 and r.stderr == b"" and len(r.stdout) > 2 * MiB

    # rsync -aH (and -X for the xattrs): one snapshot, and all of .snap
    dest = tmp_path / "rsynced"
    r = subprocess.run(
        ["rsync", "-aHX", f"{s1}/", f"{dest}/"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert_same_tree(s1, dest)
    assert os.stat(dest / "d" / "f").st_ino == os.stat(dest / "d" / "sub" / "g").st_ino
    dest_all = tmp_path / "rsynced_all"
    r = subprocess.run(
        ["rsync", "-aHX", f"{m / '.snap'}/", f"{dest_all}/"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert_same_tree(m / ".snap", dest_all)
    assert os.stat(dest_all / "s1" / "d" / "f").st_nlink == 2  # not linked to s2's


# -- 5. one point in time ---------------------------------------------------------------------


def test_snapshot_of_a_file_open_for_writing(mounted: CasfsMount):
    m = mounted.mnt
    first = random.Random(50).randbytes(3 * MiB)
    more = random.Random(51).randbytes(MiB + 123)
    fd = os.open(m / "open.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, first)  # no fsync, no close: still buffered in the daemon
        cli_ok("snapshot", m, "mid")
        write_all(fd, more)
        os.pwrite(fd, b"OVERWRITTEN", 0)
    finally:
        os.close(fd)
    snap_file = m / ".snap" / "mid" / "open.bin"
    assert os.stat(snap_file).st_size == 3 * MiB
    assert read_file(snap_file) == first
    assert read_file(m / "open.bin") == b"OVERWRITTEN" + first[11:] + more
    assert snapshot_rows(m)["mid"]["logical_bytes"] == 3 * MiB


def test_snapshot_during_concurrent_writes_is_a_prefix(mounted: CasfsMount):
    """A writer appends 64 KiB blocks all along: the snapshot holds every block whose write
    returned before the command started, and nothing torn: a prefix of the final file."""
    m = mounted.mnt
    block = 64 * KiB
    rng = random.Random(52)
    blocks = [rng.randbytes(block) for _ in range(160)]  # 10 MiB
    written = [0]
    go_on = threading.Event()  # the writer pauses after 100 blocks until the snapshot is done
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            fd = os.open(m / "stream", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            try:
                for i, data in enumerate(blocks):
                    write_all(fd, data)
                    written[0] = (i + 1) * block
                    if i > 100:
                        go_on.wait(30)
            finally:
                os.close(fd)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert poll(lambda: written[0] >= 2 * MiB, timeout=30, interval=0.005)
        before = written[0]
        cli_ok("snapshot", m, "during")
        after = written[0]
    finally:
        go_on.set()
        t.join(60)
    assert not errors, errors
    assert not t.is_alive()
    final = b"".join(blocks)
    assert read_file(m / "stream") == final
    got = read_file(m / ".snap" / "during" / "stream")
    assert before <= len(got) <= after + block, (before, len(got), after)
    assert got == final[: len(got)]


# -- 6. deleting a snapshot that is in use ----------------------------------------------------


def test_delete_snapshot_while_a_file_in_it_is_open(mounted: CasfsMount):
    m = mounted.mnt
    data = random.Random(60).randbytes(4 * MiB)
    os.makedirs(m / "dir" / "sub")
    write_file(m / "dir" / "sub" / "data", data)
    cli_ok("snapshot", m, "doomed")
    os.unlink(m / "dir" / "sub" / "data")  # now only the snapshot holds the bytes

    path = m / ".snap" / "doomed" / "dir" / "sub" / "data"
    with open(path, "rb") as f:
        head = f.read(MiB)
        r = cli_ok("snapshot", "-d", m, "doomed")
        assert r.stdout == "deleted snapshot doomed\n"
        assert not os.path.exists(m / ".snap" / "doomed")  # no stale name
        assert not os.path.exists(path)
        assert os.listdir(m / ".snap") == []
        assert "doomed" not in snapshot_rows(m)
        assert_one_line_error(casfs_cli("snapshot", "-d", m, "doomed"), "no snapshot named")
        held = mounted.stats()["stored_bytes"]  # the open file's bytes are pinned
        rest = f.read()
        f.seek(123)
        again = f.read(1000)
        assert os.fstat(f.fileno()).st_size == len(data)
    assert head + rest == data and again == data[123:1123]
    # closed: the mount asks the kernel to forget the name, and the forget frees the bytes
    assert poll(lambda: mounted.stats()["stored_bytes"] <= held - len(data)), (
        held,
        mounted.stats(),
    )

    # the same through rmdir, with a directory of it as a working directory too
    write_file(m / "dir" / "sub" / "data2", data[:MiB])
    os.mkdir(m / ".snap" / "doomed2")
    path = m / ".snap" / "doomed2" / "dir" / "sub" / "data2"
    dfd = os.open(m / ".snap" / "doomed2" / "dir", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with open(path, "rb") as f:
            head = f.read(100)
            os.rmdir(m / ".snap" / "doomed2")
            assert not os.path.exists(m / ".snap" / "doomed2")
            assert os.listdir(m / ".snap") == []
            assert head + f.read() == data[:MiB]
        assert os.listdir(dfd) == ["sub"]  # the directory's content is still the snapshot's
    finally:
        os.close(dfd)
    # a new snapshot of the same name is not the deleted one
    os.unlink(m / "dir" / "sub" / "data2")
    cli_ok("snapshot", m, "doomed")
    assert os.listdir(m / ".snap" / "doomed" / "dir" / "sub") == []
    # pins held when the mount ends (here: the directory that was a working directory)
    # are dropped by the next mount
    mounted.remount()
    assert mounted.stats()["stored_bytes"] <= held - len(data)


# -- 7. space ---------------------------------------------------------------------------------


def test_deleting_a_snapshot_reclaims_its_space_exactly(mounted: CasfsMount):
    m = mounted.mnt
    write_file(m / "keep", b"stays")
    fd = os.open(m / "keep", os.O_RDONLY)
    os.fsync(fd)  # commit, so the offline stats reader sees the starting point
    os.close(fd)
    base = mounted.stats()["stored_bytes"]

    data = random.Random(70).randbytes(20 * MiB)  # incompressible: stored as it is
    fd = os.open(m / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    cli_ok("snapshot", m, "s")
    with_file = mounted.stats()["stored_bytes"]
    assert 20 * MiB <= with_file - base < 20 * MiB + 512 * KiB
    assert snapshot_rows(m)["s"]["exclusive_bytes"] < 64 * KiB  # shared with the live file

    os.unlink(m / "big")  # the snapshot keeps every byte
    assert poll(lambda: snapshot_rows(m)["s"]["exclusive_bytes"] >= 20 * MiB), snapshot_rows(m)
    exclusive = snapshot_rows(m)["s"]["exclusive_bytes"]
    assert exclusive < 20 * MiB + 512 * KiB
    assert mounted.stats()["stored_bytes"] == with_file
    assert read_file(m / ".snap" / "s" / "big") == data

    cli_ok("snapshot", "-d", m, "s")
    # What the kernel still held of it (we read it) is freed at its forget: poll. Small
    # objects share packs, whose space returns by pack, so exact to within PACK_SLACK.
    assert poll(lambda: mounted.stats()["stored_bytes"] <= with_file - exclusive + PACK_SLACK), (
        with_file,
        exclusive,
        mounted.stats(),
    )
    after = mounted.stats()["stored_bytes"]
    assert abs(after - (with_file - exclusive)) <= PACK_SLACK, (with_file, after, exclusive)
    assert base <= after <= base + 64 * KiB, (base, after)
    assert read_file(m / "keep") == b"stays"


# -- 8. diff ----------------------------------------------------------------------------------


def diff_parallel(target: os.PathLike | str, *pairs: tuple[str, ...]) -> list[list[str]]:
    """Several ``casfs diff TARGET OLD NEW [--json]`` at once; their output lines."""
    results = cli_many(*(("diff", target, *pair) for pair in pairs))
    for pair, r in zip(pairs, results, strict=True):
        assert r.returncode == 0 and r.stderr == "", (pair, r.stderr)
    return [r.stdout.splitlines() for r in results]


def test_diff_through_the_mount(mounted: CasfsMount):
    m = mounted.mnt
    os.makedirs(m / "keep" / "sub")
    os.makedirs(m / "gone" / "inner")
    write_file(m / "keep" / "f", b"1")
    write_file(m / "keep" / "sub" / "g", b"2")
    write_file(m / "gone" / "inner" / "h", b"3")
    write_file(m / "mod", b"m")
    write_file(m / "meta", b"md")
    write_file(m / "tc", b"file, then a directory")
    os.symlink("x", m / "lnk")
    os.mkdir(m / ".snap" / "a")

    write_file(m / "mod", b"changed")
    os.chmod(m / "meta", 0o600)
    subprocess.run(["rm", "-r", str(m / "gone")], check=True)
    os.makedirs(m / "new" / "deep")
    write_file(m / "new" / "deep" / "n", b"n")
    write_file(m / "keep" / "sub" / "added", b"t")
    os.unlink(m / "lnk")
    os.symlink("y", m / "lnk")
    os.setxattr(m / "keep", "user.x", b"1")
    os.unlink(m / "tc")
    os.mkdir(m / "tc")
    write_file(m / "tc" / "child", b"c")
    os.mkdir(m / ".snap" / "b")

    forward = [
        "- /gone/",
        "- /gone/inner/",
        "- /gone/inner/h",
        "m /keep/",
        "+ /keep/sub/added",
        "M /lnk",
        "m /meta",
        "M /mod",
        "+ /new/",
        "+ /new/deep/",
        "+ /new/deep/n",
        "- /tc",
        "+ /tc/",
        "+ /tc/child",
    ]
    a_b, b_a, a_a, b_live, live_live, a_b_json = diff_parallel(
        m,
        ("a", "b"),
        ("b", "a"),
        ("a", "a"),
        ("b", "@live"),
        ("@live", "@live"),
        ("a", "b", "--json"),
    )
    assert a_b == forward
    flip = {"+": "-", "-": "+", "M": "M", "m": "m"}
    assert sorted(b_a) == sorted(flip[line[0]] + line[1:] for line in forward)
    assert a_a == b_live == live_live == []
    rows = json.loads("".join(a_b_json))
    marks = {"added": "+", "removed": "-", "modified": "M", "metadata": "m"}
    assert [f"{marks[r['kind']]} {r['path']}{'/' if r['dir'] else ''}" for r in rows] == forward
    assert all(set(r) == {"kind", "path", "dir"} for r in rows)

    # @live sees bytes still buffered in the daemon, and metadata-only changes
    fd = os.open(m / "keep" / "f", os.O_WRONLY | os.O_APPEND)
    fd2 = os.open(m / "livefile", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"more, not yet stored")
        os.write(fd2, b"open")
        os.utime(m / "mod", ns=(10**18, 10**18))
        b_live, live_b, b_live_json = diff_parallel(
            m, ("b", "@live"), ("@live", "b"), ("b", "@live", "--json")
        )
    finally:
        os.close(fd)
        os.close(fd2)
    assert b_live == ["M /keep/f", "+ /livefile", "m /mod"]
    assert live_b == ["M /keep/f", "- /livefile", "m /mod"]
    assert json.loads("".join(b_live_json)) == [
        {"kind": "modified", "path": "/keep/f", "dir": False},
        {"kind": "added", "path": "/livefile", "dir": False},
        {"kind": "metadata", "path": "/mod", "dir": False},
    ]
    # a path with a newline or a non-UTF-8 byte stays on one line; a missing name is an error
    os.mkdir(os.fsencode(m) + b"/odd\n\xff")
    ok, bad = cli_many(("diff", m, "b", "@live"), ("diff", m, "a", "missing"))
    assert ok.stdout.splitlines()[-1] == "+ /odd\\n\\xff/"
    assert_one_line_error(bad, "no snapshot named 'missing'")


# -- 9. rollback ------------------------------------------------------------------------------


def test_rollback_through_the_mount(mounted: CasfsMount):
    m = mounted.mnt
    build_rich_tree(m)
    reader_data = random.Random(90).randbytes(2 * MiB)
    write_file(m / "a" / "b" / "reader", reader_data)
    write_file(m / "root_file", b"root level")
    os.setxattr(m, "user.root", b"at snapshot")
    cli_ok("snapshot", m, "r")
    snap = m / ".snap" / "r"
    root_mode = os.stat(m).st_mode

    # delete, add, modify, move, change metadata
    subprocess.run(["rm", "-r", str(m / "empty"), str(m / "big")], check=True)
    os.unlink(m / "a" / "hl1")
    write_file(m / "a" / "file1", b"modified")
    os.rename(m / "a" / "b" / "c", m / "c_moved")
    os.makedirs(m / "added" / "dir")
    write_file(m / "added" / "dir" / "file", b"added")
    write_file(m / "root_added", b"added at the root")
    os.chmod(m / "a", 0o700)
    os.setxattr(m / "a" / "file1", "user.k", b"other")
    os.chmod(m, 0o750)
    os.setxattr(m, "user.root", b"changed")
    os.setxattr(m, "user.extra", b"added")
    assert tree_digest(m) != tree_digest(snap)

    # files open from before: a reader and a writer in a directory, one at the root, a cwd
    rfd = os.open(m / "a" / "b" / "reader", os.O_RDONLY)
    wfd = os.open(m / "added" / "dir" / "file", os.O_WRONLY | os.O_APPEND)
    root_fd = os.open(m / "root_file", os.O_RDWR)
    dfd = os.open(m / "added" / "dir", os.O_RDONLY | os.O_DIRECTORY)
    try:
        head = os.read(rfd, 1000)
        os.write(wfd, random.Random(91).randbytes(MiB))  # buffered when the rollback starts
        os.write(root_fd, b"ROOT")

        r = cli_ok("rollback", m, "r")
        assert re.fullmatch(r"rolled back to snapshot r in \d+\.\d\d s\n", r.stdout), r.stdout
        assert_same_tree(snap, m)
        st = os.stat(m)
        assert st.st_mode == root_mode
        assert st.st_nlink == 2 + sum(1 for e in os.scandir(m) if e.is_dir(follow_symlinks=False))
        assert os.getxattr(m, "user.root") == b"at snapshot"
        assert "user.extra" not in os.listxattr(m)

        # old handles still work: a file the snapshot has is the same inode, put back in
        # place (its handle reads the snapshot's bytes); a file it lacks is unlinked
        assert head + pread_all(rfd, len(reader_data), 1000) == reader_data
        assert os.fstat(root_fd).st_nlink == 1
        assert pread_all(root_fd, 100, 0) == b"root level"
        os.write(wfd, b"still writable")
        assert os.fstat(wfd).st_nlink == 0
        assert os.listdir(dfd) == []
    finally:
        for fd in (rfd, wfd, root_fd, dfd):
            os.close(fd)
    assert_same_tree(snap, m)  # nothing written through the unlinked file's handle shows up
    assert read_file(m / "root_file") == b"root level"
    assert read_file(m / "a" / "b" / "reader") == reader_data

    # the rolled-back tree is an ordinary live tree; rolling back again is idempotent
    write_file(m / "after", b"after rollback")
    os.link(m / "root_file", m / "root_file_link")
    assert diff_lines(m, "r", "@live") == ["+ /after", "+ /root_file_link"]
    cli_ok("rollback", m, "r")
    assert_same_tree(snap, m)
    assert os.stat(m / "a" / "hl1").st_ino == os.stat(m / "a" / "b" / "hl2").st_ino
    assert os.stat(m / "root_file").st_nlink == 1
    assert_one_line_error(casfs_cli("rollback", m, "missing"), "no snapshot named 'missing'")
    assert_same_tree(snap, m)


# -- 10. restore ------------------------------------------------------------------------------


def test_restore_file_and_directory(mounted: CasfsMount):
    m = mounted.mnt
    os.makedirs(m / "dir" / "sub" / "e")
    write_file(m / "dir" / "f", b"hard-linked\n" * 1000)
    os.link(m / "dir" / "f", m / "dir" / "sub" / "g")
    os.link(m / "dir" / "f", m / "dir" / "f2")
    os.symlink("f", m / "dir" / "link")
    write_file(m / "dir" / "x", b"x")
    os.setxattr(m / "dir" / "x", "user.a", b"b")
    os.chmod(m / "dir" / "sub", 0o700)
    os.mkdir(m / "dir2")
    write_file(m / "dir2" / "h", b"linked from outside")
    os.link(m / "dir2" / "h", m / "outer")
    write_file(m / "file", b"original")
    cli_ok("snapshot", m, "s")
    snap = m / ".snap" / "s"

    subprocess.run(["rm", "-r", str(m / "dir"), str(m / "dir2")], check=True)
    write_file(m / "file", b"changed")

    # a directory with hard links, back where it was
    r = cli_ok("restore", m, "s", "dir")
    assert r.stdout == "restored dir from snapshot s to /dir\n"
    assert_same_tree(snap / "dir", m / "dir")
    st = os.stat(m / "dir" / "f")
    assert st.st_nlink == 3 and st.st_ino == os.stat(m / "dir" / "sub" / "g").st_ino
    assert st.st_ino != os.stat(snap / "dir" / "f").st_ino
    assert os.stat(m / "dir").st_mtime_ns == os.stat(snap / "dir").st_mtime_ns
    with open(m / "dir" / "sub" / "g", "ab") as f:  # a live, writable hard link
        f.write(b"appended")
    assert read_file(m / "dir" / "f").endswith(b"appended")
    assert read_file(snap / "dir" / "f") == b"hard-linked\n" * 1000

    # a file whose other link is outside the restored subtree: one link now
    cli_ok("restore", m, "s", "dir2")
    assert read_file(m / "dir2" / "h") == b"linked from outside"
    assert os.stat(m / "dir2" / "h").st_nlink == 1 and os.stat(m / "outer").st_nlink == 1
    assert os.stat(m / "dir2" / "h").st_ino != os.stat(m / "outer").st_ino

    # refusals are one line and change nothing (an existing destination needs --force)
    before = tree_digest(m)
    refusals = [
        (("restore", m, "s", "file"), "file exists (use --force)"),
        (("restore", m, "s", "dir", "dir2"), "dir2 exists (use --force)"),
        (("restore", m, "s", "missing"), "No such file"),
        (("restore", m, "s", "file", "nodir/x"), "No such file"),
        (("restore", m, "s", "file/x"), "Not a directory"),
        (("restore", m, "s", "../file", "y"), "'..'"),
        (("restore", m, "s", "dir", "/"), "use rollback"),
        (("restore", "--force", m, "s", "file", ".snap"), "File exists"),
        (("restore", m, "nope", "file", "z"), "no snapshot named 'nope'"),
    ]
    for (_args, fragment), r in zip(refusals, cli_many(*(a for a, _ in refusals)), strict=True):
        assert_one_line_error(r, fragment)
    assert tree_digest(m) == before
    assert read_file(m / "file") == b"changed"
    assert os.listdir(m / ".snap") == ["s"]

    r = cli_ok("restore", "--force", m, "s", "file")
    assert r.stdout == "restored file from snapshot s to /file\n"
    assert read_file(m / "file") == b"original"
    cli_ok("restore", "--force", m, "s", "dir", "dir2")
    assert_same_tree(snap / "dir", m / "dir2")

    # to another name, absolute (under the mountpoint) or relative, and deeper paths
    r = cli_ok("restore", m, "s", "/dir/sub", str(m / "dir2" / "sub_again"))
    assert r.stdout.endswith(" to /dir2/sub_again\n"), r.stdout
    # g's other links are outside the restored subtree: one link now, the rest the same
    assert os.stat(m / "dir2" / "sub_again" / "g").st_nlink == 1
    assert digest_without_nlink(snap / "dir" / "sub") == digest_without_nlink(
        m / "dir2" / "sub_again"
    )
    cli_ok("restore", m, "s", "dir/link", "dir2/link_copy")
    assert os.readlink(m / "dir2" / "link_copy") == "f"


# -- 11. bad names ----------------------------------------------------------------------------


def test_bad_snapshot_names_and_missing_snapshots(mounted: CasfsMount):
    m = mounted.mnt
    write_file(m / "f", b"x")
    os.mkdir(m / ".snap" / "s")

    bad = [
        (("snapshot", m, ""), "invalid snapshot name"),
        (("snapshot", m, "."), "invalid snapshot name"),
        (("snapshot", m, ".."), "invalid snapshot name"),
        (("snapshot", m, "a/b"), "'/' or a control character"),
        (("snapshot", m, "x" * 256), "too long"),
        (("snapshot", m, "é" * 128), "too long"),  # 256 bytes
        (("snapshot", m, "new\nline"), "'/' or a control character"),
        (("snapshot", m, "s"), "snapshot 's' exists"),
        (("snapshot", "-d", m, "missing"), "no snapshot named 'missing'"),
        (("snapshot", "-d", m, ""), "no snapshot named"),
        (("snapshot", "-d", m), "needs the NAME"),
        (("snapshot", m / ".snap", "x"), "neither a casfs mountpoint nor a casfs store"),
    ]
    for (args, fragment), r in zip(bad, cli_many(*(a for a, _ in bad)), strict=True):
        line = assert_one_line_error(r, fragment)
        assert len(line) < 400, (args, line)

    snap = m / ".snap"
    expect = {
        b"x" * 256: (errno.ENAMETOOLONG, errno.ENOENT),
        "é".encode() * 128: (errno.ENAMETOOLONG, errno.ENOENT),
        b"new\nline": (errno.EINVAL, errno.ENOENT),
        b"ctl\x01": (errno.EINVAL, errno.ENOENT),
        b"del\x7f": (errno.EINVAL, errno.ENOENT),
        b"s": (errno.EEXIST, None),  # rmdir would delete it: not probed
        b".": (errno.EEXIST, None),
        b"..": (errno.EEXIST, None),
        b"missing": (None, errno.ENOENT),
    }
    for name, (mkdir_errno, rmdir_errno) in expect.items():
        path = os.fsencode(snap) + b"/" + name
        if mkdir_errno is not None:
            assert errno_of(os.mkdir, path) == mkdir_errno, name
        if rmdir_errno is not None:
            assert errno_of(os.rmdir, path) == rmdir_errno, name
    assert os.listdir(snap) == ["s"]
    assert list(snapshot_rows(m)) == ["s"]

    # the longest name, and names that are odd but allowed
    longest = "n" * 255
    os.mkdir(snap / longest)
    assert read_file(snap / longest / "f") == b"x"
    os.mkdir(os.fsencode(snap) + b"/\xff bin")
    cli_ok("snapshot", m, "with space é")
    table, rows = cli_many(("snapshot", m), ("snapshot", m, "--json"))
    assert "\\xff bin" in table.stdout and "with space é" in table.stdout
    assert [r["name"] for r in json.loads(rows.stdout)] == [
        "s",
        longest,
        os.fsdecode(b"\xff bin"),
        "with space é",
    ]
    deleted = cli_many(
        ("snapshot", "-d", m, longest), ("snapshot", "-d", m, os.fsdecode(b"\xff bin"))
    )
    assert [r.stdout for r in deleted] == [
        f"deleted snapshot {longest}\n",
        "deleted snapshot \\xff bin\n",
    ]
    assert all(r.returncode == 0 and r.stderr == "" for r in deleted)
    os.rmdir(snap / "with space é")
    assert os.listdir(snap) == ["s"]


# -- 12. the store path while mounted, and offline --------------------------------------------


def test_commands_on_the_store_path_mounted_and_offline(mounted: CasfsMount):
    m, store = mounted.mnt, mounted.store
    os.mkdir(m / "d")
    write_file(m / "d" / "f", b"one")
    write_file(m / "g", b"gee")

    # while mounted, the store path is served by the mount (the mount holds the store's
    # writer lock, so nothing could open it offline)
    r = cli_ok("snapshot", store, "via_store")
    assert r.stdout.startswith("created snapshot via_store: 2 files")
    assert os.listdir(m / ".snap") == ["via_store"]  # the mount knows at once
    assert read_file(m / ".snap" / "via_store" / "d" / "f") == b"one"
    write_file(m / "d" / "f", b"two")  # only the mount has it, buffered
    os.mkdir(m / ".snap" / "via_mkdir")
    os.unlink(m / "g")
    by_store, by_mount, d1, d2 = cli_many(
        ("snapshot", store, "--json"),
        ("snapshot", m, "--json"),
        ("diff", store, "via_store", "via_mkdir"),
        ("diff", store, "via_mkdir", "@live"),
    )
    assert by_store.stdout == by_mount.stdout and by_store.returncode == 0
    assert [r["name"] for r in json.loads(by_store.stdout)] == ["via_store", "via_mkdir"]
    assert d1.stdout.splitlines() == ["M /d/f"]
    assert d2.stdout.splitlines() == ["- /g"]
    cli_ok("restore", store, "via_store", "g")
    assert read_file(m / "g") == b"gee"
    write_file(m / "g", b"changed")
    cli_ok("rollback", store, "via_mkdir")
    assert_same_tree(m / ".snap" / "via_mkdir", m)
    assert read_file(m / "d" / "f") == b"two" and read_file(m / "g") == b"gee"
    cli_ok("snapshot", "-d", store, "via_store")
    assert os.listdir(m / ".snap") == ["via_mkdir"]
    mounted_rows = cli_ok("snapshot", store, "--json").stdout

    # offline: the same commands on the store itself
    mounted.umount()
    assert cli_ok("snapshot", store, "--json").stdout == mounted_rows
    cli_ok("snapshot", store, "offline")
    cli_ok("restore", store, "via_mkdir", "d/f", "restored_offline")
    assert diff_lines(store, "offline", "@live") == ["+ /restored_offline"]
    cli_ok("snapshot", store, "offline2")
    cli_ok("rollback", store, "offline")
    cli_ok("snapshot", "-d", store, "via_mkdir")
    assert list(snapshot_rows(store)) == ["offline", "offline2"]

    mounted.mount()  # and the mount sees what was done offline
    assert sorted(os.listdir(m / ".snap")) == ["offline", "offline2"]
    assert read_file(m / ".snap" / "offline2" / "restored_offline") == b"two"
    assert not os.path.exists(m / "restored_offline")
    assert_same_tree(m / ".snap" / "offline", m)
    assert read_file(m / "d" / "f") == b"two"


# -- the kernel's cache after delete, rollback and restore (regressions) ---------------------


def test_delete_and_rollback_of_directories_in_use_log_no_error(mounted: CasfsMount):
    """Deleting a snapshot (CLI) while a file in it is open, and rolling back while a file
    below a removed root directory is open: pyfuse3 once logged an ERROR with a traceback
    for each (invalidate_entry with deleted= on a directory in use: ENOTEMPTY)."""
    m = mounted.mnt
    mounted.check_log = False  # checked here, in the test body
    os.mkdir(m / "d")
    write_file(m / "d" / "f", b"data")
    cli_ok("snapshot", m, "busy")
    with open(m / ".snap" / "busy" / "d" / "f", "rb") as f:
        cli_ok("snapshot", "-d", m, "busy")
        assert f.read() == b"data"
    assert not os.path.exists(m / ".snap" / "busy")
    cli_ok("snapshot", m, "before_e")
    os.mkdir(m / "e")
    write_file(m / "e" / "g", b"more")
    with open(m / "e" / "g", "rb") as f:
        cli_ok("rollback", m, "before_e")  # removes e, which is in use
        assert f.read() == b"more"
    assert os.listdir(m) == ["d"]
    poll(lambda: bool(log_problems(mounted)), timeout=0.5, interval=0.05)  # a late error
    umount_and_check_log(mounted)


def test_restore_updates_the_kernel_cache_at_once(mounted: CasfsMount):
    """restore to a new name: the parent's cached attributes (link count, mtime) were stale
    for up to ATTR_TIMEOUT, the kernel having no entry to invalidate. restore --force over an
    open file: its descriptor reported st_nlink 1 for as long (no deleted= for it)."""
    m = mounted.mnt
    os.makedirs(m / "p" / "d")
    write_file(m / "f", b"old")
    cli_ok("snapshot", m, "s")
    write_file(m / "f", b"newer")

    before = os.stat(m / "p")  # the kernel caches these attributes
    assert before.st_nlink == 3
    cli_ok("restore", m, "s", "p/d", "p/d2")
    after = os.stat(m / "p")  # (no readdir or read first: either would refresh them)
    assert after.st_nlink == 4, "the parent's st_nlink is stale after restoring a directory"
    assert after.st_mtime_ns > before.st_mtime_ns

    fd = os.open(m / "f", os.O_RDONLY)
    try:
        assert os.fstat(fd).st_nlink == 1
        cli_ok("restore", "--force", m, "s", "f")
        # (no read through fd first: that would refresh the cached attributes)
        assert os.fstat(fd).st_nlink == 0, "the replaced file still reports a link"
        assert pread_all(fd, 100, 0) == b"newer"
        assert read_file(m / "f") == b"old"
    finally:
        os.close(fd)


def test_commands_return_once_the_kernel_dropped_the_names_they_removed(mounted: CasfsMount):
    """snapshot -d and rollback answer only once the kernel has dropped the names they
    removed, so a script's next stat does not find them (the kernel caches snapshot entries
    for long; dropping them was queued and could land after the command had returned)."""
    m = mounted.mnt
    for i in range(12):
        cli_ok("snapshot", m, f"t{i}")
        assert os.path.isdir(m / ".snap" / f"t{i}")  # the kernel caches the entry
        cli_ok("snapshot", "-d", m, f"t{i}")
        assert not os.path.lexists(m / ".snap" / f"t{i}"), f"t{i} still there"
    cli_ok("snapshot", m, "base")
    for i in range(6):
        write_file(m / f"extra{i}", b"x")
        os.stat(m / f"extra{i}")
        cli_ok("rollback", m, "base")
        assert not os.path.lexists(m / f"extra{i}"), f"extra{i} still there"
