"""Corruption: a flipped byte in a stored chunk, and a damaged store directory.

A flipped byte must make reads of the affected range fail (CorruptObject in the library, EIO
through the mount) and never return wrong bytes; the rest of the file still reads. The mount
logs the digest and the files using it once; ``fsck --verify-data`` names them too. A store
whose database file is damaged, truncated or missing gives one clear line, not a traceback.

The corrupted chunk is found in ``data.mdb`` by its bytes: the file is random, so its chunks
are stored raw (see :mod:`casfs.store.codec`).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import CasfsMount, casfs_cli, flip_byte, truncate_data

from casfs.errors import CorruptObject
from casfs.store.store import Store
from casfs.tree import snapshots, treeobjects
from casfs.tree.content import Extent, file_extents
from casfs.tree.fs import ROOT_INO, Filesystem
from casfs.tree.fsck import fsck
from casfs.tree.whereused import where_used

SIZE = 6 << 20  # about 90 chunks; the corrupted one is in the middle, far from both ends
USERS = ["/docs/moved", "one:/docs/victim", "two:/docs/moved"]  # live, then oldest snapshot
CLEAR = ("damaged", "truncated", "empty", "missing", "not a casfs store")


@dataclass
class Damaged:
    path: Path
    ino: int
    data: bytes
    extents: list[Extent]
    bad: Extent  # the chunk with a flipped byte


def snap(fs: Filesystem, name: bytes) -> None:
    fs.store.run_write(lambda tx: snapshots.create(tx, fs.store, fs.merkle, name, time.time_ns()))


def build(path: Path) -> Damaged:
    """/docs/victim (random, multi-chunk) in snapshot ``one``, renamed to /docs/moved, in
    snapshot ``two``; then one byte of a chunk in the middle flipped on disk."""
    data = random.Random(6).randbytes(SIZE)
    store = Filesystem.create_store(str(path))
    fs = Filesystem(store)
    try:
        docs = fs.mkdir(ROOT_INO, b"docs", 0o755, 0, 0).ino
        ino = fs.create(docs, b"victim", 0o644, 0, 0).ino
        fs.write(ino, 0, data)
        snap(fs, b"one")
        fs.rename(docs, b"victim", docs, b"moved")
        snap(fs, b"two")
        with store.read() as tx:
            extents = file_extents(tx, ino)
    finally:
        fs.close()
        store.close()
    assert len(extents) > 8
    bad = next(e for e in extents if e.offset <= SIZE // 2 < e.end)
    flip_byte(path / "data.mdb", data[bad.offset : bad.end])
    return Damaged(path, ino, data, extents, bad)


# -- library ----------------------------------------------------------------------------------


def test_fsck_names_the_digest_and_every_file_using_it(tmp_path):
    d = build(tmp_path / "store")
    with Store(str(d.path), writer=False) as s:
        assert fsck(s).clean  # the structure is intact; only data is bad
        report = fsck(s, verify_data=True)
        assert [p.kind for p in report.problems] == ["corrupt"]
        message = report.problems[0].message
        assert d.bad.digest.hex() in message
        assert f"used by {', '.join(USERS)}" in message
        with s.read() as tx:
            assert where_used(s, tx, {d.bad.digest}) == {d.bad.digest: USERS}
            assert where_used(s, tx, {d.bad.digest}, limit=2) == {d.bad.digest: USERS[:2]}
            assert where_used(s, tx, {b"\0" * 32}) == {b"\0" * 32: []}
            one = snapshots.find(tx, b"one").root
            docs = treeobjects.load_tree(s, tx, one.digest).find(b"docs")
            manifest = treeobjects.load_tree(s, tx, docs.digest).find(b"victim").digest
            assert where_used(s, tx, {one.digest, docs.digest, manifest}) == {
                one.digest: ["one:/"],
                docs.digest: ["one:/docs"],
                manifest: USERS,  # the live file's through its cached manifest
            }


def test_where_used_names_every_hard_link_and_small_files(store):
    fs = Filesystem(store)
    try:
        sub = fs.mkdir(ROOT_INO, b"sub", 0o755, 0, 0).ino
        deep = fs.mkdir(sub, b"deep", 0o755, 0, 0).ino
        ino = fs.create(deep, b"a", 0o644, 0, 0).ino
        fs.write(ino, 0, b"small file, one chunk, listed in its tree entry")
        fs.link(ino, ROOT_INO, b"b")
        snap(fs, b"s")
        with store.read() as tx:
            (chunk,) = file_extents(tx, ino)
            assert where_used(store, tx, {chunk.digest}) == {
                chunk.digest: ["/b", "/sub/deep/a", "s:/b", "s:/sub/deep/a"]
            }
    finally:
        fs.close()


def test_read_of_the_corrupt_range_fails_and_the_rest_reads(tmp_path):
    d = build(tmp_path / "store")
    with Store(str(d.path)) as s:
        fs = Filesystem(s, cache_bytes=0)
        try:
            for off, n in ((d.bad.offset, 1), (d.bad.end - 100, 100), (d.bad.offset - 10, 20)):
                with pytest.raises(CorruptObject) as info:
                    fs.read(d.ino, off, n)
                assert info.value.digest == d.bad.digest
                assert info.value.errno == errno.EIO
            k = d.extents.index(d.bad)
            for e in (d.extents[0], d.extents[k - 1], d.extents[k + 1], d.extents[-1]):
                assert fs.read(d.ino, e.offset, e.length) == d.data[e.offset : e.end]
            with pytest.raises(CorruptObject):  # still an error the second time (no cache)
                fs.read(d.ino, d.bad.offset, d.bad.length)
        finally:
            fs.close()


def test_sequential_read_up_to_a_corrupt_chunk_succeeds(tmp_path):
    d = build(tmp_path / "store")
    with Store(str(d.path)) as s:
        fs = Filesystem(s, cache_bytes=0)
        try:
            k = d.extents.index(d.bad)
            for e in d.extents[k - 3 : k]:  # the second read starts read-ahead over the bad one
                assert fs.read(d.ino, e.offset, e.length) == d.data[e.offset : e.end]
        finally:
            fs.close()


# -- command line and mount -------------------------------------------------------------------


def test_cli_fsck_verify_data_exits_1_naming_digest_and_paths(tmp_path):
    d = build(tmp_path / "store")
    r = casfs_cli("fsck", d.path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = casfs_cli("fsck", "--verify-data", d.path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    corrupt = [line for line in r.stdout.splitlines() if line.startswith("corrupt: ")]
    assert len(corrupt) == 1, r.stdout
    assert d.bad.digest.hex() in corrupt[0]
    assert all(p in corrupt[0] for p in USERS), corrupt[0]
    assert r.stdout.rstrip().endswith("1 problem(s)")


def read_until_error(path: Path) -> tuple[bytes, int]:
    """What reading the file front to back returns before it fails, and the errno (0 if
    it did not fail)."""
    got = bytearray()
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            try:
                block = os.read(fd, 128 << 10)
            except OSError as exc:
                return bytes(got), exc.errno or -1
            if not block:
                return bytes(got), 0
            got += block
    finally:
        os.close(fd)


def read_far_ranges(path: Path) -> tuple[bytes, bytes]:
    """The first and last 64 KiB, read with the kernel's read-ahead off (MiBs from the bad
    chunk either way, and the kernel reads whole pages, which a neighbouring chunk shares)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        return os.pread(fd, 64 << 10, 0), os.pread(fd, 64 << 10, SIZE - (64 << 10))
    finally:
        os.close(fd)


