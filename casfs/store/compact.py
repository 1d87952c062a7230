"""Offline compaction: rewrite a store's LMDB file so it gives freed space back to the disk.

Why
    LMDB never shrinks its data file. Pages freed by a delete go on LMDB's freelist and are
    reused by later writes, but the file keeps its high-water mark: a store that once held
    40 GiB and now holds 4 GiB still takes 40 GiB of disk. LMDB's compacting copy
    (``mdb_env_copy`` with ``MDB_CP_COMPACT``) writes only the live pages, renumbered from
    the start, so the copy is exactly as large as the data it holds. :func:`compact` makes
    that copy and puts it in place of the old file.

Safety
    The store's writer lock is taken by opening it as :class:`~casfs.store.store.Store` does
    (a mounted store fails with the usual one-line "store ... is in use by PID N"), so nothing
    writes while the copy is made. The copy goes to ``STORE/compact.tmp/data.mdb`` (the same
    filesystem, so the final rename is atomic), is fsynced, then opened as LMDB and checked:
    the same number of entries in every database, the same ``meta`` rows (format, uuid,
    statistics counters) and the same first and last row of every database. Only then is it
    renamed over ``data.mdb`` and the directory fsynced. A failure before the rename leaves
    the old file untouched and the copy removed; a crash at any point leaves either the old
    file or the new one, whole, plus perhaps a ``compact.tmp`` that the next compaction
    removes (a store opens fine with it present).

The lock file
    ``lock.mdb`` caches the last transaction id, and a compacted copy starts again at
    transaction 1. LMDB rebuilds ``lock.mdb`` whenever a process opens the environment while no
    other process has it open (it holds an exclusive ``fcntl`` lock on the file's first byte to
    tell); otherwise it trusts the cached id, which would pick the wrong meta page of the new
    file. So compaction refuses (:class:`~casfs.errors.StoreInUse`) while any other process has
    the environment open (a read-only ``casfs stats``, say), holds that ``fcntl`` lock itself
    across the rename, and rebuilds the lock table from the new file by opening it once in this
    process before letting go. An opener that arrives meanwhile waits on the lock.

Disk and size
    The compacted size is known exactly beforehand: the branch, leaf and overflow pages of
    every database plus two meta pages. Compaction fails early with :class:`NoSpace` when the
    disk has less free space than that. Sizes in :class:`CompactResult` are the space the data
    file takes on disk (``st_blocks * 512``), which is what compaction is for; it is close to
    ``st_size`` for an LMDB file, which has no holes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import lmdb

from casfs.errors import CasfsError, NoSpace, StoreError, StoreInUse
from casfs.store import layout
from casfs.store.store import Store, _lmdb_failure, used_pages

TEMP_DIR = "compact.tmp"  # inside the store directory; holds the copy's data.mdb
DATA_FILE = "data.mdb"
LMDB_LOCK_FILE = "lock.mdb"
POLL_SECONDS = 0.2  # how often progress is reported while LMDB copies
SPACE_SLACK = 1 << 20  # free space wanted beyond the copy itself (filesystem metadata)

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class CompactResult:
    """Disk space of ``data.mdb`` (``st_blocks * 512``) before and after, and the wall time."""

    before_bytes: int
    after_bytes: int
    seconds: float

    @property
    def freed_bytes(self) -> int:
        return self.before_bytes - self.after_bytes


@dataclass(frozen=True)
class _Census:
    """What a faithful copy must hold the same of: entries per database (``None`` is the main
    database, whose rows are the named databases), every ``meta`` row, and each database's
    first and last row."""

    entries: dict[bytes | None, int]
    meta: dict[bytes, bytes]
    ends: dict[bytes, tuple[tuple[bytes, bytes] | None, tuple[bytes, bytes] | None]]


def compact(path: str, progress: ProgressFn | None = None) -> CompactResult:
    """Rewrite the store at ``path`` with only its live pages; see the module docstring.

    ``progress(done_bytes, total_bytes)`` is called from this thread about every
    :data:`POLL_SECONDS` while the copy is written, and once more with ``done == total`` when
    it is complete. Raises :class:`~casfs.errors.CasfsError` subclasses with one-line messages.
    The calling process must not have the store open itself (other processes are detected).
    """
    started = time.monotonic()
    store = Store(path)  # the writer lock, the marker and the databases, checked
    path = store.path
    tmp = os.path.join(path, TEMP_DIR)
    data = os.path.join(path, DATA_FILE)
    try:
        try:
            _remove_temp(tmp)  # left by a compaction that was interrupted
            before = _disk_bytes(data)
            census = _copy(store, tmp, progress)
            _verify(os.path.join(tmp, DATA_FILE), census, path)
            with store.map_users.exclusive():  # no mapping of the old file may outlive the rename
                store.env.close()
                store.env = None
            _swap(path, tmp, census)
            _remove_temp(tmp, quiet=True)  # now empty; a later compaction removes it if need be
            _fsync_dir(path)
            after = _disk_bytes(data)
        except lmdb.Error as exc:
            raise _lmdb_failure(exc, path) from None
        except OSError as exc:
            raise _os_failure(exc, path) from None
    except BaseException:
        _remove_temp(tmp, quiet=True)  # the copy, if the rename did not happen
        raise
    finally:
        store.close()
    return CompactResult(before, after, time.monotonic() - started)


# -- the copy --------------------------------------------------------------------------------


def _copy(store: Store, tmp: str, progress: ProgressFn | None) -> _Census:
    """Write the compacted copy to ``tmp/data.mdb`` and fsync it. Returns the census of the
    snapshot copied."""
    env = store.env
    txn = env.begin()
    try:
        census = _take_census(txn, store.dbs)
        total = _compacted_size(env, txn, store.dbs, census)
        _check_space(store.path, total)
        os.mkdir(tmp, 0o700)
        old = os.stat(os.path.join(store.path, DATA_FILE))
        target = os.path.join(tmp, DATA_FILE)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, old.st_mode & 0o7777)
            try:
                os.fchown(fd, old.st_uid, old.st_gid)
            except OSError:
                pass  # not ours to give away; the mode is what matters
            _copy_with_progress(env, txn, fd, total, progress)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(tmp)
    finally:
        txn.abort()
    return census


def _copy_with_progress(
    env: lmdb.Environment,
    txn: lmdb.Transaction,
    fd: int,
    total: int,
    progress: ProgressFn | None,
) -> None:
    """``env.copyfd(fd, compact=True)`` in a thread (py-lmdb releases the GIL and has no
    callback), reporting the growing file size. The thread is always waited for: the
    environment and transaction it reads must outlive it, even on Ctrl-C."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            env.copyfd(fd, compact=True, txn=txn)
        except BaseException as exc:  # handed to the calling thread
            failure.append(exc)

    worker = threading.Thread(target=run, name="casfs-compact")
    worker.start()
    try:
        while True:
            worker.join(POLL_SECONDS)
            if not worker.is_alive():
                break
            if progress is not None:
                progress(min(os.fstat(fd).st_size, total), total)
    finally:
        while worker.is_alive():
            try:
                worker.join()
            except KeyboardInterrupt:
                pass  # the copy cannot be stopped; its file is removed once it ends
    if failure:
        raise failure[0]
    if progress is not None:
        progress(total, total)


