"""The content-addressed object store: one LMDB environment in a store directory.

Transactions
    LMDB allows one write transaction at a time, bound to the thread that began it. All writes
    go through :meth:`Store.run_write`, which runs a function inside a write transaction and
    retries it after growing the map when LMDB reports the map full. A caller that wants group
    commit (the mount) opens a *batch* with :meth:`Store.begin_batch`; operations then run in
    child transactions of the batch, so a failed operation leaves no trace, and the batch is
    made durable by :meth:`Store.commit_batch`.

Objects and refcounts
    :meth:`add_ref` stores an object on its first reference and counts the others;
    :meth:`drop_ref` frees it with its last. Both change the statistics counters in ``meta`` in
    the same transaction, so ``casfs stats`` never scans a table. Small chunks are kept in
    packs (:mod:`casfs.store.packs`), written when the outermost transaction commits.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import threading
import uuid as uuidlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import lmdb

from casfs.errors import CasfsError, CorruptObject, NoSpace, StoreError
from casfs.store import layout
from casfs.store.chunker import DEFAULT_AVG, ChunkParams, require_compiled_chunker
from casfs.store.codec import Codec, digest_of
from casfs.store.lock import WriterLock
from casfs.store.memory import MappedFile, MapUsers, tune_malloc
from casfs.store.packs import Packer, packable

T = TypeVar("T")
log = logging.getLogger(__name__)

INITIAL_MAP_SIZE = 1 << 30
# Grow the map before a write transaction once the data file uses more than this share of it,
# so a batch of writes rarely meets MapFullError (which costs an abort and a retry).
GROW_AT = 0.7
GROW_SLACK = 4 << 20  # room kept for LMDB's own pages (freelist, branch pages) at commit
DEFAULT_ZSTD_LEVEL = 3
# A commit that fails while the disk has less free space than this is reported as ENOSPC.
NEARLY_FULL_BYTES = 64 << 20
# The data file's pages are unmapped from this process (they stay cached) once it has mapped
# this many more file bytes, looked at every UNMAP_CHECK_FAULTS minor faults (each maps up to
# a 2 MiB folio of the file): see memory.MappedFile.
MAPPED_BYTES_MAX = 32 << 20
UNMAP_CHECK_FAULTS = 16


@dataclass(frozen=True)
class StoreStats:
    objects: int
    stored_bytes: int
    plain_bytes: int
    referenced_bytes: int
    inodes: int

    @property
    def compression_ratio(self) -> float:
        return self.plain_bytes / self.stored_bytes if self.stored_bytes else 1.0

    @property
    def dedup_ratio(self) -> float:
        return self.referenced_bytes / self.plain_bytes if self.plain_bytes else 1.0


class Tx:
    """A transaction with the store's databases at hand. Valid only inside its ``with`` or
    ``run_write`` body, and only on the thread that opened it.

    Counter updates (``add_u64``) are kept as deltas and written to ``meta`` once, just
    before the outermost commit: four counters per stored chunk would otherwise cost eight
    LMDB calls each. A child transaction hands its deltas to its parent when it commits and
    drops them when it aborts, like its other changes."""

    __slots__ = (
        "txn",
        "dbs",
        "write",
        "parent",
        "deltas",
        "written",
        "pending",
        "packer",
        "sealed",
        "unsealed",
        "unsealed_bytes",
    )

    def __init__(
        self,
        txn: lmdb.Transaction,
        dbs: dict[bytes, object],
        write: bool,
        parent: Tx | None = None,
        packer: Packer | None = None,
    ) -> None:
        self.txn = txn
        self.dbs = dbs
        self.write = write
        self.parent = parent
        self.packer = packer
        self.deltas: dict[bytes, int] = {}
        self.written = 0  # bytes put (keys and values): what the commit will need in the map
        self.pending: dict[bytes, bytes] = {}  # new small chunks, packed at the outer commit
        # Of an outermost one: runs of pending digests compressing in the pool, and those
        # not yet in a run (see packs.Packer.arrived).
        self.sealed: list[tuple[list[bytes], Future]] = []
        self.unsealed: list[bytes] = []
        self.unsealed_bytes = 0

    def get(self, db: bytes, key: bytes) -> bytes | None:
        return self.txn.get(key, db=self.dbs[db])

    def put(self, db: bytes, key: bytes, value: bytes) -> None:
        self.txn.put(key, value, db=self.dbs[db])
        self.written += len(key) + len(value)

    def delete(self, db: bytes, key: bytes) -> bool:
        return self.txn.delete(key, db=self.dbs[db])

    def cursor(self, db: bytes) -> lmdb.Cursor:
        return self.txn.cursor(db=self.dbs[db])

    def get_u64(self, key: bytes) -> int:
        value = self.get(b"meta", key)
        n = layout.read_u64(value) if value else 0
        tx: Tx | None = self
        while tx is not None:
            n += tx.deltas.get(key, 0)
            tx = tx.parent
        return n

    def add_u64(self, key: bytes, delta: int) -> None:
        self.deltas[key] = self.deltas.get(key, 0) + delta

    def commit(self) -> None:
        """Commit; a child's counter deltas and pending chunks pass to its parent, an
        outermost one packs its pending chunks and writes its deltas to ``meta`` first."""
        if self.parent is not None:
            self.txn.commit()
            for key, d in self.deltas.items():
                self.parent.deltas[key] = self.parent.deltas.get(key, 0) + d
            self.parent.written += self.written
            self.parent.pending.update(self.pending)
            if self.pending and self.parent.parent is None and self.packer is not None:
                self.packer.arrived(self.parent, self.pending.items())
        else:
            try:
                if self.pending and self.packer is not None:
                    self.packer.flush(self)
                for key, d in self.deltas.items():
                    if d:
                        value = self.get(b"meta", key)
                        old = layout.read_u64(value) if value else 0
                        self.put(b"meta", key, layout.u64(old + d))
            except BaseException:
                self.txn.abort()  # a failed commit must not leave the write lock taken
                raise
            self.txn.commit()
        self.deltas = {}

    def prefix(self, db: bytes, prefix: bytes, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs whose key starts with ``prefix``, from ``prefix + start`` on."""
        cur = self.cursor(db)
        if not cur.set_range(prefix + start):
            return
        for key, value in cur:
            if not key.startswith(prefix):
                return
            yield key, value


