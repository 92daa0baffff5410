"""The text of Twitter API objects (tests/tweet_objects.py: written by hand from the public API reference)."""

from __future__ import annotations

import pytest

from tweet_embed.input.tweets import Includes, is_retweet, tweet_kind, unescape, v1_text, v2_text
from tweet_objects import (
    LONG,
    V1_EXTENDED_MODE,
    V1_RETWEET,
    V1_RETWEET_EXTENDED_MODE,
    V1_SHORT,
    V1_TRUNCATED,
    V2_INCLUDES,
    V2_NOTE,
    V2_ORIGINAL,
    V2_RETWEET,
    V2_SHORT,
)


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
