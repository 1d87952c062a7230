"""In-process ingest and read-back of the store pipeline, beside each stage alone.

Data: half incompressible (os.urandom), half text-like (random bytes mapped onto English letter
frequencies, words and lines: zstd -3 packs it about 1.7x). Every figure is measured in the same
run on the same bytes, so the ratios hold on a shared, noisy machine:

  fastcdc   cutting alone                  blake3   hashing every chunk alone (1 thread)
  zstd      compressing every chunk alone  lmdb     putting the encoded chunks alone
  unzstd    decoding every stored chunk alone
  ingest    Filesystem.write of the whole file (cut + hash + compress on all cores + LMDB)
  readback  Filesystem.read of the whole file, cold (decode + verify on all cores)

Goals (issue 2): ingest >= 0.5 x the slowest stage alone; readback >= 0.7 x unzstd alone.
Rounds alternate stage and pipeline runs; each figure is the median over rounds, and each
ratio the median of the per-round ratios (both sides measured in the same round).
Prints one JSON line per figure: {"bench", "figure", "value", "unit", ["vs", "ratio"]}.
Run: .venv/bin/python bench/ingest.py [--mib 1024] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import benchlib
import blake3
import lmdb
import zstandard

from casfs.store.chunker import Chunker
from casfs.tree.fs import ROOT_INO, Filesystem

# English letter frequencies (per mille), space and newline: a text-like byte distribution.
_FREQ = {
    " ": 180,
    "e": 102,
    "t": 75,
    "a": 65,
    "o": 62,
    "i": 57,
    "n": 57,
    "s": 53,
    "h": 50,
    "r": 49,
    "d": 35,
    "l": 33,
    "u": 23,
    "c": 22,
    "m": 20,
    "w": 19,
    "f": 18,
    "g": 16,
    "y": 16,
    "p": 15,
    "b": 12,
    ",": 10,
    ".": 9,
    "\n": 8,
    "v": 8,
    "k": 6,
    "j": 1,
    "x": 1,
    "q": 1,
    "z": 1,
}


def text_like(n: int) -> bytes:
    table = bytearray()
    for ch, weight in _FREQ.items():
        table += ch.encode() * weight
    table = (table * (256 // len(table) + 1))[:256]
    return os.urandom(n).translate(bytes(table))


def emit(figure: str, value: float, unit: str, **extra: object) -> None:
    if "ratio" in extra:
        extra["ratio"] = round(extra["ratio"], 3)
    benchlib.emit("ingest", figure, value, unit, **extra)


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def stages_alone(data: bytes, work: str, params, zstd_level: int, codec) -> dict[str, float]:
    """Each stage alone, single-threaded, on the same bytes: MB/s by stage name."""
    total = len(data)
    view = memoryview(data)
    t = time.perf_counter()
    lengths = Chunker(params).cut(view)
    out = {"fastcdc": rate(total, time.perf_counter() - t)}
    chunks = []
    pos = 0
    for n in lengths:
        chunks.append(view[pos : pos + n])
        pos += n

    t = time.perf_counter()
    digests = [blake3.blake3(c).digest() for c in chunks]
    out["blake3"] = rate(total, time.perf_counter() - t)

    cctx = zstandard.ZstdCompressor(level=zstd_level)
    t = time.perf_counter()
    for c in chunks:
        cctx.compress(c)
    out["zstd"] = rate(total, time.perf_counter() - t)

    values = [codec.encode(c) for c in chunks]
    path = os.path.join(work, "lmdb-alone")
    env = lmdb.open(path, map_size=4 * total + (1 << 30), max_dbs=2)
    db = env.open_db(b"objects")
    t = time.perf_counter()
    for i in range(0, len(values), 512):
        with env.begin(write=True, db=db) as txn:
            for d, v in zip(digests[i : i + 512], values[i : i + 512], strict=True):
                txn.put(d, v)
    env.sync(True)
    out["lmdb"] = rate(total, time.perf_counter() - t)
    env.close()
    shutil.rmtree(path)

    dctx = zstandard.ZstdDecompressor()
    t = time.perf_counter()
    for v in values:
        if v[0] & 0x0F:
            dctx.decompress(v[1:])
    out["unzstd"] = rate(total, time.perf_counter() - t)
    return out


def pipeline(data: bytes, work: str) -> dict[str, float]:
    """Filesystem.write of the whole buffer, then two cold read-backs: MB/s by figure."""
    total = len(data)
    store = Filesystem.create_store(os.path.join(work, "store"))
    fs = Filesystem(store, cache_bytes=16 << 20)
    out = {}
    try:
        node = fs.create(ROOT_INO, b"data", 0o644, 0, 0)
        t = time.perf_counter()
        fs.write(node.ino, 0, data)
        out["ingest"] = rate(total, time.perf_counter() - t)
        # Read-back twice with a cold chunk cache: first while the store's pages are not yet
        # mapped in this process (each first touch of an LMDB page is a minor fault), then
        # with them mapped, as in a mount that has been running for a while.
        # Each piece is checked against the data as it comes (a memcmp in place) and let go,
        # as a reader with one buffer would: keeping all of them, as this did up to
        # 2026-11-22, timed the allocator's page faults for a fresh GiB as much as the read.
        for figure in ("readback_first_touch", "readback"):
            fs.content.cache = type(fs.content.cache)(16 << 20)
            t = time.perf_counter()
            for off in range(0, total, 1 << 20):
                piece = fs.read(node.ino, off, 1 << 20)
                if len(piece) != min(1 << 20, total - off) or not data.startswith(piece, off):
                    raise SystemExit(f"read-back mismatch at {off}")
            out[figure] = rate(total, time.perf_counter() - t)
        out["stored_fraction"] = store.stats().stored_bytes / total
        return out
    finally:
        fs.close()
        store.close()
        shutil.rmtree(os.path.join(work, "store"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="data size in MiB (default 1024)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians reported")
    ap.add_argument("--dir", default=None, help="where to put the scratch store (default: tmp)")
    args = ap.parse_args()
    half = args.mib << 19
    data = os.urandom(half) + text_like(half)
    work = tempfile.mkdtemp(prefix="casfs-bench-", dir=args.dir)
    rounds = []
    try:
        probe = Filesystem.create_store(os.path.join(work, "probe"))
        params, level, codec = probe.params, probe.codec.zstd_level, probe.codec
        probe.close()
        for _ in range(args.repeat):
            # alternate stage and pipeline runs, so a noisy neighbour hits both alike
            rounds.append(stages_alone(data, work, params, level, codec) | pipeline(data, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rounds)

    stages = ("fastcdc", "blake3", "zstd", "lmdb")
    for name in (*stages, "unzstd"):
        emit(f"{name}_alone", med(name), "MB/s")
    # ratios per round (both sides measured in the same round), then the median
    slowest = [min(stages, key=r.get) for r in rounds]
    ingest_ratio = statistics.median(
        r["ingest"] / r[s] for r, s in zip(rounds, slowest, strict=True)
    )
    emit("ingest", med("ingest"), "MB/s", vs="slowest_stage_alone", ratio=ingest_ratio)
    for figure in ("readback_first_touch", "readback"):
        ratio = statistics.median(r[figure] / r["unzstd"] for r in rounds)
        emit(figure, med(figure), "MB/s", vs="unzstd_alone", ratio=ratio)
    emit("stored_fraction", med("stored_fraction"), "ratio")
    emit("rounds", args.repeat, "count", slowest_stage=slowest)


if __name__ == "__main__":
    main()
