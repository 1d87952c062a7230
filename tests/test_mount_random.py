"""A seeded random walk of file operations applied to a casfs mount and to a reference
directory on local disk, which must agree on every result and every errno.

After each step the paths (and open files) it touched are compared in both trees; every
COMPARE_EVERY steps the whole trees are. At the end the mount is remounted and compared once
more, and the teardown requires a clean fsck. Set CASFS_RANDOM_SEED / CASFS_RANDOM_STEPS to
replay or lengthen a run; a failure names the seed and the step.
"""

from __future__ import annotations

import errno
import os
import random
import stat
from collections import Counter, deque
from pathlib import Path

import pytest
from conftest import CasfsMount, assert_same_tree, casfs_mount

KiB = 1 << 10
MAX_SIZE = 1 << 20  # files stay at or below 1 MiB
SEED = int(os.environ.get("CASFS_RANDOM_SEED", "20261121"))
STEPS = int(os.environ.get("CASFS_RANDOM_STEPS", "20000"))
COMPARE_EVERY = int(os.environ.get("CASFS_RANDOM_COMPARE_EVERY", "500"))
HISTORY = 40  # steps shown when a comparison fails
NAMES = [b"a", b"b", b"c", b"d", b"e", b"f\xff", b"g h"]
MAX_DEPTH = 3
MAX_HANDLES = 6
XATTR_NAMES = ["user.a", "user.b", "user.long." + "x" * 100, "user.c"]
NOWHERE = b"/nonexistent-casfs-test-dir/x"
MODES = [0o644, 0o600, 0o755, 0o700, 0o777, 0o444, 0o000, 0o4755, 0o2755, 0o1777, 0o640]


def _outcome(fn, *args):
    try:
        return ("ok", fn(*args))
    except OSError as exc:
        return ("err", errno.errorcode.get(exc.errno, exc.errno))


def _describe(root: bytes, rel: bytes) -> tuple:
    """What must agree about one path: type, mode, size (files), link count, content."""
    path = os.path.join(root, rel) if rel else root
    try:
        st = os.lstat(path)
    except OSError as exc:
        return ("missing", errno.errorcode.get(exc.errno, exc.errno))
    kind = stat.S_IFMT(st.st_mode)
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            content: object = f.read()
        assert len(content) == st.st_size
    elif stat.S_ISLNK(st.st_mode):
        content = os.readlink(path)
    elif stat.S_ISDIR(st.st_mode):
        content = tuple(sorted(os.listdir(path)))
    else:
        content = None
    xattrs = ()
    if not stat.S_ISLNK(st.st_mode):
        names = sorted(x for x in os.listxattr(path) if x.startswith("user."))
        xattrs = tuple((x, os.getxattr(path, x)) for x in names)
    return (kind, stat.S_IMODE(st.st_mode), st.st_nlink, content, xattrs)


