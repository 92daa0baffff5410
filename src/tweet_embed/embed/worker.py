"""One chunk end to end: its parsed rows → batches → backend → vectors → shard → rejects → marker.

Shared by the local engine (``runner.py``) and the Ray engine, so both produce identical output.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tweet_embed import storage
from tweet_embed.backends.base import Backend, BackendInfo, check_vectors
from tweet_embed.backends.pool import BatchRefused
from tweet_embed.embed.chunks import Chunk, InputFile, Marker, Plan, WorkDirs, iter_chunk_bytes, write_marker
from tweet_embed.embed.dedupe import (
    PATIENCE,
    SLOT_OK,
    SLOT_REFUSED,
    ChunkMap,
    DedupeError,
    DedupeFiles,
    SlotStore,
    check_reuse_meta,
    text_hashes,
)
from tweet_embed.input.formats import parse_block
from tweet_embed.input.records import SNIPPET_CHARS, ParsedBlock, Reject, read_range
from tweet_embed.input.rules import DEFAULT_RULES, Rules
from tweet_embed.parquet import file_sha256, make_table, write_table

log = logging.getLogger("tweet_embed")
MAX_BATCH_CHARS = 400_000  # keeps request bodies well under TEI's 2 MB payload limit


@dataclass
class ChunkResult:
    ids: list[str]
    vectors: np.ndarray
    rejects: list[Reject]
    embedded_texts: int  # texts actually sent (fewer than rows when repeats are deduplicated)
    hashes: np.ndarray | None = None  # (rows, 16) uint8: each row's text_hash
    reused: int = 0  # rows whose vector came from an earlier run (--reuse)
    skipped: dict[str, int] = field(default_factory=dict)  # rows left out by a filter, by reason


def make_batches(
    texts: Sequence[str], max_batch: int, max_chars: int = MAX_BATCH_CHARS
) -> list[tuple[int, int]]:
    """Cut ``texts`` into ``[start, end)`` batches of at most ``max_batch`` texts and ~``max_chars`` chars.

    Each batch is the longest run from its start within both limits (a text longer than ``max_chars`` goes
    alone). Works on prefix sums, one step per batch rather than per text: the run loop calls this for every
    chunk, and a per-text Python loop cost ~1.5 µs a text there.
    """
    n = len(texts)
    max_batch = max(1, max_batch)
    if n == 0:
        return []
    prefix = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=n), out=prefix[1:])
    if int(prefix[-1]) <= max_chars:
        return [(s, min(s + max_batch, n)) for s in range(0, n, max_batch)]
    out: list[tuple[int, int]] = []
    start = 0
    while start < n:
        fits = int(np.searchsorted(prefix, prefix[start] + max_chars, side="right")) - 1
        end = max(start + 1, min(start + max_batch, fits, n))
        out.append((start, end))
        start = end
    return out


async def embed_texts(
    backend: Backend, texts: Sequence[str], info: BackendInfo, limiter: asyncio.Semaphore | None = None
) -> tuple[np.ndarray, dict[int, str]]:
    """Embed ``texts`` in batches; returns (vectors, {index: reason} of texts the server refused).

    A refused batch is split in halves until the refused text stands alone; its row gets a zero vector
    here and is turned into a reject by the caller.
    """
    refused: dict[int, str] = {}
    # the character cap protects HTTP bodies; an in-process model takes whole token-budgeted calls
    max_chars = MAX_BATCH_CHARS if info.kind != "local" else sys.maxsize
    batches = make_batches(texts, info.max_batch, max_chars)

    async def call(lo: int, hi: int) -> np.ndarray:
        if limiter is None:
            return await backend.embed(texts[lo:hi])
        async with limiter:
            return await backend.embed(texts[lo:hi])

    first_refusal: BatchRefused | None = None
    if len(batches) == 1:  # one call (a local model's whole chunk): its array as it is, not copied
        try:
            return check_vectors(await call(0, len(texts)), len(texts), info.dim), refused
        except BatchRefused as exc:
            first_refusal = exc  # handled below like any refusal, without sending the batch again
    out = np.zeros((len(texts), info.dim), dtype=np.float32)

    async def run(lo: int, hi: int, known: BatchRefused | None = None) -> None:
        try:
            if known is not None:
                raise known
            vecs = await call(lo, hi)
        except BatchRefused as exc:
            if hi - lo == 1:
                refused[lo] = f"server refused the text: {exc}"
                return
            mid = (lo + hi) // 2
            await asyncio.gather(run(lo, mid), run(mid, hi))
            return
        out[lo:hi] = vecs

    tasks = [asyncio.ensure_future(run(lo, hi, first_refusal)) for lo, hi in batches]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    finally:
        # ``run`` refers to itself (the split), so it and its cells (``out``!) form a reference cycle that
        # only the cyclic GC frees, late: without this, peak RSS grew by a chunk of vectors per chunk.
        run = None  # type: ignore[assignment]
        first_refusal = None  # its traceback holds this frame (and ``out``) in a cycle too
    return out, refused


async def embed_block(
    backend: Backend,
    block: ParsedBlock,
    info: BackendInfo,
    *,
    dedupe: tuple[ChunkMap, SlotStore] | None = None,
    limiter: asyncio.Semaphore | None = None,
    file_label: str = "",
) -> ChunkResult:
    """Embed one chunk's parsed rows and collect refusals as rejects.

    With ``dedupe`` (the chunk's slice of the run's dedupe map and the slot store) only the rows that are their
    text's first occurrence are sent; repeats get their canonical's vector, bit for bit (see :mod:`.dedupe`).
    """
    texts = block.texts
    hashes = text_hashes(texts)
    reused = 0
    if dedupe is None:
        vectors, refused = await embed_texts(backend, texts, info, limiter)
        sent = len(texts)
    else:
        vectors, refused, sent = await _embed_deduped(backend, block, info, dedupe, limiter, file_label)
        reused = int((dedupe[0].canon < 0).sum())
    rejects = list(block.rejects)
    ids = block.ids
    if refused:
        keep = np.ones(len(ids), dtype=bool)
        for i, reason in refused.items():
            keep[i] = False
            rejects.append(Reject(file_label, block.lines[i], reason, texts[i][:SNIPPET_CHARS]))
        ids = [x for x, k in zip(ids, keep, strict=True) if k]
        vectors = vectors[keep]
        hashes = hashes[keep]
        rejects.sort(key=lambda r: r.line)
    return ChunkResult(ids, vectors, rejects, sent, hashes, reused, block.skipped)


async def _embed_deduped(
    backend: Backend,
    block: ParsedBlock,
    info: BackendInfo,
    dedupe: tuple[ChunkMap, SlotStore],
    limiter: asyncio.Semaphore | None,
    label: str,
) -> tuple[np.ndarray, dict[int, str], int]:
    """(vectors, refused rows, texts sent): own texts embedded and published first, then repeats filled."""
    cmap, store = dedupe
    texts = block.texts
    n = len(texts)
    if len(cmap.canon) != n:
        raise DedupeError(
            f"{label}: a chunk holds {n} valid rows but the plan counted {len(cmap.canon)} (input changed "
            "since the run was planned? --restart plans again)"
        )
    g = cmap.first + np.arange(n, dtype=np.int64)
    own = np.flatnonzero(cmap.canon == g)
    own_slot = cmap.slot[own]
    # slots a killed attempt already published are final (write-once): take them instead of embedding again
    preset = np.zeros(len(own), dtype=bool)
    shared = np.flatnonzero(own_slot >= 0)
    if len(shared):
        preset[shared[store.flags(own_slot[shared]) != 0]] = True
    todo = own[~preset]
    vectors = np.zeros((n, info.dim), dtype=np.float32)
    refused: dict[int, str] = {}
    if len(todo):
        vecs, ref = await embed_texts(backend, [texts[i] for i in todo.tolist()], info, limiter)
        vectors[todo] = vecs
        refused.update({int(todo[k]): reason for k, reason in ref.items()})
    if preset.any():
        done_rows, done_slots = own[preset], own_slot[preset]
        vectors[done_rows] = await asyncio.to_thread(store.read, done_slots)
        for i, f in zip(done_rows.tolist(), store.flags(done_slots).tolist(), strict=True):
            if f == SLOT_REFUSED:
                refused[i] = "server refused the text (in an earlier attempt of this chunk)"
    publish = todo[cmap.slot[todo] >= 0]
    if len(publish):
        await _publish(store, cmap.slot[publish], publish, vectors, refused)
    remote = np.flatnonzero(cmap.canon < cmap.first)
    sent = len(todo)
    if len(remote):
        slots = cmap.slot[remote]
        if (slots < 0).any():
            raise DedupeError(
                f"{label}: the dedupe map names no slot for a repeat of an earlier chunk's text"
            )
        rflags = await store.wait(slots, PATIENCE)
        if not rflags.all():  # the chunk that embeds these first is lost or stalled: embed them here
            late_slots, first_row = np.unique(slots[rflags == 0], return_index=True)
            late_rows = remote[rflags == 0][first_row]
            log.warning(
                "%s: %d repeated text(s) not published by their first chunk after %.0fs: embedding them here",
                label,
                len(late_rows),
                PATIENCE,
            )
            vecs, ref = await embed_texts(backend, [texts[i] for i in late_rows.tolist()], info, limiter)
            vectors[late_rows] = vecs
            late_refused = {int(late_rows[k]): r for k, r in ref.items()}
            await _publish(store, late_slots, late_rows, vectors, late_refused)
            sent += len(late_rows)
            rflags = store.flags(slots)
        vectors[remote] = await asyncio.to_thread(store.read, slots)
        for i, f in zip(remote.tolist(), rflags.tolist(), strict=True):
            if f == SLOT_REFUSED:
                refused[i] = "server refused the text (the same text at an earlier line)"
    local = np.flatnonzero((cmap.canon >= cmap.first) & (cmap.canon != g))
    if len(local):
        src = cmap.canon[local] - cmap.first
        vectors[local] = vectors[src]
        for i, s in zip(local.tolist(), src.tolist(), strict=True):
            if s in refused:
                refused[i] = refused[s]
    return vectors, refused, sent


async def _publish(
    store: SlotStore, slots: np.ndarray, rows: np.ndarray, vectors: np.ndarray, refused: dict[int, str]
) -> None:
    """Publish ``rows``' vectors into ``slots``; rows whose slot another chunk published first take its vector
    (and its refusal), so this chunk's shard holds exactly what the slot's readers get."""
    flags = np.array([SLOT_REFUSED if i in refused else SLOT_OK for i in rows.tolist()], np.uint8)
    final, final_flags = await asyncio.to_thread(store.publish, slots, vectors[rows], flags)
    vectors[rows] = final
    for i, f in zip(rows.tolist(), final_flags.tolist(), strict=True):
        if f == SLOT_REFUSED:
            refused.setdefault(i, "server refused the text (in another chunk)")
        else:
            refused.pop(i, None)


def commit_chunk(dirs: WorkDirs, chunk: Chunk, result: ChunkResult, metadata: dict[str, str]) -> Marker:
    """Temporary file, fsync, atomic publish into the shards dir, rejects, then the marker. Blocking.

    On an object store the shard is uploaded straight to its final key (a PUT is all or nothing) and the
    marker, written last, is the commit: see :mod:`tweet_embed.storage`.
    """
    tmp = dirs.tmp_path(chunk)
    os.makedirs(dirs.tmp, exist_ok=True)  # a Ray worker on another machine may not have it yet
    try:
        write_table(make_table(result.ids, result.vectors, metadata, result.hashes), tmp)
        sha = file_sha256(tmp)
        storage.upload_file(tmp, dirs.shard_path(chunk))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    rpath = dirs.rejects_path(chunk)
    if result.rejects:
        storage.write_bytes(rpath, b"".join(r.to_json() + b"\n" for r in result.rejects))
    else:
        storage.delete(rpath)
    marker = Marker(
        chunk=chunk.name,
        rows=len(result.ids),
        rejects=len(result.rejects),
        sha256=sha,
        shard=os.path.basename(dirs.shard_path(chunk)),
        first_line=chunk.first_line,
        n_lines=chunk.n_lines,
        embedded_texts=result.embedded_texts,
        skipped=result.skipped,
        reused=result.reused,
    )
    write_marker(dirs, chunk, marker)
    return marker


@dataclass(frozen=True)
class ChunkOptions:
    """The run options a chunk's work depends on (picklable: sent to Ray tasks with each chunk)."""

    id_field: str = "_id"
    text_field: str = "text"
    dedupe: DedupeFiles | None = None  # the run's dedupe map and slot store; None: every row is sent
    rules: Rules = DEFAULT_RULES  # text mode and filters (input.rules)


