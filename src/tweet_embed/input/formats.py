"""Which format a file is (from its content, or ``--format``), its plan scan, and parsing one of its chunks.

Formats: ``jsonl`` (one record per line), ``json`` (a JSON array of records), ``csv``/``tsv`` (a header row),
``parquet``, ``twarc2`` (one API v2 response per line). Any of the text formats may be ``.gz``/``.zst``.

Detection reads the first MiB (decompressed): Parquet by its magic bytes; ``[`` → a JSON array (unless the
first line is a whole JSON value followed by more lines: JSON Lines whose first line is an array); ``{`` →
JSON Lines, or twarc2 when the first record has a ``data`` array; otherwise a header row with tabs → TSV, with
commas → CSV. Whether JSON records are Twitter API objects is decided from the first records (up to 200) too.

A file that is clearly not what ``--format`` claims (an array given as ``jsonl``, JSON given as ``csv``), a
binary file, or compressed data without its suffix, is an :class:`InputError` naming what it looks like and the
flag to use, raised while planning, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from tweet_embed.input.records import BOM, InputError, ParsedBlock, open_binary
from tweet_embed.input.rules import DEFAULT_RULES, Rules, looks_like_tweets, parse_json_lines

FORMATS = ("auto", "jsonl", "json", "csv", "tsv", "parquet", "twarc2")
HEAD_BYTES = 1 << 20
FIRST_LINE_MAX = 64 << 20
SAMPLE_RECORDS = 200

_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed", ".gz"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed", ".zst"),
    (b"BZh", "bzip2-compressed", None),
    (b"\xfd7zXZ\x00", "xz-compressed", None),
    (b"PK\x03\x04", "a ZIP archive", None),
)
_NAMES = {
    "jsonl": "JSON Lines",
    "json": "a JSON array",
    "csv": "CSV",
    "tsv": "TSV",
    "parquet": "Parquet",
    "twarc2": "twarc2 responses (one API v2 response per line)",
}


@dataclass
class Detected:
    kind: str
    tweets: bool = False  # records are Twitter API tweet objects (JSON formats)


def _raw_head(path: str, n: int = 8) -> bytes:
    from tweet_embed import storage

    if storage.is_uri(path):
        return b""
    with open(path, "rb") as fh:
        return fh.read(n)


def _head(path: str) -> bytes:
    """The first decompressed MiB — or, when the file starts with an object, at least its whole first line (up
    to 64 MiB: one twarc2 response of 500 tweets with its includes is several MiB); what could be read when
    the stream is damaged (the plan scan then reports the damage with its line, as for any damaged file)."""
    parts: list[bytes] = []
    got = 0
    try:
        with open_binary(path) as fh:
            while got < HEAD_BYTES or (
                got < FIRST_LINE_MAX
                and parts[0].lstrip(BOM + b" \t\r\n")[:1] == b"{"
                and b"\n" not in parts[-1]
            ):
                part = fh.read(1 << 16)
                if not part:
                    break
                parts.append(part)
                got += len(part)
    except InputError:
        raise
    except Exception:  # damaged compression: detect from what came before it
        pass
    return b"".join(parts)


_CONTROL = bytes(c for c in range(32) if c not in (9, 10, 12, 13))


def _looks_binary(head: bytes) -> str | None:
    """Why ``head`` is not text, or None. Lenient on purpose: one bad line in a text file is a reject with
    its line number, not a refused file; binary data has bad bytes at its start or all through."""
    sample = head[:64]
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or (
        len(sample) >= 8
        and (sample[1::2].count(0) == len(sample[1::2]) or sample[::2].count(0) == len(sample[::2]))
    ):
        return "UTF-16 text; convert it to UTF-8"
    text = head.decode("utf-8", "replace")
    if len(head) >= HEAD_BYTES:
        text = text[:-1]  # a character cut by the end of the sample
    bad = text.count("\ufffd") + sum(head.count(c) for c in _CONTROL)
    start = head[:16].decode("utf-8", "replace")
    if bad > len(text) // 20 or "\ufffd" in start or any(c in _CONTROL for c in head[:16]):
        return "a binary file (not UTF-8 text)"
    return None


def _first_lines(head: bytes, n: int) -> list[bytes]:
    lines = [ln.strip() for ln in head.split(b"\n")]
    if len(head) >= HEAD_BYTES and not head.endswith(b"\n"):
        lines = lines[:-1]  # possibly cut
    return [ln for ln in lines if ln][:n]


def _sample_objs(lines: list[bytes]) -> list[object]:
    out: list[object] = []
    for ln in lines:
        try:
            out.append(orjson.loads(ln))
        except orjson.JSONDecodeError:
            continue
    return out


def _sample_array(head: bytes) -> list[object]:
    from tweet_embed.input.jsonarray import _UNSAFE, match_element

    pos = head.find(b"[") + 1
    out: list[object] = []
    fast = _UNSAFE not in head
    while len(out) < SAMPLE_RECORDS:
        m = match_element(head, pos, fast)
        if m is None:
            break
        try:
            out.append(orjson.loads(head[pos : m.end() - 1]))
        except orjson.JSONDecodeError:
            pass
        if m.group(1) == b"]":
            break
        pos = m.end()
    return out


def sniff(head: bytes) -> tuple[str | None, list[object]]:
    """The format the decompressed start of a file looks like (None: unknown) and sample records."""
    if head.startswith(BOM):
        head = head[3:]
    text = head.lstrip()
    if not text:
        return None, []
    c = text[:1]
    lines = _first_lines(text, SAMPLE_RECORDS)
    if c == b"[":
        try:
            first = orjson.loads(lines[0])
        except (orjson.JSONDecodeError, IndexError):
            first = None
        if first is not None and len(lines) > 1 and lines[1][:1] in (b"{", b"["):
            return "jsonl", _sample_objs(lines)
        return "json", _sample_array(text)
    if c == b"{":
        objs = _sample_objs(lines)
        if objs and isinstance(objs[0], dict) and isinstance(objs[0].get("data"), list | dict):
            return "twarc2", objs
        return "jsonl", objs
    first_line = text.split(b"\n", 1)[0]
    if b"\t" in first_line:
        return "tsv", []
    if b"," in first_line:
        return "csv", []
    return None, []


def detect(path: str, forced: str = "auto", label: str | None = None) -> Detected:
    """The format of ``path`` (checked against ``forced`` when not ``auto``); raises :class:`InputError`."""
    label = label or path
    raw = _raw_head(path)
    if raw.startswith(b"PAR1"):
        if forced not in ("auto", "parquet"):
            raise InputError(f"{label} is a Parquet file, not {_NAMES[forced]}: use --format parquet")
        return Detected("parquet")
    if forced == "parquet":
        raise InputError(
            f"{label} is not a Parquet file (no PAR1 magic bytes); leave --format out to detect it"
        )
    lower = path.lower()
    for magic, what, suffix in _MAGIC:
        if raw.startswith(magic) and not (suffix and lower.endswith((suffix, suffix + "d"))):
            hint = f": name it {label}{suffix} so it is decompressed" if suffix else ": unpack it first"
            raise InputError(f"{label} is {what}{hint}")
    head = _head(path)
    binary = _looks_binary(head)
    if binary:
        raise InputError(f"{label} is {binary}; expected JSON Lines, a JSON array, CSV/TSV or Parquet")
    kind, sample = sniff(head)
    if forced == "auto":
        if kind is None:
            if not head.strip(BOM + b" \t\r\n"):
                return Detected("jsonl")  # an empty file: nothing to do, as before
            start = head.lstrip(BOM + b" \t\r\n")[:40]
            raise InputError(
                f"{label}: format not recognised (it starts with {start!r}); expected JSON Lines, a JSON "
                "array, CSV/TSV with a header, or Parquet: give --format"
            )
        return Detected(kind, kind in ("jsonl", "json") and looks_like_tweets(sample))
    _check_claim(label, forced, kind)
    if forced in ("jsonl", "json") and kind == forced:
        return Detected(forced, looks_like_tweets(sample))
    return Detected(forced)


def _check_claim(label: str, forced: str, kind: str | None) -> None:
    """Refuse what is clearly another format: JSON vs CSV, an array vs lines (auto still decides the rest)."""
    if kind is None or kind == forced:
        return
    json_kinds = ("jsonl", "json", "twarc2")
    clash = (
        (forced == "jsonl" and kind == "json")
        or (forced == "json" and kind in ("jsonl", "twarc2"))
        or (forced == "twarc2" and kind in ("json", "jsonl"))  # records without a data array
        or (forced in ("csv", "tsv") and kind in json_kinds)
        or (forced in json_kinds and kind in ("csv", "tsv"))
    )
    if clash:
        raise InputError(
            f"{label} looks like {_NAMES[kind]}, not {_NAMES[forced]}: use --format {kind} "
            "(or leave --format out to detect it)"
        )


@dataclass
class Scan:
    """A text file's chunks ``(first line/record/row, count, start byte, end byte)`` and its size in units."""

    chunks: list[tuple[int, int, int, int]]
    units: int
    header: list[str] | None = None
    damaged: str | None = None


