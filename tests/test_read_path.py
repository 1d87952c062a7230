"""Reading content in the pool (Store.read_committed): what the pool cannot see is loaded by
the owner thread, a corrupt chunk is an error, the map is never resized under a reader, and
values read through the map do not stay mapped."""

from __future__ import annotations

import os
import threading
import time

import pytest
from conftest import CasfsMount, flip_byte, mapped_kib

from casfs.errors import CorruptObject
from casfs.store import memory
from casfs.store.codec import digest_of
from casfs.tree.content import ReadRaced
from casfs.tree.fs import ROOT_INO, Filesystem

MiB = 1 << 20


@pytest.fixture
def fs(tmp_path):
    store = Filesystem.create_store(str(tmp_path / "s"))
    f = Filesystem(store, cache_bytes=0)  # no chunk cache: every read goes to the store
    yield f
    f.close()
    store.close()


def chunk_digests(fs: Filesystem, ino: int) -> list[bytes]:
    with fs.store.read() as tx:
        return [e.digest for e in fs.content.extents(tx, ino)]


def test_what_the_pool_cannot_see_is_read_by_the_owner(fs):
    """A batch's chunks are not committed: the pool's own transactions do not see them (None)
    and the owner's transaction, which does, reads them instead."""
    store = fs.store
    data = os.urandom(3 * MiB) + b"text " * 200_000  # large raw chunks and packed small ones
    ino = fs.create(ROOT_INO, b"f", 0o644, 0, 0).ino
    store.begin_batch()
    try:
        fs.write(ino, 0, data)
        digests = chunk_digests(fs, ino)
        assert store.read_committed(digests) == [None] * len(digests)
        assert fs.read(ino, 0, len(data)) == data
    finally:
        store.commit_batch()
    for got, digest in zip(store.read_committed(digests), digests, strict=True):
        assert isinstance(got, bytes) and digest_of(got) == digest
    assert fs.read(ino, 0, len(data)) == data
    assert fs.read(ino, 12345, 2 * MiB) == data[12345 : 12345 + 2 * MiB]


def test_a_corrupt_chunk_read_in_the_pool_is_an_error(fs, tmp_path):
    data = os.urandom(2 * MiB)
    ino = fs.create(ROOT_INO, b"f", 0o644, 0, 0).ino
    fs.write(ino, 0, data)
    store = fs.store
    with store.read() as tx:
        first = fs.content.extents(tx, ino)[0]
    digest = first.digest
    flip_byte(tmp_path / "s" / "data.mdb", data[first.offset : first.end])
    [got] = store.read_committed([digest])
    assert isinstance(got, CorruptObject) and digest.hex() in str(got)
    with pytest.raises(CorruptObject):
        fs.read(ino, 0, MiB)


def test_the_map_is_not_resized_while_the_pool_reads(fs):
    """Growing the map remaps the file: it waits for readers in other threads, and those
    wait for it; reads go on correct while the map keeps growing."""
    store = fs.store
    data = os.urandom(4 * MiB)
    ino = fs.create(ROOT_INO, b"f", 0o644, 0, 0).ino
    fs.write(ino, 0, data)
    grown = threading.Event()
    with store.map_users.shared():
        t = threading.Thread(target=lambda: (store._grow(), grown.set()))
        t.start()
        assert not grown.wait(0.3), "the map grew under a reader"
    t.join(10)
    assert grown.is_set()

    digests = chunk_digests(fs, ino)
    stop = time.monotonic() + 2
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            while time.monotonic() < stop:
                got = store.read_committed(digests)
                assert all(digest_of(g) == d for g, d in zip(got, digests, strict=True))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    size = store.env.info()["map_size"]
    for _ in range(4):
        store._grow()
    for t in threads:
        t.join()
    assert not errors, errors
    assert store.env.info()["map_size"] == 16 * size
    assert fs.read(ino, 0, len(data)) == data


def test_values_read_in_the_pool_do_not_stay_mapped(fs, tmp_path, monkeypatch):
    """Each value read through the map is unmapped after use (what stays mapped is the
    folios around the B-tree pages looked up), without the sweep of the whole map that
    MappedFile.unmap does."""
    store = fs.store
    data = os.urandom(48 * MiB)
    ino = fs.create(ROOT_INO, b"f", 0o644, 0, 0).ino
    fs.write(ino, 0, data)
    digests = chunk_digests(fs, ino)
    sweeps = []
    monkeypatch.setattr(store.mapped, "unmap", lambda: sweeps.append(1) or 0)
    data_file = str(tmp_path / "s" / "data.mdb")
    mapped = {}
    for releasing in (True, False):
        if not releasing:
            monkeypatch.setattr(store.mapped, "release", lambda views: None)
        memory.MappedFile.unmap(store.mapped)
        for i in range(0, len(digests), 16):
            assert None not in store.read_committed(digests[i : i + 16])
        mapped[releasing] = mapped_kib(data_file)
        if releasing:
            assert not sweeps, "the whole map was swept while values were released"
    assert mapped[False] > 32 << 10, f"(the test reads nothing through the map: {mapped})"
    assert mapped[True] < mapped[False] * 3 // 4, f"the values read stayed mapped: {mapped}"


