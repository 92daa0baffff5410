"""The Ray engine on a local Ray instance (2 CPUs): exactly once, retries, resume, same output as local, S3.

One ``ray.init`` is shared by the in-process tests (start-up is slow); the command-line tests start their own
local Ray in the subprocess, as a user's run does.
"""

from __future__ import annotations

import glob
import gzip
import os
import signal
import subprocess
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pyarrow.parquet as pq
import pytest

from tweet_embed import storage
from tweet_embed.backends import BackendSpec
from tweet_embed.backends.base import Backend, BackendError, BackendInfo
from tweet_embed.embed.chunks import WorkDirs, done_markers
from tweet_embed.embed.engines.ray import RayOptions
from tweet_embed.embed.runner import EmbedOptions, run_embed
from tweet_embed.embed.telemetry import read_journal
from tweet_embed.testing.server import TEIServer, expected_vectors
from tweet_embed.testing.synth import synth_tweets

from conftest import CLI, ROOT, assert_resumed, kill_after_chunks, moto_s3, read_shards, sample_slice

ray = pytest.importorskip("ray")
DIM = 16
# Ray workers import this module and conftest (tests/): both folders go on their PYTHONPATH.
TESTS = os.pathsep.join(
    [os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
)
PROBE = "dimension probe"  # TEI backends send it once per started client


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def s3():
    with moto_s3("bucket") as fs:
        yield fs


@pytest.fixture(scope="module")
def ray_local(s3):
    """One local Ray instance for the module; workers inherit the S3 settings and can import this module."""
    os.environ["PYTHONPATH"] = os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # "local": a new instance even while a multi-node test cluster runs on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture
def server():
    with TEIServer(dim=DIM, max_client_batch_size=16) as srv:
        yield srv


def write_inputs(tmp_path) -> tuple[list[str], list[tuple[str, str]]]:
    """A plain JSONL file with a few bad lines and a gzipped one: both ways a chunk gets its bytes."""
    a = list(synth_tweets(1400, seed=3))
    b = [(f"gz{i}", t) for i, t in synth_tweets(500, seed=4)]
    lines = [orjson.dumps({"_id": i, "text": t}) for i, t in a]
    lines.insert(17, b'{"_id": "bad", "text": null}')
    lines.insert(640, b"not json")
    pa_ = tmp_path / "a.jsonl"
    pa_.write_bytes(b"\n".join(lines) + b"\n")
    pb = tmp_path / "b.jsonl.gz"
    pb.write_bytes(gzip.compress(b"".join(orjson.dumps({"_id": i, "text": t}) + b"\n" for i, t in b)))
    return [str(pa_), str(pb)], a + b


def upload(s3: Any, paths: list[str]) -> list[str]:
    """Copy local input files to ``s3://bucket/input/``; returns their URIs."""
    uris = []
    for p in paths:
        key = f"bucket/input/{os.path.basename(p)}"
        with s3.open_output_stream(key, compression=None) as out:
            out.write(open(p, "rb").read())
        uris.append(f"s3://{key}")
    return uris


def options(
    inputs: Sequence[str], work: str, ray_opts: RayOptions | None, stage: str | None = None, **kw
) -> EmbedOptions:
    return EmbedOptions(
        inputs=list(inputs),
        dirs=WorkDirs.from_options(work, stage, None, None),
        chunk_lines=kw.pop("chunk_lines", 100),
        log_interval=60,
        ray=ray_opts,
        **kw,
    )


def read_output(shards: str) -> tuple[list[str], np.ndarray, list[str]]:
    """ids, vectors and shard names, in shard-name order (local dir or s3:// URI)."""
    return read_shards(shards, DIM)


def assert_exact(shards: str, records: list[tuple[str, str]]) -> None:
    """Every valid record exactly once, in input order, with its own text's vector."""
    ids, vecs, _ = read_output(shards)
    assert ids == [r[0] for r in records]
    np.testing.assert_array_equal(vecs, expected_vectors([r[1] for r in records], DIM))


def sent(server: TEIServer) -> Counter[str]:
    c = Counter(server.embedded)
    del c[PROBE]
    return c


# ------------------------------------------------------------------------ test backends (built in workers)


class WrappedBackend(Backend):
    """A test backend around a real one, ``inner``, which it starts and closes; subclasses change ``embed``."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner

    async def start(self) -> BackendInfo:
        return await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()


class KillOnceBackend(WrappedBackend):
    """Kills its own Ray worker process (like an OOM kill) the first time it sees ``victim``."""

    def __init__(self, inner: Backend, flag: str, victim: str) -> None:
        super().__init__(inner)
        self.flag, self.victim = flag, victim

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.victim in texts and not os.path.exists(self.flag):
            with open(self.flag, "w") as fh:
                fh.write(str(os.getpid()))
            os._exit(1)
        return await self.inner.embed(texts)


@dataclass(frozen=True)
class KillOnce:
    spec: BackendSpec
    flag: str
    victim: str

    def __call__(self) -> Backend:
        return KillOnceBackend(self.spec.build(), self.flag, self.victim)


class RefusingBackend(Backend):
    async def start(self) -> BackendInfo:
        return BackendInfo(kind="fake", model="fake/refusing", dim=4)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        raise BackendError("all servers failed for 600s (the fake)")


def refusing() -> Backend:
    return RefusingBackend()


@dataclass(frozen=True)
class FailOnce:
    """An I/O error (an object-store hiccup) the first time any worker embeds; a flag file makes it once."""

    spec: BackendSpec
    flag: str

    def __call__(self) -> Backend:
        return FailOnceBackend(self.spec.build(), self.flag)


class FailOnceBackend(WrappedBackend):
    def __init__(self, inner: Backend, flag: str) -> None:
        super().__init__(inner)
        self.flag = flag

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        try:
            fd = os.open(self.flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return await self.inner.embed(texts)
        os.close(fd)
        raise OSError("connection reset by the object store (the fake)")


# ------------------------------------------------------------------------------------------------- tests


def test_clean_run_is_exact_and_identical_to_local_engine(tmp_path, ray_local, server, monkeypatch) -> None:
    inputs, records = write_inputs(tmp_path)
    spec = BackendSpec(urls=(server.embed_url,))
    s_local = run_embed(options(inputs, str(tmp_path / "local"), None), spec)
    server.reset_counters()
    from test_metrics import scraped

    with scraped(monkeypatch) as scrapes:
        s_ray = run_embed(options(inputs, str(tmp_path / "ray"), RayOptions(), metrics_port=0), spec)
    # per endpoint, summed by the driver from the tasks' reports: what the server itself counted, less the
    # driver's own dimension probe (its client is no task's)
    [end] = scrapes.final
    host = server.url.split("//")[1]
    lab = (("endpoint", host),)
    assert end[("tweet_embed_endpoint_inputs_total", lab)] == sum(server.embedded.values()) - 1
    assert end[("tweet_embed_endpoint_requests_total", lab)] == server.counters["ok"] - 1
    assert end[("tweet_embed_endpoint_latency_seconds_count", lab)] == server.counters["ok"] - 1
    last = [e for e in read_journal(str(tmp_path / "ray" / "progress")) if e["event"] == "interval"][-1]
    assert last["endpoints"][host]["inputs"] == sum(server.embedded.values()) - 1

    assert s_ray.rows == s_local.rows == len(records)
    assert s_ray.rejected == s_local.rejected == 2
    assert s_ray.chunks_done_now == s_ray.chunks_total == s_local.chunks_total == 20
    assert sent(server) == Counter({t: 1 for _, t in records})  # each distinct text once by the Ray run
    assert_exact(str(tmp_path / "ray" / "shards"), records)
    # identical output: same shard names, same bytes (the markers' sha256), same rejects file
    lo, ro = read_output(str(tmp_path / "local" / "shards")), read_output(str(tmp_path / "ray" / "shards"))
    assert lo[0] == ro[0] and lo[2] == ro[2]
    np.testing.assert_array_equal(lo[1], ro[1])
    lm = done_markers(WorkDirs.from_options(str(tmp_path / "local"), None, None, None))
    rm = done_markers(WorkDirs.from_options(str(tmp_path / "ray"), None, None, None))
    assert {k: m.sha256 for k, m in lm.items()} == {k: m.sha256 for k, m in rm.items()}
    assert (tmp_path / "local/progress/rejects.jsonl").read_bytes() == (
        tmp_path / "ray/progress/rejects.jsonl"
    ).read_bytes()
    assert (tmp_path / "local/progress/manifest.json").read_bytes() == (
        tmp_path / "ray/progress/manifest.json"
    ).read_bytes()
    # a second run finds everything done and starts no Ray work
    again = run_embed(options(inputs, str(tmp_path / "ray"), RayOptions()), spec)
    assert again.chunks_done_now == 0 and again.chunks_skipped == 20


def test_arrays_and_csv_with_filters_on_ray(tmp_path, ray_local, server) -> None:
    """Other input formats as Ray tasks: a plain JSON array read by byte range in the task, a .csv.gz shipped
    with its bytes by the driver; the run's filters applied in the tasks, the skips counted."""
    import csv
    import io
    import json

    from tweet_embed.input.rules import Rules

    recs = list(synth_tweets(400, seed=6))
    (tmp_path / "a.json").write_text(
        json.dumps(
            [{"_id": i, "text": t, "lang": "en" if k % 4 else "de"} for k, (i, t) in enumerate(recs[:200])]
        )
    )
    out = io.StringIO(newline="")
    w = csv.writer(out)
    w.writerow(["_id", "text", "lang"])
    w.writerows((i, t + "\n2nd line", "en" if k % 4 else "de") for k, (i, t) in enumerate(recs[200:]))
    (tmp_path / "b.csv.gz").write_bytes(gzip.compress(out.getvalue().encode()))
    kept = [(i, t) for k, (i, t) in enumerate(recs[:200]) if k % 4]
    kept += [(i, t + "\n2nd line") for k, (i, t) in enumerate(recs[200:]) if k % 4]
    inputs = [str(tmp_path / "a.json"), str(tmp_path / "b.csv.gz")]
    opts = options(inputs, str(tmp_path / "w"), RayOptions(), rules=Rules(langs=("en",)))
    s = run_embed(opts, BackendSpec(urls=(server.embed_url,)))
    assert s.rows == len(kept) and s.skipped == {"lang": 100}
    assert_exact(str(tmp_path / "w" / "shards"), kept)


def test_dedupe_on_ray_gives_the_local_engine_bytes(tmp_path, ray_local, server) -> None:
    """Half the rows repeat texts of earlier chunks and of the other file: Ray tasks wait for and read the same
    shared vectors as the local engine, and send each distinct text once."""
    a = list(synth_tweets(900, seed=8, repeat_fraction=0.5))
    b = [(f"gz{i}", t) for i, t in a[:300]]  # the second file repeats the first's texts
    (tmp_path / "a.jsonl").write_bytes(b"".join(orjson.dumps({"_id": i, "text": t}) + b"\n" for i, t in a))
    (tmp_path / "b.jsonl.gz").write_bytes(
        gzip.compress(b"".join(orjson.dumps({"_id": i, "text": t}) + b"\n" for i, t in b))
    )
    inputs, records = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl.gz")], a + b
    spec = BackendSpec(urls=(server.embed_url,))
    run_embed(options(inputs, str(tmp_path / "local"), None), spec)
    server.reset_counters()
    s = run_embed(options(inputs, str(tmp_path / "ray"), RayOptions()), spec)
    assert s.rows == len(records) and s.embedded_texts == len({t for _, t in records}) < 0.6 * len(records)
    assert sent(server) == Counter({t: 1 for _, t in records})
    assert_exact(str(tmp_path / "ray" / "shards"), records)
    lm = done_markers(WorkDirs.from_options(str(tmp_path / "local"), None, None, None))
    rm = done_markers(WorkDirs.from_options(str(tmp_path / "ray"), None, None, None))
    assert {k: m.sha256 for k, m in lm.items()} == {k: m.sha256 for k, m in rm.items()}


def test_worker_killed_mid_chunk_is_retried_and_written_once(tmp_path, ray_local, server) -> None:
    inputs, records = write_inputs(tmp_path)
    victim = records[1234][1]  # line 1237 of a.jsonl: chunk part-0000-0000012
    flag = str(tmp_path / "killed.pid")
    factory = KillOnce(BackendSpec(urls=(server.embed_url,)), flag, victim)
    s = run_embed(options(inputs, str(tmp_path / "w"), RayOptions(max_retries=2)), factory)
    assert os.path.exists(flag), "the worker was never killed"
    assert int(open(flag).read()) != os.getpid()
    assert s.rows == len(records) and s.chunks_done_now == 20
    assert_exact(str(tmp_path / "w" / "shards"), records)
    # only the killed chunk's texts may have been sent twice
    text_of = dict(records)
    chunk_ids = (
        pq.read_table(tmp_path / "w" / "shards" / "part-0000-0000012.parquet").column("id").to_pylist()
    )
    assert text_of[chunk_ids[0]] != victim and victim in {text_of[i] for i in chunk_ids}
    twice = set(sent(server) - Counter(t for _, t in records))
    assert twice <= {text_of[i] for i in chunk_ids}
    assert not [n for n in os.listdir(tmp_path / "w" / "shards") if not n.startswith("part-")]


def test_task_error_reaches_the_driver_as_itself(tmp_path, ray_local) -> None:
    inputs, _ = write_inputs(tmp_path)
    with pytest.raises(BackendError, match="the fake"):
        run_embed(options(inputs, str(tmp_path / "w"), RayOptions(max_retries=0)), refusing)
    assert done_markers(WorkDirs.from_options(str(tmp_path / "w"), None, None, None)) == {}


def test_object_store_input_shards_and_markers(tmp_path, ray_local, s3, server) -> None:
    inputs, records = write_inputs(tmp_path)
    uris = upload(s3, inputs)
    spec = BackendSpec(urls=(server.embed_url,))
    work = "s3://bucket/runs/r1"
    stage = str(tmp_path / "stage")  # default: $TMPDIR/tweet-embed-<hash> (test_storage checks it)
    s1 = run_embed(options(uris, work, RayOptions(), stage, max_chunks=7), spec)
    assert s1.chunks_done_now == 7
    s2 = run_embed(options(uris, work, RayOptions(), stage), spec)
    assert s2.chunks_skipped == 7 and s2.chunks_done_now == 13 and s2.rejected == 2
    assert_exact(f"{work}/shards", records)
    names = storage.list_names(f"{work}/progress")
    assert len([n for n in names if n.endswith(".done")]) == 20
    assert {"plan.json", "manifest.json", "rejects.jsonl"} <= set(names)
    # nothing staged under a hidden or temporary key in the bucket
    assert all(n.startswith("part-") and n.endswith(".parquet") for n in storage.list_names(f"{work}/shards"))
    # the same output as a local run over the local copies
    run_embed(options(inputs, str(tmp_path / "local"), None), spec)
    lo, ro = read_output(str(tmp_path / "local" / "shards")), read_output(f"{work}/shards")
    assert lo[0] == ro[0] and lo[2] == ro[2]
    np.testing.assert_array_equal(lo[1], ro[1])


def test_actor_io_error_is_retried_on_an_actor(tmp_path, ray_local, server) -> None:
    """An OSError in a chunk on an actor is retried (as tasks retry it), and the output is exact."""
    inputs, records = write_inputs(tmp_path)
    flag = str(tmp_path / "failed")
    factory = FailOnce(BackendSpec(urls=(server.embed_url,)), flag)
    ropts = RayOptions(use_actors=True, actors=1, gpus_per_actor=0, cpus_per_actor=1)
    s = run_embed(options(inputs, str(tmp_path / "w"), ropts), factory)
    assert os.path.exists(flag)
    assert s.rows == len(records) and s.chunks_done_now == 20
    assert_exact(str(tmp_path / "w" / "shards"), records)


def test_in_process_model_runs_in_actors(tmp_path, ray_local, monkeypatch) -> None:
    """The local backend path (one-GPU actors) with a CPU actor: the real model, 3 chunks; the actor's
    device figures reach the driver's /metrics."""
    pytest.importorskip("torch")
    p = sample_slice(tmp_path, 120)
    spec = BackendSpec(device="cpu")
    ropts = RayOptions(actors=1, gpus_per_actor=0, cpus_per_actor=1)
    from test_metrics import scraped

    with scraped(monkeypatch) as scrapes:
        s = run_embed(options([str(p)], str(tmp_path / "ray"), ropts, chunk_lines=50, metrics_port=0), spec)
    assert s.rows == 120 and s.chunks_done_now == 3 and s.dim == 384
    [end] = scrapes.final
    texts = {lab: v for (n, lab), v in end.items() if n == "tweet_embed_device_texts_total"}
    [(lab, n)] = texts.items()
    assert n == s.embedded_texts and dict(lab)["device"].endswith("/cpu")  # host/device
    assert end[("tweet_embed_device_seconds_total", lab)] > 0
    ids, vecs, _ = read_output(str(tmp_path / "ray" / "shards"))
    local = run_embed(options([str(p)], str(tmp_path / "local"), None, chunk_lines=50), spec)
    lids, lvecs, _ = read_output(str(tmp_path / "local" / "shards"))
    assert local.rows == 120 and ids == lids
    np.testing.assert_allclose(vecs, lvecs, atol=1e-5)


# ---------------------------------------------------------------------------------- the real command line


def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _reap_ray_session(driver_pid: int) -> None:
    """Stop what Ray's reaper leaves of a SIGKILLed driver's local instance (its agents), by pid."""
    suffix = f"_{driver_pid}"
    for pid_dir in glob.glob("/proc/[0-9]*"):
        try:
            targets = {
                os.readlink(os.path.join(pid_dir, "fd", fd)) for fd in os.listdir(os.path.join(pid_dir, "fd"))
            }
        except OSError:
            continue
        if any(
            "/session_" in t and t.split("/session_", 1)[1].split("/", 1)[0].endswith(suffix) for t in targets
        ):
            try:
                os.kill(int(os.path.basename(pid_dir)), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def test_cli_driver_killed_then_rerun_resumes_exactly(tmp_path) -> None:
    path = str(tmp_path / "tweets.jsonl")
    records = list(synth_tweets(2000, seed=5))
    with open(path, "wb") as fh:
        fh.write(b"".join(orjson.dumps({"_id": i, "text": t}) + b"\n" for i, t in records))
    work = str(tmp_path / "w")
    with TEIServer(dim=DIM, latency=0.03) as srv:
        args = [*CLI, "embed", path, "--tei-urls", srv.url, "--work-dir", work, "--chunk-size", "100"]
        args += ["--engine", "ray"]
        # the resumed run may take only about a second: the speed line must still show
        args += ["--log-interval", "0.1"]
        first = subprocess.Popen(
            args, cwd=ROOT, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            done_before = kill_after_chunks(first, work, 4, timeout=180)
        finally:
            _reap_ray_session(first.pid)
        assert 4 <= done_before < 20
        for f in glob.glob(os.path.join(work, "shards", "*.parquet")):
            pq.read_metadata(f)  # every published shard is complete
        r = subprocess.run(args, cwd=ROOT, env=_cli_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_resumed(r.stderr, done_before, chunks=20, chunk_lines=100)
    assert "Inst. speed:" in r.stderr
    ids, vecs, _ = read_output(os.path.join(work, "shards"))
    assert ids == [i for i, _ in records]
    np.testing.assert_array_equal(vecs, expected_vectors([t for _, t in records], DIM))
    assert not [n for n in os.listdir(os.path.join(work, "shards")) if n.startswith(".")]


def test_actor_layout_workers_per_gpu() -> None:
    """``--workers-per-device N`` under Ray: N actors share each GPU (``num_gpus=1/N``)."""
    from tweet_embed.embed.engines.ray import actor_layout

    assert actor_layout(4, RayOptions()) == (4, 1.0)
    assert actor_layout(4, RayOptions(workers_per_gpu=2)) == (8, 0.5)
    assert actor_layout(3, RayOptions(workers_per_gpu=3)) == (9, 1 / 3)
    assert actor_layout(0, RayOptions()) == (1, 0.0)  # no GPU: the model on CPU in one actor
    assert actor_layout(0, RayOptions(workers_per_gpu=2)) == (2, 0.0)
    assert actor_layout(4, RayOptions(gpus_per_actor=0.25)) == (16, 0.25)  # an explicit share wins
    assert actor_layout(4, RayOptions(actors=3, workers_per_gpu=2)) == (3, 0.5)
    assert actor_layout(3, RayOptions(gpus_per_actor=1 / 3)) == (9, 1 / 3)
