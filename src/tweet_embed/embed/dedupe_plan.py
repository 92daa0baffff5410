"""The dedupe planning scan: every valid text hashed once, repeats found with bounded memory, the map written.

Three passes, all over files on disk, none holding more than a bucket (about ``BUCKET_ROWS`` rows) in memory:

1. Read every chunk exactly as ``embed`` reads it (same chunk plan, same parser, so the same valid rows and the
   same cleaned texts), hash each text (XXH3-128) and append ``(hash, g)`` (``g``: the row's index among the
   run's valid rows, in plan order) to one of ``B`` bucket files chosen by the hash's top bits.
2. Per bucket: sort by (hash, g); the first row of each hash is the canonical; a text whose rows span more
   than one chunk gets a slot (numbered bucket by bucket, so the numbering depends only on the input). Append
   ``(g, canonical, slot)`` to partition files by ``g`` range.
3. Per partition, in order: sort by ``g`` and append ``(canonical, slot)`` to ``map.bin``: one 16-byte record per
   valid row, so a chunk's slice is one read at a known offset.

``index.json`` is written last (atomically): its presence means the map is complete. A run killed while
planning plans again from scratch on resume; no chunk runs before the map exists.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import orjson

from tweet_embed import storage
from tweet_embed.embed.chunks import Plan, WorkDirs
from tweet_embed.embed.dedupe import (
    MAP_RECORD,
    SLOT_OK,
    DedupeError,
    DedupeFiles,
    SlotStore,
    check_reuse_meta,
    text_hashes,
    vector_meta,
)
from tweet_embed.embed.worker import ChunkOptions, parse_chunks
from tweet_embed.parquet import fsync_dir, fsync_path, write_atomic

log = logging.getLogger("tweet_embed")

BUCKET_ROWS = 2_000_000  # rows per hash bucket and per g-partition (about 48 MB of records in memory)
FLUSH_ROWS = 1_000_000  # rows buffered before they are spread over the bucket files
HASH_REC = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("g", "<i8")])
PART_REC = np.dtype([("g", "<i8"), ("canon", "<i8"), ("slot", "<i8")])
IMPORT_REC = np.dtype([("row", "<i8"), ("slot", "<i8")])  # an earlier output row whose vector fills a slot
FORMAT = 1


def _buckets_for(lines: int) -> int:
    """A power of two with about BUCKET_ROWS rows per bucket (1 to 4,096)."""
    b = 1
    while b * BUCKET_ROWS < lines and b < 4096:
        b *= 2
    return b


class _Spreader:
    """Buffers records and appends them to ``n`` files by a key (bucket or partition), in arrival order."""

    def __init__(self, root: str, prefix: str, n: int) -> None:
        self.paths = [os.path.join(root, f"{prefix}-{i:05d}.bin") for i in range(n)]
        self.n = n
        self._buf: list[tuple[np.ndarray, np.ndarray]] = []
        self._rows = 0

    def add(self, recs: np.ndarray, keys: np.ndarray) -> None:
        self._buf.append((recs, keys))
        self._rows += len(recs)
        if self._rows >= FLUSH_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        recs = np.concatenate([r for r, _ in self._buf])
        keys = np.concatenate([k for _, k in self._buf])
        self._buf, self._rows = [], 0
        order = np.argsort(keys, kind="stable")
        recs, keys = recs[order], keys[order]
        edges = np.searchsorted(keys, np.arange(self.n + 1))
        for i in np.flatnonzero(np.diff(edges)).tolist():
            with open(self.paths[i], "ab") as fh:
                fh.write(recs[edges[i] : edges[i + 1]].tobytes())

    def read(self, i: int, dtype: np.dtype) -> np.ndarray:
        p = self.paths[i]
        return np.fromfile(p, dtype) if os.path.exists(p) else np.empty(0, dtype)


def _hashes_of_chunks(plan: Plan, copts: ChunkOptions) -> Iterator[np.ndarray]:
    """Each planned chunk's valid texts' hashes, in plan order."""
    for _chunk, block in parse_chunks(plan, plan.chunks, copts):
        yield text_hashes(block.texts)


def reuse_files(paths: Sequence[str]) -> tuple[list[tuple[str, int]], dict[str, str]]:
    """The Parquet files of ``--reuse`` paths (shard or consolidated directories, or files) with their rows,
    and their common metadata; refuses files without ``text_hash`` and sources that disagree on the vectors."""
    import pyarrow.parquet as pq

    from tweet_embed import storage
    from tweet_embed.parquet import META_PREFIX, TEXT_HASH

    files: list[tuple[str, int]] = []
    meta: dict[str, str] | None = None
    first = ""
    for spec in paths:
        if spec.endswith(".parquet") and not storage.is_dir(spec):
            found = [spec]
        else:
            found = [
                storage.join(spec, n)
                for n in sorted(storage.list_names(spec))
                if n.endswith(".parquet") and not n.startswith((".", "_"))
            ]
            if not found:
                raise DedupeError(
                    f"--reuse {spec}: no .parquet files there (give a shards or consolidated dir)"
                )
        for path in found:
            with storage.open_raw(path) as fh:
                md = pq.ParquetFile(fh).metadata
                schema = md.schema.to_arrow_schema()
            if TEXT_HASH not in schema.names or "embedding" not in schema.names:
                raise DedupeError(
                    f"--reuse {path}: no {TEXT_HASH} column, so its texts cannot be matched (written by a "
                    "tweet-embed before text hashes, or not embedding output)"
                )
            m = {
                k.decode()[len(META_PREFIX) :]: v.decode()
                for k, v in (schema.metadata or {}).items()
                if k.decode().startswith(META_PREFIX)
            }
            if meta is None:
                meta, first = m, path
            elif vector_meta(m) != vector_meta(meta):
                try:
                    check_reuse_meta(m, meta, f"{path} (against {first})")
                except DedupeError as exc:
                    raise DedupeError(str(exc).replace("this run", first)) from None
            files.append((path, md.num_rows))
    return files, meta or {}


def _import_reused(
    store: SlotStore, files: list[tuple[str, int]], imports: _Spreader, file_rows: np.ndarray
) -> None:
    """Copy the reused vectors (rows of earlier output) into their slots, reading each file once, in order."""
    import pyarrow.parquet as pq

    from tweet_embed import storage

    for fi, (path, _rows) in enumerate(files):
        recs = imports.read(fi, IMPORT_REC)
        if not len(recs):
            continue
        recs = recs[np.argsort(recs["row"], kind="stable")]
        rows = recs["row"] - file_rows[fi]
        with storage.open_raw(path) as fh:
            offset = 0
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=65_536, columns=["embedding"]):
                n = batch.num_rows
                lo, hi = np.searchsorted(rows, [offset, offset + n])
                if hi > lo:
                    values = batch.column(0).flatten().to_numpy(zero_copy_only=False)
                    vecs = np.asarray(values, np.float32).reshape(n, -1)
                    if vecs.shape[1] != store.dim:
                        raise DedupeError(
                            f"--reuse {path}: vectors of {vecs.shape[1]} dimensions, not {store.dim}"
                        )
                    store.write(
                        recs["slot"][lo:hi], vecs[rows[lo:hi] - offset], np.full(hi - lo, SLOT_OK, np.uint8)
                    )
                offset += n


def dedupe_root(dirs: WorkDirs) -> str:
    """Where a run's dedupe map lives: under the progress dir, or the local tmp dir when that is an object
    store (the map is a local file every worker reads). ``embed`` and ``plan`` share it."""
    return os.path.join(dirs.tmp if storage.is_uri(dirs.progress) else dirs.progress, "dedupe")


def map_out_of_reach(dirs: WorkDirs, ray: object) -> bool:
    """True when a run cannot use the corpus-wide map: the slot store is a local file every worker writes and
    reads, and Ray nodes with an object-store work dir share no local disk (such a run dedupes inside each
    chunk only). ``embed`` and ``plan`` ask the same question."""
    return storage.is_uri(dirs.progress) and ray is not None


def _options_key(copts: ChunkOptions | None) -> dict[str, Any]:
    """What decides each row's text (and so the map): fields, text mode, filters."""
    c = copts or ChunkOptions()
    return {"id_field": c.id_field, "text_field": c.text_field, **c.rules.describe()}


