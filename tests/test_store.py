"""The object store: opening, locking, refcounts, codec, corruption, map growth, full disk."""

from __future__ import annotations

import errno
import gc
import json
import os
import subprocess
import sys
import threading
import weakref

import lmdb
import pytest
from conftest import assert_fsck_clean, flip_byte, mapped_kib, tmpfs

from casfs.errors import CasfsError, CorruptObject, NoSpace, StoreError, StoreInUse
from casfs.store import chunker, layout
from casfs.store import store as store_module
from casfs.store.codec import Codec, digest_of
from casfs.store.pipeline import Pipeline
from casfs.store.store import Store
from casfs.tree.fs import ROOT_INO, Filesystem
from casfs.tree.fsck import fsck


def new_store(path) -> Store:
    return Filesystem.create_store(str(path))


def test_create_and_reopen(tmp_path):
    s = new_store(tmp_path / "s")
    uuid = s.uuid
    assert s.params.avg == chunker.DEFAULT_AVG
    s.close()
    assert oct(os.stat(tmp_path / "s").st_mode & 0o777) == "0o700"
    for name in os.listdir(tmp_path / "s"):
        assert os.stat(tmp_path / "s" / name).st_mode & 0o077 == 0, name
    with Store(str(tmp_path / "s")) as s2:
        assert s2.uuid == uuid
        assert s2.stats().inodes == 1


def test_create_refuses_non_empty_dir_and_file(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    with pytest.raises(StoreError, match="not empty"):
        new_store(tmp_path / "d")
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        new_store(tmp_path / "f")
    with pytest.raises(StoreError, match="does not exist"):
        new_store(tmp_path / "no" / "such")


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "not a casfs store"),
        (lambda p: p.write_text("x"), "not a casfs store"),
    ],
)
def test_open_not_a_store(tmp_path, setup, message):
    path = tmp_path / "s"
    setup(path)
    with pytest.raises(StoreError, match=message):
        Store(str(path))


def test_open_unknown_format_version(tmp_path):
    new_store(tmp_path / "s").close()
    marker = tmp_path / "s" / layout.MARKER_FILE
    info = json.loads(marker.read_text())
    info["format"] = 99
    marker.write_text(json.dumps(info))
    with pytest.raises(StoreError, match="format version 99"):
        Store(str(tmp_path / "s"))


def test_open_damaged_marker_and_database(tmp_path):
    new_store(tmp_path / "s").close()
    marker = tmp_path / "s" / layout.MARKER_FILE
    good = marker.read_text()
    marker.write_text("{not json")
    with pytest.raises(StoreError, match="damaged"):
        Store(str(tmp_path / "s"))
    marker.write_text(good)
    data = tmp_path / "s" / "data.mdb"
    data.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(StoreError, match="store .*:"):
        Store(str(tmp_path / "s"))
    data.unlink()
    with pytest.raises(StoreError, match="data.mdb is missing"):
        Store(str(tmp_path / "s"))


