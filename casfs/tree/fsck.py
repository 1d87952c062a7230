"""Consistency check: recount every reference from the roots and compare with what is stored.

Runs in one read transaction, so it sees a single committed state even while a mount writes.
Each problem is reported with a kind (``leak``, ``dangling``, ``refcount``, ``nlink``,
``corrupt``, ``stats``, ``structure``) and a one-line message. Orphans (unlinked inodes a
mount still held, or held when it crashed) are not problems: they are the state a crash
leaves by design, freed at the next mount. They are reported as notes.
"""

from __future__ import annotations

import stat
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from casfs.errors import CorruptObject
from casfs.store import layout
from casfs.store.codec import digest_of
from casfs.store.store import Store, Tx
from casfs.tree import snapshots, treeobjects
from casfs.tree.content import file_extents
from casfs.tree.merkle import LiveDigests
from casfs.tree.records import Inode
from casfs.tree.whereused import where_used

ROOT = layout.ROOT_INO
USERS_SHOWN = 20  # paths named per corrupt object


@dataclass
class Problem:
    kind: str
    message: str


@dataclass
class FsckReport:
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)
    inodes: int = 0
    objects: int = 0
    extents: int = 0
    verified_bytes: int = 0

    @property
    def clean(self) -> bool:
        return not self.problems

    def add(self, kind: str, message: str) -> None:
        self.problems.append(Problem(kind, message))

    def note(self, kind: str, message: str) -> None:
        self.notes.append(Problem(kind, message))


def fsck(
    store: Store, verify_data: bool = False, progress: Callable[[str], None] | None = None
) -> FsckReport:
    report = FsckReport()
    with store.read() as tx:
        inodes = _load_inodes(tx)
        report.inodes = len(inodes)
        paths = _check_namespace(tx, inodes, report)
        refs = _check_extents(tx, inodes, report)
        _check_links(tx, inodes, report)
        refs += _check_merkle(store, tx, inodes, paths, report)
        _check_objects(tx, refs, report)
        _check_xattrs(tx, inodes, report)
        _check_recut(tx, inodes, report)
        _check_stats(tx, inodes, report)
        if verify_data:
            _verify_data(store, tx, report, progress)
    return report


def _load_inodes(tx: Tx) -> dict[int, Inode]:
    return {
        layout.read_u64(k): Inode.unpack(layout.read_u64(k), v)
        for k, v in tx.prefix(b"inodes", b"")
    }


def _check_namespace(tx: Tx, inodes: dict[int, Inode], report: FsckReport) -> dict[int, bytes]:
    """Walk the tree from the root; check links, parents, cookies. Returns a path per inode."""
    links: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    paths: dict[int, bytes] = {ROOT: b"/"}
    if ROOT not in inodes or not inodes[ROOT].is_dir:
        report.add("structure", "root directory is missing")
        return paths
    for key, value in tx.prefix(b"dirents", b""):
        parent = layout.read_u64(key[:8])
        name = key[8:]
        child, cookie = layout.read_dirent_value(value)
        where = f"entry {name!r} in directory {parent}"
        if parent not in inodes or not inodes[parent].is_dir:
            report.add("dangling", f"{where}: the directory does not exist")
            continue
        if child not in inodes:
            report.add("dangling", f"{where}: names missing inode {child}")
            continue
        links[child] += 1
        if inodes[child].is_dir:
            subdirs[parent] += 1
            if inodes[child].parent != parent:
                report.add(
                    "structure", f"{where}: directory {child} records parent {inodes[child].parent}"
                )
        back = tx.get(b"dircookies", layout.cookie_key(parent, cookie))
        if back is None or layout.read_cookie_value(back) != (child, name):
            report.add("structure", f"{where}: readdir cookie {cookie} does not match")
        if cookie >= inodes[parent].next_cookie:
            report.add("structure", f"{where}: cookie {cookie} not below the directory's counter")
    for key, value in tx.prefix(b"dircookies", b""):
        parent, cookie = layout.read_cookie_key(key)
        child, name = layout.read_cookie_value(value)
        entry = tx.get(b"dirents", layout.dirent_key(parent, name))
        if entry is None or layout.read_dirent_value(entry) != (child, cookie):
            report.add("leak", f"readdir cookie {cookie} in directory {parent} has no entry")
    # reachability and paths, breadth first from the root
    queue = [ROOT]
    reached = {ROOT}
    while queue:
        parent = queue.pop()
        for key, value in tx.prefix(b"dirents", layout.ino_key(parent)):
            child = layout.read_dirent_value(value)[0]
            if child in inodes and child not in reached:
                reached.add(child)
                paths[child] = paths[parent].rstrip(b"/") + b"/" + key[8:]
                if inodes[child].is_dir:
                    queue.append(child)
    orphans = {layout.read_u64(k) for k, _ in tx.prefix(b"orphans", b"")}
    for ino, inode in inodes.items():
        if ino in reached:
            want = 2 + subdirs[ino] if inode.is_dir else links[ino]
            if inode.nlink != want:
                report.add(
                    "nlink", f"inode {ino} ({paths[ino]!r}) has nlink {inode.nlink}, counted {want}"
                )
        elif inode.nlink == 0 and ino in orphans:
            report.note(
                "orphan", f"inode {ino} is unlinked and not yet freed (freed at next mount)"
            )
        else:
            report.add("leak", f"inode {ino} (nlink {inode.nlink}) is not reachable from the root")
    for ino in orphans - inodes.keys():
        report.add("leak", f"orphan list names missing inode {ino}")
    next_ino = tx.get_u64(layout.META_NEXT_INO)
    if inodes and max(inodes) >= next_ino:
        report.add("structure", f"next inode number {next_ino} is not above inode {max(inodes)}")
    return paths


