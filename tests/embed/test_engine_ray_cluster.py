"""The Ray engine on a multi-node cluster on this machine: a head and two worker nodes, each its own raylet
with its own resources (``ray.cluster_utils.Cluster``), input and work dir on the moto S3 server.

What a real cluster adds over one local Ray instance: chunks placed on other nodes, a node that disappears
mid-run (its raylet, tasks and actors killed: a preempted spot VM), a node that joins mid-run, a driver that
dies and is run again against the same cluster, and the job-submission path (``ray job submit``). Every run is
checked row by row, and byte for byte against the local engine (the markers' sha256 of each shard).

The nodes share this machine's filesystem, so a local work dir is a "shared local path" (as NFS would be).
Each node is declared with one CPU (a worker node also with one fake GPU, and the nodes the actor test adds,
for the actors; the model runs on CPU in them): placement, loss and retries are Ray's real ones, only the hardware is pretend.
"""

from __future__ import annotations

import asyncio
import glob
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import pytest
from test_engine_ray import DIM, TESTS, WrappedBackend, options, sent, upload, write_inputs

from tweet_embed.backends import BackendSpec
from tweet_embed.backends.base import Backend
from tweet_embed.embed.chunks import WorkDirs, done_markers
from tweet_embed.embed.engines.ray import RayOptions
from tweet_embed.embed.runner import run_embed
from tweet_embed.testing.server import TEIServer, expected_vectors
from tweet_embed.testing.synth import synth_tweets

from conftest import CLI, ROOT, assert_resumed, kill_after_chunks, moto_s3, read_shards

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")
BIN = os.path.dirname(sys.executable)
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def s3() -> Iterator[Any]:
    with moto_s3("bucket") as fs:
        yield fs


@dataclass
class Nodes:
    cluster: Any
    head: Any
    workers: list[Any]

    def add(self, **kw: Any) -> Any:
        node = self.cluster.add_node(num_cpus=1, **kw)
        self.cluster.wait_for_nodes()
        return node

    def remove(self, node: Any) -> None:
        # not graceful: the raylet and every worker process on it are killed at once, as when a VM is preempted
        self.cluster.remove_node(node, allow_graceful=False)

    def wait_gone(self, node: Any, timeout: float = 30) -> None:
        """Until the cluster has noticed (its health checks): later tests count the nodes."""
        deadline = time.monotonic() + timeout
        while any(n["NodeID"] == node.node_id and n["Alive"] for n in ray.nodes()):
            assert time.monotonic() < deadline, "the removed node still counts as alive"
            time.sleep(0.1)


@pytest.fixture(scope="module")
def nodes(s3) -> Iterator[Nodes]:
    """Head (1 CPU, the dashboard for job submission) + 2 worker nodes (1 CPU each; the first with 1 fake GPU)."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "PATH", *RAY_ENV)}
    # every node's workers import the test backends, and `ray job submit -- tweet-embed` finds the CLI
    os.environ["PYTHONPATH"] = os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ["PATH"] = os.pathsep.join([BIN, os.environ.get("PATH", "")])
    os.environ.update(RAY_ENV)
    if ray.is_initialized():  # another module's local instance
        ray.shutdown()
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "num_gpus": 0,
            "include_dashboard": True,
            "dashboard_port": 0,
            # a killed node is declared dead within about a second (default: 3 s x 5 health checks)
            "_system_config": {"health_check_period_ms": 300, "health_check_failure_threshold": 3},
        },
    )
    try:
        workers = [cluster.add_node(num_cpus=1, num_gpus=g) for g in (1, 0)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=True)
        yield Nodes(cluster, cluster.head_node, workers)
    finally:
        ray.shutdown()
        cluster.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def server() -> Iterator[TEIServer]:
    with TEIServer(dim=DIM, max_client_batch_size=16) as srv:
        yield srv


@pytest.fixture(scope="module")
def data(tmp_path_factory, s3, server) -> dict[str, Any]:
    """The inputs (plain + gzipped JSONL, two bad lines) locally and on S3, and the local engine's run of them."""
    tmp = tmp_path_factory.mktemp("inputs")
    inputs, records = write_inputs(tmp)
    uris = upload(s3, inputs)
    ref = str(tmp / "local")
    run_embed(options(inputs, ref, None), BackendSpec(urls=(server.embed_url,)))
    return {"local": inputs, "s3": uris, "records": records, "reference": ref}


