"""The run loop with a fake model that counts batches: exactly once, resume, dedupe, refusals, manifest."""

from __future__ import annotations

import glob
import os
from collections import Counter

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from tweet_embed.embed.chunks import PlanError, WorkDirs
from tweet_embed.embed.runner import EmbedOptions, run_embed
from tweet_embed.parquet import read_metadata

from conftest import CountingBackend, text_vector


def corpus(path, n: int, repeat_every: int = 0) -> dict[str, str]:
    rows = {}
    with open(path, "wb") as fh:
        for i in range(n):
            text = f"tweet number {i % repeat_every if repeat_every else i} about things"
            rows[f"id{i}"] = text
            fh.write(orjson.dumps({"_id": f"id{i}", "text": text}) + b"\n")
    return rows


def read_shards(shards: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for p in sorted(glob.glob(os.path.join(shards, "part-*.parquet"))):
        t = pq.read_table(p)
        ids = t.column("id").to_pylist()
        vecs = np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(len(ids), -1)
        for i, v in zip(ids, vecs, strict=True):
            assert i not in out, f"id {i} written twice"
            out[i] = v
    return out


def opts(tmp_path, inputs, **kw) -> EmbedOptions:
    return EmbedOptions(
        inputs=[str(p) for p in inputs],
        dirs=WorkDirs.from_options(str(tmp_path / "w"), None, None, None),
        chunk_lines=kw.pop("chunk_lines", 50),
        log_interval=kw.pop("log_interval", 60),
        **kw,
    )


def test_clean_run_every_id_once_with_its_own_vector(tmp_path) -> None:
    rows = corpus(tmp_path / "in.jsonl", 523)
    be = CountingBackend()
    s = run_embed(opts(tmp_path, [tmp_path / "in.jsonl"]), lambda: be)
    assert s.rows == 523 and s.chunks_done_now == 11 and s.rejected == 0
    out = read_shards(str(tmp_path / "w" / "shards"))
    assert set(out) == set(rows)
    for i, text in rows.items():
        np.testing.assert_allclose(out[i], text_vector(text, 8), rtol=1e-6)
    assert max(be.texts.values()) == 1
    md = read_metadata(glob.glob(str(tmp_path / "w" / "shards" / "*.parquet"))[0])
    assert md["model"] == "fake/counting" and md["dim"] == "8" and md["normalize"] == "true"


def test_resume_embeds_nothing_twice(tmp_path) -> None:
    rows = corpus(tmp_path / "in.jsonl", 400)
    be = CountingBackend()
    s1 = run_embed(opts(tmp_path, [tmp_path / "in.jsonl"], max_chunks=3), lambda: be)
    assert s1.chunks_done_now == 3
    s2 = run_embed(opts(tmp_path, [tmp_path / "in.jsonl"]), lambda: be)
    assert s2.chunks_skipped == 3 and s2.chunks_done_now == 5
    assert sum(be.texts.values()) == 400 and max(be.texts.values()) == 1
    assert set(read_shards(str(tmp_path / "w" / "shards"))) == set(rows)
    before = be.batches
    s3 = run_embed(opts(tmp_path, [tmp_path / "in.jsonl"]), lambda: be)
    assert s3.chunks_done_now == 0 and be.batches == before


def test_shard_without_marker_is_redone_and_marker_without_shard_too(tmp_path) -> None:
    corpus(tmp_path / "in.jsonl", 100)
    be = CountingBackend()
    run_embed(opts(tmp_path, [tmp_path / "in.jsonl"]), lambda: be)
    os.unlink(tmp_path / "w" / "progress" / "part-0000-0000000.done")
    os.unlink(tmp_path / "w" / "shards" / "part-0000-0000001.parquet")
    s = run_embed(opts(tmp_path, [tmp_path / "in.jsonl"]), lambda: be)
    assert s.chunks_done_now == 2
    assert len(read_shards(str(tmp_path / "w" / "shards"))) == 100


def test_dedupe_sends_each_text_once_per_run_across_chunks(tmp_path) -> None:
    rows = corpus(tmp_path / "in.jsonl", 200, repeat_every=10)
    be = CountingBackend()
    s = run_embed(opts(tmp_path, [tmp_path / "in.jsonl"], chunk_lines=30), lambda: be)
    assert s.rows == 200 and s.embedded_texts == 10 and s.distinct_texts == 10
    assert be.texts == Counter(set(rows.values()))  # each text once, though all 7 chunks hold it
    out = read_shards(str(tmp_path / "w" / "shards"))
    for i, text in rows.items():
        np.testing.assert_allclose(out[i], text_vector(text, 8), rtol=1e-6)


def test_no_dedupe_sends_every_row(tmp_path) -> None:
    corpus(tmp_path / "in.jsonl", 200, repeat_every=10)
    be = CountingBackend()
    s = run_embed(opts(tmp_path, [tmp_path / "in.jsonl"], chunk_lines=30, dedupe=False), lambda: be)
    assert s.rows == 200 and s.embedded_texts == 200 and sum(be.texts.values()) == 200
    assert not os.path.exists(tmp_path / "w" / "progress" / "dedupe")


def test_refused_text_refuses_its_repeats_in_later_chunks_without_resending(tmp_path) -> None:
    rows = corpus(tmp_path / "in.jsonl", 90, repeat_every=30)
    be = CountingBackend(refuse=[rows["id5"]])
    s = run_embed(opts(tmp_path, [tmp_path / "in.jsonl"], chunk_lines=20), lambda: be)
    assert s.rows == 87 and s.rejected == 3
    assert rows["id35"] == rows["id5"] and rows["id5"] not in be.texts
    assert sum(be.texts.values()) == 29  # the 29 other distinct texts, once each
    rejects = [orjson.loads(x) for x in open(s.rejects_file, "rb")]
    assert [r["line"] for r in rejects] == [6, 36, 66]
    assert all("refused" in r["reason"] for r in rejects)


def test_refused_text_becomes_a_reject_with_its_line(tmp_path) -> None:
    rows = corpus(tmp_path / "in.jsonl", 60)
    with open(tmp_path / "in.jsonl", "ab") as fh:
        fh.write(b'{"_id": "x", "text": null}\n')
    be = CountingBackend(refuse=[rows["id17"]])
    s = run_embed(opts(tmp_path, [tmp_path / "in.jsonl"]), lambda: be)
    assert s.rows == 59 and s.rejected == 2
    out = read_shards(str(tmp_path / "w" / "shards"))
    assert "id17" not in out and len(out) == 59
    rejects = [orjson.loads(x) for x in open(s.rejects_file, "rb")]
    assert [(r["line"], r["reason"][:20]) for r in rejects] == [
        (18, "server refused the t"),
        (61, "text is null"),
    ]
    assert rejects[0]["file"].endswith("in.jsonl")


def test_other_model_is_refused_and_restart_starts_over(tmp_path) -> None:
    corpus(tmp_path / "in.jsonl", 100)
    run_embed(opts(tmp_path, [tmp_path / "in.jsonl"], max_chunks=1), lambda: CountingBackend())
    with pytest.raises(PlanError, match="dim"):
        run_embed(opts(tmp_path, [tmp_path / "in.jsonl"]), lambda: CountingBackend(dim=4))
    s = run_embed(opts(tmp_path, [tmp_path / "in.jsonl"], restart=True), lambda: CountingBackend(dim=4))
    assert s.chunks_done_now == 2 and s.chunks_skipped == 0
    assert all(len(v) == 4 for v in read_shards(str(tmp_path / "w" / "shards")).values())


def test_separate_directories(tmp_path) -> None:
    corpus(tmp_path / "in.jsonl", 120)
    dirs = WorkDirs(
        str(tmp_path / "nvme" / "tmp"), str(tmp_path / "nvme" / "progress"), str(tmp_path / "ssd")
    )
    o = EmbedOptions(inputs=[str(tmp_path / "in.jsonl")], dirs=dirs, chunk_lines=50, log_interval=60)
    run_embed(o, lambda: CountingBackend())
    assert sorted(os.listdir(tmp_path / "ssd")) == [f"part-0000-000000{i}.parquet" for i in range(3)]
    assert os.listdir(tmp_path / "nvme" / "tmp") == []
    assert len(glob.glob(str(tmp_path / "nvme" / "progress" / "*.done"))) == 3


def test_several_files_and_a_batch_larger_than_chunks(tmp_path) -> None:
    a = corpus(tmp_path / "a.jsonl", 30)
    with open(tmp_path / "b.jsonl", "wb") as fh:
        fh.write(b'{"_id": "b1", "text": "hello"}\n')
    s = run_embed(
        opts(tmp_path, [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]), lambda: CountingBackend(max_batch=1000)
    )
    assert s.rows == 31
    assert set(read_shards(str(tmp_path / "w" / "shards"))) == set(a) | {"b1"}


def test_parquet_input_same_chunking_markers_and_rejects(tmp_path) -> None:
    import pyarrow as pa

    ids = [f"p{i}" for i in range(130)]
    texts: list[str | None] = [f"parquet text {i}" for i in range(130)]
    texts[5] = None
    texts[77] = ""
    d = tmp_path / "export"
    d.mkdir()
    pq.write_table(pa.table({"id": ids[:100], "body": texts[:100]}), d / "000.parquet", row_group_size=30)
    pq.write_table(pa.table({"id": ids[100:], "body": texts[100:]}), d / "001.parquet")
    be = CountingBackend()
    o = opts(tmp_path, [d], id_field="id", text_field="body")
    s = run_embed(o, lambda: be)
    assert s.rows == 128 and s.rejected == 2
    out = read_shards(str(tmp_path / "w" / "shards"))
    assert set(out) == set(ids) - {"p5", "p77"}
    np.testing.assert_allclose(out["p9"], text_vector("parquet text 9", 8), rtol=1e-6)
    rejects = [orjson.loads(x) for x in open(s.rejects_file, "rb")]
    assert [(r["line"], r["reason"]) for r in rejects] == [(6, "text is null"), (78, "text is empty")]
    again = run_embed(opts(tmp_path, [d], id_field="id", text_field="body"), lambda: be)
    assert again.chunks_done_now == 0 and sum(be.texts.values()) == 128


def test_directory_without_parquet_is_a_clear_error(tmp_path) -> None:
    from tweet_embed.input.records import InputError

    (tmp_path / "d").mkdir()
    with pytest.raises(InputError, match="input is a directory"):
        run_embed(opts(tmp_path, [tmp_path / "d"]), lambda: CountingBackend())
