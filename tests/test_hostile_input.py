"""Hostile input for every ``casfs`` command, run as a user runs it (a subprocess, argv as
bytes): missing, unknown and wrong-type arguments; a STORE that is missing, a file, an empty
or foreign directory, of an unknown format version, with a damaged database or marker file;
snapshot names and paths with newlines, terminal escapes, non-UTF-8 bytes, '/', '..', 300
bytes or '@live' where a real name is required; import sources and export destinations that
are files, missing, the store itself or inside it; mountpoints that are files, missing, not
empty or already a mount.

Each must fail with exit status 2 and exactly one line on stderr, in the ``casfs CMD: ...``
(or argparse's ``casfs CMD: error: ...``) form, with no traceback, every control character
escaped and undecodable bytes shown escaped (the line is valid UTF-8), and nothing on stdout.
Nothing may be written: the tree of test fixtures (stores, sources, would-be destinations) is
compared file by file before and after each command (sha256 of every file; only the contents
of the lock files ``casfs.lock`` and ``lock.mdb``, which every opener touches, may change),
and the valid store must stay fsck-clean. Cases against a mount check the mounted store's
snapshots and live tree instead, and that the mount is still there.

The fixture tree (a valid store with a few files and a snapshot made by ``casfs import``, its
damaged copies, a source, a file, an empty and a foreign directory, a FIFO) is made once per
module, and one mount serves the cases that need one; a command that would change a store if
it succeeded gets a private copy. Each command costs ~0.15 s of CPU (its imports), so the
offline rows run ahead on two identical fixture trees side by side (one per CPU), each tree's
rows one after the other, every row checked as if alone. Positive controls run the same
commands with good input through the same harness. Known bugs are ``xfail(strict=True)``
with the reproduction in their reason.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import PIPE

import pytest
from conftest import CasfsMount, casfs_cli, casfs_mount, is_mounted, truncate_data

from casfs.store import layout
from casfs.store.store import Store
from casfs.tree.fsck import fsck
from casfs.tree.snapshots import all_snapshots
from casfs_cli.main import EXIT_ERROR

TIMEOUT = 60.0
LOCK_FILES = {b"casfs.lock", b"lock.mdb"}  # every opener writes these; their contents may change
# "casfs CMD: message", "casfs: error: ..." (argparse, top level), "casfs CMD: error: ...".
ERROR_LINE = re.compile(r"casfs(?: [a-z]+)?: \S")
CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
LONG = "x" * 300


# -- running the command and judging its output -----------------------------------------------


def run_casfs(args: list[str | bytes], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """``casfs ARGS`` with argv passed as bytes (str arguments are encoded as the OS would,
    so a lone surrogate such as '\\udcff' becomes the byte 0xff)."""
    argv = [os.fsencode(sys.executable), b"-m", b"casfs_cli.main", *map(os.fsencode, args)]
    return subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def check_one_clear_line(r: subprocess.CompletedProcess, expect: tuple[str, ...]) -> str:
    """The failure contract; returns the error line. ``expect``: one of these must be in it."""
    shown = f"exit {r.returncode}\nstdout: {r.stdout!r}\nstderr: {r.stderr!r}"
    assert b"Traceback" not in r.stderr, shown
    assert r.returncode == EXIT_ERROR, shown
    assert r.stdout == b"", shown
    assert r.stderr.endswith(b"\n"), shown
    line = r.stderr[:-1]
    assert b"\n" not in line, f"more than one line: {shown}"
    assert not CONTROL.search(line), f"raw control character: {shown}"
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise AssertionError(f"undecodable bytes not escaped: {shown}") from None
    assert ERROR_LINE.match(text), shown
    assert any(e in text for e in expect), f"none of {expect} in: {text}"
    return text


def sha256_file(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_HASHES: dict[tuple, str] = {}


def file_hash(path: bytes, st: os.stat_result) -> str:
    """sha256 of a file, remembered while its inode, size, mtime and ctime stay the same (any
    write changes the ctime, which nothing can set back): the 1 MiB reserve files of a dozen
    stores are not read again for every case. data.mdb is always read."""
    if os.path.basename(path) == b"data.mdb":
        return sha256_file(path)
    key = (path, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256_file(path)
    return _HASHES[key]


def tree_state(root: Path) -> dict[bytes, tuple]:
    """Every entry below ``root``: type, permission bits, and the sha256 of a regular file's
    contents (not of the lock files, whose contents every opener changes)."""
    root_b = os.fsencode(root)
    out: dict[bytes, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root_b):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest = None
            if stat.S_ISREG(st.st_mode) and name not in LOCK_FILES:
                digest = file_hash(path, st)
            out[os.path.relpath(path, root_b)] = (
                stat.S_IFMT(st.st_mode),
                st.st_mode & 0o7777,
                digest,
            )
    return out


def assert_same_state(before: dict, after: dict) -> None:
    if before == after:
        return
    lines = []
    for key in sorted(before.keys() | after.keys()):
        if before.get(key) != after.get(key):
            lines.append(f"  {key!r}: {before.get(key)!r} -> {after.get(key)!r}")
    raise AssertionError("the command changed files:\n" + "\n".join(lines[:30]))


def assert_fsck_clean(path: Path) -> None:
    with Store(str(path), writer=False) as store:
        report = fsck(store)
    assert report.clean, [f"{p.kind}: {p.message}" for p in report.problems]


def expand(args: tuple[str | bytes, ...], paths: dict[str, str]) -> list[str | bytes]:
    return [a.format_map(paths) if isinstance(a, str) else a for a in args]


def case(case_id: str, *args: str | bytes, expect: str | tuple[str, ...], bug: str = ""):
    """One row: argv (``{name}`` stands for a fixture path) and the words one of which the
    error line must hold. ``bug``: a known bug, the reason of a strict xfail."""
    marks = [pytest.mark.xfail(strict=True, reason=bug)] if bug else []
    expect = (expect,) if isinstance(expect, str) else expect
    return pytest.param(args, expect, id=case_id, marks=marks)


# -- fixtures ---------------------------------------------------------------------------------


@dataclass
class World:
    base: Path
    store: Path  # the valid store: a few files and snapshot "snap1", made with casfs import
    paths: dict[str, str]


def _rewrite_marker(text: str):
    return lambda store: (store / layout.MARKER_FILE).write_text(text)


def _set_format(version: int):
    def damage(store: Path) -> None:
        marker = store / layout.MARKER_FILE
        info = json.loads(marker.read_text())
        marker.write_text(json.dumps({**info, "format": version}))

    return damage


def _garbage(store: Path) -> None:
    data = store / "data.mdb"
    data.write_bytes(random.Random(99).randbytes(data.stat().st_size))


# Damaged copies of the valid store, by placeholder name.
DAMAGED = {
    "fmt99": _set_format(99),
    "trunc100": truncate_data(100),
    "garbage": _garbage,
    "badjson": _rewrite_marker("{not json\n"),
    "trunchalf": truncate_data(None),
    "dataempty": truncate_data(0),
    "datamissing": lambda store: (store / "data.mdb").unlink(),
    "otheruuid": _rewrite_marker(f'{{"format": {layout.FORMAT_VERSION}, "uuid": "x"}}'),
    "markerlist": _rewrite_marker(f"[{layout.FORMAT_VERSION}]"),
    "markernested": _rewrite_marker("[" * 100_000 + "]" * 100_000),
}


def make_source(path: Path) -> None:
    (path / "d").mkdir(parents=True)
    (path / "a").write_bytes(b"hello\n" * 5000)
    (path / "d" / "b").write_bytes(random.Random(1).randbytes(70_000))


def make_world(base: Path) -> World:
    src = base / "src"
    make_source(src)
    store = base / "store"
    for argv in (("init", store), ("import", store, src, "-s", "snap1")):
        r = casfs_cli(*argv)
        assert r.returncode == 0, r.stderr
    (base / "file").write_text("not a store\n")
    (base / "empty").mkdir()
    (base / "plain").mkdir()
    (base / "plain" / "notes.txt").write_text("a directory, not a store\n")
    (base / "emptymp").mkdir()  # an empty mountpoint no case may mount
    (base / "demo-mntfile").mkdir()
    (base / "demo-mntfile" / "mnt").write_text("a file where demo wants its mountpoint\n")
    os.mkfifo(base / "fifo")
    paths = {
        "base": str(base),
        "store": str(store),
        "src": str(src),
        "file": str(base / "file"),
        "empty": str(base / "empty"),
        "plain": str(base / "plain"),
        "missing": str(base / "missing"),
        "fifo": str(base / "fifo"),
        "emptymp": str(base / "emptymp"),
        "dest": str(base / "dest"),  # an export destination that must not appear
    }
    for name, damage in DAMAGED.items():
        shutil.copytree(store, base / name)
        damage(base / name)
        paths[name] = str(base / name)
    assert_fsck_clean(store)
    return World(base, store, paths)


# The offline table runs on this many identical fixture trees at once (one per CPU, at most
# two): each command costs ~0.15 s of CPU, mostly imports, and there are a few hundred.
REPLICAS = max(1, min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def worlds(tmp_path_factory) -> Iterator[list[World]]:
    ws = [make_world(tmp_path_factory.mktemp("hostile")) for _ in range(REPLICAS)]
    initial = [tree_state(w.store) for w in ws]
    yield ws
    # Whatever ran in between: each valid store is as it was and casfs fsck finds it clean.
    for w, state in zip(ws, initial, strict=True):
        assert_same_state(state, tree_state(w.store))
        r = casfs_cli("fsck", w.store)
        assert r.returncode == 0 and r.stdout.strip().endswith(": clean"), r.stdout + r.stderr


@pytest.fixture(scope="module")
def world(worlds) -> World:
    return worlds[0]


@dataclass
class Mounted:
    m: CasfsMount
    paths: dict[str, str]


@pytest.fixture(scope="module")
def mounted(world, tmp_path_factory) -> Iterator[Mounted]:
    """A second store, mounted for the whole module (and always unmounted after it): snapshot
    "snap1" imported through the mount, and a directory d/ with a file in the live tree."""
    with casfs_mount(tmp_path_factory.mktemp("hostile-mount")) as m:
        r = casfs_cli("import", m.mnt, world.paths["src"], "-s", "snap1")
        assert r.returncode == 0, r.stderr
        (m.mnt / "d").mkdir()
        (m.mnt / "d" / "f").write_bytes(b"live data\n" * 1000)
        fd = os.open(m.mnt / "d" / "f", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        yield Mounted(m, {**world.paths, "mnt": str(m.mnt), "mstore": str(m.store)})


def mount_state(m: CasfsMount) -> tuple:
    """The mounted store's snapshots (read beside the mount) and its live tree."""
    with Store(str(m.store), writer=False) as store, store.read() as tx:
        snaps = [(s.name, s.id) for s in all_snapshots(tx)]
    return snaps, tree_state(m.mnt)