def scan(path: str, kind: str, chunk_size: int, label: str) -> Scan:
    """The plan scan of a ``json``, ``csv``/``tsv`` or ``twarc2`` file, in one pass over its bytes."""
    from tweet_embed.input.csv import scan_csv
    from tweet_embed.input.jsonarray import scan_array
    from tweet_embed.input.twarc2 import scan_twarc2

    done: list[tuple[int, int, int, int]] = []
    try:
        with open_binary(path) as fh:
            if kind == "json":
                a = scan_array(fh.read, chunk_size, label)
                done = a.chunks
                return Scan(a.chunks, a.records, None, a.damaged)
            if kind in ("csv", "tsv"):
                c = scan_csv(fh.read, chunk_size, kind, label)
                return Scan(c.chunks, c.rows, c.header, c.damaged)
            if kind == "twarc2":
                t = scan_twarc2(fh.read, chunk_size)
                return Scan(t.chunks, t.lines)
    except InputError:
        raise
    except Exception as exc:  # damaged compression part-way through
        return Scan(done, 0, None, f"{label}: damaged input ({type(exc).__name__}: {exc})")
    raise ValueError(f"no scan for format {kind!r}")


def parse_block(
    kind: str,
    data: bytes,
    first: int,
    label: str,
    id_field: str = "_id",
    text_field: str = "text",
    rules: Rules = DEFAULT_RULES,
    tweets: bool = False,
    header: list[str] | None = None,
) -> ParsedBlock:
    """One chunk's bytes → its rows, rejects and skip counts, for any text format."""
    if kind == "jsonl":
        return parse_json_lines(data, first, label, id_field, text_field, rules, tweets)
    if kind == "json":
        from tweet_embed.input.jsonarray import parse_array_block

        return parse_array_block(data, first, label, id_field, text_field, rules, tweets)
    if kind in ("csv", "tsv"):
        from tweet_embed.input.csv import parse_csv_block

        if header is None:
            raise ValueError("a CSV chunk needs its file's header")
        return parse_csv_block(data, first, label, kind, header, id_field, text_field, rules)
    if kind == "twarc2":
        from tweet_embed.input.twarc2 import parse_twarc2_block

        return parse_twarc2_block(data, first, label, id_field, text_field, rules)
    raise ValueError(f"no parser for format {kind!r}")