def _lmdb_failure(exc: lmdb.Error, path: str) -> CasfsError:
    """Turn an LMDB error into one clear line (and the right errno)."""
    text = str(exc).strip()
    if isinstance(exc, lmdb.MapFullError):
        return NoSpace(f"store {path}: the database map is full")
    if isinstance(exc, (lmdb.CorruptedError, lmdb.InvalidError, lmdb.PageNotFoundError)):
        return StoreError(f"store {path}: database is damaged ({text})")
    if isinstance(exc, lmdb.VersionMismatchError):
        return StoreError(f"store {path}: database was written by an incompatible LMDB ({text})")
    if "No space left" in text or "Disk quota" in text or _disk_nearly_full(path):
        # LMDB turns a short write at commit into EIO; a nearly full disk explains it.
        return NoSpace(f"store {path}: no space left on device")
    return StoreError(f"store {path}: database error ({text})")


# Disk held back for small transactions (deletes) on a full disk; see Store._hold_reserve.
RESERVE_BYTES = 1 << 20
MIN_PAGE = 4096  # a data file shorter than two pages has no LMDB meta pages
RESERVE_TX_BYTES = 256 << 10


def _disk_nearly_full(path: str) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    avail = st.f_bavail * st.f_frsize
    return avail < NEARLY_FULL_BYTES or avail < st.f_blocks * st.f_frsize * 0.01


META_PAGES = 2  # LMDB's two meta pages at the start of the file


def used_pages(txn: lmdb.Transaction, dbs: dict[bytes, object]) -> int:
    """Pages the databases of a store use (LMDB's own free list not counted)."""
    pages = META_PAGES
    for stat in [txn.stat()] + [txn.stat(db) for db in dbs.values()]:
        pages += stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
    return pages


def read_marker(path: str) -> dict:
    """The store's marker file, checked; raises a one-line :class:`StoreError` otherwise."""
    if not os.path.exists(path):
        raise StoreError(f"store {path} does not exist", errno.ENOENT)
    if not os.path.isdir(path):
        raise StoreError(f"{path} is not a casfs store (not a directory)", errno.ENOTDIR)
    marker = os.path.join(path, layout.MARKER_FILE)
    try:
        with open(marker, encoding="utf-8") as f:
            info = json.load(f)
    except FileNotFoundError:
        raise StoreError(f"{path} is not a casfs store (no {layout.MARKER_FILE})") from None
    except (OSError, ValueError, RecursionError) as exc:  # (deeply nested JSON: recursion)
        reason = "nested too deep" if isinstance(exc, RecursionError) else exc
        raise StoreError(f"store {path}: {layout.MARKER_FILE} is damaged ({reason})") from None
    if not isinstance(info, dict) or not isinstance(info.get("format"), int):
        raise StoreError(f"store {path}: {layout.MARKER_FILE} is damaged (no format version)")
    if info["format"] != layout.FORMAT_VERSION:
        raise StoreError(
            f"store {path} has format version {info['format']}; this casfs reads version "
            f"{layout.FORMAT_VERSION}"
        )
    return info