def unmount_if_mounted(store: str, mountpoint: str) -> None:
    if is_mounted(mountpoint):
        CasfsMount(Path(store), Path(mountpoint)).teardown()


# -- 1. a STORE argument that is not a usable store, for every command that takes one ----------

STORE_COMMANDS = {
    "stats": ("stats", "{S}"),
    "fsck": ("fsck", "--verify-data", "{S}"),
    "snapshot": ("snapshot", "{S}", "new1"),
    "diff": ("diff", "{S}", "snap1", "@live"),
    "rollback": ("rollback", "{S}", "snap1"),
    "restore": ("restore", "{S}", "snap1", "a"),
    "import": ("import", "{S}", "{src}", "-s", "new2"),
    "export": ("export", "{S}", "snap1", "{dest}"),
    "prune": ("prune", "{S}", "--keep-last", "1"),
    "compact": ("compact", "{S}"),
    "digest": ("digest", "--store", "{S}", "{src}/a"),
    "mount": ("mount", "{S}", "{emptymp}"),
}
# What the one line must say, by kind of bad STORE.
STORE_FAULTS = {
    "missing": ("does not exist", "not a directory"),
    "file": ("not a directory", "not a casfs store"),
    "empty": ("not a casfs store", "neither a casfs mountpoint nor a casfs store"),
    "plain": ("not a casfs store", "neither a casfs mountpoint nor a casfs store"),
    "fmt99": "has format version 99",
    "trunc100": "data.mdb is damaged",
    "garbage": "database is damaged",
    "badjson": "casfs-store.json is damaged",
    "trunchalf": "data.mdb is truncated",
    "dataempty": ("data.mdb is damaged", "data.mdb is empty"),
    "datamissing": "data.mdb is missing",
    "otheruuid": "database does not match its marker file",
    "markerlist": "casfs-store.json is damaged",
    "markernested": "casfs-store.json is damaged",
}
BRIEF_FAULTS = ("missing", "file", "empty", "plain", "fmt99", "trunc100", "garbage", "badjson")
# Commands that open a store the same way take turns: each meets two of the bad stores,
# every other command all eight. The other damages meet the commands that reach them in a way
# tests/test_corruption.py does not try already.
TAKE_TURNS = (("fsck", "digest"), ("diff", "rollback", "restore", "prune"))
EXTRA_FAULT_COMMANDS = {
    "trunchalf": ("import",),
    "dataempty": ("import",),
    "datamissing": ("import",),
    "otheruuid": ("stats", "import", "mount"),
    "markerlist": ("stats",),
    "markernested": ("stats", "mount"),
}


