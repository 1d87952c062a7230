"""``casfs import``: a directory tree straight into a new snapshot, no FUSE round trip.

The source is walked twice. The first walk (:func:`scan`) only takes its shape: names, lstat,
and how many names each hard-linked inode has inside the source (a snapshot's ``st_nlink``).
The second builds the snapshot children first: each file's content is cut exactly as a
whole-file write through the mount would cut it (so import and mount deduplicate against
each other), hashed and compressed on all cores, and each directory becomes a tree object.

Store access goes through an :class:`Access`: offline it runs the store directly, in a mount
it hops to the mount's thread (the store's one writer), so both run this same code.

References: content and subtrees are stored as soon as they are read, before the tree object
that will name them exists. Until then the import holds their reference itself and records it
in the ``pins`` table (so a crash leaks nothing: pins are released at the next mount or
import); the parent's tree object takes those references over. Changes are applied in groups
of about GROUP_BYTES, one transaction each, while the next group is read and compressed.

Incremental: :mod:`casfs.workflows.filescache` remembers, per source directory, each path's
snapshot inode number and each file's (size, mtime, ctime, inode) and content. An unchanged
file is not read again, and an unchanged tree yields the same tree objects as last time.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from casfs.errors import CasfsError
from casfs.store import layout
from casfs.store.codec import digest_of
from casfs.store.packs import packable
from casfs.store.pipeline import Pipeline
from casfs.store.store import Store, Tx, overlaps
from casfs.tree import snapshots, treeobjects
from casfs.tree.content import Extent
from casfs.tree.snapshots import Snapshot
from casfs.tree.treeobjects import INLINE_EXTENTS, Entry, Totals
from casfs.workflows import contentreader, filescache
from casfs.workflows.contentreader import ContentReader
from casfs.workflows.filescache import Seen
from casfs.workflows.selection import CACHEDIR_TAG, Selection, is_cache_dir
from casfs.workflows.source import open_noatime, read_xattrs

T = TypeVar("T")
WHOLE_TREE = Selection()
# The scan stops counting files for the reader process after this many small files (most
# of them unchanged then: a re-import); the plan, made after the scan, decides instead.
_COUNT_AT_MOST = 4096

GROUP_BYTES = 16 << 20  # file bytes per applied group (and per compression batch)
GROUP_OPS = 4096  # ... or this many changes, whichever comes first
READ_BLOCK = 8 << 20
PROGRESS_EVERY = 0.2  # seconds between progress reports


@dataclass(frozen=True)
class Access:
    """How the import reaches the store: ``read(fn)`` and ``write(fn)`` run ``fn(tx)`` on the
    store's thread, in a read or write transaction."""

    read: Callable[[Callable[[Tx], Any]], Any]
    write: Callable[[Callable[[Tx], Any]], Any]

    @classmethod
    def direct(cls, store: Store) -> Access:
        def read(fn: Callable[[Tx], T]) -> T:
            with store.read() as tx:
                return fn(tx)

        return cls(read, store.run_write)


@dataclass
class Progress:
    files: int = 0
    files_total: int = 0
    bytes: int = 0
    bytes_total: int = 0
    path: bytes = b""


@dataclass
class ImportResult:
    snapshot: dict = field(default_factory=dict)
    files: int = 0
    dirs: int = 0
    bytes_total: int = 0  # logical bytes of the regular files
    bytes_read: int = 0
    bytes_new: int = 0  # growth of the store's stored (compressed) bytes during the import
    files_unchanged: int = 0  # taken from the files cache without reading
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def describe(self) -> dict:
        return dict(self.__dict__)


# -- the first walk -------------------------------------------------------------------------

_ASK = object()  # (a Node's files cache verdict not asked for yet)


@dataclass(slots=True)
class Node:
    name: bytes
    rel: bytes  # path below the source, '/'-separated, b"" for the source itself
    st: os.stat_result
    children: list[Node] | None = None  # a directory's, sorted by name
    changed: bool = False  # a file that changed while it was read (not for the files cache)
    last: Any = _ASK  # what the last import saw of it, if it looks untouched since
    xattrs: tuple[tuple[bytes, bytes], ...] | None = None  # a directory's, read by the scan


