"""Reading input: line-delimited JSON (plain, gzip, zstd) into ``(id, text)`` records, with rejects.

Why a module of its own: every phase (embed, verify, consolidate --keep-text) must read the input the
same way, so that "every valid id" means the same thing everywhere.

Rules (also in docs/embedding.md, "Input"):
- fields default to ``_id`` and ``text``; other fields are ignored;
- ``_id`` may be a string, an integer, ``{"$oid": "..."}`` or ``{"$numberLong": "..."}``; the output id is
  always a string;
- a UTF-8 BOM, CRLF line ends, blank lines and a missing final newline are normal input;
- malformed JSON, a non-object line, a missing/invalid id, a text that is missing, null, empty or not a string
  are rejected with a reason;
- texts are kept exactly as decoded; only lone surrogates (which servers and tokenizers refuse) are replaced
  by U+FFFD, see :func:`clean_text`.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import orjson

from tweet_embed.storage import is_uri, open_input, stat
from tweet_embed.zstd import zstd_reader

BOM = b"\xef\xbb\xbf"
SNIPPET_CHARS = 200
_SURROGATE = re.compile("[\ud800-\udfff]")

JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")


class InputError(Exception):
    """A problem with an input file as a whole (missing, a directory, damaged compression)."""


@dataclass(frozen=True, slots=True)
class Reject:
    """One input line that was not embedded, and why."""

    file: str
    line: int
    reason: str
    snippet: str

    def to_json(self) -> bytes:
        return orjson.dumps(
            {"file": self.file, "line": self.line, "reason": self.reason, "snippet": self.snippet}
        )


@dataclass(slots=True)
class ParsedBlock:
    """The valid records of a block of input (parallel lists) and its rejects."""

    ids: list[str]
    texts: list[str]
    lines: list[int]  # 1-based line (or row) number of each valid record, for rejects found later
    rejects: list[Reject]
    skipped: dict[str, int] = field(default_factory=dict)  # valid records left out by a filter, by reason


def clean_text(text: str) -> str:
    """Replace lone surrogates by U+FFFD; anything else is left exactly as it was."""
    if _SURROGATE.search(text) is None:
        return text
    return _SURROGATE.sub("\ufffd", text)


def normalise_id(value: object) -> str | None:
    """The output id as a string, or None when the value cannot be an id."""
    if isinstance(value, str):
        return value if value and _SURROGATE.search(value) is None else None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict) and len(value) == 1:
        ((key, inner),) = value.items()
        if key in ("$oid", "$numberLong", "$numberInt", "$uuid") and isinstance(inner, str) and inner:
            return inner
    return None


def snippet(raw: bytes) -> str:
    """The start of a rejected record, for the rejects file."""
    return raw[: SNIPPET_CHARS * 4].decode("utf-8", "replace")[:SNIPPET_CHARS]


def loads(raw: bytes) -> object:
    """orjson first (fast); the stdlib accepts lone-surrogate escapes that orjson refuses."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"invalid UTF-8 at byte {exc.start}") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"malformed JSON: {exc.msg} at column {exc.colno}") from None
        except RecursionError:
            raise ValueError("malformed JSON: nested too deeply") from None


def parse_line(raw: bytes, id_field: str = "_id", text_field: str = "text") -> tuple[str, str] | str:
    """Parse one input line into ``(id, text)``; a ``str`` result is the reject reason.

    ``raw`` carries no line terminator and no BOM. Blank lines are the caller's business.
    """
    try:
        obj = loads(raw)
    except ValueError as exc:
        return str(exc)
    if not isinstance(obj, dict):
        return f"not a JSON object (a {type(obj).__name__})"
    if id_field not in obj:
        return f"missing id field {id_field!r}"
    value = obj[id_field]
    if isinstance(
        value, float
    ):  # orjson reads integers beyond 64 bits as floats; the stdlib keeps them exact
        try:
            exact = json.loads(raw)
        except (ValueError, RecursionError):
            exact = None
        if isinstance(exact, dict):
            value = exact.get(id_field, value)
    rid = normalise_id(value)
    if rid is None:
        return f"invalid id {short_repr(value)}"
    if text_field not in obj:
        return f"missing text field {text_field!r}"
    text = obj[text_field]
    bad = check_text(text)
    if bad is not None:
        return bad
    return rid, clean_text(text)


def check_text(text: object) -> str | None:
    """The reject reason for a text field's value that is not a non-empty string, else None."""
    if text is None:
        return "text is null"
    if not isinstance(text, str):
        return f"text is not a string (a {type(text).__name__})"
    if not text:
        return "text is empty"
    return None


def short_repr(value: object) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def check_input_path(path: str) -> None:
    """Raise :class:`InputError` with a clear message when ``path`` cannot be read as input."""
    if is_uri(path):
        try:
            stat(path)
        except FileNotFoundError:
            raise InputError(f"input file not found: {path}") from None
        except IsADirectoryError:
            raise InputError(f"input is a directory, not a file: {path} (give the files inside it)") from None
        except OSError as exc:
            raise InputError(f"input file is not readable: {path}: {exc}") from exc
        return
    if not os.path.exists(path):
        raise InputError(f"input file not found: {path}")
    if os.path.isdir(path):
        raise InputError(f"input is a directory, not a file: {path} (give the files inside it)")
    if not os.access(path, os.R_OK):
        raise InputError(f"input file is not readable: {path}")


