"""Mount table look-ups and the checks made before mounting and unmounting."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from dataclasses import dataclass

from casfs.errors import CasfsError

FSTYPE = "fuse.casfs"


@dataclass(frozen=True)
class MountEntry:
    source: str
    target: str
    fstype: str


def _unescape(field: str) -> str:
    """/proc/mounts escapes space, tab, newline and backslash as octal."""
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 1 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts() -> list[MountEntry]:
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        entries = []
        for line in f:
            parts = line.split()
            if len(parts) >= 3:
                entries.append(MountEntry(_unescape(parts[0]), _unescape(parts[1]), parts[2]))
        return entries


def find_mount(target: str) -> MountEntry | None:
    target = os.path.realpath(target) if os.path.exists(target) else os.path.abspath(target)
    found = None
    for m in mounts():
        if m.target == target:
            found = m  # the last one is on top
    return found


def casfs_mount_of_store(store_path: str) -> MountEntry | None:
    for m in mounts():
        if m.fstype == FSTYPE and m.source == store_path:
            return m
    return None


def is_stale(target: str) -> bool:
    """A FUSE mount whose daemon is gone answers ENOTCONN. Asked with statvfs, which always
    reaches the daemon: a stat is answered from the kernel's attribute cache for a while
    after the daemon died."""
    try:
        os.statvfs(target)
    except OSError as exc:
        return exc.errno == errno.ENOTCONN
    return False


def check_mountpoint(path: str) -> str:
    """The absolute mountpoint, or a one-line error saying why it cannot be used."""
    if is_stale(path):
        raise CasfsError(f"{path} is a stale mount (its daemon died): run 'casfs umount {path}'")
    if not os.path.exists(path):
        raise CasfsError(f"mountpoint {path} does not exist")
    if not os.path.isdir(path):
        raise CasfsError(f"mountpoint {path} is not a directory")
    real = os.path.realpath(path)
    if os.path.ismount(real) or find_mount(real) is not None:
        raise CasfsError(f"{path} is already a mount point")
    if os.listdir(real):
        raise CasfsError(f"mountpoint {path} is not empty")
    return real


def check_fuse_available() -> None:
    if not os.path.exists("/dev/fuse"):
        raise CasfsError("/dev/fuse is missing: load the fuse module (modprobe fuse)")
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise CasfsError("fusermount3 is missing: install the fuse3 package")


READ_AHEAD_KB = 1024


def tune_readahead(mountpoint: str, kb: int = READ_AHEAD_KB) -> bool:
    """Raise the kernel's read-ahead window for a FUSE mount (its bdi's ``read_ahead_kb``,
    128 KiB by default), so sequential reads arrive as 1 MiB requests (the most FUSE sends)
    instead of 128 KiB ones: an eighth of the per-request cost. Needs root; best effort.

    The device number comes from /proc/self/mountinfo, not from ``stat``: the daemon calls
    this before its request loop runs, and a stat of its own mount would wait forever for
    the answer to FUSE's INIT request."""
    device = _mount_device(os.path.abspath(mountpoint))  # realpath would stat the mount
    if device is None:
        return False
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w", encoding="ascii") as f:
            f.write(str(kb))
        return True
    except OSError:
        return False


def _mount_device(target: str) -> str | None:
    """``major:minor`` of the topmost mount at ``target``, from /proc/self/mountinfo."""
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 4 and _unescape(parts[4]) == target:
                    found = parts[2]
    except OSError:
        return None
    return found


def fusermount_unmount(target: str, lazy: bool = False) -> None:
    """Unmount with fusermount3 (or umount(8) when only that exists)."""
    tool = shutil.which("fusermount3")
    if tool:
        cmd = [tool, "-u", "-z", target] if lazy else [tool, "-u", target]
    elif shutil.which("umount"):
        cmd = ["umount", "-l", target] if lazy else ["umount", target]
    else:
        raise CasfsError("fusermount3 is missing: install the fuse3 package")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        detail = (r.stderr or r.stdout).strip().splitlines()
        text = detail[-1] if detail else f"exit {r.returncode}"
        if "busy" in text.lower():
            raise CasfsError(f"{target} is busy (files are open there); close them and retry")
        raise CasfsError(f"cannot unmount {target}: {text}")
