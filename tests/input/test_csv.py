"""CSV/TSV: record boundaries with quoted newlines at any block boundary, row numbers, rejects."""

from __future__ import annotations

import csv
import io

import pytest

from tweet_embed.input import csv as csv_input
from tweet_embed.input.csv import parse_csv_block, scan_csv
from tweet_embed.input.records import InputError
from tweet_embed.input.rules import DEFAULT_RULES, Rules

ROWS = [
    ("1", 'a "quoted" word, and a comma'),
    ("2", "two\nlines"),
    ("3", 'three\r\nlines with CRLF\r\nand "quotes"\n'),
    ("4", "caf\u00e9 \U0001f600 \u0645\u0631\u062d\u0628\u0627"),
    ("5", '""'),
    ("6", "tab\there"),
] * 5


def write(rows, delimiter=",", lineterminator="\r\n", header=("_id", "text")) -> bytes:
    out = io.StringIO(newline="")
    w = csv.writer(out, delimiter=delimiter, lineterminator=lineterminator)
    w.writerow(header)
    w.writerows(rows)
    return out.getvalue().encode()


def read_all(data, kind, chunk, block, monkeypatch, rules=DEFAULT_RULES):
    monkeypatch.setattr(csv_input, "SCAN_BLOCK", block)
    sc = scan_csv(io.BytesIO(data).read, chunk, kind, "f")
    assert sc.damaged is None
    ids, texts, lines, rejects, skipped = [], [], [], [], {}
    expect = 2
    for first, n, start, end in sc.chunks:
        assert first == expect and n <= chunk
        expect += n
        b = parse_csv_block(data[start:end], first, "f", kind, sc.header, rules=rules)
        ids += b.ids
        texts += b.texts
        lines += b.lines
        rejects += b.rejects
        for k, v in b.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    assert sc.rows == expect - 2
    return sc, ids, texts, lines, rejects, skipped


@pytest.mark.parametrize(("kind", "delimiter"), [("csv", ","), ("tsv", "\t")])
@pytest.mark.parametrize("terminator", ["\r\n", "\n"])
@pytest.mark.parametrize(("chunk", "block"), [(1, 5), (4, 64), (1000, 1 << 22)])
def test_quoted_newlines_any_block_boundary(kind, delimiter, terminator, chunk, block, monkeypatch) -> None:
    data = write(ROWS, delimiter, terminator)
    sc, ids, texts, lines, rejects, _ = read_all(data, kind, chunk, block, monkeypatch)
    assert sc.header == ["_id", "text"]
    assert not rejects
    assert ids == [r[0] for r in ROWS] and texts == [r[1] for r in ROWS]
    assert lines == list(range(2, 2 + len(ROWS)))  # row numbers: the header is row 1


def test_rejects_with_row_numbers_blank_rows_and_no_final_newline(monkeypatch) -> None:
    data = (
        b"\xef\xbb\xbf_id,text,lang\n"
        b"a,first,en\n"
        b"\n"
        b",no id,en\n"
        b"c,,en\n"
        b"d,too,many,cells\n"
        b"e\n"
        b'f,"bad "quote" inside",en\n'
        b"g,\xff\xfe not utf-8,en\n"
        b"h,bonjour,fr\n"
        b'i,"last, no final newline",en'
    )
    sc, ids, texts, lines, rejects, skipped = read_all(data, "csv", 3, 7, monkeypatch, Rules(langs=("en",)))
    assert sc.header == ["_id", "text", "lang"]  # BOM stripped
    assert ids == ["a", "i"] and texts == ["first", "last, no final newline"] and lines == [2, 11]
    assert [(r.line, r.reason.split(":")[0]) for r in rejects] == [
        (4, "invalid id ''"),
        (5, "text is empty"),
        (6, "row has 4 cells, the header has 3"),
        (7, "row has 1 cells, the header has 3"),
        (8, "malformed CSV"),
        (9, "invalid UTF-8"),
    ]
    assert skipped == {"lang": 1}


def test_unbalanced_quote_is_damage_after_the_last_whole_chunk() -> None:
    data = b'_id,text\n1,one\n2,two\n3,"never closed\n4,four\n'
    sc = scan_csv(io.BytesIO(data).read, 2, "csv", "f.csv")
    assert sc.damaged is not None and "row 4" in sc.damaged and "never closed" in sc.damaged
    assert sc.chunks[0][:2] == (2, 2)


def test_header_only_and_empty_file() -> None:
    sc = scan_csv(io.BytesIO(b"_id,text\n").read, 10, "csv", "f")
    assert (sc.header, sc.chunks, sc.rows) == (["_id", "text"], [], 0)
    sc = scan_csv(io.BytesIO(b"_id,text").read, 10, "csv", "f")
    assert (sc.header, sc.chunks) == (["_id", "text"], [])
    with pytest.raises(InputError, match="empty file"):
        scan_csv(io.BytesIO(b"").read, 10, "csv", "f")


def test_missing_column_names_the_columns() -> None:
    with pytest.raises(InputError, match=r"no column 'text' \(columns: id, body\)"):
        parse_csv_block(b"1,x\n", 2, "f", "csv", ["id", "body"], id_field="id")


def test_long_text_over_the_csv_module_default_limit(monkeypatch) -> None:
    long = "word " * 60_000  # 300,000 characters: over the csv module's 131,072 default
    data = write([("1", long)])
    _, ids, texts, *_ = read_all(data, "csv", 10, 1 << 22, monkeypatch)
    assert ids == ["1"] and texts == [long]
