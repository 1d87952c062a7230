"""Run every benchmark, side by side with its references, in one bounded run.

``bench/run`` installs what the benchmarks need and then calls this. Each benchmark is a
script of its own (``bench/*.py``) that prints one JSON line per figure; this runs them one
after another (never in parallel: the machine has 2 cores and they would skew each other),
streams their lines to stdout, keeps them in ``bench/results/``, and finally writes the
report (``bench/report.py``: ``docs/benchmarks.md`` and its plots).

Each benchmark has a time budget; past it, it gets SIGTERM (the benchmarks unmount what they
mounted on SIGTERM), then SIGKILL, and every FUSE mount left under the run's scratch
directory is unmounted. The run as a whole stays under 30 minutes (``--quick``: 5 minutes),
fetching the datasets on a first run aside.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import benchlib

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Bench:
    name: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    budget_s: tuple[float, float]  # full run, quick run
    scratch_flag: str = "--dir"


BENCHES = (
    Bench("ingest", ("ingest.py", "--mib", "1024", "--repeat", "3"),
          ("ingest.py", "--mib", "128", "--repeat", "1"), (240, 60)),
    Bench("mount", ("mount.py", "--budget", "420"), ("mount.py", "--quick", "--budget", "110"),
          (480, 120)),
    Bench("snapshot", ("snapshot.py",), ("snapshot.py", "--quick"), (240, 60)),
    Bench("scaling", ("scaling.py",), ("scaling.py", "--quick"), (480, 90)),
    Bench("browse", ("browse.py",), ("browse.py", "--quick"), (480, 90)),
    Bench("workflows", ("workflows.py",), ("workflows.py", "--quick"), (360, 120), "--work"),
)  # fmt: skip
TOTAL_BUDGET_S = {"full": 1800.0, "quick": 300.0}


def emit(figure: str, value: float | int | None, unit: str, **extra: object) -> dict:
    return benchlib.emit("run", figure, value, unit, **extra)


def machine() -> dict[str, object]:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    model = platform.processor()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def version(cmd: list[str]) -> str | None:
        if not shutil.which(cmd[0]):
            return None
        r = subprocess.run(cmd, capture_output=True, text=True)
        return (r.stdout or r.stderr).strip().splitlines()[0] if r.returncode == 0 else None

    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "mem_bytes": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "borg": version(["borg", "--version"]),
        "restic": version(["restic", "version"]),
        "commit": commit or None,
    }


def leftover_mounts(under: str) -> list[str]:
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            where = fields[1].encode().decode("unicode_escape")
            if where.startswith(under.rstrip("/") + "/") and "fuse" in fields[2]:
                out.append(where)
    return out


def run_one(bench: Bench, quick: bool, scratch: str, budget: float, sink) -> tuple[int, float]:
    """Run one benchmark, passing its JSON lines through; (exit status, seconds)."""
    args = bench.quick if quick else bench.full
    work = tempfile.mkdtemp(prefix=f"{bench.name}-", dir=scratch)
    cmd = [sys.executable, str(HERE / args[0]), *args[1:], bench.scratch_flag, work]
    print(
        f"# bench/run: {bench.name}: {' '.join(cmd[1:])} (budget {budget:.0f} s)",
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    timer = _Deadline(proc, budget)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                print(line, end="", file=sys.stderr, flush=True)
                continue
            if isinstance(record, dict):
                record.setdefault("bench", bench.name)
                line = json.dumps(record) + "\n"
            sys.stdout.write(line)
            sys.stdout.flush()
            sink.write(line)
            sink.flush()
        status = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            _stop(proc)
        for where in leftover_mounts(work):
            subprocess.run(["fusermount3", "-u", "-z", where], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    took = time.monotonic() - started
    if timer.fired:
        status = -1
    return status, took


class _Deadline:
    """SIGTERM the benchmark's process group once its budget is spent, SIGKILL a minute on."""

    def __init__(self, proc: subprocess.Popen, budget: float) -> None:
        self.fired = False
        self._timer = threading.Timer(budget, self._fire, args=(proc,))
        self._timer.daemon = True
        self._timer.start()

    def _fire(self, proc: subprocess.Popen) -> None:
        self.fired = True
        _stop(proc)

    def cancel(self) -> None:
        self._timer.cancel()


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 30)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)  # the benchmark's own session, started above
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes: about 5 minutes in all")
    ap.add_argument(
        "--only", help="comma-separated benchmarks: " + ",".join(b.name for b in BENCHES)
    )
    ap.add_argument("--no-report", action="store_true", help="do not write the report")
    ap.add_argument(
        "--out",
        type=Path,
        help="report directory (default: docs/, or bench/results/quick/ for --quick and --only)",
    )
    ap.add_argument("--dir", default="/var/tmp", help="scratch directory parent (default /var/tmp)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/run: needs root (FUSE mounts, drop_caches)")
    chosen = BENCHES
    if args.only:
        names = args.only.split(",")
        unknown = set(names) - {b.name for b in BENCHES}
        if unknown:
            raise SystemExit(f"bench/run: unknown benchmark {', '.join(sorted(unknown))}")
        chosen = tuple(b for b in BENCHES if b.name in names)

    if any(b.name == "workflows" for b in chosen):
        t = time.monotonic()
        fetch = [sys.executable, str(HERE / "workflows.py"), "--fetch-only"]
        subprocess.run(fetch + (["--quick"] if args.quick else []), check=True, cwd=REPO)
        print(
            f"# bench/run: datasets ready in {time.monotonic() - t:.0f} s (not counted)",
            file=sys.stderr,
            flush=True,
        )

    RESULTS.mkdir(exist_ok=True)
    today = datetime.date.today().isoformat()
    kind = "quick" if args.quick else "full"
    # a partial run (--only) never replaces a whole run's results, nor the committed page
    part = f"-only-{'-'.join(b.name for b in chosen)}" if args.only else ""
    path = RESULTS / f"run-{today}-{kind}{part}.jsonl"
    scratch = tempfile.mkdtemp(prefix="casfs-bench-run-", dir=args.dir)
    started = time.monotonic()
    failed = []
    try:
        with open(path, "w") as sink:
            sink.write(
                json.dumps(emit("machine", None, "", date=today, kind=kind, **machine())) + "\n"
            )
            for bench in chosen:
                left = TOTAL_BUDGET_S[kind] - (time.monotonic() - started)
                budget = min(bench.budget_s[args.quick], left)
                if budget < 10:
                    emit("skipped", None, "", name=bench.name, why="total time budget spent")
                    failed.append(bench.name)
                    continue
                status, took = run_one(bench, args.quick, scratch, budget, sink)
                line = emit(
                    "bench_seconds",
                    round(took, 1),
                    "s",
                    name=bench.name,
                    exit=status,
                    timed_out=status == -1,
                )
                sink.write(json.dumps(line) + "\n")
                if status != 0:
                    failed.append(bench.name)
            line = emit("total_seconds", round(time.monotonic() - started, 1), "s", kind=kind)
            sink.write(json.dumps(line) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not args.no_report:
        default = RESULTS / "quick" if args.quick or args.only else REPO / "docs"
        out = args.out or default
        report = [sys.executable, str(HERE / "report.py"), str(path), "--out", str(out)]
        subprocess.run(report, check=True, cwd=REPO)
    if failed:
        raise SystemExit(f"bench/run: {', '.join(failed)} did not finish cleanly (see above)")


if __name__ == "__main__":
    main()
