"""Consolidation: thousands of small shards → a few BigQuery-ready Parquet files, exactly once.

Why this shape:

- **Bounded memory whatever the total size.** Duplicate ids are found by DuckDB over the ``id`` column only
  (spilling to ``<out>/.consolidate/duckdb-tmp``); the result is a small sorted "drop list" (shard, row) kept on
  disk. The vectors are then streamed shard by shard with pyarrow (``iter_batches``) and written with
  ``ParquetWriter`` one row group at a time, so the process holds about two row groups at most.
- **Deterministic output.** Which rows go into which file and row group depends only on the rows themselves
  (exact per-row byte counts, never on batch boundaries or timing), so an interrupted run that resumes after
  its last finished file writes byte-identical files and the same manifest as an uninterrupted one.
- **Crash safety.** Files are written under a hidden ``.embeddings-NNNNN.parquet.partial`` name, fsynced and
  renamed; ``.consolidate/progress.json`` records each finished file (and the stream position after it);
  ``_manifest.json`` is written last, atomically, and marks completion. ``--delete-shards`` deletes inputs only
  after the output has been checked against them (checksums, row counts, every shard id present once).

Output layout (what BigQuery's ``--parquet_enable_list_inference`` turns into ``embedding ARRAY<FLOAT64>``)::

    required group schema {
      required binary id (String);
      required group embedding (List) { repeated group list { required float element; } }
      [required binary text (String);]            # only with --keep-text
    }

float32 elements load as FLOAT64 exactly (every float32 is a float64); no dictionary encoding (ids are unique,
floats do not repeat), zstd, key-value metadata of the shards carried over.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tweet_embed.consolidate.layout import (
    DROPS,
    FORMAT,
    LOCK,
    MANIFEST,
    MIB,
    OUTPUT_PREFIX,
    OUTPUT_RE,
    PROGRESS,
    STAGING,
    ConsolidateError,
    _read_json,
    _sql_str,
    duckdb_connect,
    human,
    list_shards,
    parse_size,
    read_manifest,
)
from tweet_embed.parquet import META_PREFIX, fsync_dir, fsync_path, write_atomic

log = logging.getLogger("tweet_embed.consolidate.merge")

DEFAULT_TARGET_SIZE = "2GB"
DEFAULT_ROW_GROUP_SIZE = "128MiB"
BIGQUERY_MIN_ROW_GROUP = 16 * MIB
# Metadata that must agree across shards; other keys (device, dtype, version) are taken from the first shard.
IDENTITY_KEYS = ("backend", "model", "dim", "normalize")
EXAMPLES = 10
ID_BATCH = 1_000_000  # ids per insert into DuckDB
BUCKET_IDS = 4_000_000  # ids deduplicated at once (hash buckets)
# Values handed to the Parquet column writer at once (default 1024): fewer per-batch overheads make writing
# 3-level lists about 1.5x faster; pages still close near the 1 MB page size (64k floats = 256 KB per batch).
WRITE_BATCH_VALUES = 1 << 16
PREFETCH_CHUNKS = 2

# ------------------------------------------------------------------------------------------------ shards


@dataclass(frozen=True)
class ShardInfo:
    name: str
    path: str
    rows: int
    bytes: int


def _meta_of(schema: pa.Schema) -> dict[str, str]:
    out = {}
    for k, v in (schema.metadata or {}).items():
        key = k.decode()
        if key.startswith(META_PREFIX):
            out[key[len(META_PREFIX) :]] = v.decode()
    return out


def embedding_dim(field_type: pa.DataType) -> int | None:
    """The fixed dimension of an embedding column type, or None for a variable-size list."""
    if pa.types.is_fixed_size_list(field_type):
        return int(field_type.list_size)
    return None


def scan_shards(paths: Sequence[str]) -> tuple[list[ShardInfo], dict[str, str], int]:
    """Read every shard's footer: row counts, metadata, and refuse mixed models or dimensions."""
    if not paths:
        raise ConsolidateError("no shards to consolidate")
    infos: list[ShardInfo] = []
    groups: dict[tuple[str, ...], list[str]] = {}
    first_meta: dict[str, str] | None = None
    for p in paths:
        try:
            md = pq.read_metadata(p)
            schema = md.schema.to_arrow_schema()
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for damaged files
            raise ConsolidateError(f"cannot read shard {p}: {exc}") from exc
        if "id" not in schema.names or "embedding" not in schema.names:
            raise ConsolidateError(f"{p} is not an embedding shard (columns: {', '.join(schema.names)})")
        etype = schema.field("embedding").type
        if not (pa.types.is_fixed_size_list(etype) or pa.types.is_list(etype)) or not pa.types.is_floating(
            etype.value_type
        ):
            raise ConsolidateError(f"{p}: embedding column has type {etype}, expected a list of floats")
        meta = _meta_of(schema)
        fixed = embedding_dim(etype)
        if "dim" not in meta and fixed is not None:
            meta["dim"] = str(fixed)
        if fixed is not None and meta.get("dim") != str(fixed):
            raise ConsolidateError(f"{p}: metadata says dim {meta.get('dim')} but vectors have {fixed}")
        if first_meta is None:
            first_meta = meta
        key = tuple(f"{k}={meta.get(k, '?')}" for k in IDENTITY_KEYS)
        groups.setdefault(key, []).append(os.path.basename(p))
        infos.append(ShardInfo(os.path.basename(p), p, md.num_rows, os.path.getsize(p)))
    if len(groups) > 1:
        lines = [f"  {', '.join(k)}: {len(v)} shard(s), e.g. {v[0]}" for k, v in groups.items()]
        raise ConsolidateError(
            "shards come from different models or dimensions and cannot go into one table:\n"
            + "\n".join(lines)
            + "\nmove the shards of each model into its own directory and consolidate them separately"
        )
    assert first_meta is not None
    try:
        dim = int(first_meta["dim"])
    except (KeyError, ValueError):
        raise ConsolidateError(f"{paths[0]}: no usable dimension in metadata (tweet_embed.dim)") from None
    return infos, first_meta, dim


