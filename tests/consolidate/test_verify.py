"""verify: missing, extra, duplicated ids, dimension and NaN, against the input read as embed reads it."""

from __future__ import annotations

import json
import os

import numpy as np
from test_consolidate import META, write_shards

from tweet_embed.consolidate.merge import consolidate
from tweet_embed.consolidate.verify import verify
from tweet_embed.parquet import make_table, write_table

from conftest import run_cli


def write_input(path, n: int) -> list[str]:
    """n valid records plus lines embed rejects (bad JSON, empty text) and one repeated id."""
    ids = [f"{1600000000000000000 + i}" for i in range(n)]
    with open(path, "w") as fh:
        for i, rid in enumerate(ids):
            fh.write(json.dumps({"_id": rid, "text": f"tweet number {i}"}) + "\n")
            if i == 3:
                fh.write("{not json\n")
                fh.write(json.dumps({"_id": "no-text", "text": ""}) + "\n")
        fh.write(json.dumps({"_id": ids[0], "text": "the same id again"}) + "\n")
    return ids


def test_ok_after_consolidation_and_cli_exit_codes(tmp_path):
    inp = tmp_path / "in.jsonl"
    ids = write_input(inp, 50)
    work = tmp_path / "w"
    write_shards(str(work / "shards"), [ids[:20], ids[20:] + [ids[0]]])  # embed wrote the repeat too
    before = verify([str(inp)], out_dir=str(work / "consolidated"), shards_dir=str(work / "shards"))
    assert "not consolidated" in before.target
    assert not before.ok and before.duplicated.count == 1 and before.duplicated.examples == [ids[0]]
    consolidate(str(work / "shards"), str(work / "consolidated"))
    rep = verify([str(inp)], out_dir=str(work / "consolidated"), shards_dir=str(work / "shards"))
    assert rep.ok, rep.text()
    assert rep.input_ids == 50 and rep.input_lines_valid == 51 and rep.input_repeated_ids == 1
    assert rep.rejects == 2 and rep.output_rows == 50 and rep.dim == 16
    r = run_cli("verify", str(inp), "--work-dir", str(work))
    assert r.returncode == 0, r.stderr
    assert "OK: every valid id appears exactly once" in r.stdout


def test_missing_id_fails(tmp_path):
    inp = tmp_path / "in.jsonl"
    ids = write_input(inp, 30)
    work = tmp_path / "w"
    write_shards(str(work / "shards"), [ids[:10], ids[11:]])  # ids[10] lost
    consolidate(str(work / "shards"), str(work / "consolidated"))
    rep = verify([str(inp)], out_dir=str(work / "consolidated"))
    assert not rep.ok
    assert rep.missing.count == 1 and rep.missing.examples == [ids[10]]
    assert rep.extra.count == 0 and rep.duplicated.count == 0
    r = run_cli("verify", str(inp), "--work-dir", str(work))
    assert r.returncode == 1
    assert "[FAIL] missing ids" in r.stdout and ids[10] in r.stdout and "FAILED" in r.stdout


def test_duplicated_and_extra_ids_fail_on_shards(tmp_path):
    inp = tmp_path / "in.jsonl"
    ids = write_input(inp, 30)
    shards = str(tmp_path / "shards")
    write_shards(shards, [ids[:15], ids[15:] + [ids[7], "ghost"]])
    rep = verify([str(inp)], shards_dir=shards)
    assert rep.duplicated.count == 1 and rep.duplicated.examples == [ids[7]]
    assert rep.extra.count == 1 and rep.extra.examples == ["ghost"]
    assert rep.missing.count == 0 and not rep.ok


