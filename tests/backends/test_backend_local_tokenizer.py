"""The fast tokenize path (WordCacheTokenizer): bit-identical ids to the tokenizer it stands in for."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from tweet_embed.backends.local import (
    PROBE_TEXTS,
    WordCacheTokenizer,
    encode_ids,
    fast_tokenizer,
    load_tokenizer,
    minilm_dir,
)
from tweet_embed.testing.synth import synth_tweets

tokenizers = pytest.importorskip("tokenizers")

SAMPLE = Path(__file__).resolve().parents[2] / "sample" / "tweets.jsonl"

EDGE_CASES = [
    *PROBE_TEXTS,
    "",
    " ",
    "   \t\t\n\n  ",
    "SHOUTING IN ALL CAPS, WITH NUMBERS 12345!",
    "Crème brûlée à la française, niño, señor, ÀÉÎÕÜ",
    "combining: cafe\u0301 n\u0303 o\u0308\u0304 \u0300\u0301\u0302 stacked",
    "漢字とかなカナ混じり文。中文，标点！한국어도요",
    "emoji only 🎉🎉🎉🔥💯🙏🏾🧑‍💻🏳️‍🌈",
    "controls \x00 \x07 bell\x07inside \x1b[31mred\x1b[0m del\x7fete \x01\x02\x03",
    "zero width\u200bjoined \ufeffbom \u200c\u200d\u2060 soft\u00adhyphen",
    "tabs\tand\nnewlines\r\nand\x0bvertical\x0cfeed \x1c\x1d\x1e\x1f seps \x85nel",
    "RTL: العربية ‏עברית‎ \u202emixed\u202c direction",
    "ÅNGSTRÖM ΣΟΦΊΑ σοφία ὅτι ΐ İı ß ẞ ǈ ﬀ ﬃ Ⅻ ⓐ Ａｂｃ",
    "math 𝐀𝐁𝐂 𝔸 ∑∫≠ ² ½ ℃ № ™ ©",
    "[SEP] inside text [CLS] and [MASK]",
    "a lone [ bracket and ] other",
    "x" * 99,
    "y" * 100,
    "z" * 101,
    "Ä" * 150,
    "pneumonoultramicroscopicsilicovolcanoconiosis " * 80,
    " ".join(["🙂"] * 300),
    "https://example.com/Path?Q=1&r=ABC#frag @Mention_123 #HashTag $TSLA 3.14159 1,000,000",
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(str(minilm_dir() / "tokenizer.json"), 256)


@pytest.fixture(scope="module")
def fast(tok):
    f = WordCacheTokenizer.for_tokenizer(tok)
    assert f is not None, "the packaged MiniLM tokenizer should get the fast path"
    return f


def reference_ids(tok, texts):
    return [e.ids for e in tok.encode_batch(list(texts))]


def fast_ids(fast, texts):
    flat, lengths = fast.encode(texts)
    assert flat.dtype == np.int32 and lengths.dtype == np.int64 and len(lengths) == len(texts)
    assert int(lengths.sum()) == len(flat)
    return [part.tolist() for part in np.split(flat, np.cumsum(lengths)[:-1])] if len(texts) else []


def assert_same(tok, fast, texts):
    want = reference_ids(tok, texts)
    got = fast_ids(fast, texts)
    bad = [i for i, (w, g) in enumerate(zip(want, got, strict=True)) if w != g]
    assert not bad, f"{len(bad)} texts differ, first {texts[bad[0]]!r}: {got[bad[0]]} != {want[bad[0]]}"


def test_edge_cases(tok, fast):
    assert_same(tok, fast, EDGE_CASES)
    # one at a time too (a word's first sight, cache state differs)
    fresh = WordCacheTokenizer.for_tokenizer(tok)
    for text in EDGE_CASES:
        assert fast_ids(fresh, [text]) == reference_ids(tok, [text]), text


def test_every_ascii_character_in_context(tok, fast):
    texts = [f"Ab{chr(c)}Cd {chr(c)}{chr(c)} x{chr(c)}" for c in range(128)]
    texts += [f"{chr(a)}{chr(b)}" for a in range(0, 128, 3) for b in range(128)]
    assert_same(tok, fast, texts)


def test_sample_file(tok, fast):
    texts = [json.loads(line)["text"] for line in SAMPLE.read_text().splitlines() if line.strip()]
    assert len(texts) >= 2000
    assert_same(tok, fast, texts)


@pytest.mark.parametrize("seed", [0, 7])
def test_synthetic_tweets(tok, seed):
    f = WordCacheTokenizer.for_tokenizer(tok)
    texts = [t for _, t in synth_tweets(20000, seed)]
    assert_same(tok, f, texts)
    assert f.fallbacks == 0  # nothing in synthetic tweets needs the tokenizer itself


def test_a_sample_of_all_code_points_in_context(tok, fast):
    """Every 97th code point of the whole range (the full range was checked once: no difference), next to
    letters, itself and a combining mark, so any neighbour-dependent normalization shows."""
    cps = [c for c in range(0, 0x110000, 97) if not 0xD800 <= c <= 0xDFFF]
    texts = [f"Ab{chr(c)}Cd {chr(c)}{chr(c)} x{chr(c)}e\u0301 " for c in cps]
    assert_same(tok, fast, texts)


def test_random_unicode_mixtures(tok, fast):
    """Characters from tricky ranges in random neighbourhoods: marks next to letters, CJK next to Latin..."""
    rng = random.Random(3)
    pools = [
        [chr(c) for c in range(0x20, 0x7F)] * 4,
        [chr(c) for c in range(0x00, 0x20)]
        + ["\x7f", "\x85", "\xa0", "\u200b", "\ufeff", "\u2028", "\u3000"],
        [chr(c) for c in range(0xC0, 0x250)],  # Latin with accents, upper and lower
        [chr(c) for c in range(0x300, 0x370)],  # combining diacritics
        [chr(c) for c in range(0x370, 0x400)] + [chr(c) for c in range(0x1F00, 0x1F20)],  # Greek
        [chr(c) for c in range(0x400, 0x460)],  # Cyrillic
        [chr(c) for c in range(0x590, 0x700)],  # Hebrew, Arabic (with their marks)
        [chr(c) for c in range(0x900, 0x980)] + [chr(c) for c in range(0xE00, 0xE60)],  # Devanagari, Thai
        [chr(c) for c in range(0x4E00, 0x4E80)] + [chr(c) for c in range(0x3040, 0x3100)],  # CJK, kana
        [chr(c) for c in range(0xAC00, 0xAC40)] + [chr(c) for c in range(0xF900, 0xF920)],  # Hangul, compat
        [chr(c) for c in range(0x2000, 0x2070)] + [chr(c) for c in range(0xFF00, 0xFF60)],  # punct, fullwidth
        [chr(c) for c in range(0x1F300, 0x1F680)] + ["\u200d", "\ufe0f", "\U0001f3fd"],  # emoji parts
        [chr(c) for c in range(0x1D400, 0x1D440)] + [chr(c) for c in range(0x1D160, 0x1D170)],  # math, music
        ["\U000e0001", "\U000f0000", "\ue000", "\U0010fffd", "\u0378", "\ufffd", "\ufffe"],  # tags, private
    ]
    texts = []
    for _ in range(3000):
        picked = rng.sample(pools, rng.randint(1, 4))
        texts.append("".join(rng.choice(rng.choice(picked)) for _ in range(rng.randint(0, 60))))
    assert_same(tok, fast, texts)


def test_truncation_at_a_small_max_length(tok):
    small = tokenizers.Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    small.no_padding()
    small.enable_truncation(max_length=12)
    f = WordCacheTokenizer.for_tokenizer(small)
    assert f is not None
    texts = [" ".join(["word"] * k) for k in range(15)] + ["unbelievably long-winded sentence " * 3]
    texts += [t for _, t in synth_tweets(500, 1)] + EDGE_CASES
    want = reference_ids(small, texts)
    assert max(map(len, want)) == 12
    assert fast_ids(f, texts) == want


def test_added_tokens_go_through_the_tokenizer(tok):
    f = WordCacheTokenizer.for_tokenizer(tok)
    texts = ["before [SEP] after", "plain text", "[MASK]", "x [ y ] z"]
    assert fast_ids(f, texts) == reference_ids(tok, texts)
    assert f.fallbacks == 2
    assert fast_ids(f, ["[SEP]"]) == [[101, 102, 102]]


def test_a_full_cache_is_emptied_and_ids_stay_the_same(tok, monkeypatch):
    f = WordCacheTokenizer.for_tokenizer(tok)
    monkeypatch.setattr(f, "CACHE_ENTRIES", 50)
    texts = [t for _, t in synth_tweets(3000, 5)]
    for i in range(0, len(texts), 300):
        assert fast_ids(f, texts[i : i + 300]) == reference_ids(tok, texts[i : i + 300])
        # emptied at the start of a call once past the limit, so at most one call's worth above it
        assert len(f._chunks) <= 50 + 300 * 60 and len(f._words) <= 50 + 300 * 60
    assert fast_ids(f, texts[:10]) == reference_ids(tok, texts[:10])
    assert len(f._chunks) < 300


def test_odd_texts_mixed_with_plain_ones_keep_their_places(tok):
    """Texts that cannot be joined (separator characters, added tokens, refused characters, surrogate-free
    but tricky) interleaved with plain ones: each row's ids in its own place."""
    f = WordCacheTokenizer.for_tokenizer(tok)
    odd = [
        "record\x1esep",
        "vertical\x0btab",
        "form\x0cfeed",
        "has [SEP] token",
        "NFD-reordered \U0001d165\u0301\U0001d16d mark",
        "",
    ]
    plain = [t for _, t in synth_tweets(40, 4)]
    rng = random.Random(1)
    for _ in range(20):
        texts = rng.sample(plain, 10) + rng.sample(odd, rng.randint(1, len(odd)))
        rng.shuffle(texts)
        assert fast_ids(f, texts) == reference_ids(tok, texts)
    assert fast_ids(f, odd) == reference_ids(tok, odd)


