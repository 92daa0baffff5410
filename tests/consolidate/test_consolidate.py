"""consolidate: exactly once, bounded, deterministic, BigQuery layout; refusals with clear messages."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tweet_embed.consolidate import merge as C
from tweet_embed.parquet import file_sha256, make_table, write_table

from conftest import ROOT, run_cli

META = {
    "backend": "local",
    "model": "sentence-transformers/all-MiniLM-L6-v2",
    "dim": "16",
    "normalize": "true",
    "version": "0.1.0",
}


def vec(i: int, dim: int = 16) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(dim).astype(np.float32)


def write_shards(
    d: str, shards: list[list[str]], dim: int = 16, meta: dict[str, str] | None = None, seed_of=None
) -> list[np.ndarray]:
    """Write one shard per id list, named in input order; vector of row r in shard s is seeded by (s, r)."""
    os.makedirs(d, exist_ok=True)
    out = []
    for s, ids in enumerate(shards):
        v = (
            np.stack([vec(s * 100_000 + r, dim) for r in range(len(ids))])
            if ids
            else np.zeros((0, dim), np.float32)
        )
        md = dict(meta or META)
        md["dim"] = str(dim)
        write_table(make_table(ids, v, md), os.path.join(d, f"part-{s // 10:04d}-{s % 10:07d}.parquet"))
        out.append(v)
    return out


def read_out(out_dir: str) -> pa.Table:
    m = json.load(open(os.path.join(out_dir, "_manifest.json")))
    return pa.concat_tables([pq.read_table(os.path.join(out_dir, f["name"])) for f in m["files"]])


def test_rows_schema_metadata_and_readers(tmp_path):
    shards = str(tmp_path / "shards")
    ids = [[f"a{i}" for i in range(s * 50, s * 50 + 50)] for s in range(4)]
    vectors = write_shards(shards, ids)
    out = str(tmp_path / "out")
    res = C.consolidate(shards, out)
    m = res.manifest
    assert m["rows"] == 200 and m["source"]["rows"] == 200 and m["duplicates"]["rows_dropped"] == 0
    assert len(m["files"]) == 1
    path = os.path.join(out, m["files"][0]["name"])
    assert file_sha256(path) == m["files"][0]["sha256"]
    # 3-level LIST, id STRING, float elements, no dictionary on the vectors, zstd
    pschema = str(pq.ParquetFile(path).schema).replace("field_id=-1 ", "")
    assert "required binary id (String)" in pschema
    assert "embedding (List)" in pschema and "repeated group list" in pschema and "float element" in pschema
    col = pq.ParquetFile(path).metadata.row_group(0).column(1)
    assert col.path_in_schema == "embedding.list.element"
    assert col.compression == "ZSTD" and not col.has_dictionary_page
    t = pq.read_table(path)
    assert pa.types.is_list(t.schema.field("embedding").type)
    assert t.schema.metadata[b"tweet_embed.model"] == META["model"].encode()
    assert t.column("id").to_pylist() == [i for s in ids for i in s]
    np.testing.assert_array_equal(
        np.stack(t.column("embedding").to_numpy(zero_copy_only=False)), np.concatenate(vectors)
    )
    con = duckdb.connect()
    n, nd, lo, hi = con.execute(
        f"SELECT count(*), count(DISTINCT id), min(len(embedding)), max(len(embedding)) FROM read_parquet('{out}/*.parquet')"
    ).fetchone()
    assert (n, nd, lo, hi) == (200, 200, 16, 16)
    assert not [n for n in os.listdir(out) if n.startswith(".") and n not in (C.LOCK,)]  # staging removed


def test_duplicates_dropped_first_occurrence_wins(tmp_path):
    shards = str(tmp_path / "shards")
    ids = [["x1", "x2", "x3"], ["x4", "x2", "x5", "x5"], ["x1", "x6"]]
    vectors = write_shards(shards, ids)
    res = C.consolidate(shards, str(tmp_path / "out"))
    m = res.manifest
    assert m["rows"] == 6 and m["source"]["rows"] == 9
    assert m["duplicates"] == {"rows_dropped": 3, "ids": 3, "examples": ["x2", "x5", "x1"]}
    t = read_out(str(tmp_path / "out"))
    assert t.column("id").to_pylist() == ["x1", "x2", "x3", "x4", "x5", "x6"]
    got = dict(zip(t.column("id").to_pylist(), t.column("embedding").to_pylist(), strict=True))
    np.testing.assert_array_equal(got["x2"], vectors[0][1])  # shard 0 beats shard 1
    np.testing.assert_array_equal(got["x5"], vectors[1][2])  # earlier row in the same shard wins
    np.testing.assert_array_equal(got["x1"], vectors[0][0])


def test_mixed_models_refused(tmp_path):
    shards = str(tmp_path / "shards")
    write_shards(shards, [["a", "b"]])
    other = dict(META, model="BAAI/bge-small-en-v1.5")
    write_table(make_table(["c"], vec(1)[None, :], other), os.path.join(shards, "part-0001-0000000.parquet"))
    with pytest.raises(C.ConsolidateError, match="different models") as ei:
        C.consolidate(shards, str(tmp_path / "out"))
    assert "BAAI/bge-small-en-v1.5" in str(ei.value) and "all-MiniLM-L6-v2" in str(ei.value)
    r = run_cli("consolidate", "--shards-dir", shards, "--out-dir", str(tmp_path / "out"))
    assert r.returncode == 1 and "different models" in r.stderr
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith(".parquet")]


def test_mixed_prompts_or_dimensions_refused(tmp_path):
    """Shards made with another --prompt-name (or none) cannot go into one table; the same one can."""
    shards = str(tmp_path / "shards")
    tagged = dict(META, prompt_name="document")
    write_table(
        make_table(["a"], vec(0)[None, :], tagged),
        os.path.join(shards_dir(shards), "part-0000-0000000.parquet"),
    )
    write_table(make_table(["b"], vec(1)[None, :], META), os.path.join(shards, "part-0001-0000000.parquet"))
    with pytest.raises(C.ConsolidateError, match="prompt_name=document"):
        C.consolidate(shards, str(tmp_path / "out"))
    write_table(make_table(["b"], vec(1)[None, :], tagged), os.path.join(shards, "part-0001-0000000.parquet"))
    res = C.consolidate(shards, str(tmp_path / "out"))
    assert res.manifest["rows"] == 2
    assert (
        pq.read_schema(os.path.join(str(tmp_path / "out"), res.manifest["files"][0]["name"])).metadata[
            b"tweet_embed.prompt_name"
        ]
        == b"document"
    )


def shards_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def test_mixed_dimensions_refused(tmp_path):
    shards = str(tmp_path / "shards")
    write_shards(shards, [["a", "b"]], dim=16)
    write_table(
        make_table(["c"], vec(1, 8)[None, :], dict(META, dim="8")),
        os.path.join(shards, "part-0001-0000000.parquet"),
    )
    with pytest.raises(C.ConsolidateError, match="dim=8"):
        C.consolidate(shards, str(tmp_path / "out"))


def test_empty_or_missing_shards_dir_clear_message(tmp_path):
    empty = tmp_path / "shards"
    empty.mkdir()
    (empty / ".part-0000-0000000.parquet.tmp").write_bytes(b"half")  # hidden temp files are not shards
    r = run_cli("consolidate", "--shards-dir", str(empty), "--out-dir", str(tmp_path / "out"))
    assert r.returncode == 1 and "no shards in" in r.stderr and "tweet-embed embed" in r.stderr
    r = run_cli("consolidate", "--work-dir", str(tmp_path / "nothing"))
    assert r.returncode == 1 and "shards directory not found" in r.stderr


def test_target_size_splits_files_and_keeps_order(tmp_path):
    shards = str(tmp_path / "shards")
    ids = [[f"id{s:02d}-{r:04d}" for r in range(400)] for s in range(10)]  # 4000 rows x ~100 B
    write_shards(shards, ids, dim=16)
    out = str(tmp_path / "out")
    res = C.consolidate(shards, out, target_size="60KB", row_group_size="12KB")
    files = res.manifest["files"]
    assert len(files) >= 5
    for f in files[:-1]:
        assert 45_000 <= f["bytes"] <= 75_000, f
        assert f["row_groups"] >= 2
        md = pq.read_metadata(os.path.join(out, f["name"]))
        assert md.num_rows == f["rows"]
        # every row group but the file's last holds at least --row-group-size bytes (uncompressed)
        for g in range(md.num_row_groups - 1):
            assert md.row_group(g).total_byte_size >= 12_000 * 0.9
    assert files[-1]["bytes"] <= 75_000
    t = read_out(out)
    assert t.column("id").to_pylist() == [i for s in ids for i in s]
    assert [f["name"] for f in files] == [f"embeddings-{i:05d}.parquet" for i in range(len(files))]


def test_rerun_is_noop_and_other_settings_need_overwrite(tmp_path):
    shards = str(tmp_path / "shards")
    write_shards(shards, [["a", "b"], ["c"]])
    out = str(tmp_path / "out")
    first = C.consolidate(shards, out)
    before = open(os.path.join(out, "_manifest.json"), "rb").read()
    again = C.consolidate(shards, out)
    assert again.noop and "already consolidated" in again.messages[0]
    assert open(os.path.join(out, "_manifest.json"), "rb").read() == before
    r = run_cli("consolidate", "--shards-dir", shards, "--out-dir", out)
    assert r.returncode == 0 and "already consolidated" in r.stdout
    with pytest.raises(C.ConsolidateError, match="other settings"):
        C.consolidate(shards, out, target_size="1MB")
    write_shards(str(tmp_path / "more"), [["a", "b"], ["c"], ["d"]])
    with pytest.raises(C.ConsolidateError, match="other shards"):
        C.consolidate(str(tmp_path / "more"), out)
    res = C.consolidate(str(tmp_path / "more"), out, overwrite=True)
    assert res.manifest["rows"] == 4 and first.manifest["rows"] == 3


def test_foreign_data_in_out_dir_refused_without_overwrite(tmp_path):
    shards = str(tmp_path / "shards")
    write_shards(shards, [["a", "b"]])
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(C.ConsolidateError, match="holds other data"):
        C.consolidate(shards, str(out))
    (out / "notes.txt").unlink()
    (out / "embeddings-00000.parquet").write_bytes(b"someone else's")
    with pytest.raises(C.ConsolidateError, match="no consolidation in progress"):
        C.consolidate(shards, str(out))
    (out / "notes.txt").write_text("mine")
    res = C.consolidate(shards, str(out), overwrite=True)
    assert res.manifest["rows"] == 2 and (out / "notes.txt").read_text() == "mine"


def test_delete_shards_only_after_verification(tmp_path):
    shards = str(tmp_path / "shards")
    write_shards(shards, [["a", "b"], ["b", "c"]])
    out = str(tmp_path / "out")
    C.consolidate(shards, out)
    # damaged output: the shards must survive
    name = os.path.join(out, "embeddings-00000.parquet")
    data = bytearray(open(name, "rb").read())
    data[100] ^= 0xFF
    open(name, "wb").write(bytes(data))
    with pytest.raises(C.ConsolidateError, match="NOT deleted"):
        C.consolidate(shards, out, delete_shards=True)
    assert len(C.list_shards(shards)) == 2
    res = C.consolidate(shards, out, overwrite=True, delete_shards=True)
    assert res.deleted_shards == 2 and C.list_shards(shards) == []
    again = C.consolidate(shards, out)
    assert again.noop and "2 shards were deleted" in again.messages[0]


def test_keep_text_joins_input_by_id(tmp_path):
    inp = tmp_path / "in.jsonl"
    lines = [
        {"_id": "1", "text": "one"},
        {"_id": "2", "text": ""},
        {"_id": 3, "text": "three"},
        {"_id": "1", "text": "one again"},
        {"_id": {"$oid": "4"}, "text": "four"},
    ]
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    shards = str(tmp_path / "shards")
    write_shards(shards, [["1", "3"], ["1", "4"]])  # what embed writes: valid records, in input order
    out = str(tmp_path / "out")
    res = C.consolidate(shards, out, keep_text=[str(inp)])
    t = read_out(out)
    assert t.column("id").to_pylist() == ["1", "3", "4"]
    assert t.column("text").to_pylist() == ["one", "three", "four"]
    assert res.manifest["schema"]["text"] == "STRING"
    write_shards(str(tmp_path / "bad"), [["1", "99"]])
    with pytest.raises(C.ConsolidateError, match="'99' was not found"):
        C.consolidate(str(tmp_path / "bad"), str(tmp_path / "out2"), keep_text=[str(inp)])


def test_keep_text_joins_the_text_mode_the_shards_were_embedded_with(tmp_path):
    """Raw Twitter objects: the text column is the text that was embedded (--text-mode, in the metadata)."""
    from tweet_objects import V1_SHORT

    inp = tmp_path / "v1.jsonl"
    inp.write_text(json.dumps(V1_SHORT) + "\n")
    for mode, expected in (("full", "Fish & chips <3 >_< and &amp; literally"), ("raw", V1_SHORT["text"])):
        shards = str(tmp_path / f"shards-{mode}")
        write_shards(
            shards, [[V1_SHORT["id_str"]]], meta={**META, **({"text_mode": "raw"} if mode == "raw" else {})}
        )
        C.consolidate(shards, str(tmp_path / f"out-{mode}"), keep_text=[str(inp)])
        assert read_out(str(tmp_path / f"out-{mode}")).column("text").to_pylist() == [expected]


def test_crash_after_some_files_resumes_to_identical_output(tmp_path, monkeypatch):
    shards = str(tmp_path / "shards")
    write_shards(shards, [[f"k{s}-{r}" for r in range(300)] + ["k0-1"] for s in range(6)])
    ref = str(tmp_path / "ref")
    want = C.consolidate(shards, ref, target_size="40KB", row_group_size="10KB").manifest
    out = str(tmp_path / "out")
    real_close = C._Writer._close_file
    calls = {"n": 0}

    def crashing_close(self):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk went away")
        real_close(self)

    monkeypatch.setattr(C._Writer, "_close_file", crashing_close)
    with pytest.raises(OSError):
        C.consolidate(shards, out, target_size="40KB", row_group_size="10KB")
    monkeypatch.setattr(C._Writer, "_close_file", real_close)
    assert not os.path.exists(os.path.join(out, "_manifest.json"))
    res = C.consolidate(shards, out, target_size="40KB", row_group_size="10KB")
    assert res.resumed_files == 2
    assert res.manifest == want
    for f in want["files"]:
        assert file_sha256(os.path.join(out, f["name"])) == f["sha256"]


def _consolidate_cmd(shards: str, out: str) -> list[str]:
    return [
        sys.executable,
        os.path.join(ROOT, "consolidate_embeddings.py"),
        "--shards-dir",
        shards,
        "--out-dir",
        out,
        "--target-size",
        "400KB",
        "--row-group-size",
        "100KB",
    ]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_gives_same_manifest(tmp_path):
    shards = str(tmp_path / "shards")
    ids = [[f"t{s:03d}-{r:05d}" for r in range(2500)] for s in range(12)]
    ids[5][:3] = ["t000-00001", "t004-00009", "t005-00000"]  # duplicates across shards
    write_shards(shards, ids, dim=64)
    ref = str(tmp_path / "ref")
    t0 = time.monotonic()
    p = subprocess.Popen(_consolidate_cmd(shards, ref), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first_file = None  # when the first output file appeared: kills from about then on hit the write phase
    while p.poll() is None:
        if first_file is None and os.path.exists(os.path.join(ref, "embeddings-00000.parquet")):
            first_file = time.monotonic() - t0
        time.sleep(0.005)
    assert p.returncode == 0
    full = time.monotonic() - t0
    lo = min(0.8 * (first_file or full / 2), full / 2)
    want = open(os.path.join(ref, "_manifest.json"), "rb").read()
    n_files = len(json.loads(want)["files"])
    assert n_files >= 4
    rng = random.Random(1234)
    killed = resumed = 0
    for i in range(12):
        out = str(tmp_path / f"out{i}")
        for _ in range(2):  # kill, and kill the resumed run too
            p = subprocess.Popen(
                _consolidate_cmd(shards, out), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
            if i % 2:  # a random moment of the whole run (start-up, duplicate search, writing, manifest)
                time.sleep(rng.uniform(0.05, full) if rng.random() < 0.3 else rng.uniform(lo, full))
            else:  # right after output file k appears: mid-write, before or after its progress record
                k = rng.randrange(1, n_files)
                target = os.path.join(out, f"embeddings-{k:05d}.parquet")
                while p.poll() is None and not os.path.exists(target):
                    time.sleep(0.001)
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
                killed += 1
            resumed += "resumed after" in p.communicate()[0]
        r = subprocess.run(_consolidate_cmd(shards, out), capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        resumed += "resumed after" in r.stdout
        assert open(os.path.join(out, "_manifest.json"), "rb").read() == want
        m = json.loads(want)
        for f in m["files"]:
            assert file_sha256(os.path.join(out, f["name"])) == f["sha256"]
        leftovers = sorted(
            n
            for n in os.listdir(out)
            if n not in {f["name"] for f in m["files"]} and n not in ("_manifest.json", C.LOCK)
        )
        assert leftovers == []
    print(f"killed {killed}, resumed {resumed}, full run {full:.2f}s, first file at {first_file}")
    assert killed >= 8  # most attempts really interrupted a run
    assert resumed >= 4  # and some of them after finished files, in the middle of writing


def test_root_script_defaults_to_embeddings_dirs(tmp_path):
    write_shards(str(tmp_path / "embeddings" / "shards"), [["a", "b"], ["c"]])
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "consolidate_embeddings.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "bq load --source_format=PARQUET --parquet_enable_list_inference=true" in r.stdout
    m = json.load(open(tmp_path / "embeddings" / "consolidated" / "_manifest.json"))
    assert m["rows"] == 3


def test_parse_size():
    assert C.parse_size("2GB") == 2 * 10**9
    assert C.parse_size("128MiB") == 128 << 20
    assert C.parse_size("1.5 kb") == 1500
    with pytest.raises(ValueError):
        C.parse_size("lots")


def test_seed_embed_then_root_script_end_to_end(tmp_path):
    """embed_tweets.py (TEI test server) → consolidate_embeddings.py → DuckDB, pyarrow, verify, --keep-text."""
    from tweet_embed.testing.server import TEIServer

    inp = tmp_path / "tweets.json"
    recs = [{"_id": str(1000 + i), "text": f"tweet {i} about topic {i % 7}"} for i in range(120)]
    recs.insert(50, {"_id": "1003", "text": "the same id again, later"})  # a repeated id, another chunk
    recs.insert(70, {"_id": "bad", "text": ""})  # rejected by embed
    inp.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    with TEIServer(dim=32, max_client_batch_size=16) as srv:
        r = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "embed_tweets.py"),
                "--input-file",
                str(inp),
                "--tei-urls",
                srv.embed_url,
                "--chunk-size",
                "40",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert r.returncode == 0, r.stderr
    shards = C.list_shards(str(tmp_path / "embeddings" / "shards"))
    shard_rows = sum(pq.read_metadata(p).num_rows for p in shards)
    assert len(shards) >= 3
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, "consolidate_embeddings.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    out = tmp_path / "embeddings" / "consolidated"
    m = json.load(open(out / "_manifest.json"))
    assert m["rows"] == shard_rows - m["duplicates"]["rows_dropped"] == 120
    assert m["metadata"]["backend"] == "tei" and m["dim"] == 32
    (n, nd, d) = (
        duckdb.connect()
        .execute(
            f"SELECT count(*), count(DISTINCT id), max(len(embedding)) FROM read_parquet('{out}/*.parquet')"
        )
        .fetchone()
    )
    assert (n, nd, d) == (120, 120, 32)
    t = pq.read_table(str(out))
    assert t.num_rows == 120 and t.schema.field("embedding").type == pa.list_(
        pa.field("element", pa.float32(), nullable=False)
    )
    first = {rec["_id"]: rec["text"] for rec in reversed(recs) if rec["text"]}  # first occurrence wins
    v = run_cli("verify", str(inp), cwd=str(tmp_path))
    assert v.returncode == 0, v.stdout + v.stderr
    k = run_cli(
        "consolidate", "--out-dir", str(tmp_path / "with-text"), "--keep-text", str(inp), cwd=str(tmp_path)
    )
    assert k.returncode == 0, k.stderr
    tt = pq.read_table(str(tmp_path / "with-text"))
    assert dict(zip(tt["id"].to_pylist(), tt["text"].to_pylist(), strict=True)) == first


def test_keep_text_from_parquet_input(tmp_path):
    inp = tmp_path / "export.parquet"
    pq.write_table(pa.table({"_id": ["p1", "p2", "p3"], "text": ["alpha", "beta", "gamma"]}), str(inp))
    shards = str(tmp_path / "shards")
    write_shards(shards, [["p1"], ["p2", "p3"]])
    C.consolidate(shards, str(tmp_path / "out"), keep_text=[str(inp)])
    t = read_out(str(tmp_path / "out"))
    assert t.column("text").to_pylist() == ["alpha", "beta", "gamma"]


def test_duplicate_search_by_hash_buckets_matches_single_pass(tmp_path):
    shards = str(tmp_path / "shards")
    ids = [[f"d{(s * 37 + r * 11) % 500}" for r in range(120)] for s in range(6)]  # many repeats
    write_shards(shards, ids)
    infos, _, _ = C.scan_shards(C.list_shards(shards))
    results = []
    for b in (1, 4, 9):
        path = str(tmp_path / f"drops{b}.parquet")
        dd = C.find_duplicates(infos, path, str(tmp_path / f"t{b}"), "256MB", buckets=b)
        results.append((dd.dropped, dd.ids, dd.examples, pq.read_table(path).to_pylist()))
    assert results[0] == results[1] == results[2]
    flat = [i for s in ids for i in s]
    assert results[0][0] == len(flat) - len(set(flat))


def test_check_before_delete_finds_an_id_missing_from_the_output(tmp_path):
    shards = str(tmp_path / "shards")
    write_shards(shards, [["a", "b"], ["c"]])
    out = str(tmp_path / "out")
    m = C.consolidate(shards, out).manifest
    assert C.check_consolidated(out, m, C.list_shards(shards)) == []
    write_shards(str(tmp_path / "more"), [["a", "b"], ["c", "zz"]])
    problems = C.check_consolidated(out, m, C.list_shards(str(tmp_path / "more")))
    assert any("not in the output" in p and "zz" in p for p in problems)