def scan(
    src: bytes,
    warn: Callable[[str], None],
    selection: Selection = WHOLE_TREE,
    on_listed: Callable[[list[Node]], None] | None = None,
) -> tuple[Node, Counter]:
    """The source's tree of lstat results (the entries ``selection`` takes), and the names
    each (dev, ino) has inside it. ``on_listed`` is given each directory's children as soon as
    they are known."""
    root = Node(b"", b"", os.lstat(src), [])
    names: Counter[tuple[int, int]] = Counter()
    stack: list[tuple[Node, Node | None]] = [(root, None)]  # (directory, its parent)
    tags = selection.tags()
    while stack:
        node, parent = stack.pop()
        path = _join(src, node.rel)
        try:  # listed through an O_NOATIME descriptor: a listing would move the atime
            fd = open_noatime(path, os.O_DIRECTORY)
        except OSError as exc:
            warn(f"{os.fsdecode(path)}: cannot list ({exc.strerror}); imported as empty")
            continue
        try:
            node.xattrs = read_xattrs(fd)  # (through the descriptor: no path walk)
            with os.scandir(fd) as it:
                found = sorted((os.fsencode(d.name), d) for d in it)
            if tags and any(name in tags for name, _ in found):
                if parent is not None:  # (the source itself stays, empty)
                    assert parent.children is not None
                    parent.children.remove(node)
                continue
            if selection.filters:
                found = _selected(selection, node.rel, found, fd)
            listed = []
            for name, d in found:
                try:
                    listed.append((name, d.stat(follow_symlinks=False)))
                except OSError as exc:
                    warn(f"{os.fsdecode(path + b'/' + name)}: {exc.strerror}; skipped")
        except OSError as exc:
            warn(f"{os.fsdecode(path)}: cannot list ({exc.strerror}); imported as empty")
            continue
        finally:
            os.close(fd)
        for name, st in listed:
            rel = node.rel + b"/" + name if node.rel else name
            child = Node(name, rel, st)
            assert node.children is not None
            node.children.append(child)
            if stat.S_ISDIR(st.st_mode):
                if selection.one_file_system and st.st_dev != root.st.st_dev:
                    continue  # a mountpoint: kept as an empty directory
                child.children = []
                stack.append((child, node))
            elif st.st_nlink > 1:
                names[(st.st_dev, st.st_ino)] += 1
        if on_listed is not None and node.children:
            on_listed(node.children)
    return root, names


def _selected(
    selection: Selection, rel: bytes, found: list[tuple[bytes, os.DirEntry]], dir_fd: int
) -> list[tuple[bytes, os.DirEntry]]:
    """The entries of a listing that ``selection`` takes (a cache directory keeps its tag)."""
    if (
        selection.exclude_caches
        and any(name == CACHEDIR_TAG for name, _ in found)
        and is_cache_dir(dir_fd)
    ):
        return [(name, d) for name, d in found if name == CACHEDIR_TAG]
    prefix = rel + b"/" if rel else b""
    return [
        (name, d)
        for name, d in found
        if not selection.excluded(prefix + name, name, d.is_dir(follow_symlinks=False))
    ]


def _join(src: bytes, rel: bytes) -> bytes:
    return src + b"/" + rel if rel else src


def _post_order(root: Node, whole: set[bytes]) -> Iterator[Node]:
    """Directories, each after all the directories below it; nothing below those in
    ``whole`` (taken as they are)."""
    stack = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            yield node
            continue
        stack.append((node, True))
        if node.rel not in whole:
            dirs = (c for c in reversed(node.children or ()) if c.children is not None)
            stack.extend((c, False) for c in dirs)


def _parent(rel: bytes) -> bytes:
    return rel.rpartition(b"/")[0]


# -- changes to apply -----------------------------------------------------------------------


@dataclass(slots=True)
class _Object:
    """A manifest or tree object that takes over the references of ``refs`` (held, pinned,
    by the import) if it is new; if it exists already those are released instead."""

    digest: bytes
    kind: int
    plain: bytes
    refs: list[bytes]


