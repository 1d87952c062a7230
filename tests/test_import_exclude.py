"""``casfs import --exclude/--exclude-from/--exclude-caches``: what is left out, offline and
through a mount, and an incremental import that never reuses a tree taken with other options.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import CasfsMount, casfs_cli

from casfs.errors import CasfsError
from casfs.workflows.selection import CACHEDIR_SIGNATURE, Selection, read_patterns


def cli_ok(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    r = casfs_cli(*args)
    assert r.returncode == 0 and r.stderr == "", f"casfs {args}: {r.stderr}"
    return r


def import_json(target: Path, src: Path, name: str, *options: str) -> dict:
    return json.loads(cli_ok("import", target, src, "-s", name, "--json", *options).stdout)


def paths_of(root: Path) -> set[str]:
    """Every path below ``root``, relative, directories with a trailing '/'."""
    out = set()
    for dirpath, dirs, files in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel + "/"
        out.update(prefix + d + "/" for d in dirs)
        out.update(prefix + f for f in files)
    return out


def snapshot_paths(store: Path, name: str, tmp_path: Path) -> set[str]:
    dest = tmp_path / f"export-{name}"
    cli_ok("export", store, name, dest)
    return paths_of(dest)


def make_source(src: Path) -> Path:
    files = {
        "README": b"top",
        "build.pyc": b"compiled",
        "pkg/mod.py": b"code",
        "pkg/mod.pyc": b"compiled",
        "pkg/node_modules/dep/index.js": b"dep",
        "pkg/tmp": b"a file named tmp stays",
        "tmp/scratch": b"a directory named tmp goes",
        "build/cache/blob": b"anchored",
        "deep/build/cache/blob": b"not anchored: stays",
        "cache/CACHEDIR.TAG": CACHEDIR_SIGNATURE + b"\n# a cache\n",
        "cache/entries/e1": b"cached",
        "fake-cache/CACHEDIR.TAG": b"not the signature",
        "fake-cache/kept": b"kept",
    }
    for rel, data in files.items():
        path = src / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return src


EVERYTHING = {
    "README", "build.pyc", "pkg/", "pkg/mod.py", "pkg/mod.pyc", "pkg/node_modules/",
    "pkg/node_modules/dep/", "pkg/node_modules/dep/index.js", "pkg/tmp", "tmp/", "tmp/scratch",
    "build/", "build/cache/", "build/cache/blob", "deep/", "deep/build/", "deep/build/cache/",
    "deep/build/cache/blob", "cache/", "cache/CACHEDIR.TAG", "cache/entries/",
    "cache/entries/e1", "fake-cache/", "fake-cache/CACHEDIR.TAG", "fake-cache/kept",
}  # fmt: skip
OPTIONS = ("--exclude", "*.pyc", "-e", "node_modules", "-e", "tmp/", "-e", "/build/cache")
SELECTED = EVERYTHING - {
    "build.pyc", "pkg/mod.pyc", "pkg/node_modules/", "pkg/node_modules/dep/",
    "pkg/node_modules/dep/index.js", "tmp/", "tmp/scratch", "build/cache/", "build/cache/blob",
    "cache/entries/", "cache/entries/e1",
}  # fmt: skip


@pytest.mark.parametrize(
    "pattern, rel, is_dir, excluded",
    [
        ("*.o", "a.o", False, True),
        ("*.o", "x/y/a.o", False, True),  # no '/': a name at any depth
        ("*.o", "a.oo", False, False),
        ("a?c", "abc", False, True),
        ("a?c", "a/c", False, False),  # '?' never matches '/'
        ("f[0-9]", "f7", False, True),
        ("f[!0-9]", "f7", False, False),
        ("f[!0-9]", "fx", False, True),
        ("[]]x", "]x", False, True),
        ("src/*.c", "src/a.c", False, True),  # with '/': anchored at the source
        ("src/*.c", "lib/src/a.c", False, False),
        ("src/*.c", "src/sub/a.c", False, False),  # '*' stays within one name
        ("/top", "top", False, True),
        ("/top", "x/top", False, False),
        ("**/target", "target", True, True),
        ("**/target", "a/b/target", True, True),
        ("a/**/z", "a/z", False, True),
        ("a/**/z", "a/b/c/z", False, True),
        ("logs/**", "logs/x/y", False, True),
        ("logs/**", "logs", True, False),
        ("out/", "out", True, True),  # trailing '/': directories only
        ("out/", "out", False, False),
        ("a.b", "axb", False, False),  # regex characters are literal
        ("a+(b)", "a+(b)", False, True),
    ],
)
def test_patterns(pattern: str, rel: str, is_dir: bool, excluded: bool):
    s = Selection.of([pattern])
    name = rel.rpartition("/")[2]
    assert s.excluded(os.fsencode(rel), os.fsencode(name), is_dir) is excluded


@pytest.mark.parametrize(
    "patterns, rel, is_dir, excluded",
    [
        (["*.log", "!keep.log"], "a/keep.log", False, False),  # taken back
        (["*.log", "!keep.log"], "a/other.log", False, True),
        (["*.log", "!keep.log", "a/*.log"], "a/keep.log", False, True),  # the last match decides
        (["!keep.log", "*.log"], "keep.log", False, True),  # taking back first changes nothing
        (["!*.c"], "x.c", False, False),  # a negation alone leaves everything in
        (["build/*", "!build/keep"], "build/keep", True, False),
        (["build/*", "!build/keep"], "build/other", True, True),
        (["out/", "!out/"], "out", True, False),
        (["*.o", "!x.o/"], "x.o", False, True),  # (a directories-only negation)
        (["*.o", "!x.o/"], "x.o", True, False),
        (["\\!bang"], "!bang", False, True),  # a literal '!'
        (["\\!bang"], "bang", False, False),
        (["*", "!\\!bang"], "!bang", False, False),  # ... also after a '!'
        (["\\#x"], "#x", False, True),  # a literal '#'
    ],
)
def test_negated_patterns(patterns: list[str], rel: str, is_dir: bool, excluded: bool):
    s = Selection.of(patterns)
    name = rel.rpartition("/")[2]
    assert s.excluded(os.fsencode(rel), os.fsencode(name), is_dir) is excluded


def test_bad_patterns_and_pattern_files(tmp_path):
    for bad in ("", "/", "!", "!/", "[z-a]", "a\0b"):
        with pytest.raises(CasfsError, match="bad exclude pattern"):
            Selection.of([bad])
    f = tmp_path / "excludes"
    f.write_bytes(b"# comment\n\n*.o   \n  \n/build\n")
    assert read_patterns(str(f)) == ["*.o", "/build"]  # trailing blanks go, as do blank lines
    assert Selection().key() == b""  # a whole tree keeps its files cache's old name
    assert Selection.of(["a", "b"]).key() == Selection.of(["b", "a"]).key() != b""
    # with a negation the order is part of the meaning, and so of the key
    assert Selection.of(["*.o", "!a.o"]).key() != Selection.of(["!a.o", "*.o"]).key()
    # no pattern or tag can pass for two, or for one of the other kind
    assert Selection.of(["a\1b"]).key() != Selection.of(["a", "b"]).key()
    assert Selection.of(["\1foo"]).key() != Selection.of(exclude_if_present=["foo"]).key()
    assert Selection.of(one_file_system=True).key() != Selection().key()


# Negations: a file taken back from a name pattern, a directory's contents left out but one
# entry, and a directory excluded whole (nothing below it can be taken back).
TAKEN_BACK = ("-e", "*.pyc", "-e", "!pkg/mod.pyc", "-e", "build/*", "-e", "!build/cache",
              "-e", "tmp/", "-e", "!tmp/scratch")  # fmt: skip
TAKEN_BACK_SELECTED = EVERYTHING - {"build.pyc", "tmp/", "tmp/scratch"}


def test_negated_patterns_take_back(tmp_path):
    store = tmp_path / "store"
    cli_ok("init", store)
    src = make_source(tmp_path / "src")
    import_json(store, src, "n", *TAKEN_BACK)
    assert snapshot_paths(store, "n", tmp_path) == TAKEN_BACK_SELECTED
    # the same patterns in another order are another selection, with its own files cache
    reordered = ("-e", "!pkg/mod.pyc", "-e", "*.pyc")
    import_json(store, src, "r", *reordered)
    assert snapshot_paths(store, "r", tmp_path) == EVERYTHING - {"build.pyc", "pkg/mod.pyc"}
    again = import_json(store, src, "n2", *TAKEN_BACK)
    assert again["bytes_read"] == 0 and snapshot_paths(store, "n2", tmp_path) == TAKEN_BACK_SELECTED


def test_excluded_paths_are_left_out_and_reimports_never_mix_selections(tmp_path):
    store = tmp_path / "store"
    cli_ok("init", store)
    src = make_source(tmp_path / "src")
    patterns = tmp_path / "patterns"
    patterns.write_text("# build products\n*.pyc\nnode_modules\n\ntmp/\n/build/cache\n")
    cases = [
        ("all", (), EVERYTHING),
        ("some", OPTIONS + ("--exclude-caches",), SELECTED),
        ("from-file", ("--exclude-from", str(patterns), "--exclude-caches"), SELECTED),
        ("no-caches", OPTIONS, SELECTED | {"cache/entries/", "cache/entries/e1"}),
    ]
    for name, options, expected in cases:
        import_json(store, src, name, *options)
        assert snapshot_paths(store, name, tmp_path) == expected, name
    # Nothing changed in the source: each selection's files cache makes its second import
    # read nothing, and never hands one selection the trees another one built.
    for name, options, expected in cases:
        again = import_json(store, src, name + "-again", *options)
        assert again["bytes_read"] == 0 and again["bytes_new"] == 0, again
        assert snapshot_paths(store, name + "-again", tmp_path) == expected, name
    r = casfs_cli("fsck", "--json", store)
    assert r.returncode == 0 and json.loads(r.stdout)["clean"], r.stdout


def test_bad_exclude_options_are_one_line_errors(tmp_path):
    store = tmp_path / "store"
    cli_ok("init", store)
    src = make_source(tmp_path / "src")
    for args, fragment in [
        (("--exclude", "!"), "matches nothing"),
        (("--exclude", "[z-a]"), "bad character range"),
        (("--exclude", ""), "matches nothing"),
        (("--exclude-from", str(tmp_path / "missing")), "cannot read exclude file"),
    ]:
        r = casfs_cli("import", store, src, "-s", "x", *args)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1 and fragment in r.stderr, r.stderr
    assert json.loads(cli_ok("snapshot", store, "--json").stdout) == []


def test_excludes_through_the_mount(mounted: CasfsMount, tmp_path):
    src = make_source(tmp_path / "src")
    import_json(mounted.mnt, src, "some", *OPTIONS, "--exclude-caches")
    import_json(mounted.store, src, "all")  # given the store: routed to the mount
    assert paths_of(mounted.mnt / ".snap" / "some") == SELECTED
    assert paths_of(mounted.mnt / ".snap" / "all") == EVERYTHING
    r = casfs_cli("import", mounted.mnt, src, "-s", "bad", "-e", "!")
    assert r.returncode == 2 and "matches nothing" in r.stderr, r.stderr
    import_json(mounted.mnt, src, "taken-back", *TAKEN_BACK)
    assert paths_of(mounted.mnt / ".snap" / "taken-back") == TAKEN_BACK_SELECTED


def test_directories_holding_a_marker_are_left_out(tmp_path, mounted: CasfsMount):
    src = tmp_path / "src"
    for rel in ("keep/a", "skip/.nobackup", "skip/b", "deep/x/.nobackup", "deep/y/c", "z/.hide"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(rel.encode())
    (src / ".nobackup").mkdir()  # the source's own marker (a directory too): imported empty
    store = tmp_path / "offline"  # (the mount's is tmp_path / "store")
    cli_ok("init", store)
    options = ("--exclude-if-present", ".nobackup", "--exclude-if-present", ".hide")
    import_json(store, src / "deep", "deep", *options)
    assert snapshot_paths(store, "deep", tmp_path) == {"y/", "y/c"}
    import_json(store, src, "root", *options)
    assert snapshot_paths(store, "root", tmp_path) == set()
    (src / ".nobackup").rmdir()
    import_json(store, src, "tagged", *options)
    expected = {"keep/", "keep/a", "deep/", "deep/y/", "deep/y/c"}
    assert snapshot_paths(store, "tagged", tmp_path) == expected
    again = import_json(store, src, "again", *options)  # its own files cache, all unchanged
    assert again["bytes_read"] == 0 and snapshot_paths(store, "again", tmp_path) == expected
    import_json(mounted.mnt, src, "mounted", *options)
    assert paths_of(mounted.mnt / ".snap" / "mounted") == expected
    for bad in ("a/b", "..", ""):
        r = casfs_cli("import", store, src, "-s", "bad", "--exclude-if-present", bad)
        assert r.returncode == 2 and "bad --exclude-if-present" in r.stderr, r.stderr


def test_stars_take_the_first_place_and_never_backtrack_for_ever():
    """'*' then fixed characters then '*' is matched atomically (the first place the fixed
    characters occur): the same answers as plain backtracking, which a hostile name could
    keep busy for minutes (a pattern of 7 stars against a name of 200 'a's)."""
    import random
    import re
    import threading

    from casfs.workflows import selection

    def plain(pattern: bytes) -> re.Pattern[bytes]:  # each piece as it is: no atomic groups
        return re.compile(b"".join(r for r, _ in selection._tokens(pattern)), re.DOTALL)

    rng = random.Random(7)
    pieces = [b"*", b"*", b"*", b"?", b"a", b"a", b"b", b"/", b"**", b"**/", b"[ab]", b"[!a]"]
    for _ in range(3000):
        pattern = b"".join(rng.choice(pieces) for _ in range(rng.randint(2, 9)))
        fast = re.compile(selection._translate(pattern), re.DOTALL)
        slow = plain(pattern)
        for _ in range(10):
            name = bytes(rng.choice(b"aaab/") for _ in range(rng.randint(0, 20)))
            assert bool(fast.fullmatch(name)) == bool(slow.fullmatch(name)), (pattern, name)
    hostile = Selection.of(["*a*a*a*a*a*a*b", "*_*_*_*_*_*.tmp"])
    answers: list[bool] = []
    worker = threading.Thread(
        target=lambda: answers.extend(
            hostile.excluded(n, n, False) for n in (b"a" * 200, b"_" * 250, b"a" * 199 + b"b")
        ),
        daemon=True,
    )
    worker.start()
    worker.join(60)
    assert answers == [False, False, True], "matching a hostile name did not end"
