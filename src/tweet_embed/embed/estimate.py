"""``tweet-embed plan``: what a run will take before it starts — lines and chunks, a sample's rejects, repeats
and token lengths, measured throughput of the real backend, and the time, disk and BigQuery bytes to expect.

How each figure is made (so a reader can judge it):

* ``lines``, ``chunks``: the chunk plan, the same scan ``embed`` makes and stores in ``plan.json`` (a later
  ``embed`` with the same inputs and chunk size reuses it).
* The sample: up to 20 chunks evenly spaced over the whole plan (first, last and between), parsed exactly as
  ``embed`` parses them (formats, rules, filters); rates found there are applied to all lines.  At least
  ``sample_lines`` lines when the input has them.
* ``distinct_texts``: exact (``distinct_method: exact``) from the whole input's dedupe map — the one ``embed``
  builds, made here in the same place so ``embed`` loads it instead of scanning again — with ``--distinct
  exact``, or ``auto`` (the default) up to 20M lines; else (``sample``, or larger inputs) the share of distinct
  texts *within the sample*, applied to all rows: repeats further apart than the sampled chunks are not seen,
  so that is an upper bound on distinct texts (a lower bound on the saving).
* Token lengths: the model's own tokenizer on up to 10,000 sampled texts — TEI's ``POST /tokenize``, or the
  in-process model's tokenizer (without truncation, the prompt included); ``truncated_share`` is the share
  above the server's ``max_input_length`` (the model's maximum length).  Unknown (null) for backends with
  neither (OpenAI-compatible servers).
* ``--calibrate SECONDS``: real batches of sampled texts through the real backend with ``embed``'s batch size
  and concurrency, for that long; docs/s counted after the first fifth (warm-up), per endpoint and in total.
* ``estimated_seconds``: texts still to send (valid rows of the chunks not done yet; distinct texts unless
  ``--no-dedupe``) / measured docs/s.  ``bench/plan_accuracy.py`` prints its error against real runs.
* Bytes: shards ``rows × (4·dim + id + 4)`` (uncompressed float32 vectors, see parquet.py); consolidated
  ``rows × (4·dim + 8 + id)``; BigQuery ``rows × (8·dim + id + 2)`` (ARRAY<FLOAT64> is 8 bytes an element,
  STRING 2 + UTF-8 bytes, per BigQuery's storage pricing).  A ``VECTOR_SEARCH`` without a vector index reads
  the whole embedding column: about ``rows × 8·dim`` bytes per query.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson

from tweet_embed import storage
from tweet_embed.backends import BackendSpec
from tweet_embed.backends.base import Backend
from tweet_embed.backends.pool import BatchRefused
from tweet_embed.embed.chunks import Chunk, Plan, done_markers, finished_chunks, load_or_create_plan
from tweet_embed.embed.options import EmbedOptions
from tweet_embed.embed.telemetry import reject_kind

ESTIMATE_NAME = "estimate.json"  # the last plan's report, in the progress dir
SAMPLE_CHUNKS = 20
TOKENIZE_TEXTS = 10_000


def sample_chunks(plan: Plan, sample_lines: int) -> list[Chunk]:
    """Chunks evenly spaced over the plan, enough to hold ``sample_lines`` lines (at least ``SAMPLE_CHUNKS``
    when there are that many)."""
    chunks = plan.chunks
    if not chunks:
        return []
    per = max(1, sum(c.n_lines for c in chunks) // len(chunks))
    k = min(len(chunks), max(SAMPLE_CHUNKS, math.ceil(sample_lines / per)))
    if k == len(chunks):
        return list(chunks)
    step = (len(chunks) - 1) / (k - 1) if k > 1 else 0
    picks = sorted({round(i * step) for i in range(k)})
    return [chunks[i] for i in picks]


def _parse_sample(plan: Plan, chunks: list[Chunk], opts: EmbedOptions) -> dict[str, Any]:
    from tweet_embed.embed.options import chunk_options
    from tweet_embed.embed.worker import parse_chunks

    lines = valid = 0
    rejects: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    texts: list[str] = []
    id_bytes = 0
    for chunk, block in parse_chunks(plan, chunks, chunk_options(opts)):
        lines += chunk.n_lines
        valid += len(block.ids)
        rejects.update(reject_kind(r.reason) for r in block.rejects)
        skipped.update(block.skipped)
        texts.extend(block.texts)
        id_bytes += sum(len(i.encode("utf-8", "surrogatepass")) for i in block.ids)
    distinct = len(
        {hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16).digest() for t in texts}
    )
    return {
        "lines": lines,
        "valid": valid,
        "rejects": rejects,
        "skipped": skipped,
        "texts": texts,
        "distinct": distinct,
        "avg_id_bytes": id_bytes / valid if valid else 16.0,
    }


def _spread(items: list[str], n: int) -> list[str]:
    if len(items) <= n:
        return items
    step = len(items) / n
    return [items[int(i * step)] for i in range(n)]


async def _token_lengths(
    backend: Backend, texts: list[str], batch: int
) -> tuple[list[int], int | None] | None:
    """Token counts from TEI's ``/tokenize`` (special tokens included, as the length limit counts them) and
    the server's ``max_input_length``, or the in-process model's own tokenizer and limit; None when the
    backend has neither."""
    local = getattr(backend, "token_lengths", None)
    if local is not None and texts:
        return await asyncio.to_thread(local, texts)
    endpoints = backend.endpoints()
    if not endpoints or not texts:
        return None
    post = getattr(backend, "post", None)
    get_json = getattr(backend, "get_json", None)
    if post is None or get_json is None:
        return None
    ep = endpoints[0]
    base = ep.url
    for suffix in ("/v1/embeddings", "/embeddings", "/embed"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    info = await get_json(base + "/info")
    max_len = info.get("max_input_length") if isinstance(info, dict) else None
    counts: list[int] = []
    try:
        sem = asyncio.Semaphore(8)

        async def one(part: list[str]) -> list[int]:
            async with sem:
                body = await post(ep, base + "/tokenize", orjson.dumps({"inputs": part}))
            doc = orjson.loads(body)
            return [len(toks) for toks in doc]

        parts = [texts[i : i + batch] for i in range(0, len(texts), batch)]
        for got in await asyncio.gather(*(one(p) for p in parts)):
            counts.extend(got)
    except Exception:  # no TEI /tokenize there (an OpenAI-compatible server): token figures stay unknown
        return None
    return counts, int(max_len) if isinstance(max_len, int) else None


async def _calibrate(
    backend: Backend, texts: list[str], batch: int, in_flight: int, seconds: float
) -> dict[str, Any]:
    """Send real batches for ``seconds``; docs/s after a warm-up of a fifth of the time."""
    pool = itertools.cycle([texts[i : i + batch] for i in range(0, len(texts), batch)] or [["calibration"]])
    warm = seconds / 5
    t0 = time.monotonic()
    t_warm, t_end = t0 + warm, t0 + seconds
    counted = 0
    before: dict[str, int] = {}

    async def worker() -> None:
        nonlocal counted
        while time.monotonic() < t_end:
            part = next(pool)
            try:
                await backend.embed(part)
            except BatchRefused:  # a text the server will not take: embed splits such batches; skip it here
                continue
            now = time.monotonic()
            if t_warm <= now <= t_end:
                counted += len(part)

    async def snapshot() -> None:
        await asyncio.sleep(warm)
        before.update({e.host: e.inputs for e in backend.endpoints()})

    snap = asyncio.create_task(snapshot())
    await asyncio.gather(*(worker() for _ in range(max(1, in_flight))))
    await snap
    window = seconds - warm
    per_endpoint = {
        e.host: round((e.inputs - before.get(e.host, 0)) / window, 1) for e in backend.endpoints()
    }
    return {"seconds": seconds, "docs_per_s": round(counted / window, 1), "per_endpoint": per_endpoint}


def _quantile(values: list[int], q: float) -> int | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


EXACT_DISTINCT_LINES = 20_000_000  # `--distinct auto`: the exact map up to here (~1-2 min at 3-5 µs a line)


def _exact_distinct(opts: EmbedOptions, plan: Plan, total_lines: int, mode: str) -> dict[str, Any] | None:
    """The dedupe map's index (valid rows, distinct texts, texts found in ``--reuse`` outputs) for
    ``--distinct exact`` (or ``auto`` up to ``EXACT_DISTINCT_LINES``), None for the sample's estimate.

    It is the map ``embed`` needs anyway, built in the same place, so a later ``embed`` with the same work dir
    and input options loads it instead of scanning again.
    """
    if mode == "sample" or not opts.dedupe or (mode == "auto" and total_lines > EXACT_DISTINCT_LINES):
        return None
    from tweet_embed.embed.dedupe_plan import dedupe_root, map_out_of_reach, plan_dedupe

    if map_out_of_reach(opts.dirs, opts.ray):
        return None  # such a run dedupes inside each chunk only
    from tweet_embed.embed.options import chunk_options

    _, index = plan_dedupe(plan, dedupe_root(opts.dirs), chunk_options(opts), opts.reuse)
    return index


async def make_estimate(
    opts: EmbedOptions,
    make_backend: Callable[[], Backend] | BackendSpec,
    *,
    sample_lines: int = 10_000,
    calibrate: float = 20.0,
    distinct: str = "auto",
) -> dict[str, Any]:
    """The plan report (a JSON-ready dict); see the module docstring for how each figure is made."""
    dirs = opts.dirs
    dirs.create()
    plan, _ = await asyncio.to_thread(
        load_or_create_plan, dirs, opts.inputs, opts.chunk_lines, opts.input_format
    )
    total_lines = sum(c.n_lines for c in plan.chunks)
    done = finished_chunks(dirs, plan, done_markers(dirs))
    lines_left = sum(c.n_lines for c in plan.chunks if c.name not in done)
    picks = sample_chunks(plan, sample_lines)
    s = await asyncio.to_thread(_parse_sample, plan, picks, opts)
    ratio = s["valid"] / s["lines"] if s["lines"] else 0.0
    distinct_share = s["distinct"] / s["valid"] if s["valid"] else 1.0
    valid_rows = round(total_lines * ratio)
    scale = total_lines / s["lines"] if s["lines"] else 0.0
    out: dict[str, Any] = {
        "inputs": [f.label for f in plan.files],
        "lines": total_lines,
        "chunks": len(plan.chunks),
        "chunks_done": len(done),
        "sample": {"chunks": len(picks), "lines": s["lines"], "valid": s["valid"]},
        "valid_rows": valid_rows,
        "rejects": {k: round(v * scale) for k, v in sorted(s["rejects"].items())},
        "skipped": {k: round(v * scale) for k, v in sorted(s["skipped"].items())},
        "distinct_texts": round(valid_rows * distinct_share),
        "repeat_share": round(1 - distinct_share, 4),
        "distinct_method": "sample",
    }
    index = await asyncio.to_thread(_exact_distinct, opts, plan, total_lines, distinct)
    if index is not None:
        # the whole input's dedupe map, as `embed` builds it (and then reuses it: nothing is done twice)
        valid_rows = int(index["rows"])
        out["valid_rows"] = valid_rows
        out["distinct_texts"] = int(index["distinct_texts"])
        out["repeat_share"] = round(1 - out["distinct_texts"] / valid_rows, 4) if valid_rows else 0.0
        out["distinct_method"] = "exact"
        out["reused_texts"] = int(index.get("reused_texts", 0))
    factory = make_backend.build if isinstance(make_backend, BackendSpec) else make_backend
    backend = factory()
    try:
        info = await backend.start()
        dim = info.dim
        out["model"], out["dim"] = info.model, dim
        texts = _spread(s["texts"], TOKENIZE_TEXTS)
        toks = await _token_lengths(backend, texts, max(1, min(info.max_batch, 32)))
        if toks is None:
            out["tokens"] = None
        else:
            counts, max_len = toks
            over = sum(1 for c in counts if max_len is not None and c > max_len)
            out["tokens"] = {
                "texts": len(counts),
                "p50": _quantile(counts, 0.5),
                "p95": _quantile(counts, 0.95),
                "max": max(counts) if counts else None,
                "max_input_length": max_len,
                "truncated_share": round(over / len(counts), 4) if counts and max_len else None,
            }
        if index is not None:  # distinct texts not in --reuse outputs; a resumed run: in proportion
            to_send = (out["distinct_texts"] - out["reused_texts"]) * (lines_left / max(1, total_lines))
        else:
            to_send = lines_left * ratio * (distinct_share if opts.dedupe else 1.0)
        if calibrate > 0 and s["texts"]:
            cal = await _calibrate(
                backend, _spread(s["texts"], 50_000), info.max_batch, info.max_in_flight, calibrate
            )
            out["calibration"] = cal
            rate = cal["docs_per_s"]
            out["estimated_seconds"] = round(to_send / rate, 1) if rate > 0 else None
        else:
            out["calibration"] = None
            out["estimated_seconds"] = None
        out["texts_to_send"] = round(to_send)
    finally:
        await backend.close()
    idb = s["avg_id_bytes"]
    out["shard_bytes"] = round(valid_rows * (4 * dim + idb + 4))
    out["consolidated_bytes"] = round(valid_rows * (4 * dim + 8 + idb))
    out["bigquery_bytes"] = round(valid_rows * (8 * dim + idb + 2))
    out["vector_search_scan_bytes"] = round(valid_rows * 8 * dim)
    out["made_at"] = round(time.time(), 3)
    # Kept beside the journal so `tweet-embed report` can put the estimate beside what the run did.
    storage.write_bytes(estimate_path(dirs.progress), orjson.dumps(out, option=orjson.OPT_INDENT_2))
    return out


def estimate_path(progress_dir: str) -> str:
    return (
        storage.join(progress_dir, ESTIMATE_NAME)
        if storage.is_uri(progress_dir)
        else os.path.join(progress_dir, ESTIMATE_NAME)
    )


def read_estimate(progress_dir: str) -> dict[str, Any] | None:
    data = storage.read_bytes(estimate_path(progress_dir))
    try:
        obj = orjson.loads(data) if data else None
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def _size(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def format_table(r: dict[str, Any]) -> str:
    """The report as aligned ``name  value`` lines for a terminal."""
    from tweet_embed.progress import fmt_eta

    rows: list[tuple[str, str]] = [
        ("inputs", ", ".join(r["inputs"])),
        ("lines", f"{r['lines']:,}"),
        ("chunks", f"{r['chunks']:,} ({r['chunks_done']:,} already done)"),
        (
            "sample",
            f"{r['sample']['lines']:,} lines from {r['sample']['chunks']} chunks spread over the input",
        ),
        ("valid_rows", f"{'' if r.get('distinct_method') == 'exact' else '~'}{r['valid_rows']:,}"),
        ("rejects", ", ".join(f"{k}: ~{v:,}" for k, v in r["rejects"].items()) or "none in the sample"),
    ]
    if r.get("skipped"):
        rows.append(("skipped", ", ".join(f"{k}: ~{v:,}" for k, v in r["skipped"].items())))
    if r.get("distinct_method") == "exact":
        reused = f"; {r['reused_texts']:,} of them in --reuse outputs" if r.get("reused_texts") else ""
        distinct = f"{r['distinct_texts']:,} ({r['repeat_share'] * 100:.1f}% repeats, whole input{reused})"
    else:
        distinct = f"~{r['distinct_texts']:,} ({r['repeat_share'] * 100:.1f}% repeats within the sample)"
    rows.append(("distinct_texts", distinct))
    rows.append(("model", f"{r.get('model')} ({r.get('dim')} dimensions)"))
    t = r.get("tokens")
    if t:
        trunc = "?" if t["truncated_share"] is None else f"{t['truncated_share'] * 100:.2f}%"
        rows.append(
            (
                "tokens",
                f"p50 {t['p50']}, p95 {t['p95']}, max {t['max']}; over {t['max_input_length']}: {trunc}",
            )
        )
    else:
        rows.append(("tokens", "unknown (no TEI /tokenize, no local tokenizer on this backend)"))
    cal = r.get("calibration")
    if cal:
        per = ", ".join(f"{h}: {v:,.0f}" for h, v in cal["per_endpoint"].items())
        rows.append(
            (
                "measured",
                f"{cal['docs_per_s']:,.0f} docs/s over {cal['seconds']:.0f} s" + (f" ({per})" if per else ""),
            )
        )
        est = r.get("estimated_seconds")
        rows.append(
            (
                "estimated_time",
                f"{fmt_eta(est)} ({est:,.0f} s) for ~{r['texts_to_send']:,} texts" if est else "?",
            )
        )
    else:
        rows.append(("estimated_time", "not measured (--calibrate 0)"))
    rows += [
        ("shard_bytes", _size(r["shard_bytes"])),
        ("consolidated_bytes", _size(r["consolidated_bytes"])),
        (
            "bigquery_bytes",
            _size(r["bigquery_bytes"]) + " (ARRAY<FLOAT64>: 8 bytes × dimensions × rows, plus ids)",
        ),
        (
            "vector_search",
            f"a VECTOR_SEARCH without a vector index scans the embedding column: ~{_size(r['vector_search_scan_bytes'])}"
            " per query",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