def _commands_for(fault: str) -> list[str]:
    if fault not in BRIEF_FAULTS:
        return list(EXTRA_FAULT_COMMANDS[fault])
    i = BRIEF_FAULTS.index(fault)
    turn = {group[i % len(group)] for group in TAKE_TURNS}
    rest = {c for group in TAKE_TURNS for c in group} - turn
    return [c for c in STORE_COMMANDS if c not in rest]


# mount reads the marker before it forks; a bad database is found by the daemon only.
DAEMON_FAULTS = {"trunc100", "garbage", "trunchalf", "dataempty", "datamissing", "otheruuid"}


def _store_cases():
    for fault in STORE_FAULTS:
        for command in _commands_for(fault):
            bug = ""
            args = tuple(a.replace("{S}", "{" + fault + "}") for a in STORE_COMMANDS[command])
            yield case(f"{fault}-{command}", *args, expect=STORE_FAULTS[fault], bug=bug)
    for fault, what in (("file", "not a directory"), ("plain", "not empty"), ("fmt99", "empty")):
        yield case(f"{fault}-init", "init", "{" + fault + "}", expect=what)


# -- 2. arguments: missing, unknown, of the wrong type --------------------------------------

ARG_CASES = [
    case("no-command-flag", "--bogus", expect="required: COMMAND"),
    case("stats-unknown-short", "stats", "-x", "{store}", expect="unrecognized arguments: -x"),
    case("init-none", "init", expect="required: STORE"),
    case("init-bogus", "init", "{base}/new-a", "--bogus", expect="unrecognized arguments"),
    case("init-chunk-3Q", "init", "{base}/new-b", "--chunk-avg", "3Q", expect="not a size"),
    case("init-chunk-neg", "init", "{base}/new-c", "--chunk-avg", "-64K", expect="expected one"),
    case("init-chunk-nan", "init", "{base}/new-e", "--chunk-avg", "nanK", expect="not a size"),
    case("init-chunk-empty", "init", "{base}/new-f", "--chunk-avg", "", expect="not a size"),
    case(
        "init-chunk-0",
        *("init", "{base}/new-g", "--chunk-avg", "0"),
        expect="positive",
    ),
    case(
        "init-chunk-inf",
        *("init", "{base}/new-h", "--chunk-avg", "infK"),
        expect="not a size",
    ),
    case("init-zstd-x", "init", "{base}/new-j", "--zstd-level", "x", expect="invalid int"),
    case("init-zstd-0", "init", "{base}/new-k", "--zstd-level", "0", expect="zstd level"),
    case("init-zstd-23", "init", "{base}/new-l", "--zstd-level", "23", expect="zstd level"),
    case("init-long-name", "init", "{base}/" + LONG, expect="File name too long"),
    case("init-parent-missing", "init", "{missing}/\x1b[31m\n/s", expect="does not exist"),
    case("init-parent-file", "init", "{file}/s", expect="does not exist"),
    case("stats-json-only", "stats", "--json", expect="required: STORE"),
    case("stats-bogus", "stats", "{store}", "--bogus", expect="unrecognized arguments"),
    case("stats-json-value", "stats", "--json=1", "{store}", expect="ignored explicit"),
    case("stats-escape-path", "stats", "{base}/\x1b[31m\r\udcff", expect="does not exist"),
    case("stats-path-max", "stats", "/" + "y" * 5000, expect="does not exist"),
    case("fsck-none", "fsck", expect="required: STORE"),
    case("fsck-bogus", "fsck", "{store}", "--repair", expect="unrecognized arguments"),
    case("mount-none", "mount", expect="required: STORE, MOUNTPOINT"),
    case("mount-store-only", "mount", "{store}", expect="required: MOUNTPOINT"),
    case("mount-bogus", "mount", "{store}", "{emptymp}", "--bogus", expect="unrecognized"),
    case(
        "mount-buffer-3Q",
        *("mount", "{store}", "{emptymp}", "--write-buffer", "3Q"),
        expect="not a size",
    ),
    case(
        "mount-buffer-inf",
        *("mount", "{store}", "{emptymp}", "--write-buffer", "infK"),
        expect="not a size",
    ),
    case("umount-none", "umount", expect="required: MOUNTPOINT"),
    case("umount-bogus", "umount", "{emptymp}", "--bogus", expect="unrecognized arguments"),
    case("snapshot-none", "snapshot", expect="required: MOUNT_OR_STORE"),
    case("snapshot-bogus", "snapshot", "{store}", "--all", expect="unrecognized arguments"),
    case("snapshot-extra", "snapshot", "{store}", "a", "b", expect="unrecognized arguments"),
    case("diff-none", "diff", expect="required: MOUNT_OR_STORE, OLD, NEW"),
    case("diff-no-new", "diff", "{store}", "snap1", expect="required: NEW"),
    case("rollback-no-name", "rollback", "{store}", expect="required: NAME"),
    case("restore-no-path", "restore", "{store}", "snap1", expect="required: PATH"),
    case("import-no-name", "import", "{store}", "{src}", expect="--snapshot/-s"),
    case("import-s-no-value", "import", "{store}", "{src}", "-s", expect="expected one"),
    case("export-no-dest", "export", "{store}", "snap1", expect="required: DEST"),
    case("digest-none", "digest", expect="required: PATH"),
    case("digest-store-no-value", "digest", "--store", expect="expected one argument"),
    case("prune-none", "prune", expect="required: MOUNT_OR_STORE"),
    case("prune-no-rule", "prune", "{store}", expect="at least one --keep"),
    case("prune-daily-x", "prune", "{store}", "--keep-daily", "x", expect="invalid int"),
    case("prune-last-1.5", "prune", "{store}", "--keep-last", "1.5", expect="invalid int"),
    case("prune-hourly-neg", "prune", "{store}", "--keep-hourly", "-5", expect="negative"),
    case("compact-none", "compact", expect="required: STORE"),
    case("compact-bogus", "compact", "{store}", "--force", expect="unrecognized arguments"),
    case("demo-extra", "demo", "{base}/demo-x", "more", expect="unrecognized arguments"),
    case("demo-dir-is-file", "demo", "{file}", expect="Not a directory"),
    case("demo-mnt-is-file", "demo", "{base}/demo-mntfile", expect="File exists"),
    case("command-non-utf8", "\udcff\n\x1b[0m", expect="invalid choice"),
]

