"""Shared fixtures: a fake backend that counts batches, and helpers to run the real CLI."""

from __future__ import annotations

import contextlib
import glob
import gzip
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from tweet_embed.backends.base import Backend, BackendInfo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "tweet_embed"]  # the real command line, as ``run_cli`` runs it
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _restore_cli_logging() -> Iterator[None]:
    """cli.main installs a stderr handler on the "tweet_embed" logger; put back what was there, so later tests
    do not log into this test's closed capture stream."""
    logger = logging.getLogger("tweet_embed")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def read_shards(shards: str | Sequence[str], dim: int) -> tuple[list[str], np.ndarray, list[str]]:
    """ids, vectors (float32, one row each; ``dim`` is the width when there is no shard) and file names of embed's
    shards, in name order.

    ``shards`` is a shards directory (local or an object-store URI; only ``part-*.parquet`` counts) or a list
    of files. Every file is read whole, so an unreadable shard raises."""
    import pyarrow.parquet as pq

    from tweet_embed import storage

    if isinstance(shards, str):
        names = sorted(
            n for n in storage.list_names(shards) if n.startswith("part-") and n.endswith(".parquet")
        )
        paths = [storage.join(shards, n) for n in names]
    else:
        paths = list(shards)
        names = [os.path.basename(p) for p in paths]
    ids: list[str] = []
    vecs = []
    for path in paths:
        if storage.is_uri(path):
            fs, inner = storage.resolve(path)
            t = pq.read_table(inner, filesystem=fs)
        else:
            t = pq.read_table(path)
        ids += t.column("id").to_pylist()
        width = t.schema.field("embedding").type.list_size  # fixed_size_list: right for an empty shard too
        vecs.append(np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(t.num_rows, width))
    return ids, (np.concatenate(vecs) if vecs else np.zeros((0, dim), np.float32)), names


def read_jsonl(path: str) -> list[dict[str, Any]]:
    """The records of a JSONL file: plain, .gz or .zst (every member / frame), e.g. what an export wrote."""
    if path.endswith(".zst"):
        import zstandard

        with open(path, "rb") as fh:
            data = zstandard.ZstdDecompressor().stream_reader(fh, read_across_frames=True).read()
    else:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as fh:
            data = fh.read()
    return [orjson.loads(line) for line in data.splitlines()]


def text_vector(text: str, dim: int) -> np.ndarray:
    """A deterministic vector for a text (what the fake backend returns)."""
    seed = int.from_bytes(text.encode("utf-8", "surrogatepass")[:64].ljust(8, b"\0")[:8], "little") ^ len(
        text
    )
    v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return v / np.linalg.norm(v)


class CountingBackend(Backend):
    """A fake model (no server): counts every text and batch it embeds, so tests can assert no double work."""

    def __init__(self, dim: int = 8, max_batch: int = 16, refuse: Sequence[str] = ()) -> None:
        self.dim = dim
        self.max_batch = max_batch
        self.refuse = set(refuse)
        self.texts: Counter[str] = Counter()
        self.batches = 0

    async def start(self) -> BackendInfo:
        return BackendInfo(kind="fake", model="fake/counting", dim=self.dim, max_batch=self.max_batch)

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        from tweet_embed.backends.pool import BatchRefused

        if self.refuse.intersection(texts):
            raise BatchRefused("HTTP 422: refused by the fake")
        self.batches += 1
        self.texts.update(texts)
        return np.stack([text_vector(t, self.dim) for t in texts])


@pytest.fixture
def counting_backend() -> CountingBackend:
    return CountingBackend()


def run_cli(
    *args: str, cwd: str | None = None, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (``python -m tweet_embed``) in a subprocess."""
    e = dict(os.environ)
    e.setdefault("HF_HUB_OFFLINE", "1")
    if env:
        e.update(env)
    return subprocess.run(
        [*CLI, *args],
        cwd=cwd or ROOT,
        env=e,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[object]:
    """A local S3-compatible server (moto) with ``bucket``; endpoint and keys in the environment, as on a
    real cluster. Yields a pyarrow S3FileSystem on it."""
    moto_server = pytest.importorskip("moto.server")
    import pyarrow.fs as pafs

    from tweet_embed import storage

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    host, port = srv.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    storage.clear_cache()
    try:
        fs = pafs.S3FileSystem(
            endpoint_override=f"{host}:{port}",
            scheme="http",
            access_key="test",
            secret_key="test",
            region="us-east-1",
            allow_bucket_creation=True,
        )
        fs.create_dir(bucket)
        yield fs
    finally:
        srv.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        storage.clear_cache()


def chunks_done(work: str) -> int:
    """How many chunks of an embed run into ``work`` have their ``.done`` marker."""
    return len(glob.glob(os.path.join(work, "progress", "part-*.done")))


def kill_after_chunks(proc: subprocess.Popen[Any], work: str, chunks: int, timeout: float) -> int:
    """SIGKILL ``proc``, an embed run into ``work``, once ``chunks`` chunks are done (or ``timeout`` s have
    passed); it must not end by itself before. Returns how many chunks were done when it died."""
    try:
        deadline = time.time() + timeout
        while chunks_done(work) < chunks and time.time() < deadline:
            if proc.poll() is not None:
                err = proc.stderr.read()[-3000:] if proc.stderr else ""
                raise AssertionError(f"the first run ended before it was killed: {err!r}")
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    return chunks_done(work)


def assert_resumed(stderr: str, done_before: int, chunks: int, chunk_lines: int) -> None:
    """The resumed run's summary line: it skipped at least the ``done_before`` chunks done before the kill,
    and embedded exactly the others, ``chunk_lines`` rows each."""
    m = re.search(rf"Embedded (\d+) rows in (\d+) chunks \((\d+) of {chunks} already done\)", stderr)
    assert m, stderr[-3000:]
    rows, now, skipped = map(int, m.groups())
    assert skipped >= done_before and now == chunks - skipped and rows == chunk_lines * now


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (workers, tokenizer and decode processes, the resource tracker), from /proc."""
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as fh:
                    parents[int(d)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p and c not in out]
        out.update(kids)
        todo.extend(kids)
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie has exited; in a container nobody may reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def sample_slice(tmp_path: Path, lines: int) -> Path:
    """The first ``lines`` lines of the bundled sample, as a file of their own (for runs of the real model)."""
    with open(os.path.join(ROOT, "sample", "tweets.jsonl"), "rb") as fh:
        head = fh.readlines()[:lines]
    p = tmp_path / "slice.jsonl"
    p.write_bytes(b"".join(head))
    return p
