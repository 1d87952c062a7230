"""Offline compaction (casfs.store.compact): the data file shrinks to its live pages, nothing is
lost, a store in use is refused untouched, a crash at any point leaves a store that opens."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import subprocess
import sys
import textwrap

import pytest
from conftest import tmpfs

from casfs.errors import NoSpace, StoreError, StoreInUse
from casfs.store import compact as compact_module
from casfs.store.compact import TEMP_DIR, CompactResult, compact
from casfs.store.store import Store, StoreStats
from casfs.tree import snapshots
from casfs.tree.fs import ROOT_INO, Filesystem
from casfs.tree.fsck import fsck

MiB = 1 << 20
T0 = 1_700_000_000_000_000_000


def build(path, files: int, size: int, keep: int) -> dict[bytes, bytes]:
    """A store at ``path`` with ``files`` random files of ``size`` bytes of which the first
    ``keep`` remain, plus a directory, symlink, hard link, xattr and snapshot. Returns the
    remaining files' contents by name."""
    store = Filesystem.create_store(str(path))
    fs = Filesystem(store)
    try:
        contents = {}
        for i in range(files):
            name = f"f{i:03}".encode()
            node = fs.create(ROOT_INO, name, 0o644, 0, 0)
            data = os.urandom(size)
            fs.write(node.ino, 0, data)
            contents[name] = data
        first = fs.lookup(ROOT_INO, b"f000").ino
        d = fs.mkdir(ROOT_INO, b"dir", 0o755, 0, 0)
        fs.symlink(d.ino, b"sym", b"../f000", 0, 0)
        fs.link(first, d.ino, b"hard")
        fs.setxattr(first, b"user.note", b"kept")
        for name in list(contents)[keep:]:
            fs.unlink(ROOT_INO, name)
            del contents[name]
        store.run_write(lambda tx: snapshots.create(tx, store, fs.merkle, b"snap", T0))
    finally:
        fs.close()
        store.close()
    return contents


def check_store(path, contents: dict[bytes, bytes], stats: StoreStats | None = None) -> None:
    """Every file reads back, fsck (with data) is clean and the counters are as before."""
    with Store(str(path)) as store:
        fs = Filesystem(store)
        try:
            for name, data in contents.items():
                node = fs.lookup(ROOT_INO, name)
                assert fs.read(node.ino, 0, len(data) + 1) == data, name
            d = fs.lookup(ROOT_INO, b"dir").ino
            assert fs.readlink(fs.lookup(d, b"sym").ino) == b"../f000"
            assert fs.lookup(d, b"hard").ino == fs.lookup(ROOT_INO, b"f000").ino
            assert fs.getxattr(fs.lookup(ROOT_INO, b"f000").ino, b"user.note") == b"kept"
            with store.read() as tx:
                assert snapshots.find(tx, b"snap").name == b"snap"
            report = fsck(store, verify_data=True)
            assert report.clean, report.problems
            if stats is not None:
                assert store.stats() == stats
        finally:
            fs.close()


def stats_of(path) -> StoreStats:
    with Store(str(path)) as store:
        return store.stats()


def fingerprint(path) -> tuple:
    """Identity and content of the data file: equal means the store was not touched."""
    data = os.path.join(path, "data.mdb")
    st = os.stat(data)
    with open(data, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return st.st_ino, st.st_size, st.st_mtime_ns, digest


def run_python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True, **kwargs
    )