def _fd_content(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, size - len(out), len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


class Twin:
    """The two trees and the pairs of open file descriptors into them."""

    def __init__(self, ref: Path, mnt: Path, rng: random.Random) -> None:
        self.roots = (os.fsencode(ref), os.fsencode(mnt))
        self.rng = rng
        self.handles: list[tuple[int, int, bytes]] = []  # (ref fd, mount fd, opened as)
        self.ops: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.blob = rng.randbytes(MAX_SIZE)  # slices of it repeat: dedup across files
        self.step = 0
        self.last = ""
        self.history: deque[str] = deque(maxlen=HISTORY)

    # -- choosing paths and data ---------------------------------------------------------------

    def pick(self, *, existing: float = 0.7, descend: float = 0.7) -> bytes:
        """A relative path: usually an existing entry, sometimes a new name, now and then
        below a file or a missing directory (ENOTDIR, ENOENT)."""
        rng, ref = self.rng, self.roots[0]
        rel = b""
        for depth in range(MAX_DEPTH):
            here = os.path.join(ref, rel) if rel else ref
            entries = sorted(os.listdir(here)) if os.path.isdir(here) else []
            if entries and rng.random() < existing:
                name = rng.choice(entries)
            else:
                name = rng.choice(NAMES)
            rel = os.path.join(rel, name) if rel else name
            full = os.path.join(ref, rel)
            if depth + 1 < MAX_DEPTH and os.path.isdir(full) and not os.path.islink(full):
                if rng.random() < descend:
                    continue
            break
        if rng.random() < 0.02:
            rel = os.path.join(rel, rng.choice(NAMES))
        return rel

    def data(self, n: int) -> bytes:
        r = self.rng.random()
        if r < 0.5:
            return self.rng.randbytes(n)
        if r < 0.75:
            start = self.rng.randrange(0, MAX_SIZE - n + 1)
            return self.blob[start : start + n]
        return bytes([self.rng.randrange(256)]) * n

    def length(self) -> int:
        r = self.rng.random()
        if r < 0.55:
            return self.rng.randrange(1, 8 * KiB)
        if r < 0.9:
            return self.rng.randrange(1, 128 * KiB)
        return self.rng.randrange(1, 512 * KiB)

    # -- running an operation on both sides ----------------------------------------------------

    def note(self, what: str) -> None:
        self.last = what[:300]
        self.history.append(f"{self.step}: {self.last}")

    def fail(self, message: str) -> None:
        recent = "\n  ".join(self.history)
        raise AssertionError(
            f"seed {SEED}, step {self.step} ({self.last}): {message}\nrecent steps:\n  {recent}"
        )

    def both(self, name: str, fn, *args) -> tuple:
        """Run ``fn(root, *args)`` on both trees; results (or errnos) must agree."""
        self.ops[name] += 1
        self.note(f"{name}{args!r}")
        a = _outcome(fn, self.roots[0], *args)
        b = _outcome(fn, self.roots[1], *args)
        self.history[-1] += f" -> {a[1] if a[0] == 'err' else 'ok'}"
        if a != b:
            self.fail(f"reference {a!r:.200} but mount {b!r:.200}")
        if a[0] == "err":
            self.errors[f"{name}:{a[1]}"] += 1
        return a

    def both_fd(self, name: str, fn, handle: int, *args) -> tuple:
        self.ops[name] += 1
        self.note(f"{name}(handle {handle} {self.handles[handle][2]!r}, {args!r})")
        ref_fd, mnt_fd, _ = self.handles[handle]
        a = _outcome(fn, ref_fd, *args)
        b = _outcome(fn, mnt_fd, *args)
        if a != b:
            self.fail(f"reference {a!r:.200} but mount {b!r:.200}")
        return a

    def check_paths(self, *rels: bytes) -> None:
        checked = set()
        for rel in rels:
            for r in (rel, os.path.dirname(rel)):
                if r in checked:
                    continue
                checked.add(r)
                a, b = (_describe(root, r) for root in self.roots)
                if a != b:
                    self.fail(f"{r!r} differs:\n  reference {a!r:.400}\n  mount     {b!r:.400}")

    def check_handle(self, handle: int) -> None:
        ref_fd, mnt_fd, rel = self.handles[handle]
        a, b = _fd_content(ref_fd), _fd_content(mnt_fd)
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
            self.fail(
                f"open file {rel!r} differs: sizes {len(a)} and {len(b)}, first difference at {at}"
            )

    def check_all(self) -> None:
        assert_same_tree(self.roots[0], self.roots[1])
        for h in range(len(self.handles)):
            self.check_handle(h)

    def close_all(self) -> None:
        for ref_fd, mnt_fd, _ in self.handles:
            os.close(ref_fd)
            os.close(mnt_fd)
        self.handles.clear()

    # -- the operations ------------------------------------------------------------------------

    def op_write(self) -> None:
        rel, n = self.pick(), self.length()
        off = self.rng.randrange(0, MAX_SIZE - n + 1)
        data = self.data(n)

        def write(root, rel, off, data):
            fd = os.open(os.path.join(root, rel), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                return os.pwrite(fd, data, off)
            finally:
                os.close(fd)

        self.both("write", write, rel, off, data)
        self.check_paths(rel)

    def op_rewrite(self) -> None:
        """Replace a file's content the usual way: open with O_TRUNC, write from 0."""
        rel, n = self.pick(), self.rng.choice([0, self.length()])

        def rewrite(root, rel, data):
            fd = os.open(os.path.join(root, rel), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                return os.write(fd, data)
            finally:
                os.close(fd)

        self.both("rewrite", rewrite, rel, self.data(n))
        self.check_paths(rel)

    def op_append(self) -> None:
        rel, n = self.pick(), self.length()

        def append(root, rel, data):
            fd = os.open(os.path.join(root, rel), os.O_WRONLY | os.O_APPEND)
            try:
                if os.fstat(fd).st_size + len(data) > MAX_SIZE:
                    return None
                return os.write(fd, data)
            finally:
                os.close(fd)

        self.both("append", append, rel, self.data(n))
        self.check_paths(rel)

    def op_read(self) -> None:
        rel = self.pick(existing=0.9)
        off = self.rng.randrange(0, MAX_SIZE + 4096)
        n = self.length()

        def read(root, rel, off, n):
            fd = os.open(os.path.join(root, rel), os.O_RDONLY)
            try:
                return os.pread(fd, n, off)
            finally:
                os.close(fd)

        self.both("read", read, rel, off, n)

    def op_truncate(self) -> None:
        rel = self.pick(existing=0.9)
        size = self.rng.choice(
            [0, self.rng.randrange(0, MAX_SIZE + 1), self.rng.randrange(0, 4096)]
        )
        self.both(
            "truncate",
            lambda root, rel, size: os.truncate(os.path.join(root, rel), size),
            rel,
            size,
        )
        self.check_paths(rel)

    def op_open(self) -> None:
        if len(self.handles) >= MAX_HANDLES:
            return self.op_close()
        rel = self.pick(existing=0.85)
        flags = os.O_RDWR | (os.O_CREAT if self.rng.random() < 0.3 else 0)
        if self.rng.random() < 0.15:
            flags |= os.O_TRUNC  # while other handles may hold buffered writes to it
        self.ops["open"] += 1
        self.note(f"open({rel!r}, {flags:#o}) -> handle {len(self.handles)}")
        fds = [_outcome(os.open, os.path.join(root, rel), flags, 0o644) for root in self.roots]
        if fds[0][0] != fds[1][0] or (fds[0][0] == "err" and fds[0] != fds[1]):
            for kind, fd in fds:
                if kind == "ok":
                    os.close(fd)
            self.fail(f"open: reference {fds[0]!r} but mount {fds[1]!r}")
        if fds[0][0] == "ok":
            self.handles.append((fds[0][1], fds[1][1], rel))
            self.check_handle(len(self.handles) - 1)
        else:
            self.errors[f"open:{fds[0][1]}"] += 1
        self.check_paths(rel)

    def op_close(self) -> None:
        if not self.handles:
            return self.op_open()
        h = self.rng.randrange(len(self.handles))
        ref_fd, mnt_fd, rel = self.handles.pop(h)
        self.ops["close"] += 1
        self.note(f"close(handle {h} {rel!r})")
        os.close(ref_fd)
        os.close(mnt_fd)
        self.check_paths(rel)

    def op_handle(self) -> None:
        if not self.handles:
            return self.op_open()
        h = self.rng.randrange(len(self.handles))
        r = self.rng.random()
        if r < 0.45:
            n = self.length()
            off = self.rng.randrange(0, MAX_SIZE - n + 1)
            self.both_fd("pwrite", os.pwrite, h, self.data(n), off)
        elif r < 0.75:
            n = self.length()
            self.both_fd("pread", os.pread, h, n, self.rng.randrange(0, MAX_SIZE + 4096))
        elif r < 0.9:
            self.both_fd("ftruncate", os.ftruncate, h, self.rng.randrange(0, MAX_SIZE + 1))
        else:
            self.both_fd("fsync", os.fsync, h)
        self.check_handle(h)

    def _two_paths(self, name: str, call, src: bytes, dst: bytes) -> None:
        """``call(src, dst)`` on both trees, then compare what it touched."""
        self.both(
            name, lambda root, s, d: call(os.path.join(root, s), os.path.join(root, d)), src, dst
        )
        self.check_paths(src, dst)

    def op_rename(self) -> None:
        src = self.pick(existing=0.9, descend=self.rng.choice([0.3, 0.7]))
        dst = self.pick(existing=0.5, descend=self.rng.choice([0.3, 0.7]))
        self._two_paths("rename", os.rename, src, dst)

    def op_link(self) -> None:
        self._two_paths("link", os.link, self.pick(existing=0.9), self.pick(existing=0.3))

    def op_symlink(self) -> None:
        rel = self.pick(existing=0.3)
        # Targets stay inside each tree (both run one level below their root, so "../b"
        # never escapes); the absolute one has a parent nothing can create.
        target = self.rng.choice([b"a", b"../b", b"c/d", b"f\xff", NOWHERE])
        self.both("symlink", lambda root, t, r: os.symlink(t, os.path.join(root, r)), target, rel)
        self.check_paths(rel)

    def op_unlink(self) -> None:
        rel = self.pick(existing=0.9)
        self.both("unlink", lambda root, r: os.unlink(os.path.join(root, r)), rel)
        self.check_paths(rel)

    def op_mkdir(self) -> None:
        rel = self.pick(existing=0.3, descend=0.4)
        self.both("mkdir", lambda root, r: os.mkdir(os.path.join(root, r), 0o755), rel)
        self.check_paths(rel)

    def op_rmdir(self) -> None:
        rel = self.pick(existing=0.9, descend=0.4)
        self.both("rmdir", lambda root, r: os.rmdir(os.path.join(root, r)), rel)
        self.check_paths(rel)

    def op_xattr(self) -> None:
        rel = self.pick(existing=0.9)
        name = self.rng.choice(XATTR_NAMES)
        r = self.rng.random()
        if r < 0.5:
            value = self.rng.randbytes(self.rng.randrange(0, 200))
            flags = self.rng.choice([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE])
            self.both(
                "setxattr",
                lambda root, r, n, v, f: os.setxattr(os.path.join(root, r), n, v, f),
                rel,
                name,
                value,
                flags,
            )
        elif r < 0.75:
            self.both(
                "removexattr",
                lambda root, r, n: os.removexattr(os.path.join(root, r), n),
                rel,
                name,
            )
        else:
            self.both(
                "getxattr", lambda root, r, n: os.getxattr(os.path.join(root, r), n), rel, name
            )
        self.check_paths(rel)

    def op_chmod(self) -> None:
        rel = self.pick(existing=0.9)
        mode = self.rng.choice(MODES)
        self.both("chmod", lambda root, r, m: os.chmod(os.path.join(root, r), m), rel, mode)
        self.check_paths(rel)

    def op_stat(self) -> None:
        rel = self.pick(existing=0.8)
        self.ops["stat"] += 1
        self.note(f"stat({rel!r})")
        self.check_paths(rel)


WEIGHTS = {
    "write": 16,
    "rewrite": 4,
    "append": 4,
    "read": 10,
    "truncate": 6,
    "open": 4,
    "close": 3,
    "handle": 12,
    "rename": 8,
    "link": 5,
    "symlink": 2,
    "unlink": 7,
    "mkdir": 4,
    "rmdir": 4,
    "xattr": 8,
    "chmod": 4,
    "stat": 3,
}


@pytest.mark.parametrize(
    "write_buffer, steps",
    [(None, STEPS), ("256K", STEPS // 4)],
    ids=["default-buffer", "small-buffer"],
)
def test_random_operations_match_local_disk(tmp_path, write_buffer: str | None, steps: int):
    """The small write buffer makes writes wait for room and flush under pressure."""
    args = ("--write-buffer", write_buffer) if write_buffer else ()
    with casfs_mount(tmp_path, *args) as mounted:
        _random_walk(mounted, tmp_path, steps)


def _random_walk(mounted: CasfsMount, tmp_path: Path, steps: int) -> None:
    ref, top = tmp_path / "ref" / "t", mounted.mnt / "t"
    ref.mkdir(parents=True)
    top.mkdir()
    rng = random.Random(SEED)
    twin = Twin(ref, top, rng)
    names = list(WEIGHTS)
    weights = [WEIGHTS[n] for n in names]
    try:
        for twin.step in range(1, steps + 1):
            getattr(twin, "op_" + rng.choices(names, weights)[0])()
            if twin.step % COMPARE_EVERY == 0:
                twin.check_all()
        twin.check_all()
    finally:
        twin.close_all()
    assert_same_tree(ref, top)
    assert not os.path.lexists(os.path.dirname(NOWHERE))
    total = sum(twin.ops.values())
    print(f"\nrandom operations: {total} ops in {steps} steps (seed {SEED})")
    print("  by kind:", dict(sorted(twin.ops.items())))
    print("  matching errors:", dict(twin.errors.most_common(12)))
    assert total >= steps

    mounted.remount()
    assert_same_tree(ref.parent, mounted.mnt)