def open_binary(path: str) -> BinaryIO:
    """Open an input file for reading its decompressed bytes (plain, ``.gz`` or ``.zst``)."""
    check_input_path(path)
    if is_uri(path):  # s3://, gs://...: pyarrow decompresses
        return open_input(path)
    lower = path.lower()
    if lower.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if lower.endswith((".zst", ".zstd")):
        return zstd_reader(open(path, "rb"))  # noqa: SIM115 - closed with the reader
    return open(path, "rb")  # noqa: SIM115


def is_compressed(path: str) -> bool:
    return path.lower().endswith(COMPRESSED_SUFFIXES)


def read_range(path: str, start: int, end: int) -> bytes:
    """The decompressed bytes ``[start, end)`` of ``path`` (seek for plain files, skip for compressed)."""
    try:
        with open_binary(path) as fh:
            if not is_compressed(path):
                fh.seek(start)
            else:
                _skip(fh, start)
            data = fh.read(end - start)
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    except Exception as exc:  # zstandard raises its own ZstdError
        raise InputError(f"cannot read {path}: {exc}") from exc
    if len(data) != end - start:
        raise InputError(f"{path} is shorter than when it was planned (changed or truncated?)")
    return data


def _skip(fh: BinaryIO, n: int) -> None:
    block = 1 << 22
    while n > 0:
        got = fh.read(min(block, n))
        if not got:
            raise InputError("unexpected end of data")
        n -= len(got)


def split_lines(data: bytes, first_line: int) -> Iterator[tuple[int, bytes]]:
    """Yield ``(line_number, raw)`` for the non-blank lines of ``data``; strips CR and a leading BOM."""
    lineno = first_line
    for raw in data.split(b"\n"):
        if lineno == 1 and raw.startswith(BOM):
            raw = raw[3:]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if raw.strip():
            yield lineno, raw
        lineno += 1


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic GC while a chunk's records are decoded and kept at once: the collector would walk the growing
    heap again and again (measured with bench/input_bench.py: about half the parse time of a chunk of v1.1
    tweets). Nothing decoded here forms a cycle; the collector runs again after."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def parse_lines(
    data: bytes,
    first_line: int,
    file_label: str,
    id_field: str = "_id",
    text_field: str = "text",
) -> ParsedBlock:
    """Parse a block of lines into parallel id/text/line lists and rejects (kept in input order)."""
    fast = _parse_clean_block(data, first_line, id_field, text_field)
    if fast is not None:
        return fast
    batch = ParsedBlock([], [], [], [])
    for lineno, raw in split_lines(data, first_line):
        result = parse_line(raw, id_field, text_field)
        if isinstance(result, str):
            batch.rejects.append(Reject(file_label, lineno, result, snippet(raw)))
        else:
            batch.ids.append(result[0])
            batch.texts.append(result[1])
            batch.lines.append(lineno)
    return batch


def _parse_clean_block(data: bytes, first_line: int, id_field: str, text_field: str) -> ParsedBlock | None:
    """The common block in a few C-speed passes (about 2x the per-line path); None when any line needs the
    per-line rules (blank, BOM, malformed, unusual id or text), which then parse the whole block.

    Why it is exact: every line goes through ``orjson.loads`` on its own, and the result is accepted only
    when each line holds an object with a non-empty string or 64-bit integer id and a non-empty string
    text. orjson refuses lone surrogates, so no text needs :func:`clean_text`.
    """
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    if not lines:
        return None
    loads = orjson.loads
    with gc_paused():
        try:
            objs = [loads(raw) for raw in lines]  # a blank line or a BOM raises as well
        except orjson.JSONDecodeError:
            return None
        found = clean_records(objs, id_field, text_field)
    if found is None:
        return None
    return ParsedBlock(found[0], found[1], list(range(first_line, first_line + len(lines))), [])


def clean_records(objs: list[object], id_field: str, text_field: str) -> tuple[list[str], list[str]] | None:
    """``(ids, texts)`` of decoded records when every one is a plain valid record (an object with a non-empty
    string or integer id and a non-empty string text) — a few C-speed passes; None when any needs the
    per-record rules. orjson refuses lone surrogates, so no text needs :func:`clean_text`."""
    try:
        ids = [o[id_field] for o in objs]  # type: ignore[index]
        texts = [o[text_field] for o in objs]  # type: ignore[index]
    except (KeyError, TypeError, IndexError):
        return None
    if not all(type(t) is str and t for t in texts):
        return None
    if all(type(i) is str and i for i in ids):
        pass
    elif all(type(i) is int for i in ids):
        ids = list(map(str, ids))
    else:
        return None
    return ids, texts


def iter_records(
    path: str, id_field: str = "_id", text_field: str = "text", rejects: list[Reject] | None = None
) -> Iterator[tuple[str, str]]:
    """Stream the valid ``(id, text)`` records of one input file (used by verify and --keep-text)."""
    with open_binary(path) as fh:
        buf = io.BufferedReader(fh, 1 << 20) if is_compressed(path) else fh  # type: ignore[arg-type,type-var]
        lineno = 0
        try:
            for raw in buf:
                lineno += 1
                raw = raw.rstrip(b"\n")
                if lineno == 1 and raw.startswith(BOM):
                    raw = raw[3:]
                raw = raw.rstrip(b"\r")
                if not raw.strip():
                    continue
                result = parse_line(raw, id_field, text_field)
                if isinstance(result, str):
                    if rejects is not None:
                        rejects.append(Reject(path, lineno, result, snippet(raw)))
                    continue
                yield result
        except (OSError, EOFError) as exc:
            raise InputError(f"{path}: damaged input after line {lineno}: {exc}") from exc