def test_one_writer_at_a_time(tmp_path):
    s = new_store(tmp_path / "s")
    try:
        with pytest.raises(StoreInUse, match=f"in use by PID {os.getpid()}"):
            Store(str(tmp_path / "s"))
        # readers may look (from another process: LMDB opens an environment once per process)
        out = subprocess.run(
            [sys.executable, "-m", "casfs_cli.main", "stats", "--json", str(tmp_path / "s")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert json.loads(out)["inodes"] == 1
    finally:
        s.close()
    Store(str(tmp_path / "s")).close()  # released on close
    with Store(str(tmp_path / "s"), writer=False) as ro:
        with pytest.raises(StoreError, match="read-only"):
            ro.run_write(lambda tx: None)


def test_writer_lock_names_other_process(tmp_path):
    new_store(tmp_path / "s").close()
    code = (
        "import sys,time; from casfs.store.store import Store; "
        f"s=Store({str(tmp_path / 's')!r}); print('ready', flush=True); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        with pytest.raises(StoreInUse, match=f"in use by PID {proc.pid}"):
            Store(str(tmp_path / "s"))
    finally:
        proc.kill()
        proc.wait()
    Store(str(tmp_path / "s")).close()  # a killed holder leaves no lock behind


def test_refcounts_and_stats(tmp_path):
    with new_store(tmp_path / "s") as s:
        data = os.urandom(1000)
        d = digest_of(data)
        value = s.codec.encode(data)
        assert s.run_write(lambda tx: s.add_ref(tx, d, value, len(data))) is True
        assert s.run_write(lambda tx: s.add_ref(tx, d, None, len(data))) is False
        st = s.stats()
        assert (st.objects, st.plain_bytes, st.referenced_bytes) == (1, 1000, 2000)
        assert st.dedup_ratio == 2.0
        assert s.run_write(lambda tx: s.drop_ref(tx, d)) is None
        assert s.run_write(lambda tx: s.drop_ref(tx, d)) is not None
        st = s.stats()
        assert (st.objects, st.stored_bytes, st.plain_bytes, st.referenced_bytes) == (0, 0, 0, 0)
        with pytest.raises(CorruptObject):
            s.run_write(lambda tx: s.add_ref(tx, d, None, 1000))


def test_the_next_writer_reuses_what_the_last_one_freed(tmp_path):
    """LMDB reuses freed pages only from the second commit after the one that freed them;
    closing a store moves it on, so each nightly import does not add a freed copy of what it
    rewrote to the file."""
    path = tmp_path / "s"
    new_store(path).close()
    keys = [os.urandom(32) for _ in range(256)]

    def session(fn):
        with Store(str(path)) as s:
            s.run_write(lambda tx: [fn(tx, k) for k in keys])
        return os.path.getsize(path / "data.mdb")

    written = session(lambda tx, k: tx.put(b"treecache", k, os.urandom(16000)))
    session(lambda tx, k: tx.delete(b"treecache", k))
    again = session(lambda tx, k: tx.put(b"treecache", k, os.urandom(16000)))
    assert again - written < 256 * 16000 // 20  # a few B-tree pages, not the 4 MB again


def _within(seconds: float, fn) -> None:
    """Run ``fn`` in a thread; fail (instead of hanging) if LMDB's write lock never comes."""
    done = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            done.append(fn())
        except BaseException as exc:
            failed.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if failed:
        raise failed[0]
    assert done, "blocked: the write lock was not given back"


def test_the_commit_thread_commits_while_the_owner_goes_on(tmp_path):
    path = tmp_path / "s"

    def commit_in_the_background() -> None:
        s = new_store(path)
        s.use_commit_thread()
        s.begin_batch()
        s.run_write(lambda tx: tx.put(b"treecache", b"k1", b"one"))
        s.commit_batch_async()
        assert s.committing and s.in_batch and s.batch_written == 0
        with s.read() as tx:  # waits for the commit, then reads the next batch
            assert tx.get(b"treecache", b"k1") == b"one"
            assert tx.write
        assert not s.committing
        s.run_write(lambda tx: tx.put(b"treecache", b"k2", b"two"))
        s.commit_batch_async()
        s.run_write(lambda tx: tx.put(b"treecache", b"k3", b"three"))  # waits too
        s.close()  # commits the open batch and gives LMDB's write lock back on its thread

    def reopen_and_write() -> None:
        with Store(str(path)) as again:
            again.run_write(lambda tx: tx.put(b"treecache", b"k4", b"four"))
            with again.read() as tx:
                assert [tx.get(b"treecache", k) for k in (b"k1", b"k2", b"k3", b"k4")] == [
                    b"one", b"two", b"three", b"four"]  # fmt: skip

    _within(20, commit_in_the_background)
    _within(20, reopen_and_write)


class _FailingCommit:
    """A write transaction whose commit fails (as on a dying disk); the rest is the real one."""

    def __init__(self, txn) -> None:
        self.real = txn

    def commit(self) -> None:
        raise lmdb.DiskError("injected")

    def __getattr__(self, name: str):
        return getattr(self.real, name)


def test_a_failed_background_commit_is_raised_once_and_the_store_goes_on(tmp_path):
    path = tmp_path / "s"
    s = new_store(path)
    s.use_commit_thread()
    s.begin_batch()
    s.run_write(lambda tx: tx.put(b"treecache", b"lost", b"x"))
    s._batch.txn = _FailingCommit(s._batch.txn)
    aborts = s.aborts
    s.commit_batch_async()
    with pytest.raises(CasfsError):
        s.settle()
    assert s.aborts > aborts and s.in_batch and not s.committing
    with s.read() as tx:
        assert tx.get(b"treecache", b"lost") is None  # the batch is gone, as a failed commit's
    s.run_write(lambda tx: tx.put(b"treecache", b"kept", b"y"))
    s.close()

    def reopen() -> None:
        with Store(str(path)) as again, again.read() as tx:
            assert tx.get(b"treecache", b"kept") == b"y"

    _within(20, reopen)


def test_failed_write_changes_nothing(tmp_path):
    with new_store(tmp_path / "s") as s:
        data = b"x" * 100

        def fails(tx):
            s.add_ref(tx, digest_of(data), s.codec.encode(data), len(data))
            raise CasfsError("boom")

        with pytest.raises(CasfsError):
            s.run_write(fails)
        assert s.stats().objects == 0
        s.begin_batch()  # the same inside a group commit: child transactions
        with pytest.raises(CasfsError):
            s.run_write(fails)
        s.run_write(lambda tx: s.add_ref(tx, b"\1" * 32, b"\0ok", 2))
        s.commit_batch()
        assert s.stats().objects == 1


def test_codec_raw_and_compressed_and_verified():
    codec = Codec(3)
    text = b"hello casfs " * 1000
    noise = os.urandom(5000)
    vt, vn = codec.encode(text), codec.encode(noise)
    assert vt[0] & 0x0F == layout.CODEC_ZSTD and len(vt) < len(text) // 10
    assert vn[0] & 0x0F == layout.CODEC_RAW and vn[1:] == noise
    assert codec.decode(digest_of(text), vt) == text
    assert codec.decode(digest_of(noise), vn) == noise
    bad = bytearray(vn)
    bad[100] ^= 1
    with pytest.raises(CorruptObject, match=digest_of(noise).hex()):
        codec.decode(digest_of(noise), bytes(bad))
    with pytest.raises(CorruptObject, match="does not decode"):
        codec.decode(digest_of(text), vt[:-5])


def test_pipeline_dedups_and_makes_holes(tmp_path):
    with new_store(tmp_path / "s") as s:
        p = Pipeline(s)
        try:
            block = os.urandom(4 << 20)  # long enough for the two cut chains to meet
            buf = block + bytes(1 << 20) + block
            spans, pos = [], 0
            for n in p.chunker.cut(buf):
                spans.append((pos, n))
                pos += n
            view = memoryview(buf)
            pieces = p.hash_chunks([(o, view[o : o + n]) for o, n in spans]).result()
            assert sum(x.length for x in pieces) == len(buf)
            assert [x.offset for x in pieces] == sorted(x.offset for x in pieces)
            assert any(x.digest is None for x in pieces)  # zeros: holes
            digests = [x.digest for x in pieces if x.digest]
            assert len(set(digests)) < len(digests)  # the repeated block cuts the same
            chunks = [buf[x.offset : x.offset + x.length] for x in pieces if x.digest]
            values = p.compress_async(chunks).result()
            assert [s.codec.decode(d, v) for d, v in zip(digests, values, strict=True)] == chunks
        finally:
            p.close()


def test_pipeline_results_are_freed_without_the_cycle_collector(tmp_path):
    """Results of work spread over the pool go away with their future: no reference cycle
    may keep them (85 MiB of compressed chunks waited so for the collector in a mount)."""

    class Result:  # can be weakly referenced, unlike bytes
        pass

    with new_store(tmp_path / "s") as s:
        p = Pipeline(s)
        gc.disable()
        try:
            future = p.spread_async(lambda part: [Result() for _ in part], list(range(64)), 1 << 30)
            results = future.result()
            assert len(results) == 64
            alive = [weakref.ref(r) for r in results]
            del future, results
            assert not any(ref() for ref in alive)
        finally:
            gc.enable()
            p.close()


def test_chunker_refuses_pure_python(monkeypatch):
    monkeypatch.setattr(chunker, "_FastCDC", None)
    with pytest.raises(CasfsError, match="compiled pyfastcdc extension is not loaded"):
        chunker.require_compiled_chunker()


def test_flipped_byte_on_disk_is_an_error_naming_the_digest(tmp_path):
    s = new_store(tmp_path / "s")
    fs = Filesystem(s, cache_bytes=0)
    data = os.urandom(20_000)  # incompressible: stored raw, so findable in data.mdb
    node = fs.create(ROOT_INO, b"victim", 0o644, 0, 0)
    fs.write(node.ino, 0, data)
    first = chunker.Chunker(s.params).cut(data)[0]  # 20 kB may be cut in two; flip in the first
    fs.close()
    s.close()
    flip_byte(tmp_path / "s" / "data.mdb", data[:first])
    with Store(str(tmp_path / "s")) as s:
        fs = Filesystem(s, cache_bytes=0)
        try:
            with pytest.raises(CorruptObject, match=digest_of(data[:first]).hex()) as info:
                fs.read(node.ino, 0, 100)
            assert info.value.errno == errno.EIO
            report = fsck(s, verify_data=True)
            assert [p.kind for p in report.problems] == ["corrupt"]
            assert "/victim" in report.problems[0].message
            assert fsck(s).clean  # structure is intact; only data is bad
        finally:
            fs.close()


def test_map_grows_by_itself(tmp_path, monkeypatch):
    monkeypatch.setattr(store_module, "INITIAL_MAP_SIZE", 1 << 20)
    s = new_store(tmp_path / "s")
    fs = Filesystem(s)
    try:
        start = s.env.info()["map_size"]
        payload = os.urandom(6 << 20)
        node = fs.create(ROOT_INO, b"big", 0o644, 0, 0)
        fs.write(node.ino, 0, payload)
        s.begin_batch()  # growth inside a group commit too
        node2 = fs.create(ROOT_INO, b"big2", 0o644, 0, 0)
        fs.write(node2.ino, 0, os.urandom(6 << 20))
        s.commit_batch()
        assert s.env.info()["map_size"] > start
        assert fs.read(node.ino, 0, len(payload)) == payload
        assert fsck(s).clean
    finally:
        fs.close()
        s.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MiB tmpfs (needs root; skipped elsewhere)."""
    with tmpfs(tmp_path / "disk", "24m") as disk:
        yield disk


def _fill(path) -> None:
    """Take every free byte of the filesystem holding ``path``."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, bytes(4096)):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_full_disk_is_enospc_and_store_survives(small_disk):
    s = new_store(small_disk / "s")
    fs = Filesystem(s)
    written = []
    try:
        with pytest.raises(NoSpace) as info:
            for i in range(100):
                node = fs.create(ROOT_INO, f"f{i}".encode(), 0o644, 0, 0)
                data = os.urandom(1 << 20)
                fs.write(node.ino, 0, data)
                written.append((node.ino, data))
        assert info.value.errno == errno.ENOSPC
        assert len(written) > 5
        for ino, data in written:  # nothing already stored is damaged
            assert fs.read(ino, 0, len(data)) == data
        report = fsck(s)
        # the half-written last file may exist empty, which is consistent
        assert report.clean, report.problems
        _fill(small_disk / "filler")  # not a byte left, even for the delete's new pages
        for i in range(len(written) // 2):  # deleting makes room again
            fs.unlink(ROOT_INO, f"f{i}".encode())
        os.unlink(small_disk / "filler")
        node = fs.create(ROOT_INO, b"again", 0o644, 0, 0)
        fs.write(node.ino, 0, os.urandom(1 << 20))
        assert fsck(s).clean
    finally:
        fs.close()
        s.close()
    with Store(str(small_disk / "s")) as s2:  # and the store reopens
        assert fsck(s2).clean


def test_map_grows_inside_a_long_batch_without_losing_it(tmp_path, monkeypatch):
    """A group commit larger than the map's headroom: the batch is committed and the map
    grown before it fills, never lost (as it was when growth waited for MapFull)."""
    monkeypatch.setattr(store_module, "INITIAL_MAP_SIZE", 1 << 20)
    s = Filesystem.create_store(str(tmp_path / "s"), chunk_avg=16 << 10)
    fs = Filesystem(s)
    try:
        s.begin_batch()
        files = {}
        for i in range(1500):
            name = f"f{i}".encode()
            data = os.urandom(100 + i % 2900)
            fs.write(fs.create(ROOT_INO, name, 0o644, 0, 0).ino, 0, data)
            files[name] = data
        s.commit_batch()
        assert s.env.info()["map_size"] > 1 << 20
        for name, data in files.items():
            assert fs.read(fs.lookup(ROOT_INO, name).ino, 0, len(data) + 1) == data
        assert fsck(s).clean
    finally:
        fs.close()
        s.close()


def test_unmapping_follows_the_map_when_it_grows(tmp_path):
    """LMDB maps the data file anew when the map grows; the unmapping must find the new
    mapping (advising the old range would zero whatever memory took its place)."""
    s = new_store(tmp_path / "s")
    try:
        size = s.env.info()["map_size"]
        assert s.mapped.unmap() == size
        s._grow()
        assert s.env.info()["map_size"] == 2 * size
        assert s.mapped.unmap() == 2 * size
        assert s.mapped.unmap() == 2 * size  # the remembered range, checked
    finally:
        s.close()


def test_data_file_pages_are_unmapped_as_data_goes_through(tmp_path, monkeypatch):
    """LMDB's map keeps every page read through it resident (RSS grows with the store); the
    store unmaps them once MAPPED_BYTES_MAX more are mapped, and the data reads back the same
    after."""
    monkeypatch.setattr(store_module, "MAPPED_BYTES_MAX", 1 << 62)  # never, at first
    s = new_store(tmp_path / "s")
    # values read in the pool unmap themselves (test_read_path); here the sweep is tested
    monkeypatch.setattr(s.mapped, "release", lambda views: None)
    fs = Filesystem(s)
    data_file = str(tmp_path / "s" / "data.mdb")
    try:
        data = os.urandom(24 << 20)
        ino = fs.create(ROOT_INO, b"f", 0o644, 0, 0).ino
        fs.write(ino, 0, data)
        fs.content.cache = type(fs.content.cache)(0)
        assert fs.read(ino, 0, len(data)) == data
        before = mapped_kib(data_file)
        assert before > 8 << 10, f"only {before} KiB mapped: the test reads nothing through it"

        # statm at every touch: whether the process takes minor faults between two touches
        # (its allocations do) depends on what earlier tests left in the heap
        s.mapped.max_faults, s.mapped.max_mapped = 0, 1 << 20
        assert fs.read(ino, 0, len(data)) == data
        assert mapped_kib(data_file) < before // 2
        data = os.urandom(24 << 20)
        fs.write(ino, 0, data)  # and while writing
        assert mapped_kib(data_file) < before // 2
        assert fs.read(ino, 0, len(data)) == data
        assert_fsck_clean(s)
    finally:
        fs.close()
        s.close()


def test_cut_stream_cuts_as_one_cut_of_the_whole(tmp_path):
    """However a stream comes in blocks (small files of one block, large ones of many, zero
    runs), cut_stream yields exactly the chunks of one cut of the whole stream, each with
    the digest of its bytes (none for an all-zero chunk: a hole)."""
    import random

    s = new_store(tmp_path / "s")
    pipeline = Pipeline(s)
    rng = random.Random(7)
    p = s.params
    sizes = [0, 1, 100, p.min - 1, p.min, p.min + 1, p.max - 1, p.max, p.max + 1, 3 * p.max]
    sizes += [rng.randrange(1, 6 * p.max) for _ in range(12)]
    try:
        for size in sizes:
            data = bytearray(rng.randbytes(size))
            if size > 4 * p.min:  # a run of zeros somewhere: a hole if a whole chunk
                at = rng.randrange(size - 2 * p.min)
                data[at : at + 2 * p.min + p.max] = bytes(len(data[at : at + 2 * p.min + p.max]))
            data = bytes(data)
            want, pos = [], 0
            for n in pipeline.chunker.cut(data):
                chunk = data[pos : pos + n]
                want.append((pos, n, None if not chunk.strip(b"\0") else digest_of(chunk)))
                pos += n
            for _ in range(3):
                cuts = sorted(rng.randrange(size + 1) for _ in range(rng.randrange(4)))
                blocks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, size], strict=True)]
                got = [
                    (piece.offset, piece.length, piece.digest)
                    for piece, chunk in pipeline.cut_stream(iter(b for b in blocks if b))
                    if bytes(chunk) == data[piece.offset : piece.offset + piece.length]
                ]
                assert got == want, (size, cuts)
    finally:
        pipeline.close()
        s.close()


def test_a_commit_while_opening_is_not_taken_for_a_truncated_file(tmp_path, monkeypatch):
    """A reader beside a mount looks at data.mdb's size, then LMDB's meta: a commit between
    the two grows both. The size is looked at again after the meta, so the file seems
    truncated only if it is."""
    s = new_store(tmp_path / "s")
    fs = Filesystem(s)
    fs.write(fs.create(ROOT_INO, b"f", 0o644, 0, 0).ino, 0, os.urandom(4 << 20))
    fs.close()
    s.close()
    real = os.path.getsize
    looks = []

    def first_look_older(path):  # the size before the last commit, the first time only
        looks.append(path)
        return real(path) - (1 << 20) if len(looks) == 1 else real(path)

    monkeypatch.setattr(store_module.os.path, "getsize", first_look_older)
    Store(str(tmp_path / "s"), writer=False).close()
    assert len(looks) == 2
