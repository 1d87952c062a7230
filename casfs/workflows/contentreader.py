"""Small files of an import, read, cut and hashed ahead by a process of their own.

Importing a source tree is mostly small files, and there the time goes to Python's own work
per file (open, read, cut, hash, fstat, listxattr, a dozen objects), which holds the GIL:
threads cannot spread it, so the import's process used one core of two. A reader process
takes that work: the import sends it the paths of the small files it will read, in the order
it will take them, and it sends back each one's bytes, cut and hashed exactly as
:meth:`casfs.store.pipeline.Pipeline.cut_stream` would cut the whole file, with its fstat
after reading and its xattrs. The import meanwhile builds entries and tree objects, checks
which chunks are new and stores them. Large files stay with the import: its thread pool
already spreads their hashing and compression over the cores.

The reader needs no store (no LMDB, no lock), so nothing it does can harm one: if it cannot
start or stops, the import reads the files it did not get itself (and says so once).

Protocol, pickles over the reader's stdin and stdout (both ends are this module): in, one
``(chunk params, [(path, size), ...])``; out, messages (a length, then a pickled list) of
results in path order, each ``(data, pieces, after, xattrs)``, ``(errno, strerror)`` for a
file that could not be read, or ``None`` for one that grew past :data:`GREW_LIMIT` since the
scan (the import reads it itself).
"""

from __future__ import annotations

import errno
import os
import pickle
import struct
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Sequence
from typing import BinaryIO, NamedTuple

import casfs
from casfs.store.chunker import Chunker, ChunkParams
from casfs.store.codec import chunk_digest
from casfs.workflows.source import open_noatime, read_xattrs

SMALL_FILE = 1 << 20  # files up to this size (at the scan) go to the reader
MIN_FILES = 512  # fewer small files than this to read: the reader's start-up is not worth it
MIN_FILES_ENV = "CASFS_IMPORT_READER_MIN_FILES"  # (tests set it: 1 always starts the reader)
GREW_LIMIT = 4 * SMALL_FILE  # a file found larger than this is left to the import
BATCH_FILES = 64  # results per message ...
BATCH_BYTES = 1 << 20  # ... or this many bytes of content, whichever comes first
PIPE_BYTES = 1 << 20  # the results pipe's capacity (Linux F_SETPIPE_SZ), where allowed
MESSAGE_MAX = 1 << 30  # larger is a garbled length (a batch ends after its first MiB)


class FileContent(NamedTuple):
    """One file as the reader read it: its bytes, its chunks as (offset, length, digest or
    None for an all-zero chunk), (st_size, st_mtime_ns) from fstat after reading, xattrs."""

    data: bytes
    pieces: list[tuple[int, int, bytes | None]]
    after: tuple[int, int]
    xattrs: tuple[tuple[bytes, bytes], ...]


def min_files() -> int:
    """How many small files to read make a reader process worth starting."""
    try:
        return int(os.environ.get(MIN_FILES_ENV, MIN_FILES))
    except ValueError:
        return MIN_FILES


def command() -> list[str]:
    """How the reader process is started (a test may start another). ``-P``: nothing is
    imported from the working directory (an import's source, often); this process's
    package is the last place looked in, for a casfs run from its source tree."""
    if not sys.executable:
        raise OSError(errno.ENOENT, "no path to the Python interpreter")
    root = os.path.dirname(os.path.dirname(os.path.abspath(casfs.__file__)))
    start = f"import sys; sys.path.append({root!r}); from {__name__} import main; main()"
    return [sys.executable, "-P", "-c", start]


