"""Packs: small objects stored many to one LMDB value, compressed together.

Why: a source tree is mostly files of a few KiB. Stored one value each, every such chunk is
compressed without context (zstd gains little on 3 KiB of text) and costs whole LMDB pages
(values over ~2 KiB go to overflow pages, rounded up to 4 KiB; smaller ones fill B-tree leaves
about two-thirds full). Measured on nine Django releases, one value per chunk took 1.9x the
bytes borg needs; packs of ~128 KiB compress 23 % better than the same chunks alone and waste
one partial page per pack instead of per chunk. borg and restic do the same (segments, pack
files); casfs keeps its packs inside LMDB so that they change in the same transaction as the
references to them.

Life of a packed object (a small chunk, tree object or manifest; "chunk" below):

1. ``add``: its first reference writes its ``refs`` row with the placeholder location
   (pack 0) and keeps its bytes in the transaction's ``pending`` map. Reads in the same
   transaction find it there.
2. ``flush`` (at the outermost commit): the pending chunks still referenced are packed in
   order of arrival, so the files of one directory share packs, each pack compressed
   once; their ``refs`` rows get the real location. A transaction that aborts loses its
   pending map together with its rows, so no pack is ever missing. When the store has a
   thread pool (``submit``), each PACK_TARGET of chunks reaching the outermost transaction
   is compressed there at once, and the commit only puts it: compressing at commit held
   up the mount's request thread (a third of each commit while writing a large file).
3. ``forget`` (its last reference went): the pack's ``packstat`` row counts one member less.
   An empty pack is deleted; once less than half of a pack's bytes are live, its live members
   go back to ``pending`` (packed anew at commit) and the pack is deleted, so dead bytes never
   exceed what live ones take.

Pack ids come from a counter that is never reset, so a decoded pack can be cached by id.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import TYPE_CHECKING

import zstandard

from casfs.errors import CorruptObject
from casfs.store import layout
from casfs.store.codec import Codec, digest_of

if TYPE_CHECKING:
    from casfs.store.store import Tx

# Chunks up to this many plain bytes are packed; larger ones compress well on their own and
# lose less to page rounding (half a page per value on average: on nine Django releases a
# 32 KiB limit left 1,488 chunks as values of ~14 KiB each, 3.3 MB of rounding; 64 KiB
# packs all but 422 of them and stores the releases in 3.7 % fewer bytes).
PACK_OBJECT_MAX = 64 << 10
# Plain bytes per pack: more context compresses better and fewer values round up a page;
# a read of one small file decodes its whole pack (cached, ~0.15 ms for 256 KiB). 128 KiB
# gained 23 % over chunk-alone; 256 KiB stores the nine releases in another 4.4 % less.
PACK_TARGET = 256 << 10
CACHE_BYTES = 16 << 20  # decoded packs kept for reads (readers of one directory share one)

_U32 = struct.Struct(">I")


def packable(length: int) -> bool:
    return 0 < length <= PACK_OBJECT_MAX


def encode_members(members: list[bytes]) -> tuple[bytes, list[int]]:
    """A pack's plain text (u32 n, n u32 lengths, the members end to end) and each member's
    offset in it."""
    head = _U32.pack(len(members)) + b"".join(_U32.pack(len(m)) for m in members)
    offsets = []
    pos = len(head)
    for m in members:
        offsets.append(pos)
        pos += len(m)
    return head + b"".join(members), offsets


def members_of(plain: bytes) -> list[tuple[int, int]]:
    """(offset, length) of each member of a pack's plain text."""
    (n,) = _U32.unpack_from(plain)
    pos = 4 + 4 * n
    out = []
    for i in range(n):
        (length,) = _U32.unpack_from(plain, 4 + 4 * i)
        out.append((pos, length))
        pos += length
    if pos != len(plain):
        raise ValueError(f"pack members take {pos} bytes of {len(plain)}")
    return out


