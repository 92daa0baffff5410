"""Bad input through the real CLI: every case of the input table in docs/embedding.md has its outcome asserted here.

One corpus holds every line-level case (BOM, CRLF, blank lines, malformed JSON, arrays, odd ids and texts,
a 100,000-character text, lone surrogates, emoji and right-to-left scripts, a duplicated id, no final
newline); it is embedded as plain JSONL, gzip and zstd in one run. File-level cases (truncated gzip/zstd, a
missing file, a directory, an empty file) have their own tests.
"""

from __future__ import annotations

import glob
import gzip

import numpy as np
import orjson
import pytest
import zstandard

from tweet_embed.testing.server import TEIServer, expected_vectors
from tweet_embed.testing.synth import synth_tweets

from conftest import read_shards, run_cli

DIM = 16
LONG = "long text " * 10_000  # 100,000 characters
OID = "5f1d7a3b2c1e4a0012345678"

# (line bytes, outcome): outcome is ("embedded", id, text as embedded), ("rejected", reason prefix) or
# ("skipped",) for lines that are not records at all (blank). Line numbers are 1-based physical lines.
CASES: list[tuple[bytes, tuple[str, ...]]] = [
    (
        b'\xef\xbb\xbf{"_id": "bom", "text": "first line, after a UTF-8 BOM"}',
        ("embedded", "bom", "first line, after a UTF-8 BOM"),
    ),
    (b'{"_id": "crlf", "text": "a CRLF line end"}\r', ("embedded", "crlf", "a CRLF line end")),
    (b"", ("skipped",)),
    (b"   \t ", ("skipped",)),
    (b'{"_id": "bad-json", "text": ', ("rejected", "malformed JSON")),
    (b'{"_id": "x", "text": "unterminated}', ("rejected", "malformed JSON")),
    (b'["an", "array"]', ("rejected", "not a JSON object (a list)")),
    (b'"just a string"', ("rejected", "not a JSON object (a str)")),
    (b"[" * 5000 + b"]" * 5000, ("rejected", "malformed JSON: nested too deeply")),
    (b'{"text": "no id"}', ("rejected", "missing id field '_id'")),
    (b'{"_id": null, "text": "null id"}', ("rejected", "invalid id None")),
    (b'{"_id": "", "text": "empty id"}', ("rejected", "invalid id ''")),
    (b'{"_id": true, "text": "boolean id"}', ("rejected", "invalid id True")),
    (b'{"_id": 1.5, "text": "float id"}', ("rejected", "invalid id 1.5")),
    (b'{"_id": "\\udc00", "text": "id with a lone surrogate"}', ("rejected", "invalid id")),
    (
        b'{"_id": {"$oid": "' + OID.encode() + b'"}, "text": "mongoexport id"}',
        ("embedded", OID, "mongoexport id"),
    ),
    (b'{"_id": 12345, "text": "integer id"}', ("embedded", "12345", "integer id")),
    (
        b'{"_id": 123456789012345678901234567890, "text": "big integer id"}',
        ("embedded", "123456789012345678901234567890", "big integer id"),
    ),
    (
        b'{"_id": {"$numberLong": "9007199254740993"}, "text": "numberLong id"}',
        ("embedded", "9007199254740993", "numberLong id"),
    ),
    (b'{"_id": "empty", "text": ""}', ("rejected", "text is empty")),
    (b'{"_id": "null", "text": null}', ("rejected", "text is null")),
    (b'{"_id": "missing"}', ("rejected", "missing text field 'text'")),
    (b'{"_id": "number", "text": 5}', ("rejected", "text is not a string (a int)")),
    (b'{"_id": "list", "text": ["x"]}', ("rejected", "text is not a string (a list)")),
    (b'{"_id": "object", "text": {"a": 1}}', ("rejected", "text is not a string (a dict)")),
    (b'{"_id": "bad-utf8", "text": "caf\xe9"}', ("rejected", "invalid UTF-8")),
    (orjson.dumps({"_id": "long", "text": LONG}), ("embedded", "long", LONG)),
    (b'{"_id": "lone", "text": "lone \\ud83d surrogate"}', ("embedded", "lone", "lone \ufffd surrogate")),
    (
        b'{"_id": "pair", "text": "escaped pair \\ud83d\\ude00"}',
        ("embedded", "pair", "escaped pair \U0001f600"),
    ),
    (
        '{"_id": "rtl", "text": "مرحبا بالعالم 😀 שלום עולם"}'.encode(),
        ("embedded", "rtl", "مرحبا بالعالم 😀 שלום עולם"),
    ),
    (
        '{"_id": "combining", "text": " e\u0301 ZWJ 👩\u200d💻 "}'.encode(),
        ("embedded", "combining", " e\u0301 ZWJ 👩\u200d💻 "),
    ),
    (
        b'{"_id": "control", "text": "nul \\u0000 bell \\u0007 tab \\t"}',
        ("embedded", "control", "nul \x00 bell \x07 tab \t"),
    ),
    (
        b'{"_id": "extra", "text": "other fields ignored", "user": {"id": 1}, "lang": "en"}',
        ("embedded", "extra", "other fields ignored"),
    ),
    (b'{"_id": "dup", "text": "first of a duplicated id"}', ("embedded", "dup", "first of a duplicated id")),
    (
        b'{"_id": "dup", "text": "second of a duplicated id"}',
        ("embedded", "dup", "second of a duplicated id"),
    ),
    (
        b'{"_id": "last", "text": "the last line has no newline"}',
        ("embedded", "last", "the last line has no newline"),
    ),
]


