"""``export mongo``: the exporter's conversation with a MongoDB server, through MongoDB's own ``mockupdb``.

mockupdb is a wire-protocol server driven by the test: the real pymongo driver sends real OP_MSG ``find`` /
``getMore`` commands over a loopback socket, and each test asserts what was sent and chooses the reply
(batches, errors, a hang-up). What it cannot show is a real server's query engine (filter semantics, sort,
type bracketing): that is :func:`test_real_server_export_and_resume`, which runs against a real server when
``TWEET_EMBED_TEST_MONGO_URI`` is set (see docs/export-and-load.md).
"""

from __future__ import annotations

import os
import sys
import uuid
from typing import Any

import orjson
import pytest

pymongo = pytest.importorskip("pymongo", reason="pymongo is not installed (pip install 'tweet-embed[mongo]')")
mockupdb = pytest.importorskip("mockupdb", reason="mockupdb is not installed (pip install mockupdb)")

from bson import Binary, Int64, MaxKey, MinKey, ObjectId  # noqa: E402
from mockupdb import MockupDB, OpMsg, go  # noqa: E402

from tweet_embed.export import ExportError  # noqa: E402
from tweet_embed.export import mongo as M  # noqa: E402
from tweet_embed.export.jsonl_writer import partial_path, state_path  # noqa: E402

from conftest import read_jsonl  # noqa: E402

OIDS = [ObjectId(f"65a0000000000000000000{i:02x}") for i in range(1, 11)]
# BSON's comparison order: the types that sort after every number (what a resume after a number _id reads)
AFTER_A_NUMBER = [
    "symbol",
    "string",
    "object",
    "binData",
    "objectId",
    "bool",
    "date",
    "timestamp",
    "regex",
    "maxKey",
]


@pytest.fixture
def server():
    s = MockupDB(auto_ismaster={"maxWireVersion": 21, "minWireVersion": 0}, request_timeout=20)
    s.autoresponds("endSessions")
    s.autoresponds("killCursors", cursorsKilled=[])
    s.run()
    yield s
    s.stop()


def client_for(server: MockupDB):  # type: ignore[no-untyped-def]
    return lambda: pymongo.MongoClient(server.uri, serverSelectionTimeoutMS=5000, connectTimeoutMS=5000)


def reply_count(server: MockupDB, n: int) -> None:
    req = server.receives(OpMsg("count", "tweets"))
    req.ok(n=n)


def receive_find(server: MockupDB):  # type: ignore[no-untyped-def]
    req = server.receives()
    assert req.doc.get("find") == "tweets", req.doc
    return req


def first_batch(docs: list[dict[str, Any]], cursor_id: int) -> dict[str, Any]:
    return {"cursor": {"id": Int64(cursor_id), "ns": "db.tweets", "firstBatch": docs}, "ok": 1}


def next_batch(docs: list[dict[str, Any]], cursor_id: int) -> dict[str, Any]:
    return {"cursor": {"id": Int64(cursor_id), "ns": "db.tweets", "nextBatch": docs}, "ok": 1}


def run_export(server: MockupDB, out: str, **kw: Any):  # type: ignore[no-untyped-def]
    kw.setdefault("show_progress", False)
    kw.setdefault("retry_wait", 0.0)
    return go(M.export_mongo, server.uri, "db", "tweets", out, client_factory=client_for(server), **kw)


def export_then_hang_up(
    server: MockupDB, out: str, count: int, docs: list[dict[str, Any]], match: str | None = None, **kw: Any
) -> None:
    """An export whose connection drops after its first batch (``docs``), run with ``max_retries=0``: it
    fails with an ExportError (matching ``match``), leaving what it committed for the next run."""
    future = run_export(server, out, max_retries=0, **kw)
    reply_count(server, count)
    receive_find(server).reply(first_batch(docs, 9))
    server.receives(OpMsg("getMore", 9)).hangup()
    with pytest.raises(ExportError, match=match):
        future()


