"""``load bigquery``: schema mapping, the load job configuration, and real loads into the bqemulator.

The emulator runs real load jobs (uploaded Parquet, or gs:// mapped to a local directory) into DuckDB and
answers the real google-cloud-bigquery client. What it does not do like BigQuery: it ignores
``parquetOptions.enableListInference`` and cannot create a table from a Parquet file without a schema, so
the gs:// test loads into an existing table, and list inference itself is checked as job configuration.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from bq_emulator import needs_bq, needs_emulator, run_emulator
from tweet_embed.load.bigquery import LoadError, gcs_uris, load_bigquery
from tweet_embed.parquet import make_table, write_table

META = {"backend": "local", "model": "all-MiniLM-L6-v2", "dim": "4", "normalize": "true", "version": "0.1.0"}


def consolidated_dir(path: str, files: int = 2, rows: int = 50) -> tuple[list[str], np.ndarray]:
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    ids, vecs = [], []
    for f in range(files):
        fid = [f"{f}-{i}" for i in range(rows)]
        v = rng.standard_normal((rows, 4)).astype(np.float32)
        write_table(make_table(fid, v, META), os.path.join(path, f"part-{f:05d}.parquet"))
        ids += fid
        vecs.append(v)
    with open(os.path.join(path, ".part-00009.parquet.tmp"), "wb") as fh:  # hidden: ignored
        fh.write(b"partial")
    with open(os.path.join(path, "manifest.json"), "w") as fh:  # not Parquet: ignored
        fh.write("{}")
    return ids, np.concatenate(vecs)


@needs_bq
def test_schema_of_a_shard_is_id_and_repeated_float64():
    from tweet_embed.load.bigquery import bigquery_schema

    schema = make_table(["a"], np.zeros((1, 4), np.float32)).schema
    fields = bigquery_schema(schema)
    assert [(f.name, f.field_type, f.mode) for f in fields] == [
        ("id", "STRING", "REQUIRED"),
        ("embedding", "FLOAT64", "REPEATED"),
    ]
    extra = pa.schema(
        [
            ("text", pa.string()),
            ("n", pa.int32()),
            ("ok", pa.bool_()),
            ("ts", pa.timestamp("us", tz="UTC")),
            ("s", pa.struct([("x", pa.float64())])),
        ]
    )
    assert [(f.field_type, f.mode) for f in bigquery_schema(extra)] == [
        ("STRING", "NULLABLE"),
        ("INT64", "NULLABLE"),
        ("BOOL", "NULLABLE"),
        ("TIMESTAMP", "NULLABLE"),
        ("RECORD", "NULLABLE"),
    ]
    with pytest.raises(LoadError, match="arrays of arrays"):
        bigquery_schema(pa.schema([("m", pa.list_(pa.list_(pa.float32())))]))
    with pytest.raises(LoadError, match="no BigQuery type"):
        bigquery_schema(pa.schema([("u", pa.uint64())]))


def test_gcs_uris():
    assert gcs_uris("gs://b/run1/consolidated") == ["gs://b/run1/consolidated/*.parquet"]
    assert gcs_uris("gs://b/run1/consolidated/") == ["gs://b/run1/consolidated/*.parquet"]
    assert gcs_uris("gs://b/x/part-*.parquet") == ["gs://b/x/part-*.parquet"]
    assert gcs_uris("gs://b/x/one.parquet") == ["gs://b/x/one.parquet"]


class FakeJob:
    job_id = "job-1"
    output_rows = 7

    def result(self) -> FakeJob:
        return self


class FakeClient:
    project = "proj"

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def load_table_from_uri(self, uris, table, job_config, location=None):  # type: ignore[no-untyped-def]
        self.calls.append((uris, table, job_config, location))
        return FakeJob()

    def get_table(self, table):  # type: ignore[no-untyped-def]
        return type("T", (), {"num_rows": 7})()


@needs_bq
def test_gcs_load_job_configuration():
    client = FakeClient()
    result = load_bigquery(
        "ds.emb", "gs://bucket/run/consolidated", mode="replace", location="EU", bq_client=client
    )
    uris, table, cfg, location = client.calls[0]
    assert uris == ["gs://bucket/run/consolidated/*.parquet"] and table == "proj.ds.emb" and location == "EU"
    assert cfg.source_format == "PARQUET" and cfg.write_disposition == "WRITE_TRUNCATE"
    assert cfg.parquet_options.enable_list_inference is True
    assert cfg.schema is None  # BigQuery reads it from the Parquet files
    assert (result.jobs, result.rows, result.table_rows) == (["job-1"], 7, 7)


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(LoadError, match="not found"):
        load_bigquery("p.d.t", str(tmp_path / "nope"), bq_client=FakeClient())
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="no .parquet files"):
        load_bigquery("p.d.t", str(tmp_path / "empty"), bq_client=FakeClient())


# --- the emulator ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    with run_emulator(str(tmp_path_factory.mktemp("bqemu"))) as emu:
        bq, _ = emu.clients()
        bq.create_dataset("ds", exists_ok=True)
        yield emu


@needs_emulator
def test_emulator_load_local_directory(emulator, tmp_path):
    src = str(tmp_path / "consolidated")
    ids, vecs = consolidated_dir(src)
    bq, _ = emulator.clients()
    table = f"{emulator.project}.ds.emb"
    result = load_bigquery(table, src, bq_client=bq)
    assert result.files == 2 and len(result.jobs) == 2 and len(set(result.jobs)) == 2
    assert result.rows == result.expected_rows == result.table_rows == len(ids)
    meta = bq.get_table(table)
    kinds = [(f.name, f.field_type.replace("FLOAT64", "FLOAT"), f.mode) for f in meta.schema]
    assert kinds == [("id", "STRING", "REQUIRED"), ("embedding", "FLOAT", "REPEATED")]
    got = {r["id"]: r["embedding"] for r in bq.query(f"SELECT id, embedding FROM `{table}`").result()}
    assert set(got) == set(ids)
    for i, rid in enumerate(ids):
        assert np.allclose(np.asarray(got[rid], np.float64), vecs[i].astype(np.float64))

    # the default mode refuses a table that has rows; --replace replaces; --append appends
    with pytest.raises(LoadError):
        load_bigquery(table, src, bq_client=bq)
    assert load_bigquery(table, src, mode="replace", bq_client=bq).table_rows == len(ids)
    assert load_bigquery(table, src, mode="append", bq_client=bq).table_rows == 2 * len(ids)


@needs_emulator
def test_emulator_load_from_gcs_uri(emulator, tmp_path):
    from google.cloud import bigquery

    src = str(tmp_path / "c")
    ids, _ = consolidated_dir(src, files=1, rows=30)
    dest = os.path.join(emulator.gcs_root, "bucket", "run1")
    os.makedirs(dest, exist_ok=True)
    shutil.copy(os.path.join(src, "part-00000.parquet"), dest)
    bq, _ = emulator.clients()
    table = f"{emulator.project}.ds.from_gcs"
    bq.create_table(
        bigquery.Table(
            table,
            schema=[
                bigquery.SchemaField("id", "STRING", mode="REQUIRED"),
                bigquery.SchemaField("embedding", "FLOAT64", mode="REPEATED"),
            ],
        )
    )
    result = load_bigquery(table, "gs://bucket/run1/part-00000.parquet", mode="append", bq_client=bq)
    assert result.rows == result.table_rows == len(ids) and len(result.jobs) == 1


@needs_emulator
def test_emulator_cli_load(emulator, tmp_path, capsys):
    from tweet_embed import cli

    src = str(tmp_path / "consolidated")
    ids, _ = consolidated_dir(src, files=3, rows=20)
    table = f"{emulator.project}.ds.cli_emb"
    args = [
        "load",
        "bigquery",
        "--table",
        table,
        src,
        "--project",
        emulator.project,
        "--api-endpoint",
        emulator.rest,
    ]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert printed.count("job ") == 3 and f"loaded {len(ids)} rows into {table}" in printed
    assert cli.main(args) == 1  # the table has rows now
    assert cli.main(args + ["--replace"]) == 0
