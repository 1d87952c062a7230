"""Human-readable figures for the CLI."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def plural(n: int, one: str, many: str | None = None) -> str:
    """``1 file``, ``2 files`` (with thousands separators)."""
    return f"{n:,} {one if n == 1 else (many or one + 's')}"