def test_mount_answers_eio_never_wrong_bytes_and_logs_once(tmp_path):
    d = build(tmp_path / "store")
    far = (d.data[: 64 << 10], d.data[SIZE - (64 << 10) :])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = CasfsMount(d.path, mnt)
    try:
        m.mount()
        for rel in ("docs/moved", ".snap/one/docs/victim", ".snap/two/docs/moved"):
            path = mnt / rel
            assert read_far_ranges(path) == far, rel
            got, err = read_until_error(path)
            assert err == errno.EIO, (rel, err)
            assert len(got) <= d.bad.offset and d.data.startswith(got), rel
            r = subprocess.run(["cat", str(path)], capture_output=True, timeout=60)
            assert r.returncode != 0 and b"Input/output error" in r.stderr, (rel, r.stderr)
            assert len(r.stdout) <= d.bad.offset and d.data.startswith(r.stdout), rel
            assert read_far_ranges(path) == far, rel
        m.umount()
    finally:
        m.teardown()
    log = m.log_text()
    assert "Traceback" not in log, log
    lines = [line for line in log.splitlines() if d.bad.digest.hex() in line]
    assert len(lines) == 1, log  # once per mount, however often it is read
    assert " ERROR " in lines[0] and f"used by {', '.join(USERS)}" in lines[0], lines[0]
    m.assert_fsck_clean()


