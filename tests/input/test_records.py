from __future__ import annotations

import gzip

import pytest

from tweet_embed.input.records import (
    InputError,
    clean_text,
    iter_records,
    normalise_id,
    parse_line,
    parse_lines,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b'{"_id": "a1", "text": "hello"}', ("a1", "hello")),
        (b'{"_id": 42, "text": "x"}', ("42", "x")),
        (b'{"_id": {"$oid": "5f1d7a3b2c1e4a0012345678"}, "text": "x"}', ("5f1d7a3b2c1e4a0012345678", "x")),
        (b'{"_id": {"$numberLong": "123"}, "text": "x"}', ("123", "x")),
        (b'{"_id": "a", "text": "  spaced  ", "lang": "en"}', ("a", "  spaced  ")),
        (b'{"_id": "a", "text": "\\ud83d"}', ("a", "\ufffd")),
        (b'{"_id": "a", "text": "\\ud83d\\ude00 ok"}', ("a", "\U0001f600 ok")),
        (
            b'{"_id": "a", "text": "caf\\u00e9 \xd9\x85\xd8\xb1\xd8\xad\xd8\xa8\xd8\xa7"}',
            ("a", "caf\u00e9 \u0645\u0631\u062d\u0628\u0627"),
        ),
    ],
)
def test_parse_line_accepts(raw: bytes, expected: tuple[str, str]) -> None:
    assert parse_line(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"_id": "a", "text": ', "malformed JSON"),
        (b'["a", "b"]', "not a JSON object"),
        (b'"just a string"', "not a JSON object"),
        (b'{"text": "x"}', "missing id field"),
        (b'{"_id": null, "text": "x"}', "invalid id"),
        (b'{"_id": true, "text": "x"}', "invalid id"),
        (b'{"_id": "", "text": "x"}', "invalid id"),
        (b'{"_id": 1.5, "text": "x"}', "invalid id"),
        (b'{"_id": "a"}', "missing text field"),
        (b'{"_id": "a", "text": null}', "text is null"),
        (b'{"_id": "a", "text": ""}', "text is empty"),
        (b'{"_id": "a", "text": 5}', "text is not a string"),
        (b'{"_id": "a", "text": ["x"]}', "text is not a string"),
        (b'{"_id": "a", "text": "\xff\xfe"}', "invalid UTF-8"),
    ],
)
def test_parse_line_rejects(raw: bytes, reason: str) -> None:
    result = parse_line(raw)
    assert isinstance(result, str)
    assert reason in result


def test_custom_fields() -> None:
    assert parse_line(b'{"id": 7, "body": "t"}', "id", "body") == ("7", "t")


def test_normalise_id_rejects_lone_surrogate() -> None:
    assert normalise_id("a\ud800") is None
    assert normalise_id("ok") == "ok"


def test_clean_text_only_touches_surrogates() -> None:
    s = " Ünïcode\u200b text\t"
    assert clean_text(s) is s
    assert clean_text("a\udc00b") == "a\ufffdb"


def test_parse_lines_bom_crlf_blank_and_line_numbers() -> None:
    data = b'\xef\xbb\xbf{"_id":"1","text":"a"}\r\n\r\n   \n{"_id":"2","text":""}\n{"_id":"3","text":"c"}'
    block = parse_lines(data, 1, "f.jsonl")
    assert block.ids == ["1", "3"]
    assert block.texts == ["a", "c"]
    assert block.lines == [1, 5]
    assert [(r.line, r.reason) for r in block.rejects] == [(4, "text is empty")]
    assert block.rejects[0].file == "f.jsonl"


def test_bom_only_stripped_on_first_line() -> None:
    data = b'{"_id":"1","text":"a"}\n\xef\xbb\xbf{"_id":"2","text":"b"}\n'
    block = parse_lines(data, 1, "f")
    assert block.ids == ["1"]
    assert "malformed JSON" in block.rejects[0].reason


def test_reject_snippet_is_bounded() -> None:
    block = parse_lines(b'{"_id": "a", "text": ' + b"x" * 1000, 10, "f")
    assert len(block.rejects[0].snippet) == 200
    assert block.rejects[0].line == 10


