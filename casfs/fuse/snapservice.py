"""Snapshot operations inside a running mount: the same model code the offline commands use,
plus what only the mount has to do (buffered writes, kernel caches, pins).

Creation is one point in time: writes wait at a gate from the moment a snapshot is asked for,
every byte buffered before then is stored, the stale tree objects are rebuilt step by step
between other requests, and the final pass (which only redoes what changed meanwhile) and the
record happen in one synchronous transaction.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import TYPE_CHECKING

import pyfuse3
import trio

from casfs.fuse.snapview import SNAPDIR_INO
from casfs.tree import diff, restore, snapshots
from casfs.tree.fs import ROOT_INO

if TYPE_CHECKING:
    from casfs.fuse.operations import CasfsOperations

log = logging.getLogger(__name__)

STEP_BUDGET = 0.01  # seconds of building before other requests get a turn
# Commit what building wrote every this many bytes: one commit of a whole first snapshot's
# tree objects would hold every request for its write-out.
PREPARE_COMMIT_BYTES = 1 << 20


class SnapshotService:
    def __init__(self, ops: CasfsOperations) -> None:
        self.ops = ops
        self.store = ops.store
        self.fs = ops.fs
        self.lock = trio.Lock()  # one snapshot-changing operation at a time
        self.unsettled: list[tuple[int, bytes, int]] = []  # names to drop: see _forget_entry
        self.stale: dict[int, bool] = {}  # inodes to refresh (attributes only?): see _refresh

    async def create(self, name: bytes) -> snapshots.Snapshot:
        snapshots.check_snapshot_name(name)
        async with self.lock:
            gate = self.ops.write_gate = trio.Event()
            try:
                await self.ops.flusher.drain()
                await self._prepare()
                t = time.time_ns()
                snap = self.store.run_write(
                    lambda tx: snapshots.create(tx, self.store, self.fs.merkle, name, t)
                )
            finally:
                self.ops.write_gate = None
                gate.set()
            self.ops.flusher.commit(durable=True)
        log.info("created snapshot %r", name)
        return snap

    async def _prepare(self) -> None:
        """Rebuild stale tree objects, yielding to other requests every STEP_BUDGET."""
        stack = [ROOT_INO]
        started = time.monotonic()
        while stack:
            self.store.run_write(lambda tx: self.fs.merkle.step(tx, stack))
            if self.store.batch_written > PREPARE_COMMIT_BYTES:
                self.ops.flusher.commit()
            if time.monotonic() - started > STEP_BUDGET:
                await trio.sleep(0)
                started = time.monotonic()

    async def delete(self, name: bytes) -> snapshots.Snapshot:
        async with self.lock:

            def run(tx):
                snap = snapshots.find(tx, name)
                self.ops.snaps.pin_deleted(tx, snap)
                return snapshots.delete(tx, self.store, name)

            snap = self.store.run_write(run)
            self.ops.flusher.commit(durable=True)
        # not deleted=: the kernel refuses that for a directory still in use
        self._forget_entry(SNAPDIR_INO, name)
        self.ops.snaps.evict_deleted(snap.id, lambda ino: ino in self.ops.pins.opens)
        log.info("deleted snapshot %r", name)
        return snap

    async def listing(self) -> list[tuple[snapshots.Snapshot, int]]:
        """Every snapshot with the bytes only it holds."""
        with self.store.read() as tx:
            snaps = snapshots.all_snapshots(tx)
            return [(s, snapshots.exclusive_bytes(tx, self.store, s.root.digest)) for s in snaps]

    async def diff(self, old: bytes, new: bytes) -> list[diff.Change]:
        async with self.lock:
            if snapshots.LIVE in (old, new):
                await self.ops.flusher.drain()
                await self._prepare()

            def run(tx):
                merkle = self.fs.merkle
                old_root = snapshots.root_of(tx, merkle, old)
                return diff.diff(self.store, tx, old_root, snapshots.root_of(tx, merkle, new))

            return self.store.run_write(run)

    async def rollback(self, name: bytes) -> None:
        async with self.lock:
            await self.ops.flusher.drain()
            removed, changed = self.store.run_write(lambda tx: restore.rollback(self.fs, tx, name))
            self.ops.flusher.commit(durable=True)
        for gone in removed:
            self._forget_name(gone)
        for ino in changed | {ROOT_INO}:
            self._refresh(ino, attr_only=False)
        log.info("rolled back to snapshot %r", name)

    async def restore(self, name: bytes, path: bytes, dest: bytes | None, force: bool) -> None:
        async with self.lock:
            await self.ops.flusher.drain()
            made, replaced = self.store.run_write(
                lambda tx: restore.restore(self.fs, tx, name, path, dest, force)
            )
            self.ops.flusher.commit(durable=True)
        if replaced is not None:
            self._forget_name(replaced)
        else:  # the kernel may hold a negative entry for the new name
            self._forget_entry(made.parent, made.name)
        self._refresh(made.parent)

    def _forget_name(self, gone: restore.Name) -> None:
        """Drop a removed entry from the kernel's cache. A file's inode is marked deleted
        too (its open descriptors see nlink 0 at once); a directory's is not, because the
        kernel refuses that while something below it is in use."""
        self._forget_entry(gone.parent, gone.name, 0 if gone.is_dir else gone.ino)

    def _forget_entry(self, parent: int, name: bytes, deleted: int = 0) -> None:
        """Have the kernel drop ``name`` from its cache: by :meth:`settle` (a command that
        returns must leave no stale name behind) or, inside a request, by :meth:`settle_soon`.
        """
        self.unsettled.append((parent, name, deleted))

    async def settle(self) -> None:
        """Drop the names forgotten so far, waiting until the kernel has. From a thread: the
        kernel takes the directory's lock for it, and a request of the kernel's may hold that
        lock until this loop answers it. Never inside a request (it may hold the lock)."""
        names, self.unsettled = self.unsettled, []
        stale, self.stale = self.stale, {}
        if names or stale:  # (abandoned at shutdown: the kernel may never answer then)
            await trio.to_thread.run_sync(_drop_cached, names, stale, abandon_on_cancel=True)

    def settle_soon(self) -> None:
        """Drop the names forgotten so far without waiting (pyfuse3 sends them from a thread
        of its own): for requests, during which the kernel may hold the directory's lock."""
        names, self.unsettled = self.unsettled, []
        for parent, name, deleted in names:
            pyfuse3.invalidate_entry_async(parent, name, deleted=deleted, ignore_enoent=True)

    def _refresh(self, ino: int, attr_only: bool = True) -> None:
        """``ino`` changed behind the kernel's back: have :meth:`settle` drop its cached
        attributes (and pages). From a thread too: dropping pages waits for those a read
        of the file has locked, and that read waits for this loop's answer."""
        self.stale[ino] = self.stale.get(ino, True) and attr_only


def _drop_cached(names: list[tuple[int, bytes, int]], stale: dict[int, bool]) -> None:
    """Drop names, then inodes' attributes (and pages), from the kernel's caches."""
    for parent, name, deleted in names:
        try:
            pyfuse3.invalidate_entry(parent, name, deleted=deleted)
        except OSError as exc:  # ENOENT: the kernel does not know the name (nothing to drop)
            if exc.errno != errno.ENOENT:
                log.debug("could not drop %r from the kernel's cache: %s", name, exc)
    for ino, attr_only in stale.items():
        try:
            pyfuse3.invalidate_inode(ino, attr_only=attr_only)
        except OSError:
            pass  # the kernel does not know it
