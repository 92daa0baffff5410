"""Twitter API objects written by hand from the public API reference's field descriptions (v1.1 Tweet object
and extended Tweets, v2 Tweet fields, note_tweet, includes); the texts, ids and names are made up. Shared by the
input, CLI and export tests."""

from __future__ import annotations

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
