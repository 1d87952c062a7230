"""``user.casfs.digest`` (casfs.tree.identity): equal for two files exactly when their bytes
are equal, whatever way the bytes were written; found from the chunk list when the file's
chunks are one whole-file cut (no reading), by reading it when the file carries the ``recut``
mark.

Library level: every way of building a file's content (one write, appends, out-of-order
writes, overwrites, holes, truncation, snapshots put back by restore and rollback, a property
test over random write/truncate sequences) gives the digest of the same bytes cut afresh.
Mount level: the xattr through the kernel, in ``.snap``, from ``casfs digest`` (also of
local files with ``--store``) and for files ``casfs import`` stored agrees with ``cmp``.
"""

from __future__ import annotations

import errno
import os
import random
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import (
    CasfsMount,
    assert_fsck_clean,
    casfs_cli,
    casfs_mount,
    read_file,
    write_all,
    write_file,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from casfs.store import layout
from casfs.store.store import Store
from casfs.tree import identity, restore, snapshots
from casfs.tree.fs import ROOT_INO, Filesystem
from casfs.tree.treeobjects import Entry

KiB, MiB = 1 << 10, 1 << 20
UID = GID = 0
XATTR = identity.XATTR.decode()


# -- helpers ----------------------------------------------------------------------------------


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def reference(fs: Filesystem, data: bytes) -> bytes:
    """The digest of ``data`` cut afresh, as if read from a file."""
    return identity.run(identity.by_reading(fs.pipeline, len(data), lambda o, n: data[o : o + n]))


def digest(fs: Filesystem, ino: int) -> bytes:
    return identity.run(fs.digest_steps(ino))


def is_recut(fs: Filesystem, ino: int) -> bool:
    with fs.store.read() as tx:
        return tx.get(b"recut", layout.ino_key(ino)) is not None


def whole(fs: Filesystem, ino: int) -> bytes:
    return fs.read(ino, 0, fs.getattr(ino).size)


_names = iter(range(1 << 30))


def new_file(fs: Filesystem, name: bytes | None = None) -> int:
    name = name or b"f%d" % next(_names)
    return fs.create(ROOT_INO, name, 0o644, UID, GID).ino


def snap(fs: Filesystem, name: bytes, t: int = 1) -> None:
    fs.store.run_write(lambda tx: snapshots.create(tx, fs.store, fs.merkle, name, t))


def snap_entry(fs: Filesystem, name: bytes, path: bytes) -> Entry:
    with fs.store.read() as tx:
        return restore.resolve(fs.store, tx, snapshots.find(tx, name).root, path, name)


def snap_digest(fs: Filesystem, name: bytes, path: bytes) -> bytes:
    """A snapshot file's digest, as the mount works it out for ``.snap/NAME/PATH``."""
    entry = snap_entry(fs, name, path)
    with fs.store.read() as tx:
        extents = fs._snapshot_extents(tx, entry)

    def read(off: int, n: int) -> bytes:
        with fs.store.read() as tx:
            return fs.content.read_job(tx, 0, entry.size, off, n, extents).assemble()

    return identity.run(identity.steps(fs.pipeline, entry.size, extents, entry.recut, read))


def rollback(fs: Filesystem, name: bytes) -> None:
    fs.store.run_write(lambda tx: restore.rollback(fs, tx, name))


def pieces(data_len: int, rng: random.Random, sizes: Callable[[], int]) -> list[tuple[int, int]]:
    """(offset, length) pieces covering [0, data_len) in order."""
    out, pos = [], 0
    while pos < data_len:
        n = min(sizes(), data_len - pos)
        out.append((pos, n))
        pos += n
    return out


@pytest.fixture(scope="module")
def fs16(tmp_path_factory) -> Iterator[Filesystem]:
    """A store with 16 KiB chunks (4..64 KiB): many cut points in little data."""
    store = Filesystem.create_store(
        str(tmp_path_factory.mktemp("fs16") / "store"), chunk_avg=16 * KiB
    )
    fs = Filesystem(store)
    try:
        yield fs
    finally:
        fs.close()
        store.close()


# -- 1. library: every way of building content gives the digest of the bytes ------------------

# Each builder makes an empty file hold ``data``; it returns whether the file must carry the
# recut mark afterwards (None: either is right, e.g. appends after a zero chunk).
Builder = Callable[[Filesystem, int, bytes, random.Random], "bool | None"]


def one_write(fs, ino, data, rng):
    if data:
        fs.write(ino, 0, data)
    return False


def appends(fs, ino, data, rng):
    """Sequential appends of 1 B .. 3 MiB."""
    sizes = [lambda: rng.randint(1, 64), lambda: rng.randint(1, 100 * KiB)]
    sizes.append(lambda: rng.randint(1, 3 * MiB))
    for off, n in pieces(len(data), rng, lambda: rng.choice(sizes)()):
        fs.write(ino, off, data[off : off + n])
    return None if bytes(16 * KiB) in data else False


def random_order(fs, ino, data, rng):
    parts = pieces(len(data), rng, lambda: rng.randint(1, 400 * KiB))
    rng.shuffle(parts)
    for off, n in parts:
        fs.write(ino, off, data[off : off + n])
    return True if parts != sorted(parts) else None


def overwrite_middle(fs, ino, data, rng):
    """The middle written wrong first, then right (an overwrite inside the file)."""
    if not data:
        return False
    lo = rng.randint(0, len(data) - 1)
    hi = rng.randint(lo + 1, len(data))
    wrong = bytearray(data)
    wrong[lo:hi] = bytes(b ^ 0x5A for b in data[lo:hi])
    fs.write(ino, 0, bytes(wrong))
    fs.write(ino, lo, data[lo:hi])
    return True


def past_eof(fs, ino, data, rng):
    """Content with long zero runs: its other runs written at their offsets, each past the
    end (holes between), the end set by truncate (trailing zeros). Other content: the second
    half first (past the end), then the first."""
    if re.search(rb"\0{65536}", data) or not data.strip(b"\0"):
        pos = 0
        gaps = [(z.start(), z.end()) for z in re.finditer(rb"\0{65536,}", data)]
        for start, end in [*gaps, (len(data), len(data))]:
            if pos < start:
                fs.write(ino, pos, data[pos:start])
            pos = end
        fs.setattr(ino, size=len(data))
        return None
    half = len(data) // 2
    fs.write(ino, half, data[half:])
    if half:
        fs.write(ino, 0, data[:half])
    return bool(half)


def truncate_shrink(fs, ino, data, rng):
    """Written longer, then cut to size (keeps the whole-file cut)."""
    fs.write(ino, 0, data + rand(rng.randint(1, 500 * KiB), rng.random()))
    fs.setattr(ino, size=len(data))
    return None if not data else False


def grow_only(fs, ino, data, rng):
    """All but the trailing zeros written in order, then grown to size by truncate."""
    body = data.rstrip(b"\0")
    if body:
        fs.write(ino, 0, body)
    fs.setattr(ino, size=len(data))
    return bool(body) and len(body) < len(data)


def truncate_grow(fs, ino, data, rng):
    """A prefix, grown by truncate (zeros), the rest written over the zeros."""
    k = rng.randint(0, len(data))
    if k:
        fs.write(ino, 0, data[:k])
    fs.setattr(ino, size=len(data))
    if data[k:]:
        fs.write(ino, k, data[k:])
    return None


def truncate_dance(fs, ino, data, rng):
    """Shrink and grow again and again, then the bytes written back."""
    fs.write(ino, 0, rand(len(data) + 1000, 99))
    k = rng.randint(0, len(data))
    fs.setattr(ino, size=k // 2)
    fs.setattr(ino, size=len(data) + 5000)
    fs.setattr(ino, size=k)
    fs.setattr(ino, size=len(data))
    fs.write(ino, 0, data[:k] or b"\0")
    if data[k:]:
        fs.write(ino, k, data[k:])
    fs.setattr(ino, size=len(data))
    return None


BUILDERS: list[Builder] = [
    one_write, appends, random_order, overwrite_middle, past_eof,
    truncate_shrink, grow_only, truncate_grow, truncate_dance,
]  # fmt: skip


def _holes() -> bytes:
    return (
        rand(700 * KiB + 17, 1) + bytes(1536 * KiB) + rand(300 * KiB, 2) + bytes(3) + rand(5, 3)
        + bytes(900 * KiB)
    )  # fmt: skip


CONTENTS: dict[str, Callable[[], bytes]] = {
    "random_3m": lambda: rand(3 * MiB + 12345, 7),
    "zero_runs_middle_and_end": _holes,
    "one_byte": lambda: b"x",
    "small": lambda: rand(5000, 8),
    "all_zero": lambda: bytes(2 * MiB + 1),
    "empty": lambda: b"",
}


@pytest.mark.parametrize("name", list(CONTENTS))
def test_every_way_of_writing_gives_the_digest_of_the_bytes(fs, name):
    data = CONTENTS[name]()
    want = reference(fs, data)
    rng = random.Random(name)
    for build in BUILDERS:
        ino = new_file(fs)
        recut = build(fs, ino, data, rng)
        assert whole(fs, ino) == data, build.__name__
        if recut is not None:
            assert is_recut(fs, ino) == recut, build.__name__
        assert digest(fs, ino) == want, f"{build.__name__}: digest differs from the bytes'"
    # all zeros made by truncate alone: no extent at all
    if not data.strip(b"\0"):
        ino = new_file(fs)
        fs.setattr(ino, size=len(data))
        assert not is_recut(fs, ino)
        assert digest(fs, ino) == want
    # other bytes, other digests: one byte changed, one byte more or less
    others = [data + b"\0", data + b"x"]
    if data:
        flipped = bytearray(data)
        flipped[len(data) // 3] ^= 1
        others += [bytes(flipped), data[:-1]]
    for other in others:
        ino = new_file(fs)
        one_write(fs, ino, other, rng)
        assert digest(fs, ino) != want
        assert digest(fs, ino) == reference(fs, other)


def test_overwrite_in_the_middle_marks_recut_and_is_digested_by_reading(fs):
    data = rand(2 * MiB, 11)
    ino = new_file(fs)
    fs.write(ino, 0, data)
    assert not is_recut(fs, ino)
    seq = digest(fs, ino)
    fs.write(ino, MiB, b"patch")
    assert is_recut(fs, ino)
    patched = data[:MiB] + b"patch" + data[MiB + 5 :]
    assert digest(fs, ino) == reference(fs, patched) != seq
    fs.write(ino, MiB, data[MiB : MiB + 5])  # the old bytes back: the old digest
    assert is_recut(fs, ino)
    assert digest(fs, ino) == seq
    fs.setattr(ino, size=0)  # emptied: the mark goes
    assert not is_recut(fs, ino)


def test_cuts_at_chunk_boundaries(fs16):
    """Truncating or appending right at, before or after a cut point of the whole-file cut
    (FastCDC's cut decision reads the byte after the cut: off-by-one territory)."""
    fs = fs16
    data = rand(400 * KiB, 12)
    cuts, pos = [], 0
    for n in fs.pipeline.chunker.cut(data):
        pos += n
        cuts.append(pos)
    points = sorted({p + d for p in cuts[:-1][:12] for d in (-2, -1, 0, 1, 2)} | {1, 2, 3})
    for p in points:
        # the first p bytes by truncating the whole
        ino = new_file(fs)
        fs.write(ino, 0, data)
        fs.setattr(ino, size=p)
        assert not is_recut(fs, ino)
        assert digest(fs, ino) == reference(fs, data[:p]), f"truncate to {p}"
        # the whole by appending to the first p bytes
        ino = new_file(fs)
        fs.write(ino, 0, data[:p])
        fs.write(ino, p, data[p:])
        assert not is_recut(fs, ino)
        assert digest(fs, ino) == reference(fs, data), f"append at {p}"


def test_holes_in_the_middle_and_at_the_end(fs):
    data = _holes()
    want = reference(fs, data)
    a = new_file(fs)
    one_write(fs, a, data, None)
    with fs.store.read() as tx:
        stored = fs.content.extents(tx, a)
    assert sum(e.length for e in stored) < len(data) - 3 * MiB // 2  # zero runs: holes
    assert digest(fs, a) == want
    # the same bytes as data, a write past the end, and a truncate for the trailing zeros
    b = new_file(fs)
    fs.write(b, 0, data[: 700 * KiB + 17])
    tail = data.rstrip(b"\0")
    start = 700 * KiB + 17 + 1536 * KiB
    fs.write(b, start, tail[start:])
    assert is_recut(fs, b)
    fs.setattr(b, size=len(data))
    assert whole(fs, b) == data
    assert digest(fs, b) == want
    # one zero byte less at the end is other content
    c = new_file(fs)
    fs.write(c, 0, data[:-1])
    assert digest(fs, c) != want


def test_empty_and_truncated_to_empty(fs):
    want = reference(fs, b"")
    a = new_file(fs)
    assert digest(fs, a) == want
    b = new_file(fs)
    fs.write(b, 100, b"later")  # past the end: recut
    assert is_recut(fs, b)
    fs.setattr(b, size=0)
    assert not is_recut(fs, b)
    assert digest(fs, b) == want
    c = new_file(fs)
    fs.setattr(c, size=10)
    assert digest(fs, c) != want
    assert digest(fs, c) == reference(fs, bytes(10))


# -- snapshots put back: restore (place) and rollback (reset) ------------------------------


def test_restore_and_rollback_keep_the_digest(fs):
    seq_data, recut_data = rand(3 * MiB, 21), rand(3 * MiB, 22)
    seq = new_file(fs, b"seq")
    fs.write(seq, 0, seq_data)
    rec = new_file(fs, b"rec")
    fs.write(rec, 1500 * KiB, recut_data[1500 * KiB :])
    fs.write(rec, 0, recut_data[: 1500 * KiB])
    assert is_recut(fs, rec) and not is_recut(fs, seq)
    want_seq, want_rec = reference(fs, seq_data), reference(fs, recut_data)
    assert (digest(fs, seq), digest(fs, rec)) == (want_seq, want_rec)
    snap(fs, b"s")
    assert snap_entry(fs, b"s", b"rec").recut and not snap_entry(fs, b"s", b"seq").recut
    assert snap_digest(fs, b"s", b"seq") == want_seq
    assert snap_digest(fs, b"s", b"rec") == want_rec

    # change both (one sequential append, one truncate), roll back: the same digests
    fs.write(seq, len(seq_data), b"more")
    fs.setattr(rec, size=MiB)
    fs.write(rec, 0, b"changed")
    assert digest(fs, seq) != want_seq and digest(fs, rec) != want_rec
    rollback(fs, b"s")
    assert whole(fs, seq) == seq_data and whole(fs, rec) == recut_data
    assert is_recut(fs, rec) and not is_recut(fs, seq)
    assert (digest(fs, seq), digest(fs, rec)) == (want_seq, want_rec)

    # restore to new names: place() copies the extents and the mark
    fs.store.run_write(lambda tx: restore.restore(fs, tx, b"s", b"rec", b"rec_copy", False))
    fs.store.run_write(lambda tx: restore.restore(fs, tx, b"s", b"seq", b"seq_copy", False))
    rec_copy = fs.lookup(ROOT_INO, b"rec_copy").ino
    seq_copy = fs.lookup(ROOT_INO, b"seq_copy").ino
    assert is_recut(fs, rec_copy) and not is_recut(fs, seq_copy)
    assert (digest(fs, rec_copy), digest(fs, seq_copy)) == (want_rec, want_seq)
    # restored over a file with other bytes (reset of a replaced name is place again)
    fs.store.run_write(lambda tx: restore.restore(fs, tx, b"s", b"rec", b"seq_copy", True))
    assert digest(fs, fs.lookup(ROOT_INO, b"seq_copy").ino) == want_rec
    # the same bytes written in order: the same digest as the recut copy
    again = new_file(fs)
    fs.write(again, 0, recut_data)
    assert digest(fs, again) == digest(fs, rec_copy)
    assert_fsck_clean(fs.store)


def test_rollback_to_a_grown_file_with_the_same_extents(fs):
    data = rand(100_000, 31)
    ino = new_file(fs)
    fs.write(ino, 0, data)
    fs.setattr(ino, size=150_000)  # grown by truncate: recut
    assert is_recut(fs, ino)
    snap(fs, b"grown")
    fs.setattr(ino, size=0)
    fs.write(ino, 0, data)  # the same extents again, not recut, 100000 bytes
    assert not is_recut(fs, ino)
    rollback(fs, b"grown")
    assert whole(fs, ino) == data + bytes(50_000)
    assert digest(fs, ino) == reference(fs, data + bytes(50_000))


def test_snapshot_after_rollback_of_a_file_whose_mtime_was_set_back(fs):
    ino = new_file(fs, b"f")
    fs.write(ino, 0, b"A" * 1000)
    m1 = fs.getattr(ino).mtime_ns
    snap(fs, b"s1")
    fs.write(ino, 0, b"B" * 1000)  # same size
    fs.setattr(ino, mtime_ns=m1)  # touch -d / cp -p / rsync -t: the mtime of s1 again
    rollback(fs, b"s1")
    assert whole(fs, ino) == b"A" * 1000
    snap(fs, b"s2", 2)
    assert snap_digest(fs, b"s2", b"f") == digest(fs, ino) == reference(fs, b"A" * 1000)


# -- property: digest equality iff byte equality ---------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 90_000), st.integers(0, 3), st.integers()),
        st.tuples(
            st.just("write"),
            st.floats(0, 1.3),
            st.integers(1, 90_000),
            st.integers(0, 3),
            st.integers(),
        ),
        st.tuples(st.just("truncate"), st.floats(0, 1.5)),
    ),
    min_size=0,
    max_size=6,
)
B_MODES = ["same_ops", "one_write", "appends", "reversed", "flip_byte", "one_more_zero", "other"]


def payload(n: int, kind: int, seed: int) -> bytes:
    r = random.Random(seed)
    if kind == 0:
        return r.randbytes(n)
    if kind == 1:
        return bytes(n)
    if kind == 2:  # few distinct bytes: other runs may well be equal
        return bytes([r.choice(b"ab")]) * n
    b = bytearray(r.randbytes(n))
    z = r.randint(0, n)
    at = r.randint(0, n - z)
    b[at : at + z] = bytes(z)
    return bytes(b)


def apply_ops(fs: Filesystem, ino: int, ops: list) -> bytes:
    model = bytearray()
    for op in ops:
        if op[0] == "truncate":
            size = int(op[1] * len(model)) if model else int(op[1] * 50_000)
            fs.setattr(ino, size=size)
            del model[size:]
            model.extend(bytes(size - len(model)))
            continue
        if op[0] == "append":
            _, n, kind, seed = op
            off = len(model)
        else:
            _, frac, n, kind, seed = op
            off = int(frac * len(model))
        data = payload(n, kind, seed)
        fs.write(ino, off, data)
        model.extend(bytes(max(0, off - len(model))))
        model[off : off + n] = data
    return bytes(model)


def build_b(fs: Filesystem, ino: int, mode: str, a: bytes, ops: list, other: list, seed: int):
    rng = random.Random(seed)
    if mode == "same_ops":
        return apply_ops(fs, ino, ops)
    if mode == "other":
        return apply_ops(fs, ino, other)
    target = a
    if mode == "flip_byte" and a:
        flipped = bytearray(a)
        flipped[rng.randrange(len(a))] ^= 1 << rng.randrange(8)
        target = bytes(flipped)
    if mode == "one_more_zero":
        target = a + b"\0"
    if mode == "appends":
        for off, n in pieces(len(target), rng, lambda: rng.randint(1, 40_000)):
            fs.write(ino, off, target[off : off + n])
    elif mode == "reversed":
        for off, n in reversed(pieces(len(target), rng, lambda: rng.randint(1, 40_000))):
            fs.write(ino, off, target[off : off + n])
    elif target:
        fs.write(ino, 0, target)
    return target


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    ops=OPS,
    other=OPS,
    mode=st.sampled_from(B_MODES),
    seed=st.integers(0, 1 << 30),
)
def test_property_digest_equal_iff_bytes_equal(fs16, ops, other, mode, seed):
    fs = fs16
    a, b = new_file(fs), new_file(fs)
    model_a = apply_ops(fs, a, ops)
    model_b = build_b(fs, b, mode, model_a, ops, other, seed)
    assert whole(fs, a) == model_a and whole(fs, b) == model_b
    da, db = digest(fs, a), digest(fs, b)
    assert da == reference(fs, model_a)
    assert db == reference(fs, model_b)
    assert (da == db) == (model_a == model_b)


