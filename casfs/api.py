"""The Python API: a store as one object, for scripts and build systems (the artifact cache).

    from casfs.api import Casfs

    with Casfs.create("/srv/cache") as cas:            # or Casfs("/srv/cache")
        cas.put_tree("build/out", "build-1234")           # a directory as a snapshot
        cas.snapshots()                                   # [{"name": "build-1234", ...}]
        cas.read_bytes("build-1234", "lib/libfoo.so")     # a path's bytes
        cas.digest("build-1234", "lib/libfoo.so")         # its content digest (hex)
        cas.export("build-1234", "/tmp/restored")         # back to a directory

This is the code ``casfs`` runs for a store that is not mounted (``casfs_cli.snapshots``), so
the API and the command behave alike. A store has one writer: ``Casfs(path)`` fails with
:class:`casfs.errors.StoreInUse` while the store is mounted; ``Casfs(path, writer=False)``
reads beside the mount (snapshots only: the live tree's newest bytes may still be in the
mount's memory). Paths inside a tree are '/'-separated, relative to its root; a snapshot name
``"@live"`` means the live tree. Names and paths may be str or bytes.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Callable, Sequence
from typing import Any

from casfs.errors import FsError
from casfs.store.chunker import DEFAULT_AVG
from casfs.store.store import Store, Tx
from casfs.tree import diff, directory, identity, restore, snapshots, treeobjects
from casfs.tree.fs import ROOT_INO, Filesystem
from casfs.tree.treeobjects import Entry
from casfs.workflows import exporter, importer, retention
from casfs.workflows.exporter import ExportResult
from casfs.workflows.importer import ImportResult, Progress
from casfs.workflows.selection import Selection

PathLike = str | bytes


def _b(text: PathLike) -> bytes:
    return os.fsencode(text)


class Casfs:
    """An open store (see the module docstring)."""

    def __init__(self, path: str, *, writer: bool = True) -> None:
        self.store = Store(path, writer=writer)
        self.fs = Filesystem(self.store)

    @classmethod
    def create(cls, path: str, *, chunk_avg: int = DEFAULT_AVG, zstd_level: int = 3) -> Casfs:
        Filesystem.create_store(path, chunk_avg=chunk_avg, zstd_level=zstd_level).close()
        return cls(path)

    def close(self) -> None:
        self.fs.close()
        self.store.close()

    def __enter__(self) -> Casfs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> str:
        return self.store.path

    # -- snapshots --------------------------------------------------------------------------

    def snapshots(self) -> list[dict]:
        """Every snapshot, oldest first: name, id, created_ns, files, dirs, logical_bytes and
        exclusive_bytes (what deleting it would free)."""
        with self.store.read() as tx:
            return [
                snapshots.describe(s, snapshots.exclusive_bytes(tx, self.store, s.root.digest))
                for s in snapshots.all_snapshots(tx)
            ]

    def snapshot(self, name: PathLike) -> dict:
        """Snapshot the live tree as ``name``."""
        t = time.time_ns()
        merkle = self.fs.merkle
        snap = self._write(lambda tx: snapshots.create(tx, self.store, merkle, _b(name), t))
        return snapshots.describe(snap)

    def delete_snapshot(self, name: PathLike) -> dict:
        """Delete a snapshot; what only it held is freed at once."""
        snap = self._write(lambda tx: snapshots.delete(tx, self.store, _b(name)))
        return snapshots.describe(snap)

    def diff(self, old: PathLike, new: PathLike) -> list[dict]:
        """What changed from ``old`` to ``new`` (snapshot names or "@live")."""

        def run(tx: Tx) -> list[dict]:
            old_root = snapshots.root_of(tx, self.fs.merkle, _b(old))
            new_root = snapshots.root_of(tx, self.fs.merkle, _b(new))
            return [c.describe() for c in diff.diff(self.store, tx, old_root, new_root)]

        return self._write(run)  # "@live" may build stale tree objects first

    def rollback(self, name: PathLike) -> None:
        self._write(lambda tx: restore.rollback(self.fs, tx, _b(name)))

    def restore(
        self, name: PathLike, path: PathLike, dest: PathLike | None = None, force: bool = False
    ) -> None:
        """Put ``path`` of snapshot ``name`` into the live tree at ``dest`` (default: the same
        path), sharing its data."""
        d = _b(dest) if dest is not None else None
        self._write(lambda tx: restore.restore(self.fs, tx, _b(name), _b(path), d, force))

    def prune(self, policy: retention.Policy, dry_run: bool = False) -> list[retention.Decision]:
        """Delete the snapshots ``policy`` does not keep (as ``borg prune``); the decisions,
        newest first."""
        listed = [(_b(s["name"]), s["created_ns"]) for s in self._list_plain()]
        decisions = retention.plan(listed, policy)
        if not dry_run:
            for d in decisions:
                if not d.keep:
                    self.delete_snapshot(d.name)
        return decisions

    def _list_plain(self) -> list[dict]:
        with self.store.read() as tx:
            return [snapshots.describe(s) for s in snapshots.all_snapshots(tx)]

    # -- whole trees in and out -------------------------------------------------------------

    def put_tree(
        self,
        src: str,
        name: PathLike,
        *,
        one_file_system: bool = False,
        exclude: Sequence[str] = (),
        exclude_caches: bool = False,
        exclude_if_present: Sequence[str] = (),
        progress: Callable[[Progress], None] | None = None,
    ) -> ImportResult:
        """Import directory ``src`` as snapshot ``name`` (``casfs import``): incremental
        against the last import of the same ``src`` (with the same options), on all cores.
        ``exclude`` holds glob patterns of paths to leave out (see
        :mod:`casfs.workflows.selection`); ``exclude_caches`` leaves out the contents of
        directories tagged with a CACHEDIR.TAG; ``exclude_if_present`` leaves out directories
        holding an entry of one of those names."""
        selection = Selection.of(exclude, exclude_caches, one_file_system, exclude_if_present)
        return importer.import_offline(
            self.store, src, _b(name), selection=selection, progress=progress
        )

    def export(
        self,
        name: PathLike,
        dest: str,
        path: PathLike = b"",
        *,
        force: bool = False,
        progress: Callable[[int, int, bytes], None] | None = None,
    ) -> ExportResult:
        """Write snapshot ``name`` (or ``path`` in it) to directory ``dest``."""
        return exporter.export(self.store, _b(name), dest, _b(path), force=force, progress=progress)

    # -- single paths -----------------------------------------------------------------------

    def listdir(self, name: PathLike, path: PathLike = b"") -> list[str]:
        """The names in directory ``path`` of snapshot ``name`` (or "@live")."""
        with self.store.read() as tx:
            if _b(name) == snapshots.LIVE:
                ino = self._live_ino(tx, _b(path))
                return sorted(os.fsdecode(n) for _, n, _ in directory.entries(tx, ino))
            entry = self._entry(tx, _b(name), _b(path))
            if not entry.is_dir:
                raise FsError(errno.ENOTDIR, os.fsdecode(_b(path)))
            tree = treeobjects.load_tree(self.store, tx, entry.digest)
            return [os.fsdecode(e.name) for e in tree.entries]

    def stat(self, name: PathLike, path: PathLike) -> dict:
        """What ``stat`` shows of ``path`` in snapshot ``name`` (or "@live")."""
        with self.store.read() as tx:
            if _b(name) == snapshots.LIVE:
                e: Any = self.fs.getattr(self._live_ino(tx, _b(path)))
            else:
                e = self._entry(tx, _b(name), _b(path))
        fields = ("mode", "nlink", "uid", "gid", "rdev", "size", "atime_ns", "mtime_ns")
        return {f: getattr(e, f) for f in (*fields, "ctime_ns")}

    def read_bytes(self, name: PathLike, path: PathLike) -> bytes:
        """The bytes of regular file ``path`` in snapshot ``name`` (or "@live")."""
        if _b(name) == snapshots.LIVE:
            ino = self._live_file(_b(path))
            return self.fs.read(ino, 0, self.fs.getattr(ino).size)
        with self.store.read() as tx:
            entry = self._entry(tx, _b(name), _b(path))
            extents = self._extents(tx, entry, path)
            return self.fs.content.read_job(tx, 0, entry.size, 0, entry.size, extents).complete(tx)

    def digest(self, name: PathLike, path: PathLike) -> str:
        """The content digest (``user.casfs.digest``) of regular file ``path``: equal for two
        files exactly when their bytes are equal."""
        if _b(name) == snapshots.LIVE:
            return identity.run(self.fs.digest_steps(self._live_file(_b(path)))).decode()
        with self.store.read() as tx:
            entry = self._entry(tx, _b(name), _b(path))
            extents = self._extents(tx, entry, path)

        def read(offset: int, length: int) -> bytes:
            with self.store.read() as tx:
                job = self.fs.content.read_job(tx, 0, entry.size, offset, length, extents)
                return job.complete(tx)

        steps = identity.steps(self.fs.pipeline, entry.size, extents, entry.recut, read)
        return identity.run(steps).decode()

    def stats(self) -> dict[str, Any]:
        s = self.store.stats()
        return {**s.__dict__, "file_bytes": self.store.file_bytes()}

    # -- helpers ----------------------------------------------------------------------------

    def _entry(self, tx: Tx, name: bytes, path: bytes) -> Entry:
        root = snapshots.find(tx, name).root
        return restore.resolve(self.store, tx, root, path, name)

    def _live_ino(self, tx: Tx, path: bytes) -> int:
        ino = ROOT_INO
        for part in (p for p in path.split(b"/") if p and p != b"."):
            ino = self.fs.lookup_in(tx, ino, part)
        return ino

    def _live_file(self, path: bytes) -> int:
        with self.store.read() as tx:
            ino = self._live_ino(tx, path)
        mode = self.fs.getattr(ino).mode
        if not stat.S_ISREG(mode):
            raise FsError(errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL, os.fsdecode(path))
        return ino

    def _extents(self, tx: Tx, entry: Entry, path: PathLike) -> list:
        if not stat.S_ISREG(entry.mode):
            raise FsError(errno.EISDIR if entry.is_dir else errno.EINVAL, os.fsdecode(path))
        if entry.digest:
            return treeobjects.load_manifest(self.store, tx, entry.digest)
        return list(entry.extents)

    def _write(self, fn: Callable[[Tx], Any]) -> Any:
        return self.store.run_write(fn)
