"""Serving a store at a mountpoint: set-up, the trio request loop, clean shutdown.

Order of events: open the store (taking its writer lock), free the orphans a crash left,
mount, report ready, serve until unmounted or signalled, then flush every buffered write,
commit, and close. SIGTERM and SIGINT unmount cleanly; an external ``fusermount3 -u`` ends the
loop the same way.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable

import pyfuse3
import trio

from casfs.fuse import control, controlsocket
from casfs.fuse.mountpoint import tune_readahead
from casfs.fuse.operations import CasfsOperations, MountOptions
from casfs.store.store import Store
from casfs.tree import snapshots
from casfs.tree.fs import Filesystem

log = logging.getLogger(__name__)


def fuse_options(store: Store, options: MountOptions) -> set[str]:
    opts = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    opts |= {"fsname=" + store.path.replace(",", "\\,"), "subtype=casfs"}
    if options.allow_other:
        opts.add("allow_other")
    if options.debug:
        opts.add("debug")
    return opts


def serve(
    store_path: str,
    mountpoint: str,
    options: MountOptions,
    ready: Callable[[], None] | None = None,
) -> None:
    """Mount ``store_path`` at ``mountpoint`` and serve until unmounted. Raises CasfsError
    (one clear line) when the store or the mountpoint cannot be used."""
    store = Store(store_path)
    fs = Filesystem(store, cache_bytes=options.cache_bytes)
    try:
        freed = fs.free_orphans()
        if freed:
            log.info("freed %d orphaned inode(s) left by an unclean shutdown", freed)
        pins = store.run_write(lambda tx: snapshots.drop_pins(tx, store))
        if pins:
            log.info("released %d pin(s) on deleted snapshots' files left by the last mount", pins)
        ops = CasfsOperations(fs, store, options)
        listener = controlsocket.listen(store.path)
        try:
            pyfuse3.init(ops, mountpoint, fuse_options(store, options))
        except BaseException:
            listener.close()
            controlsocket.remove_socket(store.path)
            raise
        log.info("mounted %s at %s", store.path, mountpoint)
        unmount = True
        try:
            store.use_commit_thread()
            store.begin_batch()
            if ready:
                ready()
            unmount = trio.run(_loop, ops, mountpoint, listener)
        finally:
            listener.close()
            controlsocket.remove_socket(store.path)
            pyfuse3.close(unmount=unmount)
            store.commit_batch()
            log.info("unmounted %s", mountpoint)
    finally:
        fs.close()
        store.close()


async def _raise_readahead(mountpoint: str) -> None:
    """Raise the mount's read-ahead once the kernel has our answer to INIT, which caps it at
    what the kernel offered (so setting it earlier is undone). A stat of the mount returns
    only after that answer; it runs in a thread because this loop must serve it."""
    try:
        await trio.to_thread.run_sync(os.stat, mountpoint, abandon_on_cancel=True)
    except OSError:
        return
    if not tune_readahead(mountpoint):
        log.info("could not raise the mount's read-ahead (not root?); reads stay at 128 KiB")


async def _loop(ops: CasfsOperations, mountpoint: str, listener: socket.socket) -> bool:
    """Serve requests; returns True when the loop ended by a signal (we must unmount)."""
    signalled = False
    async with trio.open_nursery() as nursery:

        async def on_signal() -> None:
            nonlocal signalled
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                async for signum in sigs:
                    log.info("got signal %d: unmounting", signum)
                    signalled = True
                    pyfuse3.terminate()
                    return

        nursery.start_soon(on_signal)
        nursery.start_soon(ops.flusher.run)
        nursery.start_soon(control.ControlServer(ops).serve, listener)
        nursery.start_soon(_raise_readahead, mountpoint)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    await ops.flusher.flush_all()
    ops.flusher.commit(durable=True)
    return signalled
