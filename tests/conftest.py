"""Shared fixtures: a fresh store and the filesystem model over it, and a clean-fsck check."""

from __future__ import annotations

import pytest

from casfs.store.store import Store
from casfs.tree.fs import Filesystem
from casfs.tree.fsck import fsck


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
