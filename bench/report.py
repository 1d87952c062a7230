"""Write the benchmarks page and its plots from one ``bench/run`` results file.

    .venv/bin/python bench/report.py bench/results/run-DATE-full.jsonl --out docs

Reads the JSON lines (``bench/benchlib.py``'s shape), writes ``OUT/benchmarks.md`` (a table
per area with ratios to the references, a goal summary) and ``OUT/img/bench-*.png``
(matplotlib). The explanations between the tables come from ``bench/report_notes.md``, one
``## area`` section each, so they are edited there and survive the next run. A figure a run
did not produce shows as "n/a" rather than being left out, so a missing reference is seen.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOTES = HERE / "report_notes.md"
TOOLS = ("casfs", "borg", "restic")
COLOURS = {
    "casfs": "#1f77b4",
    "borg": "#ff7f0e",
    "restic": "#2ca02c",
    "nullfs": "#7f7f7f",
    "memfs": "#bcbd22",
    "pipeline": "#9467bd",
    "disk": "#8c564b",
}


class Results:
    """The lines of one run, looked up by bench, figure and any other fields."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lines: list[dict] = []
        for text in path.read_text().splitlines():
            try:
                record = json.loads(text)
            except ValueError:
                continue
            if isinstance(record, dict):
                self.lines.append(record)

    def all(self, bench: str, figure: str | None = None, **match: object) -> list[dict]:
        return [
            r
            for r in self.lines
            if r.get("bench") == bench
            and (figure is None or r.get("figure") == figure)
            and all(r.get(k) == v for k, v in match.items())
        ]

    def one(self, bench: str, figure: str, **match: object) -> dict | None:
        found = self.all(bench, figure, **match)
        return found[0] if found else None

    def value(self, bench: str, figure: str, **match: object) -> float | None:
        r = self.one(bench, figure, **match)
        return None if r is None else r.get("value")


# -- formatting -------------------------------------------------------------------------------


def num(v: float | int | None, digits: int = 3) -> str:
    """A figure for a table: thousands separators, about ``digits`` significant digits."""
    if v is None:
        return "n/a"
    if isinstance(v, int) or abs(v) >= 10 ** (digits - 1):
        return f"{round(v):,}"
    return f"{float(f'{v:.{digits}g}'):,}".rstrip("0").rstrip(".") if v else "0"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "n/a"
    return f"{a / b:,.0f}x" if a / b >= 100 else f"{a / b:.2f}x"


def mb(nbytes: float | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 1e6:,.1f} MB"


def table(header: Iterable[str], rows: Iterable[Iterable[str]], align: str = "") -> str:
    header = list(header)
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "--:" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def verdict(met: bool | None) -> str:
    return "n/a" if met is None else ("met" if met else "**not met**")


def notes() -> dict[str, str]:
    """``bench/report_notes.md``'s sections by title (lower case)."""
    out: dict[str, str] = {}
    if not NOTES.exists():
        return out
    for block in re.split(r"^## ", NOTES.read_text(), flags=re.M)[1:]:
        title, _, body = block.partition("\n")
        out[title.strip().lower()] = body.strip()
    return out


# -- plots ------------------------------------------------------------------------------------


