"""The mount's control socket: how ``casfs snapshot``, ``diff``, ``rollback`` and ``restore``
reach a running mount (the one writer of its store).

A Unix socket ``control.sock`` in the store directory. The directory is 0700, and the server
also checks the caller's uid (``SO_PEERCRED``): only root and the mount's owner get an
answer. One request per connection: a JSON object with an ``op`` and its arguments, answered
by one JSON line ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": ..., "errno":
...}``; a long operation (import) sends ``{"progress": ...}`` lines before it. Names and
paths travel as ``os.fsdecode`` strings, so any bytes survive.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio

from casfs.errors import CasfsError
from casfs.fuse import importservice
from casfs.tree import snapshots
from casfs.workflows.selection import Selection

if TYPE_CHECKING:
    from casfs.fuse.operations import CasfsOperations

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 16
_UCRED = struct.Struct("3i")  # pid, uid, gid


def _name(text: str) -> bytes:
    return os.fsencode(text)


class ControlServer:
    def __init__(self, ops: CasfsOperations) -> None:
        self.ops = ops
        self.handlers: dict[str, Callable[[dict], Awaitable[Any]]] = {
            "snapshot.create": self._create,
            "snapshot.delete": self._delete,
            "snapshot.list": self._list,
            "diff": self._diff,
            "rollback": self._rollback,
            "restore": self._restore,
        }
        # operations that report progress: called with the request and a sender of lines
        self.streaming: dict[str, Callable[[dict, Callable[[dict], Awaitable[None]]], Awaitable]]
        self.streaming = {"import": self._import}

    async def serve(self, listener: socket.socket) -> None:
        """Answer requests on ``listener`` (from :func:`listen`) until cancelled."""
        sock = trio.socket.from_stdlib_socket(listener)
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await sock.accept()
                nursery.start_soon(self._answer, conn)

    async def _answer(self, conn: trio.socket.SocketType) -> None:
        """Serve one connection; nothing that goes wrong here may end the mount."""
        stream = trio.SocketStream(conn)
        try:
            try:
                reply = await self._handle(conn, stream)
            except Exception as exc:
                log.exception("control request failed")
                reply = {"ok": False, "error": f"internal error: {exc!r}", "errno": errno.EIO}
            await stream.send_all(json.dumps(reply).encode() + b"\n")
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        finally:
            await stream.aclose()

    async def _handle(self, conn: trio.socket.SocketType, stream: trio.SocketStream) -> dict:
        data = b""
        while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
            more = await stream.receive_some(MAX_REQUEST)
            if not more:
                break
            data += more
        # Checked once the request is read: answering and closing before the client has sent
        # it would hand the client EPIPE instead of the answer.
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        _, uid, _ = _UCRED.unpack(creds)
        if uid not in (0, os.getuid()):
            return {"ok": False, "error": "permission denied", "errno": errno.EACCES}
        try:
            request = json.loads(data)
            op = request["op"]
            if op not in self.streaming:
                handler = self.handlers[op]
        except (ValueError, KeyError, TypeError):
            return {"ok": False, "error": "malformed request", "errno": errno.EINVAL}

        async def send(line: dict) -> None:
            await stream.send_all(json.dumps(line).encode() + b"\n")

        try:
            if op in self.streaming:
                return {"ok": True, "result": await self.streaming[op](request, send)}
            return {"ok": True, "result": await handler(request)}
        except CasfsError as exc:
            return {"ok": False, "error": str(exc), "errno": exc.errno}
        finally:  # the command returns once the kernel holds no name it removed
            await self.ops.snapshots.settle()

    # -- operations -------------------------------------------------------------------------

    async def _create(self, r: dict) -> dict:
        return snapshots.describe(await self.ops.snapshots.create(_name(r["name"])))

    async def _delete(self, r: dict) -> dict:
        return snapshots.describe(await self.ops.snapshots.delete(_name(r["name"])))

    async def _list(self, r: dict) -> list[dict]:
        return [snapshots.describe(s, held) for s, held in await self.ops.snapshots.listing()]

    async def _diff(self, r: dict) -> list[dict]:
        changes = await self.ops.snapshots.diff(_name(r["old"]), _name(r["new"]))
        return [c.describe() for c in changes]

    async def _rollback(self, r: dict) -> None:
        await self.ops.snapshots.rollback(_name(r["name"]))

    async def _import(self, r: dict, send: Callable[[dict], Awaitable[None]]) -> dict:
        selection = Selection.from_request(r)
        result = await importservice.run_import(
            self.ops, r["src"], _name(r["name"]), selection, send
        )
        return result.describe()

    async def _restore(self, r: dict) -> None:
        dest = _name(r["dest"]) if r.get("dest") is not None else None
        await self.ops.snapshots.restore(_name(r["name"]), _name(r["path"]), dest, r["force"])
