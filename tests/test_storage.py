"""storage: local paths keep their fast path; s3:// (a local moto server) and fsspec URIs work the same way;
the local engine runs, resumes and restarts with input, shards and markers on S3."""

from __future__ import annotations

import gzip
import hashlib
import os

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest
import zstandard

from tweet_embed import storage
from tweet_embed.backends import Backend, make_backend
from tweet_embed.embed.chunks import WorkDirs, done_markers, make_plan
from tweet_embed.embed.runner import EmbedOptions, run_embed
from tweet_embed.embed.status import run_status
from tweet_embed.input.records import InputError, check_input_path, read_range
from tweet_embed.testing.server import TEIServer, expected_vectors

from conftest import moto_s3

DIM = 8


@pytest.fixture(scope="module")
def s3():
    with moto_s3("store") as fs:
        yield fs


def corpus(n: int) -> tuple[bytes, list[tuple[str, str]]]:
    rows = [(f"id{i}", f"tweet {i} about the weather and the match") for i in range(n)]
    lines = [orjson.dumps({"_id": i, "text": t}) for i, t in rows]
    lines.insert(5, b'{"_id": "x", "text": ""}')
    return b"\n".join(lines) + b"\n", rows


def test_uri_helpers(tmp_path) -> None:
    assert storage.is_uri("s3://b/k") and storage.is_uri("gs://b/k") and storage.is_uri("az://c/k")
    assert not storage.is_uri("/x/y") and not storage.is_uri("rel/x") and not storage.is_uri("file:///x")
    assert storage.local_path("file:///x/y") == "/x/y"
    assert storage.absolute("s3://b/k") == "s3://b/k" and storage.absolute("rel") == os.path.abspath("rel")
    assert storage.join("s3://b/run/", "shards", "p.parquet") == "s3://b/run/shards/p.parquet"
    d = WorkDirs.from_options("s3://b/run", None, None, None)
    assert d.shards == "s3://b/run/shards" and d.progress == "s3://b/run/progress"
    assert not storage.is_uri(d.tmp) and os.path.isabs(d.tmp)  # staging is always local


def test_local_operations(tmp_path) -> None:
    d = str(tmp_path / "d")
    storage.makedirs(d)
    p = os.path.join(d, "a.json")
    assert storage.read_bytes(p) is None and not storage.exists(p)
    storage.write_bytes(p, b"{}")
    assert storage.read_bytes(p) == b"{}" and storage.exists(p) and storage.stat(p)[0] == 2
    assert storage.list_names(d) == ["a.json"] and storage.list_names(str(tmp_path / "none")) == []
    src = tmp_path / "src.bin"
    src.write_bytes(b"shard")
    storage.upload_file(str(src), os.path.join(d, "b.bin"))
    assert not src.exists() and sorted(storage.list_names(d)) == ["a.json", "b.bin"]
    assert storage.delete(p) and not storage.delete(p)
    assert not [n for n in os.listdir(d) if n.startswith(".")]


def test_s3_operations_and_input(tmp_path, s3) -> None:
    base = "s3://store/ops"
    assert storage.read_bytes(f"{base}/missing") is None and storage.list_names(f"{base}/none") == []
    storage.write_bytes(f"{base}/m/one.done", b"1")
    storage.write_bytes(f"{base}/m/two.done", b"22")
    storage.write_bytes(f"{base}/m/sub/deeper.done", b"333")
    assert sorted(storage.list_names(f"{base}/m")) == ["one.done", "two.done"]  # files directly inside only
    assert storage.stat(f"{base}/m/two.done")[0] == 2 and storage.exists(f"{base}/m/one.done")
    src = tmp_path / "shard.parquet"
    src.write_bytes(b"x" * 100_000)
    storage.upload_file(str(src), f"{base}/shards/p.parquet")
    assert not src.exists() and storage.stat(f"{base}/shards/p.parquet")[0] == 100_000
    assert storage.delete(f"{base}/m/one.done") and not storage.exists(f"{base}/m/one.done")
    assert not storage.delete(f"{base}/m/one.done")
    with pytest.raises(InputError, match="not found"):
        check_input_path(f"{base}/nothing.jsonl")

    data, _ = corpus(3000)
    for name, blob in (
        ("in.jsonl", data),
        ("in.jsonl.gz", gzip.compress(data)),
        ("in.jsonl.zst", zstandard.ZstdCompressor().compress(data)),
    ):
        with s3.open_output_stream(f"store/input/{name}", compression=None) as out:
            out.write(blob)
        (tmp_path / name).write_bytes(blob)
        uri = f"s3://store/input/{name}"
        assert read_range(uri, 1000, 5000) == data[1000:5000]
        remote, local = make_plan([uri], 700), make_plan([str(tmp_path / name)], 700)
        assert remote.chunks == local.chunks, name
        assert remote.files[0].fingerprint == local.files[0].fingerprint, (
            name,
            remote.files[0].size,
            local.files[0].size,
        )


