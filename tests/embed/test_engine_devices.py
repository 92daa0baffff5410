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

from tweet_embed.backends import BackendSpec
from tweet_embed.backends.base import BackendError
from tweet_embed.embed.chunks import WorkDirs
from tweet_embed.embed.engines.devices import (
    WorkerDied,
    default_workers_per_device,
    expand_devices,
    plan_workers,
    worker_labels,
)
from tweet_embed.embed.runner import EmbedOptions, run_embed
from tweet_embed.testing.server import TEIServer, expected_vectors
from tweet_embed.testing.synth import synth_tweets, write_jsonl

from conftest import read_shards

DIM = 16


def read_shards_of(shards: str):  # type: ignore[no-untyped-def]
    ids, vecs, _ = read_shards(shards, DIM)
    return ids, vecs


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
    ids, vecs = read_shards_of(str(tmp_path / "w" / "shards"))
    assert ids == [r[0] for r in records]
    np.testing.assert_array_equal(vecs, expected_vectors([r[1] for r in records], DIM))
    expected = Counter({t: 1 for _, t in records})  # each distinct text once (dedupe)
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
    ids, _ = read_shards_of(str(tmp_path / "w" / "shards"))
    assert ids == [r[0] for r in records]


def test_each_worker_pipelines_its_chunks(tmp_path, corpus) -> None:
    """A worker keeps two chunks embedding at once (one request each here), so with two workers up to
    four requests are open; serial workers would never have more than two."""
    path, records = corpus
    opts = options(tmp_path, path)
    opts.chunk_lines = 20
    with TEIServer(dim=DIM, latency=0.2) as srv:
        s = run_embed(opts, BackendSpec(urls=(srv.embed_url,), batch_size=32))
        most = srv.counters["max_in_flight_requests"]
    assert s.rows == 1500 and s.chunks_done_now == 75
    assert most > 2, most
    ids, vecs = read_shards_of(str(tmp_path / "w" / "shards"))
    assert ids == [r[0] for r in records]
    np.testing.assert_array_equal(vecs, expected_vectors([r[1] for r in records], DIM))


def test_several_workers_on_one_device(tmp_path, corpus) -> None:
    """``--workers-per-device``: the same device listed twice gives two workers, told apart in messages."""
    path, records = corpus
    opts = options(tmp_path, path)
    opts.devices = expand_devices(["w0"], 2)
    with TEIServer(dim=DIM, api_key="right") as srv:
        with pytest.raises(WorkerDied, match=r"worker for w0#[01] failed: .*authentication failed"):
            run_embed(opts, BackendSpec(urls=(srv.embed_url,), api_key="wrong"))
        s = run_embed(opts, BackendSpec(urls=(srv.embed_url,), api_key="right"))
    assert s.rows == 1500
    ids, _ = read_shards_of(str(tmp_path / "w" / "shards"))
    assert ids == [r[0] for r in records]


def test_worker_labels_and_expansion() -> None:
    assert worker_labels(["cuda:0", "cuda:1"]) == ["cuda:0", "cuda:1"]
    assert worker_labels(["cuda:0", "cuda:0", "cuda:1"]) == ["cuda:0#0", "cuda:0#1", "cuda:1"]
    assert expand_devices(["cuda:0", "cuda:1"], 2) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    with pytest.raises(BackendError, match="at least 1"):
        expand_devices(["cuda:0"], 0)


def test_default_workers_per_device() -> None:
    # a small model on a GPU with cores to spare: two; otherwise one
    assert default_workers_per_device(lambda: ["cuda:0"], 384, cores=16) == 2
    assert default_workers_per_device(lambda: ["cuda:0", "cuda:1"], 384, cores=16) == 2
    assert default_workers_per_device(lambda: ["cuda:0", "cuda:1"], 384, cores=12) == 1
    assert default_workers_per_device(lambda: ["cuda:0"], 384, cores=4) == 1
    assert default_workers_per_device(lambda: ["cuda:0"], 1024, cores=64) == 1
    assert default_workers_per_device(lambda: ["cuda:0"], None, cores=64) == 1
    assert default_workers_per_device(lambda: ["cpu"], 384, cores=64) == 1


