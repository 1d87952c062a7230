"""Shared fixtures: a fresh store and the filesystem model over it, a clean-fsck check, and
real FUSE mounts made with the ``casfs`` command.

Real-mount tests use :func:`casfs_mount` (a context manager) or the ``mounted`` fixture built
on it. Whatever happens in the test, the mount is taken down afterwards: ``casfs umount``
first, then ``fusermount3 -u -z`` and SIGKILL of the daemon as a last resort; then
``casfs fsck`` must be clean unless the test set ``check_fsck = False``. A session fixture
fails the run loudly if any casfs mount made by this session is still in /proc/mounts.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from casfs.fuse.mountpoint import mounts
from casfs.store.store import Store
from casfs.tree.fs import Filesystem
from casfs.tree.fsck import fsck

FSTYPE = "fuse.casfs"
CLI_TIMEOUT = 120.0
# Every mountpoint a real-mount helper used in this session (checked at the end).
_MOUNTPOINTS: set[str] = set()


def assert_fsck_clean(store: Store) -> None:
    """fsck must find nothing; on failure the message lists every problem."""
    report = fsck(store)
    problems = "\n".join(f"  {p.kind}: {p.message}" for p in report.problems)
    assert report.clean, f"fsck found {len(report.problems)} problem(s):\n{problems}"


@pytest.fixture
def store(tmp_path):
    s = Filesystem.create_store(str(tmp_path / "store"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def fs(store):
    f = Filesystem(store)
    try:
        yield f
    finally:
        f.close()


# -- real mounts ------------------------------------------------------------------------------


def mapped_kib(path: str) -> int:
    """KiB of ``path``'s mapping(s) resident in this process (from /proc/self/smaps)."""
    real = os.path.realpath(path)
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                inside = line.rstrip("\n").endswith(" " + real)
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return total


def flip_byte(data_mdb: Path, chunk: bytes) -> None:
    """Flip one bit in the middle of ``chunk``'s one stored copy (the chunk must be stored
    raw, as incompressible data is, to be found in the file)."""
    raw = bytearray(data_mdb.read_bytes())
    probe = chunk[len(chunk) // 2 : len(chunk) // 2 + 64]
    at = raw.find(probe)
    assert at > 0 and raw.find(probe, at + 1) == -1, "the chunk must be stored once, raw"
    raw[at] ^= 0x40
    data_mdb.write_bytes(raw)


def truncate_data(size: int | None):
    """A damage for a store directory: data.mdb cut to ``size`` bytes (None: to half)."""

    def damage(store: Path) -> None:
        data = store / "data.mdb"
        os.truncate(data, data.stat().st_size // 2 if size is None else size)

    return damage


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (such as "32m") mounted at ``path``, for full-disk tests; the
    test is skipped where it cannot be mounted (not root). Always unmounted."""
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def casfs_cli(
    *args: str | os.PathLike, timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess:
    """Run ``casfs ARGS`` as a user would; never raises on a non-zero exit."""
    return subprocess.run(
        [sys.executable, "-m", "casfs_cli.main", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def fuse_mounts() -> list[tuple[str, str, str]]:
    """(source, target, fstype) of every FUSE mount in /proc/mounts."""
    return [(m.source, m.target, m.fstype) for m in mounts() if m.fstype.startswith("fuse")]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]
AT_FDCWD = -100


def renameat2(old: os.PathLike | str | bytes, new: os.PathLike | str | bytes, flags: int) -> None:
    """rename(2) with flags (RENAME_NOREPLACE, RENAME_EXCHANGE), which os.rename lacks."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), os.fsdecode(old))


def is_mounted(target: str | os.PathLike) -> bool:
    return any(t == str(target) for _, t, _ in fuse_mounts())


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone: it holds no files any more)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def wait_gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)  # reap it if it happens to be ours
            return True
        time.sleep(0.02)
    return False


def force_unmount(target: str) -> None:
    """Last resort: detach the mount even if busy or stale."""
    subprocess.run(["fusermount3", "-u", "-z", target], capture_output=True, timeout=60)
    if is_mounted(target):
        subprocess.run(["umount", "-l", target], capture_output=True, timeout=60)


