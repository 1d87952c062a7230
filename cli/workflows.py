"""``casfs import``, ``export``, ``prune`` and ``compact``: the backup and artifact workflows.

Given a mountpoint or a store, like the snapshot commands (:mod:`casfs_cli.snapshots`):
import goes through the running mount when there is one (never two writers); export reads
the store directly either way (LMDB readers never block the writer).
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import stat
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from casfs.errors import CasfsError
from casfs.workflows.selection import Selection, read_patterns
from casfs_cli.format import human_bytes, plural
from casfs_cli.snapshots import open_target

if TYPE_CHECKING:
    from casfs.store.pipeline import Pipeline
    from casfs.workflows.importer import Progress

# The store, the model and the workflows are imported by the commands that use them: given a
# mountpoint, `casfs prune` or `casfs digest` then starts in a fraction of the time.


class Bar:
    """A progress bar on a terminal (stderr); nothing in a pipe or with ``--json``."""

    def __init__(self, quiet: bool, what: str) -> None:
        self.bar: Any = None
        self.quiet = quiet or not sys.stderr.isatty()
        self.what = what

    def importing(self, p: Progress) -> None:
        self._show(p.bytes, p.bytes_total, f"{p.files:,}/{p.files_total:,} files", p.path)

    def exporting(self, done: int, total: int, path: bytes) -> None:
        self._show(done, total, "", path)

    def _show(self, done: int, total: int, counts: str, path: bytes) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm  # (slow to import: only for a terminal)

            self.bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=self.what,
                dynamic_ncols=True, leave=False, file=sys.stderr,
            )  # fmt: skip
        self.bar.total = total
        self.bar.n = done
        shown = os.fsdecode(path)
        self.bar.set_postfix_str(f"{counts} {shown[-40:]}".strip(), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def import_command(args: argparse.Namespace) -> int:
    from casfs_cli.main import one_line

    src = os.path.abspath(args.src)
    if not os.path.isdir(src):
        what = "does not exist" if not os.path.lexists(src) else "is not a directory"
        raise CasfsError(f"{args.src} {what}")
    patterns = list(args.exclude or [])
    for path in args.exclude_from or []:
        patterns += read_patterns(path)
    selection = Selection.of(
        patterns, args.exclude_caches, args.one_file_system, args.exclude_if_present or []
    )
    bar = Bar(args.json, "import")
    started = time.monotonic()
    try:
        with open_target(args.target) as target:
            name = os.fsencode(args.snapshot)
            result = target.import_tree(src, name, selection, bar.importing)
    finally:
        bar.close()
    for warning in result["warnings"]:
        print(f"casfs import: warning: {one_line(warning)}", file=sys.stderr)
    if args.json:
        print(json.dumps({**result, "warnings": len(result["warnings"])}))
    else:
        took = time.monotonic() - started
        print(
            f"imported {one_line(src)} as snapshot {one_line(args.snapshot)}: "
            f"{plural(result['files'], 'file')}, {human_bytes(result['bytes_total'])} "
            f"({result['files_unchanged']:,} unchanged files not read, "
            f"{human_bytes(result['bytes_read'])} read, {human_bytes(result['bytes_new'])} "
            f"new in the store) in {took:.2f} s"
        )
    return 1 if result["warnings"] else 0


def progress_printer(quiet: bool) -> Callable[[int, int], None] | None:
    """A one-line percentage on a terminal, for work measured in bytes."""
    if quiet or not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        pct = 100 * done / total if total else 100
        print(f"\r{pct:5.1f} % of {human_bytes(total)}", end="", file=sys.stderr, flush=True)

    return show


def prune_command(args: argparse.Namespace) -> int:
    from casfs.workflows import retention
    from casfs_cli.main import one_line

    policy = retention.Policy(
        last=args.keep_last,
        hourly=args.keep_hourly,
        daily=args.keep_daily,
        weekly=args.keep_weekly,
        monthly=args.keep_monthly,
        yearly=args.keep_yearly,
        prefix=os.fsencode(args.prefix),
    )
    with open_target(args.target) as target:
        listed = [(os.fsencode(r["name"]), r["created_ns"]) for r in target.listing()]
        decisions = retention.plan(listed, policy)
        removed = []
        for d in decisions:
            if not d.keep and not args.dry_run:
                target.delete(d.name)
            if not d.keep:
                removed.append(d)
    if args.json:
        rows = [
            {"name": os.fsdecode(d.name), "created_ns": d.created_ns, "keep": d.keep,
             "reasons": list(d.reasons)}
            for d in decisions
        ]  # fmt: skip
        print(json.dumps({"dry_run": args.dry_run, "snapshots": rows}))
        return 0
    width = max([4, *(len(one_line(os.fsdecode(d.name))) for d in decisions)])
    for d in decisions:
        action = "keep" if d.keep else ("would remove" if args.dry_run else "removed")
        created = datetime.datetime.fromtimestamp(d.created_ns / 1e9)
        why = ", ".join(d.reasons)
        shown = one_line(os.fsdecode(d.name))
        print(f"{action:<12}  {shown:<{width}}  {created:%Y-%m-%d %H:%M:%S}  {why}".rstrip())
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(removed)} of {len(decisions)} snapshots")
    return 0


def compact_command(args: argparse.Namespace) -> int:
    show = progress_printer(args.json)
    from casfs.store.compact import compact

    result = compact(args.store, show)
    if show is not None:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps({**result.__dict__, "freed_bytes": result.freed_bytes}))
    else:
        print(
            f"compacted {args.store}: {human_bytes(result.before_bytes)} -> "
            f"{human_bytes(result.after_bytes)} ({human_bytes(result.freed_bytes)} returned to "
            f"the disk) in {result.seconds:.2f} s"
        )
    return 0


def export_command(args: argparse.Namespace) -> int:
    from casfs_cli.main import one_line

    bar = Bar(args.json, "export")
    path = os.fsencode(args.path or "").strip(b"/")
    try:
        with open_target(args.target) as target, target.reader() as store:
            from casfs.workflows import exporter

            result = exporter.export(
                store, os.fsencode(args.name), args.dest, path, force=args.force,
                progress=bar.exporting,
            )  # fmt: skip
    finally:
        bar.close()
    if args.json:
        print(json.dumps(result.__dict__))
    else:
        what = f"{args.name}:/{os.fsdecode(path)}" if path else f"snapshot {args.name}"
        print(one_line(
            f"exported {what} to {args.dest}: {plural(result.files, 'file')}, "
            f"{plural(result.dirs, 'directory', 'directories')}, {human_bytes(result.bytes)} "
            f"in {result.seconds:.2f} s"
        ))  # fmt: skip
    return 0


def digest_command(args: argparse.Namespace) -> int:
    """Print ``user.casfs.digest`` of each path, as ``sha256sum`` prints (digest, two spaces,
    path). With ``--store``, paths anywhere are read and digested as that store would."""
    from casfs.tree import identity
    from casfs_cli.main import one_line

    failed = False
    store = pipeline = None
    if args.store:
        from casfs.store.pipeline import Pipeline
        from casfs.store.store import Store

        store = Store(args.store, writer=False)
        pipeline = Pipeline(store, 1)
    try:
        for path in args.paths:
            try:
                if pipeline is not None:
                    value = _digest_by_reading(pipeline, path)
                else:
                    value = os.getxattr(path, identity.XATTR.decode(), follow_symlinks=True)
            except OSError as exc:
                failed = True
                print(one_line(f"casfs digest: {path}: {_digest_error(exc)}"), file=sys.stderr)
                continue
            print(f"{value.decode()}  {one_line(path)}")
    finally:
        if pipeline is not None:
            pipeline.close()
        if store is not None:
            store.close()
    return 2 if failed else 0


def _digest_by_reading(pipeline: Pipeline, path: str) -> bytes:
    from casfs.tree import identity

    if not stat.S_ISREG(os.stat(path).st_mode):  # (opening a fifo would wait for a writer)
        raise OSError(errno.EINVAL, "not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        return identity.run(
            identity.by_reading(pipeline, st.st_size, lambda off, n: os.pread(fd, n, off))
        )
    finally:
        os.close(fd)


def _digest_error(exc: OSError) -> str:
    if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
        return (
            "no user.casfs.digest: not a regular file on a casfs mount "
            "(--store STORE digests any file as STORE would)"
        )
    return exc.strerror or str(exc)