# ------------------------------------------------------------------------------------------------ DuckDB


@dataclass
class DedupeResult:
    dropped: int  # rows dropped (later occurrences)
    ids: int  # distinct ids that occurred more than once
    examples: list[str]


def find_duplicates(
    shards: Sequence[ShardInfo], drops_path: str, temp_dir: str, memory_limit: str, buckets: int | None = None
) -> DedupeResult:
    """Write the sorted (shard index, row) list of later occurrences of repeated ids to ``drops_path``.

    First occurrence wins: order is shard name, then row inside the shard. The ids (only that column) are
    loaded once into an on-disk DuckDB table with their bucket ``hash(id) % P``; each bucket (about
    ``BUCKET_IDS`` rows) is then deduplicated on its own, so memory does not depend on the total. (One GROUP BY
    over 100M string ids ran DuckDB out of memory at a 1 GB limit.)
    """
    total = sum(s.rows for s in shards)
    p_buckets = buckets or max(1, -(-total // BUCKET_IDS))
    work = os.path.join(temp_dir, "dedupe")
    shutil.rmtree(work, ignore_errors=True)
    con = duckdb_connect(os.path.join(work, "spill"), memory_limit, path=os.path.join(work, "ids.duckdb"))
    try:
        con.execute("CREATE TABLE ids (id VARCHAR, shard INTEGER, rownum BIGINT, b USMALLINT)")
        pending: list[pa.Table] = []
        n_pending = 0

        def flush() -> None:
            nonlocal pending, n_pending
            if pending:
                con.register("id_batch", pa.concat_tables(pending))
                con.execute(
                    f"INSERT INTO ids SELECT id, shard, rownum, (hash(id) % {p_buckets})::USMALLINT AS b "
                    "FROM id_batch ORDER BY b"
                )
                con.unregister("id_batch")
                pending, n_pending = [], 0

        for si, sh in enumerate(shards):
            offset = 0
            for batch in pq.ParquetFile(sh.path).iter_batches(batch_size=ID_BATCH, columns=["id"]):
                n = batch.num_rows
                pending.append(
                    pa.table(
                        {
                            "id": batch.column(0),
                            "shard": pa.array(np.full(n, si, np.int32)),
                            "rownum": pa.array(np.arange(offset, offset + n, dtype=np.int64)),
                        }
                    )
                )
                offset += n
                n_pending += n
                if n_pending >= ID_BATCH:
                    flush()
        flush()
        con.execute("CREATE TABLE drops (shard INTEGER, rownum BIGINT, id VARCHAR)")
        for k in range(p_buckets):
            con.execute(f"""
                INSERT INTO drops
                WITH t AS (SELECT id, shard, rownum FROM ids WHERE b = {k}),
                     d AS (SELECT id FROM t GROUP BY id HAVING count(*) > 1)
                SELECT shard, rownum, id FROM (
                    SELECT t.shard, t.rownum, t.id,
                           row_number() OVER (PARTITION BY t.id ORDER BY t.shard, t.rownum) AS rn
                    FROM t SEMI JOIN d ON t.id = d.id)
                WHERE rn > 1""")
        dropped, nids = con.execute("SELECT count(*), count(DISTINCT id) FROM drops").fetchone()  # type: ignore[misc]
        examples = [
            r[0]
            for r in con.execute(  # distinct ids, in the order of their first dropped copy
                f"SELECT id FROM drops GROUP BY id ORDER BY min({{'s': shard, 'r': rownum}}) LIMIT {EXAMPLES}"
            ).fetchall()
        ]
        tmp = drops_path + ".tmp"
        con.execute(
            f"COPY (SELECT shard, rownum FROM drops ORDER BY shard, rownum) TO '{_sql_str(tmp)}' "
            "(FORMAT parquet, COMPRESSION zstd)"
        )
        fsync_path(tmp)
        os.replace(tmp, drops_path)
    finally:
        con.close()
        shutil.rmtree(work, ignore_errors=True)
    return DedupeResult(int(dropped), int(nids), examples)


class DropList:
    """Streams the sorted drop list; ``rows_for(i)`` returns shard ``i``'s dropped rows (ask in order)."""

    def __init__(self, path: str | None) -> None:
        self._batches: Iterator[pa.RecordBatch] = (
            pq.ParquetFile(path).iter_batches(batch_size=1 << 20)
            if path and os.path.exists(path)
            else iter(())
        )
        self._shard = np.empty(0, np.int64)
        self._row = np.empty(0, np.int64)
        self._pos = 0

    def rows_for(self, shard_idx: int) -> np.ndarray:
        out = []
        while True:
            if self._pos >= len(self._shard):
                b = next(self._batches, None)
                if b is None:
                    break
                self._shard = b.column(0).to_numpy().astype(np.int64)
                self._row = b.column(1).to_numpy().astype(np.int64)
                self._pos = 0
                continue
            s = self._shard[self._pos :]
            lo = int(np.searchsorted(s, shard_idx, "left"))
            hi = int(np.searchsorted(s, shard_idx, "right"))
            out.append(self._row[self._pos + lo : self._pos + hi])
            if hi < len(s):
                self._pos += hi
                break
            self._pos = len(self._shard)
        return np.concatenate(out) if out else np.empty(0, np.int64)


# ------------------------------------------------------------------------------------------------ text join


def iter_input_records(
    inputs: Sequence[str], id_field: str = "_id", text_field: str = "text", chunk_lines: int = 50_000
) -> Iterator[tuple[str, str]]:
    """The valid ``(id, text)`` records of the inputs, in order, read exactly as ``embed`` reads them.

    Same chunk plan, same parser, same input kinds (JSONL plain/.gz/.zst, Parquet files, directories, globs).
    """
    from tweet_embed.embed.chunks import iter_chunk_bytes, make_plan
    from tweet_embed.embed.worker import ChunkOptions, read_block
    from tweet_embed.input.records import parse_lines

    plan = make_plan(list(inputs), chunk_lines=chunk_lines)
    copts = ChunkOptions(id_field=id_field, text_field=text_field)
    chunks = plan.chunks
    i = 0
    while i < len(chunks):  # runs of one kind, in plan order (as the embed run loop reads them)
        parquet = plan.files[chunks[i].file_index].kind == "parquet"
        j = i
        while j < len(chunks) and (plan.files[chunks[j].file_index].kind == "parquet") == parquet:
            j += 1
        if parquet:
            for c in chunks[i:j]:
                b = read_block(plan.files[c.file_index], c, copts)
                yield from zip(b.ids, b.texts, strict=True)
        else:
            for c, data in iter_chunk_bytes(plan, chunks[i:j]):
                b = parse_lines(data, c.first_line, plan.files[c.file_index].label, id_field, text_field)
                yield from zip(b.ids, b.texts, strict=True)
        i = j


class TextJoiner:
    """Joins input text back in by id, as a merge: shards are in input order, so one forward pass suffices.

    Rows ``embed`` rejected and later duplicates are simply skipped over in the input.
    """

    def __init__(self, inputs: Sequence[str], id_field: str, text_field: str) -> None:
        self.inputs = list(inputs)
        self._it = iter_input_records(inputs, id_field, text_field)

    def texts_for(self, ids: Sequence[str]) -> list[str]:
        out = []
        for want in ids:
            for rid, text in self._it:
                if rid == want:
                    out.append(text)
                    break
            else:
                raise ConsolidateError(
                    f"--keep-text: id {want!r} was not found in the input (after the rows before it); give the "
                    "same input files, in the same order, as to `tweet-embed embed`"
                )
        return out


# ------------------------------------------------------------------------------------------------ writing


class _HashingFile:
    """A write-only file that computes sha256 and counts bytes as the Parquet writer writes."""

    def __init__(self, path: str) -> None:
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.sha = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data: Any) -> int:
        mv = memoryview(data)
        self.sha.update(mv)
        self._fh.write(mv)
        self.size += mv.nbytes
        return mv.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._fh.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self.closed = True


def output_schema(dim: int, metadata: dict[str, str], keep_text: bool) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.field("element", pa.float32(), nullable=False)), nullable=False),
    ]
    if keep_text:
        fields.append(pa.field("text", pa.string(), nullable=False))
    return pa.schema(fields, metadata={f"{META_PREFIX}{k}": v for k, v in sorted(metadata.items())})


