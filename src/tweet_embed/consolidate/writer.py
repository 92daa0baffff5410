"""The output side: kept rows streamed from the shards, cut into row groups and files deterministically.

Which rows go into which file and row group depends only on the rows themselves (exact per-row byte counts,
never batch boundaries or timing), so a resumed run writes byte-identical files. Files are written under a
hidden ``.partial`` name, hashed while written, fsynced and renamed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tweet_embed.consolidate.duplicates import DropList
from tweet_embed.consolidate.layout import OUTPUT_PREFIX, ConsolidateError
from tweet_embed.consolidate.shards import ShardInfo
from tweet_embed.consolidate.texts import TextJoiner
from tweet_embed.parquet import META_PREFIX, TEXT_HASH, fsync_dir

# Values handed to the Parquet column writer at once (default 1024): fewer per-batch overheads make writing
# 3-level lists about 1.5x faster; pages still close near the 1 MB page size (64k floats = 256 KB per batch).
WRITE_BATCH_VALUES = 1 << 16
PREFETCH_CHUNKS = 2


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


def output_schema(dim: int, metadata: dict[str, str], keep_text: bool, text_hash: bool = False) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.field("element", pa.float32(), nullable=False)), nullable=False),
    ]
    if text_hash:  # kept so that the consolidated files can be given to a later `embed --reuse`
        fields.append(pa.field(TEXT_HASH, pa.binary(16), nullable=False))
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
    with_hash = TEXT_HASH in schema.names
    fixed_row = 4 * dim + 8 + (16 if with_hash else 0)  # float32 values + list offset + id length prefix
    for si in range(start[0], len(shards)):
        dropped = drops.rows_for(si)
        first = start[1] if si == start[0] else 0
        pf = pq.ParquetFile(shards[si].path)
        offset = 0
        columns = ["id", "embedding", TEXT_HASH] if with_hash else ["id", "embedding"]
        for batch in pf.iter_batches(batch_size=batch_rows, columns=columns, use_threads=True):
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
            arrays = [ids, emb, *([batch.column(2)] if with_hash else [])]
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