def _runs(items: list[tuple[bytes, bytes]]) -> list[list[bytes]]:
    """Digests of (digest, plain) ``items`` in order, cut into runs of about PACK_TARGET
    plain bytes."""
    out: list[list[bytes]] = [[]]
    size = 0
    for digest, plain in items:
        if size >= PACK_TARGET:
            out.append([])
            size = 0
        out[-1].append(digest)
        size += len(plain)
    return out if out[0] else []


class Packer:
    """The store's packs: adding, reading, freeing and packing chunks (module docstring)."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()
        # Runs a function in a thread pool (a Pipeline's, while one is open), returning a
        # Future; None: packs are compressed at commit.
        self.submit: Callable[..., Future] | None = None

    # -- writing ----------------------------------------------------------------------------

    def add(self, tx: Tx, digest: bytes, plain: bytes | memoryview, kind: int) -> None:
        """A new object: its refs row (one reference) with the pending location."""
        data = bytes(plain)
        tx.pending[digest] = data
        tx.put(b"refs", digest, layout.ref_value(1, len(data), layout.packed_at(0, 0, kind)))
        tx.written += len(data)  # what its pack will put at commit
        if tx.parent is None:
            self.arrived(tx, [(digest, data)])

    def arrived(self, tx: Tx, items: Iterable[tuple[bytes, bytes]]) -> None:
        """(digest, plain) pending chunks reached the outermost transaction ``tx``: compress
        each full run of them in the pool now (flush takes the result if the run is intact)."""
        if self.submit is None:
            return
        for digest, data in items:
            tx.unsealed.append(digest)
            tx.unsealed_bytes += len(data)
            if tx.unsealed_bytes >= PACK_TARGET:
                run, tx.unsealed, tx.unsealed_bytes = tx.unsealed, [], 0
                try:
                    future = self.submit(self._encode, [tx.pending[d] for d in run])
                except RuntimeError:  # the pool was shut down: compress at commit
                    continue
                tx.sealed.append((run, future))

    def _encode(self, members: list[bytes]) -> tuple[bytes, list[int]]:
        """A pack's stored value and its members' offsets (any thread)."""
        plain, offsets = encode_members(members)
        return self.codec.encode(plain, layout.KIND_PACK), offsets

    def flush(self, tx: Tx) -> None:
        """Pack the transaction's pending chunks that are still referenced: the runs already
        compressing in the pool (redone here if a member lost its reference meanwhile), then
        the rest, in order of arrival."""
        runs: list[tuple[list[bytes], Future | None]] = list(tx.sealed)
        covered = {d for run, _ in runs for d in run}
        rest = [(d, data) for d, data in tx.pending.items() if d not in covered]
        runs += [(run, None) for run in _runs(rest)]
        taken: set[bytes] = set()  # a chunk freed and added again sits in two runs
        for run, future in runs:
            group = []  # (digest, plain, refs row) of the members still to be packed
            for digest in run:
                ref = tx.get(b"refs", digest)
                at = layout.read_packed_at(ref) if ref is not None else None
                if at is not None and at[0] == 0 and digest not in taken:
                    taken.add(digest)
                    group.append((digest, tx.pending[digest], ref))
            if not group:
                continue
            if future is not None and len(group) == len(run):
                value, offsets = future.result()
            else:
                value, offsets = self._encode([data for _, data, _ in group])
            pack = tx.get_u64(layout.META_NEXT_PACK) + 1
            tx.add_u64(layout.META_NEXT_PACK, 1)
            key = layout.u64(pack)
            tx.put(b"packs", key, value)
            live = sum(len(data) for _, data, _ in group)
            tx.put(b"packstat", key, layout.packstat_value(len(group), live, live, len(value)))
            for (digest, _, ref), offset in zip(group, offsets, strict=True):
                at = layout.packed_at(pack, offset, layout.read_packed_at(ref)[2])
                tx.put(b"refs", digest, layout.with_location(ref, at))
            tx.add_u64(layout.STAT_STORED_BYTES, len(value))
            self._evict(pack)  # an id from an aborted commit may come again with other bytes
        tx.pending, tx.sealed, tx.unsealed, tx.unsealed_bytes = {}, [], [], 0

    def forget(self, tx: Tx, digest: bytes, at: tuple[int, int, int], length: int) -> None:
        """Packed object ``digest`` lost its last reference (its refs row is gone already)."""
        pack = at[0]
        if pack == 0:
            return  # still pending: flush skips it
        key = layout.u64(pack)
        row = tx.get(b"packstat", key)
        if row is None:
            raise CorruptObject(digest, f"its pack {pack} has no packstat row")
        live, live_bytes, plain_bytes, stored = layout.read_packstat(row)
        live -= 1
        live_bytes -= length
        if live <= 0 or 2 * live_bytes < plain_bytes:
            if live > 0:
                self._repack(tx, pack)
            tx.delete(b"packs", key)
            tx.delete(b"packstat", key)
            tx.add_u64(layout.STAT_STORED_BYTES, -stored)
        else:
            tx.put(b"packstat", key, layout.packstat_value(live, live_bytes, plain_bytes, stored))

    def _repack(self, tx: Tx, pack: int) -> None:
        """Move the live members of ``pack`` back to pending (the caller deletes the pack)."""
        plain = self._plain(tx, pack, layout.u64(pack))
        for offset, length in members_of(plain):
            data = plain[offset : offset + length]
            digest = digest_of(data)
            ref = tx.get(b"refs", digest)
            at = layout.read_packed_at(ref) if ref is not None else None
            if at is not None and at[:2] == (pack, offset):
                tx.pending[digest] = data
                tx.put(b"refs", digest, layout.with_location(ref, layout.packed_at(0, 0, at[2])))

    # -- reading ----------------------------------------------------------------------------

    def read(self, tx: Tx, digest: bytes, at: tuple[int, int, int], length: int) -> bytes:
        """A packed object's plain bytes, not yet verified (the caller's decode verifies)."""
        pack, offset, _ = at
        if pack == 0:
            t: Tx | None = tx
            while t is not None:
                data = t.pending.get(digest)
                if data is not None:
                    return data
                t = t.parent
            raise CorruptObject(digest, "pending in a transaction that is not this one")
        plain = self._plain(tx, pack, digest)
        return plain[offset : offset + length]

    def _plain(self, tx: Tx, pack: int, digest: bytes) -> bytes:
        with self._lock:
            plain = self._cache.get(pack)
            if plain is not None:
                self._cache.move_to_end(pack)
                return plain
        value = tx.get(b"packs", layout.u64(pack))
        if value is None:
            raise CorruptObject(digest, f"its pack {pack} is missing")
        plain = self.decode_pack(digest, pack, value)
        with self._lock:
            if pack not in self._cache:
                self._cache[pack] = plain
                self._cached += len(plain)
                while self._cached > CACHE_BYTES and len(self._cache) > 1:
                    _, old = self._cache.popitem(last=False)
                    self._cached -= len(old)
        return plain

    def decode_pack(self, digest: bytes, pack: int, value: bytes) -> bytes:
        """A pack value's plain text; an error names ``digest`` (the chunk that was wanted)."""
        kind, codec, payload = layout.split_object(value)
        if kind != layout.KIND_PACK:
            raise CorruptObject(digest, f"pack {pack} has kind {kind}")
        if codec == layout.CODEC_RAW:
            return bytes(payload)
        if codec != layout.CODEC_ZSTD:
            raise CorruptObject(digest, f"pack {pack} has unknown codec {codec}")
        try:
            return self.codec.decompress(payload)
        except zstandard.ZstdError as exc:
            raise CorruptObject(digest, f"pack {pack} does not decode ({exc})") from None

    def decoded(self, pack: int) -> bool:
        """``pack`` is in the cache of decoded packs (reading from it costs a slice)."""
        with self._lock:
            return pack in self._cache

    def _evict(self, pack: int) -> None:
        with self._lock:
            old = self._cache.pop(pack, None)
            if old is not None:
                self._cached -= len(old)
