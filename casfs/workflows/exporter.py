"""Export a snapshot (or a file or subtree of one) to a local directory, preserving everything.

What is preserved
    Regular file bytes, with holes kept as holes: a range no extent covers is never written,
    the file is sized with ``ftruncate`` and only the stored chunks are written at their
    offsets. (An all-zero chunk is stored as a hole, so a run of zeros the source had on disk
    may come back sparse: the export never takes more room than the source, and may take
    less.) Modes with their setuid, setgid and sticky bits; owners (when running as root);
    access and modification times to the nanosecond, of directories and symlinks too;
    symlinks; hard links (entries that share an inode number in the snapshot become names of
    one file); extended attributes of every namespace (POSIX ACLs are ``system.*`` xattrs);
    fifos, sockets and device nodes.

What is not
    ``ctime`` and inode numbers, which the kernel assigns; link counts to names outside an
    exported subtree; owners and ``trusted.*``/``security.*`` xattrs when not running as root
    (skipped silently, as ``cp -a`` and ``tar`` do). A device node needs root: without it the
    export stops with an error rather than silently drop a name.

Order matters for some of it: a file's data is written before its attributes (a write would
clear ``security.capability``), ``chown`` comes before ``chmod`` (``chown`` clears setuid and
setgid) and xattrs before ``chmod`` (setting an ACL moves the group bits), and times come last.
Directories get their attributes only after everything below them is written, deepest first:
creating children moves a directory's times, and a read-only directory could not take them.

Why one read transaction
    Every object the export reads (the snapshot record, tree objects, manifests, chunks) is
    read in one LMDB read transaction, an MVCC view of the store at one instant. Another
    process may delete the snapshot meanwhile and free its objects: LMDB does not reuse the
    pages a reader still sees, so the export finishes with the snapshot as it was when it
    began, never half of it. The store may be opened read-only (beside a mount); nothing here
    writes to it.

Chunks are read and verified on all cores (:meth:`Pipeline.read_async`) in batches of
about ``BATCH_BYTES``, across files, so memory stays bounded and small files still keep every
core busy; the pool reads the next batch while this thread writes one. (The pool's reads see
the store as last committed; a chunk deleted since the export began is read through the
export's own transaction instead.) A chunk that fails its digest check stops the export with
:class:`~casfs.errors.CorruptObject`, naming the digest and the file.

Destination rules: ``dest`` is the path the exported directory or file gets. A directory
export may go into an existing empty directory; any other existing ``dest`` is refused unless
``force``. With ``force``, a directory export merges into an existing directory: a name the
export writes replaces what is there (a directory is merged into, anything else is removed
first, directories recursively); names and xattrs the snapshot does not have stay. No
symlink below ``dest`` is followed (a symlink where the snapshot has a directory is replaced,
an existing file is unlinked, never written through); ``dest`` itself may be a symlink to the
directory to export into. A failed export leaves what it wrote so far.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

from casfs.errors import CasfsError, CorruptObject
from casfs.store.pipeline import Pipeline
from casfs.store.store import Store, Tx, overlaps
from casfs.tree import restore, snapshots, treeobjects
from casfs.tree.content import Extent
from casfs.tree.treeobjects import Entry

# Plain bytes of a batch of chunks, read in the pool while the batch before it is written:
# about twice this is held at once.
BATCH_BYTES = 16 << 20
# Files kept open while their chunks wait in a batch (with the batch being written, at most
# twice this many descriptors are in use).
BATCH_FILES = 256
# xattr namespaces only a privileged process may set.
_PRIVILEGED_XATTRS = (b"trusted.", b"security.")

Progress = Callable[[int, int, bytes], None]


@dataclass(frozen=True)
class ExportResult:
    """What was written, counted as the snapshot's totals count it: ``files`` are the
    non-directories (every name of a hard-linked file), ``dirs`` the directories below the
    exported one, ``bytes`` the regular files' sizes (holes included)."""

    files: int
    dirs: int
    bytes: int
    seconds: float