def markers_sha(work: str) -> dict[str, str]:
    return {k: m.sha256 for k, m in done_markers(WorkDirs.from_options(work, None, None, None)).items()}


def assert_identical_to_local(work: str, data: dict[str, Any]) -> None:
    """Every valid row once, in order, with its own vector; the same shards, bytes and names as the local run."""
    records = data["records"]
    ids, vecs, names = read_shards(f"{work}/shards", DIM)
    assert ids == [r[0] for r in records]
    np.testing.assert_array_equal(vecs, expected_vectors([r[1] for r in records], DIM))
    ref = markers_sha(data["reference"])
    assert len(ref) == 20 and markers_sha(work) == ref


# ------------------------------------------------------------- a backend that says which node embedded what


class TracedBackend(WrappedBackend):
    """Records, per node, how many texts it embedded (a file per node id in ``log_dir``, on the shared disk).

    ``hang_on``: on that node, the first call writes ``log_dir/hung`` and never returns, so that the node is
    surely in the middle of a chunk when the test removes it. ``wait_for``: a custom node resource; calls on
    other nodes wait (up to a minute) until a node with it has embedded something (``log_dir/<resource>``),
    so that a node added mid-run surely gets work.
    """

    def __init__(self, inner: Backend, log_dir: str, hang_on: str | None, wait_for: str | None) -> None:
        super().__init__(inner)
        self.log_dir, self.hang_on, self.wait_for = log_dir, hang_on, wait_for
        self.marked: bool | None = None

    def _has_resource(self, node: str) -> bool:
        if self.marked is None:
            res = {n["NodeID"]: n["Resources"] for n in ray.nodes() if n["Alive"]}
            self.marked = self.wait_for in res.get(node, {})
        return self.marked

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        node = ray.get_runtime_context().get_node_id()
        if node == self.hang_on:
            with open(os.path.join(self.log_dir, "hung"), "w") as fh:
                fh.write(node)
            await asyncio.sleep(600)
        if self.wait_for and not self._has_resource(node):
            flag = os.path.join(self.log_dir, self.wait_for)
            deadline = time.monotonic() + 60
            while not os.path.exists(flag) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        out = await self.inner.embed(texts)
        with open(os.path.join(self.log_dir, node), "a") as fh:
            fh.write(f"{len(texts)}\n")
        if self.wait_for and self._has_resource(node):
            open(os.path.join(self.log_dir, self.wait_for), "w").close()
        return out

    def stats(self) -> dict[str, int]:
        return self.inner.stats()


@dataclass(frozen=True)
class Traced:
    spec: BackendSpec
    log_dir: str
    hang_on: str | None = None
    wait_for: str | None = None

    def __call__(self) -> Backend:
        return TracedBackend(self.spec.build(), self.log_dir, self.hang_on, self.wait_for)


def texts_per_node(log_dir: str) -> dict[str, int]:
    out = {}
    for p in glob.glob(os.path.join(log_dir, "*")):
        if len(os.path.basename(p)) > 20:  # node ids, not the flags
            out[os.path.basename(p)] = sum(int(x) for x in open(p).read().split())
    return out


class Background:
    """``run_embed`` in a thread, so that the test can change the cluster while it runs."""

    def __init__(self, *args: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=args, daemon=True)
        self.thread.start()

    def _run(self, *args: Any) -> None:
        try:
            self.result = run_embed(*args)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), f"the run did not finish in {timeout:g}s"
        if self.error is not None:
            raise self.error
        return self.result


def wait_for_file(path: str, timeout: float, run: Background) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert run.thread.is_alive(), f"the run ended before {os.path.basename(path)} appeared: {run.error!r}"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout:g}s"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------------------- tests


