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
Prints one JSON line per figure: {"bench", "figure", "value", "unit", ["vs", "ratio"]}.
Run: .venv/bin/python bench/ingest.py [--mib 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

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


def emit(
    figure: str, value: float, unit: str, vs: str | None = None, ref: float | None = None
) -> None:
    line = {"bench": "ingest", "figure": figure, "value": round(value, 1), "unit": unit}
    if vs is not None and ref:
        line.update(vs=vs, ratio=round(value / ref, 3))
    print(json.dumps(line), flush=True)


def rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="data size in MiB (default 1024)")
    ap.add_argument("--dir", default=None, help="where to put the scratch store (default: tmp)")
    args = ap.parse_args()
    half = args.mib << 19
    data = os.urandom(half) + text_like(half)
    total = len(data)
    work = tempfile.mkdtemp(prefix="casfs-bench-", dir=args.dir)
    try:
        store = Filesystem.create_store(os.path.join(work, "store"))
        fs = Filesystem(store, cache_bytes=16 << 20)
        view = memoryview(data)

        # -- each stage alone, single-threaded, on the same bytes ---------------------------
        t = time.perf_counter()
        lengths = Chunker(store.params).cut(view)
        cdc = rate(total, time.perf_counter() - t)
        bounds = []
        pos = 0
        for n in lengths:
            bounds.append((pos, n))
            pos += n
        chunks = [view[p : p + n] for p, n in bounds]

        t = time.perf_counter()
        digests = [blake3.blake3(c).digest() for c in chunks]
        b3 = rate(total, time.perf_counter() - t)

        cctx = zstandard.ZstdCompressor(level=store.codec.zstd_level)
        t = time.perf_counter()
        frames = [cctx.compress(c) for c in chunks]
        zs = rate(total, time.perf_counter() - t)

        values = [store.codec.encode(c) for c in chunks]
        env = lmdb.open(os.path.join(work, "lmdb-alone"), map_size=4 * total + (1 << 30), max_dbs=2)
        db = env.open_db(b"objects")
        t = time.perf_counter()
        for i in range(0, len(values), 512):
            with env.begin(write=True, db=db) as txn:
                for d, v in zip(digests[i : i + 512], values[i : i + 512], strict=True):
                    txn.put(d, v)
        env.sync(True)
        put = rate(total, time.perf_counter() - t)
        env.close()

        dctx = zstandard.ZstdDecompressor()
        t = time.perf_counter()
        for v in values:
            if v[0] & 0x0F:
                dctx.decompress(v[1:])
        unzstd = rate(total, time.perf_counter() - t)
        del frames, values, chunks

        stages = {"fastcdc": cdc, "blake3": b3, "zstd": zs, "lmdb": put}
        for name, value in stages.items():
            emit(f"{name}_alone", value, "MB/s")
        emit("unzstd_alone", unzstd, "MB/s")
        slowest = min(stages, key=stages.get)

        # -- the pipeline -------------------------------------------------------------------
        node = fs.create(ROOT_INO, b"data", 0o644, 0, 0)
        t = time.perf_counter()
        fs.write(node.ino, 0, view)
        ingest = rate(total, time.perf_counter() - t)
        emit("ingest", ingest, "MB/s", vs=f"{slowest}_alone", ref=stages[slowest])

        # Read-back twice with a cold chunk cache: first while the store's pages are not yet
        # mapped in this process (each first touch of an LMDB page is a minor fault), then
        # with them mapped, as in a mount that has been running for a while.
        for figure in ("readback_first_touch", "readback"):
            fs.content.cache = type(fs.content.cache)(16 << 20)
            out = []
            t = time.perf_counter()
            for off in range(0, total, 1 << 20):
                out.append(fs.read(node.ino, off, 1 << 20))
            back = rate(total, time.perf_counter() - t)
            if b"".join(out) != data:
                raise SystemExit("read-back mismatch")
            del out
            emit(figure, back, "MB/s", vs="unzstd_alone", ref=unzstd)
        s = store.stats()
        emit("stored_fraction", s.stored_bytes / total, "ratio")
        fs.close()
        store.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
