"""A resumable writer of ``{"_id": ..., "text": ...}`` lines to .jsonl, .jsonl.gz or .jsonl.zst.

Why this shape: an export of a hundred million documents takes hours and must survive a crash or Ctrl-C
without losing or duplicating a line, and the final name must only ever hold a complete file.

Layout while an export runs (``OUT`` is the final path):

- ``.OUT.partial``: the data written so far (hidden, so readers that ignore dot-files skip it);
- ``.OUT.state.json``: the last *commit*: byte offset of the partial file, rows written, rows skipped,
  and the source's resume cursor (the last ``_id`` for MongoDB, per-stream offsets for BigQuery), plus a
  fingerprint of the source so that a resume with different options is refused.

A commit ends the current gzip member / zstd frame (concatenated members and frames are valid files that
``gzip``/``zstd`` and Python read as one stream), fsyncs the data, then atomically replaces the state file.
On resume the partial file is truncated back to the committed offset, so a half-written line or frame
after the last commit never survives, and the source restarts from the committed cursor. At the end the
partial file is renamed to ``OUT`` and the state file removed.
"""

from __future__ import annotations

import contextlib
import os
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import orjson

from tweet_embed.input.records import clean_text
from tweet_embed.parquet import fsync_dir, publish, write_atomic

STATE_VERSION = 1

# Why a source row was not written (the counts are in the summary and the state file).
SKIP_INVALID_ID = "invalid _id"
SKIP_TEXT_MISSING = "text missing"
SKIP_TEXT_NOT_STRING = "text not a string"
SKIP_TEXT_EMPTY = "text empty"
_UNSET: Any = object()


class ExportError(Exception):
    """An export that cannot start or go on (existing output, a resume with other options, a source error)."""


class _Codec(Protocol):
    def compress(self, data: bytes) -> bytes: ...
    def end(self) -> bytes: ...


class _Plain:
    def compress(self, data: bytes) -> bytes:
        return data

    def end(self) -> bytes:
        return b""


class _Gzip:
    """One gzip member per commit (``zlib`` with a gzip header and trailer)."""

    def __init__(self, level: int = 6) -> None:
        self._level = level
        self._obj: Any = None

    def compress(self, data: bytes) -> bytes:
        if self._obj is None:
            self._obj = zlib.compressobj(self._level, zlib.DEFLATED, 31)
        return self._obj.compress(data)  # type: ignore[no-any-return]

    def end(self) -> bytes:
        if self._obj is None:
            return b""
        out: bytes = self._obj.flush(zlib.Z_FINISH)
        self._obj = None
        return out


class _Zstd:
    """One zstd frame per commit."""

    def __init__(self, level: int = 3) -> None:
        import zstandard

        self._cctx = zstandard.ZstdCompressor(level=level)
        self._obj: Any = None

    def compress(self, data: bytes) -> bytes:
        if self._obj is None:
            self._obj = self._cctx.compressobj()
        return self._obj.compress(data)  # type: ignore[no-any-return]

    def end(self) -> bytes:
        if self._obj is None:
            return b""
        out: bytes = self._obj.flush()
        self._obj = None
        return out


def codec_for(path: str) -> _Codec:
    lower = path.lower()
    if lower.endswith(".gz"):
        return _Gzip()
    if lower.endswith((".zst", ".zstd")):
        return _Zstd()
    return _Plain()


def partial_path(out: str) -> str:
    d, name = os.path.split(os.path.abspath(out))
    return os.path.join(d, f".{name}.partial")


def state_path(out: str) -> str:
    d, name = os.path.split(os.path.abspath(out))
    return os.path.join(d, f".{name}.state.json")


def encode_line(rid: str, text: str) -> bytes:
    """One output line; lone surrogates (refused by orjson) become U+FFFD as ``embed`` would do anyway."""
    try:
        return orjson.dumps({"_id": rid, "text": text}) + b"\n"
    except orjson.JSONEncodeError:
        return orjson.dumps({"_id": clean_text(rid), "text": clean_text(text)}) + b"\n"


