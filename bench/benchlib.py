"""What every benchmark shares: one JSON line per figure, in one shape.

Each line is ``{"bench": AREA, "figure": NAME, "value": V, "unit": U, ...extra}``, printed
and flushed at once, so ``bench/run`` can stream, save and tabulate every benchmark's output
the same way (``bench/report.py`` reads these lines back).
"""

from __future__ import annotations

import json


def sig(x: float, digits: int = 4) -> float:
    """``x`` rounded to ``digits`` significant digits (figures are noisy past that)."""
    return float(f"{x:.{digits}g}")


def emit(bench: str, figure: str, value: float | int | None, unit: str, **extra: object) -> dict:
    """Print one figure as a JSON line; the line's dict is returned for callers that keep it."""
    if isinstance(value, float):
        value = sig(value)
    line: dict[str, object] = {"bench": bench, "figure": figure, "value": value, "unit": unit}
    line.update(extra)
    print(json.dumps(line), flush=True)
    return line
