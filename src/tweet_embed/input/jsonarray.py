"""A JSON array of records (``mongoexport --jsonArray``, ``json.dump(rows, f, indent=2)``), streamed.

Why not ``json.load``: a 5 GB array must work in bounded memory, and resume must restart in the middle. The
plan scan walks the (decompressed) bytes once, a block at a time, and notes the byte offset of every
``chunk_records``-th element, so a chunk is a byte range of whole elements, exactly like a JSONL chunk is a
byte range of whole lines. Memory: one read block plus the largest single element.

Numbering: a JSON array has no useful line numbers (the whole array may be one line), so the ``line`` of a
reject and of a chunk is the **record number**: the 1-based position of the element in the array.

Finding element ends without parsing: one regular expression matches a whole element in C — strings as
atoms (so brackets inside texts do not count), containers nested up to :data:`MAX_FAST_DEPTH` levels. An
element nested deeper, or a block boundary inside an element, falls back to :func:`_element_end`, a token
loop that handles any depth. The scan checks structure only (brackets and strings balance, elements are
separated by commas); each element is then parsed by orjson when its chunk is read, so a malformed element
that still balances is a reject with its record number, while a broken structure (an unclosed string, a
missing comma) stops the plan there, like damaged compression does, with the record and byte offset.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import orjson

from tweet_embed.input.records import BOM, InputError, ParsedBlock, clean_records, gc_paused
from tweet_embed.input.rules import (
    DEFAULT_RULES,
    Rules,
    add_result,
    plain_records,
    record_from_raw,
)

SCAN_BLOCK = 1 << 22
MAX_FAST_DEPTH = 24
_WS = b" \t\r\n"

# A string, exactly (the slow path): any escape, any run of backslashes.
_STR = rb'"[^"\\]*(?:\\[\s\S][^"\\]*)*"'
# A string, fast: ``[^"]*`` runs at C speed where ``[^"\\]`` is ~10x slower in ``re``; an escaped quote is a
# quote right after a backslash. That reading is exact unless an escaped backslash comes right before a quote
# (bytes ``\\"``), so the fast pattern is used only on a buffer without that sequence.
_FSTR = rb'"[^"]*(?:(?<=\\)"[^"]*)*"'
if sys.version_info >= (3, 11):  # possessive and atomic: no backtracking, so no blow-up on bad input
    _FSTR = rb'"[^"]*+(?:(?<=\\)"[^"]*+)*+"'
    _FLAT = rb'[^"\[\]{}]++'
    _REP = rb")*+"
else:  # pragma: no cover - 3.10 takes the token loop for containers (correct, slower)
    _FLAT = rb"(?!)"
    _REP = rb")*"


def _nested(depth: int) -> bytes:
    inner = rb"(?:" + _FLAT + rb"|" + _FSTR + _REP
    for _ in range(depth):
        inner = rb"(?:" + _FLAT + rb"|" + _FSTR + rb"|[\[{]" + inner + rb"[\]}]" + _REP
    return inner


# One element with the whitespace around it and the separator after it (``,`` or the closing ``]``).
# Bracket kinds are not paired here ({ with ]): orjson refuses such an element when its chunk is parsed.
_ELEMENT = re.compile(
    rb"[ \t\r\n]*(?:[\[{]"
    + _nested(MAX_FAST_DEPTH)
    + rb"[\]}]|"
    + _FSTR
    + rb'|[^,\[\]{}"\s]+)[ \t\r\n]*([,\]])'
)
_UNSAFE = b'\\\\"'  # an escaped backslash before a quote: _FSTR would misread it
_STRUCT = re.compile(rb'["\[\]{}]')
_STRING = re.compile(_STR)


def match_element(buf: bytes, pos: int, fast: bool) -> re.Match[bytes] | None:
    """The fast whole-element match at ``pos`` (None: use :func:`_element_end`)."""
    return _ELEMENT.match(buf, pos) if fast else None


class _NeedMore(Exception):
    """The element runs past the end of the buffer."""


class StructureError(Exception):
    """The bytes are not a JSON array's structure at this point."""


def _element_end(buf: bytes, pos: int, final: bool) -> tuple[int, int]:
    """``(end of element, separator byte)`` for the element at ``pos`` (after whitespace), any depth.

    Raises :class:`_NeedMore` when ``buf`` ends inside the element (and ``final`` is false).
    """
    n = len(buf)
    i = pos
    while i < n and buf[i] in _WS:
        i += 1
    if i >= n:
        raise _NeedMore
    c = buf[i]
    if c in b"[{":
        depth = 0
        j = i
        while True:
            m = _STRUCT.search(buf, j)
            if m is None:
                if final:
                    raise StructureError("the array is not closed (no ']' at the end)")
                raise _NeedMore
            j = m.end()
            tok = buf[m.start()]
            if tok == 0x22:  # a string: skip it whole (brackets inside do not count)
                sm = _STRING.match(buf, m.start())
                if sm is None:
                    raise _NeedMore if not final else StructureError("unterminated string")
                j = sm.end()
            elif tok in b"[{":
                depth += 1
            else:
                depth -= 1
                if depth == 0:
                    break
        i = j
    elif c == 0x22:
        m = _STRING.match(buf, i)
        if m is None:
            raise _NeedMore if not final else StructureError("unterminated string")
        i = m.end()
    elif c in b",]}":
        raise StructureError(f"expected a value, found {chr(c)!r}")
    else:
        while i < n and buf[i] not in b',]}[{" \t\r\n':
            i += 1
    while i < n and buf[i] in _WS:
        i += 1
    if i >= n:
        if final:
            raise StructureError("the array is not closed (no ']' at the end)")
        raise _NeedMore
    sep = buf[i]
    if sep not in b",]":
        raise StructureError(f"expected ',' or ']' after a record, found {chr(sep)!r}")
    return i + 1, sep