def test_find_projection_sort_batch_size_and_getmore(server, tmp_path):
    out = str(tmp_path / "tweets.jsonl")
    future = run_export(server, out, batch_size=3)
    reply_count(server, 7)
    find = receive_find(server)
    assert find.doc["filter"] == {}
    # the default text field also reads what the tweet text rules need (test_raw_tweet_documents_...)
    assert dict(find.doc["projection"]) == {"_id": 1, "text": 1, **dict.fromkeys(M.TWEET_FIELDS, 1)}
    assert dict(find.doc["sort"]) == {"_id": 1}
    assert find.doc["batchSize"] == 3
    find.reply(
        first_batch(
            [
                {"_id": OIDS[0], "text": "hello"},
                {"_id": 42, "text": "an int id"},
                {"_id": OIDS[1]},  # text missing
            ],
            777,
        )
    )
    more = server.receives(OpMsg("getMore", 777))
    assert more.doc["collection"] == "tweets" and more.doc["batchSize"] == 3
    more.reply(
        next_batch(
            [
                {"_id": OIDS[2], "text": 12},  # not a string
                {"_id": OIDS[3], "text": None},
                {"_id": OIDS[4], "text": ""},
            ],
            777,
        )
    )
    more = server.receives(OpMsg("getMore", 777))
    more.reply(next_batch([{"_id": "s-1", "text": "a string id \u00e9\U0001f600"}], 0))
    result = future()
    assert read_jsonl(out) == [
        {"_id": str(OIDS[0]), "text": "hello"},
        {"_id": "42", "text": "an int id"},
        {"_id": "s-1", "text": "a string id \u00e9\U0001f600"},
    ]
    assert result.rows == 3
    assert result.skipped == {M.SKIP_TEXT_MISSING: 2, M.SKIP_TEXT_NOT_STRING: 1, M.SKIP_TEXT_EMPTY: 1}
    assert not os.path.exists(partial_path(out)) and not os.path.exists(state_path(out))


def test_custom_text_field_and_query_are_sent(server, tmp_path):
    out = str(tmp_path / "t.jsonl.zst")
    future = run_export(server, out, query=M.parse_query('{"lang": "en"}'), text_field="full_text")
    reply_count(server, 1)
    find = receive_find(server)
    assert find.doc["filter"] == {"lang": "en"}
    assert dict(find.doc["projection"]) == {"_id": 1, "full_text": 1}
    find.reply(first_batch([{"_id": OIDS[0], "full_text": "x"}, {"_id": OIDS[1], "text": "wrong field"}], 0))
    result = future()
    assert read_jsonl(out) == [{"_id": str(OIDS[0]), "text": "x"}]
    assert result.skipped == {M.SKIP_TEXT_MISSING: 1}


@pytest.mark.parametrize("mode", ["full", "raw"])
def test_raw_tweet_documents_get_the_tweet_text_rules(server, tmp_path, mode):
    """A collection of raw v1.1 tweet documents (as the API sent them, _id added by MongoDB): the whole text of
    a long tweet and of a retweet, entities unescaped; --text-mode raw keeps the stored text field."""
    from tweet_objects import LONG, V1_RETWEET, V1_SHORT, V1_TRUNCATED, V2_NOTE

    out = str(tmp_path / "t.jsonl")
    future = run_export(server, out, text_mode=mode)
    reply_count(server, 5)
    find = receive_find(server)
    expected = (
        {"_id": 1, "text": 1, **dict.fromkeys(M.TWEET_FIELDS, 1)} if mode == "full" else {"_id": 1, "text": 1}
    )
    assert dict(find.doc["projection"]) == expected
    docs = [{"_id": OIDS[k], **t} for k, t in enumerate([V1_SHORT, V1_TRUNCATED, V1_RETWEET, V2_NOTE])]
    docs.append({"_id": OIDS[4], "text": "a plain &amp; document"})
    find.reply(first_batch(docs, 0))
    future()
    texts = [r["text"] for r in read_jsonl(out)]
    if mode == "full":
        assert texts == [
            "Fish & chips <3 >_< and &amp; literally",
            LONG,
            "RT @bob: " + LONG + " & more",
            LONG + " <fin>",
            "a plain &amp; document",  # not a tweet object: its text as stored
        ]
    else:
        assert texts == [d["text"] for d in docs]


