"""Repeated ids across shards: found by DuckDB over the ``id`` column only, kept as a sorted on-disk drop list.

Memory does not depend on the total: the ids spill to an on-disk DuckDB table split into hash buckets, and the
result, (shard, row) of every later occurrence, is streamed back one shard at a time by :class:`DropList`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tweet_embed.consolidate.layout import _sql_str, duckdb_connect
from tweet_embed.consolidate.shards import ShardInfo
from tweet_embed.parquet import fsync_path

EXAMPLES = 10
ID_BATCH = 1_000_000  # ids per insert into DuckDB
BUCKET_IDS = 4_000_000  # ids deduplicated at once (hash buckets)


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
