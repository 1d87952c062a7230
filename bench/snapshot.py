"""Snapshot creation cost: the first snapshot of a tree, and a snapshot after a few changes.

For each tree size N (default 10,000 and 100,000 files; --quick: 1,000 and 10,000), in a fresh
store (removed afterwards), the model builds a source-like tree in-process:

  /src/pkgNNNN/modNN/fileNN.txt   50 files per leaf directory, 20 leaf directories per parent

File sizes are uniform in 100..8000 bytes, the contents source-like text (words and indented
lines from a small vocabulary, so they compress), all from a fixed random seed. The tree is
built in group-commit batches of ~5000 operations (its time is printed as context). Then:

  snapshot_first              seconds to create the first snapshot: every tree object built
                              (the live digest cache is empty), committed durably
  snapshot_build_rate         N / snapshot_first, files/s
  snapshot_after_10_changes   write a few bytes into 10 files spread across the tree (each
                              write its own durable commit, not timed), then time the next
                              snapshot; 5 rounds (different files each round), median seconds
                              ("rounds": each round's seconds)
  snapshot_change_cost_ratio  snapshot_after_10_changes of the large tree / of the small one:
                              the O(change) claim (DESIGN §3) says it should not grow with N

Every snapshot is one durable write transaction; its line's "create_s" is the part spent in
snapshots.create (building tree objects), the rest is LMDB commit and sync.

Goals (the issue): after-10-changes < 0.1 s at each size; the ratio <= 1.5; the first
snapshot of 100,000 files < 5 s. Lines with a goal carry "goal" and "met".
Prints one JSON line per figure:
{"bench": "snapshot", "figure", "value", "unit", ["files"], ["rounds"], ["create_s"], ["vs"],
["goal", "met"]}.
Run: .venv/bin/python bench/snapshot.py [--quick] [--dir DIR]
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
import threading
import time

import benchlib
from benchlib import sig

from casfs.tree import diff, snapshots
from casfs.tree.fs import ROOT_INO, Filesystem

SEED = 20240601
FILES_PER_DIR = 50
DIRS_PER_PARENT = 20
BATCH_OPS = 5000
CHANGED_FILES = 10
CHANGE_ROUNDS = 5
GOAL_AFTER_CHANGES_S = 0.1
GOAL_RATIO = 1.5
GOAL_FIRST_100K_S = 5.0

_WORDS = (
    "def class return self import from if else elif for while in not and or None True False "
    "try except finally with as yield lambda pass raise assert global value key data index "
    "count name path node tree item result buffer offset length size parent child entry "
    "digest store write read open close commit batch error list dict int bytes str len range"
).split()
_PUNCT = ("(", ")", ":", ",", ".", " =", " +=", "[", "]", " ==", "")


def source_text(rng: random.Random, n: int) -> bytes:
    """About ``n`` bytes of source-like text: indented lines of words and punctuation."""
    lines = []
    total = 0
    while total < n:
        indent = "    " * rng.randrange(4)
        words = rng.choices(_WORDS, k=rng.randrange(2, 10))
        line = indent + " ".join(w + rng.choice(_PUNCT) for w in words) + "\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()[:n]


def emit(figure: str, value: float, unit: str, **extra: object) -> None:
    benchlib.emit("snapshot", figure, value, unit, **extra)


def build_tree(
    fs: Filesystem,
    nfiles: int,
    rng: random.Random,
    pool: bytes,
    sizes: tuple[int, int] = (100, 8000),
) -> list[int]:
    """Create the tree under /src in batches (file sizes uniform in ``sizes``); the file
    inodes, in creation order."""
    store = fs.store
    files: list[int] = []
    ops = 0
    store.begin_batch()
    try:
        src = fs.mkdir(ROOT_INO, b"src", 0o755, 0, 0).ino
        nleaves = -(-nfiles // FILES_PER_DIR)
        parent = 0
        for leaf in range(nleaves):
            if leaf % DIRS_PER_PARENT == 0:
                name = b"pkg%04d" % (leaf // DIRS_PER_PARENT)
                parent = fs.mkdir(src, name, 0o755, 0, 0).ino
            d = fs.mkdir(parent, b"mod%02d" % (leaf % DIRS_PER_PARENT), 0o755, 0, 0).ino
            for i in range(min(FILES_PER_DIR, nfiles - len(files))):
                ino = fs.create(d, b"file%02d.txt" % i, 0o644, 0, 0).ino
                size = rng.randint(*sizes)
                off = rng.randrange(len(pool) - size)
                fs.write(ino, 0, pool[off : off + size])
                files.append(ino)
                ops += 2
                if ops >= BATCH_OPS:
                    store.commit_batch()
                    store.begin_batch()
                    ops = 0
    finally:
        store.commit_batch()
    return files


def take_snapshot(fs: Filesystem, name: bytes) -> tuple[float, float]:
    """Seconds for the whole snapshot (one durable write transaction), and of those, the
    seconds inside snapshots.create (building tree objects); the rest is commit and sync."""
    store = fs.store
    inside = []

    def create(tx) -> None:
        t = time.perf_counter()
        snapshots.create(tx, store, fs.merkle, name, time.time_ns())
        inside.append(time.perf_counter() - t)

    t = time.perf_counter()
    store.run_write(create)
    return time.perf_counter() - t, inside[-1]


def measure(nfiles: int, work: str, pool: bytes) -> dict[str, float]:
    rng = random.Random(SEED + nfiles)
    path = os.path.join(work, f"store-{nfiles}")
    store = Filesystem.create_store(path)
    fs = Filesystem(store)
    try:
        t = time.perf_counter()
        files = build_tree(fs, nfiles, rng, pool)
        built = time.perf_counter() - t
        emit("tree_build", built, "s", files=nfiles)
        emit("tree_build_rate", nfiles / built, "files/s", files=nfiles)

        first, first_create = take_snapshot(fs, b"first")
        goal = {"goal": GOAL_FIRST_100K_S, "met": first < GOAL_FIRST_100K_S}
        if nfiles != 100_000:
            goal = {}
        emit("snapshot_first", first, "s", files=nfiles, create_s=sig(first_create), **goal)
        emit("snapshot_build_rate", nfiles / first, "files/s", files=nfiles)

        after = []
        create_times = []
        stride = len(files) // CHANGED_FILES
        for r in range(CHANGE_ROUNDS):
            # one file in each tenth of the tree, at a different place every round
            for k in range(CHANGED_FILES):
                ino = files[k * stride + rng.randrange(stride)]
                fs.write(ino, rng.randrange(64), b"# changed %d\n" % r)
            total, inside = take_snapshot(fs, b"after-%d" % r)
            after.append(total)
            create_times.append(inside)
        median = statistics.median(after)
        emit(
            "snapshot_after_10_changes",
            median,
            "s",
            files=nfiles,
            rounds=[sig(s) for s in after],
            create_s=sig(statistics.median(create_times)),
            goal=GOAL_AFTER_CHANGES_S,
            met=median < GOAL_AFTER_CHANGES_S,
        )
        # diff of two consecutive snapshots (10 files apart): equal subtrees are skipped
        diffs = []
        for r in range(1, CHANGE_ROUNDS):
            t = time.perf_counter()
            with store.read() as tx:
                old = snapshots.find(tx, b"after-%d" % (r - 1)).root
                new = snapshots.find(tx, b"after-%d" % r).root
                found = diff.diff(store, tx, old, new)
            diffs.append(time.perf_counter() - t)
            assert len(found) == CHANGED_FILES, found
        took = statistics.median(diffs)
        emit("diff_10_changes", took, "s", files=nfiles, goal=0.1, met=took < 0.1)
        return {"first": first, "after": median}
    finally:
        fs.close()
        store.close()
        shutil.rmtree(path, ignore_errors=True)


def stall_during_snapshot(nfiles: int, work: str, pool: bytes) -> None:
    """Through a real mount: the longest any ``stat`` or 4 KiB read waits while the first
    snapshot of an ``nfiles`` tree is taken (goal: under 100 ms)."""
    path = os.path.join(work, f"stall-{nfiles}")
    mnt = os.path.join(work, f"mnt-{nfiles}")
    os.makedirs(mnt)
    store = Filesystem.create_store(path)
    fs = Filesystem(store)
    build_tree(fs, nfiles, random.Random(SEED), pool)
    fs.close()
    store.close()
    cli = [sys.executable, "-m", "casfs_cli.main"]
    subprocess.run([*cli, "mount", path, mnt], check=True, capture_output=True)
    try:
        probe = os.path.join(mnt, "src", "pkg0000", "mod00", "file00.txt")
        waits: list[float] = []  # statvfs: one request that always reaches the daemon
        cycles: list[float] = []  # open + read + close: several requests
        done = threading.Event()

        def prober() -> None:
            while not done.is_set():
                t = time.perf_counter()
                os.statvfs(mnt)
                waits.append(time.perf_counter() - t)
                t = time.perf_counter()
                with open(probe, "rb") as f:
                    f.read(4096)
                cycles.append(time.perf_counter() - t)
                time.sleep(0.002)

        thread = threading.Thread(target=prober)
        thread.start()
        t = time.perf_counter()
        subprocess.run([*cli, "snapshot", mnt, "first"], check=True, capture_output=True)
        took = time.perf_counter() - t
        done.set()
        thread.join()
        worst = max(waits)
        emit("snapshot_first_via_mount", took, "s", files=nfiles)
        emit("longest_request_wait_during_snapshot", worst, "s", files=nfiles,
             probes=len(waits), goal=0.1, met=worst < 0.1)  # fmt: skip
        emit("longest_open_read_close_during_snapshot", max(cycles), "s", files=nfiles)
    finally:
        subprocess.run([*cli, "umount", mnt], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 and 10,000 files")
    ap.add_argument("--dir", default=None, help="where to put the scratch stores (default: tmp)")
    args = ap.parse_args()
    sizes = (1_000, 10_000) if args.quick else (10_000, 100_000)
    pool = source_text(random.Random(SEED), 4 << 20)
    work = tempfile.mkdtemp(prefix="casfs-bench-snapshot-", dir=args.dir)
    try:
        results = {n: measure(n, work, pool) for n in sizes}
        stall_during_snapshot(sizes[-1], work, pool)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    small, large = sizes
    ratio = results[large]["after"] / results[small]["after"]
    emit(
        "snapshot_change_cost_ratio",
        ratio,
        "x",
        vs="files small vs large",
        files=list(sizes),
        goal=GOAL_RATIO,
        met=ratio <= GOAL_RATIO,
    )


if __name__ == "__main__":
    main()