def test_iter_records_gzip_and_missing(tmp_path) -> None:
    p = tmp_path / "a.jsonl.gz"
    with gzip.open(p, "wb") as fh:
        fh.write(b'{"_id":1,"text":"a"}\n{"bad\n{"_id":2,"text":"b"}\n')
    rejects: list = []
    assert list(iter_records(str(p), rejects=rejects)) == [("1", "a"), ("2", "b")]
    assert rejects[0].line == 2
    with pytest.raises(InputError, match="not found"):
        list(iter_records(str(tmp_path / "nope.jsonl")))
    with pytest.raises(InputError, match="directory"):
        list(iter_records(str(tmp_path)))


def _reference(data: bytes, first_line: int, id_field: str = "_id", text_field: str = "text"):
    """The per-line rules applied line by line: what parse_lines must return, fast path or not."""
    from tweet_embed.input.records import split_lines

    ids, texts, lines, rejects = [], [], [], []
    for lineno, raw in split_lines(data, first_line):
        r = parse_line(raw, id_field, text_field)
        if isinstance(r, str):
            rejects.append((lineno, r))
        else:
            ids.append(r[0])
            texts.append(r[1])
            lines.append(lineno)
    return ids, texts, lines, rejects


CLEAN_LINES = [
    b'{"_id": "a1", "text": "hello"}',
    b'{"text": "caf\\u00e9 \\ud83d\\ude00 \xe2\x9c\x93", "_id": "b2", "extra": [1, {"x": null}]}',
    b'{"_id": "c3", "text": "tab\\tand\\nnewline"}\r',  # CRLF file
    b'{"_id": "d4", "text": " spaced "}   ',
]


@pytest.mark.parametrize(
    "extra",
    [
        b"",  # all clean: the fast path
        b"\n",  # a blank line
        b'{"_id": 5, "text": "int id among string ids"}',
        b'{"_id": "e5", "text": ""}',
        b'{"_id": "e5", "text": "lone \\ud800 surrogate"}',
        b'{"_id": {"$oid": "65f0"}, "text": "extended json id"}',
        b'{"_id": 123456789012345678901234567890, "text": "id beyond 64 bits"}',
        b'{"_id": true, "text": "bool id"}',
        b'{"_id": "e5", "text": 7}',
        b'{"_id": "e5"}',
        b"[1, 2]",
        b'{"_id": "e5", "text": "x"} {"_id": "e6", "text": "y"}',
        b"not json",
        b"\xef\xbb\xbf" + b'{"_id": "bom", "text": "x"}',
    ],
)
def test_parse_lines_fast_path_matches_the_per_line_rules(extra: bytes) -> None:
    for first_line in (1, 1001):
        data = b"\n".join(CLEAN_LINES[:2] + [extra] + CLEAN_LINES[2:]) + b"\n"
        if extra.startswith(b"\xef\xbb\xbf"):
            data = extra + b"\n" + b"\n".join(CLEAN_LINES)
        b = parse_lines(data, first_line, "f")
        ids, texts, lines, rejects = _reference(data, first_line)
        assert (b.ids, b.texts, b.lines) == (ids, texts, lines)
        assert [(r.line, r.reason) for r in b.rejects] == rejects


def test_parse_lines_clean_blocks_take_the_fast_path(monkeypatch) -> None:
    """A clean block never reaches the per-line parser; its result equals the per-line rules."""
    import tweet_embed.input.records as records

    int_ids = b"\n".join(b'{"_id": %d, "text": "t%d"}' % (i, i) for i in range(50))
    blocks = [b"\n".join(CLEAN_LINES) + b"\n", b"\n".join(CLEAN_LINES), int_ids]
    expected = [_reference(d, 7) for d in blocks]
    monkeypatch.setattr(records, "parse_line", lambda *a: pytest.fail("per-line path used"))
    for data, (ids, texts, lines, rejects) in zip(blocks, expected, strict=True):
        b = parse_lines(data, 7, "f")
        assert (b.ids, b.texts, b.lines, b.rejects) == (ids, texts, lines, rejects) and not rejects
    assert parse_lines(int_ids, 1, "f").ids[:3] == ["0", "1", "2"]
