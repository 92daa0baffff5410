"""Throughput of the export writer (BigQuery and MongoDB paths) and of Parquet input reading, on 1M synthetic rows.

Run: .venv/bin/python bench/export_bench.py   (no database needed; numbers are CPU-bound, one core)
"""

import os
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from tweet_embed.export.bigquery import batch_to_lines
from tweet_embed.export.jsonl_writer import ResumableJsonlWriter
from tweet_embed.input.parquet import parquet_chunks, read_parquet_chunk


def parquet_rows_per_s(path: str, chunk_rows: int) -> float:
    """Rows per second reading every chunk of ``chunk_rows`` rows of ``path`` as the embed input does."""
    t0 = time.perf_counter()
    tot = 0
    for s, n in parquet_chunks(path, chunk_rows):
        a, _, _ = read_parquet_chunk(path, s, n, "id", "text")
        tot += len(a)
    return tot / (time.perf_counter() - t0)


N = 1_000_000
ids = list(range(10**15, 10**15 + N))
texts = [f"tweet number {i} about the football match tonight, with some words #tag @user" for i in range(N)]
_tmp = tempfile.TemporaryDirectory()
d = _tmp.name
for suffix in (".jsonl", ".jsonl.zst", ".jsonl.gz"):
    out = os.path.join(d, "o" + suffix)
    t0 = time.perf_counter()
    w = ResumableJsonlWriter(out, {"k": 1}, commit_rows=200_000)
    for s in range(0, N, 10_000):
        data, n, sk = batch_to_lines(ids[s : s + 10_000], texts[s : s + 10_000])
        w.write_lines(data, n, position=s, skipped=sk)
        if w.due():
            w.commit(s)
    w.finish(N)
    dt = time.perf_counter() - t0
    print(f"bigquery-path writer {suffix:11s}: {N / dt:,.0f} rows/s, {os.path.getsize(out) / 2**20:.1f} MiB")
out = os.path.join(d, "m.jsonl.zst")
t0 = time.perf_counter()
w = ResumableJsonlWriter(out, {"k": 1})
for i in range(N):
    w.write(str(ids[i]), texts[i], position=i)
    if w.due():
        w.commit(i)
w.finish(N)
dt = time.perf_counter() - t0
print(f"mongo-path writer (per row) .jsonl.zst: {N / dt:,.0f} rows/s")
p = os.path.join(d, "in.parquet")
pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "text": texts}), p, row_group_size=100_000)
print(f"parquet input, 10k-row chunks from 100k-row groups: {parquet_rows_per_s(p, 10_000):,.0f} rows/s")
print(f"parquet input, 100k-row chunks: {parquet_rows_per_s(p, 100_000):,.0f} rows/s")
_tmp.cleanup()
