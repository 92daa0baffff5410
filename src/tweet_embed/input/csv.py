"""CSV and TSV with a header row (RFC 4180 quoting: ``"…"`` fields, ``""`` for a quote, newlines inside quotes).

Why the stdlib ``csv`` module: it is the parser made for this (quoting, embedded newlines, CRLF), in C. What it
cannot do is start in the middle of a file, so the plan scan finds record boundaries itself: a newline ends a
record exactly when the count of ``"`` since the record began is even (every quote either opens or closes a
quoted field, or is one of an escaped pair), one ``bytes.count`` per line.

Numbering: the ``line`` of a reject and of a chunk is the **row number**, the header being row 1 (what a
spreadsheet shows); it equals the line number in the file unless a quoted field spans lines. Values are
strings: an id is the cell as written, an empty id or text is a reject. A row with more or fewer cells than
the header is a reject (a stray unquoted delimiter would otherwise cut a text silently). Filters use a
``lang`` column when there is one; a retweet is a text starting with ``RT @``.
"""

from __future__ import annotations

import csv as _csv
from collections.abc import Callable
from dataclasses import dataclass

from tweet_embed.input.records import BOM, InputError, ParsedBlock, check_text, clean_text, normalise_id
from tweet_embed.input.rules import DEFAULT_RULES, Rules, add_result, filter_record

SCAN_BLOCK = 1 << 22
DELIMITERS = {"csv": ",", "tsv": "\t"}
FIELD_LIMIT = 1 << 26  # the csv module's default (128 KiB) would reject a long text


@dataclass
class CsvScan:
    header: list[str]
    chunks: list[tuple[int, int, int, int]]  # (first row, rows, start byte, end byte)
    rows: int  # data rows (blank rows included: they keep the numbering, and are not records)
    damaged: str | None = None


def _records(data: bytes) -> list[bytes]:
    """Split bytes that hold whole records into records (quoted newlines kept), without the final newline."""
    if b'"' not in data:
        out = data.split(b"\n")
    else:
        out = []
        pending: list[bytes] = []
        odd = False
        for line in data.split(b"\n"):
            pending.append(line)
            if line.count(b'"') & 1:
                odd = not odd
            if not odd:
                out.append(b"\n".join(pending))
                pending = []
        if pending:
            out.append(b"\n".join(pending))
    if out and not out[-1]:
        out.pop()
    return out


def parse_header(raw: bytes, kind: str, label: str) -> list[str]:
    if raw.startswith(BOM):
        raw = raw[3:]
    try:
        text = raw.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise InputError(f"{label}: the header row is not UTF-8 text ({exc})") from None
    rows = list(_csv.reader([text], delimiter=DELIMITERS[kind]))
    header = rows[0] if rows else []
    if not any(h.strip() for h in header):
        raise InputError(f"{label}: the first row should be a header naming the columns, and it is empty")
    return header


def scan_csv(read: Callable[[int], bytes], chunk_rows: int, kind: str, label: str) -> CsvScan:
    """The header and chunks of ``chunk_rows`` rows each, as byte ranges of whole records."""
    header: list[str] | None = None
    chunks: list[tuple[int, int, int, int]] = []
    pos = 0  # bytes consumed (decompressed)
    row = 1  # rows completed (the header is row 1)
    odd = False  # inside a quoted field at pos
    start = -1  # byte where the current chunk starts
    first = 2
    in_chunk = 0
    head_parts: list[bytes] = []
    last_byte = b"\n"
    while True:
        block = read(SCAN_BLOCK)
        if not block:
            break
        last_byte = block[-1:]
        i = 0
        n = len(block)
        while i < n:
            j = block.find(b"\n", i)
            seg_end = n if j < 0 else j
            if block.count(b'"', i, seg_end) & 1:
                odd = not odd
            if j < 0:
                if header is None:
                    head_parts.append(block[i:])
                break
            if not odd:  # a record ends at this newline
                if header is None:
                    head_parts.append(block[i:j])
                    header = parse_header(b"".join(head_parts), kind, label)
                    start = pos + j + 1
                else:
                    in_chunk += 1
                    if in_chunk == chunk_rows:
                        end = pos + j + 1
                        chunks.append((first, in_chunk, start, end))
                        first += in_chunk
                        start = end
                        in_chunk = 0
                row += 1
            elif header is None:
                head_parts.append(block[i : j + 1])
            i = j + 1
        pos += n
    if header is None:
        if not head_parts or not b"".join(head_parts).strip():
            raise InputError(f"{label}: empty file, no header row")
        header = parse_header(b"".join(head_parts), kind, label)
        return CsvScan(header, [], 0)
    if pos > start:  # the last record has no final newline, or is still open
        in_chunk += 0 if last_byte == b"\n" else 1
    if in_chunk:
        chunks.append((first, in_chunk, start, pos))
    rows = first + in_chunk - 2
    damaged = None
    if odd:
        damaged = (
            f"{label}: a quoted field opened in row {first + in_chunk} is never closed (unbalanced '\"')"
        )
    return CsvScan(header, chunks, rows, damaged)


