"""``casfs snapshot``, ``diff``, ``rollback`` and ``restore``: given a mountpoint, or a store.

A store that is mounted is reached through its mount's control socket (the mount is its one
writer); a store that is not is opened directly. Either way the same model code runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from casfs.errors import CasfsError, StoreError
from casfs.fuse.controlsocket import socket_path
from casfs.fuse.mountpoint import FSTYPE, casfs_mount_of_store, find_mount, is_stale
from casfs.store import layout
from casfs_cli.format import human_bytes

if TYPE_CHECKING:
    from casfs.store.store import Store
    from casfs.workflows.selection import Selection

# A command given a mountpoint only talks to the mount's socket: the store and the model are
# imported when a command opens the store itself (they are most of a command's start-up).

CONTROL_TIMEOUT = 3600.0  # a rollback of a huge tree may take a while


class MountTarget:
    """A running mount, through its control socket."""

    def __init__(self, store: str, mountpoint: str) -> None:
        self.store = store
        self.mountpoint = mountpoint

    def call(self, op: str, on_progress: Callable[[dict], None] | None = None, **args: Any) -> Any:
        """Send one request; progress lines that come before the reply go to
        ``on_progress``."""
        request = json.dumps({"op": op, **args}).encode() + b"\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CONTROL_TIMEOUT)
            try:
                with socket_path(self.store) as path:
                    sock.connect(path)
            except OSError:
                raise CasfsError(
                    f"the mount at {self.mountpoint} does not answer (is its daemon gone? "
                    f"try: casfs umount {self.mountpoint})"
                ) from None
            sock.sendall(request)
            with sock.makefile("rb") as lines:
                for line in lines:
                    reply = json.loads(line)
                    if "progress" not in reply:
                        break
                    if on_progress is not None:
                        on_progress(reply["progress"])
                else:
                    raise CasfsError(f"the mount at {self.mountpoint} closed the connection")
        if not reply["ok"]:
            raise CasfsError(reply["error"], reply.get("errno"))
        return reply["result"]

    def create(self, name: bytes) -> dict:
        return self.call("snapshot.create", name=os.fsdecode(name))

    def delete(self, name: bytes) -> dict:
        return self.call("snapshot.delete", name=os.fsdecode(name))

    def listing(self) -> list[dict]:
        return self.call("snapshot.list")

    def diff(self, old: bytes, new: bytes) -> list[dict]:
        return self.call("diff", old=os.fsdecode(old), new=os.fsdecode(new))

    def rollback(self, name: bytes) -> None:
        self.call("rollback", name=os.fsdecode(name))

    def restore(self, name: bytes, path: bytes, dest: bytes | None, force: bool) -> None:
        d = os.fsdecode(dest) if dest is not None else None
        self.call("restore", name=os.fsdecode(name), path=os.fsdecode(path), dest=d, force=force)

    def import_tree(self, src: str, name: bytes, selection: Selection, progress) -> dict:
        from casfs.workflows.importer import Progress

        def show(p: dict) -> None:
            if progress is not None:
                progress(Progress(**{**p, "path": os.fsencode(p["path"])}))

        return self.call("import", show, src=src, name=os.fsdecode(name), **selection.describe())

    @contextlib.contextmanager
    def reader(self) -> Iterator[Store]:
        """The store opened read-only beside its mount (LMDB readers never block the
        writer, and a read transaction sees one point in time)."""
        from casfs.store.store import Store

        store = Store(self.store, writer=False)
        try:
            yield store
        finally:
            store.close()


class StoreTarget:
    """A store that is not mounted, opened as its one writer through the Python API (so the
    API and the command behave alike)."""

    def __init__(self, path: str) -> None:
        from casfs.api import Casfs

        self.api = Casfs(path)
        self.store = self.api.store
        self.mountpoint = None

    def close(self) -> None:
        self.api.close()

    def create(self, name: bytes) -> dict:
        return self.api.snapshot(name)

    def delete(self, name: bytes) -> dict:
        return self.api.delete_snapshot(name)

    def listing(self) -> list[dict]:
        return self.api.snapshots()

    def diff(self, old: bytes, new: bytes) -> list[dict]:
        return self.api.diff(old, new)

    def rollback(self, name: bytes) -> None:
        self.api.rollback(name)

    def restore(self, name: bytes, path: bytes, dest: bytes | None, force: bool) -> None:
        self.api.restore(name, path, dest, force)

    def import_tree(self, src: str, name: bytes, selection: Selection, progress) -> dict:
        result = self.api.put_tree(src, name, progress=progress, **selection.describe())
        return result.describe()

    @contextlib.contextmanager
    def reader(self) -> Iterator[Store]:
        yield self.store


@contextlib.contextmanager
def open_target(where: str) -> Iterator[MountTarget | StoreTarget]:
    """The mount or store named by ``where`` (a mountpoint or a store directory)."""
    if not os.path.isdir(where):
        raise CasfsError(f"{where}: not a directory (give a casfs mountpoint or a store)")
    real = os.path.realpath(where)
    mount = find_mount(real)
    if mount is not None and mount.fstype == FSTYPE:
        if is_stale(real):
            raise CasfsError(f"the mount at {real} is stale (its daemon is gone); "
                             f"run: casfs umount {real}")  # fmt: skip
        yield MountTarget(mount.source, mount.target)
        return
    if not os.path.exists(os.path.join(real, layout.MARKER_FILE)):
        raise StoreError(f"{where} is neither a casfs mountpoint nor a casfs store")
    mount = casfs_mount_of_store(real)
    if mount is not None:
        yield MountTarget(real, mount.target)
        return
    target = StoreTarget(real)
    try:
        yield target
    finally:
        target.close()


def _name(text: str) -> bytes:
    return os.fsencode(text)


def _tree_path(target: MountTarget | StoreTarget, text: str) -> bytes:
    """A path inside the tree: relative to its root, or absolute under the mountpoint."""
    path = os.fsencode(text)
    if target.mountpoint and os.path.isabs(path):
        mp = os.fsencode(target.mountpoint).rstrip(b"/") + b"/"
        if path.startswith(mp):
            return path[len(mp) :]
    return path.lstrip(b"/")


# -- commands ---------------------------------------------------------------------------------


def snapshot(args: argparse.Namespace) -> int:
    from casfs_cli.main import one_line

    with open_target(args.target) as target:
        if args.delete:
            if args.name is None:
                raise CasfsError("-d needs the NAME of the snapshot to delete")
            info = target.delete(_name(args.name))
            _print(args, info, f"deleted snapshot {one_line(info['name'])}")
            return 0
        if args.name is not None:
            started = time.monotonic()
            info = target.create(_name(args.name))
            took = time.monotonic() - started
            _print(args, info, f"created snapshot {one_line(info['name'])}: {info['files']:,} "
                   f"files, {human_bytes(info['logical_bytes'])}, in {took:.2f} s")  # fmt: skip
            return 0
        rows = target.listing()
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no snapshots")
        return 0
    width = max(4, *(len(one_line(r["name"])) for r in rows))
    print(f"{'NAME':<{width}}  {'CREATED':<19}  {'FILES':>9}  {'LOGICAL':>9}  {'ONLY HERE':>9}")
    for r in rows:
        created = datetime.datetime.fromtimestamp(r["created_ns"] / 1e9)
        print(
            f"{one_line(r['name']):<{width}}  {created:%Y-%m-%d %H:%M:%S}  {r['files']:>9,}  "
            f"{human_bytes(r['logical_bytes']):>9}  {human_bytes(r['exclusive_bytes']):>9}"
        )
    return 0


def _print(args: argparse.Namespace, info: Any, text: str) -> None:
    print(json.dumps(info) if args.json else text)


def diff_command(args: argparse.Namespace) -> int:
    from casfs.tree import diff
    from casfs_cli.main import one_line

    marks = {diff.ADDED: "+", diff.REMOVED: "-", diff.MODIFIED: "M", diff.METADATA: "m"}
    with open_target(args.target) as target:
        changes = target.diff(_name(args.old), _name(args.new))
    if args.json:
        print(json.dumps(changes))
        return 0
    for c in changes:
        slash = "/" if c["dir"] else ""
        print(f"{marks[c['kind']]} {one_line(c['path'])}{slash}")
    return 0


def rollback(args: argparse.Namespace) -> int:
    from casfs_cli.main import one_line

    with open_target(args.target) as target:
        started = time.monotonic()
        target.rollback(_name(args.name))
    took = time.monotonic() - started
    print(f"rolled back to snapshot {one_line(args.name)} in {took:.2f} s")
    return 0


def restore_command(args: argparse.Namespace) -> int:
    from casfs_cli.main import one_line

    with open_target(args.target) as target:
        path = os.fsencode(args.path).strip(b"/")
        dest = _tree_path(target, args.dest) if args.dest is not None else None
        target.restore(_name(args.name), path, dest, args.force)
    shown = os.fsdecode(dest if dest is not None else path)
    print(one_line(f"restored {args.path} from snapshot {args.name} to /{shown}"))
    return 0
