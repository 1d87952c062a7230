"""Moves buffered writes into the store, and makes the store durable.

The store's write transaction is owned by the trio thread: a flush plans on it, awaits the
CPU stages (cut, hash, compress) in a worker thread, and applies the result on it again, so
other requests are served meanwhile. A per-inode lock keeps one flush (or truncate, or read)
of a file at a time; the file's buffered bytes stay visible to ``getattr`` while they are in
flight. All changes ride in one LMDB batch, committed (durably) on fsync, on the timer, and
when enough data has gone into it.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

import trio

from casfs.errors import CasfsError, NoSpace
from casfs.fuse.writeback import DirtyFile, WriteBuffers
from casfs.store.store import Store
from casfs.tree.content import MAX_REGION
from casfs.tree.fs import Filesystem

log = logging.getLogger(__name__)

# Jobs smaller than this run their CPU stages on the trio thread: a thread hop costs more.
INLINE_BYTES = 256 << 10
# Commit the batch once this much file data has gone into it (bounds LMDB's dirty pages).
COMMIT_BYTES = 64 << 20
FLUSH_AGE = 1.0  # seconds a buffered write may wait before the timer flushes it
COMMIT_INTERVAL = 1.0  # seconds between timed commits of the batch
RESERVE_BYTES = 8 << 20  # disk space kept free for metadata and LMDB's copy-on-write pages


class InodeLocks:
    """One trio lock per inode, made on demand and dropped when idle."""

    def __init__(self) -> None:
        self._locks: defaultdict[int, trio.Lock] = defaultdict(trio.Lock)

    def __call__(self, ino: int) -> trio.Lock:
        return self._locks[ino]

    def drop(self, ino: int) -> None:
        lock = self._locks.get(ino)
        if lock is not None and not lock.locked() and not lock.statistics().tasks_waiting:
            del self._locks[ino]


class Flusher:
    def __init__(self, fs: Filesystem, store: Store, buffers: WriteBuffers, locks: InodeLocks) -> None:
        self.fs = fs
        self.store = store
        self.buffers = buffers
        self.locks = locks
        self.flushing: dict[int, DirtyFile] = {}
        self.errors: dict[int, int] = {}  # ino -> errno of a failed background flush
        self._batch_bytes = 0
        self._last_commit = time.monotonic()

    async def flush(self, ino: int) -> None:
        """Store ``ino``'s buffered writes (if any). The caller must not hold its lock."""
        async with self.locks(ino):
            await self.flush_locked(ino)

    async def flush_locked(self, ino: int) -> None:
        dirty = self.buffers.take(ino)
        if dirty is None:
            return
        self.flushing[ino] = dirty
        try:
            for start in sorted(dirty.ranges):
                buf = memoryview(dirty.ranges[start])
                for off in range(0, len(buf), MAX_REGION):
                    await self._write(ino, start + off, buf[off : off + MAX_REGION], dirty.mtime_ns)
        except CasfsError as exc:
            self.errors[ino] = exc.errno
            log.error("flushing inode %d failed: %s", ino, exc)
        finally:
            del self.flushing[ino]
        if self._batch_bytes >= COMMIT_BYTES:
            self.commit()

    async def _write(self, ino: int, offset: int, data: memoryview, mtime_ns: int) -> None:
        job = self.fs.start_write(ino, offset, data)
        with self.store.read() as tx:
            job.plan(tx)
        if len(data) < INLINE_BYTES:
            job.cut()
        else:
            await trio.to_thread.run_sync(job.cut)
        with self.store.read() as tx:
            job.pick(tx)
        if sum(p.length for p in job.new) < INLINE_BYTES:
            job.compress()
        else:
            await trio.to_thread.run_sync(job.compress)
        self._ensure_room(len(data))
        self.fs.finish_write(job, mtime_ns)
        self._batch_bytes += len(data)

    def _ensure_room(self, nbytes: int) -> None:
        """Refuse a flush the disk cannot take *before* applying it: a failed commit would
        lose the whole batch, including operations already answered as done."""
        need = nbytes + self._batch_bytes + RESERVE_BYTES
        if self._disk_free() >= need:
            return
        self.commit()  # what is pending may fit now, and LMDB can reuse its free pages
        if self._disk_free() < nbytes + RESERVE_BYTES:
            raise NoSpace(f"store {self.store.path}: no space left on device")

    def _disk_free(self) -> int:
        st = os.statvfs(self.store.path)
        return st.f_bavail * st.f_frsize

    def drop(self, ino: int) -> None:
        """Forget a file's buffered writes (it was deleted)."""
        self.buffers.take(ino)
        self.errors.pop(ino, None)

    def take_error(self, ino: int) -> int | None:
        return self.errors.pop(ino, None)

    async def flush_all(self) -> None:
        for ino in list(self.buffers.files):
            await self.flush(ino)

    async def relieve_pressure(self) -> None:
        """Flush the largest files until the buffers are under half their limit."""
        while self.buffers.total > self.buffers.limit_bytes // 2:
            ino = self.buffers.largest()
            if ino is None:
                return
            await self.flush(ino)

    def commit(self) -> None:
        """Make everything applied so far durable (one LMDB commit, with its fsync)."""
        try:
            self.store.commit_batch()
        finally:
            self.store.begin_batch()
            self._batch_bytes = 0
            self._last_commit = time.monotonic()

    async def run_timer(self) -> None:
        while True:
            await trio.sleep(FLUSH_AGE / 2)
            for ino in self.buffers.older_than(FLUSH_AGE):
                await self.flush(ino)
            if time.monotonic() - self._last_commit >= COMMIT_INTERVAL:
                try:
                    self.commit()
                except CasfsError as exc:
                    log.error("committing the store failed: %s", exc)