def column_index(header: list[str], name: str, label: str) -> int:
    try:
        return header.index(name)
    except ValueError:
        raise InputError(
            f"{label}: no column {name!r} (columns: {', '.join(header)}); "
            "choose them with --id-field / --text-field"
        ) from None


def _clean_rows(
    texts: list[str], kind: str, width: int, id_i: int, text_i: int
) -> tuple[list[str], list[str]] | None:
    """The common chunk in a few C-speed passes: every record one row of the header's width with an id and a
    text; None when any row needs the per-row rules (then they parse the whole chunk)."""
    reader = _csv.reader(texts, delimiter=DELIMITERS[kind], strict=True)
    try:
        rows = list(reader)
    except _csv.Error:
        return None
    if reader.line_num != len(texts) or len(rows) != len(texts) or not all(len(r) == width for r in rows):
        return None
    ids = [r[id_i] for r in rows]
    values = [r[text_i] for r in rows]
    if not all(ids) or not all(values):
        return None
    return ids, values


def parse_csv_block(
    data: bytes,
    first_row: int,
    file_label: str,
    kind: str,
    header: list[str],
    id_field: str = "_id",
    text_field: str = "text",
    rules: Rules = DEFAULT_RULES,
) -> ParsedBlock:
    """Parse a chunk of whole CSV/TSV records; each record's ``line`` is its row number."""
    if _csv.field_size_limit() < FIELD_LIMIT:
        _csv.field_size_limit(FIELD_LIMIT)
    id_i = column_index(header, id_field, file_label)
    text_i = column_index(header, text_field, file_label)
    lang_i = header.index("lang") if "lang" in header else -1
    width = len(header)
    block = ParsedBlock([], [], [], [])
    records = _records(data)
    bad_utf8: set[int] = set()
    try:
        texts = [r.decode("utf-8") for r in records]
    except UnicodeDecodeError:
        texts = []
        for k, r in enumerate(records):
            try:
                texts.append(r.decode("utf-8"))
            except UnicodeDecodeError:
                texts.append("")  # parsed as a blank row, reported below
                bad_utf8.add(first_row + k)
    if not bad_utf8 and not rules.filters:
        fast = _clean_rows(texts, kind, width, id_i, text_i)
        if fast is not None:
            return ParsedBlock(fast[0], fast[1], list(range(first_row, first_row + len(texts))), [])
    reader = _csv.reader(texts, delimiter=DELIMITERS[kind], strict=True)
    k = 0  # records consumed
    while k < len(texts):
        row_no = first_row + k
        raw = records[k]
        try:
            cells = next(reader)
        except StopIteration:
            break
        except _csv.Error as exc:
            add_result(block, f"malformed {kind.upper()}: {exc}", row_no, file_label, raw)
            k = reader.line_num
            reader = _csv.reader(texts[k:], delimiter=DELIMITERS[kind], strict=True)
            records, texts, first_row, k = records[k:], texts[k:], first_row + k, 0
            continue
        k = reader.line_num
        if row_no in bad_utf8:
            add_result(block, "invalid UTF-8", row_no, file_label, raw)
            continue
        if not cells or (len(cells) == 1 and not cells[0].strip() and width > 1):
            continue  # a blank row
        if len(cells) != width:
            add_result(block, f"row has {len(cells)} cells, the header has {width}", row_no, file_label, raw)
            continue
        rid = normalise_id(cells[id_i])
        if rid is None:
            add_result(block, f"invalid id {cells[id_i]!r}", row_no, file_label, raw)
            continue
        text = cells[text_i]
        bad = check_text(text)
        if bad is not None:
            add_result(block, bad, row_no, file_label, raw)
            continue
        if rules.filters:
            skip = filter_record({"lang": cells[lang_i]} if lang_i >= 0 else {}, text, rules)
            if skip is not None:
                add_result(block, skip, row_no, file_label, None)
                continue
        add_result(block, (rid, clean_text(text)), row_no, file_label, None)
    return block
