"""One worker process per device: exactly once, errors travel back, a dead worker never hangs the run.

Without GPUs here, the device workers run HTTP backends against the real local TEI-compatible server (the
engine does not care what a worker's backend computes with); the device names are then only labels.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import Counter

import numpy as np
import pytest

from test_cli_embed import read_output
from tweet_embed.backends import BackendSpec
from tweet_embed.chunks import WorkDirs
from tweet_embed.engines.devices import WorkerDied
from tweet_embed.runner import EmbedOptions, run_embed
from tweet_embed.synth import synth_tweets, write_jsonl
from tweet_embed.testserver import TEIServer, expected_vectors

DIM = 16


def options(tmp_path, path: str) -> EmbedOptions:
    return EmbedOptions(
        inputs=[path],
        dirs=WorkDirs.from_options(str(tmp_path / "w"), None, None, None),
        chunk_lines=100,
        log_interval=60,
        devices=["w0", "w1"],
    )


@pytest.fixture
def corpus(tmp_path):
    path = str(tmp_path / "in.jsonl")
    write_jsonl(path, 1500, seed=9)
    return path, list(synth_tweets(1500, seed=9))


def test_two_workers_every_id_once(tmp_path, corpus) -> None:
    path, records = corpus
    with TEIServer(dim=DIM) as srv:
        s = run_embed(options(tmp_path, path), BackendSpec(urls=(srv.embed_url,)))
        sent = srv.embedded
    assert s.rows == 1500 and s.chunks_done_now == 15
    ids, vecs = read_output(str(tmp_path / "w" / "shards"))
    assert ids == [r[0] for r in records]
    np.testing.assert_array_equal(vecs, expected_vectors([r[1] for r in records], DIM))
    expected = Counter(t for _, t in records)
    expected["dimension probe"] += 2  # one probe per worker
    assert sent == expected


def test_worker_error_travels_back(tmp_path, corpus) -> None:
    path, _ = corpus
    with TEIServer(dim=DIM, api_key="right") as srv:
        t0 = time.monotonic()
        with pytest.raises(WorkerDied, match="authentication failed"):
            run_embed(options(tmp_path, path), BackendSpec(urls=(srv.embed_url,), api_key="wrong"))
    assert time.monotonic() - t0 < 60


def test_killed_worker_is_noticed_and_resume_completes(tmp_path, corpus) -> None:
    path, records = corpus
    with TEIServer(dim=DIM, latency=0.05) as srv:

        def kill_one() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                kids = [p for p in mp.active_children() if p.name.startswith("tweet-embed-")]
                if kids and os.path.exists(tmp_path / "w" / "progress" / "part-0000-0000001.done"):
                    os.kill(kids[0].pid, signal.SIGKILL)
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_one)
        killer.start()
        with pytest.raises(WorkerDied, match="exited with code -9"):
            run_embed(options(tmp_path, path), BackendSpec(urls=(srv.embed_url,)))
        killer.join()
        s = run_embed(options(tmp_path, path), BackendSpec(urls=(srv.embed_url,)))
    assert s.chunks_skipped >= 2 and s.chunks_skipped + s.chunks_done_now == 15
    ids, _ = read_output(str(tmp_path / "w" / "shards"))
    assert ids == [r[0] for r in records]
