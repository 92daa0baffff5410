"""worker: batches within both limits and as long as they allow; refused texts found alone; nothing twice."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest

from tweet_embed.backends.base import Backend, BackendInfo
from tweet_embed.backends.pool import BatchRefused
from tweet_embed.embed.worker import embed_texts, make_batches


@pytest.mark.parametrize("seed", range(300))
def test_make_batches_within_limits_and_maximal(seed: int) -> None:
    rng = random.Random(seed)
    texts = ["x" * rng.choice([0, 1, 2, 5, 10, 50, 200]) for _ in range(rng.randint(0, 80))]
    max_batch = rng.randint(1, 20)
    max_chars = rng.choice([1, 5, 30, 100, 1000, 10**9])
    batches = make_batches(texts, max_batch, max_chars)
    if not texts:
        assert batches == []
        return
    # contiguous cover of 0..n, no empty batch
    assert [s for s, _ in batches] == [0] + [e for _, e in batches[:-1]]
    assert batches[-1][1] == len(texts)
    for s, e in batches:
        chars = sum(map(len, texts[s:e]))
        assert 0 < e - s <= max_batch
        assert chars <= max_chars or e - s == 1  # an over-long text goes alone
        if e < len(texts):  # the next text would break a limit
            assert e - s == max_batch or chars + len(texts[e]) > max_chars


def test_make_batches_examples() -> None:
    assert make_batches([], 4) == []
    assert make_batches(["a"] * 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert make_batches(["aaa", "aaa", "aaa"], 10, max_chars=6) == [(0, 2), (2, 3)]
    assert make_batches(["a", "x" * 50, "b"], 10, max_chars=10) == [(0, 1), (1, 2), (2, 3)]


class CountingBackend(Backend):
    """A fake model that counts what it embeds and refuses any batch holding a text starting with "BAD"."""

    def __init__(self, max_batch: int, kind: str = "local") -> None:
        self.info = BackendInfo(kind=kind, model="fake", dim=4, max_batch=max_batch, max_in_flight=2)
        self.calls: list[list[str]] = []
        self.embedded: Counter[str] = Counter()
        self.last: np.ndarray | None = None

    async def start(self) -> BackendInfo:
        return self.info

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        if any(t.startswith("BAD") for t in texts):
            raise BatchRefused("422 Validation: bad text")
        self.embedded.update(texts)
        self.last = np.array([[len(t), 1, 2, 3] for t in texts], dtype=np.float32)
        return self.last


def test_one_batch_is_one_call_and_its_array_is_kept() -> None:
    b = CountingBackend(max_batch=100)
    texts = [f"text {i}" for i in range(50)]
    vecs, refused = asyncio.run(embed_texts(b, texts, b.info))
    assert len(b.calls) == 1 and refused == {}
    assert np.shares_memory(vecs, b.last)  # not copied into a second array
    np.testing.assert_array_equal(vecs[:, 0], [len(t) for t in texts])


@pytest.mark.parametrize("max_batch", [1, 7, 100])
def test_refused_text_alone_in_rejects_every_other_text_embedded_once(max_batch: int) -> None:
    b = CountingBackend(max_batch=max_batch)
    texts = [f"text {i}" for i in range(40)]
    texts[13] = "BAD one"
    vecs, refused = asyncio.run(embed_texts(b, texts, b.info))
    assert list(refused) == [13] and "bad text" in refused[13]
    assert b.embedded == Counter(t for i, t in enumerate(texts) if i != 13)  # once each, never twice
    assert sum(1 for c in b.calls if c == texts) <= 1  # the whole chunk is never sent twice
    np.testing.assert_array_equal(vecs[13], 0)
    np.testing.assert_array_equal(np.delete(vecs[:, 0], 13), [len(t) for i, t in enumerate(texts) if i != 13])


def test_single_refused_text() -> None:
    b = CountingBackend(max_batch=10)
    vecs, refused = asyncio.run(embed_texts(b, ["BAD"], b.info))
    assert list(refused) == [0] and vecs.shape == (1, 4) and not vecs.any() and len(b.calls) == 1
