"""Checks a finished consolidation against its shards before ``--delete-shards`` removes them."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from typing import Any

import pyarrow.parquet as pq

from tweet_embed.consolidate.duplicates import BUCKET_IDS, EXAMPLES
from tweet_embed.consolidate.layout import STAGING, ConsolidateError, duckdb_connect
from tweet_embed.parquet import fsync_dir


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