def test_chunks_run_on_every_node_from_s3(tmp_path, nodes, data, server) -> None:
    server.reset_counters()
    log_dir = str(tmp_path / "trace")
    os.makedirs(log_dir)
    work = "s3://bucket/runs/every-node"
    stage = str(tmp_path / "stage")
    s = run_embed(
        options(data["s3"], work, RayOptions(), stage), Traced(BackendSpec(urls=(server.embed_url,)), log_dir)
    )
    assert s.rows == len(data["records"]) and s.chunks_done_now == 20 and s.rejected == 2
    per_node = texts_per_node(log_dir)
    everyone = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert set(per_node) == everyone and len(everyone) == 3, per_node
    assert sent(server) == Counter(t for _, t in data["records"])  # nothing sent twice
    assert_identical_to_local(work, data)


@pytest.mark.slow
def test_worker_node_removed_mid_run(tmp_path, nodes, data, server) -> None:
    """A node dies with a chunk in the middle of its work: Ray re-runs its tasks on the other nodes."""
    victim = nodes.add(resources={"victim": 1})
    log_dir = str(tmp_path / "trace")
    os.makedirs(log_dir)
    work = "s3://bucket/runs/node-lost"
    factory = Traced(BackendSpec(urls=(server.embed_url,)), log_dir, hang_on=victim.node_id)
    run = Background(options(data["s3"], work, RayOptions(), str(tmp_path / "stage")), factory)
    try:
        wait_for_file(os.path.join(log_dir, "hung"), 60, run)
    finally:
        nodes.remove(victim)
    s = run.join(120)
    nodes.wait_gone(victim)
    assert s.rows == len(data["records"]) and s.chunks_done_now == 20
    assert victim.node_id not in texts_per_node(log_dir)  # whatever it started never counted
    assert_identical_to_local(work, data)


@pytest.mark.slow
def test_node_added_mid_run_gets_chunks(tmp_path, nodes, data, server) -> None:
    """A node that joins mid-run takes chunks: the others hold their chunks until it has embedded something."""
    log_dir = str(tmp_path / "trace")
    os.makedirs(log_dir)
    work = "s3://bucket/runs/node-added"
    factory = Traced(BackendSpec(urls=(server.embed_url,)), log_dir, wait_for="late")
    run = Background(options(data["s3"], work, RayOptions(), str(tmp_path / "stage")), factory)
    late = None
    try:
        late = nodes.add(resources={"late": 1})
        s = run.join(120)
    finally:
        if late is not None:
            nodes.remove(late)
            nodes.wait_gone(late)
    assert s.rows == len(data["records"]) and s.chunks_done_now == 20
    per_node = texts_per_node(log_dir)
    assert per_node.get(late.node_id, 0) > 0, per_node
    assert_identical_to_local(work, data)


# ---------------------------------------------------------------------- the command line against the cluster


def write_tweets(path: str, n: int, seed: int) -> list[tuple[str, str]]:
    records = list(synth_tweets(n, seed=seed))
    with open(path, "wb") as fh:
        fh.write(b"".join(orjson.dumps({"_id": i, "text": t}) + b"\n" for i, t in records))
    return records


def assert_rows(work: str, records: list[tuple[str, str]]) -> None:
    ids, vecs, _ = read_shards(os.path.join(work, "shards"), DIM)
    assert ids == [i for i, _ in records]
    np.testing.assert_array_equal(vecs, expected_vectors([t for _, t in records], DIM))
    assert not [n for n in os.listdir(os.path.join(work, "shards")) if not n.startswith("part-")]


def cli_env(address: str | None = None) -> dict[str, str]:
    env = {**os.environ, **RAY_ENV}
    env.pop("RAY_ADDRESS", None)
    if address:
        env["RAY_ADDRESS"] = address
    return env