def overlaps(store_path: str, path: str | bytes) -> bool:
    """``path`` is the store directory, inside it, or holds it: reading or writing there
    would read or write the store itself."""
    a = os.path.realpath(store_path)
    b = os.path.realpath(os.fsdecode(path))
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a + "/")


class Reading:
    """``with store.read() as tx``. A class rather than a generator: the mount enters one a
    dozen times for every small file it stores, and a generator's context costs 3x more."""

    __slots__ = ("store", "tx")

    def __init__(self, store: Store) -> None:
        self.store = store
        self.tx: Tx | None = None  # the read-only transaction this context began

    def __enter__(self) -> Tx:
        store = self.store
        if threading.get_ident() == store._owner:
            if store._committing is not None:
                store.settle()
            if store._stack:
                return store._stack[-1]
        try:
            self.tx = store._new_tx(False)
        except lmdb.Error as exc:
            raise _lmdb_failure(exc, store.path) from None
        return self.tx

    def __exit__(self, *exc: object) -> None:
        if self.tx is not None:
            self.tx.txn.abort()
            self.tx = None


class Store:
    """An open store. ``writer=True`` takes the store's exclusive writer lock."""

    def __init__(self, path: str, *, writer: bool = True) -> None:
        require_compiled_chunker()
        tune_malloc()
        self.map_users = MapUsers()  # other threads reading the map (read_committed)
        self.path = os.path.abspath(path)
        info = read_marker(self.path)
        self.uuid: str = info.get("uuid", "")
        self.writer = writer
        self._lock = WriterLock(os.path.join(self.path, layout.LOCK_FILE)) if writer else None
        if self._lock:
            self._lock.acquire(self.path)
        data_file = os.path.join(self.path, "data.mdb")
        if not os.path.exists(data_file):
            self._release_lock()
            raise StoreError(f"store {self.path}: data.mdb is missing")
        try:
            size = os.path.getsize(data_file)
            if size < 2 * MIN_PAGE:  # LMDB would start a new, empty database in it
                raise StoreError(f"store {self.path}: data.mdb is damaged ({size} bytes long)")
            self.env = lmdb.open(
                self.path,
                map_size=max(INITIAL_MAP_SIZE, 2 * size),
                max_dbs=len(layout.DB_NAMES) + 4,
                readonly=not writer,
                create=False,
                readahead=True,  # chunk values span whole pages: read them in big I/Os
                metasync=False,  # one fdatasync per commit; see sync() for durability
                max_readers=256,
            )
            need = (self.env.info()["last_pgno"] + 1) * self.env.stat()["psize"]  # meta only
            # The size again, now: a mount may have committed (grown the file, then written
            # its meta) since the first look; a file only grows while the store is in use.
            size = os.path.getsize(data_file)
            if size < need:  # touching a page past the end would kill us (SIGBUS)
                self.env.close()
                raise StoreError(
                    f"store {self.path}: data.mdb is truncated ({size} bytes; the database "
                    f"needs {need})"
                )
            self.dbs = {name: self.env.open_db(name, create=False) for name in layout.DB_NAMES}
        except lmdb.Error as exc:
            self._release_lock()
            raise _lmdb_failure(exc, self.path) from None
        except StoreError:
            self._release_lock()
            raise
        self._owner = threading.get_ident()
        self._stack: list[Tx] = []
        self._batch: Tx | None = None
        # The commit thread (use_commit_thread): begins and commits the batch, so that the
        # owner thread may go on with work that does not touch the store meanwhile.
        self._committer: ThreadPoolExecutor | None = None
        self._committing: Future | None = None  # commit_batch_async's, until settled
        # Transactions aborted so far: what callers cached from the store may be undone
        self.aborts = 0
        self.batch_bytes = 0  # file data applied in the open batch (callers count it)
        self.packer: Packer | None = None  # set once the codec is known
        with self.read() as tx:
            fmt = tx.get_u64(layout.META_FORMAT)
            stored_uuid = (tx.get(b"meta", layout.META_UUID) or b"").decode()
            self.params = ChunkParams(
                min=tx.get_u64(layout.META_CHUNK_MIN),
                avg=tx.get_u64(layout.META_CHUNK_AVG),
                max=tx.get_u64(layout.META_CHUNK_MAX),
            )
            zstd_level = tx.get_u64(layout.META_ZSTD_LEVEL)
        if fmt != layout.FORMAT_VERSION or stored_uuid != self.uuid or not self.params.avg:
            self.close()
            raise StoreError(f"store {self.path}: database does not match its marker file")
        self.codec = Codec(zstd_level)
        self.packer = Packer(self.codec)
        self._reserve_held = False
        self._advancing = False
        self._quiet_txnid = self.env.info()["last_txnid"]  # nothing to advance past (close)
        self.mapped = MappedFile(data_file, UNMAP_CHECK_FAULTS, MAPPED_BYTES_MAX)
        if writer:
            self._hold_reserve()

    # -- life cycle -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: str,
        *,
        chunk_avg: int = DEFAULT_AVG,
        zstd_level: int = DEFAULT_ZSTD_LEVEL,
        initialize: Callable[[Tx], None] | None = None,
    ) -> Store:
        """Make a new store at ``path`` (absent or an empty directory) and open it.

        ``initialize`` runs in the first transaction (the tree layer makes its root inode
        there). The marker file is written last, so a half-made store is never taken for one.
        """
        require_compiled_chunker()
        if not 1 <= zstd_level <= 22:
            raise StoreError(f"zstd level must be 1..22, not {zstd_level}")
        path = os.path.abspath(path)
        if os.path.exists(path):
            if not os.path.isdir(path):
                raise StoreError(f"cannot create store: {path} exists and is not a directory")
            if os.listdir(path):
                raise StoreError(f"cannot create store: {path} is not empty")
            os.chmod(path, 0o700)
        else:
            parent = os.path.dirname(path)
            if not os.path.isdir(parent):
                raise StoreError(f"cannot create store: {parent} does not exist", errno.ENOENT)
            try:
                os.mkdir(path, 0o700)
            except OSError as exc:
                raise StoreError(f"cannot create store {path}: {exc.strerror}") from None
        params = ChunkParams.for_average(chunk_avg)
        store_uuid = str(uuidlib.uuid4())
        lock = WriterLock(os.path.join(path, layout.LOCK_FILE))
        lock.acquire(path)
        try:
            old_umask = os.umask(0o077)
            try:
                env = lmdb.open(path, map_size=INITIAL_MAP_SIZE, max_dbs=len(layout.DB_NAMES) + 4)
            finally:
                os.umask(old_umask)
            try:
                txn = env.begin(write=True)
                try:
                    dbs = {name: env.open_db(name, txn=txn) for name in layout.DB_NAMES}
                    tx = Tx(txn, dbs, True)
                    tx.put(b"meta", layout.META_FORMAT, layout.u64(layout.FORMAT_VERSION))
                    tx.put(b"meta", layout.META_UUID, store_uuid.encode())
                    tx.put(b"meta", layout.META_CHUNK_MIN, layout.u64(params.min))
                    tx.put(b"meta", layout.META_CHUNK_AVG, layout.u64(params.avg))
                    tx.put(b"meta", layout.META_CHUNK_MAX, layout.u64(params.max))
                    tx.put(b"meta", layout.META_ZSTD_LEVEL, layout.u64(zstd_level))
                    tx.put(b"meta", layout.META_NEXT_INO, layout.u64(layout.ROOT_INO))
                    if initialize:
                        initialize(tx)
                    tx.commit()
                except BaseException:
                    txn.abort()
                    raise
                env.sync(True)
            finally:
                env.close()
            marker = {"format": layout.FORMAT_VERSION, "uuid": store_uuid, "kind": "casfs"}
            tmp = os.path.join(path, layout.MARKER_FILE + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(marker, f)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, os.path.join(path, layout.MARKER_FILE))
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except lmdb.Error as exc:
            raise _lmdb_failure(exc, path) from None
        except OSError as exc:
            raise StoreError(f"cannot create store {path}: {exc.strerror}", exc.errno) from None
        finally:
            lock.release()
        return cls(path)

    def _release_lock(self) -> None:
        if self._lock:
            self._lock.release()

    def close(self) -> None:
        if getattr(self, "_committing", None) is not None:
            self.settle()
        if self._batch is not None:
            self.commit_batch()
        env = getattr(self, "env", None)
        quiet = getattr(self, "_quiet_txnid", None)  # None: not opened all the way
        if env is not None and self.writer and quiet not in (None, env.info()["last_txnid"]):
            # What this process's last commit freed is reusable only from the second commit
            # after it: without one more, the next writer (tonight's import, the next mount)
            # cannot reuse it and grows the file by as much (a refs table's worth per import,
            # 5.3 % of nine Django releases' store). A store that only read is left as it was.
            try:
                self.advance()
            except CasfsError as exc:  # the commits before are safe; only the reuse waits
                log.warning("store %s: could not commit once more at close: %s", self.path, exc)
        if env is not None:
            with self.map_users.exclusive():
                env.close()
                self.env = None
        if getattr(self, "_committer", None) is not None:
            self._committer.shutdown()
            self._committer = None
        self._release_lock()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions -----------------------------------------------------------------------

    def _new_tx(self, write: bool, parent: Tx | None = None) -> Tx:
        try:
            txn = self.env.begin(write=write, parent=parent.txn if parent else None)
        except lmdb.MapResizedError:
            # Another process grew the map: adopt its size and try again.
            with self.map_users.exclusive():
                self.env.set_mapsize(0)
            txn = self.env.begin(write=write, parent=parent.txn if parent else None)
        return Tx(txn, self.dbs, write, parent, self.packer)

    def read(self) -> Reading:
        """A transaction to read in: the open write transaction when this thread has one (so
        the writer sees its own uncommitted changes), else a fresh read-only snapshot."""
        return Reading(self)

    def run_write(self, fn: Callable[[Tx], T]) -> T:
        """Run ``fn(tx)`` in a write transaction and commit it (durably unless in a batch).

        Nested calls join the running transaction. When the map is full, the transaction is
        aborted, the map grown and ``fn`` run again, so ``fn`` must not have effects outside
        the transaction that a second run would repeat wrongly.
        """
        if not self.writer:
            raise StoreError(f"store {self.path} is open read-only", errno.EROFS)
        if self._committing is not None:
            self.settle()
        if len(self._stack) > (self._batch is not None):  # inside another operation: join it
            return fn(self._stack[-1])
        for _attempt in range(8):
            self._grow_if_needed()
            tx = self._new_tx(True, self._batch)
            self._stack.append(tx)
            try:
                result = fn(tx)
            except lmdb.MapFullError:
                self._abort_top()
                self._grow(force=True)
                continue
            except lmdb.Error as exc:
                self._abort_top()
                raise _lmdb_failure(exc, self.path) from None
            except BaseException:
                self._abort_top()
                raise
            self._stack.pop()
            try:
                self._commit_top(tx)
            except lmdb.MapFullError:
                self._grow(force=True)
                continue
            except lmdb.Error as exc:
                failure = _lmdb_failure(exc, self.path)
                if self._batch is not None:
                    self.abort_batch()
                elif isinstance(failure, NoSpace):
                    if tx.written <= RESERVE_TX_BYTES and self._give_up_reserve():
                        continue  # a delete or rename on a full disk: the reserve makes room
                    if self.advance():
                        continue  # pages the last commit freed are usable now
                raise failure from None
            if not self._reserve_held and self._batch is None:
                self._hold_reserve()
            return result
        raise NoSpace(f"store {self.path}: the database map cannot grow")

    def _commit_top(self, tx: Tx) -> None:
        """Commit run_write's transaction. One that fails to commit is gone, as if aborted:
        it counts as an abort, so what was learned from it (an inode it wrote, say) is
        forgotten before ``fn`` runs again."""
        try:
            tx.commit()
        except BaseException:
            self.aborts += 1
            raise
        if self._batch is None:
            self.sync()  # a transaction of its own is durable when run_write returns
            self.mapped.touched()

    def _abort_top(self) -> None:
        """Abort run_write's transaction (a child of the batch, or one of its own)."""
        self._stack.pop().txn.abort()
        self.aborts += 1

    def use_commit_thread(self) -> None:
        """Begin and commit batches on a thread of their own from now on, so that
        :meth:`commit_batch_async` can commit while this (the owner) thread goes on. LMDB
        ties its write lock to the thread that began the transaction and frees it at commit
        or abort on that same thread; the batch's child transactions and puts stay on the
        owner thread, one thread at a time. Call with no batch open."""
        assert self._batch is None and self._committer is None
        self._committer = ThreadPoolExecutor(1, thread_name_prefix="casfs-commit")

    def _on_committer(self, fn: Callable[[], T]) -> T:
        if self._committer is None:
            return fn()
        return self._committer.submit(fn).result()

    def begin_batch(self) -> None:
        """Start group commit: later writes run in child transactions of one batch, made
        durable together by :meth:`commit_batch`. Reads on this thread see the batch."""
        if self._committing is not None:
            self.settle()
        assert self._batch is None and not self._stack
        self._grow_if_needed()
        self.batch_bytes = 0
        self._batch = self._on_committer(lambda: self._new_tx(True))
        self._stack.append(self._batch)

    def commit_batch_async(self) -> Future:
        """Commit the open batch on the commit thread (not durably; see commit_batch) and
        begin the next one there; returns at once. Until :meth:`settle`, this thread must not
        touch the store: :meth:`read`, :meth:`run_write` and the batch calls settle first
        (waiting for the commit), so a caller that forgot only waits. A failed commit loses
        the batch, as in commit_batch; its error is raised by settle."""
        if self._committing is not None:
            self.settle()
        assert self._committer is not None and self._batch is not None
        if _disk_nearly_full(self.path):  # commit_batch then moves LMDB on: do it here
            self.commit_batch(durable=False)
            self.begin_batch()
            done: Future = Future()
            done.set_result(None)
            return done
        batch, self._batch = self._batch, None
        self._stack.clear()

        def commit_and_begin() -> Tx:
            try:
                batch.commit()
            except lmdb.Error as exc:
                batch.txn.abort()
                raise _lmdb_failure(exc, self.path) from None
            return self._new_tx(True)

        self._committing = self._committer.submit(commit_and_begin)
        return self._committing

    @property
    def committing(self) -> bool:
        return self._committing is not None

    @property
    def commit_thread(self) -> bool:
        return self._committer is not None

    def settle(self) -> None:
        """Wait for commit_batch_async's commit and take the batch it began (or, when the
        commit failed, begin one here and raise the failure)."""
        future, self._committing = self._committing, None
        if future is None:
            return
        try:
            batch = future.result()
        except BaseException as exc:
            self.aborts += 1
            if isinstance(exc, NoSpace):
                self.advance()  # so that the next try may use what the last commit freed
            self.begin_batch()
            raise
        self.batch_bytes = 0
        self._batch = batch
        self._stack = [batch]
        self.mapped.touched()

    def commit_batch(self, durable: bool = True) -> None:
        """Commit the open batch, if any. The data pages are always flushed to disk;
        ``durable`` also flushes the meta page that makes the commit survive a power loss
        (a process crash never loses a commit)."""
        if self._committing is not None:
            self.settle()
        batch = self._batch
        if batch is None:
            if durable:
                self.sync()
            return
        self._batch = None
        self._stack.clear()
        try:
            self._on_committer(batch.commit)
            if durable:
                self.sync()
            self.mapped.touched()
            if _disk_nearly_full(self.path):
                self.advance()  # what this batch freed is then usable by the next one
        except lmdb.Error as exc:
            self.aborts += 1
            self._on_committer(batch.txn.abort)
            failure = _lmdb_failure(exc, self.path)
            if isinstance(failure, NoSpace):
                self.advance()  # so that the next try may use what the last commit freed
            raise failure from None

    def abort_batch(self) -> None:
        self.aborts += 1
        if self._batch is not None:
            self._on_committer(self._batch.txn.abort)
            self._batch = None
            self._stack.clear()

    @property
    def in_batch(self) -> bool:
        """A batch is open (or committing, with the next one begun when it ends)."""
        return self._batch is not None or self._committing is not None

    @property
    def batch_written(self) -> int:
        """Bytes the open batch has put so far (what its commit will write)."""
        return self._batch.written if self._batch is not None else 0

    def _grow_if_needed(self) -> None:
        """Grow the map before a transaction could fill it. The committed pages are LMDB's
        count; an open batch's are not, so what it has put (twice, for copy-on-write pages
        and page slack) is added: a batch must be committed while the map still has room
        for the commit itself, or all of it would be lost."""
        info = self.env.info()
        used = (info["last_pgno"] + 1) * self.env.stat()["psize"]
        if self._batch is not None:
            used += 2 * self._batch.written + GROW_SLACK
        if used > info["map_size"] * GROW_AT:
            self._grow()

    def _grow(self, force: bool = False) -> None:
        """Double the map. Needs no transaction open in this process: an open batch is
        committed first (its changes are whole operations, so that is safe), and a new one
        begun even if that commit failed."""
        reopen = self._batch is not None
        try:
            if reopen:
                self.commit_batch(durable=False)
            size = self.env.info()["map_size"]
            with self.map_users.exclusive():
                self.env.set_mapsize(size * 2)
        finally:
            if reopen and self._batch is None:
                self.begin_batch()

    def advance(self) -> bool:
        """Commit a one-key transaction. LMDB reuses the pages a commit freed only from the
        second commit after it (a reader may still be looking at the one before), so on a
        full disk, where nothing else can commit, the space that deletes freed inside the
        file would never come back. A small commit moves LMDB on (it may take the reserve).
        Returns whether it committed."""
        if self._advancing or self._batch is not None:
            return False
        self._advancing = True
        try:
            self.run_write(lambda tx: tx.add_u64(layout.META_COMMITS, 1))
            self._quiet_txnid = self.env.info()["last_txnid"]
            return True
        except NoSpace:
            return False
        finally:
            self._advancing = False

    def free_inside(self) -> int:
        """Bytes of the data file's pages that no database uses (freed, reused by later
        writes): a full disk has this much room for casfs."""
        with self.read() as tx:
            pages = used_pages(tx.txn, self.dbs)
        info = self.env.info()
        return max(0, (info["last_pgno"] + 1 - pages) * self.env.stat()["psize"])

    def _hold_reserve(self) -> None:
        """Keep RESERVE_BYTES of the disk in a file of the store's. LMDB writes every change
        to new pages, so on a full disk even a delete cannot commit; the reserve is given
        up for such a small transaction (:meth:`run_write`), and taken again once there is
        room: deleting files always makes room, as on a filesystem with reserved blocks."""
        path = os.path.join(self.path, layout.RESERVE_FILE)
        try:
            if os.path.getsize(path) >= RESERVE_BYTES:
                self._reserve_held = True
                return
        except OSError:
            pass
        try:
            st = os.statvfs(self.path)
            if st.f_bavail * st.f_frsize < 4 * RESERVE_BYTES:
                return
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
            finally:
                os.close(fd)
            self._reserve_held = True
        except OSError:
            pass  # no room yet: try again after a later commit

    def _give_up_reserve(self) -> bool:
        if not self._reserve_held:
            return False
        self._reserve_held = False
        try:
            os.unlink(os.path.join(self.path, layout.RESERVE_FILE))
        except OSError:
            return False
        return True

    def sync(self) -> None:
        """Flush the data file, meta page included, to disk. The environment is opened with
        ``metasync=False``: each commit flushes its data pages, and the meta page only when
        durability is asked for, saving one fdatasync per group commit. LMDB keeps its
        integrity either way; a power loss may only undo commits not made durable."""
        try:
            self.env.sync(True)
        except lmdb.Error as exc:
            raise _lmdb_failure(exc, self.path) from None

    # -- objects and refcounts --------------------------------------------------------------

    def has_object(self, tx: Tx, digest: bytes) -> bool:
        self.mapped.touched()  # a random key: a page of the map each (see MappedFile)
        return tx.get(b"refs", digest) is not None

    def add_ref(
        self,
        tx: Tx,
        digest: bytes,
        value: bytes | None,
        plain_len: int,
        plain: bytes | memoryview | None = None,
        kind: int = layout.KIND_CHUNK,
    ) -> bool:
        """Count one more reference to ``digest``; store the object if it is new.

        The object is ``value`` (encoded) or else ``plain`` of ``kind``: a small one goes to
        a pack, a larger one is encoded here. Returns True when the object was new. With
        neither, the caller knows the object exists; a missing one then raises (it would be a
        dangling reference).
        """
        self.mapped.touched()  # a random key: a page of the map each (see MappedFile)
        ref = tx.get(b"refs", digest)
        if ref is not None:
            count, size = layout.read_ref_value(ref)
            tx.put(b"refs", digest, layout.with_count(ref, count + 1))
            tx.add_u64(layout.STAT_REFERENCED_BYTES, size)
            return False
        if value is None and plain is None:
            raise CorruptObject(digest, "referenced but not stored")
        if value is None and packable(plain_len):
            self.packer.add(tx, digest, plain, kind)  # stored bytes counted with its pack
        else:
            if value is None:
                value = self.codec.encode(plain, kind)
            tx.put(b"objects", digest, value)
            tx.put(b"refs", digest, layout.ref_value(1, plain_len))
            tx.add_u64(layout.STAT_STORED_BYTES, len(value))
        tx.add_u64(layout.STAT_OBJECTS, 1)
        tx.add_u64(layout.STAT_PLAIN_BYTES, plain_len)
        tx.add_u64(layout.STAT_REFERENCED_BYTES, plain_len)
        return True

    def drop_ref(self, tx: Tx, digest: bytes) -> bytes | None:
        """Remove one reference; free the object with its last. Returns the freed object's
        stored value (so a tree object's children can be released in turn; a packed chunk
        gives its header alone, a packed tree object a raw value), else None."""
        ref = tx.get(b"refs", digest)
        if ref is None:
            raise CorruptObject(digest, "reference dropped but none counted")
        count, size = layout.read_ref_value(ref)
        tx.add_u64(layout.STAT_REFERENCED_BYTES, -size)
        if count > 1:
            tx.put(b"refs", digest, layout.with_count(ref, count - 1))
            return None
        tx.delete(b"refs", digest)
        tx.add_u64(layout.STAT_OBJECTS, -1)
        tx.add_u64(layout.STAT_PLAIN_BYTES, -size)
        at = layout.read_packed_at(ref)
        if at is not None:
            header = layout.object_header(at[2], layout.CODEC_RAW)
            plain = b"" if at[2] == layout.KIND_CHUNK else self.packer.read(tx, digest, at, size)
            self.packer.forget(tx, digest, at, size)
            return header + plain
        value = tx.get(b"objects", digest)
        tx.delete(b"objects", digest)
        tx.add_u64(layout.STAT_STORED_BYTES, -len(value) if value else 0)
        return value if value is not None else b"\0"

    def load_value(self, tx: Tx, digest: bytes) -> bytes:
        """The stored (still encoded) value of an object; decode it with ``self.codec``,
        in a worker thread if it is large. A packed chunk comes as a raw value."""
        self.mapped.touched()
        value = tx.get(b"objects", digest)
        if value is not None:
            return value
        ref = tx.get(b"refs", digest)
        at = layout.read_packed_at(ref) if ref is not None else None
        if at is None:
            raise CorruptObject(digest, "object is missing")
        size = layout.read_ref_value(ref)[1]
        header = layout.object_header(at[2], layout.CODEC_RAW)
        return header + self.packer.read(tx, digest, at, size)

    def read_committed(self, digests: Sequence[bytes]) -> list[bytes | CorruptObject | None]:
        """Plain bytes of objects as last committed, each verified, from any thread (the
        pipeline's): a read-only transaction of that thread's own reads each value where it
        lies in LMDB's map and decodes it from there, with no copy of the stored value first
        (the owner thread's transactions copy every value they return), then unmaps its
        pages (:meth:`MappedFile.release`). None for an object it cannot see: not committed
        yet (in the open batch) or not in the store; the caller then loads it on the owner
        thread. A corrupt object comes back as its error."""
        with self.map_users.shared():
            env = self.env
            if env is None:
                return [None] * len(digests)
            try:
                txn = env.begin(buffers=True)
            except lmdb.Error:  # e.g. another process grew the map: the owner adopts it
                return [None] * len(digests)
            try:
                tx = Tx(txn, self.dbs, False, None, self.packer)
                out: list[bytes | CorruptObject | None] = []
                read: list[memoryview] = []
                for digest in digests:
                    try:
                        value = tx.get(b"objects", digest)  # a view into the map
                        if value is None:
                            out.append(self._packed_committed(tx, digest))
                        else:
                            read.append(value)
                            out.append(self.codec.decode(digest, value))
                    except CorruptObject as exc:
                        out.append(exc)
                self.mapped.release(read)  # (what its lookups map, the owner sweeps: touched)
                return out
            finally:
                txn.abort()

    def packed_if_decoded(self, tx: Tx, digest: bytes) -> bytes | None:
        """A packed object's plain bytes, verified, if its pack is decoded in memory already;
        else None. A small read finds its bytes so without a hop to the read threads, which
        costs more than slicing and verifying a few KiB."""
        return self._packed_committed(tx, digest, decoded_only=True)

    def _packed_committed(self, tx: Tx, digest: bytes, decoded_only: bool = False) -> bytes | None:
        ref = tx.get(b"refs", digest)
        at = layout.read_packed_at(ref) if ref is not None else None
        if at is None or at[0] == 0:  # missing, or packed at the open batch's commit
            return None
        if decoded_only and not self.packer.decoded(at[0]):
            return None
        plain = self.packer.read(tx, digest, at, layout.read_ref_value(ref)[1])
        if digest_of(plain) != digest:
            raise CorruptObject(digest, "content does not match its digest")
        return plain

    def object_info(self, tx: Tx, digest: bytes) -> tuple[int, int]:
        """(kind, stored bytes) of an object. A packed object accounts for its share of its
        compressed pack, by plain size."""
        ref = tx.get(b"refs", digest)
        at = layout.read_packed_at(ref) if ref is not None else None
        if at is None:
            value = self.load_value(tx, digest)
            return layout.split_object(value)[0], len(value)
        size = layout.read_ref_value(ref)[1]
        row = tx.get(b"packstat", layout.u64(at[0]))
        if row is None:
            return at[2], size  # pending: not compressed yet
        _, _, plain_bytes, stored = layout.read_packstat(row)
        return at[2], stored * size // max(1, plain_bytes)

    def load(self, tx: Tx, digest: bytes) -> bytes:
        return self.codec.decode(digest, self.load_value(tx, digest))

    def stats(self) -> StoreStats:
        with self.read() as tx:
            return StoreStats(*(tx.get_u64(key) for key in layout.STATS))

    def file_bytes(self) -> int:
        """Bytes the store's files take on disk."""
        total = 0
        for name in os.listdir(self.path):
            try:
                total += os.stat(os.path.join(self.path, name)).st_blocks * 512
            except OSError:
                pass
        return total
