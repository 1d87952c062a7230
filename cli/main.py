"""The ``casfs`` command: argument parsing and the one-line error policy.

Every expected failure is a :class:`casfs.errors.CasfsError` and becomes one line on stderr
with a non-zero exit; argparse's own errors are folded to one line too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from casfs.errors import CasfsError

EXIT_PROBLEMS = 1  # fsck found problems
EXIT_ERROR = 2  # the command could not do what was asked


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _lazy(target: str) -> Callable[[argparse.Namespace], int | None]:
    """``module.function`` of this package, imported when the command runs: a command then
    loads only what it uses (trio and pyfuse3 cost more to import than most commands take)."""

    def run(args: argparse.Namespace) -> int | None:
        module, name = target.rsplit(".", 1)
        return getattr(importlib.import_module(f"casfs_cli.{module}"), name)(args)

    run.__qualname__ = target
    return run


def size_arg(text: str) -> int:
    """``65536``, ``64K``, ``1M``: a positive byte count."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        if t and t[-1] in units:
            n = int(float(t[:-1]) * units[t[-1]])
        else:
            n = int(t)
    except (ValueError, OverflowError):  # "x", "infK", "1e999M"
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if n <= 0:
        raise argparse.ArgumentTypeError(f"a size must be positive, not {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="casfs",
        description="Content-addressed, versioned snapshot filesystem.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser(
        "init",
        help="create a new, empty store",
        description="Creates STORE (a new directory with mode 0700, or an existing empty one) "
        "holding an empty live tree. The chunk size and zstd level are fixed for the store's "
        "life.",
    )
    s.add_argument("store", metavar="STORE", help="directory to create (absent or empty)")
    s.add_argument(
        "--chunk-avg",
        type=size_arg,
        default=None,
        metavar="SIZE",
        help="FastCDC average chunk size: 16K, 32K or 64K (default 64K)",
    )
    s.add_argument("--zstd-level", type=int, default=3, metavar="N", help="1..22 (default 3)")
    s.set_defaults(run=_lazy("commands.init"))

    s = sub.add_parser(
        "stats",
        help="space used, compression and dedup ratios",
        description="Logical, unique and stored bytes, dedup and compression ratios, objects and "
        "inodes, counting the live tree and every snapshot. Reads the last committed state, so "
        "beside a running mount it lags by up to a second.",
    )
    s.add_argument("store", metavar="STORE", help="store directory (not a mountpoint)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(run=_lazy("commands.stats"))

    s = sub.add_parser(
        "fsck",
        help="check refcounts, links and (optionally) every byte",
        description="Recounts every reference from the roots (live tree, snapshots) and compares "
        "with what is stored. Reads one committed state, so it may run beside a mount. Exit "
        "status 0: clean; 1: problems found (one line each).",
    )
    s.add_argument("store", metavar="STORE", help="store directory (not a mountpoint)")
    s.add_argument("--verify-data", action="store_true", help="also decode and hash every object")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(run=_lazy("commands.fsck"))

    s = sub.add_parser(
        "mount",
        help="mount a store's live tree (daemonizes unless --foreground)",
        description="Mounts the live tree of STORE at MOUNTPOINT, writable, with its snapshots "
        "read-only under MOUNTPOINT/.snap/. Without --foreground it returns once the mount is "
        "ready, leaving a daemon that logs to STORE/mount.log. One mount per store.",
    )
    s.add_argument("store", metavar="STORE", help="store directory")
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory")
    s.add_argument("--foreground", "-f", action="store_true", help="serve in this process")
    s.add_argument("--allow-other", action="store_true", help="let other users see the mount")
    s.add_argument(
        "--debug",
        action="store_true",
        help="log at debug level and trace every FUSE request on stderr (seen with --foreground)",
    )
    s.add_argument(
        "--write-buffer",
        type=size_arg,
        default=256 << 20,
        metavar="SIZE",
        help="memory for buffered writes before they are stored (default 256M)",
    )
    s.set_defaults(run=_lazy("mounting.mount"))

    s = sub.add_parser(
        "umount",
        help="flush, unmount and wait for the daemon to finish",
        description="Unmounts MOUNTPOINT, then waits until the daemon has flushed, committed and "
        "exited: when it returns, the store is consistent on disk. A busy mount is refused "
        "unless --lazy. A stale mount (its daemon died) is detached.",
    )
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    s.add_argument(
        "--lazy", "-z", action="store_true", help="detach even if busy, then wait for the daemon"
    )
    s.set_defaults(run=_lazy("mounting.umount"))

    s = sub.add_parser(
        "snapshot",
        help="take (NAME), list (no NAME) or delete (-d NAME) snapshots",
        description="Given a mountpoint, or a store that is not mounted. A new snapshot holds "
        "every byte written before the command ran; it appears as MOUNT/.snap/NAME.",
    )
    s.add_argument("target", metavar="MOUNT_OR_STORE")
    s.add_argument("name", metavar="NAME", nargs="?", help="snapshot to take (or, with -d, delete)")
    s.add_argument("-d", "--delete", action="store_true", help="delete snapshot NAME")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(run=_lazy("snapshots.snapshot"))

    s = sub.add_parser(
        "diff",
        help="paths added (+), removed (-), modified (M) or with new metadata (m)",
        description="Compare two snapshots, or a snapshot and the live tree (@live). Equal "
        "subtrees are skipped by digest, so the cost follows the size of the change.",
    )
    s.add_argument("target", metavar="MOUNT_OR_STORE")
    s.add_argument("old", metavar="OLD", help="snapshot name or @live")
    s.add_argument("new", metavar="NEW", help="snapshot name or @live")
    s.add_argument("--json", action="store_true", help="print a JSON list")
    s.set_defaults(run=_lazy("snapshots.diff_command"))

    s = sub.add_parser(
        "rollback",
        help="make the live tree equal to a snapshot (no data copied)",
        description="Makes the live tree equal to snapshot NAME, changing only what differs. "
        "What the snapshot does not hold is removed from the live tree: take a snapshot first "
        "to keep it.",
    )
    s.add_argument("target", metavar="MOUNT_OR_STORE")
    s.add_argument("name", metavar="NAME", help="snapshot")
    s.set_defaults(run=_lazy("snapshots.rollback"))

    s = sub.add_parser(
        "restore",
        help="put a file or directory from a snapshot into the live tree (no copy)",
        description="Puts PATH of snapshot NAME into the live tree at DEST (default: the same "
        "path), sharing the snapshot's chunks instead of copying them. DEST is relative to the "
        "tree's root, or an absolute path under the mountpoint.",
    )
    s.add_argument("target", metavar="MOUNT_OR_STORE")
    s.add_argument("name", metavar="NAME", help="snapshot")
    s.add_argument("path", metavar="PATH", help="path inside the snapshot")
    s.add_argument("dest", metavar="DEST", nargs="?", help="live path (default: PATH)")
    s.add_argument("--force", action="store_true", help="replace DEST if it exists")
    s.set_defaults(run=_lazy("snapshots.restore_command"))

    s = sub.add_parser(
        "import",
        help="ingest a directory tree as a new snapshot (incremental, all cores)",
        description="Reads SRC straight into snapshot NAME, keeping modes, owners, ns times, "
        "symlinks, hard links, xattrs, holes and special files. A file whose size, mtime, ctime "
        "and inode match the last import of the same SRC is not read again. Given a mounted "
        "store (or its mountpoint), the import runs inside the mount. Exit status 1: done, but "
        "some files could not be read (listed as warnings).",
    )
    s.add_argument("target", metavar="MOUNT_OR_STORE")
    s.add_argument("src", metavar="SRC", help="directory to import")
    s.add_argument("--snapshot", "-s", required=True, metavar="NAME", help="snapshot to create")
    s.add_argument(
        "--one-file-system", "-x", action="store_true", help="do not descend into other mounts"
    )
    s.add_argument(
        "--exclude", "-e", action="append", metavar="PATTERN",
        help="leave out paths matching this glob; !GLOB takes back what an earlier one left out "
        "(repeatable; rules in docs/workflows.md)",
    )  # fmt: skip
    s.add_argument(
        "--exclude-from", action="append", metavar="FILE",
        help="read exclude patterns from FILE, one a line (# starts a comment)",
    )  # fmt: skip
    s.add_argument(
        "--exclude-caches", action="store_true",
        help="keep only the CACHEDIR.TAG of directories tagged as caches",
    )  # fmt: skip
    s.add_argument(
        "--exclude-if-present", action="append", metavar="NAME",
        help="leave out directories that hold an entry called NAME (repeatable)",
    )  # fmt: skip
    s.add_argument("--json", action="store_true", help="print a JSON summary, no progress bar")
    s.set_defaults(run=_lazy("workflows.import_command"))

    s = sub.add_parser(
        "export",
        help="write a snapshot (or a path in it) out to a directory",
        description="Writes snapshot NAME, or PATH inside it, to DEST with everything import "
        "keeps: modes, owners (as root), ns times, symlinks, hard links, xattrs, holes, special "
        "files. Reads the store directly, also while it is mounted.",
    )
    s.add_argument("target", metavar="MOUNT_OR_STORE")
    s.add_argument("name", metavar="NAME", help="snapshot")
    s.add_argument("dest", metavar="DEST", help="directory to create (or an empty one)")
    s.add_argument("path", metavar="PATH", nargs="?", help="only this path of the snapshot")
    s.add_argument("--force", action="store_true", help="overwrite what exists at DEST")
    s.add_argument("--json", action="store_true", help="print a JSON summary, no progress bar")
    s.set_defaults(run=_lazy("workflows.export_command"))

    s = sub.add_parser(
        "digest",
        help="content digest of files: equal exactly when their contents are equal",
        description="Prints the read-only xattr user.casfs.digest of each file on a casfs mount "
        "(live or in .snap), as sha256sum prints. It comes from the stored chunk list, so the "
        "data is not read again. Digests compare within a store (or stores with the same chunk "
        "size). With --store, any file is read and digested as that store would digest it.",
    )
    s.add_argument("paths", metavar="PATH", nargs="+")
    s.add_argument("--store", metavar="STORE", help="digest files anywhere as STORE would")
    s.set_defaults(run=_lazy("workflows.digest_command"))

    s = sub.add_parser(
        "prune",
        help="delete snapshots a retention policy does not keep (as borg prune)",
        description="Snapshots are walked newest first; each --keep-* rule keeps the newest "
        "snapshot of each of its N most recent periods (hours, days, ISO weeks, months, years) "
        "not kept by an earlier rule. Prints what is kept and why.",
    )
    s.add_argument("target", metavar="MOUNT_OR_STORE")
    s.add_argument("--keep-last", type=int, default=0, metavar="N", help="keep the N newest")
    for rule, period in (
        ("hourly", "hours"),
        ("daily", "days"),
        ("weekly", "ISO weeks"),
        ("monthly", "months"),
        ("yearly", "years"),
    ):
        s.add_argument(
            f"--keep-{rule}",
            type=int,
            default=0,
            metavar="N",
            help=f"keep the newest of each of the N most recent {period}",
        )
    s.add_argument("--prefix", "-P", default="", metavar="P", help="only snapshots named P...")
    s.add_argument("--dry-run", "-n", action="store_true", help="show, delete nothing")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(run=_lazy("workflows.prune_command"))

    s = sub.add_parser(
        "compact",
        help="rewrite the store's database file to return freed space to the disk (offline)",
        description="Deleting frees space inside the store at once, for the store to reuse; the "
        "database file itself never shrinks. compact copies the live pages to a new file and "
        "swaps it in. The store must not be mounted or open elsewhere.",
    )
    s.add_argument("store", metavar="STORE")
    s.add_argument("--json", action="store_true", help="print a JSON summary")
    s.set_defaults(run=_lazy("workflows.compact_command"))

    s = sub.add_parser(
        "demo",
        help="mount a demo store holding two copies of Python's standard library, show its stats",
        description="Creates DIR/store (replacing the store of an earlier demo there), mounts it "
        "at DIR/mnt, copies this Python's standard library into the mount twice, prints its "
        "stats and leaves it mounted.",
    )
    s.add_argument(
        "dir", metavar="DIR", nargs="?", default="/tmp/casfs-demo", help="default /tmp/casfs-demo"
    )
    s.set_defaults(run=_lazy("commands.demo"))
    return p


def one_line(text: str) -> str:
    """A message fit for one terminal line: control characters escaped (a path may hold a
    newline) and bytes that were not UTF-8 in a path shown as \\xNN."""
    out = []
    for c in text:
        if 0xDC80 <= ord(c) <= 0xDCFF:  # os.fsdecode's stand-in for an undecodable byte
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(repr(c)[1:-1])
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except CasfsError as exc:
        print(f"casfs {args.command}: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        print(one_line(f"casfs {args.command}: {exc.strerror or exc}{where}"), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"casfs {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