# -- a damaged store directory ----------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A small store (a 3 MiB file: half of data.mdb is file data) to copy and damage."""
    path = tmp_path_factory.mktemp("template") / "store"
    store = Filesystem.create_store(str(path))
    fs = Filesystem(store)
    try:
        ino = fs.create(ROOT_INO, b"f", 0o644, 0, 0).ino
        fs.write(ino, 0, random.Random(7).randbytes(3 << 20))
    finally:
        fs.close()
        store.close()
    return path


def _garbage(store: Path) -> None:
    with open(store / "data.mdb", "r+b") as f:
        f.write(random.Random(8).randbytes(8 << 10))


def _delete(name: str):
    return lambda store: os.unlink(store / name)


DAMAGES = [
    pytest.param(truncate_data(None), id="data.mdb-truncated-to-half"),
    pytest.param(truncate_data(4096), id="data.mdb-truncated-to-4096"),
    pytest.param(truncate_data(0), id="data.mdb-truncated-to-0"),
    pytest.param(_garbage, id="data.mdb-first-8KiB-garbage"),
    pytest.param(_delete("data.mdb"), id="data.mdb-deleted"),
    pytest.param(_delete("casfs-store.json"), id="marker-deleted"),
]


def run_command(command: str, store: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    if command != "mount":
        return casfs_cli(command, store, timeout=60)
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    try:
        return casfs_cli("mount", store, mnt, timeout=60)
    finally:
        CasfsMount(store, mnt).teardown()  # in case it mounted after all


@pytest.mark.parametrize("command", ["stats", "fsck", "mount"])
@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_store_gives_one_clear_line(template, tmp_path, damage, command):
    store = tmp_path / "store"
    shutil.copytree(template, store)
    damage(store)
    r = run_command(command, store, tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode > 0, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith(f"casfs {command}: "), r.stderr
    assert str(store) in lines[0], lines[0]
    cause = lines[0].replace(str(store), "STORE")  # the test's path names the damage
    assert any(word in cause for word in CLEAR), lines[0]


def test_deleted_lock_mdb_is_recreated(template, tmp_path):
    """lock.mdb is LMDB's reader table, rebuilt when missing: not damage."""
    store = tmp_path / "store"
    shutil.copytree(template, store)
    (store / "lock.mdb").unlink()
    for command in ("stats", "fsck"):
        r = casfs_cli(command, store)
        assert r.returncode == 0 and not r.stderr, r.stderr
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    m = CasfsMount(store, mnt)
    try:
        m.mount()
        assert (mnt / "f").stat().st_size == 3 << 20
        m.umount()
    finally:
        m.teardown()
    assert (store / "lock.mdb").exists()