class ContentReader:
    """The import's side of one reader process. Started early (Python's start-up overlaps
    the import's scan), then :meth:`send` gives it the files to read."""

    def __init__(self, params: ChunkParams) -> None:
        # Its stderr goes to a file, read only if it stops: a pipe nobody reads would block
        # it once full, while the import waits for its results.
        self._errors = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(
                command(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._errors,
                cwd="/",
            )
        except BaseException:
            self._errors.close()
            raise
        assert self._proc.stdin and self._proc.stdout
        _widen(self._proc.stdout.fileno())
        self._params = params
        self._order: dict[bytes, int] = {}
        self._got: deque[tuple[int, tuple | None]] = deque()  # received, not taken yet
        self._received = 0
        self._sender: threading.Thread | None = None
        self.stopped = ""  # why the reader is gone before its end ("" while it serves)

    def send(self, files: Sequence[tuple[bytes, int]]) -> None:
        """The files to read, as (absolute path, size at the scan), in the order they will
        be taken. Sent by a thread: the list may outgrow the pipe before the reader reads."""
        self._order = {path: i for i, (path, _) in enumerate(files)}
        params = self._params
        plan = (params.min, params.avg, params.max), list(files)
        self._sender = threading.Thread(
            target=_send, args=(self._proc.stdin, plan), name="casfs-import-plan", daemon=True
        )
        self._sender.start()

    def take(self, path: bytes) -> FileContent | OSError | None:
        """What the reader made of ``path``: its content, the error reading it met, or None
        when the import must read it itself (not sent to the reader, grown since the scan,
        or the reader stopped). Paths are taken in the order they were sent; one skipped
        is dropped."""
        i = self._order.pop(path, None)
        if i is None or self.stopped:
            return None
        got = self._got
        while True:
            while got and got[0][0] < i:
                got.popleft()
            if got:
                break
            try:
                batch = _receive(self._proc.stdout)
            except Exception as exc:  # noqa: BLE001 - EOF, a torn or garbled message: the same
                self.stopped = self._why(exc)
                got.clear()
                return None
            got.extend(enumerate(batch, self._received))
            self._received += len(batch)
        if got[0][0] != i:  # taken out of the order sent (never meant to): read it there
            return None
        result = got.popleft()[1]
        if result is None:
            return None
        if len(result) == 2:
            return OSError(*result)
        return FileContent._make(result)

    def _why(self, failure: Exception) -> str:
        """Why the reader is gone: how it ended and the last line it wrote to stderr, or
        what was wrong with what it sent (then it is stopped here)."""
        if not isinstance(failure, EOFError):
            self.close()
            return f"it sent what could not be read: {failure}"
        try:
            self._proc.wait(timeout=10)  # (its output ended: it is on its way out)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._errors.seek(0, os.SEEK_END)
        self._errors.seek(max(0, self._errors.tell() - 4096))
        lines = self._errors.read().strip().splitlines()
        last = lines[-1].decode(errors="replace") if lines else ""
        return f"exit status {self._proc.returncode}" + (f": {last}" if last else "")

    def close(self) -> None:
        """Stop the reader (at once: whatever it still reads is not needed) and reap it."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        if self._sender is not None:
            self._sender.join()
        else:
            assert self._proc.stdin
            self._proc.stdin.close()
        if self._proc.stdout:
            self._proc.stdout.close()
        self._errors.close()


_HEADER = struct.Struct("<Q")


def _receive(stream: BinaryIO | None) -> list:
    """One message: a length, then that many bytes of pickle (one read for the whole)."""
    assert stream is not None
    head = stream.read(_HEADER.size)
    if len(head) < _HEADER.size:
        raise EOFError("the reader's output ended")
    (n,) = _HEADER.unpack(head)
    if n > MESSAGE_MAX:
        raise ValueError(f"a message of {n} bytes from the reader")
    payload = stream.read(n)
    if len(payload) < n:
        raise EOFError("the reader's output ended inside a message")
    return pickle.loads(payload)


def _transmit(stream: BinaryIO, batch: list) -> None:
    payload = pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(payload)))
    stream.write(payload)
    stream.flush()


def _send(stream: BinaryIO, plan: object) -> None:
    try:
        with stream:
            pickle.dump(plan, stream, protocol=pickle.HIGHEST_PROTOCOL)
    except (BrokenPipeError, ValueError):  # the reader is gone (or closed): take() says why
        pass


def _widen(fd: int) -> None:
    """Fewer round trips through a larger pipe (Linux only; the default is 64 KiB)."""
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass


# -- the reader process ---------------------------------------------------------------------


def read_one(chunker: Chunker, path: bytes, expected: int) -> tuple | None:
    """One file's result for the protocol (see the module's docstring). Each read asks for
    what the scan's size says is left, plus a page to meet the end: os.read allocates all
    it is asked for."""
    try:
        fd = open_noatime(path)
        try:
            blocks = []
            size = 0
            while block := os.read(fd, max(expected - size, 0) + 4096):
                blocks.append(block)
                size += len(block)
                if size > GREW_LIMIT:
                    return None
            after = os.fstat(fd)
            xattrs = read_xattrs(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        return (exc.errno, exc.strerror)
    data = blocks[0] if len(blocks) == 1 else b"".join(blocks)
    view = memoryview(data)
    pieces = []
    offset = 0
    for n in chunker.cut(data):
        pieces.append((offset, n, chunk_digest(view[offset : offset + n])))
        offset += n
    return data, pieces, (after.st_size, after.st_mtime_ns), xattrs


def serve(inp: BinaryIO, out: BinaryIO) -> None:
    params, files = pickle.load(inp)
    chunker = Chunker(ChunkParams(*params))
    batch: list[tuple | None] = []
    size = 0
    for path, expected in files:
        got = read_one(chunker, path, expected)
        batch.append(got)
        if got is not None and len(got) == 4:  # (xattrs too: tmpfs takes MiBs of them)
            size += len(got[0]) + sum(len(k) + len(v) for k, v in got[3])
        if len(batch) >= BATCH_FILES or size >= BATCH_BYTES:
            _transmit(out, batch)
            batch, size = [], 0
    _transmit(out, batch)


def main() -> None:
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print must not land in the results
    try:
        serve(sys.stdin.buffer, out)
        out.close()
    except (BrokenPipeError, EOFError):  # the import is gone (or stopped listening)
        pass