# -- 3. snapshot names and paths --------------------------------------------------------------

NAMES = {
    "newline": b"a\nb",
    "cr": b"a\rb",
    "escape": b"\x1b[31mred",
    "non-utf8": b"\xff\xfe",
    "slash": b"/",
    "dotdot": b"..",
    "300-bytes": LONG.encode(),
    "at-live": b"@live",
}
# Commands that need the name of an existing snapshot (NAME), or take a new one.
NAME_COMMANDS = {
    "snapshot-take": ("snapshot", "{store}", "NAME"),
    "snapshot-delete": ("snapshot", "-d", "{store}", "NAME"),
    "diff": ("diff", "{store}", "NAME", "snap1"),
    "rollback": ("rollback", "{store}", "NAME"),
    "restore": ("restore", "{store}", "NAME", "a"),
    "import": ("import", "{store}", "{src}", "-s", "NAME"),
    "export": ("export", "{store}", "NAME", "{dest}"),
}
NO_SUCH_SNAPSHOT = "no snapshot named"
BAD_NEW_NAME = (
    "has '/' or a control character",
    "invalid snapshot name",
    "snapshot name of 300 bytes",
    "names starting with '@' are reserved",
)
VALID_NEW_NAMES = {"non-utf8"}


# tests/test_cli.py already takes snapshots named "new\nline" and "a/b" offline.
IN_TEST_CLI = {"newline", "slash"}


