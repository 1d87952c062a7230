"""The ``casfs`` command as a user runs it: output, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from casfs.store import layout
from casfs.store.store import Store
from casfs.tree.fs import ROOT_INO, Filesystem


def casfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "casfs_cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def assert_one_line_error(r: subprocess.CompletedProcess, fragment: str) -> None:
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert fragment in lines[0], lines[0]


def test_init_stats_fsck(tmp_path):
    store = str(tmp_path / "s")
    r = casfs("init", store, "--chunk-avg", "32K")
    assert r.returncode == 0, r.stderr
    assert "created store" in r.stdout and "32 KiB" in r.stdout
    with Store(store) as s:
        assert s.params.avg == 32 << 10
        fs = Filesystem(s)
        node = fs.create(ROOT_INO, b"a", 0o644, 0, 0)
        fs.write(node.ino, 0, b"hello world\n" * 10000)
        node = fs.create(ROOT_INO, b"b", 0o644, 0, 0)
        fs.write(node.ino, 0, b"hello world\n" * 10000)
        fs.close()
    r = casfs("stats", "--json", store)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["inodes"] == 3
    assert d["logical_bytes"] == 240000
    assert d["unique_bytes"] == 120000
    assert d["dedup_ratio"] == 2.0
    assert d["compression_ratio"] > 10
    r = casfs("stats", store)
    assert "dedup ratio 2.00x" in r.stdout
    r = casfs("fsck", store)
    assert r.returncode == 0 and r.stdout.strip().endswith(": clean"), r.stdout
    r = casfs("fsck", "--verify-data", "--json", store)
    assert r.returncode == 0
    assert json.loads(r.stdout)["verified_bytes"] == 120000


def test_fsck_reports_problems_with_exit_1(tmp_path):
    store = str(tmp_path / "s")
    assert casfs("init", store).returncode == 0
    with Store(store) as s:
        fs = Filesystem(s)
        node = fs.create(ROOT_INO, b"a", 0o644, 0, 0)
        fs.write(node.ino, 0, os.urandom(5000))
        fs.close()

        # break a refcount behind the model's back
        def bump(tx):
            digest, value = next(tx.prefix(b"refs", b""))
            count, size = layout.read_ref_value(value)
            tx.put(b"refs", digest, layout.ref_value(count + 1, size))

        s.run_write(bump)
    r = casfs("fsck", store)
    assert r.returncode == 1
    assert "refcount:" in r.stdout and "stats:" in r.stdout


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["stats", "/nonexistent/store"], "does not exist"),
        (["fsck", "/etc"], "not a casfs store"),
        (["stats", "/etc/passwd"], "not a casfs store"),
        (["init", "/etc"], "not empty"),
        (["init", "/nonexistent/a/b"], "does not exist"),
        (["init", "--chunk-avg", "12K", "/tmp/casfs-never"], "must be 16K, 32K or 64K"),
        (["init", "--chunk-avg", "lots", "/tmp/casfs-never"], "not a size"),
        (["init", "--zstd-level", "99", "/tmp/casfs-never-2"], "zstd level"),
        (["frobnicate"], "invalid choice"),
        (["stats"], "required"),
        ([], "required"),
    ],
)
def test_bad_input_is_one_line(argv, fragment):
    assert_one_line_error(casfs(*argv), fragment)
    assert not os.path.exists("/tmp/casfs-never-2")


def test_unknown_format_and_corrupt_database(tmp_path):
    store = tmp_path / "s"
    assert casfs("init", str(store)).returncode == 0
    marker = store / layout.MARKER_FILE
    good = marker.read_text()
    marker.write_text(good.replace(f'"format": {layout.FORMAT_VERSION}', '"format": 99'))
    assert_one_line_error(casfs("stats", str(store)), "format version 99")
    marker.write_text(good)
    (store / "data.mdb").write_bytes(os.urandom(64 << 10))
    assert_one_line_error(casfs("fsck", str(store)), str(store))


def test_help_lists_commands():
    r = casfs("--help")
    assert r.returncode == 0
    for command in ("init", "stats", "fsck", "demo"):
        assert command in r.stdout


def test_error_for_a_path_with_newline_and_non_utf8_bytes_is_one_line(tmp_path):
    bad = os.fsdecode(bytes(tmp_path) + b"/\xff\nstore")
    r = casfs("fsck", bad)
    assert_one_line_error(r, "\\xff\\nstore does not exist")


def test_snapshot_commands_offline(tmp_path):
    store = str(tmp_path / "s")
    assert casfs("init", store).returncode == 0
    with Store(store) as s:
        fs = Filesystem(s)
        d = fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
        node = fs.create(d.ino, b"f", 0o644, 0, 0)
        fs.write(node.ino, 0, b"one\n")
        fs.close()
    r = casfs("snapshot", store, "first")
    assert r.returncode == 0 and r.stdout.startswith("created snapshot first: 1 files"), r
    with Store(store) as s:
        fs = Filesystem(s)
        fs.write(fs.lookup(fs.lookup(ROOT_INO, b"d").ino, b"f").ino, 0, b"two\n")
        fs.create(ROOT_INO, b"new", 0o644, 0, 0)
        fs.close()
    assert casfs("snapshot", store, "second").returncode == 0
    r = casfs("snapshot", store, "--json")
    rows = json.loads(r.stdout)
    assert [row["name"] for row in rows] == ["first", "second"]
    assert all(row["exclusive_bytes"] >= 0 for row in rows)
    r = casfs("diff", store, "first", "second")
    assert r.stdout.splitlines() == ["M /d/f", "+ /new"], r.stdout
    assert json.loads(casfs("diff", "--json", store, "second", "@live").stdout) == []
    r = casfs("rollback", store, "first")
    assert r.returncode == 0 and r.stdout.startswith("rolled back to snapshot first"), r
    assert casfs("diff", store, "first", "@live").stdout == ""
    r = casfs("restore", store, "second", "new")
    assert r.returncode == 0 and "restored new from snapshot second to /new" in r.stdout, r
    assert_one_line_error(casfs("restore", store, "second", "new"), "exists (use --force)")
    assert casfs("restore", "--force", store, "second", "new").returncode == 0
    assert casfs("snapshot", "-d", store, "first").returncode == 0
    assert casfs("fsck", store).returncode == 0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("snapshot", "STORE", ""), "invalid snapshot name"),
        (("snapshot", "STORE", "."), "invalid snapshot name"),
        (("snapshot", "STORE", "a/b"), "control character"),
        (("snapshot", "STORE", "x" * 256), "name too long"),
        (("snapshot", "STORE", "new\nline"), "control character"),
        (("snapshot", "STORE", "s"), "exists"),
        (("snapshot", "-d", "STORE", "missing"), "no snapshot named 'missing'"),
        (("snapshot", "-d", "STORE"), "needs the NAME"),
        (("diff", "STORE", "s", "missing"), "no snapshot named"),
        (("rollback", "STORE", "missing"), "no snapshot named"),
        (("restore", "STORE", "s", "nowhere"), "No such file"),
        (("restore", "STORE", "s", "f/x"), "Not a directory"),
        (("restore", "STORE", "s", "f", "nodir/f"), "No such file"),
        (("snapshot", "FILE"), "not a directory"),
        (("snapshot", "NOSTORE"), "neither a casfs mountpoint nor a casfs store"),
        (("snapshot", "MISSING", "x"), "not a directory"),
    ],
)
def test_snapshot_commands_refuse_bad_input(tmp_path, args, fragment):
    store = str(tmp_path / "s")
    assert casfs("init", store).returncode == 0
    with Store(store) as s:
        fs = Filesystem(s)
        fs.create(ROOT_INO, b"f", 0o644, 0, 0)
        fs.close()
    assert casfs("snapshot", store, "s").returncode == 0
    (tmp_path / "file").write_text("x")
    (tmp_path / "plain").mkdir()
    where = {"STORE": store, "FILE": str(tmp_path / "file"), "NOSTORE": str(tmp_path / "plain"),
             "MISSING": str(tmp_path / "missing")}  # fmt: skip
    before = os.path.getsize(os.path.join(store, "data.mdb")), casfs("snapshot", store).stdout
    assert_one_line_error(casfs(*(where.get(a, a) for a in args)), fragment)
    assert (os.path.getsize(os.path.join(store, "data.mdb")), casfs("snapshot", store).stdout) == (
        before
    )
