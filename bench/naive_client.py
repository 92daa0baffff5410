"""The reference baseline: a TEI client written the way most people first write one.

aiohttp, ``await resp.json()`` (the standard ``json`` module), batches of 32, 8 requests in flight
(``asyncio.gather`` of 8 batches at a time), the vectors kept as Python lists, and one ``pyarrow`` write per
10,000 rows. Kept here so ``client_ceiling.py`` can show what ``tweet-embed embed`` gains over it; not part
of the package.

    python bench/naive_client.py --input tweets.jsonl --url http://127.0.0.1:8080/embed --out /tmp/naive
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import aiohttp
import pyarrow as pa
import pyarrow.parquet as pq

BATCH = 32
IN_FLIGHT = 8
ROWS_PER_FILE = 10_000


async def run(input_path: str, url: str, out_dir: str) -> int:
    os.makedirs(out_dir, exist_ok=True)
    ids: list[str] = []
    vectors: list[list[float]] = []
    part = 0
    total = 0

    def flush() -> None:
        nonlocal part, ids, vectors
        if ids:
            table = pa.table({"id": ids, "embedding": vectors})
            pq.write_table(table, os.path.join(out_dir, f"part-{part:05d}.parquet"))
            part += 1
            ids, vectors = [], []

    async with aiohttp.ClientSession() as session:

        async def embed(texts: list[str]) -> list[list[float]]:
            async with session.post(url, json={"inputs": texts, "truncate": True}) as resp:
                resp.raise_for_status()
                return await resp.json()

        async def send(batches: list[tuple[list[str], list[str]]]) -> None:
            nonlocal total
            results = await asyncio.gather(*(embed(texts) for _, texts in batches))
            for (batch_ids, _), vecs in zip(batches, results, strict=True):
                ids.extend(batch_ids)
                vectors.extend(vecs)
                total += len(batch_ids)
            if len(ids) >= ROWS_PER_FILE:
                flush()

        pending: list[tuple[list[str], list[str]]] = []
        batch_ids: list[str] = []
        batch_texts: list[str] = []
        with open(input_path, encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                batch_ids.append(str(rec["_id"]))
                batch_texts.append(rec["text"])
                if len(batch_texts) == BATCH:
                    pending.append((batch_ids, batch_texts))
                    batch_ids, batch_texts = [], []
                    if len(pending) == IN_FLIGHT:
                        await send(pending)
                        pending = []
        if batch_texts:
            pending.append((batch_ids, batch_texts))
        if pending:
            await send(pending)
        flush()
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True)
    p.add_argument("--url", required=True, help="TEI /embed URL")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    t0 = time.perf_counter()
    n = asyncio.run(run(a.input, a.url, a.out))
    dt = time.perf_counter() - t0
    print(json.dumps({"rows": n, "seconds": round(dt, 3), "docs_per_s": round(n / dt, 1)}))


if __name__ == "__main__":
    main()
