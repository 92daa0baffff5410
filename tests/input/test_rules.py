"""Records → (id, text) | reject | skip: dotted fields, Twitter objects' ids and texts, filters."""

from __future__ import annotations

import orjson
import pytest

from tweet_embed.input.rules import Rules, Skip, extract, parse_json_lines, record_from_raw
from tweet_objects import LONG, V1_RETWEET, V1_SHORT, V1_TRUNCATED, V2_NOTE, V2_SHORT


def test_dotted_paths() -> None:
    obj = {"meta": {"id": 7}, "user": {"description": "I bake"}, "a.b": "literal"}
    assert extract(obj, "meta.id", "user.description") == ("7", "I bake")
    assert extract(obj, "meta.id", "a.b") == ("7", "literal")  # a key holding a dot is taken first
    assert extract(obj, "meta.nope", "a.b") == "missing id field 'meta.nope'"
    assert extract(obj, "meta.id", "user.description.x") == "missing text field 'user.description.x'"


def test_tweet_ids_and_texts() -> None:
    assert extract(V1_SHORT, "_id", "text", tweets=True) == (
        "1234567890123456789",  # id_str, not the integer id (which a float would round)
        "Fish & chips <3 >_< and &amp; literally",
    )
    assert extract(V1_TRUNCATED, "_id", "text", tweets=True) == ("1234567890123456790", LONG)
    assert extract(V2_NOTE, "_id", "text", tweets=True) == ("1500000000000000002", LONG + " <fin>")
    raw = Rules(text_mode="raw")
    assert extract(V1_SHORT, "_id", "text", raw, tweets=True)[1] == V1_SHORT["text"]  # type: ignore[index]
    # a MongoDB document of a tweet: its _id is the id; an explicit text field is taken as is
    doc = {"_id": {"$oid": "5f1d7a3b2c1e4a0012345678"}, **V1_SHORT}
    assert extract(doc, "_id", "text", tweets=True) == (
        "5f1d7a3b2c1e4a0012345678",
        "Fish & chips <3 >_< and &amp; literally",
    )
    assert extract(V1_SHORT, "id_str", "user.screen_name", tweets=True) == ("1234567890123456789", "alice")
    # outside a tweets file the same object is a plain record (no _id: a reject)
    assert extract(V1_SHORT, "_id", "text") == "missing id field '_id'"


def test_filters_skip_by_reason() -> None:
    rules = Rules(langs=("en", "es"), skip_retweets=True, min_chars=5)
    assert extract({"_id": "1", "text": "hola amigos", "lang": "es"}, "_id", "text", rules) == (
        "1",
        "hola amigos",
    )
    for obj, reason in [
        ({"_id": "1", "text": "bonjour", "lang": "fr"}, "lang"),
        ({"_id": "1", "text": "no lang at all"}, "lang"),
        ({"_id": "1", "text": "RT @x: hello", "lang": "en"}, "retweet"),
        ({"_id": "1", "text": "  hi   ", "lang": "en"}, "short"),
    ]:
        out = extract(obj, "_id", "text", rules)
        assert isinstance(out, Skip) and out.reason == reason, obj
    out = extract(V1_RETWEET, "_id", "text", rules, tweets=True)
    assert isinstance(out, Skip) and out.reason == "retweet"
    # a reject stays a reject, filters or not
    assert extract({"_id": "1", "text": "", "lang": "fr"}, "_id", "text", rules) == "text is empty"


def test_big_integer_ids_and_lone_surrogates_through_the_general_path() -> None:
    raw = b'{"_id": 123456789012345678901234567890, "text": "\\ud800 x", "lang": "en"}'
    assert record_from_raw(raw, "_id", "text", Rules(langs=("en",))) == (
        "123456789012345678901234567890",
        "\ufffd x",
    )


def test_parse_json_lines_counts_skips_and_keeps_line_numbers() -> None:
    lines = [
        orjson.dumps(V1_SHORT),
        b"",
        orjson.dumps(V2_SHORT),
        orjson.dumps(V1_RETWEET),
        b'{"delete": {"status": {"id_str": "5"}}}',
        orjson.dumps({**V2_SHORT, "lang": "de", "id": "9"}),
    ]
    block = parse_json_lines(
        b"\n".join(lines) + b"\n", 10, "f", rules=Rules(langs=("en",), skip_retweets=True), tweets=True
    )
    assert block.ids == ["1234567890123456789", "1500000000000000001"]
    assert block.lines == [10, 12]
    assert [(r.line, r.reason) for r in block.rejects] == [(14, "missing id field '_id'")]
    assert block.skipped == {"retweet": 1, "lang": 1}


@pytest.mark.parametrize("rules", [Rules(), Rules(min_chars=1)])
def test_plain_jsonl_unchanged_by_the_general_path(rules: Rules) -> None:
    data = b'{"_id": 1, "text": "a"}\n{"_id": "b"}\n\n{"_id": "c", "text": "&amp;"}\n'
    block = parse_json_lines(data, 1, "f", rules=rules)
    assert (block.ids, block.texts, block.lines) == (["1", "c"], ["a", "&amp;"], [1, 4])
    assert [(r.line, r.reason) for r in block.rejects] == [(2, "missing text field 'text'")]
