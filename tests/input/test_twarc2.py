"""twarc2 response lines: many tweets per line, retweets rebuilt from includes, chunks sized in tweets."""

from __future__ import annotations

import io

import orjson

from tweet_embed.input.rules import Rules
from tweet_embed.input.twarc2 import parse_twarc2_block, scan_twarc2
from tweet_objects import LONG, V2_INCLUDES, V2_NOTE, V2_RETWEET, V2_SHORT


def response(tweets, includes=None, **extra) -> bytes:
    obj = {
        "data": tweets,
        "includes": includes or {},
        "meta": {"result_count": len(tweets)},
        "__twarc": {"url": "https://api.twitter.com/2/tweets/search/recent", "version": "2.14.0"},
        **extra,
    }
    return orjson.dumps(obj)


def tweet(i: int, text: str = "hello &amp; bye", lang: str = "en") -> dict:
    return {
        "id": str(1000 + i),
        "text": text,
        "author_id": "9",
        "edit_history_tweet_ids": [str(1000 + i)],
        "lang": lang,
    }


def test_every_tweet_of_every_line_with_its_line_number() -> None:
    lines = [
        response([V2_SHORT, V2_NOTE, V2_RETWEET], V2_INCLUDES),
        b"",
        orjson.dumps({"meta": {"result_count": 0}}),  # an empty page: no tweets, not a reject
        orjson.dumps({"errors": [{"title": "Not Found Error", "detail": "Could not find tweet"}]}),
        orjson.dumps({"data": {**V2_SHORT, "id": "77"}}),  # a single-tweet lookup
        response([{"id": "88", "text": "", "author_id": "9"}, tweet(2, lang="fr")]),
        b'{"data": [',
    ]
    block = parse_twarc2_block(b"\n".join(lines) + b"\n", 5, "t.jsonl", rules=Rules(langs=("en",)))
    assert block.ids == [V2_SHORT["id"], V2_NOTE["id"], V2_RETWEET["id"], "77"]
    assert block.texts == ["Tea & cake <>", LONG + " <fin>", "RT @carol: " + LONG, "Tea & cake <>"]
    assert block.lines == [5, 5, 5, 9]
    assert [(r.line, r.reason.split(":")[0]) for r in block.rejects] == [
        (8, "a twarc2 line with errors and no data"),
        (10, "data[0]"),
        (11, "malformed JSON"),
    ]
    assert "text is empty" in block.rejects[1].reason
    assert block.skipped == {"lang": 1}


def test_raw_text_mode() -> None:
    block = parse_twarc2_block(response([V2_RETWEET], V2_INCLUDES), 1, "t", rules=Rules(text_mode="raw"))
    assert block.texts == [V2_RETWEET["text"]]


def test_chunks_hold_about_chunk_size_tweets_and_never_split_a_line() -> None:
    sizes = [3, 0, 5, 1, 7, 2, 2]
    lines = [response([tweet(i) for i in range(n)]) if n else b"" for n in sizes]
    data = b"\n".join(lines)  # no final newline
    sc = scan_twarc2(io.BytesIO(data).read, 4)
    assert sc.tweets == sum(sizes) and sc.lines == len(sizes)
    # cut after a line once 4 tweets are reached: [3,0,5] [1,7] [2,2]
    assert [(c[0], c[1]) for c in sc.chunks] == [(1, 3), (4, 2), (6, 2)]
    assert b"".join(data[s:e] for _, _, s, e in sc.chunks) == data
    got = []
    for first, _, s, e in sc.chunks:
        got += parse_twarc2_block(data[s:e], first, "t").ids
    assert len(got) == sum(sizes)