def _name_cases():
    """Each name where a new snapshot is named (snapshot, or import), where an existing one is
    needed (rollback), and in one more command, in turn: each command meets most kinds."""
    others = ("snapshot-delete", "diff", "restore", "export")
    for i, (name_id, name) in enumerate(NAMES.items()):
        if name_id in VALID_NEW_NAMES:  # a snapshot name is bytes: 0xff 0xfe is a good one
            new = "snapshot-delete"
        else:
            new = "import" if name_id in IN_TEST_CLI else "snapshot-take"
        third = others[i % len(others)]
        if third == "diff" and name_id == "at-live":
            third = "export"  # @live is the live tree: a good OLD for diff
        for command in (new, "rollback", third):
            args = tuple(name if a == "NAME" else a for a in NAME_COMMANDS[command])
            expect = BAD_NEW_NAME if command in ("snapshot-take", "import") else NO_SUCH_SNAPSHOT
            yield case(f"{command}-{name_id}", *args, expect=expect)


PATH_CASES = [
    case("restore-path-escape", "restore", "{store}", "snap1", b"\x1b]0;x\x07", expect="No such"),
    case("restore-path-non-utf8", "restore", "{store}", "snap1", b"\xff", expect="No such file"),
    case("restore-path-dotdot", "restore", "{store}", "snap1", b"d/../..", expect="'..'"),
    case("restore-path-root", "restore", "{store}", "snap1", b"/", expect="onto the root"),
    case("restore-dest-dotdot", "restore", "{store}", "snap1", "a", "..", expect="invalid name"),
    case("restore-dest-root", "restore", "{store}", "snap1", "a", "/", expect="onto the root"),
    case("restore-dest-long", "restore", "{store}", "snap1", "a", LONG, expect="too long"),
    case("restore-dest-no-dir", "restore", "{store}", "snap1", "a", "x/\n/y", expect="No such"),
    case("export-path-dotdot", "export", "{store}", "snap1", "{dest}", "..", expect="'..'"),
    case("export-path-non-utf8", "export", "{store}", "snap1", "{dest}", b"\xff", expect="No such"),
    case("export-path-in-file", "export", "{store}", "snap1", "{dest}", "a/b", expect="Not a dir"),
    case("export-path-at-live", "export", "{store}", "@live", "{dest}", expect="no snapshot"),
]

# -- 4. import sources and export destinations ------------------------------------------------

SRC_DEST_CASES = [
    case("import-src-missing", "import", "{store}", "{missing}", "-s", "n", expect="not exist"),
    case("import-src-file", "import", "{store}", "{file}", "-s", "n", expect="not a directory"),
    case("import-src-fifo", "import", "{store}", "{fifo}", "-s", "n", expect="not a directory"),
    case("import-src-store", "import", "{store}", "{store}", "-s", "n", expect="store itself"),
    case("import-src-escape", "import", "{store}", "{base}/\x1b[2J", "-s", "n", expect="not exist"),
    case("import-name-exists", "import", "{store}", "{src}", "-s", "snap1", expect="exists"),
    case("export-dest-file", "export", "{store}", "snap1", "{file}", expect="use --force"),
    case("export-dest-nonempty", "export", "{store}", "snap1", "{plain}", expect="use --force"),
    case("export-dest-store", "export", "{store}", "snap1", "{store}", expect="store itself"),
    case("export-dest-no-parent", "export", "{store}", "snap1", "{missing}/x", expect="not exist"),
    case("export-dest-in-file", "export", "{store}", "snap1", "{file}/x", expect="not a directory"),
    case("export-dest-long", "export", "{store}", "snap1", "{base}/" + LONG, expect="too long"),
    case("export-name-missing", "export", "{store}", "nosuch", "{dest}", expect="no snapshot"),
    case("digest-missing", "digest", "{missing}", expect="No such file"),
    case("digest-not-casfs", "digest", "{file}", expect="no user.casfs.digest"),
    case("digest-directory", "digest", "{empty}", expect="no user.casfs.digest"),
    case("digest-escape", "digest", "{base}/\x1b[31m\n\udcff", expect="No such file"),
    case("digest-store-dir", "digest", "--store", "{store}", "{plain}", expect="not a regular"),
    case("digest-store-is-file", "digest", "--store", "{file}", "{src}/a", expect="not a casfs"),
    case("mount-mp-file", "mount", "{store}", "{file}", expect="is not a directory"),
    case("mount-mp-missing", "mount", "{store}", "{missing}", expect="does not exist"),
    case("mount-mp-nonempty", "mount", "{store}", "{plain}", expect="is not empty"),
    case("mount-mp-is-store", "mount", "{store}", "{store}", expect="is not empty"),
    case("umount-missing", "umount", "{missing}", expect="is not a casfs mount"),
    case("umount-file", "umount", "{file}", expect="is not a casfs mount"),
    case("umount-store", "umount", "{store}", expect="is not a casfs mount"),
    case("umount-escape", "umount", "{base}/\x1b[31m\n\udcff", expect="is not a casfs mount"),
]


