"""``search``: nearest neighbours of a query text over the consolidated Parquet (or the shards), to eyeball results.

The query is embedded with the backend and model recorded in the files' metadata (a different model's vectors
are not comparable), then DuckDB scans the vectors once with ``array_cosine_similarity`` over ``FLOAT[D]``
and keeps the top k (a heap: memory does not grow with the table). Exact, brute force: fine for a look at
hundreds of millions of rows on one machine; BigQuery ``VECTOR_SEARCH`` is the tool for serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq

from tweet_embed.consolidate.layout import duckdb_connect, list_shards, read_manifest, sql_list
from tweet_embed.parquet import META_PREFIX

log = logging.getLogger("tweet_embed.consolidate.search")

EmbedFn = Callable[[str], np.ndarray]


class SearchError(Exception):
    """Nothing to search, or the query cannot be embedded with the recorded model."""


@dataclass
class Hit:
    id: str
    score: float
    text: str | None = None


def find_vectors(out_dir: str | None, shards_dir: str | None) -> tuple[list[str], dict[str, str]]:
    """The Parquet files to search (consolidated output first, else shards) and their tweet_embed metadata."""
    files: list[str] = []
    if out_dir and os.path.isdir(out_dir):
        manifest = read_manifest(out_dir)
        if manifest is not None:
            files = [os.path.join(out_dir, f["name"]) for f in manifest["files"]]
    if not files and shards_dir:
        files = list_shards(shards_dir)
    if not files:
        raise SearchError(
            f"no vectors found: neither {out_dir}/_manifest.json nor {shards_dir}/part-*.parquet "
            "(run `tweet-embed embed` and `tweet-embed consolidate` first)"
        )
    md = pq.read_schema(files[0]).metadata or {}
    meta = {
        k.decode()[len(META_PREFIX) :]: v.decode()
        for k, v in md.items()
        if k.decode().startswith(META_PREFIX)
    }
    if "dim" not in meta:
        raise SearchError(f"{files[0]} has no tweet_embed.dim metadata")
    return files, meta


def backend_embed_fn(
    meta: dict[str, str],
    urls: Sequence[str] | None = None,
    device: str | None = None,
    api_key: str | None = None,
    query_prompt: str | None = None,
    query_prompt_name: str | None = None,
) -> EmbedFn:
    """Embed with the backend and model named in ``meta`` (in-process model, or the given server URLs), at the
    recorded ``dimensions``, with the query-side prompt (E5's ``query: ``, a model's ``query`` prompt)."""
    from tweet_embed.backends import VectorOptions, make_backend

    dims = meta.get("dimensions")
    options = VectorOptions(query_prompt, query_prompt_name, int(dims) if dims else None)
    if meta.get("prompt") or meta.get("prompt_name"):
        if query_prompt is None and query_prompt_name is None:
            recorded = meta.get("prompt_name") or repr(meta.get("prompt"))
            log.warning(
                "the documents were embedded with prompt %s; give the query's with --query-prompt or "
                "--query-prompt-name (e.g. 'query: ' for E5)",
                recorded,
            )
    kind = meta.get("backend", "local")
    normalize = meta.get("normalize", "true") == "true"
    if kind != "local" and not urls:
        raise SearchError(
            f"the vectors were made by a {kind} server (model {meta.get('model')}); pass --url with "
            "a server that serves the same model"
        )
    if kind == "openai":
        backend = make_backend(
            None, meta.get("model"), normalize, openai_urls=urls, api_key=api_key, options=options
        )
    elif kind == "local":
        backend = make_backend(None, meta.get("model"), normalize, device=device, options=options)
    else:
        backend = make_backend(urls, None, normalize, api_key=api_key, options=options)

    def embed(text: str) -> np.ndarray:
        async def run() -> np.ndarray:
            info = await backend.start()
            try:
                if info.dim != int(meta["dim"]):
                    raise SearchError(
                        f"the backend makes {info.dim}-d vectors but the files hold {meta['dim']}-d "
                        f"vectors of {meta.get('model')}"
                    )
                if meta.get("model") and info.model != meta["model"]:
                    log.warning(
                        "the backend reports model %s, the vectors were made by %s", info.model, meta["model"]
                    )
                vecs = await backend.embed([text])
            finally:
                await backend.close()
            return np.asarray(vecs[0], dtype=np.float32)

        return asyncio.run(run())

    return embed


def _texts(inputs: Sequence[str], ids: set[str], id_field: str, text_field: str) -> dict[str, str]:
    from tweet_embed.consolidate.merge import iter_input_records

    found: dict[str, str] = {}
    for rid, text in iter_input_records(inputs, id_field, text_field):
        if rid in ids and rid not in found:
            found[rid] = text
            if len(found) == len(ids):
                return found
    return found


def search(
    query: str,
    *,
    out_dir: str | None = None,
    shards_dir: str | None = None,
    k: int = 10,
    inputs: Sequence[str] | None = None,
    embed_fn: EmbedFn | None = None,
    urls: Sequence[str] | None = None,
    device: str | None = None,
    id_field: str = "_id",
    text_field: str = "text",
    memory_limit: str = "1GB",
    query_prompt: str | None = None,
    query_prompt_name: str | None = None,
) -> list[Hit]:
    """Top-``k`` ids by cosine similarity to ``query`` (ties broken by id, so results are stable)."""
    files, meta = find_vectors(out_dir, shards_dir)
    dim = int(meta["dim"])
    fn = embed_fn or backend_embed_fn(
        meta, urls, device, query_prompt=query_prompt, query_prompt_name=query_prompt_name
    )
    q = np.asarray(fn(query), dtype=np.float32).reshape(-1)
    if q.shape[0] != dim:
        raise SearchError(f"query vector has {q.shape[0]} dimensions, the files hold {dim}")
    con = duckdb_connect(None, memory_limit)
    try:
        has_text = "text" in pq.read_schema(files[0]).names
        cols = "id, text" if has_text else "id, NULL AS text"
        rows = con.execute(
            f"SELECT {cols}, array_cosine_similarity(embedding::FLOAT[{dim}], $q::FLOAT[{dim}]) AS score "
            f"FROM read_parquet({sql_list(files)}, hive_partitioning=false) "
            f"ORDER BY score DESC, id LIMIT {int(k)}",
            {"q": q.tolist()},
        ).fetchall()
    finally:
        con.close()
    hits = [Hit(r[0], float(r[2]), r[1]) for r in rows]
    if inputs and hits and not has_text:
        texts = _texts(inputs, {h.id for h in hits}, id_field, text_field)
        for h in hits:
            h.text = texts.get(h.id)
    return hits


def format_hits(query: str, hits: Sequence[Hit]) -> str:
    lines = [f"query: {query!r}"]
    for i, h in enumerate(hits, 1):
        line = f"{i:>3}. {h.score:.4f}  {h.id}"
        if h.text is not None:
            t = " ".join(h.text.split())
            line += "  " + (t if len(t) <= 140 else t[:137] + "...")
        lines.append(line)
    return "\n".join(lines)