@dataclass
class ArrayScan:
    """What the plan needs: chunk ranges ``(first_record, n_records, start, end)`` and the record count."""

    chunks: list[tuple[int, int, int, int]]
    records: int
    damaged: str | None = None


def scan_array(read: Callable[[int], bytes], chunk_records: int, label: str) -> ArrayScan:
    """Walk a JSON array from ``read`` (a file's ``read``) and cut it every ``chunk_records`` elements.

    A chunk's byte range runs from its first element to the start of the next chunk's first element (the
    last chunk: to the end of its last element), so chunks tile the elements with nothing between them.
    """
    chunks: list[tuple[int, int, int, int]] = []
    buf = b""
    base = 0  # file offset of buf[0]
    pos = 0  # next element starts at buf[pos] (after whitespace)
    final = False
    records = 0
    chunk_start = -1
    chunk_first = 1
    in_chunk = 0

    fast = True

    def fill() -> None:
        nonlocal buf, base, pos, final, fast
        block = read(SCAN_BLOCK)
        if not block:
            final = True
        buf = buf[pos:] + block
        base += pos
        pos = 0
        fast = _UNSAFE not in buf

    # the opening bracket
    while True:
        fill()
        if base == 0 and buf.startswith(BOM):
            buf, base = buf[3:], 3
        stripped = buf.lstrip(_WS)
        if stripped or final:
            break
    if not stripped:
        raise InputError(f"{label}: empty file, not a JSON array")
    if stripped[:1] != b"[":
        raise InputError(f"{label}: not a JSON array (it starts with {stripped[:20]!r})")
    pos = len(buf) - len(stripped) + 1
    # an empty array
    rest = buf[pos:].lstrip(_WS)
    while not rest and not final:
        fill()
        rest = buf[pos:].lstrip(_WS)
    if rest[:1] == b"]":
        return ArrayScan([], 0)
    last_end = pos
    try:
        while True:
            m = match_element(buf, pos, fast)
            if m is not None:
                end, sep = m.end(), buf[m.end() - 1]
            else:
                try:
                    end, sep = _element_end(buf, pos, final)
                except _NeedMore:
                    fill()
                    continue
            if in_chunk == 0:
                chunk_start = base + pos
            records += 1
            in_chunk += 1
            elem_end = base + end - 1  # the separator excluded
            pos = end
            last_end = elem_end
            if sep == 0x5D:  # "]": the last element
                chunks.append((chunk_first, in_chunk, chunk_start, elem_end))
                in_chunk = 0
                break
            if in_chunk == chunk_records:
                chunks.append((chunk_first, in_chunk, chunk_start, base + end))
                chunk_first += in_chunk
                in_chunk = 0
    except StructureError as exc:
        # keep the whole chunks before the damage (like damaged compression), report where it broke
        whole = records - in_chunk
        return ArrayScan(
            chunks,
            whole,
            f"{label}: not a valid JSON array after record {records} (byte {base + pos}): {exc}",
        )
    del last_end
    trailing = buf[pos:].strip(_WS)
    while not final and not trailing:
        fill()
        trailing = buf[pos:].strip(_WS)
    if trailing:
        return ArrayScan(
            chunks, records, f"{label}: unexpected data after the end of the JSON array (byte {base + pos})"
        )
    return ArrayScan(chunks, records)


def split_elements(data: bytes) -> Iterator[bytes]:
    """The elements of a chunk's bytes (each without separator and surrounding whitespace), one at a time."""
    pos = 0
    n = len(data)
    fast = _UNSAFE not in data
    data = data + b"]"
    while True:
        while pos < n and data[pos] in _WS:
            pos += 1
        if pos >= n:
            return
        m = match_element(data, pos, fast)
        if m is not None:
            end = m.end()
        else:
            end, _ = _element_end(data, pos, True)
        yield data[pos : end - 1].rstrip(_WS)
        pos = end


def parse_array_block(
    data: bytes,
    first_record: int,
    file_label: str,
    id_field: str = "_id",
    text_field: str = "text",
    rules: Rules = DEFAULT_RULES,
    tweets: bool | str = False,
) -> ParsedBlock:
    """Parse a chunk of array elements; the ``line`` of each record and reject is its record number.

    Plain records: the whole chunk in one ``orjson.loads`` and a few C-speed passes (as JSONL's clean-block
    path). Anything else — Twitter objects, filters, a malformed element, a lone surrogate escape, an id that
    needs exact big integers — element by element, so memory holds one decoded record at a time (a chunk of
    10,000 v1.1 tweets decoded at once is hundreds of MB of Python objects) and only a bad element is rejected.
    """
    if plain_records(id_field, text_field, rules, tweets):
        body = data.rstrip(_WS)
        if body.endswith(b","):
            body = body[:-1]
        with gc_paused():
            try:
                objs = orjson.loads(b"[" + body + b"]")
            except orjson.JSONDecodeError:
                objs = None
            found = clean_records(objs, id_field, text_field) if isinstance(objs, list) else None
        if found is not None:
            return ParsedBlock(
                found[0], found[1], list(range(first_record, first_record + len(found[0]))), []
            )
        del objs
    block = ParsedBlock([], [], [], [])
    for k, raw in enumerate(split_elements(data)):
        result = record_from_raw(raw, id_field, text_field, rules, tweets)
        add_result(block, result, first_record + k, file_label, raw)
    return block