def _check_extents(tx: Tx, inodes: dict[int, Inode], report: FsckReport) -> Counter[bytes]:
    refs: Counter[bytes] = Counter()
    data_bytes: Counter[int] = Counter()
    last_end: dict[int, int] = {}
    for key, value in tx.prefix(b"extents", b""):
        ino, offset = layout.read_extent_key(key)
        digest, length = layout.read_extent_value(value)
        report.extents += 1
        refs[digest] += 1
        inode = inodes.get(ino)
        if inode is None or not stat.S_ISREG(inode.mode):
            report.add("leak", f"extent at {offset} of inode {ino}, which is not a regular file")
            continue
        if offset < last_end.get(ino, 0):
            report.add("structure", f"inode {ino}: extent at {offset} overlaps the one before")
        if offset + length > inode.size:
            report.add("structure", f"inode {ino}: extent at {offset} ends past the file size")
        last_end[ino] = offset + length
        data_bytes[ino] += length
    for ino, inode in inodes.items():
        if inode.is_reg and inode.data_bytes != data_bytes[ino]:
            report.add(
                "structure",
                f"inode {ino}: data_bytes {inode.data_bytes}, counted {data_bytes[ino]}",
            )
    return refs


def _check_links(tx: Tx, inodes: dict[int, Inode], report: FsckReport) -> None:
    """Each non-directory's parents: the inode's ``parent`` with one link, ``links`` rows
    with more (see :mod:`casfs.tree.parents`)."""
    names: defaultdict[int, Counter[int]] = defaultdict(Counter)
    for key, value in tx.prefix(b"dirents", b""):
        names[layout.read_dirent_value(value)[0]][layout.read_u64(key[:8])] += 1
    rows: defaultdict[int, Counter[int]] = defaultdict(Counter)
    for key, value in tx.prefix(b"links", b""):
        rows[layout.read_u64(key[:8])][layout.read_u64(key[8:16])] = int.from_bytes(value, "big")
    for ino, inode in inodes.items():
        if inode.is_dir or inode.nlink == 0:
            want: Counter[int] = Counter()
        elif inode.nlink == 1:
            want = Counter()
            if names[ino] and set(names[ino]) != {inode.parent}:
                report.add("structure", f"inode {ino} records parent {inode.parent}, "
                           f"named in {sorted(names[ino])}")  # fmt: skip
        else:
            want = names[ino]
        if rows.get(ino, Counter()) != want:
            report.add("structure", f"inode {ino}: link rows {dict(rows.get(ino, {}))}, "
                       f"counted {dict(want)}")  # fmt: skip
    for ino in rows.keys() - inodes.keys():
        report.add("leak", f"link rows of missing inode {ino}")


