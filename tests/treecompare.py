"""Compare two local trees as ``rsync -anciHAX`` would, and a little more: every difference in
what a faithful copy must keep (names, types, modes, owners, sizes, nanosecond times, device
numbers, symlink targets, bytes, xattrs, hard-link structure), and that holes stayed holes.

Every path is bytes (names need not be UTF-8) and nothing follows a symlink. All attributes
are taken (``lstat``) before any file is read, so reading cannot move the access times being
compared; file contents are read with ``O_NOATIME`` where allowed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

# Xattrs a copy cannot or need not carry: the kernel's (ACLs show up as system.*, and
# compare through the mode anyway) and the SELinux label the local policy assigns.
_SKIP_XATTR = (b"system.", b"security.selinux")
# A copy may take this much more room than its source (block rounding, preallocation).
_SLACK_BYTES = 1 << 20
_SLACK_SHARE = 0.10
_BLOCK = 1 << 20


@dataclass(frozen=True)
class _Node:
    st: os.stat_result
    xattrs: dict[bytes, bytes]
    target: bytes = b""


def _show(rel: bytes) -> str:
    return rel.decode(errors="backslashreplace")


def _xattrs(path: bytes) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    out = {}
    for name in names:
        key = os.fsencode(name)
        if key.startswith(_SKIP_XATTR):
            continue
        out[key] = os.getxattr(path, name, follow_symlinks=False)
    return out


def _scan(root: bytes) -> dict[bytes, _Node]:
    """Every path below ``root`` (and ``root`` itself as b"."), by relative path."""
    out: dict[bytes, _Node] = {}
    stack = [b"."]
    while stack:
        rel = stack.pop()
        path = root if rel == b"." else os.path.join(root, rel)
        st = os.lstat(path)
        target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else b""
        out[rel] = _Node(st, _xattrs(path), target)
        if stat.S_ISDIR(st.st_mode):
            for name in os.listdir(path):
                stack.append(name if rel == b"." else os.path.join(rel, name))
    return out


def _open(path: bytes) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NOATIME)
    except PermissionError:  # O_NOATIME needs the file's owner (or root)
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)


def _first_difference(a: bytes, b: bytes) -> int | None:
    """The offset of the first byte that differs (or where one file ends), else None."""
    fa, fb = _open(a), _open(b)
    try:
        offset = 0
        while True:
            x, y = os.pread(fa, _BLOCK, offset), os.pread(fb, _BLOCK, offset)
            if x != y:
                return offset + next(
                    (i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q),
                    min(len(x), len(y)),
                )
            if not x:
                return None
            offset += len(x)
    finally:
        os.close(fa)
        os.close(fb)


def _groups(nodes: dict[bytes, _Node]) -> dict[bytes, tuple[bytes, ...]]:
    """Each non-directory's hard-link group: the sorted paths that share its inode."""
    by_ino: dict[tuple[int, int], list[bytes]] = {}
    for rel, n in nodes.items():
        if not stat.S_ISDIR(n.st.st_mode):
            by_ino.setdefault((n.st.st_dev, n.st.st_ino), []).append(rel)
    out = {}
    for paths in by_ino.values():
        group = tuple(sorted(paths))
        for rel in group:
            out[rel] = group
    return out


def compare_trees(a: str, b: str, *, check_atime: bool = False, owners: bool = True) -> list[str]:
    """Human-readable differences of tree (or file) ``b`` from ``a``; empty when equal.

    Compared: the set of relative paths, type, full ``st_mode``, owner and group (``owners``),
    size (not of directories, whose size is the filesystem's business), ``st_mtime_ns``
    exactly (directories and symlinks too), ``st_atime_ns`` (``check_atime``), device
    numbers, symlink targets, file bytes, xattrs (but ``system.*`` and ``security.selinux``),
    hard links (the same paths share an inode, and link counts agree) and sparseness: ``b``
    may allocate at most 10 % + 1 MiB more than ``a`` for a file, so holes must stay holes.
    """
    root_a, root_b = os.fsencode(a), os.fsencode(b)
    na, nb = _scan(root_a), _scan(root_b)
    out = [f"{_show(rel)}: only in {a}" for rel in sorted(na.keys() - nb.keys())]
    out += [f"{_show(rel)}: only in {b}" for rel in sorted(nb.keys() - na.keys())]
    groups_a, groups_b = _groups(na), _groups(nb)
    reported_groups: set[tuple[bytes, ...]] = set()
    to_read = []
    for rel in sorted(na.keys() & nb.keys()):
        x, y = na[rel], nb[rel]
        sa, sb = x.st, y.st
        name = _show(rel)
        if stat.S_IFMT(sa.st_mode) != stat.S_IFMT(sb.st_mode):
            out.append(f"{name}: type {stat.filemode(sa.st_mode)} != {stat.filemode(sb.st_mode)}")
            continue
        if sa.st_mode != sb.st_mode:
            out.append(f"{name}: mode {sa.st_mode:o} != {sb.st_mode:o}")
        if owners and (sa.st_uid, sa.st_gid) != (sb.st_uid, sb.st_gid):
            out.append(f"{name}: owner {sa.st_uid}:{sa.st_gid} != {sb.st_uid}:{sb.st_gid}")
        is_dir = stat.S_ISDIR(sa.st_mode)
        if not is_dir and sa.st_size != sb.st_size:
            out.append(f"{name}: size {sa.st_size} != {sb.st_size}")
        if sa.st_mtime_ns != sb.st_mtime_ns:
            out.append(f"{name}: mtime {sa.st_mtime_ns} != {sb.st_mtime_ns} ns")
        if check_atime and sa.st_atime_ns != sb.st_atime_ns:
            out.append(f"{name}: atime {sa.st_atime_ns} != {sb.st_atime_ns} ns")
        if (stat.S_ISCHR(sa.st_mode) or stat.S_ISBLK(sa.st_mode)) and sa.st_rdev != sb.st_rdev:
            out.append(f"{name}: device {sa.st_rdev:#x} != {sb.st_rdev:#x}")
        if x.target != y.target:
            out.append(f"{name}: symlink target {x.target!r} != {y.target!r}")
        if x.xattrs != y.xattrs:
            for key in sorted(x.xattrs.keys() | y.xattrs.keys()):
                va, vb = x.xattrs.get(key), y.xattrs.get(key)
                if va != vb:
                    out.append(f"{name}: xattr {_show(key)} {va!r} != {vb!r}")
        if not is_dir:
            if sa.st_nlink != sb.st_nlink:
                out.append(f"{name}: link count {sa.st_nlink} != {sb.st_nlink}")
            ga, gb = groups_a[rel], groups_b[rel]
            if ga != gb and ga not in reported_groups:
                reported_groups.add(ga)
                show = [_show(p) for p in ga], [_show(p) for p in gb]
                out.append(f"{name}: hard links {show[0]} != {show[1]}")
        if stat.S_ISREG(sa.st_mode):
            to_read.append((rel, sa, sb))
    for rel, sa, sb in to_read:  # after every lstat: reading may move access times
        name = _show(rel)
        pa = root_a if rel == b"." else os.path.join(root_a, rel)
        pb = root_b if rel == b"." else os.path.join(root_b, rel)
        at = _first_difference(pa, pb)
        if at is not None:
            out.append(f"{name}: content differs from byte {at}")
        limit = sa.st_blocks * 512 * (1 + _SLACK_SHARE) + _SLACK_BYTES
        if sb.st_blocks * 512 > limit:
            out.append(
                f"{name}: {sb.st_blocks * 512} bytes allocated, source only "
                f"{sa.st_blocks * 512} (holes filled?)"
            )
    return out
