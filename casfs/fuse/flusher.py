"""Moves buffered writes into the store, and makes the store durable.

When: a file is stored in the background once FLUSH_AT bytes of it are buffered (the writer
goes on meanwhile), and in full on fsync, on its last release, before a truncate or an
explicit mtime, when the mount's buffered total passes --write-buffer, and by a timer for
writes older than FLUSH_AGE. A writer waits (back-pressure) while its file has
FILE_PENDING_MAX bytes not yet stored, or the mount its whole write buffer.

How: the store's write transaction is used by the trio thread. A flush plans on it, awaits
the CPU stages (cut, hash, compress) running in the pipeline's pool, and applies each group
of chunks on it (see casfs.tree.writer), so other requests are served meanwhile. A per-inode
lock keeps one flush (or truncate, or read) of a file at a time; the file's buffered bytes
stay visible to ``getattr`` while they are in flight. All changes ride in one LMDB batch,
committed (durably) on fsync, every COMMIT_INTERVAL, and after COMMIT_BYTES of file data.

The last two commit on the store's commit thread (``commit_soon``): writing out a batch's
pages took a third of a sequential write's time on the trio thread, and meanwhile the
writer's next megabytes can go into the buffers (they touch no store; the kernel's
``security.capability`` question before each write is answered from memory). Flushes wait
for the commit without blocking the loop; any other store use waits in Store.settle.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import time
from concurrent.futures import Future

import trio

from casfs.errors import CasfsError, NoSpace
from casfs.fuse.writeback import DirtyFile, WriteBuffers
from casfs.store.store import Store
from casfs.tree.fs import Filesystem

log = logging.getLogger(__name__)

# Reads smaller than this are decoded on the trio thread: a thread hop costs more.
INLINE_BYTES = 256 << 10
# Commit the batch once this much file data has gone into it (bounds LMDB's dirty pages).
COMMIT_BYTES = 32 << 20
FLUSH_AGE = 1.0  # seconds a buffered write may wait before the timer flushes it
COMMIT_INTERVAL = 1.0  # seconds between timed commits of the batch
RESERVE_BYTES = 8 << 20  # disk space kept free for metadata and LMDB's copy-on-write pages
DISK_FREE_AGE = 0.05  # seconds a reading of the disk's free space is used for
# A file with this many bytes buffered is stored in the background while writing goes on;
# a writer waits when its file has FILE_PENDING_MAX bytes not yet stored, so one sequential
# writer keeps about that much in memory, whatever the mount's --write-buffer.
FLUSH_AT = 16 << 20
FILE_PENDING_MAX = 48 << 20


async def wait_future(future: Future, shield: bool = False) -> None:
    """Wait for a concurrent.futures.Future (the pipeline's) without blocking trio; a
    ``shield``-ed wait goes on when its task is cancelled."""
    if future.done():
        return
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()
    future.add_done_callback(lambda _: token.run_sync_soon(done.set))
    with trio.CancelScope(shield=shield):
        await done.wait()


class InodeLock:
    """A mutex for trio tasks that costs nothing when free: trio.Lock checkpoints on every
    acquire, which was 9 % of the request loop when creating small files. Release wakes all
    waiters and each checks again, so a waiter that stops waiting never strands the rest."""

    __slots__ = ("held", "waiters")

    def __init__(self) -> None:
        self.held = False
        self.waiters: list[trio.Event] = []

    async def __aenter__(self) -> None:
        while self.held:
            event = trio.Event()
            self.waiters.append(event)
            await event.wait()
        self.held = True

    async def __aexit__(self, *exc: object) -> None:
        self.held = False
        waiters, self.waiters = self.waiters, []
        for event in waiters:
            event.set()

    @property
    def idle(self) -> bool:
        return not self.held and not self.waiters


class InodeLocks:
    """One lock per inode, made on demand and dropped when idle."""

    def __init__(self) -> None:
        self._locks: dict[int, InodeLock] = {}

    def __call__(self, ino: int) -> InodeLock:
        lock = self._locks.get(ino)
        if lock is None:
            lock = self._locks[ino] = InodeLock()
        return lock

    def drop(self, ino: int) -> None:
        lock = self._locks.get(ino)
        if lock is not None and lock.idle:
            del self._locks[ino]


class Flusher:
    def __init__(
        self, fs: Filesystem, store: Store, buffers: WriteBuffers, locks: InodeLocks
    ) -> None:
        self.fs = fs
        self.store = store
        self.buffers = buffers
        self.locks = locks
        self.flushing: dict[int, DirtyFile] = {}
        self.errors: dict[int, int] = {}  # ino -> errno of a failed background flush
        self._batch_bytes = 0
        self._last_commit = time.monotonic()
        self._nursery: trio.Nursery | None = None
        self._scheduled: set[int] = set()  # inodes with a background flush on its way
        self._small: dict[int, None] = {}  # small files queued by flush_soon, in order
        self._small_woken = trio.Event()
        self._batch_inodes: set[int] = set()  # files with data in the open batch
        self._committing: Future | None = None  # of commit_soon, until it ends
        self._free_read, self._free_read_at = 0, -math.inf  # see _recent_disk_free

    def pending(self, ino: int) -> int:
        """Bytes of ``ino`` written but not yet stored (buffered or in flight)."""
        dirty, flushing = self.buffers.get(ino), self.flushing.get(ino)
        return (dirty.nbytes if dirty else 0) + (flushing.nbytes if flushing else 0)

    @property
    def pending_total(self) -> int:
        return self.buffers.total + sum(d.nbytes for d in self.flushing.values())

    async def make_room(self, ino: int, offset: int, length: int) -> None:
        """Wait until a write to ``ino`` may be buffered: no overlap with bytes in flight,
        room in the file's share and in the mount's write buffer (back-pressure)."""
        dirty = self.buffers.get(ino)
        if dirty is not None and not dirty.can_take(offset, length):
            await self.flush(ino)
        flushing = self.flushing.get(ino)
        if flushing is not None and flushing.overlaps(offset, length):
            await self.idle(ino)
        while (
            self.pending(ino) >= FILE_PENDING_MAX or self.pending_total >= self.buffers.limit_bytes
        ):
            if ino in self.flushing:
                await self.idle(ino)
            elif ino in self.buffers.files:
                await self.flush(ino)
            else:
                await self.relieve_pressure()
                if self.pending_total >= self.buffers.limit_bytes:
                    await trio.sleep(0.01)  # others' flushes are in flight

    def written(self, ino: int) -> None:
        """After a buffered write: start storing the file in the background once it has
        FLUSH_AT bytes waiting, so the pipeline works while the writer goes on."""
        dirty = self.buffers.get(ino)
        if dirty is not None and dirty.nbytes >= FLUSH_AT and ino not in self.flushing:
            self.flush_soon(ino)

    def flush_soon(self, ino: int) -> None:
        """Store ``ino``'s buffered writes from a background task (once per file at a time):
        the request that asked returns at once, and the work fills the loop's idle time.
        Small files queue for one long-lived task (starting a task for each was a twentieth
        of storing a 4 KiB file); a large one gets a task of its own, so large files are
        stored side by side."""
        if ino not in self.buffers.files or ino in self._scheduled or self._nursery is None:
            return
        self._scheduled.add(ino)
        if self.pending(ino) >= FLUSH_AT:
            self._nursery.start_soon(self._background_flush, ino)
            return
        self._small[ino] = None
        if not self._small_woken.is_set():
            self._small_woken.set()

    async def _store_small_files(self) -> None:
        """The task behind flush_soon's queue of small files."""
        while True:
            await self._small_woken.wait()
            self._small_woken = trio.Event()
            while self._small:
                ino = next(iter(self._small))
                del self._small[ino]
                await self._background_flush(ino)

    async def _background_flush(self, ino: int) -> None:
        try:
            self._scheduled.discard(ino)
            await self.flush(ino)
        except Exception:  # a bug here must not end the mount
            log.exception("background flush of inode %d failed", ino)
            self.errors[ino] = errno.EIO

    async def idle(self, ino: int) -> None:
        """Wait for a flush of ``ino`` in progress to end."""
        async with self.locks(ino):
            pass

    async def flush(self, ino: int) -> None:
        """Store ``ino``'s buffered writes (if any). The caller must not hold its lock."""
        async with self.locks(ino):
            await self.flush_locked(ino)

    async def flush_locked(self, ino: int) -> None:
        """Store ``ino``'s buffered writes; the caller holds its lock.

        Every wait in here is shielded: once the bytes leave the buffer they must reach the
        store. Only the mount's shutdown cancels tasks, and it then waits for the flushes
        to finish. The shield is taken only by a wait that has to wait, which storing a
        small file never does (a cancel scope around each flush cost a thirtieth of it)."""
        if ino not in self.buffers.files:
            return
        await self.committed(shield=True)  # the loop serves writes meanwhile
        dirty = self.buffers.take(ino)
        if dirty is None:
            return
        self.flushing[ino] = dirty
        self._batch_inodes.add(ino)
        try:
            for start in sorted(dirty.ranges):
                data = dirty.ranges[start].view()
                self._ensure_room(len(data))
                for future in self.fs.write_steps(ino, start, data, dirty.mtime_ns):
                    await wait_future(future, shield=True)
                self._batch_bytes += len(data)
        except CasfsError as exc:
            if exc.errno == errno.ENOENT:  # deleted and freed meanwhile: nothing to store
                log.debug("inode %d went away before its flush", ino)
            else:
                self.errors[ino] = exc.errno
                log.error("flushing inode %d failed: %s", ino, exc)
        finally:
            del self.flushing[ino]
            self.buffers.pool.give_back(dirty.ranges.values())
        if self._batch_bytes >= COMMIT_BYTES:
            self.commit_soon()

    def _ensure_room(self, nbytes: int) -> None:
        """Refuse a flush the disk cannot take *before* applying it: a failed commit would
        lose the whole batch, including operations already answered as done."""
        need = nbytes + self._batch_bytes + RESERVE_BYTES
        if self._recent_disk_free() >= need:
            return
        # Commit what is pending; on a nearly full disk the commit also moves LMDB on, so the
        # pages deletes freed inside the data file are usable by the next batch (Store.advance)
        self.commit()
        if self._disk_free() + self.store.free_inside() < nbytes + RESERVE_BYTES:
            raise NoSpace(f"store {self.store.path}: no space left on device")

    def _recent_disk_free(self) -> int:
        """The disk's free bytes as read at most DISK_FREE_AGE ago and since the last commit
        (the batch's bytes are counted apart, and only a commit writes them): a statvfs for
        every small file stored was a twentieth of the work of storing it."""
        now = time.monotonic()
        if now - self._free_read_at > DISK_FREE_AGE or self._free_read_at < self._last_commit:
            self._free_read, self._free_read_at = self._disk_free(), now
        return self._free_read

    def _disk_free(self) -> int:
        st = os.statvfs(self.store.path)
        return st.f_bavail * st.f_frsize

    def drop(self, ino: int) -> None:
        """Forget a file's buffered writes (it was deleted)."""
        dirty = self.buffers.take(ino)
        if dirty is not None:
            self.buffers.pool.give_back(dirty.ranges.values())
        self.errors.pop(ino, None)

    def take_error(self, ino: int) -> int | None:
        return self.errors.pop(ino, None)

    async def flush_all(self) -> None:
        for ino in list(self.buffers.files):
            await self.flush(ino)

    async def drain(self) -> None:
        """Store every buffered byte, waiting for flushes already under way too (a snapshot
        must include them). Ends once writers are held back (the snapshot's write gate)."""
        while self.buffers.files or self.flushing:
            for ino in list(self.buffers.files) + list(self.flushing):
                await self.flush(ino)

    async def relieve_pressure(self) -> None:
        """Flush the largest files until the buffers are under half their limit."""
        while self.pending_total > self.buffers.limit_bytes // 2:
            ino = self.buffers.largest()
            if ino is None:
                return
            await self.flush(ino)

    def commit(self, durable: bool = False) -> None:
        """Commit everything applied so far: safe from a crash of this process at once, and
        from a power loss once ``durable`` (fsync) asks for the meta page too."""
        try:
            self.store.commit_batch(durable)
        finally:
            if not self.store.in_batch:
                self.store.begin_batch()
            self._batch_bytes = 0
            self._batch_inodes = set()
            self._last_commit = time.monotonic()

    def commit_soon(self) -> None:
        """Commit what is applied so far on the store's commit thread and go on (see the
        module docstring); a failed commit is reported to each file that had data in it."""
        if self._nursery is None or not self.store.commit_thread:
            self.commit()
            return
        if self._committing is not None and not self._committing.done():
            return  # one at a time: the next flush or tick commits what came meanwhile
        future = self.store.commit_batch_async()
        self._committing = future
        inodes, self._batch_inodes = self._batch_inodes, set()
        self._batch_bytes = 0
        self._last_commit = time.monotonic()
        self._nursery.start_soon(self._commit_ended, future, inodes)

    async def _commit_ended(self, future: Future, inodes: set[int]) -> None:
        await wait_future(future)
        self._free_read_at = -math.inf  # a reading taken meanwhile missed the commit's pages
        exc = future.exception()
        if exc is not None:
            log.error("committing the store failed: %s", exc)
            code = exc.errno if isinstance(exc, CasfsError) and exc.errno else errno.EIO
            for ino in inodes:
                self.errors[ino] = code
        try:
            self.store.settle()  # take the next batch now, unless a store user did
        except Exception as again:
            if again is not exc:  # the failure itself is reported above, to the files it lost
                log.exception("taking the next batch failed")

    async def committed(self, shield: bool = False) -> None:
        """Wait, without blocking the loop, for a commit_soon commit in progress."""
        while (future := self._committing) is not None and not future.done():
            await wait_future(future, shield)

    async def run(self) -> None:
        """Background flushes and the timer; runs for the life of the mount."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._timer)
                nursery.start_soon(self._store_small_files)
        finally:
            self._nursery = None  # later flushes (unmounting) start nothing here

    async def _timer(self) -> None:
        while True:
            await trio.sleep(FLUSH_AGE / 2)
            for ino in self.buffers.older_than(FLUSH_AGE):
                await self.flush(ino)
            self.buffers.pool.trim()
            if time.monotonic() - self._last_commit >= COMMIT_INTERVAL:
                try:
                    self.commit_soon()
                except CasfsError as exc:
                    log.error("committing the store failed: %s", exc)