def test_lone_surrogates_are_refused_like_the_tokenizer_does(tok, fast):
    with pytest.raises(Exception) as want:
        tok.encode_batch(["ok", "bad \ud83d half"])
    with pytest.raises(type(want.value)):
        fast.encode(["ok", "bad \ud83d half"])


def test_other_pipelines_are_not_taken(tok):
    norms = tokenizers.normalizers
    lower_only = tokenizers.Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    lower_only.normalizer = norms.Lowercase()
    assert WordCacheTokenizer.for_tokenizer(lower_only) is None
    padded = tokenizers.Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    padded.enable_padding(length=64)
    assert WordCacheTokenizer.for_tokenizer(padded) is None
    left = tokenizers.Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    left.no_padding()
    left.enable_truncation(max_length=32, direction="left")
    assert WordCacheTokenizer.for_tokenizer(left) is None


def test_other_bert_normalizer_settings_still_match():
    """Cased / no-CJK / no-accent-stripping variants: the character table follows what the normalizer does."""
    norms = tokenizers.normalizers
    texts = EDGE_CASES + [t for _, t in synth_tweets(300, 2)]
    for kwargs in (
        {"lowercase": False},
        {"handle_chinese_chars": False},
        {"strip_accents": False, "lowercase": True},
        {"clean_text": False},
    ):
        t = tokenizers.Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
        t.no_padding()
        t.enable_truncation(max_length=256)
        t.normalizer = norms.BertNormalizer(**kwargs)
        f = WordCacheTokenizer.for_tokenizer(t)
        if f is not None:  # None is allowed (not taken); wrong ids are not
            assert fast_ids(f, texts) == reference_ids(t, texts), kwargs


def test_encode_ids_and_the_switch(tok, fast, monkeypatch):
    texts = [t for _, t in synth_tweets(200, 9)]
    for got, want in zip(encode_ids(fast, texts), encode_ids(tok, texts), strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert isinstance(fast_tokenizer(tok), WordCacheTokenizer)
    monkeypatch.setenv("TWEET_EMBED_FAST_TOKENIZER", "0")
    assert fast_tokenizer(tok) is tok


def test_empty_batch(fast):
    flat, lengths = fast.encode([])
    assert flat.shape == (0,) and lengths.shape == (0,)


def test_threads_sharing_one_fast_tokenizer(tok, monkeypatch):
    """Two embed threads may tokenize in one process at once (no tokenizer processes): same ids."""
    from concurrent.futures import ThreadPoolExecutor

    f = WordCacheTokenizer.for_tokenizer(tok)
    monkeypatch.setattr(f, "CACHE_ENTRIES", 100)  # emptied often, while the other thread works
    texts = [t for _, t in synth_tweets(4000, 8)]
    pieces = [texts[i : i + 250] for i in range(0, len(texts), 250)]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda p: fast_ids(f, p), pieces))
    assert got == [reference_ids(tok, p) for p in pieces]