def test_plan_workers(monkeypatch, tmp_path) -> None:
    import tweet_embed.backends.local as local

    def no_gpu_lookup(spec=None):
        raise AssertionError("looked for GPUs (imports torch) where the cheap tests already decide")

    # the default on a small machine, or for a wide model: this process, no GPU lookup
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))
    monkeypatch.setattr(local, "resolve_devices", no_gpu_lookup)
    assert plan_workers(None, None, None, None) is None
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert plan_workers(None, None, "random:bert-large", None) is None
    (tmp_path / "config.json").write_text('{"hidden_size": 768}')
    assert plan_workers(None, None, str(tmp_path), None) is None
    monkeypatch.undo()
    # explicit choices
    assert plan_workers("cpu", None, None, None) == ["cpu"]
    assert plan_workers("cpu", None, None, 2) == ["cpu", "cpu"]
    assert plan_workers(None, "cpu", None, 3) == ["cpu", "cpu", "cpu"]
    assert plan_workers("0,1", None, None, 2) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    # 16 cores and MiniLM: two per GPU when there is one, else this process
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(local, "resolve_devices", lambda spec=None: ["cuda:0"] if not spec else [spec])
    assert plan_workers(None, None, None, None) == ["cuda:0", "cuda:0"]
    monkeypatch.setattr(local, "resolve_devices", lambda spec=None: ["cpu"])
    assert plan_workers(None, None, None, None) is None


def test_model_width() -> None:
    from tweet_embed.backends.local import model_width

    assert model_width(None) == 384
    assert model_width("sentence-transformers/all-MiniLM-L6-v2") == 384
    assert model_width("random:bert-large") == 1024
    assert model_width("random:L2-H128") == 128
    assert model_width("random:nonsense") is None
    assert model_width("BAAI/bge-m3") is None


def test_two_workers_read_arrays_and_csv_with_filters(tmp_path) -> None:
    """Other formats through the device workers: the parent ships the bytes of a .json.gz array and a CSV, each
    worker parses its chunks with the run's rules; every kept record once, the skips counted."""
    import csv
    import gzip
    import json

    from tweet_embed.input.rules import Rules

    records = list(synth_tweets(600, seed=4))
    with gzip.open(tmp_path / "a.json.gz", "wt") as fh:
        json.dump(
            [
                {"_id": i, "text": t, "lang": "en" if k % 3 else "fr"}
                for k, (i, t) in enumerate(records[:300])
            ],
            fh,
        )
    with open(tmp_path / "b.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["_id", "text", "lang"])
        w.writerows(
            (i, t + "\nwith a newline", "en" if k % 3 else "fr") for k, (i, t) in enumerate(records[300:])
        )
    kept = [(i, t) for k, (i, t) in enumerate(records[:300]) if k % 3]
    kept += [(i, t + "\nwith a newline") for k, (i, t) in enumerate(records[300:]) if k % 3]
    opts = options(tmp_path, str(tmp_path / "a.json.gz"))
    opts.inputs.append(str(tmp_path / "b.csv"))
    opts.rules = Rules(langs=("en",))
    with TEIServer(dim=DIM) as srv:
        s = run_embed(opts, BackendSpec(urls=(srv.embed_url,)))
    assert s.rows == len(kept) and s.skipped == {"lang": 200}
    ids, vecs = read_shards_of(str(tmp_path / "w" / "shards"))
    assert ids == [r[0] for r in kept]
    np.testing.assert_array_equal(vecs, expected_vectors([r[1] for r in kept], DIM))


def test_prompt_and_dimensions_in_the_manifest_a_resume_with_others_is_refused(tmp_path, corpus) -> None:
    """Device workers report the vector options their backend applies; the driver's manifest holds them, so a
    resume with another prompt or dimension count cannot mix two kinds of vectors."""
    import dataclasses
    import json

    from tweet_embed.embed.chunks import PlanError

    path, records = corpus
    opts = dataclasses.replace(options(tmp_path, path), max_chunks=2)
    with TEIServer(dim=DIM) as srv:
        spec = BackendSpec(urls=(srv.embed_url,), prompt="passage: ", dimensions=8)
        assert run_embed(opts, spec).rows == 200
        manifest = json.loads((tmp_path / "w" / "progress" / "manifest.json").read_text())
        assert manifest["options"]["prompt"] == "passage: " and manifest["options"]["dimensions"] == "8"
        for other in (dataclasses.replace(spec, dimensions=4), dataclasses.replace(spec, prompt="query: ")):
            with pytest.raises(PlanError, match="manifest|another|differ"):
                run_embed(options(tmp_path, path), other)
        s = run_embed(options(tmp_path, path), spec)  # the same options resume
    assert s.rows == 1300
    ids, vecs, _ = read_shards(str(tmp_path / "w" / "shards"), 8)
    assert ids == [r[0] for r in records]
