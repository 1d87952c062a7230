"""Content-defined chunking with FastCDC 2020 (the compiled `pyfastcdc` extension).

The pure-Python fallback of pyfastcdc cuts at a few MB/s, hundreds of times slower than the
extension; casfs refuses to run on it rather than be silently slow.
"""

from __future__ import annotations

from dataclasses import dataclass

from casfs.errors import CasfsError

try:
    from pyfastcdc.cy import FastCDC as _FastCDC
except ImportError as _exc:  # pragma: no cover - depends on the installed wheel
    _FastCDC = None
    _IMPORT_ERROR = str(_exc)
else:
    _IMPORT_ERROR = ""

DEFAULT_AVG = 64 * 1024


def require_compiled_chunker() -> None:
    if _FastCDC is None:
        raise CasfsError(
            "the compiled pyfastcdc extension is not loaded (pure-Python FastCDC is ~500x "
            f"slower); reinstall pyfastcdc as a binary wheel: {_IMPORT_ERROR}"
        )


@dataclass(frozen=True)
class ChunkParams:
    """FastCDC parameters; fixed per store (recorded in its meta) so that equal data always
    cuts the same way and deduplicates. ``avg`` is FastCDC's avg_size knob; the mean chunk
    it yields is about ``avg + min``."""

    min: int
    avg: int
    max: int

    @classmethod
    def for_average(cls, avg: int) -> ChunkParams:
        return cls(min=avg // 4, avg=avg, max=avg * 4)


class Chunker:
    def __init__(self, params: ChunkParams) -> None:
        require_compiled_chunker()
        self.params = params
        self._cdc = _FastCDC(params.avg, min_size=params.min, max_size=params.max)

    def cut(self, buf: bytes | bytearray | memoryview) -> list[int]:
        """Lengths of the chunks ``buf`` is cut into; the last one ends at ``len(buf)``."""
        if len(buf) <= self.params.min:  # FastCDC never cuts before min: one chunk (or none)
            return [len(buf)] if buf else []
        return [c.length for c in self._cdc.cut_buf(buf)]