def test_compact_shrinks_and_keeps_everything(tmp_path):
    path = tmp_path / "s"
    contents = build(path, files=40, size=1 * MiB, keep=4)  # 40 MiB written, 36 deleted
    stats = stats_of(path)
    data = path / "data.mdb"
    before = data.stat().st_blocks * 512
    result = compact(str(path))
    assert isinstance(result, CompactResult)
    assert result.before_bytes == before
    assert result.after_bytes == data.stat().st_blocks * 512
    assert result.after_bytes < result.before_bytes / 2
    assert result.freed_bytes == result.before_bytes - result.after_bytes
    assert result.seconds > 0
    assert not (path / TEMP_DIR).exists()
    assert oct(data.stat().st_mode & 0o777) == "0o600"
    check_store(path, contents, stats)
    print(f"compact: {result.before_bytes} -> {result.after_bytes} bytes in {result.seconds:.3f} s")
    # The store is writable as before, and a second compaction finds little to do.
    with Store(str(path)) as store:
        fs = Filesystem(store)
        try:
            node = fs.create(ROOT_INO, b"new", 0o644, 0, 0)
            fs.write(node.ino, 0, b"after compaction")
            fs.unlink(ROOT_INO, b"f003")
            del contents[b"f003"]
            contents[b"new"] = b"after compaction"
        finally:
            fs.close()
    again = compact(str(path))
    assert again.after_bytes <= again.before_bytes
    check_store(path, contents)