def export(
    store: Store,
    name: bytes,
    dest: str | bytes,
    path: bytes = b"",
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> ExportResult:
    """Write snapshot ``name`` (or the file or subtree at ``path`` in it, '/'-separated) to
    ``dest``. ``progress(done_bytes, total_bytes, path)`` is called as files are finished
    (and as a large file's batches are written), with ``path`` relative to the snapshot root.
    Raises :class:`CasfsError` (one line) on every expected failure."""
    started = time.monotonic()
    target = os.fsencode(dest)
    if overlaps(store.path, target):
        where = "is the store itself, inside it or holding it"
        raise CasfsError(f"{_show(target)} {where}; export elsewhere")
    with store.read() as tx:
        snap = snapshots.find(tx, name)
        entry = restore.resolve(store, tx, snap.root, path, name)
        rel = b"/".join(n for n in path.split(b"/") if n and n != b".")
        if not entry.is_dir:
            total = entry.size if entry.is_reg else 0
        elif rel:
            total = treeobjects.load_tree(store, tx, entry.digest).totals.bytes
        else:
            total = snap.totals.bytes
        top = _prepare_dest(target, entry.is_dir, force)
        pipeline = Pipeline(store)
        exporter = _Exporter(store, tx, pipeline, total, progress)
        try:
            exporter.run(entry, rel, top)
        finally:
            exporter.close_all()
            pipeline.close()
    return ExportResult(exporter.files, exporter.dirs, exporter.bytes, time.monotonic() - started)


def _show(path: bytes) -> str:
    return path.decode(errors="backslashreplace")


def _lexists(path: bytes) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _remove(path: bytes, st: os.stat_result) -> None:
    """Remove what is at ``path`` (``st`` its lstat): a directory recursively."""
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _prepare_dest(dest: bytes, is_dir: bool, force: bool) -> bytes:
    """Check ``dest`` and clear it where ``force`` says so; returns the path to write (an
    existing directory, to merge into, or nothing yet)."""
    parent = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(parent):
        raise CasfsError(f"{_show(parent)} does not exist or is not a directory", errno.ENOENT)
    try:
        st = _lexists(dest)
        if st is None:
            return dest
        if is_dir and stat.S_ISLNK(st.st_mode) and os.path.isdir(dest):
            dest = os.path.realpath(dest)  # dest itself may be a symlink to a directory
            st = os.lstat(dest)
        if is_dir and stat.S_ISDIR(st.st_mode) and (force or not os.listdir(dest)):
            return dest
        if not force:
            raise CasfsError(f"{_show(dest)} exists; use --force to overwrite", errno.EEXIST)
        _remove(dest, st)
    except OSError as exc:
        raise CasfsError(f"cannot write {_show(dest)}: {exc.strerror}", exc.errno) from None
    return dest


@dataclass
class _File:
    """A regular file being written: open while its chunks wait in a batch."""

    path: bytes  # where it is written
    rel: bytes  # its path in the snapshot
    entry: Entry
    fd: int
    reported: int = 0  # bytes already counted as done


@dataclass
class _Batch:
    digests: dict[bytes, None] = field(default_factory=dict)  # the chunks, in order
    writes: list[tuple[_File, Extent]] = field(default_factory=list)
    ready: list[_File] = field(default_factory=list)  # every chunk queued: finish after writing
    size: int = 0
    partial: _File | None = None  # a file still being queued when the batch was cut
    reading: Future[list[bytes | CorruptObject | None]] | None = None  # set when cut


class _Exporter:
    def __init__(
        self, store: Store, tx: Tx, pipeline: Pipeline, total: int, progress: Progress | None
    ) -> None:
        self.store = store
        self.tx = tx
        self.pipeline = pipeline
        self.total = total
        self.progress = progress
        self.privileged = os.geteuid() == 0
        self.links: dict[int, bytes] = {}  # snapshot ino -> the first name written
        self.batch = _Batch()
        self.waiting: _Batch | None = None  # read in the pool, written at the next flush
        self.open: dict[int, _File] = {}  # fd -> file, to close them all on failure
        self.done = 0
        self.files = self.dirs = self.bytes = 0

    # -- the walk ---------------------------------------------------------------------------

    def run(self, entry: Entry, rel: bytes, top: bytes) -> None:
        """Write ``entry`` at ``top``: directories first (pre-order, no recursion), their
        attributes last, children before parents. Only below a directory that existed
        already may a name exist (and be replaced)."""
        dirs: list[tuple[bytes, bytes, Entry]] = []
        stack: list[tuple[bytes, bytes, Entry, bool]] = [(top, rel, entry, True)]
        while stack:
            dest, rel, e, may_exist = stack.pop()
            with self._failing(dest, rel):
                if e.is_dir:
                    merge = self._make_dir(dest, e, may_exist)
                    dirs.append((dest, rel, e))
                    if dest != top:
                        self.dirs += 1
                    tree = treeobjects.load_tree(self.store, self.tx, e.digest)
                    for c in reversed(tree.entries):
                        child_rel = rel + b"/" + c.name if rel else c.name
                        stack.append((os.path.join(dest, c.name), child_rel, c, merge))
                else:
                    self._make_node(dest, rel, e, may_exist)
        self._flush()
        self._write(self.waiting)
        self.waiting = None
        for dest, rel, e in reversed(dirs):
            with self._failing(dest, rel):
                self._set_attributes(dest, e)

    @contextmanager
    def _failing(self, dest: bytes, rel: bytes) -> Iterator[None]:
        """OS errors as one line naming the file; a corrupt object names the file too."""
        try:
            yield
        except OSError as exc:
            what = exc.strerror or str(exc)
            raise CasfsError(f"cannot write {_show(dest)}: {what}", exc.errno) from None
        except CorruptObject as exc:
            if isinstance(exc, _Located):
                raise
            raise _in_file(exc, rel) from None

    def _make_dir(self, dest: bytes, e: Entry, may_exist: bool) -> bool:
        """Create directory ``dest`` (owner-writable until its attributes are set), or keep
        an existing one to merge into. True when names below it may exist."""
        if may_exist:
            st = _lexists(dest)
            if st is not None and stat.S_ISDIR(st.st_mode):
                return True
            if st is not None:
                _remove(dest, st)
        os.mkdir(dest, 0o700)
        return False

    def _make_node(self, dest: bytes, rel: bytes, e: Entry, may_exist: bool) -> None:
        if may_exist:
            st = _lexists(dest)
            if st is not None:
                _remove(dest, st)
        self.files += 1
        first = self.links.get(e.ino) if e.nlink > 1 else None
        if first is not None:
            os.link(first, dest, follow_symlinks=False)
            if e.is_reg:
                self.bytes += e.size
                self._report(e.size, rel)
            return
        kind = stat.S_IFMT(e.mode)
        if kind == stat.S_IFREG:
            self._write_file(dest, rel, e)
        else:
            if kind == stat.S_IFLNK:
                os.symlink(e.target, dest)
            elif kind in (stat.S_IFIFO, stat.S_IFSOCK):
                os.mknod(dest, kind | 0o600)
            elif kind in (stat.S_IFCHR, stat.S_IFBLK):
                if not self.privileged:
                    raise CasfsError(
                        f"cannot create device node {_show(dest)}: export as root", errno.EPERM
                    )
                os.mknod(dest, kind | 0o600, e.rdev)
            else:
                raise CasfsError(f"{_show(rel)!r} has unknown file type {kind:o}", errno.EINVAL)
            self._set_attributes(dest, e)
            self._report(0, rel)
        if e.nlink > 1:
            self.links[e.ino] = dest

    # -- regular files ----------------------------------------------------------------------

    def _write_file(self, dest: bytes, rel: bytes, e: Entry) -> None:
        """Create the file at its full size (all holes) and queue its chunks; it is finished
        (attributes, close) once its last chunk is written."""
        extents = (
            treeobjects.load_manifest(self.store, self.tx, e.digest) if e.digest else e.extents
        )
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(dest, flags, 0o600)
        f = _File(dest, rel, e, fd)
        self.open[fd] = f
        self.bytes += e.size
        os.ftruncate(fd, e.size)
        batch = self.batch
        for x in extents:
            if x.end > e.size:
                raise CorruptObject(x.digest, f"extent at {x.offset} ends past the file's size")
            if x.digest not in batch.digests:
                batch.digests[x.digest] = None
                batch.size += x.length
            batch.writes.append((f, x))
            if batch.size >= BATCH_BYTES:
                self._flush(partial=f)
                batch = self.batch
        batch.ready.append(f)
        if len(batch.ready) >= BATCH_FILES:
            self._flush()

    def _flush(self, partial: _File | None = None) -> None:
        """Start reading the batch's chunks in the pool and write the batch read before it;
        ``partial`` is a file still being queued (a large one)."""
        batch, self.batch = self.batch, _Batch()
        batch.partial = partial
        batch.reading = self.pipeline.read_async(list(batch.digests))
        self._write(self.waiting)
        self.waiting = batch

    def _write(self, batch: _Batch | None) -> None:
        """Write a batch's chunks and finish the files whose chunks were all queued."""
        if batch is None:
            return
        assert batch.reading is not None
        got = batch.reading.result()
        self.store.mapped.touched()  # what the pool's lookups mapped
        plain: dict[bytes, bytes] = {}
        for digest, data in zip(batch.digests, got, strict=True):
            try:
                if data is None:  # deleted since the export began: ours still sees it
                    data = self.store.load(self.tx, digest)
                elif isinstance(data, CorruptObject):
                    raise data
            except CorruptObject as exc:
                rel = next((f.rel for f, x in batch.writes if x.digest == exc.digest), b"?")
                raise _in_file(exc, rel) from None
            plain[digest] = data
        for f, x in batch.writes:
            data = plain[x.digest]
            with self._failing(f.path, f.rel):
                if len(data) != x.length:
                    raise CorruptObject(x.digest, f"{len(data)} bytes where {x.length} expected")
                _pwrite_all(f.fd, data, x.offset)
        partial = batch.partial
        if partial is not None and batch.writes:
            self._report(batch.writes[-1][1].end - partial.reported, partial.rel, partial)
        for f in batch.ready:
            with self._failing(f.path, f.rel):
                self._set_attributes(f.fd, f.entry)
                del self.open[f.fd]
                os.close(f.fd)
            self._report(f.entry.size - f.reported, f.rel, f)

    def close_all(self) -> None:
        for fd in self.open:
            os.close(fd)
        self.open.clear()

    # -- attributes -------------------------------------------------------------------------

    def _set_attributes(self, where: int | bytes, e: Entry) -> None:
        """Owner, xattrs, mode and times, in that order (see the module docstring), on an open
        file or, without following a symlink, on a path."""
        by_path = {} if isinstance(where, int) else {"follow_symlinks": False}
        if self.privileged:
            os.chown(where, e.uid, e.gid, **by_path)
        for key, value in e.xattrs:
            try:
                os.setxattr(where, key, value, **by_path)
            except PermissionError:
                if self.privileged or not key.startswith(_PRIVILEGED_XATTRS):
                    raise
        if not stat.S_ISLNK(e.mode):  # a symlink's mode is always 0777 on Linux
            os.chmod(where, stat.S_IMODE(e.mode))
        os.utime(where, ns=(e.atime_ns, e.mtime_ns), **by_path)

    def _report(self, delta: int, rel: bytes, f: _File | None = None) -> None:
        self.done += delta
        if f is not None:
            f.reported += delta
        if self.progress is not None:
            self.progress(self.done, self.total, rel)


class _Located(CorruptObject):
    """A :class:`CorruptObject` whose message names its file already."""


def _in_file(exc: CorruptObject, rel: bytes) -> CorruptObject:
    """The same error with the snapshot path of the file it was found in."""
    detail = str(exc).removeprefix(f"corrupt object {exc.digest.hex()}: ")
    return _Located(exc.digest, f"{detail} (in {_show(rel)!r})")


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
