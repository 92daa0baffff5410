"""``export mongo``: stream ``{_id, text}`` out of a MongoDB collection into JSONL, resumably.

How: one ``find`` with a projection of ``_id`` and the text field, sorted by ``_id`` with a batch size,
read through ``getMore``. Every commit of the writer records the last ``_id`` handled, so an interrupted
export (Ctrl-C, crash, dropped connection) starts again with a filter "``_id`` after that one".

The resume filter respects MongoDB's *type bracketing*: ``{_id: {$gt: 5}}`` matches only numbers, while
sorting by ``_id`` puts numbers before strings before ObjectIds. So the filter is
``{$or: [{_id: {$gt: last}}, {_id: {$type: [types that sort after last's type]}}]}``, which picks up
exactly the documents that sort after ``last``. Documents inserted meanwhile with a smaller ``_id`` are
not picked up (documented in docs/export-and-load.md).
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from tweet_embed.export.jsonl_writer import (
    SKIP_INVALID_ID,
    SKIP_TEXT_EMPTY,
    SKIP_TEXT_MISSING,
    SKIP_TEXT_NOT_STRING,
    ExportError,
    ExportResult,
    ResumableJsonlWriter,
)
from tweet_embed.input.tweets import tweet_kind, v1_text, v2_text

log = logging.getLogger("tweet_embed")

MISSING = object()

# BSON comparison order of types (MongoDB manual, "Comparison/Sort Order"); arrays cannot be an _id.
_TYPE_ORDER: list[list[str]] = [
    ["minKey"],
    ["null"],
    ["double", "int", "long", "decimal"],
    ["symbol", "string"],
    ["object"],
    ["binData"],
    ["objectId"],
    ["bool"],
    ["date"],
    ["timestamp"],
    ["regex"],
    ["maxKey"],
]


def require_pymongo() -> None:
    """Raise :class:`ExportError` naming the extra to install when pymongo is missing."""
    try:
        import pymongo  # noqa: F401
    except ImportError:
        raise ExportError("export mongo needs pymongo: pip install 'tweet-embed[mongo]'") from None


def _type_rank(value: Any) -> int | None:
    """Index into :data:`_TYPE_ORDER` of a decoded BSON value (None when unknown)."""
    import bson

    if isinstance(value, bson.MinKey):
        return 0
    if value is None:
        return 1
    if isinstance(value, bool):
        return 7
    if isinstance(value, int | float | bson.Decimal128):
        return 2
    if isinstance(value, str):
        return 3
    if isinstance(value, Mapping):
        return 4
    if isinstance(value, bytes | bson.Binary | uuid.UUID):
        return 5
    if isinstance(value, bson.ObjectId):
        return 6
    if isinstance(value, _dt.datetime | bson.DatetimeMS):
        return 8
    if isinstance(value, bson.Timestamp):
        return 9
    if isinstance(value, bson.Regex | re.Pattern):
        return 10
    if isinstance(value, bson.MaxKey):
        return 11
    return None


def resume_filter(last_id: Any) -> dict[str, Any]:
    """The filter for "every ``_id`` that sorts after ``last_id``" (see the module docstring)."""
    after: dict[str, Any] = {"_id": {"$gt": last_id}}
    rank = _type_rank(last_id)
    if rank is None:
        log.warning(
            "resume after an _id of unknown BSON type %s: only that type is considered",
            type(last_id).__name__,
        )
        return after
    later = [t for group in _TYPE_ORDER[rank + 1 :] for t in group]
    if not later:
        return after
    return {"$or": [after, {"_id": {"$type": later}}]}


def mongo_id_to_str(value: Any) -> str | None:
    """The exported id: ObjectId as hex, integers in decimal, other types as strings; None if unusable."""
    import bson

    if isinstance(value, bson.ObjectId):
        return str(value)
    if isinstance(value, str):
        return value or None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bson.Binary) and value.subtype == bson.binary.UUID_SUBTYPE and len(value) == 16:
        return str(uuid.UUID(bytes=bytes(value)))
    if isinstance(value, bson.Binary | bytes):
        return bytes(value).hex()
    if isinstance(value, _dt.datetime):
        return value.isoformat()
    if isinstance(value, Mapping | list):
        from bson import json_util

        return json_util.dumps(value, json_options=json_util.CANONICAL_JSON_OPTIONS)
    return str(value)


def get_field(doc: Mapping[str, Any], path: str) -> Any:
    """``doc[path]`` where ``path`` may be dotted (``user.text``); :data:`MISSING` when absent."""
    cur: Any = doc
    for part in path.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return MISSING
        cur = cur[part]
    return cur


# Raw Twitter API documents (v1.1 as the streaming/REST API sent them, v2 tweets): the fields the text rules of
# input.tweets read, so a retweet, a long tweet or an escaped "&amp;" is exported as ``embed`` would read it.
TWEET_FIELDS = (
    "id",
    "id_str",
    "full_text",
    "extended_tweet.full_text",
    "user.screen_name",
    "retweeted_status.user.screen_name",
    "retweeted_status.text",
    "retweeted_status.full_text",
    "retweeted_status.extended_tweet.full_text",
    "note_tweet.text",
    "author_id",
    "edit_history_tweet_ids",
    "referenced_tweets",
)


def tweet_text(doc: Mapping[str, Any]) -> Any:
    """The text of a document: a tweet's whole text (input.tweets rules) when it is a Twitter API object,
    else its ``text`` field."""
    d = dict(doc)
    kind = tweet_kind(d)
    if kind == "v1":
        return v1_text(d)
    if kind == "v2":
        return v2_text(d)
    return d.get("text", MISSING)


def classify_text(value: Any) -> str | None:
    """The skip reason for a text value, or None when it is a usable text."""
    if value is MISSING or value is None:
        return SKIP_TEXT_MISSING
    if not isinstance(value, str):
        return SKIP_TEXT_NOT_STRING
    if not value:
        return SKIP_TEXT_EMPTY
    return None


def encode_cursor(last_id: Any) -> dict[str, Any] | None:
    """The writer cursor for ``last_id``: canonical extended JSON keeps its exact BSON type."""
    if last_id is MISSING:
        return None
    from bson import json_util

    return {"last_id": json_util.dumps({"_id": last_id}, json_options=json_util.CANONICAL_JSON_OPTIONS)}


def decode_cursor(cursor: Mapping[str, Any] | None) -> Any:
    if not cursor or "last_id" not in cursor:
        return MISSING
    from bson import json_util

    return json_util.loads(cursor["last_id"])["_id"]


def parse_query(text: str | None) -> dict[str, Any]:
    """A ``--query`` in (extended) JSON, e.g. ``{"lang": "en"}`` or ``{"ts": {"$date": "2024-01-01T00:00:00Z"}}``."""
    if not text:
        return {}
    from bson import json_util

    try:
        q = json_util.loads(text)
    except ValueError as exc:
        raise ExportError(f"--query is not valid JSON: {exc}") from None
    if not isinstance(q, dict):
        raise ExportError("--query must be a JSON object")
    return q


def _retryable(exc: BaseException) -> bool:
    from pymongo.errors import ConnectionFailure, CursorNotFound, OperationFailure

    if isinstance(exc, ConnectionFailure | CursorNotFound):
        return True
    # 43 CursorNotFound, 91 ShutdownInProgress, 189 PrimarySteppedDown, 11600/11602 interrupted at shutdown,
    # 10107/13435 not primary, 6 HostUnreachable, 7 HostNotFound, 89 NetworkTimeout, 9001 SocketException
    codes = {6, 7, 43, 89, 91, 189, 9001, 10107, 11600, 11602, 13435}
    return isinstance(exc, OperationFailure) and exc.code in codes


def export_mongo(
    uri: str,
    db: str,
    collection: str,
    out: str,
    *,
    query: Mapping[str, Any] | None = None,
    text_field: str = "text",
    text_mode: str = "full",
    batch_size: int = 5000,
    restart: bool = False,
    overwrite: bool = False,
    max_retries: int = 5,
    retry_wait: float = 1.0,
    commit_rows: int = 50_000,
    commit_seconds: float = 10.0,
    show_progress: bool = True,
    client_factory: Callable[[], Any] | None = None,
) -> ExportResult:
    """Export ``db.collection`` to ``out`` (see the module docstring); resumes an interrupted export."""
    require_pymongo()
    from bson.codec_options import CodecOptions
    from pymongo import ASCENDING, MongoClient
    from pymongo.errors import PyMongoError

    from tweet_embed.progress import Progress

    if batch_size < 1:
        raise ExportError("--batch-size must be at least 1")
    user_query = dict(query or {})
    source = {
        "kind": "mongo",
        "db": db,
        "collection": collection,
        "text_field": text_field,
        "query": _canonical(user_query),
    }
    tweet_rules = text_field == "text" and text_mode == "full"
    if text_field == "text":
        source["text_mode"] = text_mode  # a resume under the other mode would mix two kinds of text
    writer = ResumableJsonlWriter(
        out,
        source,
        restart=restart,
        overwrite=overwrite,
        commit_rows=commit_rows,
        commit_seconds=commit_seconds,
    )
    with writer:
        writer.position = decode_cursor(writer.cursor)
        if writer.resumed:
            log.info(
                "resuming the export to %s: %d rows already written, after _id %r",
                out,
                writer.rows,
                None if writer.position is MISSING else writer.position,
            )
        client = client_factory() if client_factory else MongoClient(uri, appname="tweet-embed")
        try:
            coll = client[db].get_collection(
                collection, codec_options=CodecOptions(unicode_decode_error_handler="replace")
            )
            total: int | None
            try:
                total = int(coll.estimated_document_count())
            except PyMongoError as exc:
                log.debug("estimated_document_count failed: %s", exc)
                total = None
            log.info(
                "exporting %s.%s (about %s documents%s) to %s",
                db,
                collection,
                "?" if total is None else f"{total:,}",
                ", before --query" if user_query else "",
                out,
            )
            projection = {"_id": 1, text_field: 1}
            if tweet_rules:  # what the tweet text rules read (input.tweets), and nothing more
                projection.update(dict.fromkeys(TWEET_FIELDS, 1))
            failures = 0
            seen = 0
            done_before = writer.rows + sum(writer.skipped.values())
            progress = Progress(total_rows=max(0, (total or 0) - done_before))
            pending_rows = pending_seen = 0
            with progress if show_progress else _NoProgress():
                while True:
                    flt = user_query
                    if writer.position is not MISSING:
                        rf = resume_filter(writer.position)
                        flt = {"$and": [user_query, rf]} if user_query else rf
                    try:
                        cursor = coll.find(flt, projection, sort=[("_id", ASCENDING)], batch_size=batch_size)
                        for doc in cursor:
                            doc_id = doc.get("_id", MISSING)
                            rid = None if doc_id is MISSING else mongo_id_to_str(doc_id)
                            text = tweet_text(doc) if tweet_rules else get_field(doc, text_field)
                            reason = SKIP_INVALID_ID if rid is None else classify_text(text)
                            pos = writer.position if doc_id is MISSING else doc_id
                            if reason is None:
                                writer.write(rid, text, position=pos)  # type: ignore[arg-type]
                                pending_rows += 1
                            else:
                                writer.skip(reason, position=pos)
                            seen += 1
                            pending_seen += 1
                            failures = 0
                            if pending_seen >= 1000:
                                progress.add(pending_rows, pending_seen)
                                pending_rows = pending_seen = 0
                            if writer.due():
                                writer.commit(encode_cursor(writer.position))
                        break
                    except PyMongoError as exc:
                        if not _retryable(exc):
                            raise ExportError(f"MongoDB error: {exc}") from exc
                        failures += 1
                        if failures > max_retries:
                            raise ExportError(
                                f"MongoDB connection failed {failures} times in a row, last: "
                                f"{exc}; re-run the same command to resume"
                            ) from exc
                        writer.commit(encode_cursor(writer.position))
                        wait = min(60.0, retry_wait * 2 ** (failures - 1))
                        log.warning(
                            "MongoDB: %s; resuming after the last _id in %.1fs (try %d of %d)",
                            exc,
                            wait,
                            failures,
                            max_retries,
                        )
                        time.sleep(wait)
                progress.add(pending_rows, pending_seen)
            return writer.finish(
                encode_cursor(writer.position), extra={"documents_read": seen, "estimated_total": total}
            )
        except BaseException:
            writer.commit_quietly(encode_cursor)
            raise
        finally:
            client.close()


def _canonical(query: Mapping[str, Any]) -> str:
    from bson import json_util

    return json_util.dumps(query, json_options=json_util.CANONICAL_JSON_OPTIONS)


class _NoProgress:
    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