def test_progress_is_reported_up_to_the_total(tmp_path, monkeypatch):
    path = tmp_path / "s"
    build(path, files=12, size=1 * MiB, keep=6)
    monkeypatch.setattr(compact_module, "POLL_SECONDS", 0.0005)
    calls: list[tuple[int, int]] = []
    compact(str(path), progress=lambda done, total: calls.append((done, total)))
    assert calls
    total = calls[-1][1]
    assert calls[-1] == (total, total)
    assert all(t == total and 0 <= d <= t for d, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert total == os.path.getsize(path / "data.mdb")  # the estimate is the exact size


def test_store_open_in_this_process_is_refused_untouched(tmp_path):
    path = tmp_path / "s"
    build(path, files=4, size=256 << 10, keep=2)
    before = fingerprint(path)
    with Store(str(path)):
        with pytest.raises(StoreInUse, match=f"in use by PID {os.getpid()}$") as info:
            compact(str(path))
        assert info.value.errno == errno.EBUSY
    assert fingerprint(path) == before
    assert not (path / TEMP_DIR).exists()


def refused_while_open_elsewhere(tmp_path, writer: bool) -> tuple[str, int]:
    """Compact a store another process holds open; the one-line refusal and that PID. The
    store must be untouched, and compacting once the holder is gone must work."""
    path = tmp_path / "s"
    contents = build(path, files=4, size=256 << 10, keep=2)
    before = fingerprint(path)
    proc = run_python(
        f"""
        import time
        from casfs.store.store import Store
        s = Store({str(path)!r}, writer={writer!r})
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(StoreInUse) as info:
            compact(str(path))
    finally:
        proc.kill()
        proc.wait()
    assert fingerprint(path) == before
    assert not (path / TEMP_DIR).exists()
    compact(str(path))
    check_store(path, contents)
    return str(info.value), proc.pid


def test_store_mounted_elsewhere_is_refused_untouched(tmp_path):
    message, pid = refused_while_open_elsewhere(tmp_path, writer=True)
    assert re.search(f"^store .* is in use by PID {pid}$", message)


def test_store_read_elsewhere_is_refused_untouched(tmp_path):
    """A read-only opener takes no writer lock, but has the LMDB environment (and its lock
    table) open: replacing data.mdb under it is refused."""
    message, pid = refused_while_open_elsewhere(tmp_path, writer=False)
    assert re.search(f"in use by PID {pid} ", message)
    assert "\n" not in message


def test_leftover_temp_is_removed(tmp_path):
    path = tmp_path / "s"
    contents = build(path, files=4, size=256 << 10, keep=2)
    tmp = path / TEMP_DIR
    tmp.mkdir()
    (tmp / "data.mdb").write_bytes(b"half a copy" * 1000)
    (tmp / "lock.mdb").write_bytes(b"junk")
    check_store(path, contents)  # the store opens with it present
    compact(str(path))
    assert not tmp.exists()
    check_store(path, contents)
    tmp.write_bytes(b"a file, not a directory")
    compact(str(path))
    assert not tmp.exists()


CRASH = """
import os, sys
from casfs.store import compact as c
point = sys.argv[1]
c.POLL_SECONDS = 0.0005
real_rename = os.rename
def rename(src, dst):
    real_rename(src, dst)
    if point == "after-rename":
        os._exit(9)
os.rename = rename
def progress(done, total):
    if point == "copy":
        os._exit(9)
c.compact(sys.argv[2], progress=progress)
"""


@pytest.mark.parametrize("point", ["copy", "after-rename"])
def test_crash_leaves_a_store_that_opens(tmp_path, point):
    """Killed while copying: the old file stays, with a partial compact.tmp. Killed right
    after the rename (lock.mdb still describes the old file): the new file is in place and
    LMDB rebuilds the lock table at the next open, no other process having it open."""
    path = tmp_path / "s"
    contents = build(path, files=12, size=1 * MiB, keep=3)
    stats = stats_of(path)
    before = fingerprint(path)
    r = subprocess.run([sys.executable, "-c", CRASH, point, str(path)], capture_output=True)
    assert r.returncode == 9, r.stderr
    if point == "copy":
        assert fingerprint(path) == before
        assert (path / TEMP_DIR).exists()
    else:
        assert fingerprint(path)[0] != before[0]  # the new file
        assert os.path.getsize(path / "data.mdb") < before[1] / 2
    check_store(path, contents, stats)
    compact(str(path))
    assert not (path / TEMP_DIR).exists()
    check_store(path, contents, stats)


def test_bad_copy_is_caught_and_store_untouched(tmp_path, monkeypatch):
    path = tmp_path / "s"
    contents = build(path, files=4, size=256 << 10, keep=2)
    before = fingerprint(path)

    def broken_copy(env, txn, fd, total, progress):
        os.write(fd, b"\0" * 8192)

    monkeypatch.setattr(compact_module, "_copy_with_progress", broken_copy)
    with pytest.raises(StoreError, match="compacted copy does not open.*store is unchanged"):
        compact(str(path))
    assert fingerprint(path) == before
    assert not (path / TEMP_DIR).exists()
    check_store(path, contents)


def test_progress_failure_leaves_store_untouched(tmp_path, monkeypatch):
    path = tmp_path / "s"
    contents = build(path, files=4, size=256 << 10, keep=2)
    before = fingerprint(path)

    def progress(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compact(str(path), progress=progress)
    assert fingerprint(path) == before
    assert not (path / TEMP_DIR).exists()
    check_store(path, contents)


def test_not_enough_space_fails_early(tmp_path, monkeypatch):
    path = tmp_path / "s"
    build(path, files=4, size=1 * MiB, keep=3)
    before = fingerprint(path)
    monkeypatch.setattr(compact_module, "_free_bytes", lambda p: 2 * MiB)
    with pytest.raises(NoSpace, match=r"needs \d+\.\d MiB, the disk has 2\.0 MiB free$") as info:
        compact(str(path))
    assert info.value.errno == errno.ENOSPC
    assert fingerprint(path) == before
    assert not (path / TEMP_DIR).exists()


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        compact(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match="not a casfs store"):
        compact(str(tmp_path / "empty"))


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs (needs root; skipped elsewhere)."""
    with tmpfs(tmp_path / "disk", "32m") as disk:
        yield disk


def test_full_disk_for_real(small_disk):
    """On a real small disk: refused while the live data would not fit twice, done once
    enough is deleted, and the freed space is back on the disk."""
    path = small_disk / "s"
    contents = build(path, files=20, size=1 * MiB, keep=18)
    before = fingerprint(path)
    with pytest.raises(NoSpace, match="not enough free space to compact"):
        compact(str(path))
    assert fingerprint(path) == before
    assert not (path / TEMP_DIR).exists()
    with Store(str(path)) as store:
        fs = Filesystem(store)
        try:
            for name in list(contents)[2:]:
                fs.unlink(ROOT_INO, name)
                del contents[name]
            store.run_write(lambda tx: snapshots.delete(tx, store, b"snap"))
            store.run_write(lambda tx: snapshots.create(tx, store, fs.merkle, b"snap", T0))
        finally:
            fs.close()
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    result = compact(str(path))
    assert result.after_bytes < result.before_bytes / 4
    freed = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize - free
    assert freed >= (result.before_bytes - result.after_bytes) * 0.9
    check_store(path, contents)
