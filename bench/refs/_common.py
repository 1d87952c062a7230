"""Shared start-up for the reference filesystems: same pyfuse3 options as casfs (the kernel's
``default_permissions``, no writeback cache, 1 MiB read-ahead), run in the
foreground until unmounted (``fusermount3 -u MNT``) or signalled (SIGTERM/SIGINT unmount)."""

from __future__ import annotations

import signal
import sys

import pyfuse3
import trio

from casfs.fuse.mountpoint import tune_readahead

# casfs answers with these; the references do the same so the kernel treats them alike.
ATTR_TIMEOUT = 5.0
ENTRY_TIMEOUT = 5.0
BLKSIZE = 128 << 10


def run(ops: pyfuse3.Operations, name: str) -> None:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python {sys.argv[0]} MOUNTPOINT")
    mountpoint = sys.argv[1]
    opts = set(pyfuse3.default_options) | {f"fsname={name}", f"subtype={name}"}
    pyfuse3.init(ops, mountpoint, opts)
    tune_readahead(mountpoint)  # the same 1 MiB read-ahead casfs's daemon sets
    signalled = False

    async def main() -> None:
        nonlocal signalled
        async with trio.open_nursery() as nursery:

            async def on_signal() -> None:
                nonlocal signalled
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        signalled = True
                        pyfuse3.terminate()
                        return

            nursery.start_soon(on_signal)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=signalled)
