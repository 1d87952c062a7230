"""Where a mount's control socket is, and its file's life: what a client needs without the
server (:mod:`casfs.fuse.control`), which runs on trio (importing trio cost ~90 ms of each
``casfs snapshot`` given a mountpoint)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

SOCKET_NAME = "control.sock"


@contextlib.contextmanager
def socket_path(store_path: str) -> Iterator[str]:
    """A path to the store's socket short enough for ``sun_path`` (108 bytes), however deep
    the store: through an open descriptor of the store directory."""
    fd = os.open(store_path, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{SOCKET_NAME}"
    finally:
        os.close(fd)


def listen(store_path: str) -> socket.socket:
    """Bind the store's control socket (before the mount reports ready, so a command run
    right after ``casfs mount`` finds it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with socket_path(store_path) as path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a mount that was killed
        sock.bind(path)
        os.chmod(path, 0o600)
    sock.listen(16)
    return sock


def remove_socket(store_path: str) -> None:
    with socket_path(store_path) as path, contextlib.suppress(OSError):
        os.unlink(path)
