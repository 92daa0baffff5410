"""Consolidation with shards and output on an object store (a local moto S3 server), through a local stage."""

from __future__ import annotations

import os

import pyarrow.parquet as pq
import pytest
from test_consolidate import write_shards

from tweet_embed import storage
from tweet_embed.consolidate.merge import MANIFEST, consolidate
from tweet_embed.consolidate.remote import consolidate_staged

from conftest import moto_s3, run_cli


@pytest.fixture(scope="module")
def s3():
    with moto_s3("store") as fs:
        yield fs


def upload_dir(local: str, uri: str) -> None:
    for name in sorted(os.listdir(local)):
        with open(os.path.join(local, name), "rb") as fh:
            storage.write_bytes(storage.join(uri, name), fh.read())


def test_s3_shards_to_s3_output_equals_local_and_reruns_are_noops(tmp_path, s3) -> None:  # noqa: F811
    local_shards = str(tmp_path / "shards")
    shards = [[f"id{s * 50 + r}" for r in range(50)] for s in range(12)]
    shards[5][3] = "id7"  # a duplicate id: dropped the same way remotely
    write_shards(local_shards, shards)
    upload_dir(local_shards, "s3://store/run/shards")
    expected = consolidate(local_shards, str(tmp_path / "local-out"), target_size="20KB")

    res = consolidate_staged(
        "s3://store/run/shards", "s3://store/run/consolidated", str(tmp_path / "stage"), target_size="20KB"
    )
    assert res.manifest["files"] == expected.manifest["files"]
    assert res.manifest["duplicates"] == expected.manifest["duplicates"]
    assert expected.manifest["duplicates"]["rows_dropped"] == 1
    remote = sorted(storage.list_names("s3://store/run/consolidated"))
    assert MANIFEST in remote and len(remote) == len(expected.manifest["files"]) + 1
    for f in expected.manifest["files"]:
        with storage.open_raw(storage.join("s3://store/run/consolidated", f["name"])) as fh:
            assert pq.read_table(fh).equals(pq.read_table(os.path.join(tmp_path, "local-out", f["name"])))

    again = consolidate_staged(
        "s3://store/run/shards", "s3://store/run/consolidated", str(tmp_path / "stage"), target_size="20KB"
    )
    assert any("already up to date" in m for m in again.messages)

    r = run_cli(
        "consolidate",
        "--shards-dir",
        "s3://store/run/shards",
        "--out-dir",
        "s3://store/run/consolidated",
        "--target-size",
        "20KB",
        "--stage-dir",
        str(tmp_path / "stage"),
        "--delete-shards",
    )
    assert r.returncode == 0, r.stderr
    assert storage.list_names("s3://store/run/shards") == []
