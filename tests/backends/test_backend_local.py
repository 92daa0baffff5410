"""The in-process backend: same vectors as sentence-transformers, input order kept, batches within budget."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tweet_embed.backends.base import BackendError
from tweet_embed.backends.local import (
    MINILM_ID,
    LocalBackend,
    minilm_dir,
    pad_length,
    pad_rows,
    plan_batches,
    resolve_devices,
    rows_for,
    shape_rows,
)

TWEETS = [
    "Watching the football match tonight with friends! #goal",
    "",
    "x",
    "I can't believe it's already Friday 😂😂😂 https://t.co/abc123",
    "RT @someone: the quick brown fox jumps over the lazy dog " * 40,  # past 256 tokens: truncated
    "Das Wetter ist heute schön, wir gehen in den Park.",
    "今日はいい天気ですね",
    "new phone who dis",
    "   leading and trailing spaces   ",
    "Breaking: markets fall as rates rise; analysts expect more volatility in the coming weeks.",
] * 7


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def minilm():
    # the torch pipeline (its forward, lean BERT, tokenizer processes): OpenVINO, the CPU default, has its own
    # tests (test_backend_local_openvino.py)
    b = LocalBackend(device="cpu", runtime="torch")
    info = run(b.start())
    yield b, info
    run(b.close())


@pytest.fixture(scope="module")
def reference():
    st_mod = pytest.importorskip("sentence_transformers")
    st = st_mod.SentenceTransformer(str(minilm_dir()), device="cpu", local_files_only=True)
    return st


def test_import_does_not_load_torch():
    code = (
        "import sys, tweet_embed.backends.local; print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_resolve_devices():
    assert resolve_devices("0,1") == ["cuda:0", "cuda:1"]
    assert resolve_devices(" 2 ") == ["cuda:2"]
    assert resolve_devices("cuda:3,cuda:1") == ["cuda:3", "cuda:1"]
    assert resolve_devices("cpu") == ["cpu"]
    with pytest.raises(BackendError):
        resolve_devices("0,0")
    with pytest.raises(BackendError):
        resolve_devices("gpu0")


def test_resolve_devices_default_follows_cuda():
    torch = pytest.importorskip("torch")
    expected = ["cuda:0"] if torch.cuda.is_available() else ["cpu"]
    assert resolve_devices(None) == expected
    if not torch.cuda.is_available():
        with pytest.raises(BackendError):
            resolve_devices("all")


def test_pad_length_and_rows():
    assert pad_length(1, 16, 256) == 16
    assert pad_length(16, 16, 256) == 16
    assert pad_length(17, 16, 256) == 32
    assert pad_length(255, 16, 250) == 250
    assert pad_length(13, 1, 256) == 13
    assert rows_for(16, 1 << 16, 8192) == 4096
    assert rows_for(48, 1000, 8192) == 16  # 20 -> multiple of 8
    assert rows_for(512, 100, 8192) == 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_batches_cover_everything_within_budget(seed):
    rng = np.random.default_rng(seed)
    lengths = np.sort(np.minimum(rng.geometric(1 / 30, size=5000) + 2, 256))
    budget, max_rows, mult = 4096, 512, 16
    batches = plan_batches(lengths, budget, max_rows, mult, 256)
    pos = 0
    for s, e, length in batches:
        assert s == pos and e > s
        pos = e
        assert length % mult == 0
        # one padded length per batch: padding costs less than `mult` tokens per text
        assert all(pad_length(int(x), mult, 256) == length for x in lengths[s:e])
        assert e - s <= max_rows
        assert (e - s) == 1 or (e - s) * length <= budget
    assert pos == len(lengths)
    # within a bucket every batch but the last is full
    for (s, e, length), nxt in zip(batches, batches[1:] + [(0, 0, -1)], strict=True):
        if nxt[2] == length:
            assert e - s == rows_for(length, budget, max_rows)
    for s, e, length in batches:
        assert shape_rows(e - s, length, budget, max_rows) >= e - s
    assert plan_batches(np.array([], dtype=np.int64), budget, max_rows, mult, 256) == []


@pytest.mark.parametrize("length", [16, 48, 256])
def test_shape_rows_few_shapes_little_waste(length):
    budget, max_rows = 1 << 18, 8192
    full = rows_for(length, budget, max_rows)
    shapes = {shape_rows(r, length, budget, max_rows) for r in range(1, full + 1)}
    assert full in shapes and len(shapes) <= 8 * full.bit_length()  # eight per power of two
    for r in range(1, full + 1):
        got = shape_rows(r, length, budget, max_rows)
        assert r <= got <= full
        assert got - r < max(8, r // 8 + 1)  # at most an eighth more rows (or 8)
    assert shape_rows(full + 5, length, budget, max_rows) == full + 5  # never shrinks a batch


def test_pad_rows_gathers_ids():
    seqs = [[101, 5, 6, 102], [101, 102], [101, 7, 8, 9, 10, 102]]
    lengths = np.array([len(s) for s in seqs])
    flat = np.array([t for s in seqs for t in s], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    out = pad_rows(flat, offsets, lengths, np.array([2, 0]), 8, total_rows=3)
    assert out.dtype == np.int32 and out.shape == (3, 8)
    assert out[0].tolist() == [101, 7, 8, 9, 10, 102, 0, 0]
    assert out[1].tolist() == [101, 5, 6, 102, 0, 0, 0, 0]
    assert out[2].tolist() == [0] * 8


def test_info_and_matches_sentence_transformers(minilm, reference):
    backend, info = minilm
    assert info.kind == "local" and info.model == MINILM_ID and info.dim == 384 and info.normalize
    assert info.max_batch >= 256 and info.max_in_flight >= 1
    assert info.extra == {"runtime": "torch", "dtype": "float32"}
    assert backend._fwd.mask4d  # the installed transformers takes the ready 4-D mask (no host sync per batch)
    texts = list(TWEETS)
    np.random.default_rng(3).shuffle(texts)
    vecs = run(backend.embed(texts))
    assert vecs.dtype == np.float32 and vecs.shape == (len(texts), 384) and vecs.flags.c_contiguous
    ref = reference.encode(texts, normalize_embeddings=True, convert_to_numpy=True)
    cos = (vecs * ref).sum(axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.999
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_lean_forward_matches_transformers(minilm):
    """The lean BERT forward is in use for MiniLM and gives transformers' vectors."""
    backend, _ = minilm
    assert backend._fwd.lean is not None
    texts = TWEETS[:12]
    lean = run(backend.embed(texts))
    saved, backend._fwd.lean = backend._fwd.lean, None
    try:
        hf = run(backend.embed(texts))
    finally:
        backend._fwd.lean = saved
    assert np.allclose(lean, hf, atol=1e-5)


