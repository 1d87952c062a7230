"""Browsing old versions: casfs's ``.snap`` against ``borg mount`` and ``restic mount``.

The same data goes into all three: a source-like tree (default 50,000 files in directories of
50) and 7 more versions of it, each changing 1 % of the files and adding a few; one snapshot,
archive or restic snapshot per version. Then each is mounted and walked the way a user looks
for an old file: ``find MOUNT -type f | wc -l`` and ``du -s`` over all 8 versions, first
right after mounting (cold) and then again (warm). One JSON line per figure; ratios are
(borg or restic seconds) / (casfs seconds), so above 1 means casfs is faster.

casfs gets the versions through its library (this benchmarks browsing, not ingest), borg
through ``borg create --compression zstd,3`` and restic through ``restic backup``.

    .venv/bin/python bench/browse.py [--files N] [--versions N] [--quick]

Needs the Debian packages borgbackup, python3-llfuse and restic (``bench/run`` installs
them); a missing one is reported and skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import benchlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from casfs.store.store import Store  # noqa: E402
from casfs.tree import snapshots  # noqa: E402
from casfs.tree.fs import ROOT_INO, Filesystem  # noqa: E402

PER_DIR = 50
WORDS = b"def class return import self value data for while if else yield with as in".split()


def emit(figure: str, value: float | None, unit: str, **extra: object) -> None:
    benchlib.emit("browse", figure, value, unit, **extra)


def text(rng: random.Random, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choices(WORDS, k=12)) + b"\n"
    return bytes(out[:size])


def make_tree(root: str, files: int, rng: random.Random) -> list[str]:
    paths = []
    for i in range(files):
        d = os.path.join(root, f"pkg{i // (PER_DIR * 20):03d}", f"mod{i // PER_DIR:05d}")
        if i % PER_DIR == 0:
            os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"file{i % PER_DIR:02d}.py")
        with open(p, "wb") as f:
            f.write(text(rng, rng.randint(200, 6000)))
        paths.append(p)
    return paths


def change_tree(root: str, paths: list[str], version: int, rng: random.Random) -> None:
    for p in rng.sample(paths, max(1, len(paths) // 100)):
        with open(p, "ab") as f:
            f.write(text(rng, 100))
    d = os.path.join(root, f"new{version}")
    os.makedirs(d, exist_ok=True)
    for j in range(10):
        p = os.path.join(d, f"added{j}.py")
        with open(p, "wb") as f:
            f.write(text(rng, 500))
        paths.append(p)


class CasfsCopy:
    """Mirror a directory into a casfs store's live tree (changed files only), offline."""

    def __init__(self, store_path: str) -> None:
        self.store = Filesystem.create_store(store_path)
        self.fs = Filesystem(self.store)
        self.inos: dict[str, int] = {"": ROOT_INO}
        self.seen: dict[str, int] = {}

    def sync(self, src: str) -> None:
        fs, store = self.fs, self.store
        store.begin_batch()
        for dirpath, dirnames, filenames in os.walk(src):
            rel = os.path.relpath(dirpath, src)
            rel = "" if rel == "." else rel
            parent = self.inos[rel]
            for name in sorted(dirnames):
                key = os.path.join(rel, name)
                if key not in self.inos:
                    self.inos[key] = fs.mkdir(parent, name.encode(), 0o755, 0, 0).ino
            for name in sorted(filenames):
                key = os.path.join(rel, name)
                st = os.stat(os.path.join(dirpath, name))
                if self.seen.get(key) == st.st_mtime_ns:
                    continue
                if key not in self.inos:
                    self.inos[key] = fs.create(parent, name.encode(), 0o644, 0, 0).ino
                with open(os.path.join(dirpath, name), "rb") as f:
                    fs.write(self.inos[key], 0, f.read())
                self.seen[key] = st.st_mtime_ns
        store.commit_batch()

    def snapshot(self, name: str) -> None:
        t = time.time_ns()
        self.store.run_write(
            lambda tx: snapshots.create(tx, self.store, self.fs.merkle, name.encode(), t)
        )

    def close(self) -> None:
        self.fs.close()
        self.store.close()


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


