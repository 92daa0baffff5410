"""A strict reader of zstd streams: every frame, and a truncated stream raises (as a truncated .gz does).

Shared by the input reader (``input.records``) and the object-store layer (``storage``), so it sits below both.
"""

from __future__ import annotations

import io
from typing import Any, BinaryIO


class _ZstdRaw(io.RawIOBase):
    """Every frame of a zstd stream, and an ``EOFError`` when the stream ends inside a frame.

    Why not ``ZstdDecompressor().stream_reader``: at a truncated end it simply stops, so a cut-off ``.zst``
    read as a shorter, valid-looking file (gzip raises ``EOFError`` there; this does the same).
    """

    def __init__(self, raw: BinaryIO, read_size: int = 1 << 17) -> None:
        import zstandard

        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._in_frame = False  # the current frame has started and not ended
        self._pending = bytearray()
        self._read_size = read_size
        self._done = False

    def readable(self) -> bool:
        return True

    def _feed(self, data: bytes) -> None:
        while data:
            self._pending += self._obj.decompress(data)
            if self._obj.eof:
                data = self._obj.unused_data
                self._obj = self._dctx.decompressobj()
                self._in_frame = False
            else:
                self._in_frame = True
                data = b""

    def readinto(self, b: Any) -> int:
        while not self._pending and not self._done:
            data = self._raw.read(self._read_size)
            if not data:
                self._done = True
                if self._in_frame:
                    raise EOFError("zstd stream ended before the end of its frame (truncated file)")
                break
            self._feed(data)
        n = min(len(b), len(self._pending))
        b[:n] = self._pending[:n]
        del self._pending[:n]
        return n

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


def zstd_reader(raw: BinaryIO) -> BinaryIO:
    """A buffered reader of the decompressed bytes of a zstd stream (all frames; truncation raises)."""
    return io.BufferedReader(_ZstdRaw(raw), 1 << 20)  # type: ignore[return-value]
