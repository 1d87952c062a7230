"""``casfs import``, ``export``, ``prune`` and ``compact``: the backup and artifact workflows.

Given a mountpoint or a store, like the snapshot commands (:mod:`casfs_cli.snapshots`):
import goes through the running mount when there is one (never two writers); export reads
the store directly either way (LMDB readers never block the writer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

from tqdm import tqdm

from casfs.errors import CasfsError
from casfs.workflows.importer import Progress
from casfs_cli.format import human_bytes
from casfs_cli.snapshots import open_target


class Bar:
    """A progress bar on a terminal (stderr); nothing in a pipe or with ``--json``."""

    def __init__(self, quiet: bool, what: str) -> None:
        self.bar: tqdm | None = None
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
    bar = Bar(args.json, "import")
    started = time.monotonic()
    try:
        with open_target(args.target) as target:
            name = os.fsencode(args.snapshot)
            result = target.import_tree(src, name, args.one_file_system, bar.importing)
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
            f"{result['files']:,} files, {human_bytes(result['bytes_total'])} "
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
