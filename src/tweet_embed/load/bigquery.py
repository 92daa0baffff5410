"""``load bigquery``: load the consolidated Parquet into a BigQuery table, embedding as ``ARRAY<FLOAT64>``.

Why list inference: Parquet stores the vector as a LIST of FLOAT; without ``enableListInference`` BigQuery
makes it a ``RECORD`` with a ``list.element`` sub-field. With it, the column is ``REPEATED FLOAT64``.

Two sources:
- ``gs://bucket/path`` (a prefix, a file, or a wildcard): one load job over all files; BigQuery reads the
  schema from the Parquet files.
- a local directory or file: one load job per file (uploaded), with the schema derived from the Parquet
  schema, so the table gets exactly ``id STRING REQUIRED, embedding FLOAT64 REPEATED`` (plus any other
  column). The first job uses the chosen write mode, the others append; if a run is cut short, re-run with
  ``--replace``.

The rows the table gained are checked against the Parquet footers (local) and printed with the job ids.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("tweet_embed")

MODES = {"empty": "WRITE_EMPTY", "replace": "WRITE_TRUNCATE", "append": "WRITE_APPEND"}


class LoadError(Exception):
    """A load that cannot start or did not load what it should have."""


@dataclass
class LoadResult:
    table: str
    jobs: list[str] = field(default_factory=list)
    rows: int = 0  # rows the table gained
    files: int = 0
    expected_rows: int | None = None  # from the Parquet footers (local files only)
    table_rows: int | None = None  # the table's row count afterwards


def is_gcs(source: str) -> bool:
    return source.startswith("gs://")


def gcs_uris(source: str) -> list[str]:
    """A GCS file or wildcard as is; a prefix (``gs://b/dir`` or ``gs://b/dir/``) becomes ``.../*.parquet``."""
    if "*" in source or source.lower().endswith(".parquet"):
        return [source]
    return [source.rstrip("/") + "/*.parquet"]


def local_parquet_files(source: str) -> list[str]:
    """The non-hidden ``.parquet`` files of a directory (sorted), or the one file given."""
    from tweet_embed.input.parquet import expand_parquet_inputs
    from tweet_embed.input.records import InputError

    if not os.path.exists(source):
        raise LoadError(
            f"not found: {source} (give the consolidated directory, a .parquet file or a gs:// URI)"
        )
    try:
        return expand_parquet_inputs(source)
    except InputError as exc:
        raise LoadError(str(exc)) from None


def bigquery_schema(arrow_schema: Any) -> list[Any]:
    """BigQuery ``SchemaField``s for an Arrow schema; lists become ``REPEATED`` fields of their element."""
    return [_field(f) for f in arrow_schema]


def _field(f: Any, inside_list: bool = False) -> Any:
    import pyarrow as pa
    from google.cloud.bigquery import SchemaField

    t = f.type
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        if inside_list:
            raise LoadError(f"column {f.name!r}: BigQuery has no arrays of arrays")
        inner = _field(pa.field(f.name, t.value_type), inside_list=True)
        return SchemaField(f.name, inner.field_type, mode="REPEATED", fields=inner.fields)
    if pa.types.is_struct(t):
        sub = [_field(t.field(i)) for i in range(t.num_fields)]
        return SchemaField(f.name, "RECORD", mode=_mode(f, inside_list), fields=sub)
    return SchemaField(f.name, _scalar_type(f.name, t), mode=_mode(f, inside_list))


def _mode(f: Any, inside_list: bool) -> str:
    return "NULLABLE" if inside_list or f.nullable else "REQUIRED"


def _scalar_type(name: str, t: Any) -> str:
    import pyarrow as pa

    checks: list[tuple[Callable[[Any], bool], str]] = [
        (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "STRING"),
        (pa.types.is_boolean, "BOOL"),
        (lambda t: pa.types.is_signed_integer(t) or t in (pa.uint8(), pa.uint16(), pa.uint32()), "INT64"),
        (pa.types.is_floating, "FLOAT64"),
        (
            lambda t: (
                pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
            ),
            "BYTES",
        ),
        (lambda t: pa.types.is_timestamp(t) and t.tz is not None, "TIMESTAMP"),
        (pa.types.is_timestamp, "DATETIME"),
        (pa.types.is_date, "DATE"),
        (pa.types.is_decimal, "NUMERIC"),
    ]
    for check, bq_type in checks:
        if check(t):
            return bq_type
    raise LoadError(f"column {name!r}: no BigQuery type for Parquet/Arrow type {t}")


def _description(path: str) -> str | None:
    from tweet_embed.parquet import read_metadata

    md = read_metadata(path)
    if not md:
        return None
    keys = ("model", "dim", "normalize", "backend", "version")
    return "tweet-embed embeddings: " + ", ".join(f"{k}={md[k]}" for k in keys if k in md)


def load_bigquery(
    table: str,
    source: str,
    *,
    mode: str = "empty",
    project: str | None = None,
    location: str | None = None,
    bq_client: Any = None,
) -> LoadResult:
    """Load ``source`` (local consolidated Parquet, or ``gs://``) into ``table`` (``P.D.T`` or ``D.T``)."""
    from tweet_embed.export.bigquery import TableRef, make_clients
    from tweet_embed.export.jsonl_writer import ExportError

    if mode not in MODES:
        raise LoadError(f"mode must be one of {', '.join(MODES)}")
    try:
        if bq_client is None:
            bq_client, _ = make_clients(project)
        ref = TableRef.parse(table).with_project(project or bq_client.project)
    except ExportError as exc:
        raise LoadError(str(exc)) from None
    from google.api_core import exceptions as gexc
    from google.cloud import bigquery

    def config(disposition: str, schema: list[Any] | None, description: str | None) -> Any:
        options = bigquery.ParquetOptions()
        options.enable_list_inference = True
        cfg = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            parquet_options=options,
            write_disposition=disposition,
        )
        if schema is not None:
            cfg.schema = schema
        if description:
            cfg.destination_table_description = description
        return cfg

    def table_rows() -> int | None:
        try:
            meta = bq_client.get_table(ref.dotted)
        except gexc.NotFound:
            return None
        return None if meta.num_rows is None else int(meta.num_rows)

    result = LoadResult(ref.dotted)
    try:
        before = (table_rows() or 0) if mode == "append" else 0
        if is_gcs(source):
            uris = gcs_uris(source)
            job = bq_client.load_table_from_uri(
                uris, ref.dotted, job_config=config(MODES[mode], None, None), location=location
            )
            log.info("load job %s: %s -> %s", job.job_id, ", ".join(uris), ref.dotted)
            job.result()
            result.jobs.append(job.job_id)
            result.files = len(uris)
        else:
            import pyarrow.parquet as pq

            files = local_parquet_files(source)
            schema0 = pq.read_schema(files[0])
            expected = 0
            for f in files:
                s = pq.read_schema(f)
                if not s.equals(schema0, check_metadata=False):
                    raise LoadError(f"{f} has another schema than {files[0]}:\n{s}\nvs\n{schema0}")
                expected += pq.ParquetFile(f).metadata.num_rows
            schema = bigquery_schema(schema0)
            description = _description(files[0])
            result.expected_rows = expected
            for i, f in enumerate(files):
                disposition = MODES[mode] if i == 0 else "WRITE_APPEND"
                with open(f, "rb") as fh:
                    job = bq_client.load_table_from_file(
                        fh, ref.dotted, job_config=config(disposition, schema, description), location=location
                    )
                    job.result()
                result.jobs.append(job.job_id)
                result.files += 1
                log.info(
                    "load job %s: %s, %s rows (%d of %d files)",
                    job.job_id,
                    os.path.basename(f),
                    job.output_rows,
                    i + 1,
                    len(files),
                )
        result.table_rows = table_rows()
        # Counted on the table, not summed from the jobs: "rows this load added" whatever the mode.
        result.rows = (result.table_rows or 0) - before
        if result.expected_rows is not None and result.rows != result.expected_rows:
            raise LoadError(
                f"the table gained {result.rows} rows but the Parquet files hold {result.expected_rows}"
                " (was something else writing to it?)"
            )
    except gexc.GoogleAPICallError as exc:
        done = f" ({len(result.jobs)} load jobs had finished: re-run with --replace)" if result.jobs else ""
        raise LoadError(f"BigQuery: {exc}{done}") from exc
    return result
