"""casfs through its FUSE mount, side by side with two reference pyfuse3 filesystems.

Everything is measured in one run on the same machine, so the ratios hold on a noisy host.
The references are mounted by this script (``bench/refs/``): **nullfs** (reads return zeros,
writes are dropped: the ceiling of any pyfuse3 filesystem here) and **memfs** (a minimal,
correct dict-backed filesystem: the reference for metadata work). All three use the same
kernel settings: pyfuse3's ``default_permissions``, no writeback cache, 5 s entry/attribute
timeouts, ``keep_cache`` on open, default max_write and read-ahead. The store pipeline's own
ceiling comes from ``bench/ingest.py --mib 256``, run first in the same run.

Source data is incompressible (``os.urandom``) and kept in /dev/shm, so reading it costs no
disk and survives ``drop_caches``. MB/s is 10^6 bytes per second of wall time.

Figures (one JSON line each, printed as soon as measured):

  pipeline_ingest / pipeline_readback
        bench/ingest.py's "ingest" and "readback" figures: Filesystem.write/read in-process.
  seq_write_{nullfs,casfs}
        ``dd if=SRC of=MNT/f bs=1M conv=fsync`` of 1 GiB (--quick: 256 MiB), then ``sync``;
        conv=fsync makes casfs commit, so the figure is durable throughput.
        casfs is compared with nullfs and with pipeline_ingest.
  cold_read_{nullfs,casfs}
        unmount, remount, ``echo 3 > /proc/sys/vm/drop_caches``, then
        ``dd if=MNT/f of=/dev/null bs=1M`` of that file (nullfs: of its 1 TiB zero file, the
        same length). casfs is compared with nullfs and with pipeline_readback.
  write_4k_{nullfs,memfs,casfs}
        ``dd bs=4k conv=fsync`` of 256 MiB (--quick: 64 MiB) into a new file: one FUSE write
        request per 4 KiB. Ratios to nullfs.
  {seq_write,cold_read,write_4k,files_10k}_disk
        the same four measurements on the local disk that holds the stores (the scratch
        directory), as the kernel filesystem reference; casfs's figures carry a ratio to it.
  files_10k_{memfs,casfs}
        one Python process creates 10,000 files of 4 KiB (distinct random contents) spread
        over 10 directories: os.open(O_CREAT|O_TRUNC) / os.write / os.close each, then an
        fsync of the last file (casfs: flush and commit). files/s; casfs vs memfs, and vs the
        constant S3QL anchor of ~1,050 files/s (figure files_10k_casfs, vs "s3ql_anchor").
  peak_rss_casfs
        a fresh store and mount, ``dd bs=1M conv=fsync`` of 4 GiB (--quick: 1 GiB) while
        /proc/PID/status of the daemon is sampled every 100 ms: VmHWM in MiB, with the largest
        RssAnon and RssFile seen (LMDB's mapped pages are file-backed). The throughput of
        that write is printed too, as seq_write_4g_casfs.
  goal_*
        the project's goals, with the reference each is judged against, "target" and "met".

Every line also carries "load1", the 1-minute load average when it was printed: on a shared
machine, figures taken while other work runs are not comparable (this is a 2-core VM).

Every mount this script makes is unmounted at the end, also on errors and on SIGTERM/SIGINT.
Needs root (drop_caches), /dev/fuse, fusermount3 and dd, and RAM for the source data in
/dev/shm (4 GiB; --quick: 1 GiB). Full run: about 2.5 minutes on the 2-core VM, never more
than --budget seconds (default 900: past it, the remaining figures are skipped).

Run: .venv/bin/python bench/mount.py [--quick] [--dir SCRATCH_DIR] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import benchlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CASFS = os.path.join(os.path.dirname(sys.executable), "casfs")
REFS = {
    "nullfs": os.path.join(HERE, "refs", "nullfs.py"),
    "memfs": os.path.join(HERE, "refs", "memfs.py"),
}
MiB = 1 << 20
S3QL_FILES_PER_S = 1050.0
GOALS = {
    "seq_write": 0.8,
    "cold_read": 0.7,
    "write_4k": 0.5,
    "files_10k_memfs": 0.5,
    "files_10k_s3ql": 3.0,
    "peak_rss_mib": 300.0,
}

results: dict[str, float] = {}
units: dict[str, str] = {}
_mounts: list[Mount] = []
_deadline = float("inf")


class Timeout(Exception):
    pass


def emit(
    figure: str,
    value: float,
    unit: str,
    vs: str | None = None,
    ref: float | None = None,
    **extra: object,
) -> None:
    if vs is not None and ref:
        extra = {"vs": vs, "ratio": round(value / ref, 3), **extra}
    extra["load1"] = round(os.getloadavg()[0], 2)  # other work on the machine skews figures
    units.setdefault(figure, unit)
    benchlib.emit("mount", figure, value, unit, **extra)


def note(text: str) -> None:
    print(f"# {text}", file=sys.stderr, flush=True)


def remaining(cap: float) -> float:
    left = _deadline - time.monotonic()
    if left <= 5:
        raise Timeout("time budget exhausted")
    return min(cap, left)


def run(cmd: list[str], cap: float = 300.0, **kw) -> subprocess.CompletedProcess:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=remaining(cap), **kw)
    except subprocess.TimeoutExpired:
        raise Timeout(f"{' '.join(cmd)}: timed out") from None
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()[-500:]}")
    return r


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


# -- mounts -----------------------------------------------------------------------------------


class Mount:
    """A mounted filesystem; ``stop`` always leaves the mountpoint unmounted."""

    name = ""
    mnt = ""
    pid: int | None = None

    def __enter__(self) -> Mount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _wait_mounted(self, alive, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mnt):
            if not alive():
                raise RuntimeError(f"{self.name}: daemon exited before mounting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: not mounted after {timeout:.0f} s")
            time.sleep(0.02)

    def stop(self) -> None:
        raise NotImplementedError

    def _force_unmount(self) -> None:
        for args in (["-u"], ["-u", "-z"]):
            if not os.path.ismount(self.mnt):
                return
            subprocess.run(["fusermount3", *args, self.mnt], capture_output=True, timeout=60)
            time.sleep(0.2)


class RefMount(Mount):
    def __init__(self, name: str, mnt: str, logdir: str) -> None:
        self.name, self.mnt = name, mnt
        os.makedirs(mnt, exist_ok=True)
        self.log = open(os.path.join(logdir, f"{name}.log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, REFS[name], mnt],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        _mounts.append(self)
        self._wait_mounted(lambda: self.proc.poll() is None)

    def stop(self) -> None:
        if self not in _mounts:
            return
        try:
            for _ in range(20):
                if not os.path.ismount(self.mnt):
                    break
                r = subprocess.run(["fusermount3", "-u", self.mnt], capture_output=True, timeout=60)
                if r.returncode == 0:
                    break
                time.sleep(0.25)  # busy: a closing file may still be releasing
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.terminate()  # our own child, by its id
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            self._force_unmount()
            self.log.close()
            _mounts.remove(self)


class CasfsMount(Mount):
    def __init__(self, store: str, mnt: str) -> None:
        self.name, self.store, self.mnt = "casfs", store, mnt
        os.makedirs(mnt, exist_ok=True)
        _mounts.append(self)
        run([CASFS, "mount", store, mnt], cap=120)
        with open(os.path.join(store, "casfs.lock")) as f:
            self.pid = int(f.read().strip())
        self._wait_mounted(lambda: os.path.exists(f"/proc/{self.pid}"))

    def stop(self) -> None:
        if self not in _mounts:
            return
        try:
            if os.path.ismount(self.mnt):
                for _ in range(20):
                    r = subprocess.run(
                        [CASFS, "umount", self.mnt], capture_output=True, text=True, timeout=600
                    )
                    if r.returncode == 0 or "busy" not in r.stderr:
                        break
                    time.sleep(0.25)
        finally:
            self._force_unmount()
            if self.pid and _alive(self.pid):
                deadline = time.monotonic() + 60
                while _alive(self.pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if _alive(self.pid):
                    note(f"casfs daemon {self.pid} still running after unmount: SIGTERM")
                    os.kill(self.pid, signal.SIGTERM)  # the daemon this script started
            _mounts.remove(self)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_all() -> None:
    for m in reversed(list(_mounts)):
        try:
            m.stop()
        except Exception as exc:  # keep going: no mount may be left behind
            note(f"unmounting {m.mnt} failed: {exc!r}")


# -- measurements -----------------------------------------------------------------------------


def dd(*operands: str, cap: float = 300.0) -> float:
    """Run dd (and sync after it); the wall time in seconds."""
    t = time.perf_counter()
    run(["dd", *operands, "status=none"], cap=cap)
    os.sync()
    return time.perf_counter() - t


def seq_write(src: str, dst: str, nbytes: int, skip: int = 0, bs: int = MiB) -> float:
    t = dd(
        f"if={src}",
        f"of={dst}",
        f"bs={bs}",
        f"count={nbytes // bs}",
        f"skip={skip // bs}",
        "conv=fsync",
    )
    size = os.stat(dst).st_size
    if size != nbytes:
        raise RuntimeError(f"{dst}: size {size} after writing {nbytes}")
    return nbytes / t / 1e6


def cold_read(path: str, nbytes: int) -> float:
    drop_caches()
    t = dd(f"if={path}", "of=/dev/null", f"bs={MiB}", f"count={nbytes // MiB}")
    return nbytes / t / 1e6


def many_files(
    mnt: str, payload: bytes, n: int = 10_000, dirs: int = 10, size: int = 4096
) -> float:
    for d in range(dirs):
        os.mkdir(os.path.join(mnt, f"d{d}"))
    paths = [os.path.join(mnt, f"d{i % dirs}", f"f{i:05d}") for i in range(n)]
    view = memoryview(payload)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    t0 = time.perf_counter()
    for i, path in enumerate(paths):
        if i % 500 == 0:
            remaining(600)
        fd = os.open(path, flags, 0o644)
        os.write(fd, view[i * size : (i + 1) * size])
        os.close(fd)
    fd = os.open(paths[-1], os.O_WRONLY)
    os.fsync(fd)
    os.close(fd)
    return n / (time.perf_counter() - t0)


class RssSampler:
    """VmRSS / VmHWM of a process every ``period`` seconds, in a thread."""

    def __init__(self, pid: int, period: float = 0.1) -> None:
        self.pid, self.period = pid, period
        self.hwm = self.rss = self.anon = self.file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        fields = {"VmHWM:": "hwm", "VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    key = fields.get(line.split(":", 1)[0] + ":")
                    if key:
                        value = int(line.split()[1]) << 10
                        setattr(self, key, max(getattr(self, key), value))
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def make_source(path: str, nbytes: int) -> None:
    with open(path, "wb") as f:
        for _ in range(0, nbytes, 64 * MiB):
            f.write(os.urandom(64 * MiB))


def pipeline_ceiling(mib: int) -> dict[str, float]:
    r = run([sys.executable, os.path.join(HERE, "ingest.py"), "--mib", str(mib)], cap=300, cwd=REPO)
    out = {}
    for line in r.stdout.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        out[d.get("figure")] = d.get("value")
    return out


def measured(figure: str, fn, unit: str, refs: tuple[tuple[str, float | None], ...] = (), **extra):
    """Measure one figure, print it (once per reference), remember it; on failure print why."""
    try:
        value = fn()
    except Timeout:
        raise
    except Exception as exc:
        note(f"{figure} failed: {exc}")
        print(json.dumps({"bench": "mount", "figure": figure, "error": str(exc)[:300]}), flush=True)
        return None
    results[figure] = value
    if not refs:
        emit(figure, value, unit, **extra)
    for vs, ref in refs:
        if vs in results or ref is not None:
            emit(figure, value, unit, vs=vs, ref=ref if ref is not None else results[vs], **extra)
        else:
            emit(figure, value, unit, **extra)
    return value


def goal(
    name: str,
    figure: str,
    refs: list[str],
    target: float,
    higher: bool = True,
    const: float | None = None,
) -> None:
    """Judge ``figure`` against the lowest of ``refs`` (or a constant)."""
    value = results.get(figure)
    known = [(r, results[r]) for r in refs if results.get(r)]
    if value is None or (const is None and not known):
        return
    if const is not None:
        vs, ref = refs[0], const
    else:
        vs, ref = min(known, key=lambda x: x[1])
    ratio = value / ref
    met = ratio >= target if higher else ratio < target
    emit(f"goal_{name}", value, units.get(figure, ""), vs=vs, ref=ref, target=target, met=met)


# -- the run ----------------------------------------------------------------------------------


def main() -> None:
    global _deadline
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (about a quarter)")
    ap.add_argument("--dir", default=None, help="scratch directory for the stores (default: tmp)")
    ap.add_argument("--budget", type=float, default=900.0, help="give up after this many seconds")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (drop_caches)")
    _deadline = time.monotonic() + args.budget
    seq = (256 if args.quick else 1024) * MiB
    small = (64 if args.quick else 256) * MiB
    big = (1024 if args.quick else 4096) * MiB

    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    work = tempfile.mkdtemp(prefix="casfs-bench-mount-", dir=args.dir)
    fd, src = tempfile.mkstemp(prefix="casfs-bench-src-", dir="/dev/shm")
    os.close(fd)
    mnt = os.path.join(work, "mnt")
    started = time.monotonic()
    interrupted = False
    code = "import os, casfs; print(os.path.dirname(os.path.dirname(casfs.__file__)))"
    where = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    note(f"measuring casfs from {where.strip()} (daemon: {CASFS})")
    try:
        t = time.perf_counter()
        make_source(src, max(seq + small, big))
        files_payload = os.urandom(10_000 * 4096)
        note(f"source data ready in {time.perf_counter() - t:.1f} s")

        p = pipeline_ceiling(256)
        if p.get("ingest"):
            results["pipeline_ingest"] = p["ingest"]
            emit("pipeline_ingest", p["ingest"], "MB/s", source="bench/ingest.py --mib 256")
        if p.get("readback"):
            results["pipeline_readback"] = p["readback"]
            emit("pipeline_readback", p["readback"], "MB/s", source="bench/ingest.py --mib 256")

        # -- nullfs -------------------------------------------------------------------------
        with RefMount("nullfs", mnt, work):
            measured("seq_write_nullfs", lambda: seq_write(src, f"{mnt}/f", seq), "MB/s")
        with RefMount("nullfs", mnt, work):  # fresh mount, as for casfs
            measured("cold_read_nullfs", lambda: cold_read(f"{mnt}/zero", seq), "MB/s")
            measured(
                "write_4k_nullfs", lambda: seq_write(src, f"{mnt}/g", small, seq, 4096), "MB/s"
            )

        # -- memfs --------------------------------------------------------------------------
        with RefMount("memfs", mnt, work):
            measured(
                "write_4k_memfs",
                lambda: seq_write(src, f"{mnt}/g", small, seq, 4096),
                "MB/s",
                refs=(("write_4k_nullfs", None),),
            )
            measured("files_10k_memfs", lambda: many_files(mnt, files_payload), "files/s")

        # -- the local disk the stores live on ----------------------------------------------
        disk = os.path.join(work, "disk")
        os.makedirs(disk)
        measured("seq_write_disk", lambda: seq_write(src, f"{disk}/f", seq), "MB/s")
        measured("cold_read_disk", lambda: cold_read(f"{disk}/f", seq), "MB/s")
        measured("write_4k_disk", lambda: seq_write(src, f"{disk}/g", small, seq, 4096), "MB/s")
        measured("files_10k_disk", lambda: many_files(disk, files_payload), "files/s")
        shutil.rmtree(disk, ignore_errors=True)

        # -- casfs --------------------------------------------------------------------------
        store = os.path.join(work, "store")
        run([CASFS, "init", store])
        with CasfsMount(store, mnt):
            measured(
                "seq_write_casfs",
                lambda: seq_write(src, f"{mnt}/f", seq),
                "MB/s",
                refs=(
                    ("seq_write_nullfs", None),
                    ("pipeline_ingest", None),
                    ("seq_write_disk", None),
                ),
            )
        with CasfsMount(store, mnt):
            measured(
                "cold_read_casfs",
                lambda: cold_read(f"{mnt}/f", seq),
                "MB/s",
                refs=(
                    ("cold_read_nullfs", None),
                    ("pipeline_readback", None),
                    ("cold_read_disk", None),
                ),
            )
            measured(
                "write_4k_casfs",
                lambda: seq_write(src, f"{mnt}/g", small, seq, 4096),
                "MB/s",
                refs=(("write_4k_nullfs", None), ("write_4k_disk", None)),
            )
            measured(
                "files_10k_casfs",
                lambda: many_files(mnt, files_payload),
                "files/s",
                refs=(
                    ("files_10k_memfs", None),
                    ("s3ql_anchor", S3QL_FILES_PER_S),
                    ("files_10k_disk", None),
                ),
            )
        shutil.rmtree(store, ignore_errors=True)

        store = os.path.join(work, "store-rss")
        run([CASFS, "init", store])
        with CasfsMount(store, mnt) as m:
            sampler = RssSampler(m.pid)
            with sampler:
                measured(
                    f"seq_write_{big // (1 << 30)}g_casfs",
                    lambda: seq_write(src, f"{mnt}/big", big),
                    "MB/s",
                    refs=(("seq_write_nullfs", None),),
                )
            results["peak_rss_casfs"] = sampler.hwm / MiB
            emit(
                "peak_rss_casfs",
                sampler.hwm / MiB,
                "MiB",
                max_sampled_rss_mib=round(sampler.rss / MiB, 1),
                max_sampled_anon_mib=round(sampler.anon / MiB, 1),
                max_sampled_file_mib=round(sampler.file / MiB, 1),
                written_mib=big // MiB,
            )
        shutil.rmtree(store, ignore_errors=True)
    except Timeout as exc:
        note(f"stopped early: {exc}")
    except KeyboardInterrupt as exc:
        note(f"interrupted ({exc or 'SIGINT'}): unmounting and cleaning up")
        interrupted = True
    finally:
        stop_all()
        try:
            os.unlink(src)
        except OSError:
            pass
        shutil.rmtree(work, ignore_errors=True)
    if interrupted:
        raise SystemExit(130)

    goal(
        "seq_write", "seq_write_casfs", ["seq_write_nullfs", "pipeline_ingest"], GOALS["seq_write"]
    )
    goal(
        "cold_read",
        "cold_read_casfs",
        ["cold_read_nullfs", "pipeline_readback"],
        GOALS["cold_read"],
    )
    goal("write_4k", "write_4k_casfs", ["write_4k_nullfs"], GOALS["write_4k"])
    goal("files_10k", "files_10k_casfs", ["files_10k_memfs"], GOALS["files_10k_memfs"])
    goal(
        "files_10k_s3ql",
        "files_10k_casfs",
        ["s3ql_anchor"],
        GOALS["files_10k_s3ql"],
        const=S3QL_FILES_PER_S,
    )
    goal(
        "peak_rss", "peak_rss_casfs", ["limit_mib"], 1.0, higher=False, const=GOALS["peak_rss_mib"]
    )
    emit("total_time", time.monotonic() - started, "s")


if __name__ == "__main__":
    main()