@dataclass
class ExportResult:
    """What an export did, for the command's summary line."""

    out: str
    rows: int
    skipped: dict[str, int]
    resumed: bool
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())


class ResumableJsonlWriter:
    """Write export lines with commit points; see the module docstring for the files and the protocol.

    ``source`` is a JSON-able description of what is exported (database, collection, query, fields...):
    a resume is allowed only when it equals the one recorded. ``commit_rows``/``commit_seconds`` say how
    often :meth:`due` asks the exporter to commit (each commit closes a gzip member / zstd frame, so
    commits should be thousands of rows apart).
    """

    def __init__(
        self,
        out: str,
        source: Mapping[str, Any],
        *,
        restart: bool = False,
        overwrite: bool = False,
        commit_rows: int = 50_000,
        commit_seconds: float = 10.0,
    ) -> None:
        self.out = out
        self.partial = partial_path(out)
        self.state_file = state_path(out)
        self.source = dict(source)
        self.commit_rows = commit_rows
        self.commit_seconds = commit_seconds
        self.rows = 0
        self.skipped: dict[str, int] = {}
        self.cursor: Any = None
        self.resumed = False
        self._codec = codec_for(out)
        self._since_commit = 0
        self._last_commit = time.monotonic()
        self._started = time.monotonic()
        self._closed = False
        self._busy = False
        self.position: Any = None
        parent = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(parent):
            raise ExportError(f"output directory does not exist: {parent}")
        if os.path.isdir(out):
            raise ExportError(f"--out is a directory: {out} (give a file name ending in .jsonl, .gz or .zst)")
        if restart:
            self._discard()
        state = self._load_state()
        if state is not None:
            self._resume(state)
        else:
            if os.path.exists(out) and not overwrite:
                raise ExportError(f"{out} already exists (use --overwrite to replace it)")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.partial)
            self._fh: BinaryIO = open(self.partial, "wb")  # noqa: SIM115 - closed in finish()/close()
            self._write_state()

    # -- state -------------------------------------------------------------------------------------
    def _discard(self) -> None:
        for p in (self.partial, self.state_file):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    def _load_state(self) -> dict[str, Any] | None:
        try:
            with open(self.state_file, "rb") as fh:
                state = orjson.loads(fh.read())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as exc:
            raise ExportError(
                f"cannot read the export state {self.state_file}: {exc} "
                "(use --restart to start the export again)"
            ) from exc
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ExportError(f"{self.state_file} is not an export state of this version (use --restart)")
        return state

    def _resume(self, state: dict[str, Any]) -> None:
        if state.get("source") != self.source:
            raise ExportError(
                f"an unfinished export to {self.out} was started with other options:\n"
                f"  recorded: {orjson.dumps(state.get('source')).decode()}\n"
                f"  now:      {orjson.dumps(self.source).decode()}\n"
                "re-run with the recorded options to resume, or add --restart to start again"
            )
        offset = int(state["offset"])
        try:
            size = os.path.getsize(self.partial)
        except FileNotFoundError:
            if os.path.exists(self.out) and os.path.getsize(self.out) == offset:
                # A crash between the final rename and the removal of the state file: the export is done.
                os.unlink(self.state_file)
                raise ExportError(
                    f"{self.out} is already complete ({state.get('rows')} rows); "
                    "use --overwrite to export again"
                ) from None
            raise ExportError(
                f"{self.partial} is missing but {self.state_file} exists (use --restart)"
            ) from None
        if size < offset:
            raise ExportError(
                f"{self.partial} is shorter ({size} B) than its last commit ({offset} B); "
                "it was changed by something else (use --restart)"
            )
        self._fh = open(self.partial, "r+b")  # noqa: SIM115
        self._fh.truncate(offset)  # drop whatever was written after the last commit
        self._fh.seek(offset)
        self.rows = int(state["rows"])
        self.skipped = {str(k): int(v) for k, v in state.get("skipped", {}).items()}
        self.cursor = state.get("cursor")
        self.resumed = True

    def _write_state(self) -> None:
        write_atomic(
            self.state_file,
            orjson.dumps(
                {
                    "version": STATE_VERSION,
                    "out": os.path.abspath(self.out),
                    "source": self.source,
                    "offset": self._fh.tell(),
                    "rows": self.rows,
                    "skipped": self.skipped,
                    "cursor": self.cursor,
                    "committed_at": time.time(),
                },
                option=orjson.OPT_INDENT_2,
            ),
        )

    # -- writing -----------------------------------------------------------------------------------
    def write(self, rid: str, text: str, position: Any = _UNSET) -> None:
        self.write_lines(encode_line(rid, text), 1, position)

    def write_lines(
        self, data: bytes, n: int, position: Any = _UNSET, skipped: Mapping[str, int] | None = None
    ) -> None:
        """Write ``n`` encoded lines; ``position`` is the source's place after them (opaque here).

        The writer is *busy* from the first byte until ``position`` is recorded; a write that fails or is
        interrupted in between leaves it busy for good, so no later commit can record an offset or a
        position that disagree (the next run resumes from the previous commit instead).
        """
        if self._busy:
            raise ExportError("an earlier write failed; the export must be resumed from its last commit")
        self._busy = True
        self._fh.write(self._codec.compress(data))
        self.rows += n
        self._since_commit += n
        for reason, k in (skipped or {}).items():
            self.skipped[reason] = self.skipped.get(reason, 0) + k
        if position is not _UNSET:
            self.position = position
        self._busy = False

    def skip(self, reason: str, n: int = 1, position: Any = _UNSET) -> None:
        """Count ``n`` source rows that are not written (and move the position past them)."""
        if self._busy:
            raise ExportError("an earlier write failed; the export must be resumed from its last commit")
        self._busy = True
        self.skipped[reason] = self.skipped.get(reason, 0) + n
        if position is not _UNSET:
            self.position = position
        self._busy = False

    def advance(self, position: Any) -> None:
        """Move the position without writing (e.g. a source stream that ended)."""
        if self._busy:
            raise ExportError("an earlier write failed; the export must be resumed from its last commit")
        self.position = position

    def due(self) -> bool:
        return self._since_commit >= self.commit_rows or (
            self._since_commit > 0 and time.monotonic() - self._last_commit >= self.commit_seconds
        )

    @property
    def busy(self) -> bool:
        """True when a write was cut short: committing now could record a torn state."""
        return self._busy

    def commit(self, cursor: Any) -> None:
        """Make everything written so far durable and record ``cursor`` as the place to resume from.

        ``cursor`` (JSON-able) must describe exactly the rows written and skipped so far.
        """
        if self._busy or self._closed:
            raise ExportError("cannot commit: an earlier write failed or the writer is closed")
        self._busy = True
        self._fh.write(self._codec.end())
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.cursor = cursor
        self._write_state()
        self._since_commit = 0
        self._last_commit = time.monotonic()
        self._busy = False

    def commit_quietly(self, cursor_of: Callable[[Any], Any]) -> bool:
        """Commit on the way out (Ctrl-C, a source error) when that is safe; never raises.

        ``cursor_of(position)`` turns the recorded position into the cursor.
        """
        if self._busy or self._closed:
            return False
        try:
            self.commit(cursor_of(self.position))
        except BaseException:  # noqa: BLE001 - best effort while another exception propagates
            return False
        return True

    def finish(self, cursor: Any = None, extra: dict[str, Any] | None = None) -> ExportResult:
        """Commit, move the partial file to its final name and remove the state file."""
        self.commit(cursor)
        self._fh.close()
        self._closed = True
        publish(self.partial, self.out)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state_file)
        fsync_dir(os.path.dirname(os.path.abspath(self.out)))
        return ExportResult(
            self.out,
            self.rows,
            dict(self.skipped),
            self.resumed,
            time.monotonic() - self._started,
            extra or {},
        )

    def close(self) -> None:
        """Close without finishing: what was committed stays for the next run to resume."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(OSError):
                self._fh.close()

    def __enter__(self) -> ResumableJsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