def corpus_bytes() -> bytes:
    return b"\n".join(line for line, _ in CASES)  # no final newline


def read_output(paths: list[str]) -> tuple[list[str], np.ndarray]:
    ids, vecs, _ = read_shards(paths, DIM)
    return ids, vecs


@pytest.fixture(scope="module")
def server():
    with TEIServer(dim=DIM, max_client_batch_size=8) as srv:
        yield srv


def test_every_line_case_has_its_outcome_in_plain_gzip_and_zstd(tmp_path, server) -> None:
    data = corpus_bytes()
    plain, gz, zst = str(tmp_path / "c.jsonl"), str(tmp_path / "c.jsonl.gz"), str(tmp_path / "c.jsonl.zst")
    with open(plain, "wb") as fh:
        fh.write(data)
    with gzip.open(gz, "wb") as fh:
        fh.write(data)
    with open(zst, "wb") as fh:
        fh.write(zstandard.ZstdCompressor().compress(data))
    work = tmp_path / "w"
    # small chunks: line numbers, the BOM and CRLF must survive chunk boundaries
    r = run_cli(
        "embed", plain, gz, zst, "--tei-urls", server.embed_url, "--work-dir", str(work), "--chunk-size", "7"
    )
    assert r.returncode == 0, r.stderr

    embedded = [o for _, o in CASES if o[0] == "embedded"]
    rejected = [(i + 1, o[1]) for i, (_, o) in enumerate(CASES) if o[0] == "rejected"]
    n_chunks = -(-len(CASES) // 7)
    for fi, label in enumerate((plain, gz, zst)):
        shards = sorted(glob.glob(str(work / "shards" / f"part-{fi:04d}-*.parquet")))
        assert len(shards) == n_chunks
        ids, vecs = read_output(shards)
        assert ids == [o[1] for o in embedded], label
        # each vector is the server's vector of exactly the text in the outcome column
        np.testing.assert_array_equal(vecs, expected_vectors([o[2] for o in embedded], DIM))
    rejects = [orjson.loads(x) for x in open(work / "progress" / "rejects.jsonl", "rb")]
    assert len(rejects) == 3 * len(rejected)
    for label in (plain, gz, zst):
        mine = [x for x in rejects if x["file"] == label]
        assert [x["line"] for x in mine] == [line for line, _ in rejected]
        for x, (line, reason) in zip(mine, rejected, strict=True):
            assert x["reason"].startswith(reason), (line, x["reason"])
            assert x["reason"]  # every reject says why
            assert len(x["snippet"]) <= 200
    assert f"Rejected: {3 * len(rejected)} lines" in r.stderr
    assert f"Embedded {3 * len(embedded)} rows" in r.stderr


@pytest.mark.parametrize("kind", ["gz", "zst"])
def test_truncated_compressed_file_keeps_chunks_before_the_damage(tmp_path, server, kind) -> None:
    """A truncated .gz/.zst: every chunk before the damage is embedded, the other inputs too; the run exits 1
    naming the file and the line after which it is damaged; a re-run embeds nothing again and says the same."""
    records = list(synth_tweets(3000, seed=9))
    raw = b"".join(orjson.dumps({"_id": i, "text": t}) + b"\n" for i, t in records)
    comp = gzip.compress(raw) if kind == "gz" else zstandard.ZstdCompressor().compress(raw)
    bad = str(tmp_path / f"broken.jsonl.{kind}")
    with open(bad, "wb") as fh:
        fh.write(comp[: len(comp) * 6 // 10])
    good = str(tmp_path / "good.jsonl")
    with open(good, "wb") as fh:
        fh.write(raw[: raw.index(b"\n", 10_000) + 1])
    n_good = raw[: raw.index(b"\n", 10_000) + 1].count(b"\n")
    work = tmp_path / "w"
    args = [
        "embed",
        bad,
        good,
        "--tei-urls",
        server.embed_url,
        "--work-dir",
        str(work),
        "--chunk-size",
        "250",
    ]
    server.reset_counters()
    r = run_cli(*args)
    assert r.returncode == 1, r.stderr
    assert f"{bad}: damaged input" in r.stderr and "after line" in r.stderr
    ids, vecs = read_output(sorted(glob.glob(str(work / "shards" / "part-0000-*.parquet"))))
    assert 0 < len(ids) < 3000 and len(ids) % 250 == 0  # whole chunks before the damage
    assert ids == [i for i, _ in records[: len(ids)]]
    np.testing.assert_array_equal(vecs, expected_vectors([t for _, t in records[: len(ids)]], DIM))
    good_ids, _ = read_output(sorted(glob.glob(str(work / "shards" / "part-0001-*.parquet"))))
    assert good_ids == [i for i, _ in records[:n_good]]
    sent = server.counters["texts"]
    r2 = run_cli(*args)
    assert r2.returncode == 1 and f"{bad}: damaged input" in r2.stderr
    assert server.counters["texts"] == sent  # nothing embedded twice


def test_missing_file_is_a_clear_error_before_any_work(tmp_path, server) -> None:
    good = tmp_path / "good.jsonl"
    good.write_bytes(b'{"_id": "1", "text": "hello"}\n')
    missing = str(tmp_path / "nope.jsonl")
    r = run_cli(
        "embed", str(good), missing, "--tei-urls", server.embed_url, "--work-dir", str(tmp_path / "w")
    )
    assert r.returncode == 1
    assert f"input file not found: {missing}" in r.stderr
    assert "Traceback" not in r.stderr
    assert not glob.glob(str(tmp_path / "w" / "shards" / "*.parquet"))  # not even the good file


def test_directory_as_input_is_a_clear_error(tmp_path, server) -> None:
    d = tmp_path / "adir"
    d.mkdir()
    (d / "x.jsonl").write_bytes(b'{"_id": "1", "text": "hello"}\n')
    r = run_cli("embed", str(d), "--tei-urls", server.embed_url, "--work-dir", str(tmp_path / "w"))
    assert r.returncode == 1
    assert f"input is a directory, not a file: {d}" in r.stderr
    assert "Traceback" not in r.stderr
    assert not glob.glob(str(tmp_path / "w" / "shards" / "*.parquet"))


def test_empty_and_blank_only_files_embed_nothing_and_succeed(tmp_path, server) -> None:
    empty, blank = tmp_path / "empty.jsonl", tmp_path / "blank.jsonl"
    empty.write_bytes(b"")
    blank.write_bytes(b"\n\r\n  \n")
    r = run_cli(
        "embed", str(empty), str(blank), "--tei-urls", server.embed_url, "--work-dir", str(tmp_path / "w")
    )
    assert r.returncode == 0, r.stderr
    ids, _ = read_output(sorted(glob.glob(str(tmp_path / "w" / "shards" / "*.parquet"))))
    assert ids == []
    assert "Rejected: 0 lines" in r.stderr


def test_the_same_file_given_twice_is_a_clear_error(tmp_path, server) -> None:
    f = tmp_path / "t.jsonl"
    f.write_bytes(b'{"_id": "1", "text": "hello"}\n')
    r = run_cli("embed", str(f), str(f), "--tei-urls", server.embed_url, "--work-dir", str(tmp_path / "w"))
    assert r.returncode == 1
    assert f"input given twice: {f}" in r.stderr
    assert not glob.glob(str(tmp_path / "w" / "shards" / "*.parquet"))