def walk_times(label: str, top: str, files_expected: int) -> dict[str, float]:
    out = {}
    for rnd in ("cold", "warm"):
        t = time.monotonic()
        found = subprocess.run(
            f"find {top} -type f | wc -l", shell=True, capture_output=True, text=True, check=True
        ).stdout.strip()
        out[f"find_{rnd}"] = time.monotonic() - t
        if int(found) != files_expected:
            raise SystemExit(f"{label}: find saw {found} files, expected {files_expected}")
        t = time.monotonic()
        run(["du", "-s", top])
        out[f"du_{rnd}"] = time.monotonic() - t
    return out


def wait_for(path: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} did not appear")
        time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=50_000)
    ap.add_argument("--versions", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="5,000 files")
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = ap.parse_args()
    files = 5_000 if args.quick else args.files
    base = tempfile.mkdtemp(prefix="casfs-browse-", dir=args.dir)
    env = dict(os.environ, BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
               RESTIC_PASSWORD="bench", BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")  # fmt: skip
    have_borg = shutil.which("borg") is not None
    have_restic = shutil.which("restic") is not None
    src = os.path.join(base, "src")
    rng = random.Random(7)
    paths = make_tree(src, files, rng)
    cas = CasfsCopy(os.path.join(base, "store"))
    if have_borg:
        run(["borg", "init", "-e", "none", os.path.join(base, "borg")], env=env)
    if have_restic:
        run(["restic", "init", "-q", "-r", os.path.join(base, "restic")], env=env)
    ingest = {"casfs": 0.0, "borg": 0.0, "restic": 0.0}
    for v in range(args.versions):
        if v:
            change_tree(src, paths, v, rng)
        t = time.monotonic()
        cas.sync(src)
        cas.snapshot(f"v{v}")
        ingest["casfs"] += time.monotonic() - t
        if have_borg:
            t = time.monotonic()
            run(["borg", "create", "--compression", "zstd,3",
                 f"{os.path.join(base, 'borg')}::v{v}", "."], cwd=src, env=env)  # fmt: skip
            ingest["borg"] += time.monotonic() - t
        if have_restic:
            t = time.monotonic()
            run(["restic", "-q", "-r", os.path.join(base, "restic"), "backup", "."],
                cwd=src, env=env)  # fmt: skip
            ingest["restic"] += time.monotonic() - t
    cas.close()
    total = sum(1 for _ in paths)  # files in the last version
    expected = 0
    with Store(os.path.join(base, "store"), writer=False) as store, store.read() as tx:
        expected = sum(s.totals.files for s in snapshots.all_snapshots(tx))
    emit("dataset", total, "files", versions=args.versions, listed_files=expected,
         ingest_s={k: round(x, 2) for k, x in ingest.items()})  # fmt: skip

    results: dict[str, dict[str, float]] = {}
    mnt = os.path.join(base, "mnt")
    os.makedirs(mnt)
    run([sys.executable, "-m", "casfs_cli.main", "mount", os.path.join(base, "store"), mnt])
    try:
        results["casfs"] = walk_times("casfs", os.path.join(mnt, ".snap"), expected)
    finally:
        run([sys.executable, "-m", "casfs_cli.main", "umount", mnt])
    if have_borg:
        run(["borg", "mount", os.path.join(base, "borg"), mnt], env=env)
        try:
            results["borg"] = walk_times("borg", mnt, expected)
        finally:
            subprocess.run(["borg", "umount", mnt], env=env, capture_output=True)
    if have_restic:
        cmd = ["restic", "-r", os.path.join(base, "restic"), "mount", mnt]
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        proc = subprocess.Popen(cmd, env=env, **quiet)
        try:
            wait_for(os.path.join(mnt, "snapshots"))
            results["restic"] = walk_times("restic", os.path.join(mnt, "snapshots"), expected)
        finally:
            subprocess.run(["fusermount3", "-u", mnt], capture_output=True)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
    for key in ("find_cold", "du_cold", "find_warm", "du_warm"):
        mine = results["casfs"][key]
        emit(key, mine, "s", tool="casfs", files=expected)
        for other in ("borg", "restic"):
            if other in results:
                theirs = results[other][key]
                emit(key, theirs, "s", tool=other,
                     vs="casfs", ratio=round(theirs / mine, 2), goal=5.0,
                     met=theirs / mine >= 5.0)  # fmt: skip
    shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
