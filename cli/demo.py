"""``casfs demo``: a mounted store filled with real files, to see casfs at work.

It creates a store, mounts it, copies this interpreter's standard library into the mount
twice with ordinary file calls (the second copy costs almost nothing: every chunk is
already stored), prints ``casfs stats`` and leaves the mount up for the user to explore.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time

from casfs.errors import CasfsError
from casfs.fuse.mountpoint import FSTYPE, find_mount
from casfs_cli.format import human_bytes

SKIP_DIRS = {"site-packages", "__pycache__", "test", "tests", "idlelib", "tkinter", "turtledemo"}


def _casfs(*args: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "casfs_cli.main", *args], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise CasfsError((r.stderr or r.stdout).strip().splitlines()[-1])


def _copy(src: str, dst: str) -> tuple[int, int]:
    files = nbytes = 0

    def count(path: str, target: str) -> None:
        nonlocal files, nbytes
        shutil.copy2(path, target, follow_symlinks=False)
        if not os.path.islink(path):
            files += 1
            nbytes += os.path.getsize(path)

    shutil.copytree(
        src,
        dst,
        symlinks=True,
        ignore=lambda d, names: [n for n in names if n in SKIP_DIRS],
        copy_function=count,
    )
    return files, nbytes


def run(directory: str) -> int:
    directory = os.path.abspath(directory)
    store, mnt = os.path.join(directory, "store"), os.path.join(directory, "mnt")
    old = find_mount(mnt)
    if old is not None and old.fstype == FSTYPE:
        _casfs("umount", mnt)
    if os.path.lexists(store):  # a demo store of an earlier run: only that may go
        if not os.path.isfile(os.path.join(store, "casfs-store.json")):
            raise CasfsError(f"{store} exists and is not a casfs store; not touching it")
        shutil.rmtree(store)
    os.makedirs(mnt, exist_ok=True)
    src = sysconfig.get_paths()["stdlib"]
    if not os.path.isdir(src):
        raise CasfsError(f"cannot find the Python standard library at {src}")
    print(f"$ casfs init {store}")
    _casfs("init", store)
    print(f"$ casfs mount {store} {mnt}")
    _casfs("mount", store, mnt)
    try:
        for name in ("stdlib", "stdlib-again"):
            t0 = time.perf_counter()
            files, nbytes = _copy(src, os.path.join(mnt, name))
            dt = time.perf_counter() - t0
            print(
                f"$ cp -a {src} {mnt}/{name}   # {files:,} files, {human_bytes(nbytes)} "
                f"in {dt:.1f} s ({human_bytes(nbytes / dt)}/s)"
            )
        fd = os.open(os.path.join(mnt, "stdlib", "os.py"), os.O_RDONLY)
        try:
            os.fsync(fd)  # commits the mount's batch, so the stats below see everything
        finally:
            os.close(fd)
    except BaseException:
        _casfs("umount", mnt)
        raise
    print(f"\n$ casfs stats {store}")
    sys.stdout.flush()
    subprocess.run([sys.executable, "-m", "casfs_cli.main", "stats", store], check=False)
    print(
        f"\nThe store stays mounted at {mnt}: browse it, copy files in, and see the effect "
        f"with 'casfs stats {store}'.\nWhen done: casfs umount {mnt}"
    )
    return 0
