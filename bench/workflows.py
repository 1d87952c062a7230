"""Backup and artifact workflows: ``casfs import`` against ``borg create`` and ``restic backup``.

Issue 5, "same run, one machine": every tool gets the same data in the same run, so the ratios
hold even though the 2-core machine is shared and noisy. Each tool runs as its command line
tool, timed by wall clock (``time.monotonic`` around ``subprocess.run``, process start-up
included), into its own repository under a scratch directory:

* casfs   ``casfs import STORE SRC --snapshot NAME --json`` (offline store from ``casfs init``)
* borg    ``borg create --compression zstd,3 REPO::NAME SRC`` (repository from
          ``borg init -e none``; its cache in the scratch directory)
* restic  ``restic -r REPO backup SRC --host bench --compression auto`` (repository from
          ``restic init``, format version 2 where the version supports it; cache in the
          scratch directory)

Dataset A, source releases (nightly-backup style): the Django feature releases 3.0 .. 5.2
(9 releases, ~59,000 files, extracted sdists in bench/data/sdist-trees; ``--quick``: the first
3). One fixed source directory WORK/src; each release in turn is mirrored into it with
``rsync -a --delete`` (not timed; a file rsync skips keeps its inode and times, as a nightly
backup sees it, but each sdist carries new mtimes for nearly all its files, so nearly every
file is rewritten and every tool reads it again: the saving is in dedup, not the files cache),
then all three tools back up that same state, the tool order rotating from release to release
to spread cache and noise effects. Then each tool backs up the unchanged
last release once more (nothing changed since its last run).

Dataset B, artifacts: the 8 numpy wheels in bench/data/wheels (``--quick``: the first 3). One
directory WORK/artifacts holds only the current wheel; each version is one snapshot/archive of
that one file, in a separate store/repository per tool. The logical bytes (sum of the wheel
sizes) are printed so that dedup can be read off the stored bytes.

Stored bytes are on-disk bytes of the store/repository directory (sum of st_blocks * 512 of
its files; the tools' files caches are reported apart: borg's and restic's, outside the
repository, and casfs's STORE/imports); for casfs also ``casfs stats --json``'s stored_bytes
(compressed objects and packs only, no LMDB overhead).
``stored_after_bytes`` is each repository's on-disk size after each release's backup.

Goals (dataset A):
  casfs_unchanged_speedup  casfs first import of the last release / its unchanged re-import >= 10
  vs_faster                min(borg, restic) total seconds / casfs total seconds            >= 2
  stored_ratio_borg        casfs stored bytes / borg stored bytes (on disk)                 <= 1
Ratios named ``<other>/casfs`` are above 1 when casfs is faster.

Prints one JSON line per figure:
{"bench": "workflows", "figure", "value", "unit", ["dataset", "tool", "release"], ["vs",
"ratio"], ["goal", "met"], ...}; a summary line per goal at the end ("figure": "goal").

Needs about 3 GB free where the scratch directory goes; borg or restic missing is reported
and skipped. Missing data is fetched with bench/chunk_params.py's functions (pip download).

    .venv/bin/python bench/workflows.py [--quick] [--work DIR] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import benchlib
from benchlib import sig
from chunk_params import DATASETS, fetch_sdist, fetch_wheel

TOOLS = ("casfs", "borg", "restic")
NEED_FREE_BYTES = 3 << 30
GOAL_UNCHANGED_SPEEDUP = 10.0
GOAL_VS_FASTER = 2.0
GOAL_STORED_RATIO = 1.0
QUICK_RELEASES = 3

goals: list[dict[str, object]] = []


def emit(figure: str, value: float | int | None, unit: str, **extra: object) -> None:
    line = benchlib.emit("workflows", figure, value, unit, **extra)
    if "goal" in extra:
        goals.append(line)


def disk_bytes(path: str) -> int:
    """du-like: st_blocks * 512 of every file under ``path`` (directories included)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def tail(text: str | bytes, n: int = 400) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return text.strip()[-n:]