def test_non_finite_vectors_and_tampered_output_fail(tmp_path):
    inp = tmp_path / "in.jsonl"
    ids = write_input(inp, 10)
    shards = tmp_path / "shards"
    shards.mkdir()
    v = np.ones((10, 16), np.float32)
    v[4, 3] = np.nan
    v[6, 0] = np.inf
    write_table(make_table(ids, v, META), str(shards / "part-0000-0000000.parquet"))
    rep = verify([str(inp)], shards_dir=str(shards))
    assert rep.non_finite.count == 2 and rep.non_finite.examples == [ids[4], ids[6]]
    assert not rep.ok
    out = tmp_path / "out"
    consolidate(str(shards), str(out))
    rep = verify([str(inp)], out_dir=str(out))
    assert rep.non_finite.count == 2
    # a file changed after consolidation is caught by the checksum
    f = out / "embeddings-00000.parquet"
    data = bytearray(f.read_bytes())
    data[200] ^= 1
    f.write_bytes(bytes(data))
    rep = verify([str(inp)], out_dir=str(out))
    assert any("sha256" in p for p in rep.file_problems)


def test_nothing_to_verify_is_a_clear_error(tmp_path):
    inp = tmp_path / "in.jsonl"
    write_input(inp, 3)
    r = run_cli("verify", str(inp), "--work-dir", str(tmp_path / "none"))
    assert r.returncode == 2 and "nothing to verify" in r.stderr
    r = run_cli("verify", str(tmp_path / "missing.jsonl"), "--work-dir", str(tmp_path))
    assert r.returncode == 2 and "not found" in r.stderr
    assert not os.path.exists(tmp_path / "none")


def test_hash_buckets_give_the_same_answer(tmp_path):
    """Large inputs are compared one hash bucket at a time; counts and examples must not depend on it."""
    inp = tmp_path / "in.jsonl"
    ids = write_input(inp, 200)
    shards = str(tmp_path / "shards")
    write_shards(
        shards, [ids[:90], ids[95:] + ids[10:14] + ["ghost1", "ghost2"]]
    )  # 5 missing, 4 dup, 2 extra
    reports = [verify([str(inp)], shards_dir=shards, buckets=b, examples=3) for b in (1, 3, 7)]
    for rep in reports:
        assert (rep.missing.count, rep.duplicated.count, rep.extra.count) == (5, 4, 2)
        assert rep.input_ids == 200 and rep.input_repeated_ids == 1 and rep.output_rows == 201
        assert rep.missing.examples == sorted(ids[90:95])[:3]
        assert rep.duplicated.examples == sorted(ids[10:14])[:3]
        assert rep.extra.examples == ["ghost1", "ghost2"]


def test_shards_with_different_prompts_or_a_wrong_dimensions_record_fail(tmp_path):
    inp = tmp_path / "in.jsonl"
    ids = write_input(inp, 10)
    shards = tmp_path / "shards"
    shards.mkdir()
    rng = np.random.default_rng(0)
    tagged = dict(META, prompt_name="document")
    write_table(
        make_table(ids[:5], rng.random((5, 16), np.float32), tagged),
        str(shards / "part-0000-0000000.parquet"),
    )
    write_table(
        make_table(ids[5:], rng.random((5, 16), np.float32), META), str(shards / "part-0001-0000000.parquet")
    )
    rep = verify([str(inp)], shards_dir=str(shards))
    assert not rep.ok and any("different prompts or dimensions" in p for p in rep.file_problems), (
        rep.file_problems
    )
    # the same prompt everywhere, but a shard that says --dimensions 8 while holding 16
    write_table(
        make_table(ids[5:], rng.random((5, 16), np.float32), tagged),
        str(shards / "part-0001-0000000.parquet"),
    )
    assert verify([str(inp)], shards_dir=str(shards)).ok
    odd = dict(tagged, dimensions="8")
    write_table(
        make_table(ids[5:], rng.random((5, 16), np.float32), odd), str(shards / "part-0001-0000000.parquet")
    )
    rep = verify([str(inp)], shards_dir=str(shards))
    assert any("--dimensions 8 but declares dim 16" in p for p in rep.file_problems), rep.file_problems
