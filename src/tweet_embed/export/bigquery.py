"""``export bigquery``: a table or a query result into ``{_id, text}`` JSONL through the Storage Read API.

How: one read session (Arrow format, only the id and text columns, up to ``--streams`` streams) read by one
thread per stream; the main thread writes each Arrow record batch as JSONL lines. A commit records the
session, its streams and, per stream, how many rows were written or skipped; a resumed export reopens each
unfinished stream at that offset (``ReadRows`` with ``offset``). Read sessions expire after about six hours:
past that, the export cannot resume and says to start again with ``--restart``.

``--query`` runs the query first; its result table (BigQuery's anonymous one, kept ~24 h, or
``--query-destination``) is what the session reads, and it is recorded in the commit, so a resume reads the
same result.

Credentials are Application Default Credentials (``gcloud auth application-default login`` or
``GOOGLE_APPLICATION_CREDENTIALS``). ``--api-endpoint``/``--read-endpoint`` point at an emulator instead,
with anonymous credentials.
"""

from __future__ import annotations

import decimal
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

from tweet_embed.export.jsonl_writer import (
    SKIP_INVALID_ID,
    SKIP_TEXT_EMPTY,
    SKIP_TEXT_MISSING,
    SKIP_TEXT_NOT_STRING,
    ExportError,
    ExportResult,
    ResumableJsonlWriter,
    encode_line,
)

log = logging.getLogger("tweet_embed")

BIGQUERY_EXTRA = "pip install 'tweet-embed[bigquery]'"


def require_bigquery() -> None:
    """Raise :class:`ExportError` naming the extra when the Google libraries are missing."""
    try:
        import google.cloud.bigquery  # noqa: F401
        import google.cloud.bigquery_storage_v1  # noqa: F401
    except ImportError as exc:
        raise ExportError(
            f"this command needs google-cloud-bigquery and google-cloud-bigquery-storage "
            f"({exc.name} is missing): {BIGQUERY_EXTRA}"
        ) from None


@dataclass(frozen=True)
class TableRef:
    project: str | None
    dataset: str
    table: str

    @classmethod
    def parse(cls, text: str) -> TableRef:
        """``project.dataset.table`` (also ``project:dataset.table``) or ``dataset.table``."""
        parts = text.replace(":", ".", 1).split(".") if ":" in text else text.split(".")
        if len(parts) == 3 and all(parts):
            return cls(parts[0], parts[1], parts[2])
        if len(parts) == 2 and all(parts):
            return cls(None, parts[0], parts[1])
        raise ExportError(f"--table must be PROJECT.DATASET.TABLE (or DATASET.TABLE), not {text!r}")

    def with_project(self, project: str) -> TableRef:
        return self if self.project else TableRef(project, self.dataset, self.table)

    @property
    def dotted(self) -> str:
        return (
            f"{self.project}.{self.dataset}.{self.table}" if self.project else f"{self.dataset}.{self.table}"
        )

    @property
    def path(self) -> str:
        """The Storage API's resource name."""
        return f"projects/{self.project}/datasets/{self.dataset}/tables/{self.table}"


def make_clients(
    project: str | None = None, api_endpoint: str | None = None, read_endpoint: str | None = None
) -> tuple[Any, Any]:
    """A BigQuery client and a Storage Read client (ADC, or anonymous against an emulator)."""
    require_bigquery()
    import google.auth.exceptions
    from google.cloud import bigquery, bigquery_storage_v1

    try:
        if api_endpoint:
            from google.api_core.client_options import ClientOptions
            from google.auth.credentials import AnonymousCredentials

            bq = bigquery.Client(
                project=project or "emulator",
                credentials=AnonymousCredentials(),
                client_options=ClientOptions(api_endpoint=api_endpoint),
            )
        else:
            bq = bigquery.Client(project=project)
        if read_endpoint:
            import grpc
            from google.cloud.bigquery_storage_v1.services.big_query_read.transports import (
                BigQueryReadGrpcTransport,
            )

            channel = grpc.insecure_channel(read_endpoint.removeprefix("http://"))
            read = bigquery_storage_v1.BigQueryReadClient(
                transport=BigQueryReadGrpcTransport(channel=channel)
            )
        elif api_endpoint:
            read = None  # only the REST API was pointed elsewhere; reads are not needed (load)
        else:
            read = bigquery_storage_v1.BigQueryReadClient()
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise ExportError(
            "no Google credentials: run `gcloud auth application-default login` or set "
            f"GOOGLE_APPLICATION_CREDENTIALS ({exc})"
        ) from None
    return bq, read


