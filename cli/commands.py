"""One function per ``casfs`` subcommand; each returns the exit code."""

from __future__ import annotations

import argparse
import json
import sys

from casfs.errors import CasfsError
from casfs.store.chunker import DEFAULT_AVG
from casfs.store.store import Store
from casfs.tree.fs import Filesystem
from casfs.tree.fsck import fsck as run_fsck
from casfs_cli import demo as demo_module
from casfs_cli.format import human_bytes

ALLOWED_AVG = (16 << 10, 32 << 10, 64 << 10)


def init(args: argparse.Namespace) -> int:
    avg = DEFAULT_AVG if args.chunk_avg is None else args.chunk_avg
    if avg not in ALLOWED_AVG:
        raise CasfsError("--chunk-avg must be 16K, 32K or 64K")
    store = Filesystem.create_store(args.store, chunk_avg=avg, zstd_level=args.zstd_level)
    chunks = f"chunks ~{avg >> 10} KiB, zstd {args.zstd_level}"
    print(f"created store {store.path} (uuid {store.uuid}, {chunks})")
    store.close()
    return 0


def stats_dict(store: Store) -> dict:
    s = store.stats()
    return {
        "store": store.path,
        "uuid": store.uuid,
        "inodes": s.inodes,
        "objects": s.objects,
        "logical_bytes": s.referenced_bytes,
        "unique_bytes": s.plain_bytes,
        "stored_bytes": s.stored_bytes,
        "file_bytes": store.file_bytes(),
        "compression_ratio": round(s.compression_ratio, 3),
        "dedup_ratio": round(s.dedup_ratio, 3),
        "chunk_avg": store.params.avg,
        "zstd_level": store.codec.zstd_level,
    }


def print_stats(d: dict) -> None:
    rows = [
        ("store", d["store"]),
        ("inodes", f"{d['inodes']:,}"),
        ("objects", f"{d['objects']:,}"),
        ("logical data", human_bytes(d["logical_bytes"])),
        ("unique data", f"{human_bytes(d['unique_bytes'])}  (dedup ratio {d['dedup_ratio']:.2f}x)"),
        (
            "stored",
            f"{human_bytes(d['stored_bytes'])}  (compression ratio {d['compression_ratio']:.2f}x)",
        ),
        ("store files", human_bytes(d["file_bytes"])),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def stats(args: argparse.Namespace) -> int:
    with Store(args.store, writer=False) as store:
        d = stats_dict(store)
    if args.json:
        print(json.dumps(d))
    else:
        print_stats(d)
    return 0


def fsck(args: argparse.Namespace) -> int:
    progress = None
    if args.verify_data and sys.stderr.isatty():

        def progress(msg: str) -> None:
            print(f"\r{msg}", end="", file=sys.stderr, flush=True)

    with Store(args.store, writer=False) as store:
        report = run_fsck(store, verify_data=args.verify_data, progress=progress)
    if progress:
        print(file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "clean": report.clean,
                    "inodes": report.inodes,
                    "objects": report.objects,
                    "extents": report.extents,
                    "verified_bytes": report.verified_bytes,
                    "problems": [{"kind": p.kind, "message": p.message} for p in report.problems],
                    "notes": [{"kind": p.kind, "message": p.message} for p in report.notes],
                }
            )
        )
    else:
        for p in report.problems:
            print(f"{p.kind}: {p.message}")
        for p in report.notes:
            print(f"note: {p.kind}: {p.message}")
        verified = f", {human_bytes(report.verified_bytes)} verified" if args.verify_data else ""
        state = "clean" if report.clean else f"{len(report.problems)} problem(s)"
        counts = f"{report.inodes:,} inodes, {report.objects:,} objects, {report.extents:,} extents"
        print(f"{counts}{verified}: {state}")
    return 0 if report.clean else 1


def demo(args: argparse.Namespace) -> int:
    return demo_module.run(args.dir)
