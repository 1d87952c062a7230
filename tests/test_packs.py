"""Packs: small objects stored together, freed member by member, repacked when half dead."""

from __future__ import annotations

import os
import random
import re

import pytest

from casfs.api import Casfs
from casfs.errors import CorruptObject
from casfs.store import layout
from casfs.store.codec import digest_of
from casfs.store.packs import PACK_OBJECT_MAX, PACK_TARGET, members_of
from casfs.store.pipeline import Pipeline
from casfs.tree.fs import Filesystem
from casfs.tree.fsck import fsck


def text(rng: random.Random, n: int) -> bytes:
    words = [b"alpha", b"beta", b"gamma", b"delta", b"import", b"return", b"self", b"\n"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def rows(store, db: bytes) -> dict[bytes, bytes]:
    with store.read() as tx:
        return {bytes(k): bytes(v) for k, v in tx.prefix(db, b"")}


def stored_value_bytes(store) -> int:
    return sum(map(len, rows(store, b"packs").values())) + sum(
        map(len, rows(store, b"objects").values())
    )


@pytest.fixture
def store(tmp_path):
    s = Filesystem.create_store(str(tmp_path / "s"))
    yield s
    s.close()


def add_all(store, chunks: list[bytes]) -> list[bytes]:
    digests = [digest_of(c) for c in chunks]

    def run(tx):
        for d, c in zip(digests, chunks, strict=True):
            store.add_ref(tx, d, None, len(c), c)

    store.run_write(run)
    return digests


def test_small_chunks_share_packs_and_read_back(store):
    rng = random.Random(1)
    chunks = [text(rng, rng.randrange(100, 8000)) for _ in range(100)]
    digests = add_all(store, chunks)
    packs = rows(store, b"packs")
    total = sum(map(len, chunks))
    assert len(packs) == -(-total // PACK_TARGET) or len(packs) == total // PACK_TARGET + 1
    assert rows(store, b"objects") == {}
    with store.read() as tx:
        for d, c in zip(digests, chunks, strict=True):
            assert store.load(tx, d) == c
    st = store.stats()
    assert st.objects == 100 and st.plain_bytes == total
    assert st.stored_bytes == stored_value_bytes(store) < total / 3  # compressed together


def test_large_chunk_is_stored_alone(store):
    big = text(random.Random(2), PACK_OBJECT_MAX + 1)
    (d,) = add_all(store, [big])
    assert rows(store, b"packs") == {} and list(rows(store, b"objects")) == [d]


def test_pending_chunks_are_read_before_commit_and_vanish_with_an_abort(store):
    data = b"pending bytes " * 50
    d = digest_of(data)
    store.begin_batch()
    store.run_write(lambda tx: store.add_ref(tx, d, None, len(data), data))
    with store.read() as tx:
        assert store.load(tx, d) == data  # still in the batch's pending map

    def fails(tx):
        store.add_ref(tx, digest_of(b"x" * 99), None, 99, b"x" * 99)
        raise RuntimeError("abort this operation")

    with pytest.raises(RuntimeError):
        store.run_write(fails)
    store.commit_batch()
    assert len(rows(store, b"packs")) == 1
    with store.read() as tx:
        assert not store.has_object(tx, digest_of(b"x" * 99))
    with store.read() as tx:
        assert store.load(tx, d) == data
        _, _, payload = layout.split_object(tx.get(b"packs", layout.u64(1)))
    assert len(members_of(store.codec.decompress(payload))) == 1


def test_freeing_members_repacks_at_half_and_deletes_empty_packs(store):
    rng = random.Random(3)
    chunks = [text(rng, 4000) + os.urandom(8) for _ in range(30)]  # one pack
    digests = add_all(store, chunks)
    (first,) = rows(store, b"packs")
    drop = digests[:15]  # 15 of 30: half live, the pack stays
    store.run_write(lambda tx: [store.drop_ref(tx, d) for d in drop])
    assert list(rows(store, b"packs")) == [first]
    live, live_bytes, plain_bytes, _ = layout.read_packstat(rows(store, b"packstat")[first])
    assert (live, live_bytes, plain_bytes) == (15, 15 * 4008, 30 * 4008)
    store.run_write(lambda tx: store.drop_ref(tx, digests[15]))  # less than half: repacked
    (second,) = rows(store, b"packs")
    assert second != first
    assert layout.read_packstat(rows(store, b"packstat")[second])[:3] == (14, 14 * 4008, 14 * 4008)
    with store.read() as tx:
        for d, c in zip(digests[16:], chunks[16:], strict=True):
            assert store.load(tx, d) == c
        assert all(not store.has_object(tx, d) for d in digests[:16])
    assert store.stats().stored_bytes == stored_value_bytes(store)
    store.run_write(lambda tx: [store.drop_ref(tx, d) for d in digests[16:]])
    assert rows(store, b"packs") == {} and rows(store, b"packstat") == {}
    st = store.stats()
    assert (st.objects, st.stored_bytes, st.plain_bytes) == (0, 0, 0)


def test_a_chunk_referenced_twice_survives_one_drop(store):
    data = b"twice " * 100
    (d,) = add_all(store, [data])
    store.run_write(lambda tx: store.add_ref(tx, d, None, len(data)))
    store.run_write(lambda tx: store.drop_ref(tx, d))
    with store.read() as tx:
        assert store.load(tx, d) == data


def test_corrupt_pack_names_the_chunk_and_fsck_finds_it(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}.txt").write_bytes(text(random.Random(i), 3000))
    with Casfs.create(str(tmp_path / "s")) as cas:
        cas.put_tree(str(src), "one")
        assert fsck(cas.store, verify_data=True).clean
        with cas.store.read() as tx:
            key, value = next(iter(tx.prefix(b"packs", b"")))
            key, value = bytes(key), bytearray(value)
        del value[-64:]  # a cut zstd frame never decodes
        cas.store.run_write(lambda tx: tx.put(b"packs", key, bytes(value)))
        cas.store.packer._evict(layout.read_u64(key))
        with pytest.raises(CorruptObject) as err:
            cas.read_bytes("one", "f3.txt")
        assert re.search(r"corrupt object [0-9a-f]{64}: pack \d+ does not decode", str(err.value))
        report = fsck(cas.store, verify_data=True)
        assert not report.clean
        assert any(p.kind == "corrupt" for p in report.problems)


def test_deleting_snapshots_frees_packed_trees_and_chunks(tmp_path):
    rng = random.Random(5)
    src = tmp_path / "src"
    for d in range(5):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(40):
            (src / f"d{d}" / f"f{i}").write_bytes(text(rng, rng.randrange(10, 20000)))
    with Casfs.create(str(tmp_path / "s")) as cas:
        cas.put_tree(str(src), "a")
        for i in range(0, 40, 3):
            (src / "d1" / f"f{i}").write_bytes(text(rng, 5000))
        cas.put_tree(str(src), "b")
        assert fsck(cas.store).clean
        with cas.store.read() as tx:
            kinds = {layout.read_packed_at(v)[2] for _, v in tx.prefix(b"refs", b"")}
        assert kinds == {layout.KIND_CHUNK, layout.KIND_TREE}  # trees are packed too
        assert cas.read_bytes("a", "d2/f7") == (src / "d2" / "f7").read_bytes()
        cas.delete_snapshot("a")
        report = fsck(cas.store, verify_data=True)
        assert report.clean, report.problems
        assert cas.read_bytes("b", "d1/f3") == (src / "d1" / "f3").read_bytes()
        cas.delete_snapshot("b")
        assert fsck(cas.store).clean
        st = cas.store.stats()
        assert (st.objects, st.stored_bytes) == (0, 0)
        assert rows(cas.store, b"packs") == {}


def assert_packstat_matches_refs(store) -> None:
    """Every pack's live count and bytes are those of the refs rows that point into it."""
    live: dict[int, list[int]] = {}
    with store.read() as tx:
        for digest, ref in rows(store, b"refs").items():
            at = layout.read_packed_at(ref)
            if at is not None:
                assert at[0] != 0, "a chunk was left pending"
                n = live.setdefault(at[0], [0, 0])
                n[0] += 1
                n[1] += len(store.load(tx, digest))
    packstat = rows(store, b"packstat").items()
    stats = {layout.read_u64(k): layout.read_packstat(v)[:2] for k, v in packstat}
    assert stats == {k: tuple(v) for k, v in live.items()}


def _batch_of_small_chunks(store, chunks: list[bytes]) -> list[bytes]:
    """Add ``chunks`` one operation each inside a batch, as the mount does; returns digests."""
    digests = [digest_of(c) for c in chunks]
    for d, c in zip(digests, chunks, strict=True):
        store.run_write(lambda tx, d=d, c=c: store.add_ref(tx, d, None, len(c), c))
    return digests


def test_packs_compress_in_the_pool_before_the_commit_and_come_out_the_same(tmp_path):
    rng = random.Random(5)
    chunks = [text(rng, rng.randrange(100, 8000)) + os.urandom(4) for _ in range(200)]
    results = []
    for pooled in (False, True):
        store = Filesystem.create_store(str(tmp_path / f"s{pooled}"))
        pipeline = Pipeline(store) if pooled else None
        try:
            assert (store.packer.submit is not None) == pooled
            store.begin_batch()
            digests = _batch_of_small_chunks(store, chunks)
            sealed = len(store._batch.sealed)
            store.commit_batch()
            assert (sealed >= len(rows(store, b"packs")) - 1) if pooled else sealed == 0
            with store.read() as tx:
                assert [store.load(tx, d) for d in digests] == chunks
            assert store.stats().stored_bytes == stored_value_bytes(store)
            assert_packstat_matches_refs(store)
            results.append((rows(store, b"packs"), rows(store, b"refs")))
        finally:
            if pipeline is not None:
                pipeline.close()
            assert store.packer.submit is None
            store.close()
    assert results[0] == results[1]  # the same packs, whichever thread compressed them


def test_a_chunk_freed_and_added_again_in_one_batch_is_packed_once(tmp_path):
    store = Filesystem.create_store(str(tmp_path / "s"))
    pipeline = Pipeline(store)
    try:
        rng = random.Random(6)
        size = PACK_TARGET * 3 // 64  # 40 chunks: one run sealed, the next still filling
        chunks = [text(rng, size) + os.urandom(4) for _ in range(60)]
        store.begin_batch()
        digests = _batch_of_small_chunks(store, chunks[:40])
        assert store._batch.sealed, "no run went to the pool"
        for i in (3, 39):  # in a run already compressing, and in the run still filling
            store.run_write(lambda tx, d=digests[i]: store.drop_ref(tx, d))
            _batch_of_small_chunks(store, [chunks[i]])
        _batch_of_small_chunks(store, chunks[40:])
        store.commit_batch()
        with store.read() as tx:
            assert [store.load(tx, d) for d in digests] == chunks[:40]
        members = sum(layout.read_packstat(v)[0] for v in rows(store, b"packstat").values())
        assert members == 60
        assert store.stats().stored_bytes == stored_value_bytes(store)
        assert_packstat_matches_refs(store)
    finally:
        pipeline.close()
        store.close()