def bq_id_to_str(value: Any) -> str | None:
    """INT64 in decimal, STRING as is, NUMERIC without a needless exponent, BYTES as hex; None if unusable."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        return value or None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, decimal.Decimal):
        return str(int(value)) if value == value.to_integral_value() else str(value)
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def batch_to_lines(ids: list[Any], texts: list[Any]) -> tuple[bytes, int, dict[str, int]]:
    """Encode one record batch: ``(jsonl bytes, rows written, skipped counts by reason)``."""
    parts: list[bytes] = []
    skipped: dict[str, int] = {}
    for raw_id, text in zip(ids, texts, strict=True):
        rid = bq_id_to_str(raw_id)
        if rid is None:
            reason = SKIP_INVALID_ID
        elif text is None:
            reason = SKIP_TEXT_MISSING
        elif not isinstance(text, str):
            reason = SKIP_TEXT_NOT_STRING
        elif not text:
            reason = SKIP_TEXT_EMPTY
        else:
            parts.append(encode_line(rid, text))
            continue
        skipped[reason] = skipped.get(reason, 0) + 1
    return b"".join(parts), len(parts), skipped


_END = object()


def _read_stream(
    read_client: Any,
    name: str,
    offset: int,
    schema: Any,
    idx: int,
    out: queue.Queue,
    stop: threading.Event,
    live: dict[int, Any],
) -> None:
    """Thread body: decode a stream's Arrow batches into ``out`` as ``(idx, batch | _END | exception)``.

    The open stream is left in ``live`` so that the main thread can cancel it when it stops early (a thread
    waiting for the server's next message would otherwise not notice ``stop``).
    """
    import pyarrow as pa

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    try:
        stream = read_client.read_rows(name, offset=offset)
        live[idx] = stream
        if stop.is_set():
            return
        for resp in stream:
            if stop.is_set():
                return
            payload = resp.arrow_record_batch.serialized_record_batch
            if not payload:
                continue
            batch = pa.ipc.read_record_batch(pa.py_buffer(payload), schema)
            if not put((idx, batch)):
                return
        put((idx, _END))
    except BaseException as exc:  # noqa: BLE001 - handed to the main thread
        if not stop.is_set():
            put((idx, exc))
    finally:
        live.pop(idx, None)


def _cancel_all(live: dict[int, Any]) -> None:
    for stream in list(live.values()):
        cancel = getattr(stream, "cancel", None)
        if cancel is not None:
            try:
                cancel()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass


def export_bigquery(
    out: str,
    *,
    table: str | None = None,
    query: str | None = None,
    id_column: str = "id",
    text_column: str = "text",
    project: str | None = None,
    location: str | None = None,
    query_destination: str | None = None,
    streams: int = 4,
    restart: bool = False,
    overwrite: bool = False,
    commit_rows: int = 200_000,
    commit_seconds: float = 10.0,
    show_progress: bool = True,
    bq_client: Any = None,
    read_client: Any = None,
) -> ExportResult:
    """Export a BigQuery table or query result to ``out`` (see the module docstring)."""
    if (table is None) == (query is None):
        raise ExportError("give exactly one of --table and --query")
    if streams < 1:
        raise ExportError("--streams must be at least 1")
    if query_destination and query is None:
        raise ExportError("--query-destination goes with --query")
    source = {
        "kind": "bigquery",
        "table": table,
        "query": query,
        "query_destination": query_destination,
        "id_column": id_column,
        "text_column": text_column,
    }
    writer = ResumableJsonlWriter(
        out,
        source,
        restart=restart,
        overwrite=overwrite,
        commit_rows=commit_rows,
        commit_seconds=commit_seconds,
    )
    with writer:
        if bq_client is None or read_client is None:
            made_bq, made_read = make_clients(project)
            bq_client = bq_client or made_bq
            read_client = read_client or made_read
        billing = project or bq_client.project
        cursor = writer.cursor
        writer.position = dict(cursor) if cursor else None
        try:
            if cursor and cursor.get("session"):
                position = dict(cursor)
                schema = _session_schema(cursor)
                total = None
                log.info(
                    "resuming the export to %s: %d rows already written; session %s, %d of %d streams left",
                    out,
                    writer.rows,
                    position["session"],
                    position["done"].count(False),
                    len(position["streams"]),
                )
            else:
                ref = _source_table(
                    bq_client, table, query, location, id_column, text_column, query_destination
                )
                session = _create_session(read_client, billing, ref, id_column, text_column, streams)
                names = [s.name for s in session.streams]
                schema_bytes = bytes(session.arrow_schema.serialized_schema)
                schema = _schema_from_bytes(schema_bytes) if schema_bytes else None
                total = int(session.estimated_row_count or 0) or None
                position = {
                    "session": session.name,
                    "table": ref.path,
                    "streams": names,
                    "offsets": [0] * len(names),
                    "done": [False] * len(names),
                    "schema": schema_bytes.hex(),
                }
                # Commit the session before reading, so that a resume reopens these very streams.
                writer.commit(position)
                log.info(
                    "exporting %s (about %s rows, %d streams) to %s",
                    ref.dotted,
                    "?" if total is None else f"{total:,}",
                    len(names),
                    out,
                )
            writer.position = position
            if schema is not None:
                _pump(writer, read_client, schema, id_column, text_column, total, show_progress)
            return writer.finish(
                writer.position, extra={"session": position["session"], "streams": len(position["streams"])}
            )
        except BaseException:
            if writer.position is not None:  # never replace a recorded session by "nothing read yet"
                writer.commit_quietly(lambda pos: pos)
            raise


def _schema_from_bytes(data: bytes) -> Any:
    import pyarrow as pa

    return pa.ipc.read_schema(pa.py_buffer(data))


def _session_schema(cursor: dict) -> Any:
    if not cursor.get("schema"):
        raise ExportError("the export state has no Arrow schema (use --restart)")
    return _schema_from_bytes(bytes.fromhex(cursor["schema"]))


def _source_table(
    bq_client: Any,
    table: str | None,
    query: str | None,
    location: str | None,
    id_column: str,
    text_column: str,
    destination: str | None = None,
) -> TableRef:
    """The table to read: ``--table`` (its columns checked), or the result table of ``--query``."""
    from google.api_core import exceptions as gexc

    try:
        if query is not None:
            job_config = None
            if destination:
                from google.cloud import bigquery

                dest_ref = TableRef.parse(destination).with_project(bq_client.project)
                job_config = bigquery.QueryJobConfig(
                    destination=dest_ref.dotted, write_disposition="WRITE_TRUNCATE"
                )
            job = bq_client.query(query, location=location, job_config=job_config)
            log.info("running the query (job %s)", job.job_id)
            job.result()
            dest = job.destination or getattr(job, "ddl_target_table", None)
            if dest is None:
                raise ExportError("the query produced no result table to read (is it a SELECT?)")
            ref = TableRef(dest.project, dest.dataset_id, dest.table_id)
        else:
            assert table is not None
            ref = TableRef.parse(table).with_project(bq_client.project)
        meta = bq_client.get_table(ref.dotted)
    except gexc.GoogleAPICallError as exc:
        raise ExportError(f"BigQuery: {exc}") from exc
    names = [f.name for f in meta.schema]
    for col, flag in ((id_column, "--id-column"), (text_column, "--text-column")):
        if col not in names:
            raise ExportError(
                f"{ref.dotted} has no column {col!r} (columns: {', '.join(names)}); choose it with {flag}"
            )
    return ref


def _create_session(
    read_client: Any, billing: str, ref: TableRef, id_column: str, text_column: str, streams: int
) -> Any:
    from google.api_core import exceptions as gexc
    from google.cloud.bigquery_storage_v1 import types

    fields = [id_column] if id_column == text_column else [id_column, text_column]
    request = types.ReadSession(
        table=ref.path,
        data_format=types.DataFormat.ARROW,
        read_options=types.ReadSession.TableReadOptions(selected_fields=fields),
    )
    try:
        return read_client.create_read_session(
            parent=f"projects/{billing}", read_session=request, max_stream_count=streams
        )
    except gexc.GoogleAPICallError as exc:
        raise ExportError(f"BigQuery Storage API: cannot open a read session on {ref.dotted}: {exc}") from exc


def _pump(
    writer: ResumableJsonlWriter,
    read_client: Any,
    schema: Any,
    id_column: str,
    text_column: str,
    total: int | None,
    show_progress: bool,
) -> None:
    """Read the unfinished streams in threads and write their batches; commit as the writer asks."""
    from google.api_core import exceptions as gexc

    from tweet_embed.export.mongo import _NoProgress
    from tweet_embed.progress import Progress

    names: list[str] = writer.position["streams"]
    offsets: list[int] = list(writer.position["offsets"])
    done: list[bool] = list(writer.position["done"])
    id_index, text_index = schema.get_field_index(id_column), schema.get_field_index(text_column)
    if id_index < 0 or text_index < 0:
        raise ExportError(
            f"the read session has columns {schema.names}, not {id_column!r} and {text_column!r}"
        )
    todo = [i for i, d in enumerate(done) if not d]
    q: queue.Queue = queue.Queue(maxsize=2 * max(1, len(todo)))
    stop = threading.Event()
    live: dict[int, Any] = {}
    threads = [
        threading.Thread(
            target=_read_stream,
            args=(read_client, names[i], offsets[i], schema, i, q, stop, live),
            name=f"bq-stream-{i}",
            daemon=True,
        )
        for i in todo
    ]
    progress = Progress(total_rows=max(0, (total or 0)))
    for t in threads:
        t.start()
    remaining = len(todo)
    try:
        with progress if show_progress else _NoProgress():
            while remaining:
                idx, item = q.get()
                if item is _END:
                    done[idx] = True
                    remaining -= 1
                    writer.advance(_next(writer.position, offsets, done))
                    continue
                if isinstance(item, BaseException):
                    if (
                        isinstance(item, gexc.NotFound | gexc.FailedPrecondition | gexc.InvalidArgument)
                        and writer.resumed
                    ):
                        raise ExportError(
                            f"cannot resume stream {names[idx]}: {item}. BigQuery read sessions expire after "
                            "about 6 hours; start the export again with --restart"
                        ) from item
                    if isinstance(item, gexc.GoogleAPICallError):
                        raise ExportError(
                            f"BigQuery Storage API: {item}; re-run the same command to resume"
                        ) from item
                    raise item
                batch = item
                data, n, skipped = batch_to_lines(
                    batch.column(id_index).to_pylist(), batch.column(text_index).to_pylist()
                )
                offsets[idx] += batch.num_rows
                writer.write_lines(data, n, position=_next(writer.position, offsets, done), skipped=skipped)
                progress.add(n, batch.num_rows)
                if writer.due():
                    writer.commit(writer.position)
    finally:
        stop.set()
        _cancel_all(live)
        for t in threads:
            t.join(timeout=5)


def _next(position: dict, offsets: list[int], done: list[bool]) -> dict:
    """A new position (never mutate the recorded one: it may be what the last commit wrote)."""
    return {**position, "offsets": list(offsets), "done": list(done)}