def test_order_restored_and_batch_independent(minilm):
    backend, _ = minilm
    texts = TWEETS[:10]
    together = run(backend.embed(texts))
    reverse = run(backend.embed(texts[::-1]))[::-1]
    alone = np.vstack([run(backend.embed([t])) for t in texts])
    assert np.allclose(together, reverse, atol=1e-5)
    assert np.allclose(together, alone, atol=1e-5)
    # distinct texts give distinct rows: a shuffled result would not match row by row
    assert not np.allclose(together[0], together[1], atol=1e-2)


def test_concurrent_calls_keep_their_rows(minilm):
    backend, _ = minilm
    a, b = TWEETS[:10], TWEETS[10:20][::-1]

    async def both():
        return await asyncio.gather(backend.embed(a), backend.embed(b))

    va, vb = run(both())
    assert np.allclose(va, run(backend.embed(a)), atol=1e-5)
    assert np.allclose(vb, run(backend.embed(b)), atol=1e-5)


def test_empty_call(minilm):
    backend, _ = minilm
    assert run(backend.embed([])).shape == (0, 384)


def test_small_token_budget_splits_but_same_vectors(minilm):
    backend, _ = minilm
    texts = TWEETS[:20]
    ref = run(backend.embed(texts))
    small = LocalBackend(device="cpu", token_budget=64, runtime="torch")
    run(small.start())
    out = run(small.embed(texts))
    st = small.stats()
    assert st["batches"] > 4 and st["texts"] == 20
    assert st["padded_tokens"] >= st["tokens"]
    assert np.allclose(out, ref, atol=1e-5)


def test_tokenizer_processes_give_the_same_ids_and_vectors(minilm):
    backend, _ = minilm
    texts = [f"{t} #{i}" for i, t in enumerate(TWEETS * 9)]  # 630 texts: split across the processes
    pooled = LocalBackend(device="cpu", tokenizer_workers=2, runtime="torch")
    try:
        run(pooled.start())
        assert pooled.stats()["tokenizer_workers"] == 2 and pooled._pool is not None
        for got, want in zip(pooled.tokenize(texts), backend.tokenize(texts), strict=True):
            assert got.dtype == want.dtype and np.array_equal(got, want)
        assert np.allclose(run(pooled.embed(texts)), run(backend.embed(texts)), atol=1e-5)
    finally:
        run(pooled.close())
    assert pooled._pool is None


def _daemon_child(out):  # runs in a daemonic spawned process, like a per-device worker
    b = LocalBackend("random:L2-H64", device="cpu", tokenizer_workers=2, runtime="torch")
    run(b.start())
    vecs = run(b.embed([f"tweet number {i}" for i in range(600)]))
    out.put((b.stats()["tokenizer_workers"], vecs.shape))
    run(b.close())