class Plots:
    def __init__(self, out: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        self.plt = plt
        self.dir = out / "img"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.made: list[str] = []

    def save(self, fig, name: str) -> str:
        fig.tight_layout()
        path = self.dir / f"bench-{name}.png"
        fig.savefig(path, dpi=110, metadata={"Software": None})
        self.plt.close(fig)
        self.made.append(path.name)
        return f"![{name}](img/{path.name})"


# -- sections ---------------------------------------------------------------------------------


def header(r: Results, kind: str) -> str:
    m = r.one("run", "machine") or {}
    total = r.value("run", "total_seconds")
    benches = r.all("run", "bench_seconds")
    took = ", ".join(
        f"{b['name']} {b['value']:.0f} s" + ("" if b.get("exit") == 0 else " (failed)")
        for b in benches
    )
    mem = m.get("mem_bytes") or 0
    return (
        f"Measured {m.get('date', '?')} by `bench/run{' --quick' if kind == 'quick' else ''}` "
        f"at commit `{m.get('commit')}` on this project's machine kind: {m.get('cores')} cores "
        f"({m.get('cpu')}), {mem / 2**30:.0f} GiB RAM, Linux {m.get('kernel')}, Python "
        f"{m.get('python')}; references {m.get('borg') or 'borg missing'}, "
        f"{m.get('restic') or 'restic missing'}. The whole run took "
        f"{(total or 0) / 60:.1f} minutes ({took}).\n\n"
        "The machine is a shared 2-core VM: absolute figures move by up to 2x between runs, "
        "so every figure is measured beside its reference in the same run and the ratios are "
        "what to trust. Raw lines: "
        f"[`bench/results/{r.path.name}`](../bench/results/{r.path.name})."
    )


def goals(r: Results) -> str:
    rows = []
    for rec in r.lines:
        if "met" not in rec or rec.get("figure") in ("goal", "goals_met"):
            continue
        where = ", ".join(
            f"{k} {rec[k]}" for k in ("tool", "dataset", "files") if rec.get(k) is not None
        )
        target = rec.get("target", rec.get("goal"))
        shown = rec.get("ratio")
        measured = f"{shown:.2f}x" if shown is not None else f"{num(rec['value'])} {rec['unit']}"
        against = rec.get("vs", "")
        rows.append(
            [
                f"{rec['bench']}: {rec['figure']}" + (f" ({where})" if where else ""),
                measured,
                str(against),
                str(target),
                verdict(rec["met"]),
            ]
        )
    met = sum(1 for row in rows if row[-1] == "met")
    head = f"{met} of {len(rows)} goals met in this run.\n\n"
    return head + table(["goal", "measured", "against", "target", "verdict"], rows, "lrllr")


def throughput(r: Results, plots: Plots | None) -> str:
    def v(figure: str) -> float | None:
        return r.value("mount", figure)

    def row(label: str, key: str, pipeline: str | None, goal_name: str) -> list[str]:
        casfs = v(f"{key}_casfs")
        g = r.one("mount", f"goal_{goal_name}") or {}
        return [
            label,
            num(casfs),
            num(v(f"{key}_nullfs")),
            num(v(f"{key}_memfs")),
            num(v(pipeline)) if pipeline else "",
            num(v(f"{key}_disk")),
            f"{g.get('ratio', 0):.2f}x {g.get('vs', '')}" if g else "n/a",
            f"≥ {g.get('target')}: {verdict(g.get('met'))}" if g else "n/a",
        ]

    rows = [
        row("sequential write, `dd bs=1M conv=fsync`", "seq_write", "pipeline_ingest", "seq_write"),
        row("cold sequential read, `dd bs=1M`", "cold_read", "pipeline_readback", "cold_read"),
        row("4 KiB writes, `dd bs=4k conv=fsync`", "write_4k", None, "write_4k"),
    ]
    mount = table(
        ["MB/s", "casfs", "nullfs", "memfs", "store pipeline", "local disk", "ratio", "goal"], rows
    )
    stages = ["fastcdc", "blake3", "zstd", "lmdb", "unzstd"]
    stage_rows = [[f"{s} alone", num(r.value("ingest", f"{s}_alone")), "", ""] for s in stages]
    for figure, label in (
        ("ingest", "**ingest** (`Filesystem.write`, 2 cores)"),
        ("readback", "read-back, pages mapped"),
        ("readback_first_touch", "read-back, first touch"),
    ):
        rec = r.one("ingest", figure) or {}
        stage_rows.append(
            [
                label,
                num(rec.get("value")),
                str(rec.get("vs", "")),
                f"{rec['ratio']:.2f}x" if "ratio" in rec else "n/a",
            ]
        )
    pipeline = table(["in-process, MB/s", "value", "reference", "ratio"], stage_rows, "lrlr")
    out = "### The store pipeline (`bench/ingest.py`)\n\n" + pipeline
    out += f"\n\nStored bytes: {num(r.value('ingest', 'stored_fraction'))} of the input.\n\n"
    out += "### Through the mount (`bench/mount.py`)\n\n" + mount
    big = next(
        (x for x in r.all("mount") if re.fullmatch(r"seq_write_\d+g_casfs", x["figure"])), None
    )
    if big:
        out += f"\n\nThe large write of the memory test ran at {num(big['value'])} MB/s."
    if plots:
        out += "\n\n" + throughput_plot(r, plots)
    return out


def throughput_plot(r: Results, plots: Plots) -> str:
    plt = plots.plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    groups = (
        ("seq write", "seq_write", "pipeline_ingest"),
        ("cold read", "cold_read", "pipeline_readback"),
    )
    systems = ("casfs", "nullfs", "pipeline", "disk")
    for gi, (_label, key, pipe) in enumerate(groups):
        for si, name in enumerate(systems):
            figure = pipe if name == "pipeline" else f"{key}_{name}"
            value = r.value("mount", figure) or 0
            axes[0].bar(
                gi + si * 0.2, value, 0.2, color=COLOURS[name], label=name if gi == 0 else None
            )
    axes[0].set_xticks([0.3, 1.3], [g[0] for g in groups])
    axes[0].set_ylabel("MB/s")
    axes[0].set_title("1 MiB requests")
    axes[0].legend(fontsize=8)
    names = ("casfs", "nullfs", "memfs", "disk")
    values = [r.value("mount", f"write_4k_{n}") or 0 for n in names]
    axes[1].bar(names, values, color=[COLOURS[n] for n in names])
    axes[1].set_yscale("log")  # the kernel's page cache is 20-50x any FUSE filesystem here
    axes[1].set_ylabel("MB/s (log scale)")
    axes[1].set_title("4 KiB writes")
    return plots.save(fig, "throughput")


def metadata(r: Results) -> str:
    casfs = r.value("mount", "files_10k_casfs")
    memfs = r.value("mount", "files_10k_memfs")
    disk = r.value("mount", "files_10k_disk")
    s3ql = (r.one("mount", "files_10k_casfs", vs="s3ql_anchor") or {}).get("ratio")
    anchor = casfs / s3ql if casfs and s3ql else None
    rows = [
        [
            "create 10,000 files of 4 KiB, files/s",
            num(casfs),
            num(memfs),
            num(disk),
            num(anchor),
            ratio(casfs, memfs),
            ratio(casfs, anchor),
        ]
    ]
    out = table(
        [
            "figure",
            "casfs",
            "memfs",
            "local disk",
            "S3QL (anchor)",
            "vs memfs (goal ≥ 0.5)",
            "vs S3QL (goal ≥ 3)",
        ],
        rows,
    )
    big = max((x["files"] for x in r.all("scaling", "lookup_mount_us")), default=None)
    if big:
        per = [
            (label, r.value("scaling", f, files=big))
            for f, label in (
                ("lookup_mount_us", "one FUSE lookup (stat of a file not seen yet)"),
                ("ls_l_entry_us", "`ls -l` through the mount, per entry"),
                ("lookup_us", "in-process path resolution (3 lookups)"),
                ("readdir_entry_us", "in-process readdir, per entry"),
            )
        ]
        out += f"\n\nPer-operation costs in a {big:,}-file tree (`bench/scaling.py`):\n\n"
        out += table(["operation", "µs"], [[label, num(v)] for label, v in per])
    return out


def snapshot_section(r: Results) -> str:
    sizes = sorted({x["files"] for x in r.all("snapshot", "snapshot_first")})
    rows = []
    for figure, label in (
        ("tree_build", "building the tree (context)"),
        ("snapshot_first", "first snapshot (everything built)"),
        ("snapshot_after_10_changes", "snapshot after 10 changed files"),
        ("diff_10_changes", "diff of two snapshots 10 files apart"),
    ):
        rows.append([label] + [f"{num(r.value('snapshot', figure, files=n))} s" for n in sizes])
    ratio_rec = r.one("snapshot", "snapshot_change_cost_ratio") or {}
    out = table(["seconds"] + [f"{n:,} files" for n in sizes], rows)
    if ratio_rec:
        out += (
            f"\n\nAfter-10-changes cost, large tree over small: **{num(ratio_rec['value'])}** "
            f"(goal ≤ {ratio_rec.get('goal')}: {verdict(ratio_rec.get('met'))})."
        )
    via = r.one("snapshot", "snapshot_first_via_mount")
    stall = r.one("snapshot", "longest_request_wait_during_snapshot")
    if via and stall:
        out += (
            f" Through a mount, the first snapshot of {via['files']:,} files took "
            f"{num(via['value'])} s; meanwhile the longest `statvfs` waited "
            f"{num(stall['value'])} s (goal < 0.1 s: {verdict(stall.get('met'))})."
        )
    return out


SCALING_FIGURES = (
    ("build_s", "build the tree (in-process), s"),
    ("store_bytes", "store size, MB"),
    ("snapshot_first_s", "first snapshot, s"),
    ("snapshot_after_10_s", "snapshot after 10 changes, s"),
    ("diff_10_s", "diff, 10 changes, s"),
    ("lookup_us", "path resolution in-process, µs"),
    ("readdir_entry_us", "readdir in-process, µs per entry"),
    ("mount_s", "`casfs mount`, s"),
    ("lookup_mount_us", "one lookup through the mount, µs"),
    ("ls_l_entry_us", "`ls -l` through the mount, µs per entry"),
    ("umount_s", "`casfs umount`, s"),
)


def scaling(r: Results, plots: Plots | None) -> str:
    sizes = sorted({x["files"] for x in r.all("scaling", "build_s")})
    if not sizes:
        return "No scaling figures in this run."
    rows = []
    for figure, label in SCALING_FIGURES:
        values = [r.value("scaling", figure, files=n) for n in sizes]
        if figure == "store_bytes":
            values = [None if v is None else v / 1e6 for v in values]
        growth = ratio(values[-1], values[0])
        rows.append([label] + [num(v) for v in values] + [growth])
    out = table(
        ["figure"]
        + [f"{n:,} files" for n in sizes]
        + [f"growth ({sizes[-1] // sizes[0]:,}x files)"],
        rows,
    )
    if plots:
        out += "\n\n" + scaling_plot(r, plots, sizes)
    return out


SCALING_PLOTS = (
    ("snapshot and diff", "seconds", True, (
        ("snapshot_first_s", "first snapshot"),
        ("snapshot_after_10_s", "snapshot after 10 changes"),
        ("diff_10_s", "diff of 10 changes"),
        ("build_s", "building the tree"))),
    ("per operation", "µs", False, (
        ("lookup_mount_us", "lookup via mount"),
        ("ls_l_entry_us", "ls -l via mount, per entry"),
        ("lookup_us", "path resolution in-process"),
        ("readdir_entry_us", "readdir in-process, per entry"))),
)  # fmt: skip


def scaling_plot(r: Results, plots: Plots, sizes: list[int]) -> str:
    fig, axes = plots.plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, (title, unit, log_y, lines) in zip(axes, SCALING_PLOTS, strict=True):
        for figure, label in lines:
            ax.plot(sizes, [r.value("scaling", figure, files=n) for n in sizes], marker="o",
                    label=label)  # fmt: skip
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set(xlabel="files in the tree", ylabel=unit, title=title)
        ax.legend(fontsize=8)
    return plots.save(fig, "scaling")


def browse(r: Results) -> str:
    ds = r.one("browse", "dataset")
    rows = []
    for key, label in (
        ("find_cold", "`find -type f \\| wc -l`, just mounted"),
        ("du_cold", "`du -s`, after that find"),
        ("find_warm", "`find` again"),
        ("du_warm", "`du -s` again"),
    ):
        mine = r.value("browse", key, tool="casfs")
        row = [label, f"{num(mine)} s"]
        for other in ("borg", "restic"):
            rec = r.one("browse", key, tool=other) or {}
            row += [
                f"{num(rec.get('value'))} s",
                f"{rec['ratio']:.2f}" if "ratio" in rec else "n/a",
            ]
        rows.append(row)
    out = ""
    if ds:
        out += (
            f"{ds['value']:,} files in the last version, {ds.get('versions')} versions, "
            f"{ds.get('listed_files', 0):,} files listed per walk. Ratios are the other "
            "tool's seconds over casfs's (above 1: casfs is faster; goal ≥ 5).\n\n"
        )
    return out + table(
        ["walk over all versions", "casfs", "borg mount", "ratio", "restic mount", "ratio"], rows
    )


def workflows(r: Results, plots: Plots | None) -> str:
    out = []
    for ds, title in (("django-feature", "Source releases"), ("numpy-wheels", "Artifacts")):
        totals = {t: r.value("workflows", "import_total_s", dataset=ds, tool=t) for t in TOOLS}
        stored = {t: r.value("workflows", "stored_bytes", dataset=ds, tool=t) for t in TOOLS}
        again = {t: r.value("workflows", "reimport_unchanged_s", dataset=ds, tool=t) for t in TOOLS}
        releases = [x["release"] for x in r.all("workflows", "import_s", dataset=ds, tool="casfs")]
        rows = [
            ["imports, total"] + [f"{num(totals[t])} s" for t in TOOLS],
            ["stored on disk"] + [mb(stored[t]) for t in TOOLS],
        ]
        if any(again.values()):
            rows.append(["unchanged re-import of the last"] + [f"{num(again[t])} s" for t in TOOLS])
        text = f"**{title}** ({len(releases)}: {', '.join(releases)}):\n\n"
        text += table(["figure", "casfs", "borg", "restic"], rows)
        g = [x for x in r.all("workflows", dataset=ds) if "met" in x and x["figure"] != "goal"]
        if g:
            judged = [f"{x['figure']} {num(x['value'])}{x['unit']}" for x in g]
            judged = [
                f"{j} (goal {x['goal']}: {verdict(x['met'])})"
                for j, x in zip(judged, g, strict=True)
            ]
            text += "\n\nGoals: " + "; ".join(judged) + "."
        if plots and releases:
            text += "\n\n" + releases_plot(r, plots, ds, releases)
        out.append(text)
    return "\n\n".join(out)


def releases_plot(r: Results, plots: Plots, ds: str, releases: list[str]) -> str:
    plt = plots.plt
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for tool in TOOLS:
        secs = [
            r.value("workflows", "import_s", dataset=ds, tool=tool, release=v) for v in releases
        ]
        size = [
            r.value("workflows", "stored_after_bytes", dataset=ds, tool=tool, release=v)
            for v in releases
        ]
        if any(s is not None for s in secs):
            axes[0].plot(releases, secs, marker="o", label=tool, color=COLOURS[tool])
        if any(s is not None for s in size):
            axes[1].plot(
                releases,
                [None if s is None else s / 1e6 for s in size],
                marker="o",
                label=tool,
                color=COLOURS[tool],
            )
    axes[0].set_ylabel("seconds (wall, per backup)")
    axes[0].set_title("time per release")
    axes[1].set_ylabel("MB on disk")
    axes[1].set_title("repository size after each release")
    for ax in axes:
        ax.set_xlabel("release")
        ax.tick_params(axis="x", labelrotation=45)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8)
    return plots.save(fig, f"import-{ds}")


