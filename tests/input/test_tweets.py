"""The text of Twitter API objects. Every object here is written by hand from the public API reference's
field descriptions (v1.1 Tweet object, extended Tweets, v2 Tweet fields / note_tweet / includes); the texts,
ids and names are made up."""

from __future__ import annotations

import pytest

from tweet_embed.input.tweets import Includes, is_retweet, tweet_kind, unescape, v1_text, v2_text

LONG = "A long post about bread, " * 12 + "the end."  # over 280 characters

# v1.1, classic (140-character) mode, a short tweet: entities escaped by the API
V1_SHORT = {
    "created_at": "Tue Mar 03 10:00:00 +0000 2020",
    "id": 1234567890123456789,
    "id_str": "1234567890123456789",
    "text": "Fish &amp; chips &lt;3 &gt;_&lt; and &amp;amp; literally",
    "truncated": False,
    "user": {"id_str": "11", "screen_name": "alice"},
    "lang": "en",
}
# v1.1 streaming, classic mode, a tweet over 140 characters: the whole text in extended_tweet.full_text
V1_TRUNCATED = {
    "id": 1234567890123456790,
    "id_str": "1234567890123456790",
    "text": LONG[:110] + "\u2026 https://t.co/abc",
    "truncated": True,
    "extended_tweet": {"full_text": LONG, "display_text_range": [0, len(LONG)]},
    "user": {"id_str": "11", "screen_name": "alice"},
    "lang": "en",
}
# v1.1 REST with tweet_mode=extended: full_text instead of text
V1_EXTENDED_MODE = {
    "id": 1234567890123456791,
    "id_str": "1234567890123456791",
    "full_text": "Salt &amp; pepper " + LONG,
    "display_text_range": [0, 300],
    "truncated": False,
    "user": {"id_str": "11", "screen_name": "alice"},
}
# v1.1 retweet (classic): the retweet's own text is cut; the original is whole in retweeted_status
V1_RETWEET = {
    "id": 1234567890123456792,
    "id_str": "1234567890123456792",
    "text": "RT @bob: " + LONG[:100] + "\u2026",
    "truncated": False,
    "user": {"id_str": "11", "screen_name": "alice"},
    "retweeted_status": {
        "id_str": "1234567890123456700",
        "text": LONG[:110] + "\u2026 https://t.co/def",
        "truncated": True,
        "extended_tweet": {"full_text": LONG + " &amp; more"},
        "user": {"id_str": "22", "screen_name": "bob"},
    },
    "lang": "en",
}
# v1.1 retweet in extended mode: full_text of the retweet is cut, the original's full_text is whole
V1_RETWEET_EXTENDED_MODE = {
    "id_str": "1234567890123456793",
    "full_text": "RT @bob: " + LONG[:120] + "\u2026",
    "user": {"id_str": "11", "screen_name": "alice"},
    "retweeted_status": {
        "id_str": "1234567890123456701",
        "full_text": LONG,
        "user": {"id_str": "22", "screen_name": "bob"},
    },
}
# v2: a short post (text escaped), a long post (note_tweet), a retweet (original in includes)
V2_SHORT = {
    "id": "1500000000000000001",
    "text": "Tea &amp; cake &lt;&gt;",
    "edit_history_tweet_ids": ["1500000000000000001"],
    "author_id": "33",
    "lang": "en",
}
V2_NOTE = {
    "id": "1500000000000000002",
    "text": LONG[:270] + "\u2026",
    "note_tweet": {"text": LONG + " &lt;fin&gt;"},
    "edit_history_tweet_ids": ["1500000000000000002"],
    "author_id": "33",
    "lang": "en",
}
V2_ORIGINAL = {
    "id": "1500000000000000003",
    "text": LONG[:270] + "\u2026",
    "note_tweet": {"text": LONG},
    "author_id": "44",
    "edit_history_tweet_ids": ["1500000000000000003"],
}
V2_RETWEET = {
    "id": "1500000000000000004",
    "text": "RT @carol: " + LONG[:120] + "\u2026",
    "referenced_tweets": [{"type": "retweeted", "id": "1500000000000000003"}],
    "author_id": "33",
    "edit_history_tweet_ids": ["1500000000000000004"],
    "lang": "en",
}
V2_INCLUDES = {"tweets": [V2_ORIGINAL], "users": [{"id": "44", "username": "carol", "name": "Carol"}]}