def _take_census(txn: lmdb.Transaction, dbs: dict) -> _Census:
    entries: dict[bytes | None, int] = {None: txn.stat()["entries"]}
    ends = {}
    for name in layout.DB_NAMES:
        db = dbs[name]
        entries[name] = txn.stat(db)["entries"]
        cur = txn.cursor(db)
        first = cur.item() if cur.first() else None
        last = cur.item() if cur.last() else None
        ends[name] = (first, last)
    meta = {bytes(k): bytes(v) for k, v in txn.cursor(dbs[b"meta"])}
    return _Census(entries, meta, ends)


def _compacted_size(
    env: lmdb.Environment, txn: lmdb.Transaction, dbs: dict, census: _Census
) -> int:
    """The exact size of the compacted copy: every database's pages and two meta pages. If
    the main database names databases casfs does not know, their pages are not counted here,
    so the file's high-water mark stands in (an upper bound)."""
    psize = env.stat()["psize"]
    if census.entries[None] != len(layout.DB_NAMES):
        return (env.info()["last_pgno"] + 1) * psize
    return used_pages(txn, {name: dbs[name] for name in layout.DB_NAMES}) * psize


def _check_space(path: str, need: int) -> None:
    free = _free_bytes(path)
    if free < need + SPACE_SLACK:
        raise NoSpace(
            f"store {path}: not enough free space to compact: the copy needs "
            f"{_mib(need + SPACE_SLACK)}, the disk has {_mib(free)} free"
        )


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