def mirror(src: str, dst: str) -> None:
    """Make ``dst`` an exact copy of ``src`` (not timed)."""
    if shutil.which("rsync"):
        subprocess.run(["rsync", "-a", "--delete", src + "/", dst + "/"], check=True)
        return
    # Fallback: a fresh copy (every file gets a new inode, so every tool reads everything).
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, symlinks=True)


def release_root(tree: Path) -> Path:
    """An extracted sdist holds one top directory (Django-5.2/Django-5.2); that is the tree."""
    inner = [p for p in tree.iterdir() if p.is_dir()]
    return inner[0] if len(inner) == 1 and len(list(tree.iterdir())) == 1 else tree


def count_tree(path: Path) -> tuple[int, int]:
    files = size = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(root, name))
            files += 1
            size += st.st_size
    return files, size


class Tools:
    """The three command line tools, one store/repository each per dataset."""

    def __init__(self, work: str) -> None:
        self.work = work
        exe = Path(sys.executable).with_name("casfs")
        self.casfs = [str(exe)] if exe.exists() else [sys.executable, "-m", "casfs_cli.main"]
        self.env = dict(
            os.environ,
            BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
            BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
            BORG_BASE_DIR=os.path.join(work, "borg-home"),
            RESTIC_PASSWORD="bench",
            RESTIC_CACHE_DIR=os.path.join(work, "restic-cache"),
        )
        self.available = ["casfs"]
        self.versions: dict[str, str] = {}
        self.restic_compression = False
        if shutil.which("borg"):
            out = subprocess.run(["borg", "--version"], capture_output=True, text=True)
            self.versions["borg"] = out.stdout.strip().removeprefix("borg ")
            self.available.append("borg")
        else:
            emit("tool_missing", None, "", tool="borg", note="borg not on PATH: skipped")
        if shutil.which("restic"):
            out = subprocess.run(["restic", "version"], capture_output=True, text=True)
            m = re.search(r"restic (\d+)\.(\d+)\.(\d+)", out.stdout)
            self.versions["restic"] = out.stdout.strip()
            # compression and repository format 2 came with restic 0.14.0
            self.restic_compression = bool(m) and (int(m[1]), int(m[2])) >= (0, 14)
            self.available.append("restic")
        else:
            emit("tool_missing", None, "", tool="restic", note="restic not on PATH: skipped")

    def drop(self, tool: str, why: str) -> None:
        emit("tool_failed", None, "", tool=tool, error=why, note="skipped from here on")
        self.available.remove(tool)

    def repo(self, tool: str, dataset: str) -> str:
        return os.path.join(self.work, f"{tool}-{dataset}")

    def init(self, dataset: str) -> dict[str, object]:
        info: dict[str, object] = {}
        subprocess.run([*self.casfs, "init", self.repo("casfs", dataset)], check=True,
                       capture_output=True)  # fmt: skip
        if "borg" in self.available:
            r = subprocess.run(["borg", "init", "-e", "none", self.repo("borg", dataset)],
                               env=self.env, capture_output=True)  # fmt: skip
            if r.returncode:
                self.drop("borg", f"borg init: {tail(r.stderr)}")
        if "restic" in self.available:
            cmd = ["restic", "-q", "-r", self.repo("restic", dataset), "init"]
            if self.restic_compression:
                cmd += ["--repository-version", "2"]
            r = subprocess.run(cmd, env=self.env, capture_output=True)
            if r.returncode:
                self.drop("restic", f"restic init: {tail(r.stderr)}")
            else:
                cfg = subprocess.run(
                    ["restic", "-r", self.repo("restic", dataset), "cat", "config"],
                    env=self.env, capture_output=True, text=True,
                )  # fmt: skip
                if cfg.returncode == 0:
                    info["restic_repo_version"] = json.loads(cfg.stdout).get("version")
        return info

    def backup(self, tool: str, dataset: str, src: str, name: str) -> tuple[float, dict] | None:
        """Run one tool on ``src``; wall seconds and details, or None if the tool failed."""
        repo = self.repo(tool, dataset)
        if tool == "casfs":
            cmd = [*self.casfs, "import", repo, src, "--snapshot", name, "--json"]
        elif tool == "borg":
            cmd = ["borg", "create", "--compression", "zstd,3", f"{repo}::{name}", src]
        else:
            cmd = ["restic", "-q", "-r", repo, "backup", src, "--host", "bench"]
            if self.restic_compression:
                cmd += ["--compression", "auto"]
        t = time.monotonic()
        r = subprocess.run(cmd, env=self.env, capture_output=True, text=True)
        took = time.monotonic() - t
        details: dict[str, object] = {}
        # exit 1 = done with warnings (casfs: unreadable files; borg: warnings);
        # restic: 3 = snapshot written but some files could not be read
        warned = r.returncode == (3 if tool == "restic" else 1)
        if r.returncode and not warned:
            if tool == "casfs":
                raise SystemExit(f"casfs import failed ({r.returncode}): {tail(r.stderr)}")
            self.drop(tool, f"{cmd[0]} {cmd[1]} exit {r.returncode}: {tail(r.stderr)}")
            return None
        if warned or (r.stderr.strip() and tool != "restic"):
            emit("tool_warning", None, "", tool=tool, snapshot=name, exit=r.returncode,
                 stderr=tail(r.stderr))  # fmt: skip
        if tool == "casfs":
            summary = json.loads(r.stdout.strip().splitlines()[-1])
            details = {
                key: summary[key]
                for key in ("files", "bytes_total", "bytes_read", "bytes_new", "files_unchanged",
                            "warnings")
            }  # fmt: skip
            details["casfs_reported_s"] = sig(summary["seconds"])
        return took, details

    def stored(self, dataset: str) -> dict[str, int]:
        return {tool: self.repo_bytes(tool, dataset) for tool in self.available}

    def repo_bytes(self, tool: str, dataset: str) -> int:
        """On-disk bytes of a repository; casfs's files cache (STORE/imports, the
        counterpart of borg's and restic's caches) is reported apart like theirs."""
        total = disk_bytes(self.repo(tool, dataset))
        if tool == "casfs":
            total -= disk_bytes(os.path.join(self.repo(tool, dataset), "imports"))
        return total


