"""Synthetic tweet-like records for the demo, tests and benchmarks (deterministic for a seed).

Texts are built from topic vocabularies, so nearest-neighbour search over them gives sensible results, with
the usual tweet furniture: mentions, hashtags, links, emoji, the odd non-Latin script, and retweets.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import orjson

TOPICS: dict[str, list[str]] = {
    "football": [
        "match",
        "goal",
        "striker",
        "penalty",
        "league",
        "referee",
        "stadium",
        "derby",
        "keeper",
        "transfer",
        "coach",
        "fans",
        "offside",
        "champions",
        "kick-off",
    ],
    "weather": [
        "rain",
        "storm",
        "sunshine",
        "forecast",
        "heatwave",
        "snow",
        "wind",
        "umbrella",
        "clouds",
        "temperature",
        "thunder",
        "flood",
        "frost",
        "humid",
        "drizzle",
    ],
    "food": [
        "pizza",
        "coffee",
        "breakfast",
        "recipe",
        "dinner",
        "tacos",
        "ramen",
        "bakery",
        "vegan",
        "burger",
        "chocolate",
        "brunch",
        "spicy",
        "sushi",
        "pancakes",
    ],
    "tech": [
        "phone",
        "update",
        "bug",
        "laptop",
        "app",
        "release",
        "battery",
        "server",
        "code",
        "AI",
        "startup",
        "cloud",
        "keyboard",
        "crash",
        "beta",
    ],
    "music": [
        "album",
        "concert",
        "song",
        "playlist",
        "tour",
        "guitar",
        "festival",
        "lyrics",
        "band",
        "vinyl",
        "drummer",
        "encore",
        "single",
        "remix",
        "tickets",
    ],
    "travel": [
        "flight",
        "airport",
        "hotel",
        "beach",
        "passport",
        "train",
        "delayed",
        "luggage",
        "trip",
        "museum",
        "roadtrip",
        "hostel",
        "sunset",
        "island",
        "boarding",
    ],
}
TEMPLATES = [
    "Can't believe the {a} today, {b} was unreal",
    "Anyone else think the {a} and the {b} are overrated?",
    "Just saw the best {a} ever. {b} next!",
    "Why is every {a} so {b} lately",
    "{a} + {b} = perfect evening",
    "Not gonna lie, that {a} made my day. Also {b}.",
    "Hot take: {a} is better than {b}",
    "Waiting for the {a}... {b} please hurry",
    "Morning thoughts: {a}, {b}, repeat",
    "Who's up for {a} after the {b}?",
]
EMOJI = ["😂", "🔥", "❤️", "👍", "😭", "🙏", "⚽", "☕", "🎶", "✈️", "🌧️", "🍕"]
OTHER_SCRIPTS = ["مرحبا بالجميع", "שלום לכולם", "こんにちは", "今天天气很好", "Привет всем", "नमस्ते"]


def synth_tweets(n: int, seed: int = 7, repeat_fraction: float = 0.0) -> Iterator[tuple[str, str]]:
    """Yield ``n`` deterministic ``(id, text)`` pairs; ``repeat_fraction`` of them repeat an earlier text."""
    rng = random.Random(seed)
    topics = list(TOPICS)
    recent: list[str] = []
    base = 1_600_000_000_000_000_000 + seed * 10**12
    for i in range(n):
        if recent and rng.random() < repeat_fraction:
            text = "RT " + rng.choice(recent) if rng.random() < 0.3 else rng.choice(recent)
        else:
            words = TOPICS[rng.choice(topics)]
            text = rng.choice(TEMPLATES).format(a=rng.choice(words), b=rng.choice(words))
            r = rng.random()
            if r < 0.3:
                text += " " + rng.choice(EMOJI)
            if r < 0.15:
                text = f"@user{rng.randrange(10_000)} " + text
            if rng.random() < 0.2:
                text += f" #{rng.choice(words).replace('-', '')}"
            if rng.random() < 0.1:
                text += f" https://t.co/{rng.getrandbits(40):010x}"
            if rng.random() < 0.03:
                text += " " + rng.choice(OTHER_SCRIPTS)
            recent.append(text)
            if len(recent) > 1000:
                recent.pop(0)
        yield str(base + i), text


def write_jsonl(path: str, n: int, seed: int = 7, repeat_fraction: float = 0.0) -> None:
    """Write ``n`` synthetic records as JSONL (``{"_id", "text"}``); ``.gz`` / ``.zst`` compress."""
    import gzip

    if path.endswith(".gz"):
        fh = gzip.open(path, "wb")
    elif path.endswith(".zst"):
        import zstandard

        fh = zstandard.ZstdCompressor().stream_writer(open(path, "wb"), closefd=True)  # type: ignore[assignment]
    else:
        fh = open(path, "wb")  # type: ignore[assignment]
    with fh:
        buf = []
        for rid, text in synth_tweets(n, seed, repeat_fraction):
            buf.append(orjson.dumps({"_id": rid, "text": text}) + b"\n")
            if len(buf) >= 10_000:
                fh.write(b"".join(buf))
                buf.clear()
        fh.write(b"".join(buf))