@pytest.mark.slow
def test_cli_driver_killed_then_rerun_against_same_cluster(tmp_path, nodes) -> None:
    """A shared local work dir; the driver SIGKILLed mid-run; the same command again finishes exactly."""
    path = str(tmp_path / "tweets.jsonl")
    records = write_tweets(path, 2000, seed=5)
    work = str(tmp_path / "w")
    with TEIServer(dim=DIM, latency=0.03) as srv:
        args = [*CLI, "embed", path, "--tei-urls", srv.url, "--work-dir", work]
        args += ["--chunk-size", "100", "--engine", "ray", "--ray-address", nodes.cluster.address]
        args += ["--log-interval", "0.1"]
        first = subprocess.Popen(
            args, cwd=ROOT, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        done_before = kill_after_chunks(first, work, 4, timeout=120)
        assert 4 <= done_before < 20
        r = subprocess.run(args, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Ray: 3 node(s), 3 CPUs" in r.stderr, r.stderr[:3000]  # it joined the cluster, not a new local one
    assert_resumed(r.stderr, done_before, chunks=20, chunk_lines=100)
    assert_rows(work, records)


@pytest.mark.slow
def test_ray_job_submit_runs_the_cli_on_the_cluster(tmp_path, nodes) -> None:
    """``ray job submit -- tweet-embed embed ...``: the driver runs on the head node (RAY_ADDRESS set there)."""
    path = str(tmp_path / "tweets.jsonl")
    records = write_tweets(path, 600, seed=6)
    work = str(tmp_path / "w")
    url = nodes.cluster.webui_url
    assert url, "the head node has no dashboard"
    with TEIServer(dim=DIM) as srv:
        cmd = [os.path.join(BIN, "ray"), "job", "submit", "--address", f"http://{url}", "--"]
        cmd += [
            "tweet-embed",
            "embed",
            path,
            "--tei-urls",
            srv.url,
            "--work-dir",
            work,
            "--chunk-size",
            "100",
        ]
        cmd += ["--engine", "ray"]
        r = subprocess.run(cmd, cwd=str(tmp_path), env=cli_env(), capture_output=True, text=True, timeout=180)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert re.search(r"Job '\S+' succeeded", out), out[-3000:]
    assert "Ray: 3 node(s), 3 CPUs" in out, out[-3000:]  # the job's driver joined this cluster
    assert "Embedded 600 rows in 6 chunks (0 of 6 already done)" in out, out[-3000:]
    assert_rows(work, records)


# ------------------------------------------------------------------ the in-process model on "GPU" actors

MODEL = "random:L2-H32"  # seeded random BERT weights: loads in a moment, the same vectors in every process


@pytest.mark.slow
def test_actors_one_per_gpu_across_nodes_node_lost_and_gpu_node_added(tmp_path, nodes) -> None:
    """One actor per (declared) GPU on two nodes; the node of one dies mid-chunk; a GPU node joins.

    The lost actor's chunks must go to the other actors (there is no free GPU to restart it on, so Ray's own
    restart would wait forever), and the node that joins must get an actor: the other actors hold their chunks
    until it has embedded something. The output is that of the local engine, byte for byte.
    """
    pytest.importorskip("torch")
    path = str(tmp_path / "tweets.jsonl")
    write_tweets(path, 600, seed=7)
    spec = BackendSpec(model=MODEL, device="cpu")
    local = str(tmp_path / "local")
    run_embed(options([path], local, None, chunk_lines=50), spec)

    victim = nodes.add(num_gpus=1, resources={"victim": 1})
    log_dir = str(tmp_path / "trace")
    os.makedirs(log_dir)
    work = str(tmp_path / "ray")
    ropts = RayOptions(use_actors=True, cpus_per_actor=0.5)
    factory = Traced(spec, log_dir, hang_on=victim.node_id, wait_for="late")
    run = Background(options([path], work, ropts, chunk_lines=50), factory)
    late = None
    try:
        try:
            wait_for_file(os.path.join(log_dir, "hung"), 90, run)
        finally:
            nodes.remove(victim)
        late = nodes.add(num_gpus=1, resources={"late": 1})
        s = run.join(120)
    finally:
        if late is not None:
            nodes.remove(late)
    assert s.rows == 600 and s.chunks_done_now == 12
    per_node = texts_per_node(log_dir)
    assert set(per_node) == {nodes.workers[0].node_id, late.node_id}, per_node  # the GPU nodes left
    ids, vecs, _ = read_shards(os.path.join(work, "shards"), 32)
    lids, lvecs, _ = read_shards(os.path.join(local, "shards"), 32)
    assert ids == lids and len(ids) == 600
    np.testing.assert_array_equal(vecs, lvecs)
    assert markers_sha(work) == markers_sha(local)
