"""One writer per store: an exclusive ``flock`` on ``casfs.lock`` holding the owner's PID.

``flock`` belongs to the open file description, so it is released by the kernel when the
owner dies (even by ``kill -9``) and passes to a daemon child across ``fork``.
"""

from __future__ import annotations

import errno
import fcntl
import os

from casfs.errors import StoreError, StoreInUse


class WriterLock:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, what: str) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StoreError(f"cannot open lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                who = f"PID {holder}" if holder else "another process"
                raise StoreInUse(f"store {what} is in use by {who}") from None
            raise StoreError(f"cannot lock {self.path}: {exc.strerror}") from None
        self._fd = fd
        self.record_pid()

    def record_pid(self, pid: int | None = None) -> None:
        """Write the holder's PID (again after a daemonizing fork)."""
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{pid or os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def holder(path: str) -> int | None:
        """PID of the live holder of the lock at ``path``, or None when nobody holds it."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return _read_pid(fd) or -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
