"""Bounded stress runs of the robustness promises: the regular-suite tests, made longer.

Each promise is one pytest run of a test in tests/, in a subprocess with the environment
variable that sizes it; the test's own summary line (pytest -s) gives the iterations, pytest's
result the failures. One JSON line per promise on stdout:

  {"bench": "stress", "promise": "...", "name": "...", "test": "...", "env": {...},
   "iterations": N, "faults_injected": N, "failures": 0, "seconds": s, "summary": "..."}

or, for a promise that cannot be sized, {"bench": "stress", "promise": ..., "skipped": why};
a last line {"bench": "stress", "promise": "all", ...} sums them up.

  name             test                              full size                   --quick
  crash-writes     tests/test_crash.py               CASFS_CRASH_ROUNDS=50       10 rounds
  crash-snapshots  tests/test_crash_snapshots.py     CASFS_CRASH_ROUNDS=50       10 rounds
  crash-import     tests/test_import.py::test_kill_9_during_import_leaks_nothing
                                                     CASFS_IMPORT_CRASH_ROUNDS=50  3 kills
  concurrency      tests/test_concurrency.py         CASFS_STRESS_SECONDS=120    20 s
  random           tests/test_mount_random.py        CASFS_RANDOM_STEPS=100000   20000 steps

Crash promises count one fault (a kill -9 of the mount daemon, or of the import) per round;
the concurrency and random runs inject none (their iterations are operations). Each promise
has a timeout, and all of them share a total budget (--budget, default 30 min; a full run
took 18 min on 2 cores): on timeout pytest gets SIGINT (its fixtures unmount), then
SIGKILL, and any casfs mount left below its temporary directory is taken down. pytest's
output goes to a log file per promise (its path is in the JSON line); the temporary stores
are removed unless the promise failed.

Run:
  .venv/bin/python bench/stress.py                      # every promise, full size
  .venv/bin/python bench/stress.py --quick              # regular-suite sizes (~3 min)
  .venv/bin/python bench/stress.py --only concurrency   # one promise (repeatable)
Exit status 0 when no promise had a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GRACE = 90.0  # seconds pytest gets after SIGINT to tear its mounts down


@dataclass
class Promise:
    name: str
    promise: str
    test: str
    var: str
    full: int
    quick: int
    timeout: float  # full size; --quick uses quick_timeout
    quick_timeout: float
    parse: str  # which summary parser
    extra_env: dict[str, str] = field(default_factory=dict)


PROMISES = [
    Promise(
        "crash-writes",
        "crash: kill -9 of the mount during large writes (fsync'ed files intact, fsck clean)",
        "tests/test_crash.py",
        "CASFS_CRASH_ROUNDS",
        50,
        10,
        480,
        180,
        "crashes",
    ),
    Promise(
        "crash-snapshots",
        "crash: kill -9 of the mount during snapshot creation, deletion and rollback",
        "tests/test_crash_snapshots.py",
        "CASFS_CRASH_ROUNDS",
        50,
        10,
        480,
        180,
        "crashes",
    ),
    Promise(
        "crash-import",
        "crash: kill -9 during casfs import (no leak, a re-import equals a clean one)",
        "tests/test_import.py::test_kill_9_during_import_leaks_nothing",
        "CASFS_IMPORT_CRASH_ROUNDS",
        50,
        3,
        600,
        180,
        "import",
    ),
    Promise(
        "concurrency",
        "concurrency: writers, readers, snapshot create/delete, stats and import in parallel",
        "tests/test_concurrency.py",
        "CASFS_STRESS_SECONDS",
        120,
        20,
        360,
        120,
        "concurrency",
    ),
    Promise(
        "random",
        "random operations on a mount agree with local disk (two write-buffer sizes)",
        "tests/test_mount_random.py",
        "CASFS_RANDOM_STEPS",
        100000,
        20000,
        1000,
        400,
        "random",
    ),
]


def parse_summary(kind: str, out: str) -> tuple[int | None, int, str]:
    """(iterations, faults injected, the summary line(s)) from the test's printed output."""
    if kind == "crashes":
        m = re.search(r"^(\d+) crashes in [\d.]+ s:.*$", out, re.M)
        if m:
            return int(m.group(1)), int(m.group(1)), m.group(0)
    elif kind == "import":
        m = re.search(r"^(\d+) crashes: kill -9 after .*$", out, re.M)
        if m:
            return int(m.group(1)), int(m.group(1)), m.group(0)
    elif kind == "concurrency":
        m = re.search(r"^concurrency: [\d.]+ s, (\d+) ops:.*$", out, re.M)
        if m:
            return int(m.group(1)), 0, m.group(0)
    elif kind == "random":
        found = re.findall(r"^random operations: (\d+) ops in (\d+) steps.*$", out, re.M)
        lines = re.findall(r"^random operations: .*$", out, re.M)
        if found:
            return sum(int(ops) for ops, _ in found), 0, " | ".join(lines)
    return None, 0, ""


