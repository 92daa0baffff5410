"""search: the query embedded by the recorded model finds the expected neighbour in a tiny corpus."""

from __future__ import annotations

import asyncio
import json
import os

import numpy as np
import pytest
from test_consolidate import META, write_shards

from tweet_embed.consolidate.merge import consolidate
from tweet_embed.consolidate.search import SearchError, format_hits, search
from tweet_embed.parquet import make_table, write_table

from conftest import run_cli

CORPUS = {
    "t1": "Watching the football match tonight with friends, what a goal!",
    "t2": "My sourdough bread finally rose properly this morning",
    "t3": "Heavy rain and thunderstorms expected across the city tomorrow",
    "t4": "The new phone's battery life is terrible, dead by noon",
    "t5": "Just adopted a kitten, she keeps chasing my shoelaces",
    "t6": "Stock markets fell sharply after the interest rate announcement",
    "t7": "Finished my first marathon in under four hours!",
    "t8": "This python library makes parquet files so easy to write",
}


@pytest.fixture(scope="module")
def minilm_corpus(tmp_path_factory):
    """Shards of the corpus embedded by the in-process all-MiniLM-L6-v2, consolidated."""
    from tweet_embed.backends import make_backend

    async def embed():  # type: ignore[no-untyped-def]
        b = make_backend(None, None, True, device="cpu")
        info = await b.start()
        v = await b.embed(list(CORPUS.values()))
        await b.close()
        return info, v

    info, vectors = asyncio.run(embed())
    d = tmp_path_factory.mktemp("search")
    os.makedirs(d / "shards")
    ids = list(CORPUS)
    md = {**info.metadata(), "version": "0.1.0"}
    write_table(make_table(ids[:5], vectors[:5], md), str(d / "shards" / "part-0000-0000000.parquet"))
    write_table(make_table(ids[5:], vectors[5:], md), str(d / "shards" / "part-0000-0000001.parquet"))
    with open(d / "tweets.jsonl", "w") as fh:
        for k, t in CORPUS.items():
            fh.write(json.dumps({"_id": k, "text": t}) + "\n")
    consolidate(str(d / "shards"), str(d / "consolidated"))
    return d


def test_exact_text_comes_first_with_the_recorded_model(minilm_corpus):
    d = minilm_corpus
    hits = search(
        CORPUS["t3"], out_dir=str(d / "consolidated"), k=3, inputs=[str(d / "tweets.jsonl")], device="cpu"
    )
    assert hits[0].id == "t3" and hits[0].score > 0.99
    assert hits[0].text == CORPUS["t3"]
    assert len(hits) == 3 and hits[0].score >= hits[1].score >= hits[2].score
    hits = search("who won the soccer game?", out_dir=str(d / "consolidated"), k=1, device="cpu")
    assert hits[0].id == "t1"


def test_cli_search_prints_id_score_and_text(minilm_corpus):
    d = minilm_corpus
    r = run_cli(
        "search",
        "rain storm weather",
        "--k",
        "2",
        "--work-dir",
        str(d),
        "--input",
        str(d / "tweets.jsonl"),
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1].split()[2] == "t3" and CORPUS["t3"] in lines[1]
    assert len(lines) == 3


def test_search_over_shards_with_injected_embedder(tmp_path):
    shards = str(tmp_path / "shards")
    vectors = write_shards(shards, [["a", "b", "c"], ["d", "e"]])
    target = vectors[1][0]  # "d"
    hits = search("anything", shards_dir=shards, k=5, embed_fn=lambda _: target)
    assert [h.id for h in hits][0] == "d" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 5
    assert "d" in format_hits("anything", hits)
    with pytest.raises(SearchError, match="dimensions"):
        search("x", shards_dir=shards, embed_fn=lambda _: np.ones(3, np.float32))


def test_nothing_to_search_and_server_models_need_a_url(tmp_path):
    with pytest.raises(SearchError, match="no vectors found"):
        search("x", out_dir=str(tmp_path / "none"), shards_dir=str(tmp_path / "none"))
    shards = str(tmp_path / "shards")
    write_shards(shards, [["a"]], meta=dict(META, backend="tei", model="BAAI/bge-m3"))
    with pytest.raises(SearchError, match="--url"):
        search("x", shards_dir=shards)
