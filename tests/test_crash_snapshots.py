"""Crash safety of snapshots: ``kill -9`` of the mount daemon while snapshots are taken, read
back, deleted (some with a file of theirs still open) and, in some rounds, while a rollback
runs, loses no snapshot the CLI acknowledged, brings back none it deleted, and leaves a store
that checks clean.

Each round: the writer of test_crash (smaller files, a short pause after each) fills
``round{N}`` in the mount, and a snapshotter process loops: ``casfs snapshot MNT r{N}s{n}``;
once the CLI exited 0, it reads every file of ``MNT/.snap/r{N}s{n}`` back and appends the
listing (path, sha256) to a log on local disk. Now and then it deletes an older snapshot (one
of its own, or one kept from an earlier round) with ``casfs snapshot -d``, logged only once the
CLI succeeded, sometimes holding a file of it open across the delete (so pins exist at the
kill; the file must stay readable). At a random moment the daemon gets SIGKILL;
the stale mount is cleared, the writer and snapshotter killed, the store checked offline (only
orphans may be reported), mounted again, and then: every acknowledged snapshot exists and holds
exactly its logged listing, every deleted one is gone, no snapshot exists that nobody asked
for, and every fsync'ed file of the writer is intact. The round ends with the live tree
cleared and all but a few snapshots deleted (the store stays small), unmount and fsck.

In every ROLLBACK_EVERY-th round the writer is stopped (the snapshotter goes on), ``casfs
rollback`` to a verified snapshot of an earlier round is started, and the daemon is killed a
moment later: if the rollback had exited 0, the live tree must be that snapshot; if not, it is
either that snapshot or the tree from before, with every fsync'ed file intact.

``CASFS_CRASH_ROUNDS`` raises the number of rounds for a longer stress run,
``CASFS_CRASH_SEED`` changes the random choices.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import CasfsMount, casfs_cli, wait_gone
from test_crash import WRITER, _logged, _sha256, fsck_after_kill

ROUNDS = int(os.environ.get("CASFS_CRASH_ROUNDS", "10"))
SEED = int(os.environ.get("CASFS_CRASH_SEED", "5151"))
KEEP = 3  # verified snapshots kept from one round to the next (the others are deleted)
ROLLBACK_EVERY = 3  # every third round kills the daemon while a rollback runs

# test_crash's writer with files of at most 512 KiB instead of 3 MiB and a 10 ms pause after
# each: every snapshot is read back whole, and the snapshotter must get a few done per round.
SMALL_WRITER = WRITER.replace("rng.randrange(1, 3 << 20)", "rng.randrange(1, 512 << 10)").replace(
    "        step()\n", "        step()\n        time.sleep(0.01)\n"
)
assert SMALL_WRITER.count("512 << 10") == 1 and SMALL_WRITER.count("time.sleep(0.01)") == 1

SNAPSHOTTER = r"""
import hashlib, json, os, random, subprocess, sys, time

mnt, log, older = sys.argv[1], sys.argv[2], sys.argv[3]
rnd, seed = int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
logfd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
snapdir = os.path.join(mnt, ".snap")


def note(**record):
    record["t"] = round(time.monotonic(), 3)
    os.write(logfd, (json.dumps(record) + "\n").encode())  # one write: whole or not at all


