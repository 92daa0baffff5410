"""``--prompt-name`` / ``--dimensions`` end to end through the real CLI against the real test server: recorded in
the shards and the manifest, a resume with other values refused, and consolidate, verify and search working at
the chosen width with the query-side prompt."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq

from tweet_embed.testing.server import TEIServer
from tweet_embed.testing.synth import synth_tweets, write_jsonl

from conftest import run_cli

PROMPTS = {"query": "query: ", "document": "passage: "}


def test_prompt_and_dimensions_recorded_refused_on_change_and_honoured_downstream(tmp_path) -> None:
    data = str(tmp_path / "tweets.jsonl")
    write_jsonl(data, 300, seed=3)
    work = str(tmp_path / "w")
    texts = dict(synth_tweets(300, seed=3))
    with TEIServer(dim=32, prompts=PROMPTS, max_client_batch_size=64) as srv:
        base = ["--tei-urls", srv.url, "--work-dir", work, "--chunk-size", "100"]
        # one chunk of three, so the run is unfinished and a resume must load the backend and check
        r = run_cli(
            "embed", data, *base, "--prompt-name", "document", "--dimensions", "8", "--max-chunks", "1"
        )
        assert r.returncode == 0, r.stderr
        shards = sorted(os.listdir(os.path.join(work, "shards")))
        md = pq.read_schema(os.path.join(work, "shards", shards[0])).metadata
        assert md[b"tweet_embed.prompt_name"] == b"document" and md[b"tweet_embed.dimensions"] == b"8"
        assert md[b"tweet_embed.dim"] == b"8"
        manifest = json.loads(open(os.path.join(work, "progress", "manifest.json")).read())
        assert manifest["dim"] == 8
        assert manifest["options"]["prompt_name"] == "document" and manifest["options"]["dimensions"] == "8"
        sent = srv.counters["texts_received"]

        # a resume with another width, another prompt, or none is refused before anything is sent
        for other in (
            ["--prompt-name", "document", "--dimensions", "16"],
            ["--prompt-name", "query", "--dimensions", "8"],
            ["--dimensions", "8"],
        ):
            r = run_cli("embed", data, *base, *other)
            assert r.returncode != 0 and "other settings" in r.stderr, (other, r.stderr)
        assert srv.counters["texts_received"] - sent <= 2 * 3  # the start-up probes only
        r = run_cli("embed", data, *base, "--prompt-name", "document", "--dimensions", "8")
        assert r.returncode == 0 and "(1 of 3 already done)" in r.stdout + r.stderr, r.stderr

        r = run_cli("consolidate", "--work-dir", work)
        assert r.returncode == 0, r.stderr
        r = run_cli("verify", data, "--work-dir", work)
        assert r.returncode == 0, r.stdout + r.stderr
        # the query side: the documents' prompt as text finds a document's own vector (score 1 at 8 dims)
        target_id, target = next(iter(texts.items()))
        r = run_cli("search", target, "--work-dir", work, "--url", srv.url, "--query-prompt", "passage: ")
        assert r.returncode == 0, r.stderr
        top = r.stdout.splitlines()[1].split()
        assert target_id in top and any(s.startswith("1.000") for s in top), r.stdout
        last = srv.received[-1]
        assert last.texts == (f"passage: {target}",) and last.dimensions == 8
        r = run_cli("search", "rain", "--work-dir", work, "--url", srv.url, "--query-prompt-name", "query")
        assert r.returncode == 0, r.stderr
        assert srv.received[-1].prompt_name == "query" and srv.received[-1].dimensions == 8