def test_dropped_connection_mid_export_resumes_after_last_id(server, tmp_path):
    out = str(tmp_path / "tweets.jsonl.gz")
    future = run_export(server, out, batch_size=2)
    reply_count(server, 4)
    receive_find(server).reply(
        first_batch([{"_id": OIDS[0], "text": "a"}, {"_id": OIDS[1], "text": "b"}], 55)
    )
    server.receives(OpMsg("getMore", 55)).hangup()  # the connection drops mid-export
    again = receive_find(server)
    # the new find starts after the last _id written, in BSON order (ObjectId and every type sorting after it)
    assert again.doc["filter"] == {
        "$or": [
            {"_id": {"$gt": OIDS[1]}},
            {"_id": {"$type": ["bool", "date", "timestamp", "regex", "maxKey"]}},
        ]
    }
    assert dict(again.doc["sort"]) == {"_id": 1} and again.doc["batchSize"] == 2
    again.reply(first_batch([{"_id": OIDS[2], "text": "c"}, {"_id": OIDS[3], "text": "d"}], 0))
    result = future()
    assert [r["text"] for r in read_jsonl(out)] == ["a", "b", "c", "d"]
    assert result.rows == 4


def test_interrupted_export_resumes_in_a_new_run_with_the_query(server, tmp_path):
    out = str(tmp_path / "tweets.jsonl")
    query = M.parse_query('{"lang": "en"}')
    docs = [{"_id": 1, "text": "a"}, {"_id": 2, "text": "b"}]
    export_then_hang_up(
        server, out, 5, docs, match="re-run the same command to resume", query=query, batch_size=2
    )
    assert not os.path.exists(out)
    assert read_jsonl(partial_path(out)) == [{"_id": "1", "text": "a"}, {"_id": "2", "text": "b"}]
    state = orjson.loads(open(state_path(out), "rb").read())
    assert state["rows"] == 2

    future = run_export(server, out, query=query, batch_size=2)
    reply_count(server, 5)
    find = receive_find(server)
    assert find.doc["filter"] == {
        "$and": [
            {"lang": "en"},
            {
                "$or": [
                    {"_id": {"$gt": 2}},
                    {"_id": {"$type": AFTER_A_NUMBER}},
                ]
            },
        ]
    }
    find.reply(first_batch([{"_id": 3, "text": "c"}, {"_id": "z", "text": "d"}], 0))
    result = future()
    assert result.resumed and result.rows == 4
    assert read_jsonl(out) == [
        {"_id": "1", "text": "a"},
        {"_id": "2", "text": "b"},
        {"_id": "3", "text": "c"},
        {"_id": "z", "text": "d"},
    ]


def test_commit_then_crash_never_leaves_a_partial_line(server, tmp_path):
    """Rows written after the last commit are cut off on resume; the source restarts at the commit."""
    out = str(tmp_path / "tweets.jsonl")
    export_then_hang_up(
        server, out, 3, [{"_id": 1, "text": "a"}, {"_id": 2, "text": "b"}], batch_size=2, commit_rows=2
    )
    with open(partial_path(out), "ab") as fh:  # what a crash half-way through a line leaves behind
        fh.write(b'{"_id":"3","te')
    future = run_export(server, out, batch_size=2)
    reply_count(server, 3)
    find = receive_find(server)
    assert find.doc["filter"]["$or"][0] == {"_id": {"$gt": 2}}
    find.reply(first_batch([{"_id": 3, "text": "c"}], 0))
    future()
    assert [r["_id"] for r in read_jsonl(out)] == ["1", "2", "3"]