def rotate(tools: list[str], k: int) -> list[str]:
    k %= len(tools)
    return tools[k:] + tools[:k]


def ratio_lines(dataset: str, totals: dict[str, float], stored: dict[str, int],
                with_goals: bool) -> None:  # fmt: skip
    mine = totals["casfs"]
    others = [t for t in ("borg", "restic") if t in totals]
    for other in others:
        emit("import_total_ratio", totals[other] / mine, "x", dataset=dataset, tool=other,
             vs=f"{other}/casfs")  # fmt: skip
    if others:
        faster = min(others, key=lambda t: totals[t])
        value = totals[faster] / mine
        goal = {"goal": GOAL_VS_FASTER, "met": value >= GOAL_VS_FASTER} if with_goals else {}
        emit("vs_faster", value, "x", dataset=dataset, tool=faster,
             vs=f"min(borg, restic)/casfs = {faster}/casfs", **goal)  # fmt: skip
    for other in others:
        value = stored["casfs"] / stored[other]
        goal = {}
        if with_goals and other == "borg":
            goal = {"goal": GOAL_STORED_RATIO, "met": value <= GOAL_STORED_RATIO}
        emit(f"stored_ratio_{other}", value, "x", dataset=dataset, vs=f"casfs/{other}",
             **goal)  # fmt: skip


