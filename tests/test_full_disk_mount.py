"""Full disk through the mount (issue 6): a store on a 64 MiB tmpfs filled through the mount.
Writers get ENOSPC (at write, fsync or close: writes are buffered), nothing already stored is
damaged, deleting files or snapshots makes room again, and the mount keeps working."""

from __future__ import annotations

import errno
import os

import pytest
from conftest import casfs_cli, casfs_mount, tmpfs

MiB = 1 << 20


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (needs root; skipped elsewhere)."""
    with tmpfs(tmp_path / "disk", "64m") as disk:
        yield disk


def write_file(path, data: bytes) -> None:
    """Write, fsync and close; an OSError from any of them goes to the caller."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view[: 1 * MiB]) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def test_filling_the_disk_through_the_mount(small_disk):
    with casfs_mount(small_disk) as m:
        m.check_log = False  # the daemon logs the ENOSPC it returned
        kept = {}
        for i in range(4):  # some data, and a snapshot holding it
            kept[f"keep{i}"] = os.urandom(2 * MiB)
            write_file(m.mnt / f"keep{i}", kept[f"keep{i}"])
        assert casfs_cli("snapshot", m.mnt, "before").returncode == 0
        filled = []
        with pytest.raises(OSError) as info:
            for i in range(200):
                write_file(m.mnt / f"fill{i:03d}", os.urandom(2 * MiB))
                filled.append(f"fill{i:03d}")
        assert info.value.errno == errno.ENOSPC
        assert len(filled) >= 5
        # nothing already stored is damaged: live, in the snapshot, the fsync'ed fillers
        for name, data in kept.items():
            assert (m.mnt / name).read_bytes() == data
            assert (m.mnt / ".snap" / "before" / name).read_bytes() == data
        for name in filled[:3]:
            assert len((m.mnt / name).read_bytes()) == 2 * MiB
        # statfs tells the truth: the disk's own free space (a part of it, less than a
        # commit needed, may be left)
        st, disk = os.statvfs(m.mnt), os.statvfs(small_disk)
        assert abs(st.f_bavail * st.f_frsize - disk.f_bavail * disk.f_frsize) <= 1 * MiB
        assert disk.f_bavail * disk.f_frsize < 16 * MiB
        # deleting files and the snapshot makes room again, and the mount keeps working
        for name in filled:
            os.unlink(m.mnt / name)
        os.unlink(m.mnt / "keep0")
        assert casfs_cli("snapshot", "-d", m.mnt, "before").returncode == 0
        # df shows the room at once (pages freed inside the store count as free)
        st = os.statvfs(m.mnt)
        assert st.f_bavail * st.f_frsize > 40 * MiB
        again = os.urandom(4 * MiB)
        write_file(m.mnt / "again", again)
        assert (m.mnt / "again").read_bytes() == again
        assert (m.mnt / "keep1").read_bytes() == kept["keep1"]
        assert casfs_cli("snapshot", m.mnt, "after").returncode == 0
        m.remount()  # and it all survives an unmount
        assert (m.mnt / ".snap" / "after" / "again").read_bytes() == again
    # casfs_mount unmounted it and found fsck clean; every byte verifies too
    r = casfs_cli("fsck", "--verify-data", small_disk / "store")
    assert r.returncode == 0, r.stdout + r.stderr