class _Group:
    """Changes waiting for one transaction, in order: chunks to store and hold, existing
    objects to hold again, and objects that take over held references."""

    def __init__(self) -> None:
        self.ops: list[tuple[str, Any]] = []
        self.plain: dict[bytes, memoryview | bytes] = {}  # chunks that may be new
        self.bytes = 0
        self.new: list[bytes] = []  # chunks the store did not have when the group was flushed
        self.encoded: Future[list[bytes]] | None = None  # their values, being compressed

    def full(self) -> bool:
        return self.bytes >= GROUP_BYTES or len(self.ops) >= GROUP_OPS

    def chunk(self, digest: bytes, data: memoryview | bytes) -> None:
        self.ops.append(("chunk", (digest, len(data))))
        self.plain.setdefault(digest, data)
        self.bytes += len(data)

    def hold(self, digests: list[bytes]) -> None:
        self.ops.append(("hold", digests))

    def obj(self, o: _Object) -> None:
        self.ops.append(("object", o))


# -- the import -----------------------------------------------------------------------------


class Importer:
    """One import of ``src`` into the store behind ``access``. ``run`` builds everything
    but the snapshot record; ``record`` adds that (the mount does it under its snapshot
    lock); ``abort`` gives back what a failed or cancelled import still holds."""

    def __init__(
        self,
        store: Store,
        access: Access,
        pipeline: Pipeline,
        src: str,
        *,
        selection: Selection = WHOLE_TREE,
        progress: Callable[[Progress], None] | None = None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        self.store = store
        self.access = access
        self.pipeline = pipeline
        self.src = os.fsencode(os.path.realpath(src))
        self.selection = selection
        self.on_progress = progress
        self.cancelled = cancelled
        self.result = ImportResult()
        self.progress = Progress()
        self._reported = 0.0
        self.held: Counter[bytes] = Counter()  # references the import holds (pinned)
        self.seen: dict[bytes, tuple] = {}  # the files cache to save (Seen or plain rows)
        self.root: Entry | None = None
        self.group = _Group()  # changes being gathered
        self.waiting: _Group | None = None  # gathered, compressing, applied at the next flush
        self.totals = Totals()
        self._started = time.monotonic()
        self._stored_before = 0
        self._reader: ContentReader | None = None
        self._reader_tried = False
        self._reader_min = contentreader.min_files()
        self._to_read = 0  # small files the scan found that need reading
        self._counted_small = 0  # small files the scan looked at (-1: done counting)

    # -- checks ---------------------------------------------------------------------------

    def check_source(self) -> None:
        src = os.fsdecode(self.src)
        if not os.path.exists(src):
            raise CasfsError(f"{src} does not exist", errno.ENOENT)
        if not os.path.isdir(src):
            raise CasfsError(f"{src} is not a directory", errno.ENOTDIR)
        if overlaps(self.store.path, src):
            where = "is the store itself, inside it or holding it"
            raise CasfsError(f"{src} {where}; import another directory")

    # -- the walk -------------------------------------------------------------------------

    def run(self) -> None:
        self.check_source()
        self._stored_before = self._stored_bytes()
        self._last = filescache.load(self.store.path, self.src, self.selection.key())
        try:
            self._scan_and_build()
        finally:
            if self._reader is not None:
                self._reader.close()
                if self._reader.stopped:
                    why = self._reader.stopped
                    self._warn(f"the import's reader process stopped ({why}); read here")
                self._reader = None
        self._report(force=True)

    def _scan_and_build(self) -> None:
        last = self._last
        root, names = scan(self.src, self._warn, self.selection, self._count_to_read)
        self.progress.files_total = sum(1 for _ in _walk_files(root))
        self.progress.bytes_total = sum(n.st.st_size for n in _walk_files(root) if _is_reg(n))
        new_inos = sum(1 for n in _walk_all(root) if n.rel and n.rel not in last)
        base = self.access.write(lambda tx: _reserve_inos(tx, new_inos))
        self._inos = _InoGiver(last, base)
        self._links: dict[tuple[int, int], tuple[int, Entry]] = {}  # first name's ino, entry
        self._counted: set[tuple[int, int]] = set()  # hard-linked inodes counted as unchanged
        self._names = names
        same = self._unchanged_trees(root)
        self._send_to_reader(root, same)
        built: dict[bytes, tuple[Entry, Totals]] = {}  # finished subdirectories by rel path
        for d in _post_order(root, same):
            ino = self._inos.give(d.rel) if d.rel else layout.ROOT_INO
            if d.rel in same:
                built[d.rel] = self._reuse_tree(d, ino)
                continue
            entries, totals, whole = self._directory(d, built)
            tree_plain = treeobjects.encode_tree(entries, totals)
            digest = digest_of(tree_plain)
            refs = [r for e in entries for r in e.refs()]
            self.group.obj(_Object(digest, layout.KIND_TREE, tree_plain, refs))
            entry = self._entry(d, ino, digest=digest)
            d.changed = not whole  # a tree missing a child must be built again next time
            self._remember(d, ino, entry, totals)
            built[d.rel] = (entry, totals)
            for c in d.children or ():
                built.pop(c.rel, None)
            self._flush_if_full()
        self._flush()
        self._apply(self.waiting)
        self.waiting = None
        self.root, self.totals = built[b""]
        self.result.dirs = self.totals.dirs
        self.result.files = self.totals.files
        self.result.bytes_total = self.totals.bytes

    def _unchanged_trees(self, root: Node) -> set[bytes]:
        """Directories whose whole subtree looks untouched since the last import (every path
        below has the same lstat values) and whose tree object the store still holds. Their
        tree objects are taken as they are: nothing below them is opened or read."""
        same: set[bytes] = set()
        for d in _post_order(root, set()):
            last = self._unchanged(d)
            if last is None or not last.digest:
                continue
            if all(
                c.rel in same if c.children is not None else self._unchanged(c) is not None
                for c in d.children or ()
            ):
                same.add(d.rel)
        tops = {rel: self._last[rel].digest for rel in same if not rel or _parent(rel) not in same}

        def check(tx: Tx) -> list[bytes]:
            return [rel for rel, digest in tops.items() if not self.store.has_object(tx, digest)]

        for gone in self.access.read(check) if tops else ():  # freed since: build again
            same = {r for r in same if gone and r != gone and not r.startswith(gone + b"/")}
        return same

    def _reuse_tree(self, d: Node, ino: int) -> tuple[Entry, Totals]:
        """Directory ``d`` as the last import stored it (see :meth:`_unchanged_trees`)."""
        last = self._last[d.rel]
        entry = self._entry(d, ino, digest=last.digest)
        self.group.hold([last.digest])
        for n in _walk_all(d):
            self.seen[n.rel] = self._last.rows[n.rel]
            if _is_reg(n):
                self._count_unchanged(n.st)
                self.progress.bytes += n.st.st_size
            if n.children is None:
                self.progress.files += 1
        self.progress.path = d.rel
        self._report()
        return entry, Totals(*last.totals)

    # -- the reader process ---------------------------------------------------------------

    def _count_to_read(self, children: list[Node]) -> None:
        """Called by the scan after each directory: starts the reader process as soon as
        enough small files need reading, so that its start-up overlaps the rest of the scan.
        Gives up counting once many files were found unchanged (a re-import)."""
        if self._counted_small < 0:
            return
        for c in children:
            if _small_file(c):
                self._counted_small += 1
                if self._unchanged(c) is None:
                    self._to_read += 1
        if self._to_read >= self._reader_min:
            self._counted_small = -1
            self._reader = self._start_reader()
        elif self._counted_small >= _COUNT_AT_MOST:
            self._counted_small = -1

    def _start_reader(self) -> ContentReader | None:
        self._reader_tried = True
        try:
            return ContentReader(self.store.params)
        except OSError as exc:
            self._warn(f"could not start the import's reader process ({exc.strerror}); read here")
            return None

    def _send_to_reader(self, root: Node, same: set[bytes]) -> None:
        """Give the reader process the small files this import will read, in the order it
        will read them (starting it now if the scan did not)."""
        plan: list[tuple[bytes, int]] = []
        firsts: set[tuple[int, int]] = set()  # a hard-linked inode is read by its first name
        for d in _post_order(root, same):
            if d.rel in same:
                continue
            for c in d.children or ():
                # (one the files cache vouches for is not read, if its content is still held)
                if not _small_file(c) or self._unchanged(c) is not None:
                    continue
                st = c.st
                if st.st_nlink > 1:
                    if (st.st_dev, st.st_ino) in firsts:
                        continue
                    firsts.add((st.st_dev, st.st_ino))
                plan.append((_join(self.src, c.rel), st.st_size))
        if not self._reader_tried and len(plan) >= self._reader_min:
            self._reader = self._start_reader()
        if self._reader is not None:
            self._reader.send(plan)

    def _directory(
        self, d: Node, built: dict[bytes, tuple[Entry, Totals]]
    ) -> tuple[list[Entry], Totals, bool]:
        """The entries of directory ``d`` (its subdirectories are built), and whether every
        child made it in; its files' content goes into the group being gathered."""
        entries: list[Entry] = []
        totals = Totals()
        children = d.children or []
        known = self._known_content(children)
        for c in children:
            if self.cancelled():
                raise CasfsError("import cancelled", errno.EINTR)
            if c.children is not None:
                entry, sub = built[c.rel]
                entries.append(entry)
                totals += sub + Totals(dirs=1)
                continue
            entry = self._non_directory(c, known.get(c.rel))
            if entry is None:
                continue
            entries.append(entry)
            totals += Totals(files=1, bytes=c.st.st_size if _is_reg(c) else 0)
            self.progress.files += 1
            self.progress.path = c.rel
            self._report()
        return entries, totals, len(entries) == len(children)

    def _known_content(self, children: list[Node]) -> dict[bytes, Seen]:
        """The files of ``children`` the files cache vouches for, whose objects the store
        still holds (asked in one transaction)."""
        maybe = {c.rel: s for c in children if _is_reg(c) and (s := self._unchanged(c)) is not None}
        if not maybe:
            return {}

        def check(tx: Tx) -> dict[bytes, Seen]:
            has = self.store.has_object
            return {
                rel: s
                for rel, s in maybe.items()
                if all(has(tx, d) for d in ([s.digest] if s.digest else []))
                and all(has(tx, x[2]) for x in s.extents)
            }

        return self.access.read(check)

    def _non_directory(self, c: Node, known: Seen | None) -> Entry | None:
        st = c.st
        group = self.group
        path = _join(self.src, c.rel)
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in self._links:  # another name of an inode done already
            ino, first = self._links[key]
            group.hold(first.refs())
            self._remember(c, ino, first)
            return dataclasses.replace(first, name=c.name)
        ino = self._inos.give(c.rel)
        if stat.S_ISREG(st.st_mode):
            if known is not None:
                extents = tuple(Extent(*x) for x in known.extents)
                entry = self._entry(c, ino, digest=known.digest, extents=extents,
                                    data_bytes=known.data_bytes)  # fmt: skip
                group.hold(entry.refs())
                self._count_unchanged(st)
                self.progress.bytes += st.st_size
            else:
                try:
                    entry = self._read_file(c, ino)
                except OSError as exc:
                    self._warn(f"{os.fsdecode(path)}: cannot read ({exc.strerror}); skipped")
                    self._lost_name(st)
                    return None
        elif stat.S_ISLNK(st.st_mode):
            last = self._unchanged(c)
            try:
                target = last.target if last is not None else os.readlink(path)
            except OSError as exc:
                self._warn(f"{os.fsdecode(path)}: cannot read link ({exc.strerror}); skipped")
                self._lost_name(st)
                return None
            entry = self._entry(c, ino, target=target)
        else:
            entry = self._entry(c, ino)
        if st.st_nlink > 1:
            self._links[key] = (ino, entry)
        self._remember(c, ino, entry)
        return entry

    def _read_file(self, c: Node, ino: int) -> Entry:
        """One file's content, cut as one whole-file write would cut it: read, cut and hashed
        here, or taken from the reader process. Its chunks go into the group."""
        path = _join(self.src, c.rel)
        got = self._reader.take(path) if self._reader is not None else None
        if isinstance(got, OSError):
            raise got
        extents: list[Extent] = []
        if got is None:
            size, after, xattrs = self._read_here(path, c.st.st_size, extents)
        else:
            size, after, xattrs = len(got.data), got.after, got.xattrs
            chunk = self.group.chunk
            view = memoryview(got.data)
            for offset, n, digest in got.pieces:
                if digest is not None:  # else all zeros: a hole
                    chunk(digest, view[offset : offset + n])
                    extents.append(Extent(offset, n, digest))
            self._count_read(size)
            self._flush_if_full()
        st = c.st
        if after != (st.st_size, st.st_mtime_ns) or size != st.st_size:
            self._warn(f"{os.fsdecode(path)}: changed while being read; stored as read")
            c.changed = True
        data_bytes = sum(x.length for x in extents)
        content: dict[str, Any] = {"size": size, "data_bytes": data_bytes, "xattrs": xattrs}
        if len(extents) > INLINE_EXTENTS:
            plain = treeobjects.encode_manifest(extents)
            digest = digest_of(plain)
            refs = [x.digest for x in extents]
            self.group.obj(_Object(digest, layout.KIND_MANIFEST, plain, refs))
            return self._entry(c, ino, digest=digest, **content)
        return self._entry(c, ino, extents=tuple(extents), **content)

    def _read_here(
        self, path: bytes, expected: int, extents: list[Extent]
    ) -> tuple[int, tuple[int, int], tuple[tuple[bytes, bytes], ...]]:
        """Read, cut and hash one file in this process, appending its extents (the group is
        flushed in the middle of a large file). Returns its size as read, (st_size,
        st_mtime_ns) after reading, and its xattrs."""
        fd = open_noatime(path)
        size = 0
        try:
            for piece, data in self.pipeline.cut_stream(self._blocks(fd, expected)):
                size = piece.offset + piece.length
                if piece.digest is not None:  # else all zeros: a hole
                    self.group.chunk(piece.digest, data)
                    extents.append(Extent(piece.offset, piece.length, piece.digest))
                self._flush_if_full()
            after = os.fstat(fd)
            return size, (after.st_size, after.st_mtime_ns), read_xattrs(fd)
        finally:
            os.close(fd)

    def _blocks(self, fd: int, size: int) -> Iterator[bytes]:
        """The file's bytes in blocks. Each read asks for what stat said is left (plus a
        page, to meet the end): os.read allocates the whole size asked for, and an 8 MiB
        buffer per small file would cost more than reading it."""
        pos = 0
        while block := os.read(fd, min(READ_BLOCK, max(size - pos, 0) + 4096)):
            pos += len(block)
            self._count_read(len(block))
            yield block

    def _count_read(self, n: int) -> None:
        self.result.bytes_read += n
        self.progress.bytes += n
        self._report()

    def _entry(self, n: Node, ino: int, **content: Any) -> Entry:
        """``n``'s entry: its lstat, xattrs and ``content`` (digest, extents or target; a
        file's size, data bytes and xattrs as read). ``st_nlink`` counts names inside the
        source."""
        st = n.st
        nlink = st.st_nlink
        if stat.S_ISDIR(st.st_mode):
            nlink = 2 + sum(1 for c in n.children or () if c.children is not None)
        elif nlink > 1:
            nlink = self._names[(st.st_dev, st.st_ino)]
        size = content.pop("size", st.st_size if stat.S_ISREG(st.st_mode) else 0)
        if "target" in content:
            size = len(content["target"])
        last = self._unchanged(n)  # its atime then: reading it since may have moved it
        xattrs = content.pop("xattrs", None)
        if xattrs is None:
            xattrs = last.xattrs if last is not None else n.xattrs
        if xattrs is None:
            xattrs = read_xattrs(_join(self.src, n.rel))
        return Entry(
            n.name,
            ino,
            st.st_mode,
            nlink,
            st.st_uid,
            st.st_gid,
            st.st_rdev if (stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)) else 0,
            size,
            content.pop("data_bytes", 0),
            last.atime_ns if last is not None else st.st_atime_ns,
            st.st_mtime_ns,
            st.st_ctime_ns,
            xattrs=xattrs,
            **content,
        )

    def _lost_name(self, st: os.stat_result) -> None:
        """A name the scan counted is not imported after all: the names read after it count
        one link less. (A name lost after another name of its inode was stored is still
        counted in that one's st_nlink.)"""
        if st.st_nlink > 1:
            self._names[(st.st_dev, st.st_ino)] -= 1

    def _count_unchanged(self, st: os.stat_result) -> None:
        """One more file not read: an inode counts once, whichever of its names is met."""
        if st.st_nlink > 1:
            if (st.st_dev, st.st_ino) in self._counted:
                return
            self._counted.add((st.st_dev, st.st_ino))
        self.result.files_unchanged += 1

    def _unchanged(self, n: Node) -> Seen | None:
        """What the last import saw of ``n``, if ``n`` looks untouched since (asked once)."""
        last = n.last
        if last is _ASK:
            last = self._last.get(n.rel)
            last = n.last = last if last is not None and last.matches(n.st) else None
        return last

    def _remember(self, n: Node, ino: int, entry: Entry, totals: Totals | None = None) -> None:
        st = n.st
        if n.changed:
            self.seen[n.rel] = Seen(ino)
            return
        digest = entry.digest if _is_reg(n) or n.children is not None else b""
        sums = (totals.files, totals.dirs, totals.bytes) if totals else (0, 0, 0)
        self.seen[n.rel] = Seen(
            ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino,
            entry.atime_ns, entry.data_bytes, digest,
            tuple((x.offset, x.length, x.digest) for x in entry.extents), entry.target, sums,
            entry.xattrs,
        )  # fmt: skip

    # -- applying -------------------------------------------------------------------------

    def _flush_if_full(self) -> None:
        if self.group.full():
            self._flush()

    def _flush(self) -> None:
        """Apply the group gathered before this one; find which of this group's chunks are
        new and start compressing them (in the pool, while the next group is read)."""
        self._apply(self.waiting)
        group = self.waiting = self.group
        self.group = _Group()
        candidates = list(group.plain)

        def pick(tx: Tx) -> list[bytes]:
            return [d for d in candidates if not self.store.has_object(tx, d)]

        # Small chunks go to packs, compressed together at commit; the others are
        # compressed here, in the pool.
        new = self.access.read(pick) if candidates else []
        group.new = [d for d in new if not packable(len(group.plain[d]))]
        group.encoded = self.pipeline.compress_async([group.plain[d] for d in group.new])

    def _apply(self, group: _Group | None) -> None:
        if group is None:
            return
        values = dict(zip(group.new, group.encoded.result(), strict=True))
        store = self.store

        def run(tx: Tx) -> Counter:
            pins: Counter[bytes] = Counter()
            for kind, op in group.ops:
                if kind == "chunk":
                    digest, n = op
                    store.add_ref(tx, digest, values.get(digest), n, group.plain[digest])
                    pins[digest] += 1
                elif kind == "hold":
                    for digest in op:
                        store.add_ref(tx, digest, None, 0)
                        pins[digest] += 1
                else:
                    _take_over(store, tx, op, pins)
            _pin(tx, store, pins)
            return pins

        self.held.update(self.access.write(run))
        self.held = +self.held  # drop zero counts

    def _stored_bytes(self) -> int:
        return self.access.read(lambda tx: tx.get_u64(layout.STAT_STORED_BYTES))

    def measure_new_bytes(self) -> None:
        """Set ``bytes_new`` from the store's counter: small chunks are packed (and their
        compressed size known) only at commit, so call this after the last commit."""
        self.result.bytes_new = max(0, self._stored_bytes() - self._stored_before)

    def record(self, name: bytes, created_ns: int | None = None) -> Snapshot:
        """Name the built tree as snapshot ``name`` (the record takes the import's
        reference on the root tree), then save the files cache."""
        assert self.root is not None
        root, totals = self.root, self.totals
        t = time.time_ns() if created_ns is None else created_ns

        def run(tx: Tx) -> Snapshot:
            snap = snapshots.record(tx, self.store, name, root, totals, t, take_ref=False)
            _pin(tx, self.store, Counter({root.digest: -1}))
            return snap

        snap = self.access.write(run)
        self.held[root.digest] -= 1
        self.held = +self.held
        try:
            if self.seen != self._last.rows:  # (a Seen equals its plain tuple)
                filescache.save(self.store.path, self.src, self.seen, self.selection.key())
        except OSError as exc:
            self._warn(f"could not save the files cache ({exc.strerror}); next import reads all")
        self.measure_new_bytes()
        self.result.snapshot = snapshots.describe(snap)
        self.result.seconds = time.monotonic() - self._started
        return snap

    def abort(self) -> None:
        """Give back every reference the import still holds."""
        held = self.held
        self.held = Counter()
        if not held:
            return

        def run(tx: Tx) -> None:
            _pin(tx, self.store, Counter({d: -n for d, n in held.items()}))
            for digest, n in held.items():
                for _ in range(n):
                    treeobjects.release(self.store, tx, digest)

        self.access.write(run)

    # -- reporting ------------------------------------------------------------------------

    def _warn(self, text: str) -> None:
        self.result.warnings.append(text)

    def _report(self, force: bool = False) -> None:
        if self.on_progress is None:
            return
        now = time.monotonic()
        if force or now - self._reported >= PROGRESS_EVERY:
            self._reported = now
            self.on_progress(self.progress)