def memory(r: Results) -> str:
    rec = r.one("mount", "peak_rss_casfs")
    if not rec:
        return "No memory figures in this run."
    g = r.one("mount", "goal_peak_rss") or {}
    limit = g["value"] / g["ratio"] if g.get("ratio") else None
    rows = [
        [
            f"peak VmHWM of the daemon, writing {rec.get('written_mib', 0):,} MiB",
            f"{num(rec['value'])} MiB",
            f"< {num(limit)} MiB: {verdict(g.get('met'))}",
        ],
        [
            "of which anonymous (private) memory, largest seen",
            f"{num(rec.get('max_sampled_anon_mib'))} MiB",
            "",
        ],
        [
            "of which LMDB's mapped file pages, largest seen",
            f"{num(rec.get('max_sampled_file_mib'))} MiB",
            "",
        ],
    ]
    return table(["figure", "casfs", "goal"], rows, "lrl")


SECTIONS = (
    ("Throughput", lambda r, p: throughput(r, p)),
    ("Metadata rate", lambda r, p: metadata(r)),
    ("Snapshot cost against tree size", lambda r, p: snapshot_section(r)),
    ("Scaling sweep", scaling),
    ("Browsing old versions", lambda r, p: browse(r)),
    ("Ingest speed and stored bytes", workflows),
    ("Memory", lambda r, p: memory(r)),
)