# -- 2. no re-reading: a file written in order is digested from its chunk list --------------


def test_digest_steps_read_only_recut_files(fs):
    data = rand(10 * MiB + 3, 41)
    seq = new_file(fs)
    for off, n in pieces(len(data), random.Random(1), lambda: 1 * MiB + 77):
        fs.write(seq, off, data[off : off + n])
    rec = new_file(fs)
    fs.write(rec, 5 * MiB, data[5 * MiB :])
    fs.write(rec, 0, data[: 5 * MiB])
    assert not is_recut(fs, seq) and is_recut(fs, rec)
    want = reference(fs, data)

    reads = []
    real_read = fs.read

    def counting_read(ino: int, off: int, n: int) -> bytes:
        reads.append((ino, off, n))
        return real_read(ino, off, n)

    fs.read = counting_read  # digest_steps binds fs.read when called
    try:
        steps = list(fs.digest_steps(seq))
        assert steps == [want] and reads == [], "a sequential file was read to digest it"
        steps = list(fs.digest_steps(rec))
    finally:
        del fs.read
    assert steps[-1] == want
    assert len(steps) >= 3 and all(s is None for s in steps[:-1]), steps
    assert sum(n for ino, _, n in reads if ino == rec) == len(data)


# -- 3. through a mount ---------------------------------------------------------------------


