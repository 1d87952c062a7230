"""How casfs's per-operation costs grow with the tree: 1k -> 10k -> 100k -> 1M files.

For each size N (default 1,000 / 10,000 / 100,000 / 1,000,000; --quick stops at 100,000), a
fresh store gets the source-like tree of ``bench/snapshot.py`` (50 files per leaf directory,
20 leaf directories per package, ``/src/pkgNNNN/modNN/fileNN.txt``) with small files (50 to
500 bytes, so the sweep measures metadata, not data), built in-process. Then, per size:

  build_s                   building the tree (context, not a goal)
  store_bytes               size of the LMDB data file afterwards
  lookup_us                 in-process: resolving one random file path component by
                            component (4 lookups, each its own read transaction), per path
  readdir_entry_us          in-process: listing random 50-entry leaf directories with
                            attributes, per entry
  snapshot_first_s          the first snapshot (every tree object built), durable
  snapshot_after_10_s       a snapshot after 10 files changed across the tree (median of 3)
  diff_10_s                 diff of two snapshots 10 files apart (median of 2)
  mount_s                   ``casfs mount`` of the store until it returns (mounted)
  lookup_mount_us           through the fresh mount: ``os.stat`` of 1,000 random files not
                            looked up before, their directories already cached, so each
                            stat is one FUSE lookup; per stat
  ls_l_entry_us             through the mount: ``os.scandir`` + ``stat`` of every entry of
                            200 random leaf directories not visited before, per entry
  umount_s                  ``casfs umount`` until it returns

O(change) snapshots and per-directory work mean the lookup, readdir, snapshot-after-10 and
diff figures should stay nearly flat while N grows 1,000x; the first snapshot and the
build are O(N) by nature. One JSON line per figure (bench "scaling", with "files": N).

Run: .venv/bin/python bench/scaling.py [--quick] [--sizes 1000,10000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import benchlib
from snapshot import CHANGED_FILES, SEED, build_tree, source_text, take_snapshot

from casfs.tree import diff, snapshots
from casfs.tree.fs import ROOT_INO, Filesystem

FULL_SIZES = (1_000, 10_000, 100_000, 1_000_000)
QUICK_SIZES = (1_000, 10_000, 100_000)
FILE_SIZES = (50, 500)
LOOKUP_PATHS = 2_000
READDIR_DIRS = 200
MOUNT_STATS = 1_000
MOUNT_DIRS = 200
CLI = [sys.executable, "-m", "casfs_cli.main"]


def emit(figure: str, value: float, unit: str, files: int, **extra: object) -> None:
    benchlib.emit("scaling", figure, value, unit, files=files, **extra)


def file_path(i: int) -> tuple[bytes, bytes, bytes]:
    """The (package, module, file) names of the ``i``-th file that build_tree creates."""
    leaf, k = divmod(i, 50)
    return b"pkg%04d" % (leaf // 20), b"mod%02d" % (leaf % 20), b"file%02d.txt" % k


def in_process(fs: Filesystem, nfiles: int, rng: random.Random) -> None:
    src = fs.lookup(ROOT_INO, b"src").ino
    picks = [file_path(rng.randrange(nfiles)) for _ in range(LOOKUP_PATHS)]
    t = time.perf_counter()
    for pkg, mod, name in picks:
        fs.lookup(fs.lookup(fs.lookup(src, pkg).ino, mod).ino, name)
    took = time.perf_counter() - t
    emit("lookup_us", took / len(picks) * 1e6, "us", nfiles, lookups_per_path=3)

    leaves = -(-nfiles // 50)
    entries = 0
    t = time.perf_counter()
    for _ in range(READDIR_DIRS):
        pkg, mod, _name = file_path(rng.randrange(leaves) * 50)
        d = fs.lookup(fs.lookup(src, pkg).ino, mod).ino
        entries += len(fs.readdir(d))
    took = time.perf_counter() - t
    emit("readdir_entry_us", took / entries * 1e6, "us", nfiles, dirs=READDIR_DIRS)


def snapshot_costs(fs: Filesystem, files: list[int], rng: random.Random) -> None:
    nfiles = len(files)
    first, _ = take_snapshot(fs, b"first")
    emit("snapshot_first_s", first, "s", nfiles)
    after = []
    stride = nfiles // CHANGED_FILES
    for r in range(3):
        for k in range(CHANGED_FILES):
            fs.write(files[k * stride + rng.randrange(stride)], 0, b"# changed %d\n" % r)
        after.append(take_snapshot(fs, b"after-%d" % r)[0])
    emit("snapshot_after_10_s", statistics.median(after), "s", nfiles)
    diffs = []
    for r in (1, 2):
        t = time.perf_counter()
        with fs.store.read() as tx:
            old = snapshots.find(tx, b"after-%d" % (r - 1)).root
            new = snapshots.find(tx, b"after-%d" % r).root
            found = diff.diff(fs.store, tx, old, new)
        diffs.append(time.perf_counter() - t)
        if len(found) != CHANGED_FILES:
            raise RuntimeError(f"diff found {len(found)} changes, expected {CHANGED_FILES}")
    emit("diff_10_s", statistics.median(diffs), "s", nfiles)


def through_mount(store: str, mnt: str, nfiles: int, rng: random.Random) -> None:
    t = time.perf_counter()
    subprocess.run([*CLI, "mount", store, mnt], check=True, capture_output=True)
    emit("mount_s", time.perf_counter() - t, "s", nfiles)
    try:
        picks = rng.sample(range(nfiles), min(MOUNT_STATS, nfiles))
        paths = [os.path.join(mnt, "src", *(p.decode() for p in file_path(i))) for i in picks]
        for d in {os.path.dirname(p) for p in paths}:
            os.stat(d)  # directories cached: each timed stat below is one FUSE lookup
        t = time.perf_counter()
        for p in paths:
            os.stat(p)
        emit("lookup_mount_us", (time.perf_counter() - t) / len(paths) * 1e6, "us", nfiles)
        leaves = -(-nfiles // 50)
        chosen = rng.sample(range(leaves), min(MOUNT_DIRS, leaves))
        entries = 0
        t = time.perf_counter()
        for leaf in chosen:
            pkg, mod, _name = file_path(leaf * 50)
            with os.scandir(os.path.join(mnt, "src", pkg.decode(), mod.decode())) as it:
                for entry in it:
                    entry.stat(follow_symlinks=False)
                    entries += 1
        emit("ls_l_entry_us", (time.perf_counter() - t) / entries * 1e6, "us", nfiles)
    finally:
        t = time.perf_counter()
        r = subprocess.run([*CLI, "umount", mnt], capture_output=True, text=True)
        if r.returncode == 0:
            emit("umount_s", time.perf_counter() - t, "s", nfiles)
        else:
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
            raise RuntimeError(f"casfs umount failed: {r.stderr.strip()}")


def measure(nfiles: int, work: str, pool: bytes) -> None:
    rng = random.Random(SEED + nfiles)
    path = os.path.join(work, f"store-{nfiles}")
    mnt = os.path.join(work, "mnt")
    os.makedirs(mnt, exist_ok=True)
    store = Filesystem.create_store(path)
    fs = Filesystem(store)
    try:
        t = time.perf_counter()
        files = build_tree(fs, nfiles, rng, pool, sizes=FILE_SIZES)
        emit("build_s", time.perf_counter() - t, "s", nfiles)
        in_process(fs, nfiles, rng)
        snapshot_costs(fs, files, rng)
        fs.close()
        store.close()
        emit("store_bytes", os.path.getsize(os.path.join(path, "data.mdb")), "bytes", nfiles)
        through_mount(path, mnt, nfiles, rng)
    finally:
        fs.close()
        store.close()
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 to 100,000 files")
    ap.add_argument("--sizes", help="comma-separated file counts (overrides --quick)")
    ap.add_argument("--dir", default=None, help="where to put the scratch stores (default: tmp)")
    args = ap.parse_args()
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    if args.sizes:
        sizes = tuple(int(s) for s in args.sizes.split(","))
    pool = source_text(random.Random(SEED), 1 << 20)
    work = tempfile.mkdtemp(prefix="casfs-bench-scaling-", dir=args.dir)
    try:
        for n in sizes:
            measure(n, work, pool)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