def render(r: Results, out: Path, with_plots: bool = True) -> str:
    kind = (r.one("run", "machine") or {}).get("kind", "full")
    plots = Plots(out) if with_plots else None
    text = notes()
    parts = [
        "# Benchmarks",
        "<!-- Written by bench/report.py from bench/results; edit bench/report_notes.md "
        "for the prose, then run bench/run (or bench/report.py RESULTS --out docs). -->",
        header(r, kind),
        text.get("how to run", ""),
        "## Goals\n\n" + goals(r),
    ]
    for title, build in SECTIONS:
        body = build(r, plots)
        note = text.get(title.lower())
        parts.append(f"## {title}\n\n{body}" + (f"\n\n{note}" if note else ""))
    if text.get("not in bench/run"):
        parts.append("## Not in bench/run\n\n" + text["not in bench/run"])
    return "\n\n".join(p for p in parts if p) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a bench/results/run-*.jsonl file")
    ap.add_argument(
        "--out", type=Path, default=HERE.parent / "docs", help="directory (default docs/)"
    )
    ap.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    args = ap.parse_args()
    results = Results(args.results)
    args.out.mkdir(parents=True, exist_ok=True)
    page = render(results, args.out, with_plots=not args.no_plots)
    target = args.out / "benchmarks.md"
    target.write_text(page)
    print(f"wrote {os.path.relpath(target)}")


if __name__ == "__main__":
    main()