def read_block(f: InputFile, chunk: Chunk, copts: ChunkOptions, data: bytes | None = None) -> ParsedBlock:
    """One chunk's rows, read on their own: ``data`` when the caller already has the bytes, else a seek
    (plain JSONL, Parquet row range) or a decompress-and-skip from the start (``.gz``/``.zst``)."""
    if f.kind == "parquet":
        return read_parquet_block(f, chunk, copts.id_field, copts.text_field, copts.rules)
    if data is None:
        data = read_range(f.path, chunk.start, chunk.end)
    return parse_block(
        f.kind,
        data,
        chunk.first_line,
        f.label,
        copts.id_field,
        copts.text_field,
        copts.rules,
        f.tweets,
        f.header,
    )


async def run_pipeline(
    next_item: Callable[[], tuple[Chunk, ParsedBlock] | None],
    embed: Callable[[Chunk, ParsedBlock], Awaitable[ChunkResult]],
    commit: Callable[[Chunk, ChunkResult], Marker],
    done: Callable[[Chunk, Marker], None],
    *,
    chunks_in_flight: int,
    writes_in_flight: int,
) -> None:
    """Read, embed and write chunks with every stage overlapping the others, until ``next_item`` gives None.

    ``next_item`` (blocking: reading, parsing) runs on its own thread, one chunk ahead. Up to
    ``chunks_in_flight`` chunks are embedding. A chunk that has its vectors hands its slot on at once and waits
    for one of ``writes_in_flight`` writer threads for ``commit`` (pyarrow releases the GIL), so a slow write
    never idles the backend; memory stays within chunks_in_flight + writes_in_flight + 2 chunks. The first error
    cancels the chunks still embedding and is raised once the commits under way have finished (their markers
    count on resume). Shared by the local engine and the device workers.
    """
    loop = asyncio.get_running_loop()
    reader = ThreadPoolExecutor(1, thread_name_prefix="reader")
    writer = ThreadPoolExecutor(max(1, writes_in_flight), thread_name_prefix="writer")
    slots = asyncio.Semaphore(max(1, chunks_in_flight))
    write_slots = asyncio.Semaphore(max(1, writes_in_flight))
    tasks: set[asyncio.Task[None]] = set()
    errors: list[BaseException] = []

    def finished(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            errors.append(task.exception())  # type: ignore[arg-type]

    async def process(chunk: Chunk, block: ParsedBlock) -> None:
        embedding = True
        try:
            result = await embed(chunk, block)
            del block
            async with write_slots:
                slots.release()
                embedding = False
                marker = await loop.run_in_executor(writer, commit, chunk, result)
            done(chunk, marker)
        finally:
            if embedding:
                slots.release()

    ahead: asyncio.Future[tuple[Chunk, ParsedBlock] | None] | None = None
    try:
        ahead = loop.run_in_executor(reader, next_item)
        while True:
            item = await ahead
            if item is None:
                break
            await slots.acquire()
            if errors:
                slots.release()
                raise errors[0]
            ahead = loop.run_in_executor(reader, next_item)
            task = asyncio.ensure_future(process(*item))
            tasks.add(task)
            task.add_done_callback(finished)
        if tasks:
            await asyncio.gather(*list(tasks))
        if errors:
            raise errors[0]
    except BaseException:
        if ahead is not None and not ahead.done():
            ahead.cancel()
        for t in list(tasks):
            t.cancel()
        await asyncio.gather(*list(tasks), return_exceptions=True)
        raise
    finally:
        writer.shutdown(wait=True)
        reader.shutdown(wait=False, cancel_futures=True)


async def process_chunk(
    f: InputFile,
    chunk: Chunk,
    dirs: WorkDirs,
    backend: Backend,
    info: BackendInfo,
    metadata: dict[str, str],
    copts: ChunkOptions,
    *,
    data: bytes | None = None,
    limiter: asyncio.Semaphore | None = None,
) -> Marker:
    """Read, parse, embed and commit one chunk: the whole unit of work of a Ray task or actor call."""
    block = await asyncio.to_thread(read_block, f, chunk, copts, data)
    result = await embed_chunk(backend, chunk, block, info, copts, limiter=limiter, file_label=f.label)
    return await asyncio.to_thread(commit_chunk, dirs, chunk, result, metadata)


async def embed_chunk(
    backend: Backend,
    chunk: Chunk,
    block: ParsedBlock,
    info: BackendInfo,
    copts: ChunkOptions,
    *,
    limiter: asyncio.Semaphore | None = None,
    file_label: str = "",
) -> ChunkResult:
    """:func:`embed_block` with this chunk's slice of the run's dedupe map, when the run deduplicates."""
    if copts.dedupe is None:
        return await embed_block(backend, block, info, limiter=limiter, file_label=file_label)
    if copts.dedupe.reuse_meta:
        check_reuse_meta(dict(copts.dedupe.reuse_meta), info.metadata(), copts.dedupe.reuse_label)
    cmap = await asyncio.to_thread(ChunkMap.read, copts.dedupe, chunk.file_index, chunk.index)
    store = SlotStore(copts.dedupe, info.dim)
    try:
        return await embed_block(
            backend, block, info, dedupe=(cmap, store), limiter=limiter, file_label=file_label
        )
    finally:
        store.close()


def parse_chunks(
    plan: Plan, pending: list[Chunk], copts: ChunkOptions
) -> Iterator[tuple[Chunk, ParsedBlock]]:
    """Parsed chunks in plan order: text files (JSONL, JSON arrays, CSV...) read sequentially once, Parquet
    chunks by row range. The run loop's reader, and the dedupe planning scan's, which must see exactly the
    rows and texts the run embeds."""
    runs: list[tuple[str, list[Chunk]]] = []
    for c in pending:
        kind = plan.files[c.file_index].kind
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(c)
        else:
            runs.append((kind, [c]))
    for kind, chunks in runs:
        if kind == "parquet":
            for c in chunks:
                yield c, read_block(plan.files[c.file_index], c, copts)
            continue
        for chunk, data in iter_chunk_bytes(plan, chunks):
            yield chunk, read_block(plan.files[chunk.file_index], chunk, copts, data)


def read_parquet_block(
    f: InputFile, chunk: Chunk, id_field: str, text_field: str, rules: Rules = DEFAULT_RULES
) -> ParsedBlock:
    """A Parquet chunk (a row range) as a parsed block; line numbers are 1-based row numbers."""
    from tweet_embed.input.parquet import filter_parquet_block, read_parquet_chunk

    ids, texts, rejects = read_parquet_chunk(
        f.path, chunk.start, chunk.n_lines, id_field, text_field, f.label
    )
    rejected = {r.line for r in rejects}
    lines = [n for n in range(chunk.first_line, chunk.first_line + chunk.n_lines) if n not in rejected]
    block = ParsedBlock(ids, texts, lines, rejects)
    return filter_parquet_block(block, f.path, chunk.start, chunk.n_lines, rules) if rules.filters else block
