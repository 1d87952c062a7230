"""bench/report.py turns a run's JSON lines into the benchmarks page: ratios computed from the
lines, goals counted, and a missing figure shown as n/a instead of silently left out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import report  # noqa: E402

LINES = [
    {"bench": "run", "figure": "machine", "value": None, "unit": "", "date": "2026-01-02",
     "kind": "full", "cores": 2, "cpu": "Test CPU", "mem_bytes": 2**34, "kernel": "6.1",
     "python": "3.11", "borg": "borg 1.2.4", "restic": None, "commit": "abc1234"},
    {"bench": "mount", "figure": "seq_write_nullfs", "value": 1000.0, "unit": "MB/s"},
    {"bench": "mount", "figure": "seq_write_casfs", "value": 250.0, "unit": "MB/s"},
    {"bench": "mount", "figure": "goal_seq_write", "value": 250.0, "unit": "MB/s",
     "vs": "seq_write_nullfs", "ratio": 0.25, "target": 0.8, "met": False},
    {"bench": "mount", "figure": "files_10k_casfs", "value": 3000.0, "unit": "files/s"},
    {"bench": "mount", "figure": "files_10k_memfs", "value": 4000.0, "unit": "files/s"},
    {"bench": "snapshot", "figure": "diff_10_changes", "value": 0.01, "unit": "s",
     "files": 10000, "goal": 0.1, "met": True},
    {"bench": "scaling", "figure": "build_s", "value": 1.0, "unit": "s", "files": 1000},
    {"bench": "scaling", "figure": "build_s", "value": 12.0, "unit": "s", "files": 10000},
    {"bench": "scaling", "figure": "snapshot_after_10_s", "value": 0.02, "unit": "s",
     "files": 1000},
    {"bench": "scaling", "figure": "snapshot_after_10_s", "value": 0.03, "unit": "s",
     "files": 10000},
    {"bench": "run", "figure": "total_seconds", "value": 600.0, "unit": "s", "kind": "full"},
]  # fmt: skip


@pytest.fixture
def page(tmp_path: Path) -> str:
    results = tmp_path / "run-2026-01-02-full.jsonl"
    results.write_text("".join(json.dumps(x) + "\n" for x in LINES) + "not json\n")
    return report.render(report.Results(results), tmp_path, with_plots=False)


def test_header_names_the_machine_and_run(page: str):
    assert "Measured 2026-01-02" in page and "commit `abc1234`" in page
    assert "2 cores (Test CPU)" in page and "restic missing" in page
    assert "10.0 minutes" in page


def test_goals_are_counted_and_judged(page: str):
    assert "1 of 2 goals met in this run." in page
    assert "| mount: goal_seq_write | 0.25x | seq_write_nullfs | 0.8 | **not met** |" in page


def test_ratios_come_from_the_lines_and_missing_figures_show(page: str):
    row = next(x for x in page.splitlines() if x.startswith("| create 10,000 files"))
    assert "| 3,000 | 4,000 |" in row and "0.75x" in row
    seq = next(x for x in page.splitlines() if x.startswith("| sequential write"))
    assert "| 250 | 1,000 | n/a |" in seq  # memfs was not measured: n/a, not left out


def test_scaling_table_has_a_column_per_size_and_the_growth(page: str):
    row = next(x for x in page.splitlines() if x.startswith("| build the tree"))
    assert row == "| build the tree (in-process), s | 1 | 12 | 12.00x |"
    row = next(x for x in page.splitlines() if x.startswith("| snapshot after 10 changes"))
    assert row.endswith("| 1.50x |")