# -- checking and swapping -------------------------------------------------------------------


def _verify(data_file: str, census: _Census, store_path: str) -> None:
    """Open the copy read-only (with no lock file) and compare it with the census."""
    size = os.path.getsize(data_file)
    try:
        env = lmdb.open(
            data_file,
            subdir=False,
            readonly=True,
            lock=False,
            create=False,
            map_size=max(size, 1 << 20),
            max_dbs=len(layout.DB_NAMES) + 4,
        )
        try:
            dbs = {name: env.open_db(name, create=False) for name in layout.DB_NAMES}
            with env.begin() as txn:
                copy = _take_census(txn, dbs)
        finally:
            env.close()
    except lmdb.Error as exc:
        raise StoreError(
            f"store {store_path}: the compacted copy does not open ({str(exc).strip()}); "
            "the store is unchanged"
        ) from None
    for name, n in census.entries.items():
        if copy.entries.get(name) != n:
            what = name.decode() if name is not None else "the main database"
            raise StoreError(
                f"store {store_path}: the compacted copy has {copy.entries.get(name)} entries "
                f"in {what}, not {n}; the store is unchanged"
            )
    if copy.meta != census.meta or copy.ends != census.ends:
        raise StoreError(
            f"store {store_path}: the compacted copy differs from the store; the store is unchanged"
        )


def _swap(path: str, tmp: str, census: _Census) -> None:
    """Rename the checked copy over ``data.mdb`` while no other process has the environment
    open, then rebuild ``lock.mdb`` from it."""
    lock_fd = _lock_environment(path)
    try:
        os.rename(os.path.join(tmp, DATA_FILE), os.path.join(path, DATA_FILE))
        _fsync_dir(path)
        # This process holds the lock.mdb byte LMDB tests, so LMDB takes it for exclusive and
        # rebuilds the lock table from the new file's meta page. Closing the environment
        # drops this process's fcntl locks on lock.mdb, letting waiting openers in.
        size = os.path.getsize(os.path.join(path, DATA_FILE))
        env = lmdb.open(
            path,
            readonly=True,
            create=False,
            map_size=max(size, 1 << 20),
            max_dbs=len(layout.DB_NAMES) + 4,
        )
        try:
            with env.begin() as txn:
                entries = txn.stat()["entries"]
        finally:
            env.close()
        if entries != census.entries[None]:
            raise StoreError(f"store {path}: data.mdb was replaced but does not read back")
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def _lock_environment(path: str) -> int | None:
    """Take LMDB's exclusive fcntl lock on the first byte of ``lock.mdb`` (what a process
    opening the environment takes when it is the only one). Fails with StoreInUse when any
    other process has the environment open. Returns the descriptor that holds it."""
    lock_path = os.path.join(path, LMDB_LOCK_FILE)
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return None  # no lock table yet: nobody has the environment open
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0, os.SEEK_SET)
    except OSError as exc:
        holder = _lock_holder(fd)
        os.close(fd)
        if exc.errno in (errno.EACCES, errno.EAGAIN):
            who = f"PID {holder}" if holder else "another process"
            raise StoreInUse(
                f"store {path} is in use by {who} (it has the database open)"
            ) from None
        raise
    return fd


_FLOCK = struct.Struct("hhqqi")  # struct flock on Linux: type, whence, start, len, pid


def _lock_holder(fd: int) -> int | None:
    """The PID holding a lock that conflicts with a write lock on byte 0, if the kernel says."""
    try:
        request = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 1, 0) + bytes(8)
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, request)
        kind, _whence, _start, _len, pid = _FLOCK.unpack_from(answer)
    except (OSError, struct.error):
        return None
    return pid if kind != fcntl.F_UNLCK and pid > 0 else None


# -- helpers ---------------------------------------------------------------------------------


def _remove_temp(tmp: str, quiet: bool = False) -> None:
    try:
        if os.path.isdir(tmp) and not os.path.islink(tmp):
            shutil.rmtree(tmp)
        elif os.path.lexists(tmp):
            os.unlink(tmp)
    except OSError:
        if not quiet:
            raise


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def _os_failure(exc: OSError, path: str) -> CasfsError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"store {path}: no space left on device while compacting")
    where = f" ({exc.filename})" if exc.filename else ""
    return StoreError(f"store {path}: cannot compact: {exc.strerror}{where}", exc.errno)
