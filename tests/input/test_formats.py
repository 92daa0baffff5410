"""Format detection from content, --format checked against it, and clear errors for what a file is not."""

from __future__ import annotations

import gzip
import json

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from tweet_embed.input.formats import detect
from tweet_embed.input.records import InputError
from tweet_objects import V1_SHORT, V2_INCLUDES, V2_SHORT

PLAIN = [{"_id": str(i), "text": f"t{i}"} for i in range(5)]


def jsonl(rows) -> bytes:
    return b"".join(orjson.dumps(r) + b"\n" for r in rows)


CASES = {
    "lines.jsonl": (jsonl(PLAIN), "jsonl", False),
    "pretty.json": (json.dumps(PLAIN, indent=2).encode(), "json", False),
    "one-line-array.json": (json.dumps(PLAIN).encode(), "json", False),
    "array-first-line.jsonl": (b'["an", "array"]\n' + jsonl(PLAIN), "jsonl", False),
    "v1.jsonl": (jsonl([{"delete": {"status": {"id_str": "1"}}}, V1_SHORT]), "jsonl", True),
    "v1.json": (json.dumps([V1_SHORT] * 3).encode(), "json", True),
    "v2.jsonl": (jsonl([V2_SHORT]), "jsonl", True),
    "twarc2.jsonl": (jsonl([{"data": [V2_SHORT], "includes": V2_INCLUDES, "meta": {}}]), "twarc2", False),
    "t.csv": (b"_id,text\n1,hello\n", "csv", False),
    "t.tsv": (b"_id\ttext\n1\thello, world\n", "tsv", False),
    "no-suffix": (b"\xef\xbb\xbf  [\n" + jsonl(PLAIN).replace(b"\n", b",\n")[:-2] + b"]", "json", False),
    "empty.jsonl": (b"", "jsonl", False),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("compression", ["", ".gz", ".zst"])
def test_detected_from_content(tmp_path, name, compression) -> None:
    data, kind, tweets = CASES[name]
    p = tmp_path / (name + compression)
    if compression == ".gz":
        data = gzip.compress(data)
    elif compression == ".zst":
        data = zstandard.ZstdCompressor().compress(data)
    p.write_bytes(data)
    found = detect(str(p))
    assert (found.kind, found.tweets) == (kind, tweets)


def test_parquet_without_its_suffix_is_found_by_its_magic(tmp_path) -> None:
    p = tmp_path / "export-000"
    pq.write_table(pa.table({"_id": ["1"], "text": ["x"]}), p)
    assert detect(str(p)).kind == "parquet"
    with pytest.raises(InputError, match="is a Parquet file, not JSON Lines: use --format parquet"):
        detect(str(p), "jsonl")


@pytest.mark.parametrize(
    ("name", "forced", "message"),
    [
        ("pretty.json", "jsonl", "looks like a JSON array, not JSON Lines: use --format json"),
        ("lines.jsonl", "json", "looks like JSON Lines, not a JSON array: use --format jsonl"),
        ("lines.jsonl", "csv", "looks like JSON Lines, not CSV: use --format jsonl"),
        ("t.csv", "jsonl", "looks like CSV, not JSON Lines: use --format csv"),
        ("lines.jsonl", "parquet", "is not a Parquet file"),
        ("twarc2.jsonl", "json", "looks like twarc2"),
        ("lines.jsonl", "twarc2", "looks like JSON Lines, not twarc2"),
    ],
)
def test_a_file_that_is_not_what_format_claims(tmp_path, name, forced, message) -> None:
    p = tmp_path / name
    p.write_bytes(CASES[name][0])
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        detect(str(p), forced)


def test_forcing_a_compatible_format_is_kept(tmp_path) -> None:
    p = tmp_path / "t.csv"
    p.write_bytes(b"_id\ttext\n1\thello\n")  # a TSV named .csv: the content decides, --format overrides
    assert detect(str(p)).kind == "tsv"
    assert detect(str(p), "csv").kind == "csv"
    q = tmp_path / "v.jsonl"
    q.write_bytes(jsonl([V1_SHORT]))
    assert (detect(str(q), "jsonl").kind, detect(str(q), "jsonl").tweets) == ("jsonl", True)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (gzip.compress(b'{"_id": 1}\n'), r"is gzip-compressed: name it .*\.gz"),
        (zstandard.ZstdCompressor().compress(b'{"_id": 1}\n'), r"is zstd-compressed: name it .*\.zst"),
        (b"PK\x03\x04" + b"\x00" * 100, "is a ZIP archive: unpack it first"),
        ('{"_id": 1, "text": "x"}\n'.encode("utf-16"), "UTF-16"),
        (bytes(range(256)) * 50, "binary file"),
        (b"just some words\nand more\n", "format not recognised"),
    ],
)
def test_binary_compressed_or_unknown_is_a_clear_error(tmp_path, data, message) -> None:
    p = tmp_path / "input.jsonl"
    p.write_bytes(data)
    with pytest.raises(InputError, match=message):
        detect(str(p))


def test_one_bad_line_in_a_text_file_is_not_a_binary_file(tmp_path) -> None:
    p = tmp_path / "t.jsonl"
    p.write_bytes(jsonl(PLAIN) + b'{"_id": "x", "text": "\xff\xfe"}\n' + jsonl(PLAIN))
    assert detect(str(p)).kind == "jsonl"


def test_a_first_line_longer_than_the_sample_is_read_whole(tmp_path) -> None:
    """A twarc2 full-archive page (500 tweets with includes) can be several MiB on one line."""
    tweets = [{**V2_SHORT, "id": str(k), "text": "x" * 3000} for k in range(500)]
    line = orjson.dumps({"data": tweets, "includes": V2_INCLUDES, "meta": {"result_count": 500}})
    assert len(line) > 1 << 20
    p = tmp_path / "page.jsonl.gz"
    p.write_bytes(gzip.compress(line + b"\n" + line + b"\n"))
    assert detect(str(p)).kind == "twarc2"
    q = tmp_path / "long.jsonl"
    q.write_bytes(orjson.dumps({**V1_SHORT, "text": "y" * (2 << 20)}) + b"\n")
    assert (detect(str(q)).kind, detect(str(q)).tweets) == ("jsonl", True)