def output_name(index: int) -> str:
    return f"{OUTPUT_PREFIX}{index:05d}.parquet"


@dataclass
class _Chunk:
    table: pa.Table
    sizes: np.ndarray  # bytes each row adds to a row group (exact, from the data only)
    shard: int
    rows: np.ndarray  # raw row number of each row inside its shard


class _Writer:
    """Cuts the row stream into row groups and files of about the target size, deterministically.

    Per file: row groups of ``row_group_bytes`` (uncompressed) until the estimated remaining space,
    ``(target - written) / ratio`` with the file's own compression ratio so far, is under two row groups; then
    one last group takes all of it. So every group is at least one ``row_group_bytes`` except in files smaller
    than that.
    """

    def __init__(
        self,
        out_dir: str,
        schema: pa.Schema,
        target: int,
        row_group_bytes: int,
        first_index: int,
        on_file: Callable[[dict[str, Any]], None],
    ) -> None:
        self.out_dir, self.schema, self.target, self.rg_bytes = out_dir, schema, target, row_group_bytes
        self.index = first_index
        self.on_file = on_file
        self._pending: list[pa.Table] = []
        self._pending_bytes = 0
        self._pending_rows = 0
        self._file: _HashingFile | None = None
        self._pq: pq.ParquetWriter | None = None
        self._file_unc = 0
        self._file_rows = 0
        self._file_groups = 0
        self._cap = 0
        self._last_group = False
        self._end: tuple[int, int] = (0, 0)

    def _tmp(self) -> str:
        return os.path.join(self.out_dir, f".{output_name(self.index)}.partial")

    def _open(self) -> None:
        self._file = _HashingFile(self._tmp())
        self._pq = pq.ParquetWriter(
            self._file,
            self.schema,
            compression="zstd",
            compression_level=1,
            use_dictionary=False,
            write_statistics=["id"],
            write_page_index=False,
            write_batch_size=WRITE_BATCH_VALUES,
        )
        self._file_unc = self._file_rows = self._file_groups = 0
        self._plan_group()

    def _plan_group(self) -> bool:
        """Set the next group's size; False when the file is already full (then it is closed)."""
        assert self._file is not None
        if self._file_unc == 0:
            remaining = float(self.target)
        else:
            remaining = (self.target - self._file.size) * self._file_unc / max(1, self._file.size)
        if remaining < 0.05 * self.rg_bytes and self._file_rows:
            return False
        if remaining < 2 * self.rg_bytes:
            self._cap, self._last_group = max(1, int(remaining)), True
        else:
            self._cap, self._last_group = self.rg_bytes, False
        return True

    def add(self, chunk: _Chunk) -> None:
        table, sizes, start = chunk.table, chunk.sizes, 0
        n = table.num_rows
        cum = np.cumsum(sizes, dtype=np.int64)
        while start < n:
            if self._pq is None:
                self._open()
            base = int(cum[start - 1]) if start else 0
            need = self._cap - self._pending_bytes
            j = int(np.searchsorted(cum, base + need, "left"))  # first row whose inclusion reaches the cap
            stop = min(n, j + 1)
            self._pending.append(table.slice(start, stop - start))
            self._pending_bytes += int(cum[stop - 1]) - base
            self._pending_rows += stop - start
            self._end = (chunk.shard, int(chunk.rows[stop - 1]) + 1)
            start = stop
            if self._pending_bytes >= self._cap:
                self._flush_group()

    def _flush_group(self) -> None:
        assert self._pq is not None and self._file is not None
        if not self._pending_rows:
            return
        t = pa.concat_tables(self._pending)
        self._pq.write_table(t, row_group_size=t.num_rows)
        self._file_unc += self._pending_bytes
        self._file_rows += self._pending_rows
        self._file_groups += 1
        self._pending, self._pending_bytes, self._pending_rows = [], 0, 0
        if self._last_group or not self._plan_group():
            self._close_file()

    def _close_file(self) -> None:
        assert self._pq is not None and self._file is not None
        self._pq.close()
        self._file.close()
        name = output_name(self.index)
        os.replace(self._tmp(), os.path.join(self.out_dir, name))
        fsync_dir(self.out_dir)
        self.on_file(
            {
                "name": name,
                "rows": self._file_rows,
                "bytes": self._file.size,
                "sha256": self._file.sha.hexdigest(),
                "row_groups": self._file_groups,
                "end": list(self._end),
            }
        )
        self._pq, self._file = None, None
        self.index += 1

    def finish(self) -> None:
        if self._pq is not None:
            self._flush_group()
            if self._pq is not None:
                self._close_file()

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            if self._pq is not None:
                self._pq.close()
        with contextlib.suppress(Exception):
            if self._file is not None:
                self._file.close()
        with contextlib.suppress(OSError):
            os.unlink(self._tmp())