def test_data_not_yet_committed_reads_back_through_the_mount(mounted: CasfsMount):
    """Written and closed, not yet committed (the batch commits every second): the kernel's
    copy dropped, reads come to the daemon, whose pool cannot see the batch; the mount's
    thread loads those chunks instead."""
    for i in range(3):
        data = os.urandom(8 * MiB) + b"text " * 200_000
        path = mounted.mnt / f"f{i}"
        path.write_bytes(data)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        assert path.read_bytes() == data
    mounted.umount()


def test_a_chunk_gone_before_the_read_finishes_asks_for_a_new_plan(fs):
    """The mount plans a read, waits for the pool, then finishes in a later transaction; a
    rollback in between may have replaced the file (it takes no inode lock). A planned
    chunk that the pool could not see and the store no longer has is ReadRaced (the mount
    plans again), never a corruption report."""
    store = fs.store
    data = os.urandom(2 * MiB)
    ino = fs.create(ROOT_INO, b"f", 0o644, 0, 0).ino
    store.begin_batch()
    try:
        fs.write(ino, 0, data)  # in the batch: the pool cannot see these chunks
        with store.read() as tx:
            job = fs.content.read_job(tx, ino, len(data), 0, len(data))
        for future in job.futures():
            future.result()
        assert job.needs_store
        fs.setattr(ino, size=0)  # the chunks go
        with store.read() as tx, pytest.raises(ReadRaced):
            job.finish(tx)
    finally:
        store.commit_batch()
    assert fs.read(ino, 0, MiB) == b""


def test_released_values_are_advised_in_runs_of_adjacent_pages():
    """One madvise per run of adjacent pages, not one per value (each call flushes the TLB of
    every core running a thread of the process): values on one page or on pages next to each
    other make one run, a gap starts another."""
    import mmap

    page = os.sysconf("SC_PAGE_SIZE")
    m = mmap.mmap(-1, 8 * page)
    try:
        view = memoryview(m)
        base = memory._address(view)
        views = [
            view[3 * page + 10 : 3 * page + 20],
            view[0:100],
            view[200:300],
            view[page : 2 * page],
        ]
        assert memory._page_runs(views) == [
            (base, base + 2 * page),
            (base + 3 * page, base + 3 * page + 20),
        ]
        for v in views:
            v.release()
        view.release()
    finally:
        m.close()


def test_small_reads_take_chunks_of_decoded_packs_without_the_read_threads(fs, monkeypatch):
    """Once a pack is decoded, a small read of another of its chunks is served on the
    calling thread (a hop to the read threads cost several times more); a large read still
    goes to them, and a chunk whose pack is not decoded too."""
    small = [os.urandom(3000) for _ in range(20)]
    inos = []
    fs.store.begin_batch()  # one commit: the files share a pack, as in the mount
    for i, data in enumerate(small):
        inos.append(fs.create(ROOT_INO, b"s%d" % i, 0o644, 0, 0).ino)
        fs.write(inos[-1], 0, data)
    fs.store.commit_batch()
    big = os.urandom(4 * MiB)
    big_ino = fs.create(ROOT_INO, b"big", 0o644, 0, 0).ino
    fs.write(big_ino, 0, big)
    fs.store.packer._cache.clear()  # (as after a restart: nothing decoded)
    fs.store.packer._cached = 0
    hops = []
    real = fs.pipeline.read_async
    monkeypatch.setattr(fs.pipeline, "read_async", lambda ds: hops.append(len(ds)) or real(ds))

    assert fs.read(inos[0], 0, 4096) == small[0]
    assert hops == [1], "the first read decodes the pack in the read threads"
    for ino, data in zip(inos[1:], small[1:], strict=True):
        assert fs.read(ino, 0, 4096) == data
    assert hops == [1], "later small reads from the same pack hopped to the read threads"
    assert fs.read(big_ino, 0, len(big)) == big
    assert len(hops) > 1, "a large read is the read threads' work"
