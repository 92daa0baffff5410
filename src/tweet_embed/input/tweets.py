"""The text of a Twitter API object as a reader sees it (v1.1 and v2), and which records are tweets.

Why: the obvious field is often the wrong one. A v1.1 retweet's ``text`` is cut at 140 characters (the whole
text is in ``retweeted_status``); a v1.1 tweet over 140 characters keeps its whole text in
``extended_tweet.full_text`` (streaming, classic mode) or ``full_text`` (REST, ``tweet_mode=extended``); a v2
long post keeps it in ``note_tweet.text``; and both APIs write ``&``, ``<`` and ``>`` as ``&amp;``, ``&lt;``
and ``&gt;``. The rules, in order (``full`` mode, the default):

- a retweet is rebuilt as ``RT @<original author's screen name>: `` + the original's whole text (v1.1: from
  ``retweeted_status``; v2: the ``referenced_tweets`` entry of type ``retweeted``, looked up in a twarc2
  response's ``includes.tweets``/``includes.users``, or inline as twarc2 ``flatten`` writes it);
- otherwise the whole text: v1.1 ``extended_tweet.full_text``, then ``full_text``, then ``text``; v2
  ``note_tweet.text``, then ``text``;
- then the three entities the API escapes are turned back (only those three, in one pass, so a tweet that
  really says ``&amp;`` — sent by the API as ``&amp;amp;`` — keeps it).

``raw`` mode keeps the API's ``text`` field exactly as sent (``full_text`` where there is no ``text``).
"""

from __future__ import annotations

from typing import Any

TEXT_MODES = ("full", "raw")

# Keys only a v2 tweet object has (id and text alone are not enough: plain {id, text} files are common)
_V2_KEYS = ("edit_history_tweet_ids", "author_id", "conversation_id", "referenced_tweets", "note_tweet")
# Keys of v1.1 tweet objects beside id_str
_V1_KEYS = ("user", "full_text", "extended_tweet", "retweeted_status", "in_reply_to_status_id_str")


def tweet_kind(obj: dict[str, Any]) -> str | None:
    """``"v1"``, ``"v2"`` or None (not a Twitter tweet object)."""
    if "id_str" in obj and ("text" in obj or "full_text" in obj) and any(k in obj for k in _V1_KEYS):
        return "v1"
    if "id" in obj and "text" in obj and "id_str" not in obj and any(k in obj for k in _V2_KEYS):
        return "v2"
    return None


def unescape(text: str) -> str:
    """Undo the API's HTML escaping of ``&``, ``<``, ``>`` (``&amp;`` last, so ``&amp;lt;`` → ``&lt;``)."""
    if "&" not in text:
        return text
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def _v1_whole(t: dict[str, Any]) -> Any:
    ext = t.get("extended_tweet")
    if isinstance(ext, dict) and isinstance(ext.get("full_text"), str):
        return ext["full_text"]
    full = t.get("full_text")
    if isinstance(full, str):
        return full
    return t.get("text")


def v1_text(t: dict[str, Any], mode: str = "full") -> Any:
    """The text of a v1.1 tweet (see the module doc); not a str when the tweet has none."""
    if mode == "raw":
        return t["text"] if "text" in t else t.get("full_text")
    rt = t.get("retweeted_status")
    if isinstance(rt, dict):
        user = rt.get("user")
        name = user.get("screen_name") if isinstance(user, dict) else None
        inner = _v1_whole(rt)
        if isinstance(name, str) and isinstance(inner, str):
            return unescape(f"RT @{name}: {inner}")
    text = _v1_whole(t)
    return unescape(text) if isinstance(text, str) else text


def _v2_whole(t: dict[str, Any]) -> Any:
    note = t.get("note_tweet")
    if isinstance(note, dict) and isinstance(note.get("text"), str) and note["text"]:
        return note["text"]
    return t.get("text")


def _rt_name(text: Any) -> str | None:
    """The screen name in a retweet's own ``RT @name: …`` text."""
    if isinstance(text, str) and text.startswith("RT @"):
        end = text.find(":", 4)
        if end > 4:
            return text[4:end]
    return None


class Includes:
    """A twarc2 response's ``includes``: tweets and users by id (for retweets' originals)."""

    __slots__ = ("tweets", "users")

    def __init__(self, includes: Any) -> None:
        self.tweets: dict[str, dict[str, Any]] = {}
        self.users: dict[str, dict[str, Any]] = {}
        if not isinstance(includes, dict):
            return
        for key, into in (("tweets", self.tweets), ("users", self.users)):
            items = includes.get(key)
            if isinstance(items, list):
                for it in items:
                    if isinstance(it, dict) and isinstance(it.get("id"), str):
                        into[it["id"]] = it


def _v2_retweeted(t: dict[str, Any]) -> dict[str, Any] | None:
    refs = t.get("referenced_tweets")
    if isinstance(refs, list):
        for ref in refs:
            if isinstance(ref, dict) and ref.get("type") == "retweeted":
                return ref
    return None


def v2_text(t: dict[str, Any], mode: str = "full", includes: Includes | None = None) -> Any:
    """The text of a v2 tweet (see the module doc); not a str when the tweet has none."""
    if mode == "raw":
        return t.get("text")
    ref = _v2_retweeted(t)
    if ref is not None:
        orig: dict[str, Any] | None = None
        if includes is not None and isinstance(ref.get("id"), str):
            orig = includes.tweets.get(ref["id"])
        if orig is None and "text" in ref:  # twarc2 flatten: the referenced tweet inline
            orig = ref
        if orig is not None:
            name = None
            author = orig.get("author")
            if isinstance(author, dict):
                name = author.get("username")
            if name is None and includes is not None and isinstance(orig.get("author_id"), str):
                name = includes.users.get(orig["author_id"], {}).get("username")
            if name is None:
                name = _rt_name(t.get("text"))
            inner = _v2_whole(orig)
            if isinstance(name, str) and isinstance(inner, str):
                return unescape(f"RT @{name}: {inner}")
    text = _v2_whole(t)
    return unescape(text) if isinstance(text, str) else text


def is_retweet(obj: dict[str, Any], text: Any) -> bool:
    """A retweet by the API's structure (v1.1 ``retweeted_status``, v2 ``referenced_tweets``), else by the
    ``RT @`` prefix of its text (plain records, old data)."""
    if isinstance(obj.get("retweeted_status"), dict) or _v2_retweeted(obj) is not None:
        return True
    raw = obj.get("text")
    return (isinstance(raw, str) and raw.startswith("RT @")) or (
        isinstance(text, str) and text.startswith("RT @")
    )