def load_dedupe(
    root: str, plan: Plan, copts: ChunkOptions | None = None
) -> tuple[DedupeFiles, dict[str, Any]] | None:
    """The finished map of an earlier (killed) attempt of this run, or of ``plan``, or None."""
    try:
        with open(os.path.join(root, "index.json"), "rb") as fh:
            index = orjson.loads(fh.read())
    except (OSError, orjson.JSONDecodeError):
        return None
    if index.get("format") != FORMAT or index.get("plan") != _plan_digest(plan):
        return None  # another plan (plan.json removed by hand, say): plan the map again
    if "options" in index and index["options"] != _options_key(copts):
        # made (by `plan`, or a run whose manifest will refuse this one) with other fields or filters: other
        # texts, so another map; planned again (the same options always give the same map)
        log.info("dedupe map made with other input options %s: planning it again", index["options"])
        return None
    return _files(root, index), index


def _files(root: str, index: dict[str, Any]) -> DedupeFiles:
    meta = index.get("reuse_meta") or {}
    label = ", ".join(index.get("reuse") or [])
    return DedupeFiles(
        root, tuple(index["chunk_offsets"]), int(index["slots"]), tuple(sorted(meta.items())), label
    )


def plan_dedupe(
    plan: Plan, root: str, copts: ChunkOptions | None = None, reuse: Sequence[str] = ()
) -> tuple[DedupeFiles, dict[str, Any]]:
    """Build (or load) the dedupe map of ``plan`` in ``root``; returns the files and the index (counts).

    ``reuse``: earlier runs' output; a text found there is not sent: its vector is copied into a slot here.
    """
    found = load_dedupe(root, plan, copts)
    if found is not None:
        if list(found[1].get("reuse") or []) != list(reuse):
            raise DedupeError(
                f"this run was planned with --reuse {found[1].get('reuse') or '(none)'}, now "
                f"{list(reuse) or '(none)'}; --restart plans it again"
            )
        return found
    sources, reuse_meta = reuse_files(reuse) if reuse else ([], {})
    t0 = time.monotonic()
    cpu0 = time.process_time()
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    work = os.path.join(root, "work")
    os.makedirs(work)
    total_lines = sum(c.n_lines for c in plan.chunks)
    n_buckets = _buckets_for(total_lines)
    shift = np.uint64(64 - n_buckets.bit_length() + 1)
    buckets = _Spreader(work, "bucket", n_buckets)

    # pass 1: hash every valid text, spread (hash, g) over the buckets
    bounds = [0]
    for h in _hashes_of_chunks(plan, copts or ChunkOptions()):
        n = len(h)
        g0 = bounds[-1]
        bounds.append(g0 + n)
        if not n:
            continue
        words = h.view("<u8").reshape(n, 2)
        recs = np.empty(n, HASH_REC)
        recs["hi"], recs["lo"] = words[:, 0], words[:, 1]
        recs["g"] = np.arange(g0, g0 + n, dtype=np.int64)
        keys = (recs["hi"] >> shift).astype(np.int64) if n_buckets > 1 else np.zeros(n, np.int64)
        buckets.add(recs, keys)
    # earlier runs' rows (--reuse) join as negative g: they sort first in their text's group (its canonical)
    file_rows = np.zeros(len(sources) + 1, np.int64)
    for fi, (path, nrows) in enumerate(sources):
        file_rows[fi + 1] = file_rows[fi] + nrows
        for r0, h in _reuse_hashes(path):
            n = len(h)
            words = h.view("<u8").reshape(n, 2)
            recs = np.empty(n, HASH_REC)
            recs["hi"], recs["lo"] = words[:, 0], words[:, 1]
            recs["g"] = -1 - (file_rows[fi] + r0 + np.arange(n, dtype=np.int64))
            keys = (recs["hi"] >> shift).astype(np.int64) if n_buckets > 1 else np.zeros(n, np.int64)
            buckets.add(recs, keys)
    buckets.flush()
    rows = bounds[-1]
    bounds_arr = np.asarray(bounds, np.int64)
    t_scan = time.monotonic() - t0

    # pass 2: per bucket, the canonical of each row and the slots of texts that span chunks
    n_parts = max(1, -(-rows // BUCKET_ROWS))
    parts = _Spreader(work, "part", n_parts)
    imports = _Spreader(work, "import", max(1, len(sources)))
    slots = distinct = reused_rows = reused_texts = 0
    for b in range(n_buckets):
        recs = buckets.read(b, HASH_REC)
        os.unlink(buckets.paths[b]) if os.path.exists(buckets.paths[b]) else None
        if not len(recs):
            continue
        recs = recs[np.lexsort((recs["g"], recs["lo"], recs["hi"]))]
        first = np.ones(len(recs), bool)
        first[1:] = (recs["hi"][1:] != recs["hi"][:-1]) | (recs["lo"][1:] != recs["lo"][:-1])
        starts = np.flatnonzero(first)
        group = np.cumsum(first) - 1
        g = recs["g"]
        chunk = np.searchsorted(bounds_arr, g, "right") - 1
        old = g[starts] < 0  # the text is in an earlier run's output
        needed = np.maximum.reduceat(g, starts) >= 0  # ... and in this run
        spans = np.maximum.reduceat(chunk, starts) != chunk[starts]  # canonical = smallest g = earliest chunk
        has_slot = np.where(old, needed, spans)
        group_slot = np.where(has_slot, slots + np.cumsum(has_slot) - 1, -1)
        slots += int(has_slot.sum())
        distinct += int(needed.sum())
        canon = np.where(old, -1, g[starts])
        mine = g >= 0
        out = np.empty(int(mine.sum()), PART_REC)
        out["g"], out["canon"], out["slot"] = g[mine], canon[group][mine], group_slot[group][mine]
        reused_rows += int((old[group] & mine).sum())
        reused_texts += int((old & needed).sum())
        parts.add(out, out["g"] // BUCKET_ROWS)
        take = np.flatnonzero(old & needed)
        if len(take):
            imp = np.empty(len(take), IMPORT_REC)
            imp["row"], imp["slot"] = -1 - g[starts[take]], group_slot[take]
            imports.add(imp, np.searchsorted(file_rows, imp["row"], "right") - 1)
        del recs, out
    parts.flush()
    imports.flush()

    # pass 3: the map in g order
    with open(os.path.join(root, "map.bin"), "wb") as fh:
        for p in range(n_parts):
            recs = parts.read(p, PART_REC)
            os.unlink(parts.paths[p]) if os.path.exists(parts.paths[p]) else None
            recs = recs[np.argsort(recs["g"], kind="stable")]
            lo = p * BUCKET_ROWS
            if not np.array_equal(recs["g"], np.arange(lo, min(rows, lo + BUCKET_ROWS))):
                raise RuntimeError("dedupe planning lost rows (internal error)")
            m = np.empty(len(recs), MAP_RECORD)
            m["canon"], m["slot"] = recs["canon"], recs["slot"]
            fh.write(m.tobytes())
    files = DedupeFiles(
        root, tuple(_offsets(plan)), slots, tuple(sorted(reuse_meta.items())), ", ".join(reuse)
    )
    if sources:
        dim = _dim_of(sources[0][0], reuse_meta)
        store = SlotStore(files, dim)
        try:
            _import_reused(store, sources, imports, file_rows)
        finally:
            store.close()
    shutil.rmtree(work)
    np.save(os.path.join(root, "bounds.npy"), bounds_arr)
    fsync_path(os.path.join(root, "map.bin"))
    fsync_path(os.path.join(root, "bounds.npy"))
    index = {
        "format": FORMAT,
        "chunks": len(plan.chunks),
        "plan": _plan_digest(plan),
        "chunk_offsets": list(files.chunk_offsets),
        "rows": rows,
        "distinct_texts": distinct,
        "slots": slots,
        "reuse": list(reuse),
        "options": _options_key(copts),
        "reuse_meta": reuse_meta,
        "reused_rows": reused_rows,
        "reused_texts": reused_texts,  # distinct texts of this run found in --reuse outputs (not sent)
        "reuse_files": len(sources),
        "seconds": round(time.monotonic() - t0, 3),
        "cpu_seconds": round(time.process_time() - cpu0, 3),
        "scan_seconds": round(t_scan, 3),
    }
    write_atomic(os.path.join(root, "index.json"), orjson.dumps(index, option=orjson.OPT_INDENT_2))
    fsync_dir(root)
    log.info(
        "dedupe plan: %d rows, %d distinct texts (%.1f%% repeats), %d shared across chunks (%.1fs)",
        rows,
        distinct,
        100.0 * (rows - distinct) / max(1, rows),
        slots,
        index["seconds"],
    )
    return files, index


def _plan_digest(plan: Plan) -> str:
    """Which plan a map belongs to (the stored plan is reused verbatim on resume, so this is stable)."""
    import hashlib

    return hashlib.sha256(plan.to_json()).hexdigest()


def _offsets(plan: Plan) -> list[int]:
    """Chunks planned before each input file."""
    offsets, seen = [], 0
    for fi in range(len(plan.files)):
        offsets.append(seen)
        seen += sum(1 for c in plan.chunks if c.file_index == fi)
    return offsets


def _dim_of(path: str, meta: dict[str, str]) -> int:
    try:
        return int(meta["dim"])
    except (KeyError, ValueError):
        raise DedupeError(f"--reuse {path}: no dimension in its metadata (tweet_embed.dim)") from None


def _reuse_hashes(path: str) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, (n, 16) uint8 hashes) of an earlier output file, in batches."""
    import pyarrow.parquet as pq

    from tweet_embed import storage
    from tweet_embed.parquet import TEXT_HASH

    with storage.open_raw(path) as fh:
        r0 = 0
        for batch in pq.ParquetFile(fh).iter_batches(batch_size=1 << 20, columns=[TEXT_HASH]):
            col = batch.column(0)
            n = len(col)
            buf = col.buffers()[1]
            h = np.frombuffer(buf, np.uint8, count=16 * (col.offset + n))[16 * col.offset :].reshape(n, 16)
            yield r0, h
            r0 += n