def tree_digest(root: str | os.PathLike) -> dict[str, tuple]:
    """Everything a tree comparison should agree on, by relative path (bytes): type, mode,
    size, content hash, symlink target, user xattrs, link count and hard-link group (the
    first path, in walk order, of the same inode). Times are left out."""
    root_b = os.fsencode(root)
    out: dict[str, tuple] = {}
    first_path: dict[int, bytes] = {}
    for dirpath, dirnames, filenames in os.walk(root_b):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root_b)
            st = os.lstat(path)
            group = first_path.setdefault(st.st_ino, rel)
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 20), b""):
                        h.update(block)
                content: object = (st.st_size, h.hexdigest())
            elif stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            else:
                content = None
            xattrs = {}
            if not stat.S_ISLNK(st.st_mode):
                for x in sorted(os.listxattr(path)):
                    if x.startswith("user."):
                        xattrs[x] = os.getxattr(path, x)
            nlink = st.st_nlink if not stat.S_ISDIR(st.st_mode) else None
            out[rel] = (st.st_mode, content, tuple(xattrs.items()), nlink, group)
    return out


def assert_same_tree(expected: str | os.PathLike, actual: str | os.PathLike) -> None:
    a, b = tree_digest(expected), tree_digest(actual)
    if a == b:
        return
    lines = []
    for rel in sorted(a.keys() | b.keys()):
        if a.get(rel) != b.get(rel):
            lines.append(f"  {rel!r}: expected {a.get(rel)!r}, got {b.get(rel)!r}")
    raise AssertionError(f"trees differ in {len(lines)} path(s):\n" + "\n".join(lines[:40]))


@dataclass
class CasfsMount:
    """A store and its mountpoint; ``mount``/``umount``/``remount``/``crash`` drive the
    daemon through the CLI. ``pid`` is the daemon's, read from the store's lock file."""

    store: Path
    mnt: Path
    mount_args: tuple[str, ...] = ()
    pid: int | None = None
    check_fsck: bool = True  # set False in a test that leaves the store unclean on purpose
    check_log: bool = True  # set False in a test that makes the daemon log errors on purpose
    test_failed: bool = False  # set by the fixtures: skip the checks after a failed test
    history: list[str] = field(default_factory=list)

    @property
    def log(self) -> Path:
        return self.store / "mount.log"

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def mount(self) -> None:
        _MOUNTPOINTS.add(str(self.mnt))
        r = casfs_cli("mount", self.store, self.mnt, *self.mount_args)
        assert r.returncode == 0, f"casfs mount failed: {r.stderr.strip()}\n{self.log_text()}"
        self.pid = int((self.store / "casfs.lock").read_text().strip())
        assert pid_alive(self.pid)
        assert is_mounted(self.mnt), f"{self.mnt} not in /proc/mounts after casfs mount"
        self.history.append(f"mounted (daemon {self.pid})")

    def umount(self) -> None:
        """Clean unmount; asserts it worked and the daemon exited."""
        r = casfs_cli("umount", self.mnt)
        assert r.returncode == 0, f"casfs umount failed: {r.stderr.strip()}\n{self.log_text()}"
        assert not is_mounted(self.mnt), f"{self.mnt} still mounted after casfs umount"
        if self.pid is not None:
            assert not pid_alive(self.pid), f"daemon {self.pid} still running after umount"
        self.history.append("unmounted")
        self.pid = None

    def remount(self) -> None:
        self.umount()
        self.mount()

    def kill_daemon(self) -> None:
        """SIGKILL the daemon (a crash); the mount is left stale."""
        assert self.pid is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        assert wait_gone(self.pid), f"daemon {self.pid} survived SIGKILL"
        self.history.append(f"killed daemon {self.pid}")
        self.pid = None

    def clear_stale(self) -> str:
        """Take down a mount whose daemon is dead: ``casfs umount`` must manage a stale
        mount; when files are still open there it is busy, so fall back to a lazy unmount.
        Returns how it was done."""
        if not is_mounted(self.mnt):
            return "not mounted"
        r = casfs_cli("umount", self.mnt)
        how = "casfs umount"
        if r.returncode != 0 or is_mounted(self.mnt):
            force_unmount(str(self.mnt))
            how = f"fusermount3 -u -z ({r.stderr.strip()})"
        assert not is_mounted(self.mnt)
        self.history.append(f"stale mount cleared by {how}")
        return how

    def crash(self) -> None:
        self.kill_daemon()
        self.clear_stale()

    def fsck(self, *args: str) -> subprocess.CompletedProcess:
        return casfs_cli("fsck", self.store, *args)

    def assert_fsck_clean(self) -> None:
        r = self.fsck()
        assert r.returncode == 0, f"casfs fsck found problems:\n{r.stdout}{r.stderr}"

    def stats(self) -> dict:
        r = casfs_cli("stats", "--json", self.store)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def teardown(self) -> list[str]:
        """Unmount whatever the state; never raises. Returns what had to be forced."""
        forced = []
        target = str(self.mnt)
        if is_mounted(target):
            try:
                r = casfs_cli("umount", target, timeout=60)
                ok = r.returncode == 0
                why = r.stderr.strip()
            except subprocess.TimeoutExpired:
                ok, why = False, "casfs umount timed out"
            if not ok or is_mounted(target):
                forced.append(f"casfs umount failed ({why}): fusermount3 -u -z")
                force_unmount(target)
        pids = {self.pid} if self.pid else set()
        with contextlib.suppress(OSError, ValueError):
            pids.add(int((self.store / "casfs.lock").read_text().strip()))
        for pid in pids:
            if pid != os.getpid() and pid_alive(pid) and _is_daemon_of(pid, self.store):
                forced.append(f"daemon {pid} still running: SIGKILL")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_gone(pid)
        self.pid = None
        return forced