def test_non_retryable_error_is_reported(server, tmp_path):
    out = str(tmp_path / "tweets.jsonl")
    future = run_export(server, out)
    reply_count(server, 3)
    receive_find(server).command_err(code=13, errmsg="not authorized on db to execute command find")
    with pytest.raises(ExportError, match="not authorized"):
        future()


def test_resume_with_other_options_is_refused(server, tmp_path):
    out = str(tmp_path / "tweets.jsonl")
    export_then_hang_up(server, out, 3, [{"_id": 1, "text": "a"}])
    with pytest.raises(ExportError, match="other options"):
        M.export_mongo(
            server.uri,
            "db",
            "tweets",
            out,
            text_field="other",
            client_factory=client_for(server),
            show_progress=False,
        )


def test_existing_output_is_not_overwritten(tmp_path):
    out = tmp_path / "tweets.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(ExportError, match="already exists"):
        M.export_mongo("mongodb://127.0.0.1:1", "db", "c", str(out), show_progress=False)
    assert out.read_text() == "keep me\n"


@pytest.mark.parametrize(
    ("last", "expected_later"),
    [
        (5, AFTER_A_NUMBER),
        ("abc", ["object", "binData", "objectId", "bool", "date", "timestamp", "regex", "maxKey"]),
        (MinKey(), ["null", "double", "int", "long", "decimal", *AFTER_A_NUMBER]),
    ],
)
def test_resume_filter_covers_every_type_that_sorts_later(last, expected_later):
    assert M.resume_filter(last) == {"$or": [{"_id": {"$gt": last}}, {"_id": {"$type": expected_later}}]}


def test_resume_filter_for_the_last_type_is_a_plain_gt():
    assert M.resume_filter(MaxKey()) == {"_id": {"$gt": MaxKey()}}


def test_cursor_round_trip_keeps_the_bson_type():
    for value in (OIDS[0], Int64(2**40), 7, "7", 1.5, Binary.from_uuid(uuid.UUID(int=5)), MinKey()):
        back = M.decode_cursor(M.encode_cursor(value))
        assert back == value and type(back) is type(value)


def test_id_conversion():
    assert M.mongo_id_to_str(OIDS[0]) == "65a000000000000000000001"
    assert M.mongo_id_to_str(Int64(1234567890123)) == "1234567890123"
    assert M.mongo_id_to_str(3.0) == "3"
    assert (
        M.mongo_id_to_str("") is None and M.mongo_id_to_str(None) is None and M.mongo_id_to_str(True) is None
    )
    assert M.mongo_id_to_str(Binary.from_uuid(uuid.UUID(int=5))) == "00000000-0000-0000-0000-000000000005"
    assert M.mongo_id_to_str({"a": 1}) == '{"a": {"$numberInt": "1"}}'


def test_dotted_text_field():
    assert M.get_field({"user": {"text": "x"}}, "user.text") == "x"
    assert M.get_field({"user": "x"}, "user.text") is M.MISSING


def test_missing_pymongo_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pymongo", None)
    with pytest.raises(ExportError, match=r"tweet-embed\[mongo\]"):
        M.export_mongo("mongodb://x", "db", "c", str(tmp_path / "o.jsonl"))


# --- a real server, when one is given --------------------------------------------------------------------

REAL_URI = os.environ.get("TWEET_EMBED_TEST_MONGO_URI")