@pytest.mark.parametrize(
    ("tweet", "full", "raw"),
    [
        (
            V1_SHORT,
            "Fish & chips <3 >_< and &amp; literally",
            "Fish &amp; chips &lt;3 &gt;_&lt; and &amp;amp; literally",
        ),
        (V1_TRUNCATED, LONG, V1_TRUNCATED["text"]),
        (V1_EXTENDED_MODE, "Salt & pepper " + LONG, V1_EXTENDED_MODE["full_text"]),
        (V1_RETWEET, "RT @bob: " + LONG + " & more", V1_RETWEET["text"]),
        (V1_RETWEET_EXTENDED_MODE, "RT @bob: " + LONG, V1_RETWEET_EXTENDED_MODE["full_text"]),
    ],
    ids=["short", "truncated", "extended-mode", "retweet", "retweet-extended-mode"],
)
def test_v1_text(tweet, full, raw) -> None:
    assert tweet_kind(tweet) == "v1"
    assert v1_text(tweet) == full
    assert v1_text(tweet, "raw") == raw


def test_v2_text_short_note_and_retweet() -> None:
    inc = Includes(V2_INCLUDES)
    assert [tweet_kind(t) for t in (V2_SHORT, V2_NOTE, V2_RETWEET)] == ["v2", "v2", "v2"]
    assert v2_text(V2_SHORT) == "Tea & cake <>"
    assert v2_text(V2_NOTE) == LONG + " <fin>"
    assert v2_text(V2_RETWEET, includes=inc) == "RT @carol: " + LONG
    assert v2_text(V2_RETWEET, "raw", inc) == V2_RETWEET["text"]
    assert v2_text(V2_NOTE, "raw") == V2_NOTE["text"]


def test_v2_retweet_without_includes_keeps_its_own_text_and_flattened_is_rebuilt() -> None:
    assert v2_text(V2_RETWEET) == V2_RETWEET["text"]  # the original is nowhere: the text as given
    # twarc2 flatten writes the referenced tweet inline, with its author
    flat = dict(V2_RETWEET)
    flat["referenced_tweets"] = [{**V2_ORIGINAL, "type": "retweeted", "author": {"username": "carol"}}]
    assert v2_text(flat) == "RT @carol: " + LONG
    # the author's name is not given anywhere: taken from the retweet's own "RT @name:" prefix
    inc = Includes({"tweets": [V2_ORIGINAL]})
    assert v2_text(V2_RETWEET, includes=inc) == "RT @carol: " + LONG


def test_plain_records_are_not_tweets() -> None:
    assert tweet_kind({"_id": "1", "text": "x"}) is None
    assert tweet_kind({"id": "1", "text": "x"}) is None  # id and text alone: a plain record
    assert tweet_kind({"delete": {"status": {"id_str": "1"}}}) is None


def test_unescape_only_the_three_api_entities_once() -> None:
    assert unescape("&amp;lt; &amp;amp; &copy; &#39; &lt;b&gt;") == "&lt; &amp; &copy; &#39; <b>"
    assert unescape("no entities") == "no entities"


def test_is_retweet() -> None:
    assert is_retweet(V1_RETWEET, "x") and is_retweet(V2_RETWEET, "x")
    assert not is_retweet(V1_SHORT, V1_SHORT["text"]) and not is_retweet(V2_SHORT, "Tea")
    assert is_retweet({"_id": "1", "text": "RT @x: hi"}, "RT @x: hi")
    assert not is_retweet({"_id": "1", "text": "RTS are fun"}, "RTS are fun")