def casfs(*args):
    r = subprocess.run(
        [sys.executable, "-m", "casfs_cli.main", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        sys.exit("casfs %s: exit %d: %s" % (" ".join(args), r.returncode, r.stderr.strip()))


def digest_fd(fd):
    h = hashlib.sha256()
    off = 0
    while block := os.pread(fd, 1 << 20, off):
        h.update(block)
        off += len(block)
    return h.hexdigest()


def fail(exc):
    raise exc


def listing(top):
    files = {}
    for dirpath, _, filenames in os.walk(top, onerror=fail):
        for name in filenames:
            path = os.path.join(dirpath, name)
            fd = os.open(path, os.O_RDONLY)
            try:
                files[os.path.relpath(path, top)] = digest_fd(fd)
            finally:
                os.close(fd)
    return files


def check_held():
    for fd, what, digest in held:
        if digest_fd(fd) != digest:
            sys.exit("%s, open across the delete of its snapshot, changed" % what)


with open(older, encoding="utf-8") as f:
    mine = json.load(f)  # name -> listing: made and read back (earlier rounds too), not deleted
held = []  # (fd, what, sha256): open files of deleted snapshots
n = 0
while True:
    n += 1
    name = "r%ds%d" % (rnd, n)
    note(creating=name)
    casfs("snapshot", mnt, name)
    note(created=name)
    files = listing(os.path.join(snapdir, name))
    note(name=name, files=files)
    if mine and rng.random() < 0.4:
        victim = rng.choice(sorted(mine))
        old = mine.pop(victim)
        keep = None
        if old and rng.random() < 0.6:
            rel = rng.choice(sorted(old))
            fd = os.open(os.path.join(snapdir, victim, rel), os.O_RDONLY)
            keep = (fd, victim + "/" + rel, old[rel])
        note(deleting=victim)
        casfs("snapshot", "-d", mnt, victim)
        note(deleted=victim)
        if keep:
            held.append(keep)
        check_held()
        while len(held) > 3:
            os.close(held.pop(0)[0])
    mine[name] = files
"""


def _tree_files(top: Path) -> dict[str, str]:
    """relative path -> sha256 of every regular file below ``top``, read through the mount."""

    def fail(exc: OSError) -> None:
        raise exc

    out = {}
    for dirpath, dirnames, filenames in os.walk(top, onerror=fail):
        if Path(dirpath) == top and ".snap" in dirnames:
            dirnames.remove(".snap")  # (hidden from readdir anyway)
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, top)] = _sha256(path)
    return out


def _records(log: Path) -> list[dict]:
    if not log.exists():
        return []
    with open(log, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _group_alive(pgid: int) -> bool:
    """Whether any process of process group ``pgid`` still runs (zombies do not count)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
                state, _, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue
        if int(pgrp) == pgid and state not in ("Z", "X"):
            return True
    return False


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a process started with ``start_new_session`` and every ``casfs`` it runs (a
    command left running could reach the next mount)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    deadline = time.monotonic() + 30
    while _group_alive(proc.pid):
        assert time.monotonic() < deadline, f"process group {proc.pid} survived SIGKILL"
        time.sleep(0.02)


def _snapshot_rows(m: CasfsMount) -> dict[str, dict]:
    r = casfs_cli("snapshot", m.mnt, "--json")
    assert r.returncode == 0, f"casfs snapshot --json after the crash: {r.stderr.strip()}"
    return {row["name"]: row for row in json.loads(r.stdout)}


def _delete(m: CasfsMount, name: str) -> None:
    os.rmdir(m.mnt / ".snap" / name)
    assert not os.path.exists(m.mnt / ".snap" / name)


def test_kill_9_during_snapshots_loses_no_acknowledged_snapshot(mounted: CasfsMount, tmp_path):
    rng = random.Random(SEED)
    mnt = mounted.mnt
    listings: dict[str, dict[str, str]] = {}  # verified after a crash, still there
    gone: set[str] = set()  # deleted or never made: must never appear
    snapshots_verified = distinct_verified = deletes_verified = 0
    fsynced = orphans = forced = 0
    rollback_kills = rollback_acked = rollback_applied_unacked = 0
    cut = {"create": [0, 0], "delete": [0, 0]}  # commands cut by the kill: [seen, took effect]
    start = time.monotonic()
    for rnd in range(ROUNDS):
        if mounted.pid is None:
            mounted.mount()
        wlog = tmp_path / f"fsync{rnd}.log"
        slog = tmp_path / f"snapshots{rnd}.log"
        serr = tmp_path / f"snapshotter{rnd}.stderr"
        rollback_to = None
        if rnd % ROLLBACK_EVERY == ROLLBACK_EVERY - 1:
            candidates = sorted(name for name, files in listings.items() if files)
            if candidates:
                rollback_to = rng.choice(candidates)
        older = tmp_path / f"older{rnd}.json"  # the snapshotter may delete these too
        older.write_text(json.dumps({k: v for k, v in listings.items() if k != rollback_to}))
        writer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                SMALL_WRITER,
                str(mnt / f"round{rnd}"),
                str(wlog),
                str(rng.randrange(1 << 30)),
                str(rnd % 2),  # odd rounds: the writer lingers, keeping the dead mount busy
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        with open(serr, "wb") as err:
            snapshotter = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    SNAPSHOTTER,
                    str(mnt),
                    str(slog),
                    str(older),
                    str(rnd),
                    str(rng.randrange(1 << 30)),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # its casfs commands are killed with it
            )
        rollback = None
        rollback_before_kill = None  # its exit status when the daemon was killed
        try:
            time.sleep(rng.uniform(0.5, 2.5) if rollback_to is None else rng.uniform(0.5, 1.5))
            assert writer.poll() is None, writer.stderr.read().decode(errors="replace")
            assert snapshotter.poll() is None, f"snapshotter: {serr.read_text()}"
            if rollback_to is not None:
                writer.kill()  # the live tree holds still from here on; snapshots go on
                writer.wait(30)
                rollback = subprocess.Popen(
                    [sys.executable, "-m", "casfs_cli.main", "rollback", str(mnt), rollback_to],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                time.sleep(rng.uniform(0.05, 0.6))
                rollback_before_kill = rollback.poll()
                assert snapshotter.poll() is None, f"snapshotter: {serr.read_text()}"
            mounted.kill_daemon()
            how = mounted.clear_stale()  # casfs umount, or a lazy unmount when busy
            forced += how.startswith("fusermount3")
        finally:
            if writer.poll() is None:
                writer.send_signal(signal.SIGKILL)
            writer.wait(30)
            writer.stderr.close()
            _kill_group(snapshotter)
            if rollback is not None:
                _, rollback_err = rollback.communicate(timeout=60)
        assert wait_gone(writer.pid)
        if rollback is not None:
            assert rollback_before_kill in (None, 0), f"casfs rollback: {rollback_err.strip()}"

        orphans += fsck_after_kill(mounted, rnd)

        mounted.mount()
        asked: set[str] = set()  # casfs snapshot NAME started
        acked: set[str] = set()  # ... and exited 0
        deleting: set[str] = set()  # casfs snapshot -d NAME started
        deleted: set[str] = set()  # ... and exited 0
        for rec in _records(slog):
            if "creating" in rec:
                asked.add(rec["creating"])
            elif "created" in rec:
                acked.add(rec["created"])
            elif "name" in rec:
                listings[rec["name"]] = rec["files"]
            elif "deleting" in rec:
                deleting.add(rec["deleting"])
            elif "deleted" in rec:
                deleted.add(rec["deleted"])
        rows = _snapshot_rows(mounted)
        where = f"round {rnd} (after kill -9)"
        unknown = rows.keys() - asked - listings.keys()
        assert not unknown, f"{where}: snapshots nobody made: {sorted(unknown)}"
        back = (gone | deleted) & rows.keys()
        assert not back, f"{where}: deleted snapshots are back: {sorted(back)}"
        for name in gone | deleted:
            assert not os.path.exists(mnt / ".snap" / name), f"{where}: .snap/{name} exists"
        deletes_verified += len(deleted)
        gone |= deleted
        for name in deleted:
            del listings[name]
        missing = (acked - deleting) - rows.keys()
        assert not missing, f"{where}: acknowledged snapshots lost: {sorted(missing)}"
        for name in sorted(listings.keys() - gone):
            if name not in rows:  # its delete had begun: gone is as good as there
                assert name in deleting, f"{where}: snapshot {name} is lost"
                del listings[name]
                gone.add(name)
                continue
            files = _tree_files(mnt / ".snap" / name)
            if files != listings[name]:
                want = listings[name]
                bad = sorted(p for p in want.keys() | files.keys() if want.get(p) != files.get(p))
                raise AssertionError(
                    f"{where}: snapshot {name} differs from its listing in {len(bad)} of "
                    f"{len(want)} file(s): {bad[:10]}"
                )
            assert rows[name]["files"] == len(files), rows[name]
            snapshots_verified += 1
            distinct_verified += name.startswith(f"r{rnd}s")
        unverified = sorted(rows.keys() - listings.keys())  # made, but never read back
        cut["create"][0] += len(asked - acked)
        cut["create"][1] += len((asked - acked) & rows.keys())
        cut["delete"][0] += len(deleting - deleted)
        cut["delete"][1] += len((deleting - deleted) - rows.keys())
        for name in (asked | deleting) - rows.keys():
            gone.add(name)
            listings.pop(name, None)

        # the writer's fsync'ed files; after a rollback, the snapshot's tree instead
        logged = _logged(str(wlog))
        rolled_back = False
        if rollback is not None:
            rollback_kills += 1
            rolled_back = _tree_files(mnt) == listings[rollback_to]
            if rollback_before_kill == 0:
                rollback_acked += 1
                assert rolled_back, f"{where}: rollback to {rollback_to} exited 0 but is undone"
            else:
                rollback_applied_unacked += rolled_back
        if not rolled_back:
            bad = {p: d for p, d in logged.items() if not os.path.exists(p) or _sha256(p) != d}
            assert not bad, f"{where}: {len(bad)} of {len(logged)} fsync'ed files lost or wrong"
            fsynced += len(logged)

        # keep the store small: clear the live tree, keep a few verified snapshots
        for entry in os.scandir(mnt):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        for name in unverified:
            _delete(mounted, name)
            gone.add(name)
        for name in rng.sample(sorted(listings), max(0, len(listings) - KEEP)):
            _delete(mounted, name)
            del listings[name]
            gone.add(name)
        assert sorted(os.listdir(mnt / ".snap")) == sorted(listings)
        mounted.umount()
        mounted.assert_fsck_clean()

    log = mounted.log_text()
    pins = sum(int(n) for n in re.findall(r"released (\d+) pin", log))
    freed = sum(int(n) for n in re.findall(r"freed (\d+) orphaned inode", log))
    print(
        f"\n{ROUNDS} crashes in {time.monotonic() - start:.1f} s: {snapshots_verified} snapshot "
        f"listings verified ({distinct_verified} snapshots made in the round of the crash); "
        f"{deletes_verified} deletes verified; {rollback_kills} kills during a rollback "
        f"({rollback_acked} acknowledged and applied, {rollback_applied_unacked} applied "
        f"without an answer, {rollback_kills - rollback_acked - rollback_applied_unacked} not "
        f"applied); {cut['create'][0]} create(s) and {cut['delete'][0]} delete(s) cut by a kill "
        f"({cut['create'][1]} and {cut['delete'][1]} took effect); {fsynced} fsync'ed files "
        f"verified; {pins} pin(s) and {freed} orphan(s) left by the kills, dropped by the next "
        f"mount ({orphans} orphan(s) seen by fsck)"
    )
    assert forced == 0, "casfs umount could not clear a stale mount"
    assert distinct_verified >= ROUNDS // 2  # the snapshotter got snapshots in
    assert deletes_verified > 0
    assert fsynced >= ROUNDS // 2
    if ROUNDS >= ROLLBACK_EVERY * 2:
        assert rollback_kills > 0