def _take_over(store: Store, tx: Tx, o: _Object, pins: Counter) -> None:
    """Store object ``o`` holding the references the import held on its children, or, if it
    exists, hold it once more and release those."""
    for ref in o.refs:
        pins[ref] -= 1
    pins[o.digest] += 1
    if store.has_object(tx, o.digest):
        store.add_ref(tx, o.digest, None, 0)
        for ref in o.refs:
            treeobjects.release(store, tx, ref)
        return
    store.add_ref(tx, o.digest, None, len(o.plain), o.plain, o.kind)


def _pin(tx: Tx, store: Store, delta: Counter) -> None:
    """Change the import's pin counts (the references it holds) by ``delta``."""
    for digest, n in delta.items():
        if n:
            snapshots.adjust_pin(tx, digest, n)


def _reserve_inos(tx: Tx, count: int) -> int:
    """Take ``count`` inode numbers from the live tree's counter (so a rollback to an imported
    snapshot never mistakes one of its inodes for a live one); returns the first."""
    base = tx.get_u64(layout.META_NEXT_INO)
    tx.put(b"meta", layout.META_NEXT_INO, layout.u64(base + count))
    return base


class _InoGiver:
    """Snapshot inode numbers: the last import's for a path it had, else fresh ones."""

    def __init__(self, last: dict[bytes, Seen], base: int) -> None:
        self.last = last
        self.next = base

    def give(self, rel: bytes) -> int:
        seen = self.last.get(rel)
        if seen is not None:
            return seen.ino
        self.next += 1
        return self.next - 1