def pytest_failures(rc: int, out: str) -> int:
    """Failed + errored tests from pytest's last line; at least 1 when pytest did not pass."""
    tail = out.strip().splitlines()[-1] if out.strip() else ""
    n = sum(int(k) for k in re.findall(r"(\d+) (?:failed|errors?)\b", tail))
    if rc != 0 and n == 0:
        n = 1
    return n


def casfs_mounts_below(base: Path) -> list[tuple[str, str]]:
    """(store, mountpoint) of every casfs mount whose mountpoint is below ``base``."""
    from casfs.fuse.mountpoint import mounts

    prefix = str(base) + os.sep
    return [(m.source, m.target) for m in mounts() if m.target.startswith(prefix)]


def take_down(base: Path) -> list[str]:
    """Kill the daemons of the casfs mounts left below ``base`` and detach them."""
    done = []
    for store, target in casfs_mounts_below(base):
        with contextlib.suppress(OSError, ValueError):
            pid = int(Path(store, "casfs.lock").read_text().strip())
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if b"casfs_cli.main" in argv and os.fsencode(store) in argv:
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["fusermount3", "-u", "-z", target], capture_output=True, timeout=60)
        done.append(target)
    return done


def run_promise(p: Promise, quick: bool, workdir: Path, budget_left: float) -> dict:
    line: dict = {"bench": "stress", "promise": p.promise, "name": p.name, "test": p.test}
    size = p.quick if quick else p.full
    env = {**os.environ, p.var: str(size), **p.extra_env}
    timeout = min(p.quick_timeout if quick else p.timeout, budget_left)
    line["env"] = {p.var: str(size)}
    if timeout < 10:
        line["skipped"] = "no time left in the budget"
        return line
    basetemp = workdir / p.name
    log = workdir / f"{p.name}.log"
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider"]
    cmd += ["--basetemp", str(basetemp), p.test]
    print(f"stress: {p.name}: {p.var}={size}, timeout {timeout:.0f} s, log {log}", file=sys.stderr)
    started = time.monotonic()
    timed_out = False
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)  # pytest tears its fixtures down
            try:
                rc = proc.wait(GRACE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
    seconds = time.monotonic() - started
    left = take_down(basetemp)
    text = log.read_text(errors="replace")
    iterations, faults, summary = parse_summary(p.parse, text)
    failures = pytest_failures(rc, text) + (timed_out and rc == 0)
    line.update(
        iterations=iterations,
        faults_injected=faults,
        failures=failures,
        seconds=round(seconds, 1),
        summary=summary,
        log=str(log),
    )
    if timed_out:
        line["timed_out"] = f"after {timeout:.0f} s"
    if left:
        line["mounts_left"] = left
    if failures:
        tail = "\n".join(text.splitlines()[-40:])
        print(f"stress: {p.name} FAILED; the end of {log}:\n{tail}", file=sys.stderr)
    else:
        shutil.rmtree(basetemp, ignore_errors=True)
    return line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="regular-suite sizes")
    ap.add_argument(
        "--only",
        action="append",
        choices=[p.name for p in PROMISES],
        metavar="NAME",
        help="run only this promise (repeatable): " + ", ".join(p.name for p in PROMISES),
    )
    ap.add_argument("--budget", type=float, default=1800, help="total seconds (default 1800)")
    ap.add_argument("--dir", help="work directory for logs and stores (default: a new one)")
    args = ap.parse_args()
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="casfs-stress-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    lines = []
    for p in PROMISES:
        if args.only and p.name not in args.only:
            continue
        left = args.budget - (time.monotonic() - started)
        line = run_promise(p, args.quick, workdir, left)
        print(json.dumps(line), flush=True)
        lines.append(line)
    ran = [ln for ln in lines if "skipped" not in ln]
    total = {
        "bench": "stress",
        "promise": "all",
        "quick": args.quick,
        "promises_run": len(ran),
        "skipped": [ln["name"] for ln in lines if "skipped" in ln],
        "faults_injected": sum(ln["faults_injected"] for ln in ran),
        "failures": sum(ln["failures"] for ln in ran),
        "seconds": round(time.monotonic() - started, 1),
        "workdir": str(workdir),
    }
    print(json.dumps(total), flush=True)
    return 1 if total["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