OFFLINE_CASES = [*_store_cases(), *ARG_CASES, *_name_cases(), *PATH_CASES, *SRC_DEST_CASES]
assert len({p.id for p in OFFLINE_CASES}) == len(OFFLINE_CASES), "row ids must be unique"


@dataclass
class Outcome:
    argv: list[str | bytes]
    result: subprocess.CompletedProcess | None = None
    failure: str = ""  # the harness's own trouble (a timeout), or files the command changed
    fsck_problems: list[str] = field(default_factory=list)


def run_offline_case(w: World, args: tuple) -> Outcome:
    """One row against one fixture tree: run it, note every file it changed anywhere in the
    tree, and fsck the valid store."""
    out = Outcome(expand(args, w.paths))
    before = tree_state(w.base)
    try:
        out.result = run_casfs(out.argv)
    except subprocess.TimeoutExpired:
        out.failure = f"no answer in {TIMEOUT:.0f} s"
    finally:
        if len(args) == 3 and args[0] == "mount":  # had it mounted after all, take it down
            unmount_if_mounted(str(out.argv[1]), str(out.argv[2]))
    try:
        assert_same_state(before, tree_state(w.base))
    except AssertionError as exc:
        out.failure += str(exc)
    with Store(str(w.store), writer=False) as store:
        out.fsck_problems = [f"{p.kind}: {p.message}" for p in fsck(store).problems]
    return out


@pytest.fixture(scope="module")
def offline_outcomes(request, worlds) -> dict[str, Outcome]:
    """Every selected offline row, run ahead: the rows are dealt to the fixture trees in turn,
    each tree's rows run one after the other (as they would alone), the trees side by side."""
    selected = {
        item.callspec.id
        for item in request.session.items
        if getattr(item, "originalname", "") == "test_bad_input_offline"
    }
    rows = [p for p in OFFLINE_CASES if p.id in selected]

    def run_share(i: int) -> dict[str, Outcome]:
        share = rows[i :: len(worlds)]
        return {p.id: run_offline_case(worlds[i], p.values[0]) for p in share}

    outcomes: dict[str, Outcome] = {}
    with concurrent.futures.ThreadPoolExecutor(len(worlds)) as pool:
        for part in pool.map(run_share, range(len(worlds))):
            outcomes.update(part)
    return outcomes


@pytest.mark.parametrize(("args", "expect"), OFFLINE_CASES)
def test_bad_input_offline(offline_outcomes, request, args, expect):
    o = offline_outcomes[request.node.callspec.id]
    assert o.result is not None, f"{o.argv!r}: {o.failure}"
    check_one_clear_line(o.result, expect)
    assert not o.failure, f"{o.argv!r}: {o.failure}"
    assert not o.fsck_problems, o.fsck_problems


# -- 5. against a running mount ---------------------------------------------------------------

MOUNT_NAMES = ("newline", "escape", "non-utf8", "slash", "300-bytes", "at-live")


def _mounted_name_cases():
    for name_id in MOUNT_NAMES:
        name = NAMES[name_id]
        if name_id in VALID_NEW_NAMES:
            yield case(
                f"delete-{name_id}", "snapshot", "-d", "{mnt}", name, expect=NO_SUCH_SNAPSHOT
            )
        else:
            yield case(f"take-{name_id}", "snapshot", "{mnt}", name, expect=BAD_NEW_NAME)
        if name_id not in ("escape", "slash"):
            yield case(f"rollback-{name_id}", "rollback", "{mnt}", name, expect=NO_SUCH_SNAPSHOT)
    yield case("import-newline", "import", "{mnt}", "{src}", "-s", b"a\nb", expect=BAD_NEW_NAME)
    yield case("restore-at-live", "restore", "{mnt}", "@live", "a", expect=NO_SUCH_SNAPSHOT)
    yield case("diff-newline", "diff", "{mnt}", "snap1", b"a\nb", expect=NO_SUCH_SNAPSHOT)
    yield case("export-escape", "export", "{mnt}", b"\x1b[31m", "{dest}", expect=NO_SUCH_SNAPSHOT)