def test_fsspec_fallback_for_schemes_pyarrow_lacks() -> None:
    pytest.importorskip("fsspec")
    uri = "memory://tweet-embed-test/dir"
    storage.write_bytes(f"{uri}/a.done", b"abc")
    assert storage.read_bytes(f"{uri}/a.done") == b"abc"
    assert storage.list_names(uri) == ["a.done"]
    assert storage.delete(f"{uri}/a.done") and storage.read_bytes(f"{uri}/a.done") is None


def test_local_engine_on_s3_resumes_and_restarts(tmp_path, s3) -> None:
    data, rows = corpus(640)
    with s3.open_output_stream("store/in/tweets.jsonl.gz", compression=None) as out:
        out.write(gzip.compress(data))
    work = "s3://store/runs/local"

    def opts(**kw: object) -> EmbedOptions:
        return EmbedOptions(
            inputs=["s3://store/in/tweets.jsonl.gz"],
            dirs=WorkDirs.from_options(work, str(tmp_path / "stage"), None, None),
            chunk_lines=100,
            log_interval=60,
            **kw,
        )  # type: ignore[arg-type]

    with TEIServer(dim=DIM, max_client_batch_size=16) as srv:

        def tei() -> Backend:
            return make_backend([srv.embed_url])

        s1 = run_embed(opts(max_chunks=3), tei)
        assert s1.chunks_done_now == 3
        s2 = run_embed(opts(), tei)
        assert (
            s2.chunks_skipped == 3
            and s2.chunks_done_now == 4
            and s1.rows + s2.rows == 640
            and s2.rejected == 1
        )
        texts = srv.embedded
        assert all(texts[t] == 1 for _, t in rows)  # the resume sent nothing twice
        dirs = WorkDirs.from_options(work, None, None, None)
        markers = done_markers(dirs)
        assert len(markers) == 7
        report, code = run_status(dirs)
        assert code == 0 and "chunks: 7 / 7 done" in report and "rejected: 1" in report
        fs, inner = storage.resolve(f"{work}/shards")
        names = sorted(storage.list_names(f"{work}/shards"))
        ids: list[str] = []
        vecs = []
        for n in names:
            t = pq.read_table(f"{inner}/{n}", filesystem=fs)
            ids += t.column("id").to_pylist()
            vecs.append(np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(t.num_rows, -1))
            with fs.open_input_file(f"{inner}/{n}") as fh:
                assert hashlib.sha256(fh.read()).hexdigest() == markers[n[:-8]].sha256
        assert ids == [i for i, _ in rows]
        np.testing.assert_array_equal(np.concatenate(vecs), expected_vectors([t for _, t in rows], DIM))
        rejects = storage.read_bytes(f"{work}/progress/rejects.jsonl")
        assert rejects is not None and orjson.loads(rejects.splitlines()[0])["line"] == 6
        # --restart forgets the run on the object store too
        s3_before = len(storage.list_names(f"{work}/shards"))
        s3r = run_embed(opts(restart=True, max_chunks=1), tei)
    assert s3_before == 7 and s3r.chunks_skipped == 0 and s3r.chunks_done_now == 1
    assert len(storage.list_names(f"{work}/shards")) == 1 and len(done_markers(dirs)) == 1
