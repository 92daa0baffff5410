"""From a decoded record (a dict) to ``(id, text)``, a reject reason, or a skip — the same for every format.

Rules, beyond those of :mod:`tweet_embed.input.records`:

- ``--id-field`` / ``--text-field`` may be dotted paths (``user.id_str``, ``user.description``); a key that
  itself holds a dot is taken first.
- In a file of Twitter API objects (``tweets`` set at plan time from the first records), a record without the
  id field takes the tweet's id (``id_str`` for v1.1, ``id`` for v2), and with the default text field
  (``text``) the text is the tweet's whole text (:mod:`tweet_embed.input.tweets`, ``--text-mode``).
- Filters (``--lang``, ``--skip-retweets``, ``--min-text-length``) run after a record is known valid; a
  filtered record is *skipped* and counted by reason (``lang``, ``retweet``, ``short``), not rejected.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tweet_embed.input.records import (
    ParsedBlock,
    Reject,
    check_text,
    clean_text,
    loads,
    normalise_id,
    parse_lines,
    short_repr,
    snippet,
    split_lines,
)
from tweet_embed.input.tweets import Includes, is_retweet, tweet_kind, v1_text, v2_text

SKIP_REASONS = ("lang", "retweet", "short")


@dataclass(frozen=True)
class Rules:
    """How records become texts beyond the two field names (picklable: sent to workers with each chunk)."""

    text_mode: str = "full"  # "raw": the API's text field as is
    langs: tuple[str, ...] = ()  # keep only these ``lang`` values (empty: all)
    skip_retweets: bool = False
    min_chars: int = 0  # texts shorter than this (leading/trailing whitespace not counted) are skipped

    @property
    def filters(self) -> bool:
        return bool(self.langs or self.skip_retweets or self.min_chars)

    def describe(self) -> dict[str, object]:
        """What differs from the defaults (for the manifest and the shard metadata)."""
        out: dict[str, object] = {}
        if self.text_mode != "full":
            out["text_mode"] = self.text_mode
        if self.langs:
            out["lang"] = list(self.langs)
        if self.skip_retweets:
            out["skip_retweets"] = True
        if self.min_chars:
            out["min_text_length"] = self.min_chars
        return out


DEFAULT_RULES = Rules()


def rules_metadata(rules: Rules) -> dict[str, str]:
    """Shard metadata for what changes a vector: the text mode, when it is not the default."""
    return {"text_mode": rules.text_mode} if rules.text_mode != "full" else {}


class Skip:
    """A valid record left out by a filter."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


SKIP_LANG, SKIP_RETWEET, SKIP_SHORT = (Skip(r) for r in SKIP_REASONS)
_MISSING = object()


def get_path(obj: dict[str, Any], path: str) -> Any:
    """``obj[path]``, or the dotted path walked through nested objects; ``_MISSING`` when absent."""
    if path in obj:
        return obj[path]
    if "." not in path:
        return _MISSING
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return _MISSING
        cur = cur[part]
    return cur


class NeedsExactInts(Exception):
    """The id decoded as a float (an integer beyond 64 bits in orjson): decode the record with the stdlib."""


def extract(
    obj: Any,
    id_field: str,
    text_field: str,
    rules: Rules = DEFAULT_RULES,
    tweets: bool | str = False,
    includes: Includes | None = None,
) -> tuple[str, str] | str | Skip:
    """One decoded record → ``(id, text)``, a reject reason (``str``) or a :class:`Skip`.

    ``tweets``: False (plain records), True (Twitter objects, v1.1 or v2 told apart per record) or ``"v2"``
    (every record is a v2 tweet: a twarc2 ``data`` array). Raises :class:`NeedsExactInts` when the id is a
    float (the caller re-decodes the record exactly).
    """
    if not isinstance(obj, dict):
        return f"not a JSON object (a {type(obj).__name__})"
    kind = tweet_kind(obj) if tweets is True else (tweets or None)
    value = get_path(obj, id_field)
    if value is _MISSING:
        if kind == "v1":
            value = obj["id_str"]
        elif kind == "v2":
            value = obj["id"]
        else:
            return f"missing id field {id_field!r}"
    if isinstance(value, float):
        raise NeedsExactInts
    rid = normalise_id(value)
    if rid is None:
        return f"invalid id {short_repr(value)}"
    if kind is not None and text_field == "text":
        text = v1_text(obj, rules.text_mode) if kind == "v1" else v2_text(obj, rules.text_mode, includes)
    else:
        text = get_path(obj, text_field)
        if text is _MISSING:
            return f"missing text field {text_field!r}"
    bad = check_text(text)
    if bad is not None:
        return bad
    if rules.filters:
        skip = filter_record(obj, text, rules)
        if skip is not None:
            return skip
    return rid, clean_text(text)


def filter_record(obj: dict[str, Any], text: str, rules: Rules) -> Skip | None:
    """The filter that leaves this valid record out, if any (lang, then retweet, then length)."""
    if rules.langs and obj.get("lang") not in rules.langs:
        return SKIP_LANG
    if rules.skip_retweets and is_retweet(obj, text):
        return SKIP_RETWEET
    if rules.min_chars and len(text.strip()) < rules.min_chars:
        return SKIP_SHORT
    return None


def looks_like_tweets(objs: list[Any]) -> bool:
    """True when the first records of a file are Twitter API tweet objects (v1.1 or v2)."""
    return any(isinstance(o, dict) and tweet_kind(o) is not None for o in objs)


def record_from_raw(
    raw: bytes,
    id_field: str,
    text_field: str,
    rules: Rules = DEFAULT_RULES,
    tweets: bool | str = False,
) -> tuple[str, str] | str | Skip:
    """One record's JSON bytes → as :func:`extract` (malformed JSON is a reject reason)."""
    try:
        obj = loads(raw)
    except ValueError as exc:
        return str(exc)
    try:
        return extract(obj, id_field, text_field, rules, tweets)
    except NeedsExactInts:
        return extract(json.loads(raw), id_field, text_field, rules, tweets)


def add_result(
    block: ParsedBlock, result: tuple[str, str] | str | Skip, line: int, label: str, raw: bytes | None
) -> None:
    """Append one record's outcome to a block: a row, a reject (with a snippet of ``raw``) or a skip count."""
    if isinstance(result, tuple):
        block.ids.append(result[0])
        block.texts.append(result[1])
        block.lines.append(line)
    elif isinstance(result, Skip):
        block.skipped[result.reason] = block.skipped.get(result.reason, 0) + 1
    else:
        block.rejects.append(Reject(label, line, result, snippet(raw or b"")))


def plain_records(id_field: str, text_field: str, rules: Rules, tweets: bool | str) -> bool:
    """Whether a block can take the bulk path: plain records (not Twitter objects), no filters, top-level
    fields (no dotted path)."""
    return not tweets and not rules.filters and "." not in id_field and "." not in text_field


def parse_json_lines(
    data: bytes,
    first_line: int,
    file_label: str,
    id_field: str = "_id",
    text_field: str = "text",
    rules: Rules = DEFAULT_RULES,
    tweets: bool | str = False,
) -> ParsedBlock:
    """A JSONL chunk under these rules: plain records without filters or dotted fields take the fast path
    of :func:`records.parse_lines` (unchanged); anything else goes line by line through :func:`extract`."""
    if plain_records(id_field, text_field, rules, tweets):
        return parse_lines(data, first_line, file_label, id_field, text_field)
    block = ParsedBlock([], [], [], [])
    for lineno, raw in split_lines(data, first_line):
        add_result(block, record_from_raw(raw, id_field, text_field, rules, tweets), lineno, file_label, raw)
    return block
