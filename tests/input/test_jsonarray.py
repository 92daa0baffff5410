"""JSON arrays: the streamed plan scan (chunk ranges tile the elements, at any block boundary, any layout,
bounded memory) and chunk parsing (record numbers, rejects of single elements)."""

from __future__ import annotations

import io
import json
import tracemalloc
from collections.abc import Iterator

import orjson
import pytest

from tweet_embed.input import jsonarray
from tweet_embed.input.jsonarray import MAX_FAST_DEPTH, parse_array_block, scan_array

TRICKY = [
    {"_id": "1", "text": 'brackets ] } [ { and "quotes" and \\ backslashes,'},
    {"_id": 2, "text": "nested", "n": {"a": [1, {"b": [2, [3, {"c": "]"}]]}]}},
    {"_id": "3", "text": "\u00e9\u00e8 \u0645\u0631\u062d\u0628\u0627 \U0001f600", "empty": {}, "list": []},
    {"_id": "4", "text": "deep", "d": json.loads("[" * (MAX_FAST_DEPTH + 5) + "]" * (MAX_FAST_DEPTH + 5))},
    {"_id": "5", "text": 'escaped \\" quote " and \\\\'},
] * 7


def layouts(records: list[object]) -> dict[str, bytes]:
    return {
        "compact": json.dumps(records, separators=(",", ":")).encode(),
        "indent2": json.dumps(records, indent=2, ensure_ascii=False).encode(),
        "spaces-crlf": b"\xef\xbb\xbf \r\n[ \r\n"
        + b" ,\r\n ".join(json.dumps(r).encode() for r in records)
        + b" \r\n] \r\n",
    }


def parse_all(data: bytes, chunk: int, block: int, monkeypatch) -> tuple[list[str], list[str], list]:
    monkeypatch.setattr(jsonarray, "SCAN_BLOCK", block)
    sc = scan_array(io.BytesIO(data).read, chunk, "f")
    assert sc.damaged is None
    assert sc.records == sum(c[1] for c in sc.chunks)
    ids, texts, rejects = [], [], []
    expect_first = 1
    for first, n, start, end in sc.chunks:
        assert first == expect_first and n <= chunk
        expect_first += n
        b = parse_array_block(data[start:end], first, "f")
        ids += b.ids
        texts += b.texts
        rejects += b.rejects
    # chunks tile the elements: nothing between them but whitespace and separators
    for (_, _, _, e1), (_, _, s2, _) in zip(sc.chunks, sc.chunks[1:], strict=False):
        assert e1 == s2
    return ids, texts, rejects


@pytest.mark.parametrize("layout", ["compact", "indent2", "spaces-crlf"])
@pytest.mark.parametrize(("chunk", "block"), [(1, 7), (3, 64), (10, 1 << 22), (100, 333)])
def test_scan_and_parse_any_layout_and_block_boundary(layout, chunk, block, monkeypatch) -> None:
    data = layouts(TRICKY)[layout]
    ids, texts, rejects = parse_all(data, chunk, block, monkeypatch)
    assert not rejects
    assert ids == [str(r["_id"]) for r in TRICKY]
    assert texts == [r["text"] for r in TRICKY]


@pytest.mark.parametrize("data", [b"[]", b"  [ \n ]\n", b"\xef\xbb\xbf[]"])
def test_empty_array(data) -> None:
    sc = scan_array(io.BytesIO(data).read, 10, "f")
    assert (sc.chunks, sc.records, sc.damaged) == ([], 0, None)


def test_elements_that_are_not_records_are_rejected_with_their_record_number(monkeypatch) -> None:
    data = (
        b'[{"_id": "a", "text": "ok"}, 5, "str", [1, 2], null, {"_id": "b"}, {"_id": "c" "text": "x"},'
        b' {"_id": "d", "text": "\\ud800 lone"}, {"_id": 123456789012345678901234567890, "text": "big"},'
        b' {"_id": "e", "text": "last"}]'
    )
    ids, texts, rejects = parse_all(data, 4, 16, monkeypatch)
    assert ids == ["a", "d", "123456789012345678901234567890", "e"]
    assert texts[1] == "\ufffd lone"
    assert [(r.line, r.reason.split(":")[0]) for r in rejects] == [
        (2, "not a JSON object (a int)"),
        (3, "not a JSON object (a str)"),
        (4, "not a JSON object (a list)"),
        (5, "not a JSON object (a NoneType)"),
        (6, "missing text field 'text'"),
        (7, "malformed JSON"),
    ]


@pytest.mark.parametrize(
    ("data", "records", "where"),
    [
        (b'[{"_id": "a", "text": "x"}, {"_id": "b", "text": "unclosed}]', 1, "after record 1"),
        (b'[{"_id": "a", "text": "x"} {"_id": "b", "text": "y"}]', 0, "expected ',' or ']'"),
        (b'[{"_id": "a", "text": "x"}, {"_id": "b", "text": "y"}', 1, "not closed"),
        (b'[{"_id": "a", "text": "x"}] trailing', 1, "after the end of the JSON array"),
        (b'[{"_id": "a", "text": "x"},, {"_id": "b", "text": "y"}]', 1, "expected a value"),
    ],
)
def test_broken_structure_keeps_whole_chunks_before_it(data, records, where) -> None:
    sc = scan_array(io.BytesIO(data).read, 1, "f.json")
    assert sc.damaged is not None and where in sc.damaged and sc.damaged.startswith("f.json:")
    assert sc.records == records == sum(c[1] for c in sc.chunks)


def test_not_an_array_is_an_error() -> None:
    from tweet_embed.input.records import InputError

    with pytest.raises(InputError, match="not a JSON array"):
        scan_array(io.BytesIO(b'{"_id": 1}').read, 1, "f")


def test_scan_memory_is_bounded_by_the_block_not_the_file(monkeypatch) -> None:
    """A 20 MB array streamed from a generator (never in memory whole) is scanned in well under 1 MB."""
    monkeypatch.setattr(jsonarray, "SCAN_BLOCK", 1 << 16)
    n = 10_000
    rec = orjson.dumps({"_id": "x" * 20, "text": "some [text] {here} " * 100})

    def stream() -> Iterator[bytes]:
        yield b"[\n"
        for i in range(0, n, 100):
            part = b",\n".join([rec] * 100)
            yield part + (b",\n" if i + 100 < n else b"\n]\n")

    gen = stream()
    pending = bytearray()

    def read(size: int) -> bytes:
        while len(pending) < size:
            part = next(gen, None)
            if part is None:
                break
            pending.extend(part)
        out = bytes(pending[:size])
        del pending[:size]
        return out

    tracemalloc.start()
    try:
        sc = scan_array(read, 500, "big")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sc.records == n and len(sc.chunks) == 20 and sc.damaged is None
    assert n * len(rec) > 19_000_000
    assert peak < 1_000_000, peak


def test_a_chunk_of_twitter_objects_is_decoded_one_element_at_a_time() -> None:
    """Decoding a whole chunk of API objects at once costs ~16x its JSON size in Python objects; element by
    element, the parse holds about the chunk's bytes plus one record."""
    from tweet_objects import V1_RETWEET

    data = b",\n".join(orjson.dumps({**V1_RETWEET, "id_str": str(k)}) for k in range(2000))
    tracemalloc.start()
    try:
        block = parse_array_block(data, 1, "f", tweets=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(block.ids) == 2000 and not block.rejects
    assert peak < 3 * len(data), (peak, len(data))