def _iter_chunks(
    shards: Sequence[ShardInfo],
    start: tuple[int, int],
    drops: DropList,
    dim: int,
    schema: pa.Schema,
    joiner: TextJoiner | None,
    batch_rows: int = 32_768,
) -> Iterator[_Chunk]:
    """The kept rows from ``start`` (shard index, row) on, in shard-name order, as output-typed tables."""
    emb_type = schema.field("embedding").type
    fixed_row = 4 * dim + 8  # float32 values + list offset + id length prefix
    for si in range(start[0], len(shards)):
        dropped = drops.rows_for(si)
        first = start[1] if si == start[0] else 0
        pf = pq.ParquetFile(shards[si].path)
        offset = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=["id", "embedding"], use_threads=True):
            n = batch.num_rows
            lo = offset
            offset += n
            if offset <= first:
                continue
            rows = np.arange(lo, offset, dtype=np.int64)
            keep = rows >= first
            if len(dropped):
                keep &= ~np.isin(rows, dropped, assume_unique=True)
            if not keep.all():
                batch = batch.filter(pa.array(keep))
                rows = rows[keep]
            if batch.num_rows == 0:
                continue
            ids = batch.column(0)
            emb = batch.column(1)
            if emb.type != emb_type:
                emb = emb.cast(emb_type)
            if emb.null_count:
                raise ConsolidateError(f"{shards[si].name}: NULL embedding in a shard")
            sizes = pc.binary_length(ids).to_numpy().astype(np.int64) + fixed_row
            arrays = [ids, emb]
            if joiner is not None:
                texts = pa.array(joiner.texts_for(ids.to_pylist()), pa.string())
                sizes += pc.binary_length(texts).to_numpy().astype(np.int64) + 4
                arrays.append(texts)
            yield _Chunk(pa.Table.from_arrays(arrays, schema=schema), sizes, si, rows)


