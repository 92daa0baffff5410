"""One chunk end to end: its parsed rows → batches → backend → vectors → shard → rejects → marker.

Shared by the local engine (``runner.py``) and the Ray engine, so both produce identical output.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .backends.base import Backend, BackendInfo
from .backends.pool import BatchRefused
from .chunks import Chunk, Marker, WorkDirs, write_marker
from .parquet import file_sha256, make_table, publish, write_atomic, write_table
from .records import SNIPPET_CHARS, ParsedBlock, Reject

MAX_BATCH_CHARS = 400_000  # keeps request bodies well under TEI's 2 MB payload limit


@dataclass
class ChunkResult:
    ids: list[str]
    vectors: np.ndarray
    rejects: list[Reject]
    embedded_texts: int  # texts actually sent (fewer than rows with --dedupe-texts)


def make_batches(texts: Sequence[str], max_batch: int, max_chars: int = MAX_BATCH_CHARS) -> list[tuple[int, int]]:
    """Cut ``texts`` into ``[start, end)`` batches of at most ``max_batch`` texts and ~``max_chars`` chars."""
    out: list[tuple[int, int]] = []
    start, chars = 0, 0
    for i, t in enumerate(texts):
        if i > start and (i - start >= max_batch or chars + len(t) > max_chars):
            out.append((start, i))
            start, chars = i, 0
        chars += len(t)
    if start < len(texts):
        out.append((start, len(texts)))
    return out


async def embed_texts(
    backend: Backend, texts: Sequence[str], info: BackendInfo, limiter: asyncio.Semaphore | None = None
) -> tuple[np.ndarray, dict[int, str]]:
    """Embed ``texts`` in batches; returns (vectors, {index: reason} of texts the server refused).

    A refused batch is split in halves until the refused text stands alone; its row gets a zero vector
    here and is turned into a reject by the caller.
    """
    out = np.zeros((len(texts), info.dim), dtype=np.float32)
    refused: dict[int, str] = {}

    async def run(lo: int, hi: int) -> None:
        try:
            if limiter is None:
                vecs = await backend.embed(texts[lo:hi])
            else:
                async with limiter:
                    vecs = await backend.embed(texts[lo:hi])
        except BatchRefused as exc:
            if hi - lo == 1:
                refused[lo] = f"server refused the text: {exc}"
                return
            mid = (lo + hi) // 2
            await asyncio.gather(run(lo, mid), run(mid, hi))
            return
        out[lo:hi] = vecs

    tasks = [asyncio.ensure_future(run(lo, hi)) for lo, hi in make_batches(texts, info.max_batch)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return out, refused


async def embed_block(
    backend: Backend, block: ParsedBlock, info: BackendInfo, *, dedupe: bool = False,
    limiter: asyncio.Semaphore | None = None, file_label: str = "",
) -> ChunkResult:
    """Embed one chunk's parsed rows (optionally each distinct text once) and collect refusals as rejects."""
    texts = block.texts
    if dedupe and texts:
        index: dict[str, int] = {}
        inverse = np.fromiter((index.setdefault(t, len(index)) for t in texts), dtype=np.int64, count=len(texts))
        unique = list(index)
        uvecs, urefused = await embed_texts(backend, unique, info, limiter)
        vectors = uvecs[inverse]
        refused = {i: urefused[int(u)] for i, u in enumerate(inverse) if int(u) in urefused}
        sent = len(unique)
    else:
        vectors, refused = await embed_texts(backend, texts, info, limiter)
        sent = len(texts)
    rejects = list(block.rejects)
    ids = block.ids
    if refused:
        keep = np.ones(len(ids), dtype=bool)
        for i, reason in refused.items():
            keep[i] = False
            rejects.append(Reject(file_label, block.lines[i], reason, texts[i][:SNIPPET_CHARS]))
        ids = [x for x, k in zip(ids, keep, strict=True) if k]
        vectors = vectors[keep]
        rejects.sort(key=lambda r: r.line)
    return ChunkResult(ids, vectors, rejects, sent)


def commit_chunk(dirs: WorkDirs, chunk: Chunk, result: ChunkResult, metadata: dict[str, str]) -> Marker:
    """Temporary file, fsync, atomic publish into the shards dir, rejects, then the marker. Blocking."""
    tmp = dirs.tmp_path(chunk)
    try:
        write_table(make_table(result.ids, result.vectors, metadata), tmp)
        sha = file_sha256(tmp)
        publish(tmp, dirs.shard_path(chunk))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    rpath = dirs.rejects_path(chunk)
    if result.rejects:
        write_atomic(rpath, b"".join(r.to_json() + b"\n" for r in result.rejects))
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rpath)
    marker = Marker(
        chunk=chunk.name, rows=len(result.ids), rejects=len(result.rejects), sha256=sha,
        shard=os.path.basename(dirs.shard_path(chunk)), first_line=chunk.first_line, n_lines=chunk.n_lines,
        embedded_texts=result.embedded_texts,
    )
    write_marker(dirs, chunk, marker)
    return marker
