"""Measure FastCDC average chunk sizes (16, 32, 64 KiB) on real release histories.

Simulates ingesting successive releases, in order, into one deduplicating store per average
size, exactly as casfs cuts and stores data: every regular file is cut on its own (the whole
file as one buffer) with FastCDC(avg, min=avg/4, max=avg*4), every chunk is named by its
BLAKE3-256 digest, and a chunk whose digest was not seen before is stored once, zstd level 3,
raw if compression saves under 3% (as ``casfs/store/codec.py``), plus the one header byte.

Datasets (fetched with pip from PyPI into ``--data`` when missing: about 300 MB of downloads,
1.1 GB extracted):

* ``django-patch``   Django sdists 5.0 .. 5.0.8, extracted (5.0.5 was never published)
* ``django-feature`` Django sdists 3.0 .. 5.2 (every feature release), extracted
* ``numpy-wheels``   numpy 1.26.0 .. 2.0.2 cp311 manylinux x86_64 wheels, as files

Output: one JSON line per figure on stdout; ``--markdown FILE`` also writes the tables to
FILE (between the ``chunk_params`` markers if FILE has them, else as a whole page).

    .venv/bin/python bench/chunk_params.py --markdown docs/chunking.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import blake3
import zstandard
from pyfastcdc.cy import FastCDC

KiB = 1024
MiB = 1024 * 1024
AVGS = (16 * KiB, 32 * KiB, 64 * KiB)
ZSTD_LEVEL = 3
MIN_SAVING = 0.03  # casfs/store/codec.py: keep the zstd frame only if it saves >= 3%
HEADER_BYTES = 1  # casfs/store/layout.py: one header byte (kind << 4 | codec) per object
# Estimated LMDB cost per unique chunk: objects key (32) + refs row (32 + 12) + an extent row
# (16 + 36) + B-tree node headers and page slack, rounded to 100 bytes.
META_BYTES_PER_CHUNK = 100
# LMDB (4 KiB pages, 32-byte keys) keeps an ``objects`` value of more than 1998 bytes on its own
# overflow pages: ceil((value + 16) / 4096) whole pages (checked against lmdb's stat of
# overflow_pages). Smaller values sit in leaf pages and are counted at their size.
LMDB_PAGE = 4096
LMDB_PAGE_HEADER = 16
LMDB_INLINE_MAX = 1998


def lmdb_value_bytes(v: int) -> int:
    """Bytes an ``objects`` value of ``v`` bytes takes in LMDB (page-rounded if overflowed)."""
    if v <= LMDB_INLINE_MAX:
        return v
    return -(-(v + LMDB_PAGE_HEADER) // LMDB_PAGE) * LMDB_PAGE


BEGIN = "<!-- chunk_params:begin -->"
END = "<!-- chunk_params:end -->"


@dataclass(frozen=True)
class Dataset:
    name: str
    kind: str  # "sdist": extracted source trees; "wheel": the wheel files themselves
    package: str
    versions: tuple[str, ...]
    description: str


DATASETS = (
    Dataset(
        "django-patch",
        "sdist",
        "Django",
        ("5.0", "5.0.1", "5.0.2", "5.0.3", "5.0.4", "5.0.6", "5.0.7", "5.0.8"),
        "Django source tree (extracted sdist), successive patch releases of 5.0",
    ),
    Dataset(
        "django-feature",
        "sdist",
        "Django",
        ("3.0", "3.1", "3.2", "4.0", "4.1", "4.2", "5.0", "5.1", "5.2"),
        "Django source tree (extracted sdist), successive feature releases",
    ),
    Dataset(
        "numpy-wheels",
        "wheel",
        "numpy",
        ("1.26.0", "1.26.1", "1.26.2", "1.26.3", "1.26.4", "2.0.0", "2.0.1", "2.0.2"),
        "numpy wheels, cp311 manylinux x86_64, successive releases",
    ),
)

# --------------------------------------------------------------------------------------------
# Fetching


def _pip(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", *args]
    print("+", " ".join(cmd), file=sys.stderr)
    subprocess.run(cmd, check=True)


def _find(directory: Path, package: str, version: str, suffix: str) -> Path | None:
    # sdist/wheel file names normalise the project name differently across releases
    # (Django-5.0.tar.gz, django-5.0.8.tar.gz); the version must match exactly.
    want = package.lower().replace("-", "_")
    for p in directory.glob(f"*{suffix}"):
        stem = p.name[: -len(suffix)]
        name, _, rest = stem.partition("-")
        ver = rest.split("-")[0]
        if name.lower().replace("-", "_") == want and ver == version:
            return p
    return None


def fetch_sdist(data: Path, package: str, version: str) -> Path:
    """The extracted source tree of ``package==version`` (downloaded and extracted if needed)."""
    tree = data / "sdist-trees" / f"{package}-{version}"
    if tree.is_dir():
        return tree
    archives = data / "sdists"
    archives.mkdir(parents=True, exist_ok=True)
    tgz = _find(archives, package, version, ".tar.gz")
    if tgz is None:
        spec = f"{package}=={version}"
        try:
            _pip(["--no-binary", ":all:", spec, "-d", str(archives)])
        except subprocess.CalledProcessError:
            _pip(["--no-binary", ":all:", "--no-build-isolation", spec, "-d", str(archives)])
        tgz = _find(archives, package, version, ".tar.gz")
        if tgz is None:
            raise SystemExit(f"pip did not leave an sdist for {spec} in {archives}")
    tmp = tree.with_name(tree.name + ".tmp")
    with tarfile.open(tgz) as tf:
        tf.extractall(tmp, filter="data")
    tmp.rename(tree)
    return tree


def fetch_wheel(data: Path, package: str, version: str) -> Path:
    wheels = data / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    whl = _find(wheels, package, version, ".whl")
    if whl is None:
        _pip(
            [
                "--only-binary",
                ":all:",
                "--python-version",
                "3.11",
                "--implementation",
                "cp",
                "--abi",
                "cp311",
                "--platform",
                "manylinux2014_x86_64",
                f"{package}=={version}",
                "-d",
                str(wheels),
            ]
        )
        whl = _find(wheels, package, version, ".whl")
        if whl is None:
            raise SystemExit(f"pip did not leave a wheel for {package}=={version} in {wheels}")
    return whl


def release_files(path: Path) -> list[Path]:
    """Regular files of a release, in a stable order (symlinks and specials skipped)."""
    if path.is_file():
        return [path]
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            p = Path(root, f)
            if p.is_file() and not p.is_symlink():
                out.append(p)
    return out


# --------------------------------------------------------------------------------------------
# Simulation


@dataclass
class Store:
    """One simulated dedup store for one average chunk size."""

    avg: int
    cdc: FastCDC = field(init=False)
    seen: set[bytes] = field(default_factory=set)
    cctx: zstandard.ZstdCompressor = field(
        default_factory=lambda: zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    )
    logical: int = 0
    refs: int = 0  # chunks cut (every reference; an extent row each)
    unique_bytes: int = 0
    unique_chunks: int = 0
    stored: int = 0
    raw_chunks: int = 0  # unique chunks stored uncompressed
    lmdb_objects: int = 0  # stored, with overflow values rounded up to whole LMDB pages
    t_cut: float = 0.0
    t_hash: float = 0.0
    t_zstd: float = 0.0
    releases: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cdc = FastCDC(self.avg, min_size=self.avg // 4, max_size=self.avg * 4)

    def snapshot(self) -> tuple:
        return (
            self.logical,
            self.unique_bytes,
            self.unique_chunks,
            self.stored,
            self.refs,
            self.t_cut + self.t_hash + self.t_zstd,
            self.lmdb_objects,
        )

    def ingest(self, buf: bytes) -> None:
        if not buf:
            return
        pc = time.perf_counter
        mv = memoryview(buf)
        t0 = pc()
        lengths = [c.length for c in self.cdc.cut_buf(buf)]
        t1 = pc()
        digests = []
        off = 0
        for n in lengths:
            digests.append(blake3.blake3(mv[off : off + n]).digest())
            off += n
        t2 = pc()
        self.t_cut += t1 - t0
        self.t_hash += t2 - t1
        self.logical += len(buf)
        self.refs += len(lengths)
        off = 0
        t_zstd = 0.0
        for n, d in zip(lengths, digests, strict=True):
            if d not in self.seen:
                self.seen.add(d)
                piece = mv[off : off + n]
                t3 = pc()
                packed = self.cctx.compress(piece)
                t_zstd += pc() - t3
                if len(packed) <= n * (1 - MIN_SAVING):
                    v = HEADER_BYTES + len(packed)
                else:
                    v = HEADER_BYTES + n
                    self.raw_chunks += 1
                self.stored += v
                self.lmdb_objects += lmdb_value_bytes(v)
                self.unique_bytes += n
                self.unique_chunks += 1
            off += n
        self.t_zstd += t_zstd


def run_dataset(ds: Dataset, data: Path, avgs: tuple[int, ...]) -> dict:
    paths = []
    for v in ds.versions:
        if ds.kind == "sdist":
            paths.append(fetch_sdist(data, ds.package, v))
        else:
            paths.append(fetch_wheel(data, ds.package, v))
    stores = [Store(a) for a in avgs]
    nfiles = []
    for version, path in zip(ds.versions, paths, strict=True):
        before = [s.snapshot() for s in stores]
        files = release_files(path)
        nfiles.append(len(files))
        for i, f in enumerate(files):
            buf = f.read_bytes()
            # rotate the order so no average always runs with warm caches
            k = i % len(stores)
            for s in stores[k:] + stores[:k]:
                s.ingest(buf)
        for s, b in zip(stores, before, strict=True):
            a = s.snapshot()
            s.releases.append(
                {
                    "release": version,
                    "files": len(files),
                    "logical": a[0] - b[0],
                    "new_unique_bytes": a[1] - b[1],
                    "new_chunks": a[2] - b[2],
                    "new_stored": a[3] - b[3],
                    "seconds": a[5] - b[5],
                    "new_lmdb": a[6] - b[6],
                }
            )
        print(f"  {ds.name} {version}: {len(files)} files", file=sys.stderr)
    return {"dataset": ds, "stores": stores, "files": nfiles}


def lmdb_check(ds: Dataset, data: Path, avgs: tuple[int, ...], releases: int = 2) -> list[dict]:
    """Cross-check the simulation against a real casfs store: ingest the first ``releases``
    releases of ``ds`` through casfs's own pipeline into a fresh LMDB store per average, and
    compare object count, stored bytes and the pages the ``objects`` and ``refs`` databases
    really take with the simulation's figures for the same data."""
    from casfs.store.pipeline import Pipeline
    from casfs.store.store import Store as CasStore

    paths = [
        fetch_sdist(data, ds.package, v) if ds.kind == "sdist" else fetch_wheel(data, ds.package, v)
        for v in ds.versions[:releases]
    ]
    out = []
    for avg in avgs:
        with tempfile.TemporaryDirectory(prefix="chunk_params-") as tmp:
            store = CasStore.create(os.path.join(tmp, "store"), chunk_avg=avg)
            pipe = Pipeline(store)
            sim = Store(avg)
            try:
                for path in paths:
                    for f in release_files(path):
                        buf = f.read_bytes()
                        sim.ingest(buf)
                        pieces = pipe.encode(buf)

                        def put(tx, pieces=pieces, store=store):
                            for pc in pieces:
                                if pc.digest is not None:
                                    store.add_ref(tx, pc.digest, pc.value, pc.length)

                        store.run_write(put)
                stats = store.stats()
                with store.env.begin() as txn:
                    used = {}
                    for db in (b"objects", b"refs"):
                        st = txn.stat(store.dbs[db])
                        pages = st["leaf_pages"] + st["branch_pages"] + st["overflow_pages"]
                        used[db] = pages * st["psize"]
            finally:
                pipe.close()
                store.close()
        out.append(
            {
                "avg": avg,
                "releases": list(ds.versions[:releases]),
                "real_objects": stats.objects,
                "sim_objects": sim.unique_chunks,
                "real_stored": stats.stored_bytes,
                "sim_stored": sim.stored,
                "real_objects_db": used[b"objects"],
                "real_refs_db": used[b"refs"],
                "sim_lmdb_all_in": sim.lmdb_objects + sim.unique_chunks * META_BYTES_PER_CHUNK,
            }
        )
    return out


