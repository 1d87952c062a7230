"""``casfs import`` into a mounted store: the import runs inside the mount, its one writer.

The importer (:mod:`casfs.workflows.importer`) runs in a worker thread: reading the source,
cutting and compressing never hold up the mount. Every transaction it needs hops to the
mount's thread (``trio.from_thread``), where it joins the mount's group commit like any
request. The snapshot record is made under the snapshot lock, as ``casfs snapshot`` does.

Progress goes back to the client as it happens; when the client goes away (Ctrl-C), the
import stops at the next file and gives back what it held.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

import trio

from casfs.errors import CasfsError
from casfs.store.store import Tx
from casfs.tree import snapshots
from casfs.workflows.importer import Access, Importer, ImportResult, Progress
from casfs.workflows.selection import Selection

if TYPE_CHECKING:
    from casfs.fuse.operations import CasfsOperations

log = logging.getLogger(__name__)
T = TypeVar("T")

# Commit the mount's batch after an import step once it holds this much: an import would
# otherwise grow one batch to the size of everything it stores.
COMMIT_BYTES = 32 << 20


async def run_import(
    ops: CasfsOperations,
    src: str,
    name: bytes,
    selection: Selection,
    send: Callable[[dict], Awaitable[None]],
) -> ImportResult:
    store = ops.store
    with store.read() as tx:
        snapshots.check_free(tx, name)
    gone = False  # the client went away: stop

    def read(fn: Callable[[Tx], T]) -> T:
        def run() -> T:
            with store.read() as tx:
                return fn(tx)

        return trio.from_thread.run_sync(run)

    def write(fn: Callable[[Tx], T]) -> T:
        def run() -> T:
            result = store.run_write(fn)
            if store.batch_written > COMMIT_BYTES:
                ops.flusher.commit()
            return result

        return trio.from_thread.run_sync(run)

    def progress(p: Progress) -> None:
        nonlocal gone
        line = {"progress": {**p.__dict__, "path": p.path.decode(errors="replace")}}
        try:
            trio.from_thread.run(send, line)
        except Exception:  # noqa: BLE001 - any failure to send means the client is gone
            gone = True

    importer = Importer(
        store,
        Access(read, write),
        ops.fs.pipeline,
        src,
        selection=selection,
        progress=progress,
        cancelled=lambda: gone,
    )
    try:
        await trio.to_thread.run_sync(importer.run)
        async with ops.snapshots.lock:
            await trio.to_thread.run_sync(importer.record, name)
            ops.flusher.commit(durable=True)
            # the commit packed the last small chunks: only now is the growth known
            await trio.to_thread.run_sync(importer.measure_new_bytes)
    except BaseException:
        with trio.CancelScope(shield=True):
            try:
                await trio.to_thread.run_sync(importer.abort)
            except CasfsError:
                log.exception("could not give back an aborted import's references")
        raise
    log.info("imported %s as snapshot %r", src, name)
    return importer.result
