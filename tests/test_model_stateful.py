"""Stateful property test: the filesystem model and a real local directory get the same random
operations; after every step their trees, contents, attributes and xattrs must agree, every
failing operation must fail with the same errno on both, and fsck must stay clean.

The harness does the kernel's share for the model: it walks paths with ``lookup`` from the
root (ENOENT, ENOTDIR on the way) and applies the umask. Symlinks always point nowhere, so
following one is ENOENT on both sides.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import stat
import tempfile

from conftest import renameat2
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from casfs.errors import FsError
from casfs.tree.fs import ROOT_INO, Filesystem
from casfs.tree.fsck import fsck
from casfs.tree.records import Inode

KiB = 1 << 10
NAMES = [b"a", b"b", b"c", b"d", b"e", b"f"]
XATTR_NAMES = [b"user.x", b"user.y", b"user.z"]
DANGLING = b"/nonexistent-casfs-target/nowhere"
IS_ROOT = os.geteuid() == 0

Path = tuple[bytes, ...]


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_data(seed: int, length: int, kind: str) -> bytes:
    rng = random.Random(seed)
    if kind == "zeros":
        return bytes(length)
    if kind == "repeat":
        unit = rng.randbytes(rng.randint(1, 64))
        return (unit * (length // len(unit) + 1))[:length]
    data = bytearray(rng.randbytes(length))
    if kind == "mixed" and length:
        start = rng.randrange(length)
        stop = min(length, start + rng.randrange(length + 1))
        data[start:stop] = bytes(stop - start)
    return bytes(data)


def errname(code: int) -> str:
    return errno.errorcode.get(code, str(code)) if code else "success"


def xattrs_supported(directory: str) -> bool:
    probe = os.path.join(directory, ".xattr-probe")
    open(probe, "wb").close()
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        os.unlink(probe)


names = st.sampled_from(NAMES)
random_paths = st.lists(names, min_size=1, max_size=3).map(tuple)
data_specs = st.tuples(
    st.integers(0, 2**32 - 1),
    st.one_of(st.integers(0, 4 * KiB), st.integers(0, 200 * KiB)),
    st.sampled_from(["random", "zeros", "mixed", "repeat"]),
)
offsets = st.one_of(st.integers(0, 70 * KiB), st.integers(0, 1 << 20))
sizes = st.one_of(st.integers(0, 70 * KiB), st.integers(0, 1200 * KiB))
create_modes = st.integers(0, 0o777)
chmod_modes = st.integers(0, 0o7777 if IS_ROOT else 0o777)


class ModelVsDisk(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="casfs-model-")
        self.real = os.path.join(self.tmp, "real").encode()
        os.mkdir(self.real)
        # small chunks: a 200 KiB write spans dozens of extents
        self.store = Filesystem.create_store(os.path.join(self.tmp, "store"), chunk_avg=4096)
        self.fs = Filesystem(self.store, workers=2)
        self.umask = current_umask()
        self.uid, self.gid = os.geteuid(), os.getegid()
        self.xattrs = xattrs_supported(self.real.decode())
        self.known: list[Path] = []
        self.known_dirs: list[Path] = [()]

    def teardown(self) -> None:
        try:
            report = fsck(self.store)
            assert report.clean, [f"{p.kind}: {p.message}" for p in report.problems]
        finally:
            try:
                self.fs.close()
                self.store.close()
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)

    # -- helpers ----------------------------------------------------------------------------

    def paths(self, new: bool = False) -> st.SearchStrategy[Path]:
        """Mostly an existing path (with ``new``: a free-or-taken name in an existing
        directory), sometimes any path of the small name space."""
        in_dir = st.tuples(st.sampled_from(self.known_dirs), names).map(lambda t: t[0] + (t[1],))
        existing = st.sampled_from(self.known) if self.known else in_dir
        likely = in_dir if new else existing
        return st.one_of(likely, likely, likely, in_dir if not new else existing, random_paths)

    def rpath(self, path: Path) -> bytes:
        return os.path.join(self.real, *path)

    def m_walk(self, path: Path, follow: bool = True) -> Inode:
        """What the kernel's path walk would find in the model."""
        inode = self.fs.getattr(ROOT_INO)
        for i, name in enumerate(path):
            if not inode.is_dir:
                raise FsError(errno.ENOTDIR)
            inode = self.fs.lookup(inode.ino, name)
            if inode.is_symlink and (follow or i < len(path) - 1):
                raise FsError(errno.ENOENT, "every symlink dangles")
        return inode

    def m_parent(self, path: Path) -> int:
        parent = self.m_walk(path[:-1])
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR)
        return parent.ino

    def both(self, what: str, real, model):
        """Run an operation on both sides; they must succeed or fail alike."""
        try:
            r, r_err = real(), 0
        except OSError as exc:
            r, r_err = None, exc.errno
        try:
            m, m_err = model(), 0
        except FsError as exc:
            m, m_err = None, exc.errno
        assert r_err == m_err, f"{what}: real {errname(r_err)}, model {errname(m_err)}"
        return r, m

    # -- operations (on both sides) ---------------------------------------------------------

    def do_create(self, p: Path, mode: int) -> None:
        def real():
            os.close(os.open(self.rpath(p), os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode))

        def model():
            self.fs.create(self.m_parent(p), p[-1], mode & ~self.umask, self.uid, self.gid)

        self.both(f"create {p} {mode:o}", real, model)

    def do_mkdir(self, p: Path, mode: int) -> None:
        def model():
            self.fs.mkdir(self.m_parent(p), p[-1], mode & ~self.umask, self.uid, self.gid)

        self.both(f"mkdir {p} {mode:o}", lambda: os.mkdir(self.rpath(p), mode), model)

    def do_symlink(self, p: Path) -> None:
        self.both(
            f"symlink {p}",
            lambda: os.symlink(DANGLING, self.rpath(p)),
            lambda: self.fs.symlink(self.m_parent(p), p[-1], DANGLING, self.uid, self.gid),
        )

    def do_write(self, p: Path, offset: int, buf: bytes) -> None:
        def real():
            fd = os.open(self.rpath(p), os.O_WRONLY)
            try:
                return os.pwrite(fd, buf, offset)
            finally:
                os.close(fd)

        r, m = self.both(
            f"write {p} at {offset} ({len(buf)} bytes)",
            real,
            lambda: self.fs.write(self.m_walk(p).ino, offset, buf),
        )
        assert r == m

    # -- rules ------------------------------------------------------------------------------

    @initialize(
        data=st.data(),
        entries=st.lists(
            st.tuples(st.sampled_from(["file", "file", "dir", "dir", "symlink"]), data_specs),
            min_size=4,
            max_size=20,
        ),
    )
    def populate(self, data, entries):
        """Start from a tree of a few files, so that most operations meet something."""
        for kind, spec in entries:
            p = data.draw(self.paths(new=True))
            if kind == "dir":
                self.do_mkdir(p, 0o755)
                self.known_dirs.append(p)
            elif kind == "symlink":
                self.do_symlink(p)
            else:
                self.do_create(p, 0o644)
                self.do_write(p, 0, make_data(*spec))
        self.trees_agree()

    @rule(data=st.data(), mode=create_modes)
    def create(self, data, mode):
        self.do_create(data.draw(self.paths(new=True)), mode)

    @rule(data=st.data(), mode=create_modes)
    def mkdir(self, data, mode):
        self.do_mkdir(data.draw(self.paths(new=True)), mode)

    @rule(data=st.data())
    def symlink(self, data):
        self.do_symlink(data.draw(self.paths(new=True)))

    @rule(data=st.data(), offset=offsets, spec=data_specs)
    def write(self, data, offset, spec):
        self.do_write(data.draw(self.paths()), offset, make_data(*spec))

    @rule(data=st.data(), size=sizes)
    def truncate(self, data, size):
        p = data.draw(self.paths())
        self.both(
            f"truncate {p} to {size}",
            lambda: os.truncate(self.rpath(p), size),
            lambda: self.fs.setattr(self.m_walk(p).ino, size=size),
        )

    @rule(data=st.data(), offset=sizes, length=st.integers(0, 300 * KiB))
    def read(self, data, offset, length):
        p = data.draw(self.paths())

        def real():
            fd = os.open(self.rpath(p), os.O_RDONLY)
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)

        r, m = self.both(
            f"read {p} at {offset} ({length} bytes)",
            real,
            lambda: self.fs.read(self.m_walk(p).ino, offset, length),
        )
        assert r == m, f"read {p} at {offset}: contents differ"

    @rule(data=st.data(), over=st.booleans(), flags=st.sampled_from([0, 0, 0, 1, 2]))
    def rename(self, data, over, flags):
        src = data.draw(self.paths())
        dst = data.draw(self.paths(new=not over))

        def model():
            sp, dp = self.m_parent(src), self.m_parent(dst)
            self.fs.rename(sp, src[-1], dp, dst[-1], flags)

        self.both(
            f"rename {src} -> {dst} flags {flags}",
            lambda: renameat2(self.rpath(src), self.rpath(dst), flags),
            model,
        )

    @rule(data=st.data())
    def link(self, data):
        src, dst = data.draw(self.paths()), data.draw(self.paths(new=True))

        def model():
            ino = self.m_walk(src, follow=False).ino
            self.fs.link(ino, self.m_parent(dst), dst[-1])

        self.both(
            f"link {src} -> {dst}",
            lambda: os.link(self.rpath(src), self.rpath(dst), follow_symlinks=False),
            model,
        )

    @rule(data=st.data())
    def unlink(self, data):
        p = data.draw(self.paths())
        self.both(
            f"unlink {p}",
            lambda: os.unlink(self.rpath(p)),
            lambda: self.fs.unlink(self.m_parent(p), p[-1]),
        )

    @rule(data=st.data())
    def rmdir(self, data):
        p = data.draw(self.paths())
        self.both(
            f"rmdir {p}",
            lambda: os.rmdir(self.rpath(p)),
            lambda: self.fs.rmdir(self.m_parent(p), p[-1]),
        )

    @rule(data=st.data(), mode=chmod_modes)
    def chmod(self, data, mode):
        p = data.draw(self.paths())
        self.both(
            f"chmod {p} {mode:o}",
            lambda: os.chmod(self.rpath(p), mode),
            lambda: self.fs.setattr(self.m_walk(p).ino, mode=mode),
        )

    @precondition(lambda self: self.xattrs)
    @rule(
        data=st.data(),
        name=st.sampled_from(XATTR_NAMES),
        value=st.binary(max_size=64),
        flags=st.sampled_from([0, 0, os.XATTR_CREATE, os.XATTR_REPLACE]),
    )
    def setxattr(self, data, name, value, flags):
        p = data.draw(self.paths())
        self.both(
            f"setxattr {p} {name!r} flags {flags}",
            lambda: os.setxattr(self.rpath(p), name, value, flags),
            lambda: self.fs.setxattr(self.m_walk(p).ino, name, value, flags),
        )

    @precondition(lambda self: self.xattrs)
    @rule(data=st.data(), name=st.sampled_from(XATTR_NAMES))
    def removexattr(self, data, name):
        p = data.draw(self.paths())
        self.both(
            f"removexattr {p} {name!r}",
            lambda: os.removexattr(self.rpath(p), name),
            lambda: self.fs.removexattr(self.m_walk(p).ino, name),
        )

    # -- comparison -------------------------------------------------------------------------

    def real_tree(self) -> dict[Path, tuple]:
        out: dict[Path, tuple] = {}

        def walk(path: Path) -> None:
            for entry in os.scandir(self.rpath(path)):
                p = path + (entry.name,)
                st_ = entry.stat(follow_symlinks=False)
                out[p] = self.describe_real(p, st_)
                if stat.S_ISDIR(st_.st_mode):
                    walk(p)

        walk(())
        return out

    def describe_real(self, p: Path, st_: os.stat_result) -> tuple:
        full = self.rpath(p)
        content = None
        xattrs = {}
        if stat.S_ISREG(st_.st_mode):
            with open(full, "rb") as f:
                content = f.read()
        elif stat.S_ISLNK(st_.st_mode):
            content = os.readlink(full)
        if self.xattrs and not stat.S_ISLNK(st_.st_mode):
            for name in os.listxattr(full):
                if name.startswith("user."):
                    xattrs[name.encode()] = os.getxattr(full, name)
        size = None if stat.S_ISDIR(st_.st_mode) else st_.st_size
        return (st_.st_mode, st_.st_nlink, st_.st_uid, st_.st_gid, size, content, xattrs)

    def model_tree(self) -> tuple[dict[Path, tuple], dict[Path, int]]:
        out: dict[Path, tuple] = {}
        inos: dict[Path, int] = {}

        def walk(path: Path, ino: int) -> None:
            listed = self.fs.readdir(ino)
            assert len({name for _, name, _ in listed}) == len(listed)
            for _, name, attrs in listed:
                p = path + (name,)
                inode = self.fs.lookup(ino, name)  # path -> inode by lookup from the root
                assert inode == attrs, f"readdir and lookup disagree on {p}"
                inos[p] = inode.ino
                out[p] = self.describe_model(inode)
                if inode.is_dir:
                    assert self.fs.lookup(inode.ino, b"..").ino == ino
                    walk(p, inode.ino)

        walk((), ROOT_INO)
        return out, inos

    def describe_model(self, inode: Inode) -> tuple:
        content = None
        if inode.is_reg:
            content = self.fs.read(inode.ino, 0, inode.size + 10)
            assert inode.data_bytes <= inode.size
        elif inode.is_symlink:
            content = self.fs.readlink(inode.ino)
        xattrs = {}
        if self.xattrs and not inode.is_symlink:
            xattrs = {n: self.fs.getxattr(inode.ino, n) for n in self.fs.listxattr(inode.ino)}
        size = None if inode.is_dir else inode.size
        return (inode.mode, inode.nlink, inode.uid, inode.gid, size, content, xattrs)

    @invariant()
    def trees_agree(self):
        real = self.real_tree()
        model, inos = self.model_tree()
        assert sorted(real) == sorted(model), "the trees hold different paths"
        fields = ("mode", "nlink", "uid", "gid", "size", "content", "xattrs")
        for p in real:
            for field, r, m in zip(fields, real[p], model[p], strict=True):
                if field == "mode":
                    assert r == m, f"{p}: mode real {r:o}, model {m:o}"
                elif field == "content" and r != m:
                    raise AssertionError(
                        f"{p}: content differs (real {len(r)} bytes, model {len(m)} bytes)"
                    )
                else:
                    assert r == m, f"{p}: {field} real {r!r}, model {m!r}"
        # hard links: the same groups of paths share an inode on both sides
        real_groups: dict[int, set[Path]] = {}
        for p in real:
            real_groups.setdefault(os.lstat(self.rpath(p)).st_ino, set()).add(p)
        model_groups: dict[int, set[Path]] = {}
        for p, ino in inos.items():
            model_groups.setdefault(ino, set()).add(p)
        assert sorted(map(sorted, real_groups.values())) == sorted(
            map(sorted, model_groups.values())
        )
        self.known = sorted(model)
        self.known_dirs = [()] + sorted(p for p in model if stat.S_ISDIR(model[p][0]))

    @invariant()
    def fsck_clean(self):
        report = fsck(self.store)
        assert report.clean, [f"{p.kind}: {p.message}" for p in report.problems]


# CASFS_STATEFUL_EXAMPLES=1000 runs a longer search.
ModelVsDisk.TestCase.settings = settings(
    max_examples=int(os.environ.get("CASFS_STATEFUL_EXAMPLES", "100")),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestModelVsDisk = ModelVsDisk.TestCase