def stored_lines(tools: Tools, dataset: str, logical: int) -> dict[str, int]:
    stored = tools.stored(dataset)
    for tool, n in stored.items():
        extra: dict[str, object] = {
            "logical_bytes": logical,
            "logical_per_stored": sig(logical / n),
        }
        if tool == "borg":
            extra["cache_bytes"] = disk_bytes(tools.env["BORG_BASE_DIR"])
        elif tool == "restic":
            extra["cache_bytes"] = disk_bytes(tools.env["RESTIC_CACHE_DIR"])
        else:
            extra["cache_bytes"] = disk_bytes(os.path.join(tools.repo(tool, dataset), "imports"))
        emit("stored_bytes", n, "bytes", dataset=dataset, tool=tool, **extra)
    r = subprocess.run([*tools.casfs, "stats", "--json", tools.repo("casfs", dataset)],
                       capture_output=True, text=True, check=True)  # fmt: skip
    st = json.loads(r.stdout)
    emit("casfs_stats_stored_bytes", st["stored_bytes"], "bytes", dataset=dataset, tool="casfs",
         file_bytes=st["file_bytes"], logical_bytes=st["logical_bytes"],
         unique_bytes=st["unique_bytes"], objects=st["objects"],
         compression_ratio=st["compression_ratio"], dedup_ratio=st["dedup_ratio"])  # fmt: skip
    return stored


def backup_versions(
    tools: Tools,
    name: str,
    src: str,
    versions: list[str],
    prepare: list[Callable[[], None]],
    prefix: str,
) -> tuple[dict[str, float], dict[str, float]]:
    """For each version: ``prepare`` it in ``src`` (not timed), then back it up with every
    tool, the order rotating. Returns each tool's total seconds and its last backup's (a
    tool that failed is dropped)."""
    totals = {t: 0.0 for t in tools.available}
    last: dict[str, float] = {}
    for i, (version, setup) in enumerate(zip(versions, prepare, strict=True)):
        setup()
        for pos, tool in enumerate(rotate(list(tools.available), i)):
            done = tools.backup(tool, name, src, f"{prefix}-{version}")
            if done is None:
                totals.pop(tool, None)
                continue
            took, details = done
            totals[tool] += took
            last[tool] = took
            emit("import_s", took, "s", dataset=name, release=version, tool=tool, order=pos,
                 **details)  # fmt: skip
            emit("stored_after_bytes", tools.repo_bytes(tool, name), "bytes",
                 dataset=name, release=version, tool=tool)  # fmt: skip
    totals = {t: s for t, s in totals.items() if t in tools.available}
    for tool, s in totals.items():
        emit("import_total_s", s, "s", dataset=name, tool=tool, releases=len(versions))
    return totals, last


def fetch_datasets(data: Path, quick: bool) -> None:
    """Download and extract what dataset_a and dataset_b read (nothing when all is there)."""
    for ds in DATASETS:
        if ds.name == "django-feature":
            for v in ds.versions[:QUICK_RELEASES] if quick else ds.versions:
                fetch_sdist(data, ds.package, v)
        elif ds.name == "numpy-wheels":
            for v in ds.versions[:QUICK_RELEASES] if quick else ds.versions:
                fetch_wheel(data, ds.package, v)


def dataset_a(tools: Tools, data: Path, quick: bool) -> None:
    ds = next(d for d in DATASETS if d.name == "django-feature")
    versions = ds.versions[:QUICK_RELEASES] if quick else ds.versions
    trees = [release_root(fetch_sdist(data, ds.package, v)) for v in versions]
    name = ds.name
    counts = [count_tree(t) for t in trees]
    logical = sum(b for _, b in counts)
    emit("dataset_files", sum(f for f, _ in counts), "files", dataset=name,
         releases=list(versions), logical_bytes=logical,
         files_per_release=[f for f, _ in counts])  # fmt: skip
    info = tools.init(name)
    if info:
        emit("repo_info", None, "", dataset=name, **info)
    src = os.path.join(tools.work, "src")
    os.makedirs(src)
    prepare = [lambda tree=tree: mirror(str(tree), src) for tree in trees]
    totals, last = backup_versions(tools, name, src, versions, prepare, "rel")
    stored = stored_lines(tools, name, logical)
    ratio_lines(name, totals, stored, with_goals=True)

    # the unchanged last release once more: nothing to read, nothing new to store
    again: dict[str, float] = {}
    for tool in rotate(list(tools.available), len(versions)):
        done = tools.backup(tool, name, src, f"rel-{versions[-1]}-again")
        if done is None:
            continue
        again[tool], details = done
        emit("reimport_unchanged_s", again[tool], "s", dataset=name, release=versions[-1],
             tool=tool, **details)  # fmt: skip
    for tool, s in again.items():
        value = last[tool] / s
        goal = {}
        if tool == "casfs":
            goal = {"goal": GOAL_UNCHANGED_SPEEDUP, "met": value >= GOAL_UNCHANGED_SPEEDUP}
        emit("unchanged_speedup", value, "x", dataset=name, tool=tool, release=versions[-1],
             vs="first import of the release / unchanged re-import", **goal)  # fmt: skip
    if "casfs" in again:
        for other in ("borg", "restic"):
            if other in again:
                emit("reimport_unchanged_ratio", again[other] / again["casfs"], "x",
                     dataset=name, tool=other, vs=f"{other}/casfs")  # fmt: skip
    shutil.rmtree(src, ignore_errors=True)