def figures(store: Store) -> list[tuple[str, float, str]]:
    s = store
    t = s.t_cut + s.t_hash + s.t_zstd
    meta = s.unique_chunks * META_BYTES_PER_CHUNK
    inc = s.releases[1:]
    first = s.releases[0]
    return [
        ("logical_bytes", s.logical, "bytes"),
        ("unique_bytes", s.unique_bytes, "bytes"),
        ("stored_bytes", s.stored, "bytes"),
        ("dedup_ratio", s.logical / s.unique_bytes, "x"),
        ("overall_ratio", s.logical / s.stored, "x"),
        ("unique_chunks", s.unique_chunks, "chunks"),
        ("chunk_refs", s.refs, "chunks"),
        ("raw_chunks", s.raw_chunks, "chunks"),
        ("meta_bytes_est", meta, "bytes"),
        ("all_in_bytes", s.stored + meta, "bytes"),
        ("all_in_ratio", s.logical / (s.stored + meta), "x"),
        ("lmdb_object_bytes_est", s.lmdb_objects, "bytes"),
        ("lmdb_all_in_bytes_est", s.lmdb_objects + meta, "bytes"),
        ("lmdb_all_in_ratio", s.logical / (s.lmdb_objects + meta), "x"),
        ("mean_unique_chunk", s.unique_bytes / s.unique_chunks, "bytes"),
        ("mean_chunk", s.logical / s.refs, "bytes"),
        ("first_release_stored_bytes", first["new_stored"], "bytes"),
        ("incremental_stored_bytes", sum(r["new_stored"] for r in inc), "bytes"),
        ("incremental_mean_stored_bytes", sum(r["new_stored"] for r in inc) / len(inc), "bytes"),
        ("incremental_chunks", sum(r["new_chunks"] for r in inc), "chunks"),
        (
            "incremental_lmdb_all_in_bytes_est",
            sum(r["new_lmdb"] + r["new_chunks"] * META_BYTES_PER_CHUNK for r in inc),
            "bytes",
        ),
        ("cut_mbps", s.logical / s.t_cut / 1e6, "MB/s"),
        ("hash_mbps", s.logical / s.t_hash / 1e6, "MB/s"),
        ("ingest_mbps", s.logical / t / 1e6, "MB/s"),
        ("first_release_ingest_mbps", first["logical"] / first["seconds"] / 1e6, "MB/s"),
    ]


