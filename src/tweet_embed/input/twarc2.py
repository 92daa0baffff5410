"""twarc2 output: one Twitter API v2 response per line, ``{"data": [tweets], "includes": {...}, "meta": ...}``.

Why its own format: one line holds up to 100 (search: 500) tweets, and a retweet's whole text is only in the
same line's ``includes.tweets`` (its author's name in ``includes.users``), so a line is read as a whole and
each tweet of its ``data`` array becomes one row (a ``data`` object, as a lookup returns, is one tweet).

Numbering and chunks: a reject's ``line`` is the line of the response in the file, and its reason names the
tweet's position (``data[3]: …``). A chunk is a range of whole lines holding about ``chunk_size`` tweets:
the plan scan decodes each line once to count its tweets (so a chunk never holds 100× the rows asked for).
A line without a ``data`` array is a reject, except an empty result (``meta.result_count`` 0), which holds
no tweets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from tweet_embed.input.records import BOM, ParsedBlock, loads, split_lines
from tweet_embed.input.rules import DEFAULT_RULES, NeedsExactInts, Rules, add_result, extract
from tweet_embed.input.tweets import Includes

SCAN_BLOCK = 1 << 22


def tweets_of(obj: Any) -> list[Any] | str:
    """The ``data`` tweets of a decoded response line, or a reject reason."""
    if not isinstance(obj, dict):
        return f"not a JSON object (a {type(obj).__name__})"
    data = obj.get("data")
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        return [data]
    meta = obj.get("meta")
    if "data" not in obj and isinstance(meta, dict) and meta.get("result_count") == 0:
        return []
    if "errors" in obj and "data" not in obj:
        return "a twarc2 line with errors and no data: " + orjson.dumps(obj["errors"])[:150].decode(
            "utf-8", "replace"
        )
    return "not a twarc2 response line (no 'data' array)"


def _count(raw: bytes) -> int:
    try:
        found = tweets_of(orjson.loads(raw))
    except orjson.JSONDecodeError:
        return 1  # rejected when read: counts as one row
    return len(found) if isinstance(found, list) else 1


@dataclass
class Twarc2Scan:
    chunks: list[tuple[int, int, int, int]]  # (first line, lines, start byte, end byte)
    lines: int
    tweets: int


def _lines(read: Callable[[int], bytes]) -> Iterator[tuple[bytes, int]]:
    """``(line without its newline, bytes it takes in the file)`` for every line."""
    carry = b""
    while True:
        block = read(SCAN_BLOCK)
        if not block:
            if carry:
                yield carry, len(carry)
            return
        parts = (carry + block).split(b"\n")
        carry = parts.pop()
        for raw in parts:
            yield raw, len(raw) + 1


def scan_twarc2(read: Callable[[int], bytes], chunk_tweets: int) -> Twarc2Scan:
    """Cut at line ends once a chunk holds ``chunk_tweets`` tweets (a line is never split)."""
    chunks: list[tuple[int, int, int, int]] = []
    off = start = 0
    lineno = 0
    first = 1
    lines_in = tweets_in = total = 0
    for raw, size in _lines(read):
        lineno += 1
        lines_in += 1
        off += size
        body = raw[3:] if lineno == 1 and raw.startswith(BOM) else raw
        if body.strip():
            n = _count(body)
            tweets_in += n
            total += n
        if tweets_in >= chunk_tweets:
            chunks.append((first, lines_in, start, off))
            start, first = off, first + lines_in
            lines_in = tweets_in = 0
    if lines_in:
        chunks.append((first, lines_in, start, off))
    return Twarc2Scan(chunks, lineno, total)


def parse_twarc2_block(
    data: bytes,
    first_line: int,
    file_label: str,
    id_field: str = "_id",
    text_field: str = "text",
    rules: Rules = DEFAULT_RULES,
) -> ParsedBlock:
    """Every tweet of every response line in a chunk, in order; text rules as for v2 tweets."""
    block = ParsedBlock([], [], [], [])
    for lineno, raw in split_lines(data, first_line):
        try:
            obj = loads(raw)
        except ValueError as exc:
            add_result(block, str(exc), lineno, file_label, raw)
            continue
        found = tweets_of(obj)
        if isinstance(found, str):
            add_result(block, found, lineno, file_label, raw)
            continue
        includes = Includes(obj.get("includes")) if isinstance(obj, dict) else None
        for k, tweet in enumerate(found):
            try:
                result = extract(tweet, id_field, text_field, rules, "v2", includes)
            except NeedsExactInts:
                result = f"invalid id {tweet.get(id_field)!r}"
            if isinstance(result, str):
                result = f"data[{k}]: {result}"
                add_result(block, result, lineno, file_label, orjson.dumps(tweet, default=str))
            else:
                add_result(block, result, lineno, file_label, None)
    return block