@pytest.mark.skipif(not REAL_URI, reason="set TWEET_EMBED_TEST_MONGO_URI=mongodb://... to test a real server")
def test_real_server_export_and_resume(tmp_path, monkeypatch):
    """Mixed _id types, a query, an interruption after a commit, a resume: every matching row exactly once."""
    client = pymongo.MongoClient(REAL_URI, serverSelectionTimeoutMS=10000)
    dbname = f"tweet_embed_test_{uuid.uuid4().hex[:8]}"
    coll = client[dbname]["tweets"]
    docs: list[dict[str, Any]] = [{"_id": i, "text": f"int {i}", "lang": "en"} for i in range(50)]
    docs += [{"_id": f"s{i:03d}", "text": f"str {i}", "lang": "en"} for i in range(50)]
    docs += [{"_id": ObjectId(), "text": f"oid {i}", "lang": "en" if i % 2 else "fr"} for i in range(50)]
    docs += [{"_id": ObjectId(), "lang": "en"}, {"_id": ObjectId(), "text": 5, "lang": "en"}]
    coll.insert_many(docs)
    try:
        out = str(tmp_path / "real.jsonl.gz")
        expected = sorted(
            str(d["_id"]) for d in docs if d.get("lang") == "en" and isinstance(d.get("text"), str)
        )
        calls = {"n": 0}
        real_write = M.ResumableJsonlWriter.write

        def flaky_write(self, rid, text, position=None):  # type: ignore[no-untyped-def]
            calls["n"] += 1
            if calls["n"] == 71:  # half-way between two commits (commit_rows=20)
                raise KeyboardInterrupt
            return real_write(self, rid, text, position)

        def export() -> M.ExportResult:
            return M.export_mongo(
                REAL_URI,
                dbname,
                "tweets",
                out,
                query={"lang": "en"},
                batch_size=7,
                commit_rows=20,
                show_progress=False,
            )

        monkeypatch.setattr(M.ResumableJsonlWriter, "write", flaky_write)
        with pytest.raises(KeyboardInterrupt):
            export()
        monkeypatch.setattr(M.ResumableJsonlWriter, "write", real_write)
        result = export()
        got = [r["_id"] for r in read_jsonl(out)]
        assert sorted(got) == expected and len(got) == len(set(got))
        assert result.resumed and result.skipped == {M.SKIP_TEXT_MISSING: 1, M.SKIP_TEXT_NOT_STRING: 1}
    finally:
        client.drop_database(dbname)
        client.close()


# --- the command line ------------------------------------------------------------------------------------


def test_cli_export_mongo(server, tmp_path, capsys):
    from tweet_embed import cli

    out = str(tmp_path / "cli.jsonl.gz")
    seen: dict[str, Any] = {}

    def respond() -> None:  # the server side runs in a thread: cli.main installs a signal handler
        reply_count(server, 2)
        find = receive_find(server)
        seen.update(find.doc)
        find.reply(first_batch([{"_id": OIDS[0], "text": "a"}, {"_id": OIDS[1], "text": 3}], 0))

    responder = go(respond)
    code = cli.main(
        [
            "export",
            "mongo",
            "--uri",
            server.uri + "/?serverSelectionTimeoutMS=5000",
            "--db",
            "db",
            "--collection",
            "tweets",
            "--query",
            '{"lang": "en"}',
            "--batch-size",
            "10",
            "--out",
            out,
        ]
    )
    responder()
    assert code == 0
    assert seen["filter"] == {"lang": "en"} and seen["batchSize"] == 10
    assert read_jsonl(out) == [{"_id": str(OIDS[0]), "text": "a"}]
    printed = capsys.readouterr().out
    assert "wrote 1 rows" in printed and "text not a string: 1" in printed


def test_cli_missing_pymongo_says_which_extra(monkeypatch, tmp_path, caplog):
    from tweet_embed import cli

    monkeypatch.setitem(sys.modules, "pymongo", None)
    code = cli.main(["export", "mongo", "--db", "d", "--collection", "c", "--out", str(tmp_path / "o.jsonl")])
    assert code == 2


def test_cli_bad_query_json(tmp_path):
    from tweet_embed import cli

    assert (
        cli.main(
            [
                "export",
                "mongo",
                "--db",
                "d",
                "--collection",
                "c",
                "--query",
                "{lang: en",
                "--out",
                str(tmp_path / "o.jsonl"),
            ]
        )
        == 1
    )
