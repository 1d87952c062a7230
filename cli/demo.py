"""``casfs demo``: a store filled with real files, to see chunking, dedup and compression.

It copies this interpreter's standard library into the store's live tree twice (the second
copy costs almost nothing: every chunk is already stored) and prints ``casfs stats``. Until
the mount exists this is how to see casfs at work; it uses the same library calls as the
rest of casfs.
"""

from __future__ import annotations

import os
import shutil
import stat
import sysconfig
import time

from casfs.errors import CasfsError
from casfs.tree.fs import ROOT_INO, Filesystem
from casfs_cli.format import human_bytes

SKIP_DIRS = {"site-packages", "__pycache__", "test", "tests", "idlelib", "tkinter", "turtledemo"}


def copy_tree(fs: Filesystem, src: str, parent: int, name: bytes) -> tuple[int, int]:
    """Copy directory ``src`` into ``parent``/``name``; returns (files, bytes)."""
    st = os.lstat(src)
    top = fs.mkdir(parent, name, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    files = nbytes = 0
    for entry in sorted(os.scandir(src), key=lambda e: e.name):
        bname = os.fsencode(entry.name)
        est = entry.stat(follow_symlinks=False)
        if entry.is_dir(follow_symlinks=False):
            if entry.name in SKIP_DIRS:
                continue
            f, b = copy_tree(fs, entry.path, top.ino, bname)
            files, nbytes = files + f, nbytes + b
        elif entry.is_symlink():
            fs.symlink(top.ino, bname, os.fsencode(os.readlink(entry.path)), est.st_uid, est.st_gid)
        elif entry.is_file(follow_symlinks=False):
            node = fs.create(top.ino, bname, stat.S_IMODE(est.st_mode), est.st_uid, est.st_gid)
            with open(entry.path, "rb") as f:
                data = f.read()
            fs.write(node.ino, 0, data)
            fs.setattr(node.ino, mtime_ns=est.st_mtime_ns, atime_ns=est.st_atime_ns)
            files, nbytes = files + 1, nbytes + len(data)
    return files, nbytes


def run(directory: str) -> int:
    store_dir = os.path.join(directory, "store")
    if os.path.exists(store_dir):
        shutil.rmtree(store_dir)
    os.makedirs(directory, exist_ok=True)
    src = sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(src):
        raise CasfsError(f"cannot find the Python standard library at {src}")
    store = Filesystem.create_store(store_dir)
    fs = Filesystem(store)
    try:
        print(f"casfs demo: store {store_dir}")
        for copy in (b"stdlib", b"stdlib-again"):
            t0 = time.perf_counter()
            store.begin_batch()
            files, nbytes = copy_tree(fs, src, ROOT_INO, copy)
            store.commit_batch()
            dt = time.perf_counter() - t0
            print(
                f"copied {src} -> /{copy.decode()}: {files:,} files, {human_bytes(nbytes)} "
                f"in {dt:.1f} s ({human_bytes(nbytes / dt)}/s)"
            )
    finally:
        fs.close()
        store.close()
    print()
    print(f"$ casfs stats {store_dir}")
    from casfs_cli.commands import print_stats, stats_dict
    from casfs.store.store import Store

    with Store(store_dir, writer=False) as ro:
        print_stats(stats_dict(ro))
    return 0
