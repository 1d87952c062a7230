"""Crash safety: ``kill -9`` of the mount daemon while a writer is busy loses nothing that was
fsync'ed, and leaves a store that opens, mounts and checks clean.

Each round: a writer process creates files in the mount and, for about half of them, calls
fsync and only then appends "path sha256" to a log on local disk. At a random moment the
daemon gets SIGKILL; the stale mount is cleared, the writer killed, the store checked
offline (only orphans, which the next mount frees, may be reported), mounted again, and every
file ever logged must hold exactly the logged bytes. Then a clean unmount and fsck.

``CASFS_CRASH_ROUNDS`` raises the number of rounds (default 10) for a longer stress run
(bench/stress.py uses 50), ``CASFS_CRASH_SEED`` changes the random choices.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

from conftest import CasfsMount, wait_gone

ROUNDS = int(os.environ.get("CASFS_CRASH_ROUNDS", "10"))
SEED = int(os.environ.get("CASFS_CRASH_SEED", "4242"))

WRITER = r"""
import hashlib, os, random, sys, time

top, log, seed, linger = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
rng = random.Random(seed)
logfd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.mkdir(top)
if linger:
    os.chdir(top)  # keeps the mount busy after the daemon dies
held = []  # open, unlinked files: orphans when the daemon dies
n = 0


def step():
    global n
    n += 1
    size = rng.choice([0, 1, 4096, rng.randrange(1, 256 << 10), rng.randrange(1, 3 << 20)])
    if rng.random() < 0.7:
        data = rng.randbytes(size)
    else:
        data = bytes([n % 256]) * size
    path = os.path.join(top, "f%05d" % n)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    for off in range(0, size, 128 << 10):
        os.write(fd, data[off : off + (128 << 10)])
    synced = rng.random() < 0.5
    if synced:
        os.fsync(fd)
        os.write(logfd, ("%s %s\n" % (path, hashlib.sha256(data).hexdigest())).encode())
    os.close(fd)
    if synced and rng.random() < 0.3:
        # a rename, made durable by fsync of the directory, then logged: the file must be
        # found under its new name only (under either while the rename is not logged done)
        os.write(logfd, ("mv? %s %s\n" % (path, path + ".mv")).encode())
        os.rename(path, path + ".mv")
        dfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        os.write(logfd, ("mv %s %s\n" % (path, path + ".mv")).encode())
        return
    r = rng.random()
    if r < 0.1:
        fd = os.open(os.path.join(top, "tmp%05d" % n), os.O_RDWR | os.O_CREAT, 0o600)
        os.write(fd, rng.randbytes(rng.randrange(1, 200 << 10)))
        os.unlink(os.path.join(top, "tmp%05d" % n))
        held.append(fd)
        if len(held) > 4:
            os.close(held.pop(0))
    elif r < 0.25 and not synced:
        # churn on a file nobody logged: overwrite, truncate, maybe delete it
        with open(path, "r+b") as f:
            f.write(rng.randbytes(1000))
            f.truncate(rng.randrange(0, size + 1))
        if rng.random() < 0.5:
            os.unlink(path)


while True:
    try:
        step()
    except OSError:
        if not linger:
            raise
        # the mount died: keep the open files and the working directory there (busy)
        while True:
            time.sleep(1)
"""


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _logged(log: str) -> dict[str, str]:
    out = {}
    with open(log, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):  # a line cut by the kill is not a promise
                continue
            words = line.split()
            if words[0] == "mv":  # a durable rename: only the new name holds the bytes
                if words[1] in out:  # (not moved already by its "mv?" line)
                    out[words[2]] = out.pop(words[1])
            elif words[0] == "mv?":  # a rename begun: the bytes are under one of the names
                if not os.path.exists(words[1]) and os.path.exists(words[2]):
                    out[words[2]] = out.pop(words[1])
            else:
                out[words[0]] = words[1]
    return out


def fsck_after_kill(mounted: CasfsMount, rnd: int) -> int:
    """Offline, before any mount: the store is consistent; unlinked-but-open files wait as
    orphans (notes, not problems), which the next mount frees. Returns how many."""
    r = mounted.fsck("--json")
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["clean"], f"round {rnd}: fsck after kill -9: {report}"
    assert {n["kind"] for n in report["notes"]} <= {"orphan"}
    return len(report["notes"])


def test_kill_9_loses_no_fsynced_data(mounted: CasfsMount, tmp_path):
    rng = random.Random(SEED)
    log = str(tmp_path / "fsync.log")
    forced = 0
    writer_killed_alive = 0
    orphans = 0  # unlinked-but-open files fsck saw between the kill and the next mount
    start = time.monotonic()
    for rnd in range(ROUNDS):
        if mounted.pid is None:
            mounted.mount()
        writer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                str(mounted.mnt / f"round{rnd}"),
                log,
                str(rnd),
                str(rnd % 2),  # odd rounds: the writer lingers, keeping the dead mount busy
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            time.sleep(rng.uniform(0.3, 1.5))
            assert writer.poll() is None, writer.stderr.read().decode(errors="replace")
            mounted.kill_daemon()
            how = mounted.clear_stale()  # casfs umount, or a lazy unmount when busy
            forced += how.startswith("fusermount3")
        finally:
            if writer.poll() is None:
                writer_killed_alive += 1
                writer.send_signal(signal.SIGKILL)
            writer.wait(30)
            writer.stderr.close()
        assert wait_gone(writer.pid)

        orphans += fsck_after_kill(mounted, rnd)

        mounted.mount()
        logged = _logged(log)
        bad = {p: d for p, d in logged.items() if not os.path.exists(p) or _sha256(p) != d}
        assert not bad, f"round {rnd}: {len(bad)} of {len(logged)} fsync'ed files lost or wrong"
        mounted.umount()
        mounted.assert_fsck_clean()

    logged = _logged(log)
    print(
        f"\n{ROUNDS} crashes in {time.monotonic() - start:.1f} s: {len(logged)} fsync'ed files "
        f"verified; {forced} stale mount(s) casfs umount could not clear; "
        f"{writer_killed_alive} writer(s) kept the dead mount busy; {orphans} orphan(s) left by "
        "the kills, freed by the next mount"
    )
    assert len(logged) >= ROUNDS  # the writer got some fsyncs in
    assert writer_killed_alive > 0  # some stale mounts were busy
    assert forced == 0, "casfs umount could not clear a stale mount"
