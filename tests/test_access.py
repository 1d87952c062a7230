"""Access (issue 6): what casfs creates is private to its owner, the mount asks the kernel to
check permissions and shows itself to no one else by default, and the control socket answers
only the mount's owner or root."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys

from conftest import CasfsMount, casfs_cli

from casfs.fuse import controlsocket

NOBODY = 65534


def modes(top) -> dict[str, int]:
    out = {}
    for root, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(root, name)
            out[os.path.relpath(path, top)] = os.lstat(path).st_mode
    return out


def test_store_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0o000)
    try:
        store = tmp_path / "store"
        assert casfs_cli("init", store).returncode == 0
        src = tmp_path / "src"
        src.mkdir()
        (src / "f").write_bytes(b"x" * 1000)
        assert casfs_cli("import", store, src, "-s", "one").returncode == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    found = modes(store)
    assert "imports" in found and "data.mdb" in found
    wrong = {}
    for rel, mode in found.items():
        want = 0o700 if stat.S_ISDIR(mode) else 0o600
        if stat.S_IMODE(mode) != want:
            wrong[rel] = oct(stat.S_IMODE(mode))
    assert not wrong


def test_mount_checks_permissions_and_is_not_shared_by_default(mounted: CasfsMount):
    with open("/proc/self/mounts") as f:
        (options,) = [line.split()[3].split(",") for line in f if str(mounted.mnt) in line]
    assert "default_permissions" in options
    assert "allow_other" not in options
    for rel, mode in modes(mounted.store).items():  # mount.log, control.sock too
        want = 0o700 if stat.S_ISDIR(mode) else 0o600
        assert stat.S_IMODE(mode) == want, (rel, oct(mode))


def test_snapshots_are_read_only_for_root_too(mounted: CasfsMount):
    (mounted.mnt / "f").write_text("data")
    assert casfs_cli("snapshot", mounted.mnt, "s").returncode == 0
    target = mounted.mnt / ".snap" / "s" / "f"
    for attempt in (
        lambda: target.write_text("other"),
        lambda: os.chmod(target, 0o777),
        lambda: os.chown(target, NOBODY, NOBODY),
        lambda: os.unlink(target),
    ):
        try:
            attempt()
        except OSError as exc:
            assert exc.errno == 30  # EROFS
        else:
            raise AssertionError("a snapshot file changed")
    assert target.read_text() == "data"


def test_control_socket_answers_only_its_owner_or_root(mounted: CasfsMount):
    """Even with the socket reachable (in the 0700 store it is not), another user gets
    "permission denied" from the mount itself (SO_PEERCRED), and nothing changes."""
    with controlsocket.socket_path(str(mounted.store)) as path:
        real = os.path.realpath(path)
    # a second name for the socket where that user can reach it (/tmp: sticky, world-open)
    reachable = f"/tmp/casfs-access-test-{os.getpid()}.sock"
    os.link(real, reachable)
    os.chmod(real, 0o666)
    code = (
        "import json, os, socket, sys\n"
        f"os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "s.sendall(json.dumps({'op': 'snapshot.create', 'name': 'evil'}).encode() + b'\\n')\n"
        "print(s.makefile().readline())\n"
    )
    try:
        r = subprocess.run(
            [sys.executable, "-c", code, reachable], capture_output=True, text=True, timeout=30
        )
    finally:
        os.chmod(real, 0o600)
        os.unlink(reachable)
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply == {"ok": False, "error": "permission denied", "errno": 13}
    assert not (mounted.mnt / ".snap" / "evil").exists()
    # the owner (root) is answered
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(real)
        s.sendall(json.dumps({"op": "snapshot.list"}).encode() + b"\n")
        assert json.loads(s.makefile().readline()) == {"ok": True, "result": []}