def _prefetch(it: Iterator[_Chunk], depth: int) -> Iterator[_Chunk]:
    """Run ``it`` in a thread, ``depth`` items ahead: reading/decoding overlaps encoding/compressing.

    pyarrow releases the GIL in both, so two cores do twice the work; memory grows by ``depth`` chunks only.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def work() -> None:
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as exc:  # handed to the consumer, raised there
            q.put(exc)

    th = threading.Thread(target=work, name="consolidate-reader", daemon=True)
    th.start()
    try:
        while True:
            item = q.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while th.is_alive():
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.1)
        th.join()


# ------------------------------------------------------------------------------------------------ orchestration


@dataclass
class ConsolidateResult:
    out_dir: str
    manifest: dict[str, Any]
    noop: bool = False
    resumed_files: int = 0
    deleted_shards: int = 0
    seconds: float = 0.0
    messages: list[str] = field(default_factory=list)

    @property
    def bytes_out(self) -> int:
        return sum(f["bytes"] for f in self.manifest["files"])


def _fingerprint(shards: Sequence[ShardInfo], meta: dict[str, str], params: dict[str, Any]) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"format": FORMAT, "meta": {k: meta.get(k) for k in IDENTITY_KEYS}, "params": params},
            sort_keys=True,
        ).encode()
    )
    for s in shards:
        h.update(f"\n{s.name}\t{s.bytes}\t{s.rows}".encode())
    return h.hexdigest()


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


@contextlib.contextmanager
def _locked(out_dir: str) -> Iterator[None]:
    fd = os.open(os.path.join(out_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConsolidateError(f"another consolidation is running into {out_dir}") from None
        yield
    finally:
        os.close(fd)


def _foreign_entries(out_dir: str) -> list[str]:
    """Entries of ``out_dir`` a consolidation did not write (hidden names are ignored, as by all readers)."""
    return sorted(
        n for n in os.listdir(out_dir) if not n.startswith(".") and n != MANIFEST and not OUTPUT_RE.match(n)
    )


def _remove_ours(out_dir: str) -> None:
    """Remove a previous consolidation's files: outputs, manifest, staging (nothing else)."""
    for n in os.listdir(out_dir):
        p = os.path.join(out_dir, n)
        if n == MANIFEST or OUTPUT_RE.match(n) or (n.startswith(".embeddings-") and n.endswith(".partial")):
            os.unlink(p)
    shutil.rmtree(os.path.join(out_dir, STAGING), ignore_errors=True)
    fsync_dir(out_dir)