def _is_daemon_of(pid: int, store: Path) -> bool:
    """Whether ``pid`` is a casfs daemon (guards against a recycled PID in a stale lock)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return b"casfs_cli.main" in argv and os.fsencode(str(store)) in argv


@contextlib.contextmanager
def casfs_mount(
    base: Path, *mount_args: str, name: str = "", init_args: tuple[str, ...] = ()
) -> Iterator[CasfsMount]:
    """Init a store in ``base/store{name}``, mount it at the empty ``base/mnt{name}`` and
    yield it; always unmount afterwards. Then, unless the body failed (it raised, or set
    ``test_failed``): the unmount must not have needed force (a file left open), the
    daemon's log must hold no error or traceback (``check_log = False`` to allow), and
    fsck must be clean (``check_fsck = False`` to skip)."""
    store, mnt = base / f"store{name}", base / f"mnt{name}"
    mnt.mkdir()
    r = casfs_cli("init", store, *init_args)
    assert r.returncode == 0, r.stderr
    m = CasfsMount(store, mnt, tuple(mount_args))
    raised = True
    try:
        m.mount()
        yield m
        raised = False
    finally:
        forced = m.teardown()
        assert not is_mounted(mnt), f"{mnt} is still mounted after teardown"
    if raised or m.test_failed:
        if forced:
            print(f"teardown of {mnt} had to force: {'; '.join(forced)}", file=sys.stderr)
        return
    assert not forced, f"teardown of {mnt} had to force: {'; '.join(forced)}"
    if m.check_log:
        bad = [
            line
            for line in m.log_text().splitlines()
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")
        ]
        assert not bad, "the daemon logged errors:\n" + "\n".join(bad[:20])
    if m.check_fsck:
        m.assert_fsck_clean()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so fixtures can tell a failed test."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


def _test_failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "rep_call", None)
    return report is None or report.failed


@pytest.fixture
def mounted(request, tmp_path) -> Iterator[CasfsMount]:
    """A fresh store mounted at an empty directory (``.store``, ``.mnt``, ``.pid``)."""
    with casfs_mount(tmp_path) as m:
        yield m
        m.test_failed = _test_failed(request)


@pytest.fixture
def mounted_shared(request, tmp_path) -> Iterator[CasfsMount]:
    """Like ``mounted``, with ``--allow-other`` so other users reach the mount (and the
    kernel's default_permissions checks are what stops them)."""
    with casfs_mount(tmp_path, "--allow-other") as m:
        yield m
        m.test_failed = _test_failed(request)


@pytest.fixture(scope="session", autouse=True)
def no_mount_left_behind(tmp_path_factory):
    """At the end of the session no casfs mount made by it may remain: clean up and fail."""
    base = str(tmp_path_factory.getbasetemp())
    yield
    left = [
        (src, target)
        for src, target, fstype in fuse_mounts()
        if fstype == FSTYPE and (target in _MOUNTPOINTS or target.startswith(base + os.sep))
    ]
    if not left:
        return
    for src, target in left:
        with contextlib.suppress(OSError, ValueError):
            pid = int(Path(src, "casfs.lock").read_text().strip())
            if _is_daemon_of(pid, Path(src)):
                os.kill(pid, signal.SIGKILL)
        force_unmount(target)
    still = [t for _, t in left if is_mounted(t)]
    pytest.fail(
        f"casfs mount(s) left behind by the tests: {[t for _, t in left]}"
        + (f"; could not remove {still}" if still else " (removed now)"),
        pytrace=False,
    )


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_file(path: os.PathLike | str | bytes, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def read_file(path: os.PathLike | str | bytes) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def pread_all(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes at ``offset`` (fewer only at the end of the file)."""
    out = bytearray()
    while len(out) < length:
        chunk = os.pread(fd, length - len(out), offset + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def poll(predicate, timeout: float = 8.0, interval: float = 0.1) -> bool:
    """Whether ``predicate()`` became true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def errno_of(fn, *args, **kwargs) -> int:
    """The errno an OS call fails with (0 when it succeeds)."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        return exc.errno or -1
    return 0