# --------------------------------------------------------------------------------------------
# Reporting


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f}"


def _k(avg: int) -> str:
    return f"{avg // KiB} KiB"


def markdown(results: list[dict], meta: dict) -> str:
    out = []
    w = out.append
    w(
        f"Measured {meta['date']} on {meta['machine']}, Python {meta['python']}, "
        f"in {meta['runtime']:.0f} s (simulation {meta['sim_runtime']:.0f} s; downloads "
        "excluded), with"
    )
    w("")
    w("```sh")
    w(meta["command"])
    w("```")
    w("")
    w(
        "FastCDC `min = avg/4`, `max = 4 * avg`; BLAKE3-256 per chunk; new chunks zstd level "
        f"{ZSTD_LEVEL} (raw if it saves < 3%) + 1 header byte; metadata estimated at "
        f"{META_BYTES_PER_CHUNK} bytes per unique chunk (refs + objects key + extent rows). "
        "*All-in* = stored + metadata; *LMDB pages* also rounds every object value over "
        f"{LMDB_INLINE_MAX} bytes up to whole {LMDB_PAGE}-byte overflow pages, as LMDB stores "
        "them. MB = 10^6 bytes. Throughput is single-thread, data already in memory: cut + hash "
        "of every chunk, zstd of new chunks only."
    )
    w("")
    w("| dataset | releases | files (first → last) | logical MB |")
    w("|---|---|---|--:|")
    for r in results:
        ds = r["dataset"]
        s0 = r["stores"][0]
        w(
            f"| `{ds.name}` | {ds.package} {', '.join(ds.versions)} | "
            f"{r['files'][0]:,} → {r['files'][-1]:,} | {_mb(s0.logical)} |"
        )
    w("")
    for r in results:
        ds = r["dataset"]
        w(f"### `{ds.name}`: {ds.description}")
        w("")
        w(
            "| avg | unique MB | stored MB | dedup × | overall × | unique chunks | "
            "mean unique chunk | meta MB (est.) | all-in MB | all-in × | "
            "all-in MB, LMDB pages (est.) |"
        )
        w("|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
        figs = {s.avg: {k: v for k, v, _ in figures(s)} for s in r["stores"]}
        for s in r["stores"]:
            f = figs[s.avg]
            cells = [
                _k(s.avg),
                _mb(f["unique_bytes"]),
                _mb(f["stored_bytes"]),
                f"{f['dedup_ratio']:.2f}",
                f"{f['overall_ratio']:.2f}",
                f"{s.unique_chunks:,}",
                f"{f['mean_unique_chunk'] / KiB:.1f} KiB",
                _mb(f["meta_bytes_est"]),
                _mb(f["all_in_bytes"]),
                f"{f['all_in_ratio']:.2f}",
                _mb(f["lmdb_all_in_bytes_est"]),
            ]
            w("| " + " | ".join(cells) + " |")
        w("")
        w(
            "| avg | first release stored MB | later releases stored MB (mean per release) | "
            "later releases all-in MB, LMDB pages | ingest MB/s | cut MB/s | hash MB/s |"
        )
        w("|--:|--:|--:|--:|--:|--:|--:|")
        for s in r["stores"]:
            f = figs[s.avg]
            cells = [
                _k(s.avg),
                _mb(f["first_release_stored_bytes"]),
                f"{_mb(f['incremental_stored_bytes'])} ({_mb(f['incremental_mean_stored_bytes'])})",
                _mb(f["incremental_lmdb_all_in_bytes_est"]),
                f"{f['ingest_mbps']:.0f}",
                f"{f['cut_mbps']:.0f}",
                f"{f['hash_mbps']:.0f}",
            ]
            w("| " + " | ".join(cells) + " |")
        w("")
        w("New stored MB per release (compressed chunks + est. metadata of the new chunks):")
        w("")
        w("| release | logical MB | " + " | ".join(_k(s.avg) for s in r["stores"]) + " |")
        w("|---|--:|" + "--:|" * len(r["stores"]) + "")
        for i, v in enumerate(ds.versions):
            rel = [s.releases[i] for s in r["stores"]]
            cells = [
                f"{_mb(x['new_stored'])} + {_mb(x['new_chunks'] * META_BYTES_PER_CHUNK)}"
                for x in rel
            ]
            w(f"| {v} | {_mb(rel[0]['logical'])} | " + " | ".join(cells) + " |")
        w("")
    checks = [r for r in results if r.get("lmdb_check")]
    if checks:
        w("### Cross-check against a real casfs store")
        w("")
        w(
            "The first two releases of each dataset ingested through casfs's own pipeline "
            "(`Store.create(chunk_avg=...)`, `Pipeline.encode`, `Store.add_ref`) into a fresh "
            "LMDB store; *real* pages are from LMDB's own statistics of the `objects` and "
            "`refs` databases (no extents: no tree is built)."
        )
        w("")
        w(
            "| dataset | avg | objects real / simulated | stored MB real / simulated | "
            "objects + refs db MB (real) | simulated all-in MB, LMDB pages |"
        )
        w("|---|--:|--:|--:|--:|--:|")
        for r in checks:
            for c in r["lmdb_check"]:
                w(
                    f"| `{r['dataset'].name}` {', '.join(c['releases'])} | {_k(c['avg'])} | "
                    f"{c['real_objects']:,} / {c['sim_objects']:,} | "
                    f"{_mb(c['real_stored'])} / {_mb(c['sim_stored'])} | "
                    f"{_mb(c['real_objects_db'] + c['real_refs_db'])} | "
                    f"{_mb(c['sim_lmdb_all_in'])} |"
                )
        w("")
    return "\n".join(out)


def write_markdown(path: Path, body: str) -> None:
    block = f"{BEGIN}\n{body}\n{END}"
    if path.exists():
        text = path.read_text()
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            path.write_text(head + block + tail)
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Chunk size measurements\n\n{block}\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    here = Path(__file__).resolve().parent
    ap.add_argument("--data", type=Path, default=here / "data", help="data directory")
    ap.add_argument("--markdown", type=Path, help="also write markdown tables to this file")
    ap.add_argument(
        "--dataset",
        action="append",
        choices=[d.name for d in DATASETS],
        help="run only these datasets (repeatable; default all)",
    )
    ap.add_argument(
        "--avg",
        type=int,
        action="append",
        help="average chunk sizes in KiB (repeatable; default 16, 32, 64)",
    )
    ap.add_argument(
        "--skip-lmdb-check",
        action="store_true",
        help="skip the cross-check against a real casfs store (needs casfs importable)",
    )
    args = ap.parse_args(argv)
    avgs = tuple(a * KiB for a in args.avg) if args.avg else AVGS
    chosen = [d for d in DATASETS if not args.dataset or d.name in args.dataset]

    # fetch everything first so that the timed run is not interleaved with downloads
    for ds in chosen:
        for v in ds.versions:
            (fetch_sdist if ds.kind == "sdist" else fetch_wheel)(args.data, ds.package, v)

    t0 = time.perf_counter()
    results = []
    for ds in chosen:
        r = run_dataset(ds, args.data, avgs)
        results.append(r)
        for s in r["stores"]:
            for metric, value, unit in figures(s):
                print(
                    json.dumps(
                        {
                            "bench": "chunk_params",
                            "dataset": ds.name,
                            "avg": s.avg,
                            "metric": metric,
                            "value": value,
                            "unit": unit,
                        }
                    )
                )
            for rel in s.releases:
                print(
                    json.dumps(
                        {
                            "bench": "chunk_params",
                            "dataset": ds.name,
                            "avg": s.avg,
                            "release": rel["release"],
                            "metric": "release_new_stored_bytes",
                            "value": rel["new_stored"],
                            "unit": "bytes",
                        }
                    )
                )
        sys.stdout.flush()
    runtime = time.perf_counter() - t0
    sim_runtime = runtime
    print(f"simulation {runtime:.1f} s", file=sys.stderr)
    if not args.skip_lmdb_check:
        for r in results:
            r["lmdb_check"] = lmdb_check(r["dataset"], args.data, avgs)
            for c in r["lmdb_check"]:
                for key in (
                    "real_objects",
                    "sim_objects",
                    "real_stored",
                    "sim_stored",
                    "real_objects_db",
                    "real_refs_db",
                    "sim_lmdb_all_in",
                ):
                    unit = "objects" if key.endswith("objects") else "bytes"
                    print(
                        json.dumps(
                            {
                                "bench": "chunk_params",
                                "dataset": r["dataset"].name,
                                "avg": c["avg"],
                                "metric": f"lmdb_check_{key}",
                                "value": c[key],
                                "unit": unit,
                            }
                        )
                    )
    runtime = time.perf_counter() - t0
    print(f"runtime {runtime:.1f} s", file=sys.stderr)

    if args.markdown:
        cmd = [".venv/bin/python", "bench/chunk_params.py", "--markdown", str(args.markdown)]
        for d in args.dataset or []:
            cmd += ["--dataset", d]
        for a in args.avg or []:
            cmd += ["--avg", str(a)]
        cpu = "unknown CPU"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        meta = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.machine()}",
            "python": platform.python_version(),
            "runtime": runtime,
            "sim_runtime": sim_runtime,
            "command": " ".join(cmd),
        }
        write_markdown(args.markdown, markdown(results, meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