def test_daemonic_process_tokenizes_in_place():
    """Device workers are daemonic and may not start tokenizer processes: the backend still works."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    p = ctx.Process(target=_daemon_child, args=(out,), daemon=True)
    p.start()
    try:
        workers, shape = out.get(timeout=300)
    finally:
        p.join(timeout=60)
    assert p.exitcode == 0
    assert workers == 0 and shape == (600, 64)


def test_normalize_false_gives_raw_mean_pooling():
    b = LocalBackend(device="cpu", normalize=False)
    info = run(b.start())
    assert not info.normalize
    raw = run(b.embed(TWEETS[:5]))
    norms = np.linalg.norm(raw, axis=1)
    assert not np.allclose(norms, 1.0, atol=1e-3)
    n = LocalBackend(device="cpu")
    run(n.start())
    assert np.allclose(raw / norms[:, None], run(n.embed(TWEETS[:5])), atol=1e-5)


def test_random_shape_is_seeded():
    a = LocalBackend("random:L2-H64", device="cpu")
    info = run(a.start())
    assert info.dim == 64 and info.model == "random:L2-H64"
    va = run(a.embed(TWEETS[:6]))
    b = LocalBackend("random:L2-H64", device="cpu")
    run(b.start())
    assert np.allclose(va, run(b.embed(TWEETS[:6])), atol=1e-6)
    assert np.allclose(np.linalg.norm(va, axis=1), 1.0, atol=1e-5)


def test_bad_specs_raise_backend_error():
    with pytest.raises(BackendError, match="random shape"):
        run(LocalBackend("random:huge", device="cpu").start())
    with pytest.raises(BackendError, match="fp16"):
        run(LocalBackend(device="cpu", dtype="fp16").start())
    with pytest.raises(BackendError, match="dtype"):
        run(LocalBackend(device="cpu", dtype="int8").start())


def test_missing_torch_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(BackendError, match=r"tweet-embed\[local\]"):
        run(LocalBackend(device="cpu").start())


def test_other_layout_falls_back_to_sentence_transformers(tmp_path: Path, reference):
    """A model whose pooling the fast pipeline does not do still loads, through SentenceTransformer.encode."""
    src = minilm_dir()
    dst = tmp_path / "maxpool"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "*.md"))
    (dst / "model.safetensors").symlink_to(src / "model.safetensors")
    cfg = json.loads((dst / "1_Pooling" / "config.json").read_text())
    cfg["pooling_mode_mean_tokens"], cfg["pooling_mode_max_tokens"] = False, True
    (dst / "1_Pooling" / "config.json").write_text(json.dumps(cfg))
    b = LocalBackend(str(dst), device="cpu")
    info = run(b.start())
    assert info.extra.get("pipeline") == "sentence-transformers" and info.dim == 384
    vecs = run(b.embed(TWEETS[:8]))
    mean = reference.encode(TWEETS[:8], normalize_embeddings=True)
    assert vecs.shape == (8, 384) and np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-4)
    assert not np.allclose(vecs, mean, atol=1e-3)  # max pooling, not the mean path


@pytest.mark.parametrize("runtime", ["torch", "openvino"])
def test_device_counters_count_batches_tokens_and_seconds(runtime):
    """What /metrics and the journal show per device: forward batches, texts, real and padded tokens, and
    device seconds (on CPU the wall time of the forward calls, so within the calls' own wall time)."""
    if runtime == "openvino":
        pytest.importorskip("openvino")
    b = LocalBackend("random:L2-H64", device="cpu", runtime=runtime, tokenizer_workers=0, batch_size=8)
    run(b.start())
    try:
        assert b.device_counters() == {
            "cpu": {"batches": 0, "texts": 0, "tokens": 0, "padded_tokens": 0, "seconds": 0.0}
        }
        texts = TWEETS[:40]
        lengths = b.tokenize(texts)[2]
        t0 = time.perf_counter()
        run(b.embed(texts))
        run(b.embed(texts[:10]))
        wall = time.perf_counter() - t0
        [(device, c)] = b.device_counters().items()
        tel = b.telemetry()
    finally:
        run(b.close())
    assert device == "cpu"
    assert c["texts"] == 50
    assert c["tokens"] == int(lengths.sum() + lengths[:10].sum())  # the real tokens, no padding
    # at most 8 rows a batch (--batch-size), lengths padded to a multiple of 4 on CPU
    assert c["batches"] >= 5 + 2
    assert c["tokens"] < c["padded_tokens"] and c["padded_tokens"] % 4 == 0
    assert 0 < c["seconds"] < wall
    assert tel["devices"] == {"cpu": c} and tel["endpoints"] == {} and tel["stats"]["texts"] == 50