def bq_load_command(manifest: dict[str, Any], table: str | None = None, gcs_prefix: str | None = None) -> str:
    """The ``bq load`` command for the output (after copying the files to Cloud Storage)."""
    prefix = (gcs_prefix or "gs://BUCKET/PATH").rstrip("/")
    return (
        "bq load --source_format=PARQUET --parquet_enable_list_inference=true "
        f"{table or 'DATASET.TABLE'} '{prefix}/{OUTPUT_PREFIX}*.parquet'"
    )


def upload_command(out_dir: str, gcs_prefix: str | None = None) -> str:
    prefix = (gcs_prefix or "gs://BUCKET/PATH").rstrip("/")
    return f"gcloud storage cp '{out_dir.rstrip('/')}/{OUTPUT_PREFIX}'*.parquet '{prefix}/'"


def consolidate(
    shards_dir: str,
    out_dir: str,
    *,
    target_size: int | str = DEFAULT_TARGET_SIZE,
    row_group_size: int | str = DEFAULT_ROW_GROUP_SIZE,
    keep_text: Sequence[str] | None = None,
    id_field: str = "_id",
    text_field: str = "text",
    delete_shards: bool = False,
    overwrite: bool = False,
    memory_limit: str = "512MB",
) -> ConsolidateResult:
    """Consolidate ``shards_dir`` into ``out_dir`` (resumable; a no-op over its own finished output)."""
    t0 = time.monotonic()
    target = parse_size(target_size)
    rg_bytes = min(parse_size(row_group_size), target)
    shards_dir, out_dir = os.path.abspath(shards_dir), os.path.abspath(out_dir)
    if shards_dir == out_dir:
        raise ConsolidateError("the output directory must not be the shards directory")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConsolidateError(f"{out_dir} exists and is not a directory")
    present = list_shards(shards_dir)
    existing = read_manifest(out_dir) if os.path.isdir(out_dir) else None
    if not present and existing is None:
        if not os.path.isdir(shards_dir):
            raise ConsolidateError(
                f"shards directory not found: {shards_dir} (run `tweet-embed embed` first, "
                "or give --shards-dir / --work-dir)"
            )
        raise ConsolidateError(
            f"no shards in {shards_dir}: expected part-*.parquet files written by `tweet-embed embed`"
        )
    os.makedirs(out_dir, exist_ok=True)
    params = {
        "target_size": target,
        "row_group_size": rg_bytes,
        "keep_text": [os.path.basename(p) for p in keep_text] if keep_text else None,
    }
    result_msgs: list[str] = []
    with _locked(out_dir):
        existing = read_manifest(out_dir)
        if existing is not None:
            noop = _check_existing(existing, present, params, overwrite)
            if noop is not None:
                shutil.rmtree(os.path.join(out_dir, STAGING), ignore_errors=True)
                res = ConsolidateResult(out_dir, existing, noop=True, messages=[noop])
                if delete_shards and present:
                    res.deleted_shards = _verify_and_delete(out_dir, existing, present, memory_limit)
                res.seconds = time.monotonic() - t0
                return res
            log.warning("--overwrite: replacing the previous consolidation in %s", out_dir)
            _remove_ours(out_dir)
        shards, meta, dim = scan_shards(present)
        total_rows = sum(s.rows for s in shards)
        if total_rows == 0:
            raise ConsolidateError(f"the {len(shards)} shard(s) in {shards_dir} hold no rows")
        foreign = _foreign_entries(out_dir)
        if foreign and not overwrite:
            raise ConsolidateError(
                f"{out_dir} holds other data ({', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}); "
                "choose an empty directory or pass --overwrite (which replaces earlier consolidation output and "
                "leaves other files alone)"
            )
        fp = _fingerprint(shards, meta, params)
        staging = os.path.join(out_dir, STAGING)
        progress_path = os.path.join(staging, PROGRESS)
        progress = _read_json(progress_path)
        if progress is not None and progress.get("fingerprint") != fp:
            msg = "discarding an unfinished consolidation of other shards or settings"
            log.warning("%s in %s", msg, out_dir)
            result_msgs.append(msg)
            _remove_ours(out_dir)
            progress = None
        if progress is None:
            stray = [n for n in os.listdir(out_dir) if OUTPUT_RE.match(n)]
            if stray and not overwrite:
                raise ConsolidateError(
                    f"{out_dir} holds {len(stray)} embeddings-*.parquet file(s) that no consolidation in progress "
                    "accounts for; pass --overwrite to replace them"
                )
            _remove_ours(out_dir)
        os.makedirs(staging, exist_ok=True)
        for n in os.listdir(out_dir):  # half-written files of a killed run
            if n.startswith(".embeddings-") and n.endswith(".partial"):
                os.unlink(os.path.join(out_dir, n))
        drops_path = os.path.join(staging, DROPS)
        if progress is None or not os.path.exists(drops_path):
            log.info("finding duplicate ids over %d shard(s), %d rows", len(shards), total_rows)
            t_dd = time.monotonic()
            dd = find_duplicates(shards, drops_path, staging, memory_limit)
            log.info(
                "%d duplicate row(s) of %d id(s) to drop (%.1fs)", dd.dropped, dd.ids, time.monotonic() - t_dd
            )
            progress = {
                "fingerprint": fp,
                "dedupe": {"dropped": dd.dropped, "ids": dd.ids, "examples": dd.examples},
                "files": [],
            }
            write_atomic(progress_path, _dump(progress))
        files: list[dict[str, Any]] = _valid_prefix(out_dir, progress["files"])
        resumed = len(files)
        if resumed:
            log.info("resuming after %d finished file(s)", resumed)
            result_msgs.append(f"resumed after {resumed} finished file(s)")
        for n in os.listdir(out_dir):  # outputs past the recorded ones are rewritten
            if OUTPUT_RE.match(n) and int(n[len(OUTPUT_PREFIX) : -8]) >= len(files):
                os.unlink(os.path.join(out_dir, n))
        progress["files"] = files

        def on_file(entry: dict[str, Any]) -> None:
            progress["files"].append(entry)
            write_atomic(progress_path, _dump(progress))
            log.info("wrote %s: %d rows, %s", entry["name"], entry["rows"], human(entry["bytes"]))

        schema = output_schema(dim, meta, bool(keep_text))
        start = tuple(files[-1]["end"]) if files else (0, 0)
        joiner = TextJoiner(keep_text, id_field, text_field) if keep_text else None
        writer = _Writer(out_dir, schema, target, rg_bytes, len(files), on_file)
        drops = DropList(drops_path)
        try:
            chunks = _iter_chunks(shards, start, drops, dim, schema, joiner)  # type: ignore[arg-type]
            for chunk in _prefetch(chunks, PREFETCH_CHUNKS):
                writer.add(chunk)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        rows_out = sum(f["rows"] for f in progress["files"])
        dd_info = progress["dedupe"]
        if rows_out != total_rows - dd_info["dropped"]:
            raise ConsolidateError(
                f"internal error: wrote {rows_out} rows, expected {total_rows} - "
                f"{dd_info['dropped']} duplicates"
            )
        manifest = {
            "format": FORMAT,
            "fingerprint": fp,
            "metadata": dict(sorted(meta.items())),
            "dim": dim,
            "schema": {
                "id": "STRING",
                "embedding": "ARRAY<FLOAT64> (Parquet LIST of FLOAT)",
                **({"text": "STRING"} if keep_text else {}),
            },
            "params": params,
            "rows": rows_out,
            "duplicates": {
                "rows_dropped": dd_info["dropped"],
                "ids": dd_info["ids"],
                "examples": dd_info["examples"],
            },
            "source": {
                "shards": len(shards),
                "rows": total_rows,
                "bytes": sum(s.bytes for s in shards),
                "files": [{"name": s.name, "rows": s.rows, "bytes": s.bytes} for s in shards],
            },
            "files": [
                {k: f[k] for k in ("name", "rows", "bytes", "sha256", "row_groups")}
                for f in progress["files"]
            ],
        }
        write_atomic(os.path.join(out_dir, MANIFEST), _dump(manifest))
        shutil.rmtree(staging, ignore_errors=True)
        res = ConsolidateResult(out_dir, manifest, resumed_files=resumed, messages=result_msgs)
        if delete_shards:
            res.deleted_shards = _verify_and_delete(out_dir, manifest, present, memory_limit)
        res.seconds = time.monotonic() - t0
        return res