def getdigest(path: os.PathLike | str | int) -> bytes:
    return os.getxattr(path, XATTR)


def cmp_equal(a: Path, b: Path) -> bool:
    r = subprocess.run(["cmp", "-s", str(a), str(b)], timeout=60)
    assert r.returncode in (0, 1), r
    return r.returncode == 0


def store_digest(m: CasfsMount, *paths: Path) -> list[bytes]:
    r = casfs_cli("digest", "--store", m.store, *paths)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    lines = r.stdout.splitlines()
    assert [line.split("  ", 1)[1] for line in lines] == [str(p) for p in paths]
    return [line.split("  ", 1)[0].encode() for line in lines]


def cli_ok(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    r = casfs_cli(*args)
    assert r.returncode == 0, f"casfs {' '.join(map(str, args))}: {r.stderr.strip()}"
    return r


def _data() -> tuple[bytes, bytes, bytes]:
    """head + a run of zeros + tail: written whole, in pieces, and around a trailing hole."""
    head, tail = rand(1200 * KiB + 5, 51), rand(900 * KiB + 3, 52)
    return head, bytes(700 * KiB), tail


def _write_random_order(path: Path, data: bytes, seed: int) -> None:
    """pwrite()s at random offsets; the second half first and fsync'd, so the store sees
    writes in the middle and before the end (recut)."""
    rng = random.Random(seed)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        half = len(data) // 2
        for lo, hi in ((half, len(data)), (0, half)):
            parts = pieces(hi - lo, rng, lambda: rng.randint(1, 128 * KiB))
            rng.shuffle(parts)
            for off, n in parts:
                assert os.pwrite(fd, data[lo + off : lo + off + n], lo + off) == n
            os.fsync(fd)
    finally:
        os.close(fd)


def _write_around_trailing_hole(path: Path, head: bytes, zeros: int, tail: bytes) -> None:
    """head, then the file grown by truncate (a trailing hole), then tail appended."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, head)
        os.fsync(fd)
        os.ftruncate(fd, len(head) + zeros)
        os.fsync(fd)
    finally:
        os.close(fd)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        write_all(fd, tail)
    finally:
        os.close(fd)


def test_mount_digest_equal_exactly_when_cmp_says_equal(mounted: CasfsMount, tmp_path):
    m = mounted.mnt
    head, zeros, tail = _data()
    data = head + zeros + tail
    local = tmp_path / "local"
    local.mkdir()
    (local / "data").write_bytes(data)
    flipped = bytearray(data)
    flipped[len(head) + 10] = 1  # one byte inside the zero run
    (local / "flipped").write_bytes(bytes(flipped))
    (local / "shorter").write_bytes(data[:-1])
    (local / "trailing").write_bytes(head + zeros)

    # the same bytes four ways
    subprocess.run(
        ["cp", "--sparse=never", str(local / "data"), str(m / "cp")], check=True, timeout=60
    )
    subprocess.run(
        ["dd", f"if={local / 'data'}", f"of={m / 'dd'}", "bs=1000", "status=none"],
        check=True,
        timeout=60,
    )
    _write_random_order(m / "pwrite", data, 53)
    _write_around_trailing_hole(m / "hole_append", head, len(zeros), tail)
    fd = os.open(m / "zeros_append", os.O_WRONLY | os.O_CREAT, 0o644)
    try:  # head + zeros stored (the zeros as holes), then tail appended after them
        write_all(fd, head + zeros)
        os.fsync(fd)
        write_all(fd, tail)
    finally:
        os.close(fd)
    # other bytes
    subprocess.run(
        ["cp", "--sparse=never", str(local / "flipped"), str(m / "flipped")], check=True, timeout=60
    )
    subprocess.run(
        ["cp", "--sparse=never", str(local / "shorter"), str(m / "shorter")], check=True, timeout=60
    )
    write_file(m / "longer", data)
    os.truncate(m / "longer", len(data) + 1)  # one zero byte more
    write_file(m / "empty", b"")
    write_file(m / "zeros", b"")
    os.truncate(m / "zeros", len(data))
    # head + zeros, copied and grown by truncate
    subprocess.run(
        ["cp", "--sparse=never", str(local / "trailing"), str(m / "trailing_cp")],
        check=True,
        timeout=60,
    )
    write_file(m / "trailing_grow", head)
    os.truncate(m / "trailing_grow", len(head) + len(zeros))
    names = [
        "cp", "dd", "pwrite", "hole_append", "zeros_append",  # data
        "trailing_cp", "trailing_grow",  # head + zeros
        "flipped", "shorter", "longer", "empty", "zeros",  # one of a kind each
    ]  # fmt: skip
    for name in ("cp", "dd", "pwrite", "hole_append", "zeros_append"):
        assert read_file(m / name) == data, name

    # the files written out of order really carry the mark (so they are digested by reading)
    cli_ok("snapshot", m, "s1")  # commits: the read-only store below sees everything
    ro = Store(str(mounted.store), writer=False)
    try:
        with ro.read() as tx:
            keys = {n: layout.ino_key(os.stat(m / n).st_ino) for n in names}
            marked = {n for n in names if tx.get(b"recut", keys[n]) is not None}
    finally:
        ro.close()
    assert {"pwrite", "hole_append", "zeros_append", "longer", "trailing_grow"} <= marked
    assert not marked & {"cp", "trailing_cp", "zeros", "empty"}

    live = {n: getdigest(m / n) for n in names}
    in_snap = {n: getdigest(m / ".snap" / "s1" / n) for n in names}
    for i, a in enumerate(names):
        for b in names[i:]:
            same = cmp_equal(m / a, m / b)
            assert (live[a] == live[b]) == same, (a, b, same)
            assert (in_snap[a] == in_snap[b]) == same, (a, b, same)
        assert in_snap[a] == live[a], a
    assert len(set(live.values())) == len(names) - 5  # two groups of equal files

    # casfs digest --store reads local files and digests them as the store would
    got = store_digest(mounted, local / "data", local / "flipped", local / "shorter")
    assert got == [live["cp"], live["flipped"], live["shorter"]]
    # and the same after a remount (nothing remembered in the daemon)
    mounted.remount()
    assert {n: getdigest(m / n) for n in names} == live
    assert getdigest(m / ".snap" / "s1" / "pwrite") == live["cp"]


def test_mount_digest_xattr_is_read_only_and_unlisted(mounted: CasfsMount):
    m = mounted.mnt
    write_file(m / "f", b"content")
    os.mkdir(m / "d")
    os.symlink("f", m / "ln")
    os.mkfifo(m / "fifo")
    os.setxattr(m / "f", "user.mine", b"1")
    d = getdigest(m / "f")
    assert len(d) == 64 and int(d, 16) >= 0
    assert getdigest(m / "ln") == d  # followed
    assert XATTR not in os.listxattr(m / "f")
    assert os.listxattr(m / "f") == ["user.mine"]
    cli_ok("snapshot", m, "s")
    snapf = m / ".snap" / "s" / "f"
    assert getdigest(snapf) == d
    assert XATTR not in os.listxattr(snapf)

    def errno_of(fn, *args, **kwargs) -> int:
        try:
            fn(*args, **kwargs)
        except OSError as exc:
            return exc.errno
        return 0

    for name in (XATTR, "user.casfs.other", "user.casfs."):
        for path in (m / "f", m / "d"):
            assert errno_of(os.setxattr, path, name, b"x") == errno.EPERM, (name, path)
            assert errno_of(os.removexattr, path, name) == errno.EPERM, (name, path)
        for path in (snapf, m / ".snap" / "s" / "d"):
            assert errno_of(os.setxattr, path, name, b"x") == errno.EROFS, (name, path)
            assert errno_of(os.removexattr, path, name) == errno.EROFS, (name, path)
    assert getdigest(m / "f") == d
    assert os.listxattr(m / "f") == ["user.mine"]

    for path in (m, m / "d", m / ".snap", m / ".snap" / "s", m / ".snap" / "s" / "d"):
        assert errno_of(getdigest, path) == errno.ENODATA, path
    for path in (m / "ln", m / ".snap" / "s" / "ln"):
        assert errno_of(os.getxattr, path, XATTR, follow_symlinks=False) == errno.ENODATA
    fd = os.open(m / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert errno_of(getdigest, fd) == errno.ENODATA
    finally:
        os.close(fd)


def test_mount_digest_of_buffered_writes(mounted: CasfsMount, tmp_path):
    m = mounted.mnt
    data = rand(3 * MiB, 61)
    patched = data[:MiB] + b"PATCH" + data[MiB + 5 :]
    (tmp_path / "data").write_bytes(data)
    (tmp_path / "patched").write_bytes(patched)
    (tmp_path / "short").write_bytes(data[: MiB // 2])
    want, want_patched, want_short = store_digest(
        mounted, tmp_path / "data", tmp_path / "patched", tmp_path / "short"
    )
    fd = os.open(m / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        write_all(fd, data[: MiB // 2])  # buffered, not stored yet
        assert getdigest(fd) == want_short
        write_all(fd, data[MiB // 2 :])
        assert getdigest(fd) == want
        assert getdigest(m / "f") == want
        os.pwrite(fd, b"PATCH", MiB)
        assert getdigest(fd) == want_patched
        os.pwrite(fd, data[MiB : MiB + 5], MiB)
        assert getdigest(m / "f") == want
        os.ftruncate(fd, MiB // 2)
        assert getdigest(fd) == want_short
    finally:
        os.close(fd)
    # unlinked but open: still the file's digest
    write_file(m / "g", data)
    fd = os.open(m / "g", os.O_RDWR)
    try:
        os.unlink(m / "g")
        assert getdigest(fd) == want
    finally:
        os.close(fd)


def test_mount_digest_after_rollback_to_a_file_with_the_same_mtime(tmp_path):
    with casfs_mount(tmp_path) as mm:
        m = mm.mnt
        write_file(m / "f", b"A" * 1000)
        st = os.stat(m / "f")
        cli_ok("snapshot", m, "s1")
        write_file(m / "f", b"B" * 2000)
        os.utime(m / "f", ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p / rsync -t would
        before = getdigest(m / "f")
        cli_ok("rollback", m, "s1")
        assert read_file(m / "f") == b"A" * 1000
        assert getdigest(m / "f") == getdigest(m / ".snap" / "s1" / "f") != before


# -- 4. the casfs digest command -------------------------------------------------------------


def test_digest_command(mounted: CasfsMount, tmp_path):
    m = mounted.mnt
    write_file(m / "a", b"alpha")
    write_file(m / "b", b"beta")
    os.mkdir(m / "dir")
    os.symlink("a", m / "link")
    cli_ok("snapshot", m, "s")
    paths = [m / "a", m / "b", m / "link", m / ".snap" / "s" / "a"]
    r = casfs_cli("digest", *paths)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    want = [f"{getdigest(p).decode()}  {p}" for p in paths]
    assert r.stdout.splitlines() == want
    assert r.stdout.endswith("\n") and len(r.stdout.splitlines()[0].split("  ")[0]) == 64

    local = tmp_path / "local_file"
    local.write_bytes(b"alpha")
    missing = tmp_path / "missing"
    r = casfs_cli("digest", m / "a", local, m / "dir", missing, m / "b")
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.splitlines() == [want[0], want[1]]
    errors = r.stderr.splitlines()
    assert len(errors) == 3, r.stderr
    assert "Traceback" not in r.stderr
    for line, path in zip(errors, (local, m / "dir", missing), strict=True):
        assert line.startswith(f"casfs digest: {path}: "), line
    assert "no user.casfs.digest" in errors[0] and "no user.casfs.digest" in errors[1]
    # with --store the local file is read, and digests as the mounted one
    assert store_digest(mounted, local) == [getdigest(m / "a")]
    r = casfs_cli("digest", "--store", mounted.store, local, tmp_path)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert r.stdout == f"{getdigest(m / 'a').decode()}  {local}\n"


# -- 5. import ------------------------------------------------------------------------------


def test_imported_files_digest_as_files_written_through_the_mount(mounted: CasfsMount, tmp_path):
    m = mounted.mnt
    head, zeros, tail = _data()
    src = tmp_path / "src"
    src.mkdir()
    files = {
        "big": head + zeros + tail,
        "small": b"small file",
        "zeros": bytes(300 * KiB),
        "empty": b"",
        "trailing_zeros": head + zeros,
    }
    for name, data in files.items():
        (src / name).write_bytes(data)
    with open(src / "sparse", "wb") as f:  # a real hole on the local disk
        f.write(tail)
        f.truncate(len(tail) + 2 * MiB)
    files["sparse"] = tail + bytes(2 * MiB)
    cli_ok("import", m, src, "--snapshot", "imp")
    os.mkdir(m / "w")
    for name, data in files.items():
        write_file(m / "w" / name, data)
    _write_random_order(m / "w" / "big_random", files["big"], 71)
    imported = {n: getdigest(m / ".snap" / "imp" / n) for n in files}
    for name in files:
        assert read_file(m / ".snap" / "imp" / name) == files[name]
        assert imported[name] == getdigest(m / "w" / name), name
    assert imported["big"] == getdigest(m / "w" / "big_random")
    assert len(set(imported.values())) == len(files)
    assert store_digest(mounted, *(src / n for n in files)) == [imported[n] for n in files]