def dataset_b(tools: Tools, data: Path, quick: bool) -> None:
    ds = next(d for d in DATASETS if d.name == "numpy-wheels")
    versions = ds.versions[:QUICK_RELEASES] if quick else ds.versions
    wheels = [fetch_wheel(data, ds.package, v) for v in versions]
    name = ds.name
    logical = sum(w.stat().st_size for w in wheels)
    emit("logical_bytes", logical, "bytes", dataset=name, versions=list(versions),
         files=len(wheels))  # fmt: skip
    info = tools.init(name)
    if info:
        emit("repo_info", None, "", dataset=name, **info)
    art = os.path.join(tools.work, "artifacts")
    os.makedirs(art)

    def only(wheel: Path) -> None:
        for old in os.listdir(art):
            os.unlink(os.path.join(art, old))
        shutil.copy2(wheel, os.path.join(art, wheel.name))

    prepare = [lambda wheel=wheel: only(wheel) for wheel in wheels]
    totals, _ = backup_versions(tools, name, art, versions, prepare, "whl")
    stored = stored_lines(tools, name, logical)
    ratio_lines(name, totals, stored, with_goals=False)
    shutil.rmtree(art, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 Django releases and 3 wheels")
    ap.add_argument("--work", default=None, help="scratch directory parent (default /var/tmp)")
    here = Path(__file__).resolve().parent
    ap.add_argument("--data", type=Path, default=here / "data", help="datasets (bench/data)")
    ap.add_argument("--fetch-only", action="store_true", help="fetch missing datasets and stop")
    args = ap.parse_args()
    if args.fetch_only:
        fetch_datasets(args.data, args.quick)
        return
    parent = args.work or ("/var/tmp" if os.path.isdir("/var/tmp") else None)
    if parent is not None:
        os.makedirs(parent, exist_ok=True)
    free = shutil.disk_usage(parent or tempfile.gettempdir()).free
    if free < NEED_FREE_BYTES:
        emit("disk_free", free, "bytes", need=NEED_FREE_BYTES, error="not enough free space")
        raise SystemExit(1)
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="casfs-bench-workflows-", dir=parent)
    try:
        tools = Tools(work)
        emit("environment", os.cpu_count(), "cores", quick=args.quick, disk_free=free,
             versions=tools.versions, rsync=shutil.which("rsync") is not None,
             restic_compression="auto" if tools.restic_compression else "unsupported",
             python=sys.version.split()[0])  # fmt: skip
        dataset_a(tools, args.data, args.quick)
        dataset_b(tools, args.data, args.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    emit("run_wall_s", time.monotonic() - started, "s", quick=args.quick)
    summary = list(goals)
    for g in summary:
        emit("goal", g["value"], str(g["unit"]), goal_of=g["figure"], dataset=g.get("dataset"),
             tool=g.get("tool"), goal=g["goal"], met=g["met"])  # fmt: skip
    emit("goals_met", sum(bool(g["met"]) for g in summary), "goals", of=len(summary),
         met=all(bool(g["met"]) for g in summary))  # fmt: skip


if __name__ == "__main__":
    main()