def _check_merkle(
    store: Store, tx: Tx, inodes: dict[int, Inode], paths: dict[int, bytes], report: FsckReport
) -> Counter[bytes]:
    """References held by cached digests, snapshots, pins and stored tree objects; each
    cached digest must be what the live inode would encode to now."""
    refs: Counter[bytes] = Counter()
    merkle = LiveDigests(store)
    for key, value in tx.prefix(b"treecache", b""):
        ino = layout.read_u64(key)
        digest = bytes(value[:32])
        refs[digest] += 1
        inode = inodes.get(ino)
        where = f"cached digest of inode {ino} ({paths.get(ino, b'?')!r})"
        if inode is None or not (inode.is_dir or inode.is_reg):
            report.add("leak", f"{where}: no such directory or file")
            continue
        want = _recompute(store, tx, merkle, inode)
        if want is None:
            report.add("structure", f"{where}: something below it has no cached digest")
        elif want != digest:
            report.add("structure", f"{where} is stale")
    for name, value in tx.prefix(b"snapshots", b""):
        refs[snapshots.Snapshot.unpack(bytes(name), value).root.digest] += 1
    for digest, value in tx.prefix(b"pins", b""):
        refs[bytes(digest)] += layout.read_u64(value)
    for digest, value in tx.prefix(b"objects", b""):
        kind, _, _ = layout.split_object(value)
        if kind == layout.KIND_CHUNK:
            continue
        try:
            refs.update(treeobjects.refs_of(kind, store.codec.decode(bytes(digest), value)))
        except CorruptObject as exc:
            report.add("corrupt", str(exc))
    for digest, ref in tx.prefix(b"refs", b""):
        at = layout.read_packed_at(ref)
        if at is None or at[2] == layout.KIND_CHUNK:
            continue
        try:
            refs.update(treeobjects.refs_of(at[2], store.load(tx, bytes(digest))))
        except CorruptObject as exc:
            report.add("corrupt", str(exc))
    return refs


def _recompute(store: Store, tx: Tx, merkle: LiveDigests, inode: Inode) -> bytes | None:
    if inode.is_reg:
        return digest_of(treeobjects.encode_manifest(file_extents(tx, inode.ino)))
    entries, totals, missing = merkle.compose(tx, inode, store_manifests=False)
    if missing:
        return None
    return digest_of(treeobjects.encode_tree(entries, totals))


def _check_objects(tx: Tx, counted: Counter[bytes], report: FsckReport) -> None:
    stored: dict[bytes, int] = {}
    in_packs: dict[int, list[int]] = defaultdict(lambda: [0, 0])  # pack: members, bytes
    for digest, value in tx.prefix(b"refs", b""):
        count, size = layout.read_ref_value(value)
        stored[digest] = count
        at = layout.read_packed_at(value)
        if at is not None:
            report.objects += 1
            if tx.get(b"packs", layout.u64(at[0])) is None:
                report.add("dangling", f"object {digest.hex()} is in pack {at[0]}, not stored")
            else:
                in_packs[at[0]][0] += 1
                in_packs[at[0]][1] += size
        elif tx.get(b"objects", digest) is None:
            report.add("dangling", f"object {digest.hex()} is counted but not stored")
        want = counted.get(digest, 0)
        if want == 0:
            report.add(
                "leak", f"object {digest.hex()} has refcount {count} but nothing refers to it"
            )
        elif count != want:
            report.add("refcount", f"object {digest.hex()} has refcount {count}, counted {want}")
    cur = tx.cursor(b"objects")
    for digest in cur.iternext(keys=True, values=False):
        report.objects += 1
        if digest not in stored:
            report.add("leak", f"object {digest.hex()} is stored without a refcount")
    for digest in counted.keys() - stored.keys():
        report.add(
            "dangling", f"object {digest.hex()} is referenced {counted[digest]}x but missing"
        )
    _check_packs(tx, in_packs, report)


