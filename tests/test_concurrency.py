"""Concurrency: writers, readers, snapshot creation and deletion, ``casfs stats`` and
``casfs import`` all at once on one real mount, for a bounded time, with no error, no deadlock
and a clean ``fsck --verify-data`` at the end.

For ``CASFS_STRESS_SECONDS`` (default 20) these threads run in parallel:

- 3 writers, each in its own directory ``wN/{a,b,c}``: create, append, overwrite in place,
  rewrite with O_TRUNC, truncate, rename (sometimes over another file), unlink, swap two
  subdirectories (three renames); fsync now and then; read back a file of their own now and
  then (it must equal the model exactly). Every write writes whole 64-byte records
  ``wW fFID vVER iIDX ....\\n``: the record at index IDX of file FID, written by version VER
  of that file. Each version (one write call) is registered with the index range it covers
  *before* the write starts.
- 2 readers: read random files of the writers' directories and of existing snapshots. A path
  may vanish (ENOENT), but what an open file returns must be whole records of one file, each
  at its own index and written there by a registered version (a torn last record is allowed
  only as a prefix of such a record): never zeros, never another file's bytes, never
  anything nobody wrote.
- a snapshotter: ``casfs snapshot MNT sN`` every ~1 s, keeping at most 5; the oldest is deleted
  with ``casfs snapshot -d MNT NAME`` or (one time in three) ``rmdir MNT/.snap/NAME``.
- a snapshot browser: ``os.walk`` over ``.snap/*`` (half the time the oldest, the next to be
  deleted) reading every file while snapshots are deleted under it: ENOENT is allowed, any
  other error (EIO...) is not; contents are checked as above, and an imported snapshot must
  hold exactly its source's bytes.
- ``casfs stats STORE --json`` every ~0.5 s (exit 0, a JSON object).
- ``casfs import`` of a local tree twice (at 25 % and 60 % of the run; the first given the
  store, the second the mountpoint, both served by the mount), the tree changed in between.

Any unexpected exception in a thread fails the test. A thread that makes no progress for
STALL seconds is a deadlock: the test fails with every thread's stack and the mount log's
tail. At the end: every writer's directory equals its model, every remaining snapshot is
internally consistent (as above, whole files), each import snapshot equals its source, the
snapshot list is what the snapshotter kept; then unmount, ``casfs fsck --verify-data``,
mount again and compare the writers' models once more (the fixture unmounts and runs fsck).

Zero tails. The kernel's FUSE client (no writeback cache, pages kept across opens, as casfs
mounts) lets a read that races a truncate of the same file return zeros from some point to the
end: the same reads against bench/refs/memfs.py, a trivial in-memory pyfuse3 filesystem with
the same options, show it (more often), so it is no casfs bug; a file that is never truncated
never shows it. So a read of the live tree may end in zeros, from a record boundary on, when
its file was ever truncated (or opened with O_TRUNC): counted, not failed. Once in a 120 s
stress run the same race left a whole page of zeros inside such a file (page-aligned, the
bytes after it valid): allowed on the same terms. Snapshot files
never change and get no such allowance. A writer reading its own file back, and the final
check, drop such a stale page from the cache (POSIX_FADV_DONTNEED) and read again once: that
must equal the model exactly.

``CASFS_STRESS_SECONDS`` lengthens the run (bench/stress.py uses 120), ``CASFS_STRESS_SEED``
changes the random choices (the thread interleaving is never the same anyway).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import sys
import threading
import time
import traceback
from pathlib import Path

from conftest import CasfsMount, casfs_cli, read_file, write_all

SECONDS = float(os.environ.get("CASFS_STRESS_SECONDS", "20"))
SEED = int(os.environ.get("CASFS_STRESS_SEED", "6161"))
STALL = 30.0  # seconds without progress that count as a deadlock
WRITERS = 3
READERS = 2
KEEP_SNAPSHOTS = 5
SUBDIRS = ("a", "b", "c")
NAMES = 12  # names per subdirectory: renames often land on an existing file
MAX_RECORDS = 8192  # 512 KiB per file at most
CLI_TIMEOUT = 2 * STALL

RECORD = 64
FILL = b"." * (RECORD - 1) + b"\n"
HEAD = re.compile(rb"w(\d) f(\d{6}) v(\d{6}) i(\d{8}) ")
HEAD_LEN = 29
assert len(b"w0 f000000 v000000 i00000000 ") == HEAD_LEN


def record(w: int, fid: int, v: int, idx: int) -> bytes:
    return b"w%d f%06d v%06d i%08d " % (w, fid, v, idx) + FILL[HEAD_LEN:]


def records(w: int, fid: int, v: int, start: int, stop: int) -> bytes:
    return b"".join(record(w, fid, v, i) for i in range(start, stop))


class Registry:
    """Every version ever written: (writer, fid, version) -> the index range it wrote."""

    def __init__(self) -> None:
        self.extent: dict[tuple[int, int, int], tuple[int, int]] = {}
        self.versions: dict[tuple[int, int], int] = {}  # (writer, fid) -> latest version
        self.shrunk: set[tuple[int, int]] = set()  # (writer, fid) truncated or O_TRUNC'ed

    def register(self, w: int, fid: int, start: int, stop: int) -> int:
        v = self.versions.get((w, fid), 0) + 1
        self.extent[(w, fid, v)] = (start, stop)  # before the write: readers may see it
        self.versions[(w, fid)] = v
        return v

    def wrote(self, w: int, fid: int, v: int, idx: int) -> bool:
        ext = self.extent.get((w, fid, v))
        return ext is not None and ext[0] <= idx < ext[1]

    def shrinking(self, w: int, fid: int) -> None:
        """Before a truncate or an O_TRUNC open of a file."""
        self.shrunk.add((w, fid))

    def check(self, data: bytes, w: int, where: str, live: bool = False) -> str:
        """``data`` (a whole read of one open file of writer ``w``) holds only records
        written at their place; a torn last record must be a prefix of one. A read of the
        live tree may end in zeros, from a record boundary on, if the file was ever shrunk:
        the kernel's FUSE page cache lets a read that races a truncate return them (see the
        module docstring). Returns "zeros", "torn" or ""."""
        if live and data.endswith(b"\0"):
            body = data.rstrip(b"\0")
            fid = int(body[4:10]) if len(body) >= 10 else None
            shrunk = (w, fid) in self.shrunk if fid is not None else self.shrunk
            if len(body) % RECORD == 0 and shrunk:
                self.check(body, w, where)
                return "zeros"
        if live and ZERO_PAGE in data:
            # the same race may leave a whole stale page of zeros inside the file: allowed
            # (counted) only in a file that was shrunk, every other byte checked as usual
            fid = _first_fid(data)
            if fid is not None and (w, fid) in self.shrunk:
                cleaned = _fill_zero_pages(data, w, fid, self)
                if cleaned is not None:
                    self.check(cleaned, w, where)
                    return "zeros"
        fid = None
        full = len(data) - len(data) % RECORD
        for off in range(0, full, RECORD):
            rec = data[off : off + RECORD]
            m = HEAD.match(rec)
            idx = off // RECORD
            if m is None or rec[HEAD_LEN:] != FILL[HEAD_LEN:]:
                raise AssertionError(f"{where}: garbage at offset {off}: {rec!r}")
            rw, rfid, rv, ridx = (int(g) for g in m.groups())
            if fid is None:
                fid = rfid
            if rw != w or rfid != fid or ridx != idx or not self.wrote(rw, rfid, rv, idx):
                raise AssertionError(
                    f"{where}: record at offset {off} was never written there: {rec!r} "
                    f"(writer {w}, file {fid}, extent {self.extent.get((rw, rfid, rv))})"
                )
        tail = data[full:]
        if not tail:
            return ""
        idx = full // RECORD
        if fid is None:  # nothing whole before it: take the fid from the tail if it shows
            m = re.match(rb"w\d f(\d{6})", tail)
            fid = int(m.group(1)) if m else None
        candidates = (
            record(w, fid, v, idx)
            for v in range(1, self.versions.get((w, fid), 0) + 1)
            if self.wrote(w, fid, v, idx)
        )
        if fid is None:
            ok = record(w, 0, 0, idx).startswith(tail[:3]) and len(tail) < 10
        else:
            ok = any(c.startswith(tail) for c in candidates)
        if not ok:
            raise AssertionError(f"{where}: torn tail at offset {full} is no record: {tail!r}")
        return "torn"


PAGE = 4096
ZERO_PAGE = bytes(PAGE)


def _first_fid(data: bytes) -> int | None:
    m = re.search(rb"w\d f(\d{6})", data)
    return int(m.group(1)) if m else None


def _fill_zero_pages(data: bytes, w: int, fid: int, reg: Registry) -> bytes | None:
    """``data`` with each page-aligned run of zeros replaced by records some version wrote
    there (so the rest can be checked as usual), or None if a zero run is not page-aligned
    or no version wrote its records."""
    out = bytearray(data)
    for start in range(0, len(data) - PAGE + 1, PAGE):
        if data[start : start + PAGE] != ZERO_PAGE:
            continue
        for off in range(start, start + PAGE, RECORD):
            idx = off // RECORD
            v = next(
                (
                    v
                    for v in range(1, reg.versions.get((w, fid), 0) + 1)
                    if reg.wrote(w, fid, v, idx)
                ),
                None,
            )
            if v is None:
                return None
            out[off : off + RECORD] = record(w, fid, v, idx)
    return bytes(out)


class Run:
    """What the threads share."""

    def __init__(self, m: CasfsMount, seconds: float) -> None:
        self.m = m
        self.mnt = m.mnt
        self.snapdir = m.mnt / ".snap"
        self.seconds = seconds
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.registry = Registry()
        self.imports: dict[str, dict[str, bytes]] = {}  # snapshot -> relpath -> bytes
        self.started = time.monotonic()

    def fail(self, who: str) -> None:
        self.errors.append(f"{who}:\n{traceback.format_exc()}")
        self.stop.set()

    def check_file(self, path: Path, data: bytes, where: str) -> str:
        """Check what one open file returned, wherever it lives (live tree or snapshot).
        Returns "zeros" (a zero tail in the live tree), "torn" (a torn last record) or ""."""
        rel = path.relative_to(self.mnt).parts
        live = rel[0] != ".snap"
        if not live:
            if rel[1] in self.imports:
                want = self.imports[rel[1]].get("/".join(rel[2:]))
                assert want == data, f"{where}: imported file differs from its source"
                return ""
            rel = rel[2:]
        w = int(rel[0][1:])
        return self.registry.check(data, w, where, live)


class Worker(threading.Thread):
    kind = "?"

    def __init__(self, run: Run, n: int) -> None:
        super().__init__(name=f"{self.kind}{n}", daemon=True)
        self.run_ = run
        self.rng = random.Random(f"{SEED} {self.kind} {n}")
        self.ops = 0
        self.beat = time.monotonic()
        self.doing = "starting"

    def run(self) -> None:
        try:
            self.setup()
            while not self.run_.stop.is_set():
                self.step()
                self.ops += 1
                self.beat = time.monotonic()
        except BaseException:
            self.run_.fail(f"{self.name} while {self.doing}")

    def setup(self) -> None:
        pass

    def step(self) -> None:
        raise NotImplementedError

    def pause(self, seconds: float) -> None:
        self.doing = "sleeping"
        self.run_.stop.wait(seconds)
        self.beat = time.monotonic()

    def cli(self, *args: str | os.PathLike) -> str:
        self.doing = "casfs " + " ".join(map(str, args))
        r = casfs_cli(*args, timeout=CLI_TIMEOUT)
        assert r.returncode == 0, f"{self.doing}: exit {r.returncode}: {r.stderr.strip()}"
        return r.stdout

    def read_checked(self, path: Path, where: str) -> int:
        """Read a file and check it; returns 1 if it vanished (ENOENT), 0 if not."""
        self.doing = f"reading {path}"
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return 1
        try:
            chunks = []
            while block := os.read(fd, 1 << 20):
                chunks.append(block)
        finally:
            os.close(fd)
        result = self.run_.check_file(path, b"".join(chunks), where)
        self.torn += result == "torn"
        self.zero_tails += result == "zeros"
        self.bytes_read += sum(map(len, chunks))
        return 0


class Writer(Worker):
    kind = "writer"

    def setup(self) -> None:
        self.w = int(self.name[len(self.kind) :])
        self.top = self.run_.mnt / f"w{self.w}"
        for sub in SUBDIRS:
            (self.top / sub).mkdir(parents=True)
        self.files: dict[str, tuple[int, bytearray]] = {}  # relpath -> (fid, content)
        self.next_fid = 0
        self.counts = dict.fromkeys(
            [
                "create",
                "append",
                "overwrite",
                "rewrite",
                "truncate",
                "rename",
                "unlink",
                "swapdirs",
            ],
            0,
        )
        self.fsyncs = self.verified = self.stale_zero_tails = 0

    def name_(self) -> str:
        return f"{self.rng.choice(SUBDIRS)}/n{self.rng.randrange(NAMES):02d}"

    def count(self) -> int:
        return self.rng.choice(
            [0, 1, self.rng.randrange(1, 64), self.rng.randrange(1, 1024), self.rng.randrange(4096)]
        )

    def write(self, rel: str, fid: int, start: int, stop: int, flags: int) -> None:
        content = self.files[rel][1] if rel in self.files else bytearray()
        v = self.run_.registry.register(self.w, fid, start, stop)
        data = records(self.w, fid, v, start, stop)
        self.doing = f"writing {rel} (file {fid} v{v}, records {start}..{stop})"
        if flags & os.O_TRUNC:
            self.run_.registry.shrinking(self.w, fid)
        fd = os.open(self.top / rel, os.O_WRONLY | flags, 0o644)
        try:
            if flags & os.O_TRUNC:
                content = bytearray()
            os.lseek(fd, start * RECORD, os.SEEK_SET)
            write_all(fd, data)
            if self.rng.random() < 0.2:
                self.doing = f"fsync {rel}"
                os.fsync(fd)
                self.fsyncs += 1
        finally:
            os.close(fd)
        content[start * RECORD : stop * RECORD] = data
        self.files[rel] = (fid, content)

    def step(self) -> None:
        rng = self.rng
        ops = list(self.counts)
        weights = [12, 14, 10, 6, 6, 8, 5 + max(0, len(self.files) - 20), 2]
        if not self.files:
            op = "create"
        else:
            op = rng.choices(ops, weights)[0]
        rel = rng.choice(sorted(self.files)) if self.files else None
        if op == "create":
            new = self.name_()
            if new in self.files:
                return
            self.next_fid += 1
            self.write(new, self.next_fid, 0, self.count(), os.O_CREAT | os.O_EXCL)
        elif op in ("append", "overwrite"):
            fid, content = self.files[rel]
            size = len(content) // RECORD
            start = size if op == "append" else rng.randrange(size + 1)
            stop = min(start + self.count(), MAX_RECORDS)
            if stop <= start:
                return
            self.write(rel, fid, start, stop, 0)
        elif op == "rewrite":
            self.write(rel, self.files[rel][0], 0, self.count(), os.O_TRUNC)
        elif op == "truncate":
            fid, content = self.files[rel]
            keep = rng.randrange(len(content) // RECORD + 1)
            self.doing = f"truncate {rel} to {keep} records"
            self.run_.registry.shrinking(self.w, fid)
            os.truncate(self.top / rel, keep * RECORD)
            del content[keep * RECORD :]
        elif op == "rename":
            new = self.name_()
            if new == rel:
                return
            self.doing = f"rename {rel} -> {new}"
            os.rename(self.top / rel, self.top / new)
            self.files[new] = self.files.pop(rel)
        elif op == "unlink":
            self.doing = f"unlink {rel}"
            os.unlink(self.top / rel)
            del self.files[rel]
        elif op == "swapdirs":  # two subdirectories trade places (and all their files)
            x, y = rng.sample(SUBDIRS, 2)
            self.doing = f"swapping directories {x} and {y}"
            os.rename(self.top / x, self.top / "tmp")
            os.rename(self.top / y, self.top / x)
            os.rename(self.top / "tmp", self.top / y)
            swap = {x: y, y: x}
            self.files = {
                f"{swap.get(d, d)}/{n}": v
                for (d, n), v in ((k.split("/"), v) for k, v in self.files.items())
            }
        self.counts[op] += 1
        if rng.random() < 0.05 and self.files:  # read-your-writes: exactly the model
            rel = rng.choice(sorted(self.files))
            self.doing = f"reading back {rel}"
            self.read_back(rel)
            self.verified += 1

    def read_back(self, rel: str) -> None:
        """The file must hold exactly what the model says. A stale zero tail from the
        kernel's page cache (see the module docstring) is dropped from the cache and the file
        read again, once: then it must."""
        fid, content = self.files[rel]
        got = read_file(self.top / rel)
        if got == content:
            return
        body = got.rstrip(b"\0")
        if (self.w, fid) in self.run_.registry.shrunk and zero_tail(body, got, content):
            self.stale_zero_tails += 1
            fd = os.open(self.top / rel, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            got = read_file(self.top / rel)
        assert got == content, (
            f"{self.name}: {rel} (file {fid}) differs from what was written: {len(got)} bytes, "
            f"{len(content)} expected, first difference at offset "
            f"{len(os.path.commonprefix([got, bytes(content)]))}"
        )

    def check_final(self) -> None:
        found = set()
        for sub in SUBDIRS:
            found.update(f"{sub}/{name}" for name in os.listdir(self.top / sub))
        assert found == self.files.keys(), (
            f"{self.name}: other paths than the model's: {sorted(found ^ self.files.keys())}"
        )
        for rel in sorted(found):
            self.read_back(rel)


class Reader(Worker):
    kind = "reader"

    def setup(self) -> None:
        self.reads = self.snapshot_reads = self.enoent = self.torn = self.bytes_read = 0
        self.zero_tails = 0

    def step(self) -> None:
        run = self.run_
        if self.rng.random() < 0.3:
            self.doing = "listing .snap"
            snaps = [s for s in os.listdir(run.snapdir) if s not in run.imports]
            if not snaps:
                self.pause(0.05)
                return
            top = run.snapdir / self.rng.choice(snaps) / f"w{self.rng.randrange(WRITERS)}"
            self.snapshot_reads += 1
        else:
            top = run.mnt / f"w{self.rng.randrange(WRITERS)}"
        sub = top / self.rng.choice(SUBDIRS)
        self.doing = f"listing {sub}"
        try:
            names = os.listdir(sub)
        except FileNotFoundError:  # a snapshot deleted meanwhile
            self.enoent += 1
            return
        if not names:
            return
        path = sub / self.rng.choice(names)
        self.enoent += self.read_checked(path, f"{self.name}: {path}")
        self.reads += 1


class Snapshotter(Worker):
    kind = "snapshotter"

    def setup(self) -> None:
        self.kept: list[str] = []
        self.created = self.deleted_cli = self.deleted_rmdir = 0

    def step(self) -> None:
        run = self.run_
        self.pause(self.rng.uniform(0.5, 1.0))  # plus the command's own time: ~1 s a round
        if run.stop.is_set():
            return
        name = f"s{self.created + 1}"
        self.cli("snapshot", run.mnt, name)
        self.created += 1
        self.kept.append(name)
        while len(self.kept) > KEEP_SNAPSHOTS:
            victim = self.kept.pop(0)
            if self.rng.random() < 1 / 3:
                self.doing = f"rmdir .snap/{victim}"
                os.rmdir(run.snapdir / victim)
                self.deleted_rmdir += 1
            else:
                self.cli("snapshot", "-d", run.mnt, victim)
                self.deleted_cli += 1
            assert not os.path.lexists(run.snapdir / victim), f"{victim} still there"


class Browser(Worker):
    kind = "browser"

    def setup(self) -> None:
        self.walks = self.files_read = self.enoent = self.torn = self.bytes_read = 0
        self.zero_tails = 0

    def step(self) -> None:
        run = self.run_
        self.doing = "listing .snap"
        snaps = os.listdir(run.snapdir)
        if not snaps:
            self.pause(0.1)
            return
        taken = sorted((int(s[1:]), s) for s in snaps if s not in run.imports)
        if taken and self.rng.random() < 0.5:  # the oldest: the next to be deleted
            top = run.snapdir / taken[0][1]
        else:
            top = run.snapdir / self.rng.choice(snaps)

        def onerror(exc: OSError) -> None:
            if exc.errno != errno.ENOENT:
                raise exc
            self.enoent += 1

        self.doing = f"walking {top}"
        for dirpath, _, filenames in os.walk(top, onerror=onerror):
            for name in filenames:
                path = Path(dirpath) / name
                self.enoent += self.read_checked(path, f"{self.name}: {path}")
                self.files_read += 1
                self.beat = time.monotonic()
                if run.stop.is_set():
                    return
        self.walks += 1


class Stats(Worker):
    kind = "stats"

    def step(self) -> None:
        out = json.loads(self.cli("stats", self.run_.m.store, "--json"))
        assert isinstance(out, dict) and out["objects"] >= 0 and out["inodes"] > 0, out
        self.pause(0.5)


class Importer(Worker):
    kind = "importer"

    def setup(self) -> None:
        self.src = self.run_.m.store.parent / "import-src"
        self.tree: dict[str, bytes] = {}
        for i in range(60):
            self.put(f"d{i % 4}/f{i:02d}", self.rng.randbytes(self.rng.randrange(200 << 10)))
        self.put("big", self.rng.randbytes(3 << 20))
        self.done = 0
        self.files = 0

    def put(self, rel: str, data: bytes) -> None:
        (self.src / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.src / rel).write_bytes(data)
        self.tree[rel] = data

    def step(self) -> None:
        run = self.run_
        when = (0.25, 0.6)
        if self.done >= len(when):
            self.pause(1)
            return
        if time.monotonic() - run.started < when[self.done] * run.seconds:
            self.pause(0.2)
            return
        if self.done:  # change the tree: rewrite some, add one, remove one
            for rel in self.rng.sample(sorted(self.tree), 5):
                self.put(rel, self.rng.randbytes(self.rng.randrange(100 << 10)))
            self.put(f"new{self.done}", self.rng.randbytes(50 << 10))
            gone = self.rng.choice(sorted(k for k in self.tree if k.startswith("d")))
            (self.src / gone).unlink()
            del self.tree[gone]
        name = f"imp-{self.done + 1}"
        run.imports[name] = dict(self.tree)  # before it can appear in .snap
        target = run.m.store if self.done == 0 else run.mnt
        out = json.loads(self.cli("import", target, self.src, "-s", name, "--json"))
        assert out["warnings"] == 0, out
        assert out["files"] == len(self.tree), out
        self.files += out["files"]
        self.done += 1


def zero_tail(body: bytes, got: bytes, want: bytes) -> bool:
    """Whether ``got`` is a record-aligned prefix of ``want`` (``body``) followed by zeros."""
    return len(body) < len(got) and len(body) % RECORD == 0 and want.startswith(body)


def _stacks(threads: list[Worker]) -> str:
    frames = sys._current_frames()
    out = []
    for t in threads:
        if t.ident in frames:
            stack = "".join(traceback.format_stack(frames[t.ident]))
            out.append(
                f"--- {t.name} ({t.doing}), idle {time.monotonic() - t.beat:.1f} s:\n{stack}"
            )
    return "\n".join(out)


def _log_tail(m: CasfsMount, lines: int = 60) -> str:
    return "\n".join(m.log_text().splitlines()[-lines:])


def _snapshot_names(m: CasfsMount) -> set[str]:
    r = casfs_cli("snapshot", m.mnt, "--json")
    assert r.returncode == 0, r.stderr
    return {row["name"] for row in json.loads(r.stdout)}


def _check_snapshot(run: Run, name: str) -> int:
    """Every file of a remaining snapshot, read whole, is consistent, and no file of a
    writer is in it under two names (a snapshot is one point in time, a rename one
    operation); returns how many files it holds."""
    top = run.snapdir / name
    n = 0

    def fail(exc: OSError) -> None:
        raise exc

    found = {}
    where: dict[bytes, str] = {}  # "wW fFID" -> the path it was found at
    for dirpath, _, filenames in os.walk(top, onerror=fail):
        for fname in filenames:
            path = Path(dirpath) / fname
            rel = path.relative_to(top).as_posix()
            data = read_file(path)
            found[rel] = data
            run.check_file(path, data, f"final check of .snap/{name}: {rel}")
            if name not in run.imports and data:
                fid = data[:10]
                assert fid not in where, f".snap/{name}: {fid!r} at {where.get(fid)} and {rel}"
                where[fid] = rel
            n += 1
    if name in run.imports:
        assert found.keys() == run.imports[name].keys(), f".snap/{name}: other files"
    return n


def _drive(run: Run, threads: list[Worker]) -> None:
    """Let the threads run for the time given, watching for errors and deadlocks; then stop
    and join them."""
    m = run.m

    def deadlock(why: str) -> None:
        report = f"{why}\n{_stacks(threads)}\n--- mount log tail:\n{_log_tail(m)}"
        run.stop.set()
        m.kill_daemon()  # unblocks the threads stuck in the mount
        raise AssertionError(report)

    deadline = run.started + run.seconds
    while time.monotonic() < deadline and not run.stop.is_set():
        time.sleep(0.25)
        now = time.monotonic()
        stuck = [t for t in threads if t.is_alive() and now - t.beat > STALL]
        if stuck:
            deadlock(f"no progress for {STALL:.0f} s: {[(t.name, t.doing) for t in stuck]}")
    run.stop.set()
    for t in threads:
        t.join(max(0.1, STALL - (time.monotonic() - t.beat)))
    stuck = [t for t in threads if t.is_alive()]
    if stuck:
        deadlock(f"threads did not finish: {[(t.name, t.doing) for t in stuck]}")
    assert not run.errors, "\n".join(run.errors) + "\n--- mount log tail:\n" + _log_tail(m)


def test_concurrent_writers_readers_snapshots_stats_import(mounted: CasfsMount):
    run = Run(mounted, SECONDS)
    writers = [Writer(run, i) for i in range(WRITERS)]
    readers = [Reader(run, i) for i in range(READERS)]
    snapshotter, browser = Snapshotter(run, 0), Browser(run, 0)
    stats, importer = Stats(run, 0), Importer(run, 0)
    threads = [*writers, *readers, snapshotter, browser, stats, importer]
    try:
        for t in threads:
            t.start()
        _drive(run, threads)
    finally:  # also on KeyboardInterrupt: no thread may keep the mount busy at the teardown
        run.stop.set()
        for t in threads:
            if t.is_alive():
                t.join(STALL)
    seconds = time.monotonic() - run.started

    # the end state: models, snapshots, imports
    for w in writers:
        w.check_final()
    names = _snapshot_names(mounted)
    assert names == set(snapshotter.kept) | set(run.imports), names
    assert sorted(os.listdir(run.snapdir)) == sorted(names)
    snapshot_files = sum(_check_snapshot(run, name) for name in sorted(names))
    for name, tree in run.imports.items():
        for rel, data in tree.items():
            assert read_file(run.snapdir / name / rel) == data, f".snap/{name}/{rel}"
    mounted.umount()
    r = mounted.fsck("--verify-data")
    assert r.returncode == 0, f"casfs fsck --verify-data:\n{r.stdout}{r.stderr}"
    mounted.mount()
    for w in writers:
        w.check_final()

    # a summary line (bench/stress.py reads it)
    writer_ops = sum(w.ops for w in writers)
    kinds: dict[str, int] = {}
    for w in writers:
        for k, n in w.counts.items():
            kinds[k] = kinds.get(k, 0) + n
    reads = sum(r.reads for r in readers)
    total = writer_ops + reads + snapshotter.ops + browser.files_read + stats.ops + importer.done
    print(
        f"\nconcurrency: {seconds:.1f} s, {total} ops: writers {writer_ops} {kinds} "
        f"({sum(w.fsyncs for w in writers)} fsyncs, {sum(w.verified for w in writers)} "
        f"read back); readers {reads} reads ({sum(r.snapshot_reads for r in readers)} in "
        f"snapshots, {sum(r.enoent for r in readers)} ENOENT, "
        f"{sum(r.bytes_read for r in readers) >> 20} MiB); snapshots {snapshotter.created} "
        f"created, {snapshotter.deleted_cli + snapshotter.deleted_rmdir} deleted "
        f"({snapshotter.deleted_rmdir} by rmdir); browser {browser.walks} walks, "
        f"{browser.files_read} files ({browser.enoent} ENOENT); stats {stats.ops}; imports "
        f"{importer.done} ({importer.files} files); torn reads "
        f"{sum(r.torn for r in readers) + browser.torn}; zero tails (kernel truncate race) "
        f"{sum(r.zero_tails for r in readers)} in reads, "
        f"{sum(w.stale_zero_tails for w in writers)} in read-backs; {snapshot_files} snapshot "
        f"files checked at the end; fsck --verify-data clean (seed {SEED})"
    )
    if SECONDS >= 10:  # enough snapshots that some were deleted
        assert snapshotter.created > KEEP_SNAPSHOTS, "the snapshotter hardly got any in"
        assert snapshotter.deleted_cli + snapshotter.deleted_rmdir > 0
    assert importer.done == 2
    assert all(w.ops > 10 for w in writers) and reads > 10 and browser.files_read > 10