MOUNTED_CASES = [
    case("mount-on-the-mount", "mount", "{store}", "{mnt}", expect="already a mount point"),
    case("mount-mounted-store", "mount", "{mstore}", "{emptymp}", expect="already mounted"),
    case("umount-dir-in-mount", "umount", "{mnt}/d", expect="is not a casfs mount"),
    case("snapshot-dir-in-mount", "snapshot", "{mnt}/d", expect="neither a casfs mountpoint"),
    case("compact-mounted", "compact", "{mstore}", expect="in use by PID"),
    case("import-src-mounted-store", "import", "{mnt}", "{mstore}", "-s", "n", expect="itself"),
    case("import-name-exists", "import", "{mnt}", "{src}", "-s", "snap1", expect="exists"),
    case("restore-exists", "restore", "{mnt}", "snap1", "a", "d", expect="use --force"),
    case("restore-path-dotdot", "restore", "{mnt}", "snap1", "..", expect="'..'"),
    case("restore-dest-outside", "restore", "{mnt}", "snap1", "a", "{mnt}/../x", expect="'..'"),
    case("export-dest-nonempty", "export", "{mnt}", "snap1", "{mnt}", expect="use --force"),
    case("digest-dir-in-mount", "digest", "{mnt}/d", expect="no user.casfs.digest"),
    case("prune-no-rule", "prune", "{mnt}", expect="at least one --keep"),
]


@pytest.mark.parametrize(("args", "expect"), [*_mounted_name_cases(), *MOUNTED_CASES])
def test_bad_input_mounted(world, mounted, args, expect):
    m = mounted.m
    argv = expand(args, mounted.paths)
    before, before_mount = tree_state(world.base), mount_state(m)
    try:
        r = run_casfs(argv)
    finally:
        if args[0] == "mount" and argv[2] != mounted.paths["mnt"]:
            unmount_if_mounted(str(argv[1]), str(argv[2]))
    check_one_clear_line(r, expect)
    assert is_mounted(m.mnt), "a failing command took the mount down"
    assert_same_state(before, tree_state(world.base))
    assert mount_state(m) == before_mount


# -- 6. known bugs that need a private store, a mount or a timeout ----------------------------


@pytest.fixture
def own_store(world, tmp_path) -> Path:
    """A private copy of the valid store, for commands that would change it."""
    store = tmp_path / "store"
    shutil.copytree(world.store, store)
    return store


def test_export_refuses_a_destination_inside_the_store(own_store):
    before = tree_state(own_store)
    r = run_casfs(["export", str(own_store), "snap1", str(own_store / "sub")])
    check_one_clear_line(r, ("store",))
    assert_same_state(before, tree_state(own_store))


def test_export_force_never_overwrites_the_store_itself(own_store, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "data.mdb").write_text("not a database\n")
    assert run_casfs(["import", str(own_store), str(evil), "-s", "evil"]).returncode == 0
    before = tree_state(own_store)
    r = run_casfs(["export", "--force", str(own_store), "evil", str(own_store)])
    check_one_clear_line(r, ("store",))
    assert_same_state(before, tree_state(own_store))


def test_import_refuses_a_source_inside_the_store(own_store):
    before = tree_state(own_store)
    r = run_casfs(["import", str(own_store), str(own_store / "imports"), "-s", "inside"])
    check_one_clear_line(r, ("store",))
    assert_same_state(before, tree_state(own_store))


def test_demo_never_deletes_a_directory_it_did_not_make(tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "precious.txt").write_text("not casfs's to delete\n")
    (tmp_path / "mnt").write_text("a file: demo cannot mount here\n")
    before = tree_state(tmp_path)
    r = run_casfs(["demo", str(tmp_path)])
    check_one_clear_line(r, ("not a casfs store",))
    assert_same_state(before, tree_state(tmp_path))


def test_digest_store_on_a_fifo_does_not_hang(world):
    argv = [sys.executable, "-m", "casfs_cli.main", "digest", "--store", str(world.store)]
    argv.append(world.paths["fifo"])
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=PIPE, stderr=PIPE)
    deadline = time.monotonic() + TIMEOUT
    try:
        while p.poll() is None:
            # Blocked in open(2) of a FIFO that has no writer: it would wait forever.
            assert kernel_wait(p.pid) != "wait_for_partner", "blocked opening the FIFO"
            assert time.monotonic() < deadline, f"still running after {TIMEOUT:.0f} s"
            time.sleep(0.05)
        out, err = p.communicate()
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    check_one_clear_line(subprocess.CompletedProcess(argv, p.returncode, out, err), ("regular",))


