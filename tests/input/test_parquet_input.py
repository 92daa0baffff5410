"""Parquet input: file/dir/glob expansion, row-group chunks, and the JSONL rules applied to Parquet rows."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tweet_embed.input.parquet import (
    check_parquet_columns,
    expand_parquet_inputs,
    is_parquet_spec,
    parquet_chunks,
    parquet_row_count,
    read_parquet_chunk,
)
from tweet_embed.input.records import InputError, parse_line


def write(path, ids, texts, row_group_size=None, id_name="_id", text_name="text", **extra_cols):  # type: ignore[no-untyped-def]
    cols = {id_name: ids, text_name: texts, **extra_cols}
    pq.write_table(pa.table(cols), str(path), row_group_size=row_group_size)
    return str(path)


def test_expand_file_dir_and_glob(tmp_path):
    for name in ("b.parquet", "a.parquet", ".hidden.parquet", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.parquet").write_bytes(b"x")
    assert expand_parquet_inputs(str(tmp_path)) == [str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]
    assert expand_parquet_inputs(str(tmp_path / "*.parquet")) == [
        str(tmp_path / "a.parquet"),
        str(tmp_path / "b.parquet"),
    ]
    assert expand_parquet_inputs(str(tmp_path / "a.parquet")) == [str(tmp_path / "a.parquet")]
    assert (
        is_parquet_spec(str(tmp_path)) and is_parquet_spec("x/*.parquet") and not is_parquet_spec("t.jsonl")
    )


@pytest.mark.parametrize("spec", ["missing.parquet", "nothing-*.parquet", "emptydir"])
def test_expand_nothing_is_a_clear_error(tmp_path, spec):
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(InputError, match="not found|no files match|no .parquet files"):
        expand_parquet_inputs(str(tmp_path / spec))


def test_chunks_follow_row_groups_without_reading_data(tmp_path):
    path = write(tmp_path / "t.parquet", [str(i) for i in range(100)], ["x"] * 100, row_group_size=10)
    assert parquet_chunks(path, 25) == [(0, 20), (20, 20), (40, 20), (60, 20), (80, 20)]
    assert parquet_chunks(path, 10) == [(i, 10) for i in range(0, 100, 10)]
    assert parquet_chunks(path, 1000) == [(0, 100)]
    # a row group larger than a chunk is cut into equal parts
    big = write(tmp_path / "big.parquet", [str(i) for i in range(100)], ["x"] * 100, row_group_size=100)
    assert parquet_chunks(big, 30) == [(0, 25), (25, 25), (50, 25), (75, 25)]
    assert parquet_chunks(big, 30) == parquet_chunks(big, 30)  # deterministic
    assert parquet_row_count(big) == 100


def test_chunks_cover_every_row_once_with_uneven_groups(tmp_path):
    path = str(tmp_path / "u.parquet")
    schema = pa.schema([("_id", pa.string()), ("text", pa.string())])
    with pq.ParquetWriter(path, schema) as w:
        start = 0
        for n in (3, 17, 1, 40, 9, 0, 2):
            w.write_table(
                pa.table({"_id": [str(i) for i in range(start, start + n)], "text": ["t"] * n}, schema=schema)
            )
            start += n
    for size in (1, 5, 16, 20, 100):
        chunks = parquet_chunks(path, size)
        assert all(0 < n <= size for _, n in chunks)
        seen = []
        for s, n in chunks:
            ids, _, _ = read_parquet_chunk(path, s, n)
            seen += ids
        assert seen == [str(i) for i in range(72)]


def test_empty_file_has_no_chunks(tmp_path):
    path = write(tmp_path / "e.parquet", pa.array([], pa.string()), pa.array([], pa.string()))
    assert parquet_chunks(path, 10) == []


def test_rows_follow_the_jsonl_rules(tmp_path):
    ids = ["a", None, "", "d", "e", "f", "g"]
    texts = ["hello", "no id", "empty id", None, "", "caf\u00e9 \U0001f600", "ok"]
    path = write(tmp_path / "r.parquet", ids, texts, row_group_size=3)
    got_ids, got_texts, rejects = read_parquet_chunk(path, 0, 7, file_label="r.parquet")
    assert got_ids == ["a", "f", "g"] and got_texts == ["hello", "caf\u00e9 \U0001f600", "ok"]
    assert [(r.file, r.line, r.reason) for r in rejects] == [
        ("r.parquet", 2, "invalid id None"),
        ("r.parquet", 3, "invalid id ''"),
        ("r.parquet", 4, "text is null"),
        ("r.parquet", 5, "text is empty"),
    ]
    assert '"text":"no id"' in rejects[0].snippet
    # the same rows as JSON get the same verdicts from records.parse_line
    import orjson

    for i, (rid, text) in enumerate(zip(ids, texts, strict=True)):
        verdict = parse_line(orjson.dumps({"_id": rid, "text": text}))
        rej = [r for r in rejects if r.line == i + 1]
        assert (verdict == rej[0].reason) if rej else verdict == (rid, text)


def test_integer_ids_and_chosen_columns(tmp_path):
    path = write(
        tmp_path / "i.parquet",
        [1, 2**62, 3],
        ["x", "y", "z"],
        id_name="tweet_id",
        text_name="full_text",
        other=[1.0, 2.0, 3.0],
    )
    ids, texts, rejects = read_parquet_chunk(path, 1, 2, id_field="tweet_id", text_field="full_text")
    assert ids == [str(2**62), "3"] and texts == ["y", "z"] and rejects == []


def test_text_column_that_is_not_a_string(tmp_path):
    path = write(tmp_path / "n.parquet", ["a", "b"], [1, None])
    ids, _, rejects = read_parquet_chunk(path, 0, 2)
    assert ids == [] and [r.reason for r in rejects] == ["text is not a string (a int)", "text is null"]
    assert parse_line(b'{"_id": "a", "text": 1}') == "text is not a string (a int)"


def test_float_ids_are_rejected_as_in_json(tmp_path):
    path = write(tmp_path / "f.parquet", [1.5, 2.0], ["a", "b"])
    ids, _, rejects = read_parquet_chunk(path, 0, 2)
    assert ids == [] and rejects[0].reason == "invalid id 1.5"


def test_reads_only_the_needed_row_groups(tmp_path, monkeypatch):
    path = write(tmp_path / "g.parquet", [str(i) for i in range(50)], ["t"] * 50, row_group_size=10)
    calls = []
    real = pq.ParquetFile.read_row_groups

    def spy(self, row_groups, columns=None, **kw):  # type: ignore[no-untyped-def]
        calls.append((list(row_groups), list(columns)))
        return real(self, row_groups, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    ids, _, _ = read_parquet_chunk(path, 15, 10)
    assert ids == [str(i) for i in range(15, 25)]
    assert calls == [([1, 2], ["_id", "text"])]


def test_missing_column_names_the_columns_present(tmp_path):
    path = write(tmp_path / "c.parquet", ["a"], ["x"], id_name="id")
    with pytest.raises(InputError, match=r"no column '_id' \(columns: id, text\)"):
        read_parquet_chunk(path, 0, 1)
    with pytest.raises(InputError, match=r"no column 'body' \(columns: id, text\)"):
        check_parquet_columns(path, "id", "body")
    check_parquet_columns(path, "id", "text")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "bad-pages"])
def test_corrupt_parquet_is_a_clear_error(tmp_path, damage):
    good = write(
        tmp_path / "ok.parquet", [str(i) for i in range(1000)], [f"text {i}" * 5 for i in range(1000)]
    )
    data = open(good, "rb").read()
    bad = tmp_path / "bad.parquet"
    if damage == "garbage":
        bad.write_bytes(b"this is not parquet at all" * 10)
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    else:  # footer intact, data pages overwritten
        bad.write_bytes(data[:4] + b"\xff" * (len(data) // 2) + data[4 + len(data) // 2 :])
    with pytest.raises(InputError, match="bad.parquet"):
        for s, n in parquet_chunks(str(bad), 100):
            read_parquet_chunk(str(bad), s, n)


def test_rows_beyond_the_file_are_an_error(tmp_path):
    path = write(tmp_path / "s.parquet", ["a"], ["x"])
    with pytest.raises(InputError, match="changed or replaced"):
        read_parquet_chunk(path, 0, 2)


def test_bigquery_style_export_directory(tmp_path):
    """The shape of ``EXPORT DATA OPTIONS(format='PARQUET')``: many files, INT64 ids, nullable strings."""
    d = tmp_path / "export"
    d.mkdir()
    expected = []
    for f in range(3):
        ids = list(range(f * 100, f * 100 + 100))
        texts = [None if i % 17 == 0 else f"tweet {i}" for i in ids]
        pq.write_table(
            pa.table({"id": pa.array(ids, pa.int64()), "text": pa.array(texts, pa.string())}),
            str(d / f"tweets-{f:012d}.parquet"),
            row_group_size=30,
        )
        expected += [str(i) for i, t in zip(ids, texts, strict=True) if t is not None]
    got, rejected = [], 0
    for path in expand_parquet_inputs(str(d)):
        for s, n in parquet_chunks(path, 64):
            ids, _, rejects = read_parquet_chunk(
                path, s, n, id_field="id", text_field="text", file_label=os.path.basename(path)
            )
            got += ids
            rejected += len(rejects)
    assert got == expected and rejected == 300 - len(expected)


def test_embed_command_stops_on_a_corrupt_parquet_file_naming_it(tmp_path, capfd):
    """Integration: `tweet-embed embed DIR` with one damaged file among good ones is a clear error."""
    from tweet_embed import cli

    d = tmp_path / "export"
    d.mkdir()
    write(d / "000.parquet", ["a", "b"], ["x", "y"])
    (d / "001.parquet").write_bytes(b"PAR1 not really parquet PAR1")
    code = cli.main(["embed", str(d), "--work-dir", str(tmp_path / "w")])
    assert code != 0
    err = capfd.readouterr().err
    assert "001.parquet" in err and "not a readable Parquet file" in err


def test_embed_run_names_a_missing_column(tmp_path):
    """Integration through the run loop (a fake model): the error names the column and those present."""
    from tweet_embed.embed.chunks import WorkDirs
    from tweet_embed.embed.runner import EmbedOptions, run_embed

    from conftest import CountingBackend

    d = tmp_path / "export"
    d.mkdir()
    write(d / "000.parquet", ["a", "b"], ["x", "y"], id_name="id")
    o = EmbedOptions(inputs=[str(d)], dirs=WorkDirs.from_options(str(tmp_path / "w"), None, None, None))
    with pytest.raises(InputError, match=r"000.parquet: no column '_id' \(columns: id, text\)"):
        run_embed(o, lambda: CountingBackend())


def test_filters_on_parquet_rows_use_the_lang_column(tmp_path) -> None:
    from tweet_embed.embed.chunks import make_plan
    from tweet_embed.embed.worker import read_parquet_block
    from tweet_embed.input.rules import Rules

    path = str(tmp_path / "f.parquet")
    table = pa.table(
        {
            "_id": [str(i) for i in range(8)],
            "text": [
                "hello world",
                "RT @a: hi there",
                "ok",
                "bonjour monde",
                "hola mundo",
                None,
                "fine text",
                "x",
            ],
            "lang": ["en", "en", "en", "fr", "es", "en", "en", None],
        }
    )
    pq.write_table(table, path, row_group_size=3)
    plan = make_plan([path], 5)
    rules = Rules(langs=("en", "es"), skip_retweets=True, min_chars=3)
    ids, skipped, rejects = [], {}, []
    for c in plan.chunks:
        b = read_parquet_block(plan.files[0], c, "_id", "text", rules)
        ids += list(zip(b.ids, b.lines, strict=True))
        rejects += [(r.line, r.reason) for r in b.rejects]
        for k, v in b.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    assert ids == [("0", 1), ("4", 5), ("6", 7)]
    assert rejects == [(6, "text is null")]
    assert skipped == {"retweet": 1, "short": 1, "lang": 2}
