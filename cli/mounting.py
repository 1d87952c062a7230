"""``casfs mount`` and ``casfs umount``: the daemon's life cycle seen from the command line.

``mount`` checks what it can up front (one clear line each), then forks: the child becomes
the daemon (new session, log file in the store directory) and reports "ready" or its error
over a pipe; the parent waits for that word and exits with it. No LMDB environment or thread
exists in the parent before the fork.

``umount`` unmounts with fusermount3 (so a busy mount is refused, not detached), then waits
for the daemon to flush, commit and exit: when it returns, the store is consistent on disk.
For a stale mount (the daemon was killed) it only unmounts, lazily: there is nothing to
flush, and processes that still hold files there (getting ENOTCONN) must not block it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from casfs.errors import CasfsError, StoreInUse
from casfs.fuse.mountpoint import (
    FSTYPE,
    casfs_mount_of_store,
    check_fuse_available,
    check_mountpoint,
    find_mount,
    fusermount_unmount,
    is_stale,
)
from casfs.store import layout
from casfs.store.lock import WriterLock
from casfs.store.store import Store, read_marker

LOG_FILE = "mount.log"
READY_TIMEOUT = 120.0
EXIT_TIMEOUT = 600.0


def _preflight(store: str, mountpoint: str) -> tuple[str, str]:
    check_fuse_available()
    store = os.path.abspath(store)
    read_marker(store)
    mounted = casfs_mount_of_store(store)
    if mounted is not None:
        raise StoreInUse(f"store {store} is already mounted at {mounted.target}")
    holder = WriterLock.holder(os.path.join(store, layout.LOCK_FILE))
    if holder:
        raise StoreInUse(f"store {store} is in use by PID {holder}")
    mountpoint = check_mountpoint(mountpoint)
    Store(store, writer=False).close()  # a damaged database: said here, before the daemon
    return store, mountpoint


def _setup_logging(stream_or_path: str | None, debug: bool) -> None:
    level = logging.DEBUG if debug else logging.INFO
    fmt = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    if stream_or_path is None:
        logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
    else:
        fd = os.open(stream_or_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        handler = logging.StreamHandler(os.fdopen(fd, "a", buffering=1))
        handler.setFormatter(logging.Formatter(fmt))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(level)


def mount(args: argparse.Namespace) -> int:
    from casfs.fuse.operations import MountOptions

    store, mountpoint = _preflight(args.store, args.mountpoint)
    options = MountOptions(
        write_buffer=args.write_buffer, allow_other=args.allow_other, debug=args.debug
    )
    if args.foreground:
        from casfs.fuse.mount import serve

        _setup_logging(None, args.debug)
        serve(store, mountpoint, options)
        return 0
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon
        os.close(rfd)
        code = _daemon(store, mountpoint, options, wfd)
        os._exit(code)
    os.close(wfd)
    message = _read_report(rfd, pid)
    if message != "ready":
        raise CasfsError(message)
    print(
        f"mounted {store} at {mountpoint} (daemon PID {pid}, log {os.path.join(store, LOG_FILE)})"
    )
    return 0


def _daemon(store: str, mountpoint: str, options, wfd: int) -> int:
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    _setup_logging(os.path.join(store, LOG_FILE), options.debug)
    log = logging.getLogger("casfs.daemon")

    def ready() -> None:
        os.write(wfd, b"ready\n")
        os.close(wfd)

    try:
        from casfs.fuse.mount import serve

        serve(store, mountpoint, options, ready=ready)
        return 0
    except CasfsError as exc:
        log.error("%s", exc)
        _report(wfd, str(exc))
        return 2
    except BaseException as exc:  # the daemon must report, not vanish
        log.exception("mount daemon failed")
        _report(wfd, f"mount daemon failed: {exc!r} (see {os.path.join(store, LOG_FILE)})")
        return 1


def _report(wfd: int, message: str) -> None:
    try:
        os.write(wfd, (message.replace("\n", " ") + "\n").encode())
        os.close(wfd)
    except OSError:
        pass  # already reported ready, or the parent is gone


def _read_report(rfd: int, pid: int) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    data = b""
    with os.fdopen(rfd, "rb", buffering=0) as f:
        while b"\n" not in data and time.monotonic() < deadline:
            chunk = f.read(4096)
            if not chunk:
                break
            data += chunk
    text = data.decode(errors="replace").strip()
    if text:
        return text.splitlines()[0]
    _, status = os.waitpid(pid, os.WNOHANG)
    return f"mount daemon (PID {pid}) exited without mounting (status {status})"


def umount(args: argparse.Namespace) -> int:
    target = os.path.abspath(args.mountpoint)
    entry = find_mount(target)
    if entry is None or entry.fstype != FSTYPE:
        raise CasfsError(f"{args.mountpoint} is not a casfs mount")
    stale = is_stale(entry.target)
    pid = WriterLock.holder(os.path.join(entry.source, layout.LOCK_FILE))
    fusermount_unmount(entry.target, lazy=args.lazy or stale)
    if pid and not stale:
        _wait_for_exit(pid)
    return 0


def _wait_for_exit(pid: int) -> None:
    deadline = time.monotonic() + EXIT_TIMEOUT
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if _is_zombie(pid):
            return
        time.sleep(0.05)
    raise CasfsError(
        f"unmounted, but the daemon (PID {pid}) is still flushing after {EXIT_TIMEOUT:.0f} s"
    )


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
