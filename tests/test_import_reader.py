"""The import's reader process (casfs/workflows/contentreader.py): small files read, cut and
hashed by a process of their own must make exactly the snapshot the import makes reading them
itself, and whatever happens to the reader (it cannot start, it stops half-way, a file grows
past it or vanishes) the import still finishes with that same snapshot, or with the warning a
local read gives.

Each test imports the same source twice into one store, once with the reader forced on
(``CASFS_IMPORT_READER_MIN_FILES=1``) and once with it off, and compares the two snapshots
entry by entry (content digests, extents, sizes, times, xattrs, which names share an inode):
everything but the inode numbers themselves, fresh for each new source.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import stat
import subprocess
import sys
import textwrap
import threading
from collections import defaultdict

import pytest
from conftest import CasfsMount
from test_import import (
    build_source,
    cli_ok,
    fsck_clean,
    import_json,
    new_store,
    root_only,
    snapshot_entries,
)
from treecompare import compare_trees

from casfs.store.store import Store
from casfs.workflows import contentreader, importer

OFF = str(10**9)


@pytest.fixture
def served(monkeypatch) -> list[bytes]:
    """Paths the reader process served (recorded by the import's side)."""
    got: list[bytes] = []
    real_take = contentreader.ContentReader.take

    def take(self, path: bytes):
        result = real_take(self, path)
        if isinstance(result, contentreader.FileContent):
            got.append(path)
        return result

    monkeypatch.setattr(contentreader.ContentReader, "take", take)
    return got


def same_snapshots(store, a: bytes, b: bytes) -> bool:
    """Snapshots ``a`` and ``b`` hold the same entries, inode numbers aside (see above)."""

    def shape(name: bytes):
        entries = snapshot_entries(store, name)
        links = defaultdict(set)
        for rel, e in entries.items():
            links[e.ino].add(rel)
        plain = {
            rel: dataclasses.replace(
                e,
                ino=0,
                digest=b"" if e.is_dir else e.digest,
                atime_ns=0 if stat.S_ISLNK(e.mode) else e.atime_ns,  # (readlink moved it)
            )
            for rel, e in entries.items()
        }
        return plain, sorted(sorted(names) for names in links.values())

    return shape(a) == shape(b)


def import_offline(store, src, name: bytes, *, reader: bool, monkeypatch) -> importer.ImportResult:
    monkeypatch.setenv(contentreader.MIN_FILES_ENV, "1" if reader else OFF)
    with Store(str(store)) as s:
        return importer.import_offline(s, os.fsdecode(src), name)


@root_only
def test_reader_makes_the_same_snapshot_as_reading_here(tmp_path, monkeypatch, served):
    """Everything build_source has (hard links, holes, xattrs, a non-UTF-8 name, files both
    sides of SMALL_FILE): the reader serves the small files and the snapshot is the same."""
    monkeypatch.setattr(contentreader, "SMALL_FILE", 64 << 10)  # a/three (30 KB) in, a/big not
    store = new_store(tmp_path / "store")
    src = build_source(tmp_path / "src")
    here = import_offline(store, src, b"here", reader=False, monkeypatch=monkeypatch)
    assert served == []
    # a new source path: no files cache, every file is read again
    os.rename(src, tmp_path / "src2")
    src = os.fsencode(tmp_path / "src2")
    there = import_offline(store, src, b"there", reader=True, monkeypatch=monkeypatch)
    assert same_snapshots(store, b"here", b"there")
    assert not here.warnings and not there.warnings
    assert there.bytes_read == here.bytes_read and there.files == here.files
    rel = sorted(os.path.relpath(p, src) for p in served)
    assert b"many/f000" in rel and b"\xff\xfe" in rel and b"empty" in rel
    assert b"a/big" not in rel and b"a/sparse" not in rel  # larger: read by the import
    # one inode, three names: its content is read once (by the name the import meets first)
    assert [r for r in rel if r.endswith(b"three") or r.endswith(b"three-b")] == [b"a/b/three-b"]
    assert len(rel) >= 150
    dest = tmp_path / "dest"
    cli_ok("export", store, "there", dest)
    assert compare_trees(src, os.fsencode(dest)) == []
    fsck_clean(store)


def small_tree(root, files: int = 40) -> bytes:
    os.makedirs(root / "d")
    for i in range(files):
        (root / ("d" if i % 2 else "") / f"f{i:03d}").write_bytes(b"%d " % i * (i * 37 + 1))
    os.setxattr(root / "f000", "user.x", b"kept")
    return os.fsencode(root)


def test_reader_that_stops_half_way_leaves_the_rest_to_the_import(tmp_path, monkeypatch, served):
    """A reader that serves one message and dies: the import reads the rest itself, says so
    once, and makes the same snapshot."""
    script = textwrap.dedent(
        """
        import pickle, sys
        from casfs.store.chunker import Chunker, ChunkParams
        from casfs.workflows import contentreader as c
        params, files = pickle.load(sys.stdin.buffer)
        chunker = Chunker(ChunkParams(*params))
        c._transmit(sys.stdout.buffer, [c.read_one(chunker, p, n) for p, n in files[:5]])
        sys.exit("the reader broke")
        """
    )
    monkeypatch.setattr(contentreader, "command", lambda: [sys.executable, "-c", script])
    store = new_store(tmp_path / "store")
    src = small_tree(tmp_path / "src")
    here = import_offline(store, src, b"here", reader=False, monkeypatch=monkeypatch)
    os.rename(src, tmp_path / "src2")
    there = import_offline(store, tmp_path / "src2", b"there", reader=True, monkeypatch=monkeypatch)
    assert len(served) == 5
    assert there.warnings == [
        "the import's reader process stopped (exit status 1: the reader broke); read here"
    ]
    assert same_snapshots(store, b"here", b"there")
    assert there.bytes_read == here.bytes_read
    fsck_clean(store)


def test_reader_that_cannot_start(tmp_path, monkeypatch, served):
    monkeypatch.setattr(contentreader, "command", lambda: [str(tmp_path / "no-python")])
    store = new_store(tmp_path / "store")
    src = small_tree(tmp_path / "src")
    r = import_offline(store, src, b"x", reader=True, monkeypatch=monkeypatch)
    assert r.warnings == [
        "could not start the import's reader process (No such file or directory); read here"
    ]
    assert served == []
    assert compare_trees(src, os.fsencode(tmp_path / "src")) == []
    entries = snapshot_entries(store, b"x")
    assert entries[b"f000"].xattrs == ((b"user.x", b"kept"),)
    fsck_clean(store)


def test_files_that_change_after_the_scan(tmp_path, monkeypatch, served):
    """Between the scan and the reader: a file vanishes (a warning, as when the import reads
    it), one grows past what the reader takes (the import reads it: stored as read, with the
    changed-while-read warning), one is rewritten (stored as read, same warning)."""
    store = new_store(tmp_path / "store")
    src = small_tree(tmp_path / "src")
    grown = b"x" * (contentreader.GREW_LIMIT + 1)
    real_scan = importer.scan

    def scan_then_change(*args, **kwargs):
        found = real_scan(*args, **kwargs)
        os.unlink(tmp_path / "src" / "f002")
        (tmp_path / "src" / "d" / "f003").write_bytes(grown)
        (tmp_path / "src" / "f004").write_bytes(b"new")
        return found

    monkeypatch.setattr(importer, "scan", scan_then_change)
    r = import_offline(store, src, b"x", reader=True, monkeypatch=monkeypatch)
    path = os.fsdecode(src)
    assert sorted(r.warnings) == [
        f"{path}/d/f003: changed while being read; stored as read",
        f"{path}/f002: cannot read (No such file or directory); skipped",
        f"{path}/f004: changed while being read; stored as read",
    ]
    assert len(served) == 40 - 2  # all but the vanished and the grown
    entries = snapshot_entries(store, b"x")
    assert b"f002" not in entries
    assert entries[b"d/f003"].size == len(grown) and entries[b"f004"].size == 3
    monkeypatch.undo()
    dest = tmp_path / "dest"
    cli_ok("export", store, "x", dest)
    assert (dest / "d" / "f003").read_bytes() == grown
    assert (dest / "f004").read_bytes() == b"new"
    fsck_clean(store)
    # what changed while read is read again next time; nothing else is
    again = import_json(store, src, "y")
    assert again["bytes_read"] == len(grown) + 3 and again["warnings"] == 0


@root_only
def test_reader_in_a_mount(mounted: CasfsMount, tmp_path):
    """An import through the mount starts its reader from the mount's daemon (over 512 small
    files, the default threshold)."""
    src = small_tree(tmp_path / "src", files=600)
    x = import_json(mounted.mnt, src, "x")
    assert x["warnings"] == 0 and x["files"] == 600
    assert compare_trees(src, os.fsencode(mounted.mnt / ".snap" / "x")) == []
    mounted.umount()
    fsck_clean(mounted.store)


def test_reader_imports_nothing_from_the_working_directory(tmp_path, monkeypatch):
    """Run from inside the source (as `casfs import . ...` is), the reader must not import
    the source's own modules: an enum.py there would run as the reader's enum."""
    src = small_tree(tmp_path / "src")
    marker = tmp_path / "ran"
    (tmp_path / "src" / "enum.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    store = new_store(tmp_path / "store")
    casfs = os.path.join(os.path.dirname(sys.executable), "casfs")
    env = dict(os.environ, **{contentreader.MIN_FILES_ENV: "1"})
    r = subprocess.run(
        [casfs, "import", str(store), ".", "-s", "x", "--json"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert json.loads(r.stdout)["files"] == 41
    assert not marker.exists()


def test_a_reader_that_writes_much_to_stderr_is_not_blocked(tmp_path, monkeypatch, served):
    """Its stderr is never read while it serves: a pipe would fill and block it, and the
    import would wait for it forever."""
    start = (
        "import sys; sys.stderr.write('noise ' * 100_000); sys.stderr.flush(); "
        "from casfs.workflows.contentreader import main; main()"
    )
    monkeypatch.setattr(contentreader, "command", lambda: [sys.executable, "-c", start])
    store = new_store(tmp_path / "store")
    src = small_tree(tmp_path / "src")
    done: list[importer.ImportResult] = []
    worker = threading.Thread(
        target=lambda: done.append(
            import_offline(store, src, b"x", reader=True, monkeypatch=monkeypatch)
        ),
        daemon=True,
    )
    worker.start()
    worker.join(120)
    assert done, "the import hung on its reader"
    assert done[0].warnings == [] and len(served) == 40


def test_batches_count_xattrs_too(monkeypatch):
    """A message holds about BATCH_BYTES of content, xattrs included (tmpfs allows MiBs of
    them per file): 10 files of 300 KB of xattrs make 3 messages, not one of 3 MB."""
    big = ((b"user.x", b"v" * 300_000),)
    monkeypatch.setattr(contentreader, "read_one", lambda *_: (b"", [], (0, 0), big))
    plan = io.BytesIO()
    pickle.dump(((16 << 10, 64 << 10, 256 << 10), [(b"/f%d" % i, 0) for i in range(10)]), plan)
    plan.seek(0)
    out = io.BytesIO()
    contentreader.serve(plan, out)
    out.seek(0)
    sizes = []
    while True:
        try:
            sizes.append(len(contentreader._receive(out)))
        except EOFError:
            break
    assert sizes == [4, 4, 2]