def kernel_wait(pid: int) -> str:
    """Where in the kernel ``pid`` sleeps (/proc/PID/wchan), or '' if unknown."""
    try:
        with open(f"/proc/{pid}/wchan", encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return ""


@pytest.mark.parametrize("size", ["-1", "0"])
def test_mount_refuses_a_write_buffer_that_is_not_positive(own_store, tmp_path, size):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        r = run_casfs(["mount", str(own_store), str(mnt), "--write-buffer", size])
        mounted_after = is_mounted(mnt)
    finally:
        unmount_if_mounted(str(own_store), str(mnt))  # nothing was written: umount is quick
    check_one_clear_line(r, ("write-buffer", "size"))
    assert not mounted_after


@pytest.mark.parametrize("command", ["rollback", "delete"])
def test_non_utf8_snapshot_name_is_shown_as_escaped_bytes(world, command):
    args = ["rollback", str(world.store), b"\xff"]
    if command == "delete":
        args = ["snapshot", "-d", str(world.store), b"\xff"]
    line = check_one_clear_line(run_casfs(args), ("no snapshot named",))
    assert "\\xff" in line, line


# -- 7. positive controls: the same commands with good input ----------------------------------

GOOD_READS = [
    case("stats", "stats", "{store}", expect="inodes"),
    case("fsck", "fsck", "--verify-data", "{store}", expect=": clean"),
    case("snapshot-list", "snapshot", "{store}", expect="snap1"),
    case("diff", "diff", "{store}", "snap1", "snap1", expect=""),
    case("export", "export", "{store}", "snap1", "{out}/x", expect="exported snapshot snap1"),
    case("export-path", "export", "{store}", "snap1", "{out}/y", "d/b", expect="snap1:/d/b"),
    case("digest-store", "digest", "--store", "{store}", "{src}/a", expect="  "),
    case("prune-dry-run", "prune", "{store}", "--keep-last", "1", "-n", expect="would remove 0"),
    case("prune-prefix-escape", "prune", "{store}", "-P", "\x1b", "--keep-last", "1", expect="0"),
    case("init", "init", "{out}/new", "--chunk-avg", "16K", expect="created store"),
    case("snapshot-list-mnt", "snapshot", "--json", "{mnt}", expect='"snap1"'),
    case("diff-mnt", "diff", "{mnt}", "snap1", "@live", expect="+ /d/f"),
    case("digest-mnt", "digest", "{mnt}/d/f", expect="  "),
]


@pytest.mark.parametrize(("args", "expect"), GOOD_READS)
def test_good_input_succeeds(world, mounted, tmp_path, args, expect):
    out = tmp_path / "out"
    out.mkdir()
    argv = expand(args, {**mounted.paths, "out": str(out)})
    before, before_mount = tree_state(world.base), mount_state(mounted.m)
    r = run_casfs(argv)
    assert r.returncode == 0 and r.stderr == b"", r
    assert expect[0].encode() in r.stdout, r.stdout
    assert not CONTROL.search(r.stdout.replace(b"\n", b"")), r.stdout
    assert_same_state(before, tree_state(world.base))
    assert mount_state(mounted.m) == before_mount


def test_good_input_that_writes_succeeds(own_store, world, tmp_path):
    """Every writing command works on a copy of the store, names with odd bytes included."""
    s = str(own_store)
    for argv in (
        ["snapshot", s, b"\xff\xfe odd name"],
        ["snapshot", "-d", s, b"\xff\xfe odd name"],
        ["import", s, world.paths["src"], "-s", "second"],
        ["restore", s, "snap1", "d"],
        ["restore", s, "snap1", "a", b"new\nline"],
        ["rollback", s, "second"],
        ["prune", s, "--keep-last", "1"],
        ["compact", s],
    ):
        r = run_casfs(argv)
        assert r.returncode == 0 and r.stderr == b"", (argv, r)
        assert not CONTROL.search(r.stdout.replace(b"\n", b"")), r.stdout
    r = run_casfs(["snapshot", "--json", s])
    assert [row["name"] for row in json.loads(r.stdout)] == ["second"]
    assert_fsck_clean(own_store)


def test_the_judge_rejects_what_it_should():
    """The harness itself: each way of breaking the contract is caught."""

    def judged(rc: int, err: bytes, out: bytes = b"") -> bool:
        try:
            check_one_clear_line(subprocess.CompletedProcess([], rc, out, err), ("bad",))
        except AssertionError:
            return False
        return True

    assert judged(2, b"casfs stats: bad store\n")
    assert judged(2, b"casfs: error: bad (see casfs --help)\n")
    assert not judged(0, b"casfs stats: bad store\n")
    assert not judged(1, b"casfs stats: bad store\n")
    assert not judged(-7, b"")
    assert not judged(2, b"casfs stats: bad\nstore\n")
    assert not judged(2, b"casfs stats: bad \x1b[31mstore\n")
    assert not judged(2, b"casfs stats: bad \xff store\n")
    assert not judged(2, b"Traceback (most recent call last):\nValueError: bad\n")
    assert not judged(2, b"stats: bad store\n")
    assert not judged(2, b"casfs stats: bad store\n", b"partial output\n")
    assert not judged(2, b"casfs stats: good store\n")