def _check_packs(tx: Tx, in_packs: dict[int, list[int]], report: FsckReport) -> None:
    """Every pack holds live chunks and its packstat row counts them; no pack is missing."""
    seen = set()
    for key, value in tx.prefix(b"packstat", b""):
        pack = layout.read_u64(key)
        seen.add(pack)
        live, live_bytes, plain_bytes, stored = layout.read_packstat(value)
        members, size = in_packs.get(pack, (0, 0))
        packed = tx.get(b"packs", key)
        if packed is None:
            report.add("dangling", f"pack {pack} has a packstat row but is not stored")
        elif len(packed) != stored:
            report.add("stats", f"pack {pack} is {len(packed)} bytes, its packstat says {stored}")
        if members == 0:
            report.add("leak", f"pack {pack} holds no live chunk")
        elif (live, live_bytes) != (members, size):
            report.add(
                "refcount",
                f"pack {pack} counts {live} live chunks of {live_bytes} bytes, "
                f"found {members} of {size}",
            )
    for key in tx.cursor(b"packs").iternext(keys=True, values=False):
        if layout.read_u64(key) not in seen:
            report.add("leak", f"pack {layout.read_u64(key)} has no packstat row")


def _check_xattrs(tx: Tx, inodes: dict[int, Inode], report: FsckReport) -> None:
    for key, _ in tx.prefix(b"xattrs", b""):
        ino = layout.read_u64(key[:8])
        if ino not in inodes:
            report.add("leak", f"xattr {key[8:]!r} of missing inode {ino}")


def _check_recut(tx: Tx, inodes: dict[int, Inode], report: FsckReport) -> None:
    for key, _ in tx.prefix(b"recut", b""):
        inode = inodes.get(layout.read_u64(key))
        if inode is None or not inode.is_reg:
            report.add("leak", f"recut mark of inode {layout.read_u64(key)}: no such file")


def _check_stats(tx: Tx, inodes: dict[int, Inode], report: FsckReport) -> None:
    objects = stored = plain = referenced = 0
    for digest, value in tx.prefix(b"refs", b""):
        count, size = layout.read_ref_value(value)
        obj = tx.get(b"objects", digest)
        objects += 1
        stored += len(obj) if obj else 0
        plain += size
        referenced += count * size
    for _, value in tx.prefix(b"packs", b""):
        stored += len(value)
    want = {
        layout.STAT_OBJECTS: objects,
        layout.STAT_STORED_BYTES: stored,
        layout.STAT_PLAIN_BYTES: plain,
        layout.STAT_REFERENCED_BYTES: referenced,
        layout.STAT_INODES: len(inodes),
    }
    for key, value in want.items():
        have = tx.get_u64(key)
        if have != value:
            report.add("stats", f"counter {key.decode()} is {have}, counted {value}")


def _verify_data(
    store: Store, tx: Tx, report: FsckReport, progress: Callable[[str], None] | None
) -> None:
    """Decode every object; name each corrupt one with the live and snapshot files using it."""
    bad: dict[bytes, str] = {}
    members: dict[int, list[tuple[bytes, int, int]]] = defaultdict(list)
    n = 0
    for digest, ref in tx.prefix(b"refs", b""):
        at = layout.read_packed_at(ref)
        if at is not None:
            members[at[0]].append((bytes(digest), at[1], layout.read_ref_value(ref)[1]))
            continue
        n += 1
        try:
            value = store.load_value(tx, bytes(digest))
            report.verified_bytes += len(store.codec.decode(digest, value))
        except CorruptObject as exc:
            bad[bytes(digest)] = str(exc)
        if progress and n % 1000 == 0:
            progress(f"verified {n} objects, {report.verified_bytes >> 20} MiB")
    for pack, chunks in members.items():  # each pack decoded once
        value = tx.get(b"packs", layout.u64(pack))
        if value is None:
            continue  # reported as dangling already
        try:
            plain = store.packer.decode_pack(chunks[0][0], pack, value)
        except CorruptObject as exc:
            bad.update((d, str(exc)) for d, _, _ in chunks)
            continue
        for digest, offset, size in chunks:
            if digest_of(plain[offset : offset + size]) == digest:
                report.verified_bytes += size
            else:
                bad[digest] = str(CorruptObject(digest, "content does not match its digest"))
        n += len(chunks)
        if progress:
            progress(f"verified {n} objects, {report.verified_bytes >> 20} MiB")
    if not bad:
        return
    users = where_used(store, tx, set(bad), USERS_SHOWN)
    for digest in sorted(bad):
        names = ", ".join(users[digest]) or "no file"
        if len(users[digest]) == USERS_SHOWN:
            names += f" (first {USERS_SHOWN})"
        report.add("corrupt", f"{bad[digest]}; used by {names}")
