"""worker.make_batches: every text once, in order, within both limits, each batch as long as the limits allow."""

from __future__ import annotations

import random

import pytest

from tweet_embed.worker import make_batches


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
