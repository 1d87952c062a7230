"""The Python API (casfs.api): the artifact-cache use from a script."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from casfs.api import Casfs
from casfs.errors import CasfsError, StoreInUse
from casfs.tree.fsck import fsck
from casfs.workflows.retention import Policy


def make_artifacts(root, version: int) -> None:
    os.makedirs(root / "lib", exist_ok=True)
    (root / "lib" / "libfoo.so").write_bytes(b"\x7fELF" + bytes([version]) * 300_000)
    if not (root / "README").exists():
        (root / "README").write_text("the same in every build\n")


def test_put_tree_read_digest_export_prune(tmp_path):
    src = tmp_path / "out"
    with Casfs.create(str(tmp_path / "cache")) as cas:
        for v in (1, 2):
            make_artifacts(src, v)
            result = cas.put_tree(str(src), f"build-{v}")
            assert result.files == 2 and not result.warnings
        assert [s["name"] for s in cas.snapshots()] == ["build-1", "build-2"]
        assert cas.listdir("build-1") == ["README", "lib"]
        assert (
            cas.read_bytes("build-2", "lib/libfoo.so") == (src / "lib" / "libfoo.so").read_bytes()
        )
        assert cas.stat("build-2", "README")["size"] == 24
        # equal bytes, equal digest; other bytes, other digest
        assert cas.digest("build-1", "README") == cas.digest("build-2", "README")
        assert cas.digest("build-1", "lib/libfoo.so") != cas.digest("build-2", "lib/libfoo.so")
        diff = cas.diff("build-1", "build-2")
        assert [(c["kind"], c["path"]) for c in diff] == [("modified", "/lib/libfoo.so")]
        out = cas.export("build-1", str(tmp_path / "restored"))
        assert out.files == 2
        assert (tmp_path / "restored" / "README").read_text() == "the same in every build\n"
        decisions = cas.prune(Policy(last=1))
        assert [(d.name, d.keep) for d in decisions] == [(b"build-2", True), (b"build-1", False)]
        assert [s["name"] for s in cas.snapshots()] == ["build-2"]
        assert fsck(cas.store, verify_data=True).clean


def test_live_tree_restore_and_errors(tmp_path):
    src = tmp_path / "out"
    make_artifacts(src, 7)
    with Casfs.create(str(tmp_path / "cache")) as cas:
        cas.put_tree(str(src), "b7")
        cas.restore("b7", "lib", "lib")  # into the live tree, sharing the data
        assert cas.listdir("@live") == ["lib"]
        assert cas.read_bytes("@live", "lib/libfoo.so") == cas.read_bytes("b7", "lib/libfoo.so")
        assert cas.digest("@live", "lib/libfoo.so") == cas.digest("b7", "lib/libfoo.so")
        cas.snapshot("live-1")
        assert cas.diff("live-1", "@live") == []
        with pytest.raises(CasfsError, match="no snapshot named 'nope'"):
            cas.read_bytes("nope", "README")
        with pytest.raises(CasfsError, match="No such file"):
            cas.read_bytes("b7", "missing")
        with pytest.raises(CasfsError, match="Is a directory"):
            cas.read_bytes("b7", "lib")
        with pytest.raises(StoreInUse):
            Casfs(cas.path)  # one writer
        # a reader beside the writer (another process: LMDB opens an environment once per
        # process) is fine
        code = "import sys; from casfs.api import Casfs; c = Casfs(sys.argv[1], writer=False); "
        code += "sys.stdout.buffer.write(c.read_bytes('b7', 'README'))"
        r = subprocess.run([sys.executable, "-c", code, cas.path], capture_output=True)
        assert (r.returncode, r.stdout) == (0, b"the same in every build\n"), r.stderr
