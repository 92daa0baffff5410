"""``export bigquery``: against the bqemulator (REST + Storage Read gRPC), and resume logic with a fake reader.

What the emulator shows: the real google-cloud-bigquery / bigquery-storage clients, a real read session in
Arrow format over gRPC with several streams, a query whose result table is read, column checks.
What it cannot show: reading a query's *anonymous* result table through the Storage API (the emulator's
anonymous tables are not readable there, and it ignores a query job's destination table, so the query test
uses CREATE TABLE ... AS SELECT), and ``ReadRows`` at an ``offset`` (the emulator ignores the offset and always sends the
whole stream), so resuming per stream is tested with a fake read client that honours offsets, fed real
Arrow IPC batches and real ``ReadSession`` protos.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bq_emulator import needs_bq, needs_emulator, run_emulator
from tweet_embed.export import ExportError
from tweet_embed.export.bigquery import TableRef, batch_to_lines, bq_id_to_str, require_bigquery
from tweet_embed.export.jsonl_writer import SKIP_TEXT_EMPTY, SKIP_TEXT_MISSING, partial_path, state_path

from conftest import read_jsonl

# --- pure parts ------------------------------------------------------------------------------------------


def test_table_ref_parsing():
    assert TableRef.parse("p.d.t").path == "projects/p/datasets/d/tables/t"
    assert TableRef.parse("p:d.t") == TableRef("p", "d", "t")
    assert TableRef.parse("d.t").with_project("x").dotted == "x.d.t"
    with pytest.raises(ExportError, match="PROJECT.DATASET.TABLE"):
        TableRef.parse("just-a-name")


def test_id_and_text_conversion():
    import decimal

    assert bq_id_to_str(123) == "123" and bq_id_to_str("a") == "a" and bq_id_to_str(b"\x01\xff") == "01ff"
    assert bq_id_to_str(decimal.Decimal("12.000")) == "12" and bq_id_to_str(decimal.Decimal("1.5")) == "1.5"
    assert bq_id_to_str(None) is None and bq_id_to_str("") is None and bq_id_to_str(True) is None
    data, n, skipped = batch_to_lines([1, 2, 3, 4, None], ["a", None, "", "d \u00e9", "x"])
    assert n == 2
    assert [orjson.loads(x) for x in data.splitlines()] == [
        {"_id": "1", "text": "a"},
        {"_id": "4", "text": "d \u00e9"},
    ]
    assert skipped == {SKIP_TEXT_MISSING: 1, SKIP_TEXT_EMPTY: 1, "invalid _id": 1}


def test_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "google.cloud.bigquery_storage_v1", None)
    with pytest.raises(ExportError, match=r"tweet-embed\[bigquery\]"):
        require_bigquery()


def test_table_or_query_required(tmp_path):
    with pytest.raises(ExportError, match="exactly one"):
        from tweet_embed.export.bigquery import export_bigquery

        export_bigquery(str(tmp_path / "o.jsonl"))


# --- resume with a fake Storage Read client --------------------------------------------------------------

SCHEMA = pa.schema([("text", pa.string()), ("id", pa.int64())])  # BigQuery sends table order, not selection


class FakeTable:
    def __init__(self, name: str, num_rows: int) -> None:
        self.schema = [type("F", (), {"name": n})() for n in ("text", "id", "other")]
        self.name = name


class FakeBQ:
    project = "proj"

    def get_table(self, ref: str) -> FakeTable:
        return FakeTable(ref, 0)


class FakeReadClient:
    """Streams of real Arrow IPC batches; ``read_rows`` honours the offset like the real service."""

    def __init__(self, streams: list[list[pa.RecordBatch]], fail: dict[int, int] | None = None) -> None:
        self.streams = streams
        self.fail = dict(fail or {})  # stream index -> raise after this many rows
        self.calls: list[tuple[str, int]] = []
        self.expired = False
        self.sessions = 0

    def create_read_session(self, parent: str, read_session: Any, max_stream_count: int) -> Any:
        from google.cloud.bigquery_storage_v1 import types

        self.sessions += 1
        assert list(read_session.read_options.selected_fields) == ["id", "text"]
        assert read_session.data_format == types.DataFormat.ARROW
        return types.ReadSession(
            name="projects/proj/locations/us/sessions/s1",
            streams=[
                types.ReadStream(name=f"projects/proj/locations/us/sessions/s1/streams/{i}")
                for i in range(len(self.streams))
            ],
            arrow_schema=types.ArrowSchema(serialized_schema=SCHEMA.serialize().to_pybytes()),
            estimated_row_count=sum(b.num_rows for s in self.streams for b in s),
        )

    def read_rows(self, name: str, offset: int = 0) -> Any:
        from google.api_core import exceptions as gexc
        from google.cloud.bigquery_storage_v1 import types

        self.calls.append((name, offset))
        if self.expired:
            raise gexc.NotFound("session expired")
        idx = int(name.rsplit("/", 1)[1])

        def gen():  # type: ignore[no-untyped-def]
            pos = 0
            for batch in self.streams[idx]:
                if pos + batch.num_rows <= offset:
                    pos += batch.num_rows
                    continue
                part = batch.slice(max(0, offset - pos))
                pos += batch.num_rows
                if idx in self.fail and pos > self.fail[idx]:
                    del self.fail[idx]
                    raise gexc.PermissionDenied("quota exceeded")
                yield types.ReadRowsResponse(
                    row_count=part.num_rows,
                    arrow_record_batch=types.ArrowRecordBatch(
                        serialized_record_batch=part.serialize().to_pybytes()
                    ),
                )

        return gen()


def make_streams(n_streams: int, batches: int, rows: int) -> list[list[pa.RecordBatch]]:
    out, k = [], 0
    for _ in range(n_streams):
        stream = []
        for _ in range(batches):
            ids = list(range(k, k + rows))
            texts = [None if i % 13 == 0 else f"tweet {i}" for i in ids]
            stream.append(
                pa.record_batch([pa.array(texts, pa.string()), pa.array(ids, pa.int64())], schema=SCHEMA)
            )
            k += rows
        out.append(stream)
    return out


def expected_ids(streams: list[list[pa.RecordBatch]]) -> list[str]:
    return sorted(
        str(i)
        for s in streams
        for b in s
        for i, t in zip(b.column(1).to_pylist(), b.column(0).to_pylist(), strict=True)
        if t
    )


@needs_bq
def test_fake_full_export(tmp_path):
    from tweet_embed.export.bigquery import export_bigquery

    streams = make_streams(3, 4, 50)
    out = str(tmp_path / "bq.jsonl")
    result = export_bigquery(
        out,
        table="proj.ds.tweets",
        bq_client=FakeBQ(),
        read_client=FakeReadClient(streams),
        show_progress=False,
        streams=3,
    )
    got = [r["_id"] for r in read_jsonl(out)]
    assert sorted(got) == expected_ids(streams) and len(got) == len(set(got))
    assert result.rows == len(got) and result.skipped == {SKIP_TEXT_MISSING: 600 - len(got)}
    assert not os.path.exists(state_path(out))


@needs_bq
def test_fake_resume_reopens_each_stream_at_its_offset(tmp_path):
    from tweet_embed.export.bigquery import export_bigquery

    streams = make_streams(3, 4, 50)
    out = str(tmp_path / "bq.jsonl.gz")
    reader = FakeReadClient(streams, fail={1: 120})
    with pytest.raises(ExportError, match="re-run the same command"):
        export_bigquery(
            out,
            table="proj.ds.tweets",
            bq_client=FakeBQ(),
            read_client=reader,
            show_progress=False,
            commit_rows=30,
        )
    state = orjson.loads(open(state_path(out), "rb").read())
    offsets = state["cursor"]["offsets"]
    assert offsets[1] == 100 and state["rows"] > 0
    # a crash can leave bytes after the last commit; the resume cuts them off
    with open(partial_path(out), "ab") as fh:
        fh.write(b"\x1f\x8b\x08 torn gzip member")
    reader.calls.clear()
    result = export_bigquery(
        out,
        table="proj.ds.tweets",
        bq_client=FakeBQ(),
        read_client=reader,
        show_progress=False,
        commit_rows=30,
    )
    assert reader.sessions == 1  # the recorded session was reused
    reopened = dict(reader.calls)
    for i, name in enumerate(state["cursor"]["streams"]):
        if not state["cursor"]["done"][i]:
            assert reopened[name] == offsets[i]
        else:
            assert name not in reopened
    got = [r["_id"] for r in read_jsonl(out)]
    assert sorted(got) == expected_ids(streams) and len(got) == len(set(got))
    assert result.resumed and result.skipped_total == 600 - len(got)


@needs_bq
def test_fake_ctrl_c_commits_what_was_written_and_stops_the_readers(tmp_path, monkeypatch):
    import threading

    from tweet_embed.export import bigquery as B

    streams = make_streams(3, 5, 40)
    out = str(tmp_path / "bq.jsonl.zst")
    real = B.batch_to_lines
    calls = {"n": 0}

    def interrupting(ids, texts):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real(ids, texts)

    monkeypatch.setattr(B, "batch_to_lines", interrupting)
    reader = FakeReadClient(streams)
    with pytest.raises(KeyboardInterrupt):
        B.export_bigquery(out, table="p.d.t", bq_client=FakeBQ(), read_client=reader, show_progress=False)
    assert not [t for t in threading.enumerate() if t.name.startswith("bq-stream-")]
    state = orjson.loads(open(state_path(out), "rb").read())
    assert sum(state["cursor"]["offsets"]) == 5 * 40  # the five batches written before Ctrl-C
    monkeypatch.setattr(B, "batch_to_lines", real)
    B.export_bigquery(out, table="p.d.t", bq_client=FakeBQ(), read_client=reader, show_progress=False)
    got = [r["_id"] for r in read_jsonl(out)]
    assert sorted(got) == expected_ids(streams) and len(got) == len(set(got))


@needs_bq
def test_fake_expired_session_says_restart(tmp_path):
    from tweet_embed.export.bigquery import export_bigquery

    streams = make_streams(2, 2, 10)
    out = str(tmp_path / "bq.jsonl")
    reader = FakeReadClient(streams, fail={0: 10})
    with pytest.raises(ExportError):
        export_bigquery(
            out, table="proj.ds.tweets", bq_client=FakeBQ(), read_client=reader, show_progress=False
        )
    reader.expired = True
    with pytest.raises(ExportError, match="--restart"):
        export_bigquery(
            out, table="proj.ds.tweets", bq_client=FakeBQ(), read_client=reader, show_progress=False
        )
    reader.expired = False
    result = export_bigquery(
        out, table="proj.ds.tweets", bq_client=FakeBQ(), read_client=reader, show_progress=False, restart=True
    )
    assert not result.resumed and result.rows == len(expected_ids(streams))


@needs_bq
def test_fake_query_reads_the_result_table(tmp_path):
    from tweet_embed.export.bigquery import export_bigquery

    class Job:
        job_id = "job1"
        ddl_target_table = None

        def __init__(self, config):  # type: ignore[no-untyped-def]
            anon = type("T", (), {"project": "proj", "dataset_id": "_anon", "table_id": "r1"})()
            self.destination = config.destination if config is not None else anon

        def result(self):  # type: ignore[no-untyped-def]
            return self

    class QueryBQ(FakeBQ):
        def __init__(self):  # type: ignore[no-untyped-def]
            self.jobs, self.tables = [], []

        def query(self, sql, location=None, job_config=None):  # type: ignore[no-untyped-def]
            self.jobs.append((sql, location, job_config))
            return Job(job_config)

        def get_table(self, ref):  # type: ignore[no-untyped-def]
            self.tables.append(ref)
            return FakeTable(ref, 0)

    streams = make_streams(1, 2, 10)
    bq = QueryBQ()
    export_bigquery(
        str(tmp_path / "a.jsonl"),
        query="SELECT 1",
        location="EU",
        bq_client=bq,
        read_client=FakeReadClient(streams),
        show_progress=False,
    )
    assert bq.jobs[0][:2] == ("SELECT 1", "EU") and bq.tables == ["proj._anon.r1"]
    export_bigquery(
        str(tmp_path / "b.jsonl"),
        query="SELECT 1",
        query_destination="ds.res",
        bq_client=bq,
        read_client=FakeReadClient(streams),
        show_progress=False,
    )
    assert str(bq.jobs[1][2].destination) == "proj.ds.res" and bq.tables[1] == "proj.ds.res"
    assert len(read_jsonl(str(tmp_path / "b.jsonl"))) == len(expected_ids(streams))


@needs_bq
def test_fake_missing_column(tmp_path):
    from tweet_embed.export.bigquery import export_bigquery

    with pytest.raises(ExportError, match=r"no column 'tweet_id' \(columns: text, id, other\).*--id-column"):
        export_bigquery(
            str(tmp_path / "o.jsonl"),
            table="proj.ds.t",
            id_column="tweet_id",
            bq_client=FakeBQ(),
            read_client=FakeReadClient([]),
            show_progress=False,
        )


# --- the emulator ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    with run_emulator(str(tmp_path_factory.mktemp("bqemu"))) as emu:
        yield emu


def seed_table(emu, table: str, n: int) -> list[tuple[int, str | None]]:  # type: ignore[no-untyped-def]
    """Load ``n`` rows (INT64 id, nullable STRING text, > 1 MB so that the session has several streams)."""
    from google.cloud import bigquery

    bq, _ = emu.clients()
    bq.create_dataset("ds", exists_ok=True)
    rows = [(i, None if i % 97 == 0 else f"tweet number {i} " + "x" * 60) for i in range(n)]
    path = os.path.join(emu.gcs_root, "seed.parquet")
    pq.write_table(
        pa.table(
            {
                "id": pa.array([r[0] for r in rows], pa.int64()),
                "text": pa.array([r[1] for r in rows], pa.string()),
                "lang": pa.array(["en"] * n),
            }
        ),
        path,
    )
    cfg = bigquery.LoadJobConfig(
        source_format="PARQUET",
        write_disposition="WRITE_TRUNCATE",
        schema=[
            bigquery.SchemaField("id", "INT64"),
            bigquery.SchemaField("text", "STRING"),
            bigquery.SchemaField("lang", "STRING"),
        ],
    )
    with open(path, "rb") as fh:
        bq.load_table_from_file(fh, table, job_config=cfg).result()
    return rows


@needs_emulator
def test_emulator_export_table_with_several_streams(emulator, tmp_path):
    from tweet_embed.export.bigquery import export_bigquery

    table = f"{emulator.project}.ds.tweets"
    rows = seed_table(emulator, table, 20_000)
    bq, read = emulator.clients()
    out = str(tmp_path / "t.jsonl.zst")
    result = export_bigquery(out, table=table, bq_client=bq, read_client=read, streams=4, show_progress=False)
    records = read_jsonl(out)
    got = {r["_id"]: r["text"] for r in records}
    assert len(got) == len(records)
    assert got == {str(i): t for i, t in rows if t}
    assert result.extra["streams"] > 1
    assert result.skipped == {SKIP_TEXT_MISSING: sum(1 for _, t in rows if t is None)}


@needs_emulator
def test_emulator_export_query(emulator, tmp_path):
    """The query path: job, result table, read session. The emulator can read a query's result through the
    Storage API only when the query names its table (CREATE TABLE ... AS SELECT), so that is the query here."""
    from tweet_embed.export.bigquery import export_bigquery

    table = f"{emulator.project}.ds.q"
    rows = seed_table(emulator, table, 1000)
    bq, read = emulator.clients()
    out = str(tmp_path / "q.jsonl")
    sql = (
        f"CREATE OR REPLACE TABLE ds.q_result AS SELECT id AS tweet_id, text AS body FROM `{table}` "
        "WHERE MOD(id, 3) = 0"
    )
    export_bigquery(
        out,
        query=sql,
        id_column="tweet_id",
        text_column="body",
        bq_client=bq,
        read_client=read,
        show_progress=False,
    )
    got = sorted(int(r["_id"]) for r in read_jsonl(out))
    assert got == [i for i, t in rows if t and i % 3 == 0]


@needs_emulator
def test_emulator_missing_column(emulator, tmp_path):
    from tweet_embed.export.bigquery import export_bigquery

    table = f"{emulator.project}.ds.mc"
    seed_table(emulator, table, 10)
    bq, read = emulator.clients()
    with pytest.raises(ExportError, match=r"no column 'body' \(columns: id, text, lang\)"):
        export_bigquery(
            str(tmp_path / "o.jsonl"),
            table=table,
            text_column="body",
            bq_client=bq,
            read_client=read,
            show_progress=False,
        )


@needs_emulator
def test_emulator_cli_export(emulator, tmp_path, capsys):
    from tweet_embed import cli

    table = f"{emulator.project}.ds.cli"
    rows = seed_table(emulator, table, 300)
    out = str(tmp_path / "cli.jsonl")
    argv = ["export", "bigquery", "--table", table, "--out", out, "--project", emulator.project]
    argv += ["--api-endpoint", emulator.rest, "--read-endpoint", emulator.grpc]
    assert cli.main(argv) == 0
    assert sorted(int(r["_id"]) for r in read_jsonl(out)) == [i for i, t in rows if t]
    assert f"wrote {sum(1 for _, t in rows if t)} rows" in capsys.readouterr().out
    assert cli.main(argv) == 1  # a second run refuses to overwrite


def test_cli_missing_library_exit_code(monkeypatch, tmp_path):
    from tweet_embed import cli

    monkeypatch.setitem(sys.modules, "google.cloud.bigquery_storage_v1", None)
    assert cli.main(["export", "bigquery", "--table", "p.d.t", "--out", str(tmp_path / "o.jsonl")]) == 2
    assert cli.main(["load", "bigquery", "--table", "p.d.t", str(tmp_path)]) == 2
