"""Exceptions shared by every layer. Each carries an errno so the mount can answer the kernel
and a one-line message so the CLI can answer a person."""

from __future__ import annotations

import errno as _errno
import os


class CasfsError(Exception):
    """An expected failure: the CLI prints ``str(exc)`` as one line and exits non-zero."""

    errno: int = _errno.EIO

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class StoreError(CasfsError):
    """The store directory or its database cannot be used as asked."""


class StoreInUse(StoreError):
    errno = _errno.EBUSY


class CorruptObject(StoreError):
    """A stored object failed its digest check (or could not be decoded)."""

    errno = _errno.EIO

    def __init__(self, digest: bytes, detail: str) -> None:
        super().__init__(f"corrupt object {digest.hex()}: {detail}")
        self.digest = digest


class NoSpace(StoreError):
    errno = _errno.ENOSPC


class FsError(CasfsError):
    """A filesystem operation failed with a POSIX errno (ENOENT, EEXIST, ...)."""

    def __init__(self, errno: int, detail: str = "") -> None:
        text = os.strerror(errno)
        super().__init__(f"{text}: {detail}" if detail else text, errno)
