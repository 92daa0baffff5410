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

Modules: :mod:`.shards` (reading shard footers), :mod:`.duplicates` (the drop list), :mod:`.texts`
(``--keep-text``), :mod:`.writer` (row groups and files), :mod:`.check` (before ``--delete-shards``); this one
is the resumable driver and re-exports their public names.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tweet_embed.consolidate.check import _verify_and_delete, check_consolidated
from tweet_embed.consolidate.duplicates import (
    BUCKET_IDS,
    EXAMPLES,
    ID_BATCH,
    DedupeResult,
    DropList,
    find_duplicates,
)
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
    duckdb_connect,
    human,
    list_shards,
    parse_size,
    read_manifest,
)
from tweet_embed.consolidate.shards import IDENTITY_KEYS, ShardInfo, embedding_dim, scan_shards
from tweet_embed.consolidate.texts import TextJoiner, iter_input_records
from tweet_embed.consolidate.writer import (
    PREFETCH_CHUNKS,
    WRITE_BATCH_VALUES,
    _iter_chunks,
    _prefetch,
    _Writer,
    output_name,
    output_schema,
)
from tweet_embed.parquet import fsync_dir, write_atomic

__all__ = [  # the names tests, the CLI and other modules import from here
    "BIGQUERY_MIN_ROW_GROUP",
    "BUCKET_IDS",
    "ConsolidateError",
    "ConsolidateResult",
    "DEFAULT_ROW_GROUP_SIZE",
    "DEFAULT_TARGET_SIZE",
    "DROPS",
    "DedupeResult",
    "DropList",
    "EXAMPLES",
    "FORMAT",
    "IDENTITY_KEYS",
    "ID_BATCH",
    "LOCK",
    "MANIFEST",
    "MIB",
    "OUTPUT_PREFIX",
    "OUTPUT_RE",
    "PREFETCH_CHUNKS",
    "PROGRESS",
    "STAGING",
    "ShardInfo",
    "TextJoiner",
    "WRITE_BATCH_VALUES",
    "bq_load_command",
    "check_consolidated",
    "consolidate",
    "duckdb_connect",
    "embedding_dim",
    "find_duplicates",
    "human",
    "iter_input_records",
    "list_shards",
    "output_name",
    "output_schema",
    "parse_size",
    "read_manifest",
    "scan_shards",
    "upload_command",
]

log = logging.getLogger("tweet_embed.consolidate.merge")

DEFAULT_TARGET_SIZE = "2GB"
DEFAULT_ROW_GROUP_SIZE = "128MiB"
BIGQUERY_MIN_ROW_GROUP = 16 * MIB

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

        text_hash = all(s.text_hash for s in shards)
        schema = output_schema(dim, meta, bool(keep_text), text_hash)
        start = tuple(files[-1]["end"]) if files else (0, 0)
        joiner = (
            TextJoiner(keep_text, id_field, text_field, meta.get("text_mode", "full")) if keep_text else None
        )
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
                **({"text_hash": "BYTES (16, XXH3-128 of the text)"} if text_hash else {}),
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