def _is_reg(n: Node) -> bool:
    return stat.S_ISREG(n.st.st_mode)


def _small_file(n: Node) -> bool:
    """A regular file the reader process would read for the import."""
    return stat.S_ISREG(n.st.st_mode) and n.st.st_size <= contentreader.SMALL_FILE


def _walk_all(root: Node) -> Iterator[Node]:
    stack = [root]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n.children or ())


def _walk_files(root: Node) -> Iterator[Node]:
    return (n for n in _walk_all(root) if n.children is None)


# Offline, the import commits its group-commit batch every this many bytes: one batch of a
# large import would hold all of it in dirty pages (and lose all of it to a failed commit).
BATCH_BYTES = 64 << 20


def import_offline(
    store: Store,
    src: str,
    name: bytes,
    *,
    selection: Selection = WHOLE_TREE,
    progress: Callable[[Progress], None] | None = None,
) -> ImportResult:
    """Import ``src`` as snapshot ``name`` into a store this process holds as its one writer
    (no mount). Pins a killed import left are released first: no one else holds any."""
    with store.read() as tx:
        snapshots.check_free(tx, name)
    store.run_write(lambda tx: snapshots.drop_pins(tx, store))

    def write(fn: Callable[[Tx], T]) -> T:
        result = store.run_write(fn)
        if store.batch_written > BATCH_BYTES:
            store.commit_batch(durable=False)
            store.begin_batch()
        return result

    pipeline = Pipeline(store)
    access = Access(Access.direct(store).read, write)
    importer = Importer(store, access, pipeline, src, selection=selection, progress=progress)
    store.begin_batch()
    try:
        importer.run()
        importer.record(name)
        store.commit_batch(durable=True)
        importer.measure_new_bytes()  # the commit packed the last small chunks: count them
    except BaseException:
        store.abort_batch()
        store.run_write(lambda tx: snapshots.drop_pins(tx, store))
        raise
    finally:
        pipeline.close()
    return importer.result