def _valid_prefix(out_dir: str, files: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recorded finished files that are still there with their recorded size (cheap check)."""
    ok = []
    for i, f in enumerate(files):
        p = os.path.join(out_dir, f["name"])
        if f["name"] != output_name(i) or not os.path.exists(p) or os.path.getsize(p) != f["bytes"]:
            break
        ok.append(f)
    return ok


def _check_existing(
    manifest: dict[str, Any], present: Sequence[str], params: dict[str, Any], overwrite: bool
) -> str | None:
    """A message when ``out_dir`` already holds this very consolidation (→ no-op), else None or an error."""
    recorded = {f["name"]: f["bytes"] for f in manifest["source"]["files"]}
    now = {os.path.basename(p): os.path.getsize(p) for p in present}
    same_shards = all(recorded.get(n) == b for n, b in now.items())
    same_params = manifest.get("params") == params
    if overwrite:
        return None
    if same_shards and same_params:
        gone = len(recorded) - len(now)
        tail = f"; {gone} of its {len(recorded)} shards were deleted since" if gone else ""
        return (
            f"already consolidated: {len(manifest['files'])} file(s), {manifest['rows']} rows; "
            f"nothing to do{tail} (--overwrite redoes it)"
        )
    why = "other shards" if not same_shards else "other settings"
    raise ConsolidateError(
        f"the output directory already holds a finished consolidation of {why}; "
        "pass --overwrite to replace it, or choose another --out-dir"
    )


# ------------------------------------------------------------------------------------------------ checking


def check_consolidated(
    out_dir: str, manifest: dict[str, Any], shard_paths: Sequence[str], memory_limit: str = "512MB"
) -> list[str]:
    """Problems that forbid deleting the shards: checksums, row counts, every shard id present exactly once."""
    problems: list[str] = []
    paths = []
    for f in manifest["files"]:
        p = os.path.join(out_dir, f["name"])
        paths.append(p)
        if not os.path.exists(p):
            problems.append(f"{f['name']} is missing")
            continue
        from tweet_embed.parquet import file_sha256

        if file_sha256(p) != f["sha256"]:
            problems.append(f"{f['name']}: checksum differs from the manifest")
        if pq.read_metadata(p).num_rows != f["rows"]:
            problems.append(f"{f['name']}: row count differs from the manifest")
    if problems:
        return problems
    from tweet_embed.consolidate.verify import VerifyReport, compare_buckets, load_parquet_ids

    tmp = os.path.join(out_dir, STAGING, "check")
    shutil.rmtree(tmp, ignore_errors=True)
    p_buckets = max(1, -(-int(manifest["rows"]) // BUCKET_IDS))
    con = duckdb_connect(os.path.join(tmp, "spill"), memory_limit, path=os.path.join(tmp, "ids.duckdb"))
    try:
        load_parquet_ids(con, paths, p_buckets, "out_raw")
        load_parquet_ids(con, list(shard_paths), p_buckets, "input_raw")  # the shards play the input
        rep = VerifyReport(target="check")
        compare_buckets(con, p_buckets, rep, EXAMPLES)
        (n,) = con.execute("SELECT count(*) FROM out_raw").fetchone()  # type: ignore[misc]
        if n != manifest["rows"]:
            problems.append(f"output holds {n} rows, manifest says {manifest['rows']}")
        if rep.duplicated.count:
            problems.append(f"{rep.duplicated.count} id(s) appear more than once in the output")
        if rep.missing.count:
            problems.append(
                f"{rep.missing.count} shard id(s) are not in the output, e.g. {rep.missing.examples[:3]}"
            )
    finally:
        con.close()
        shutil.rmtree(os.path.join(out_dir, STAGING), ignore_errors=True)
    return problems


def _verify_and_delete(
    out_dir: str, manifest: dict[str, Any], present: Sequence[str], memory_limit: str
) -> int:
    problems = check_consolidated(out_dir, manifest, present, memory_limit)
    if problems:
        raise ConsolidateError(
            "output failed verification; shards were NOT deleted:\n  " + "\n  ".join(problems)
        )
    for p in present:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
    if present:
        fsync_dir(os.path.dirname(present[0]))
    return len(present)
