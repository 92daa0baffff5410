"""The resumable export writer: commit points, truncation on resume, compressed output that ``embed`` reads."""

from __future__ import annotations

import os

import orjson
import pytest

from tweet_embed.export.jsonl_writer import (
    ExportError,
    ResumableJsonlWriter,
    partial_path,
    state_path,
)
from tweet_embed.input.records import iter_records

SOURCE = {"kind": "test", "table": "t"}


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_interrupted_writes_resume_to_a_file_embed_reads(tmp_path, suffix):
    out = str(tmp_path / f"o{suffix}")
    w = ResumableJsonlWriter(out, SOURCE, commit_rows=3)
    for i in range(10):
        w.write(str(i), f"text {i} \u00e9", position=i)
        if w.due():
            w.commit({"last": w.position})
    # rows 9 is uncommitted; a crash now also leaves a torn tail
    w.close()
    with open(partial_path(out), "ab") as fh:
        fh.write(b'{"_id": "torn')
    w = ResumableJsonlWriter(out, SOURCE, commit_rows=3)
    assert w.resumed and w.rows == 9 and w.cursor == {"last": 8}
    for i in range(9, 20):
        w.write(str(i), f"text {i} \u00e9", position=i)
        if w.due():
            w.commit({"last": w.position})
    result = w.finish({"last": 19})
    assert result.rows == 20 and result.resumed
    assert list(iter_records(out)) == [(str(i), f"text {i} \u00e9") for i in range(20)]
    assert not os.path.exists(partial_path(out)) and not os.path.exists(state_path(out))


def test_many_frames_are_read_whole(tmp_path):
    """Each commit closes a gzip member / zstd frame; the reader must go across all of them."""
    for suffix in (".gz", ".zst"):
        out = str(tmp_path / f"m.jsonl{suffix}")
        w = ResumableJsonlWriter(out, SOURCE, commit_rows=1)
        for i in range(60):
            w.write(str(i), "x" * 50)
            w.commit(i)
        w.finish(60)
        assert [rid for rid, _ in iter_records(out)] == [str(i) for i in range(60)]


def test_existing_output_and_other_source(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text("old\n")
    with pytest.raises(ExportError, match="already exists"):
        ResumableJsonlWriter(str(out), SOURCE)
    w = ResumableJsonlWriter(str(out), SOURCE, overwrite=True)
    w.write("1", "a")
    w.commit(1)
    w.close()
    assert out.read_text() == "old\n"  # untouched until finish
    with pytest.raises(ExportError, match="other options"):
        ResumableJsonlWriter(str(out), {"kind": "test", "table": "other"})
    w = ResumableJsonlWriter(str(out), {"kind": "test", "table": "other"}, restart=True, overwrite=True)
    assert not w.resumed and w.rows == 0
    w.finish(None)
    assert out.read_text() == ""


def test_a_failed_write_blocks_later_commits(tmp_path):
    out = str(tmp_path / "o.jsonl")
    w = ResumableJsonlWriter(out, SOURCE)
    w.write("1", "a", position=1)
    w.commit(1)

    class Boom:
        def compress(self, data: bytes) -> bytes:
            raise KeyboardInterrupt

        def end(self) -> bytes:
            return b""

    w._codec = Boom()  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        w.write("2", "b", position=2)
    assert w.busy
    assert w.commit_quietly(lambda pos: pos) is False
    with pytest.raises(ExportError):
        w.commit(2)
    w.close()
    state = orjson.loads(open(state_path(out), "rb").read())
    assert state["cursor"] == 1 and state["rows"] == 1


def test_crash_between_rename_and_state_removal(tmp_path):
    out = str(tmp_path / "o.jsonl")
    w = ResumableJsonlWriter(out, SOURCE)
    w.write("1", "a")
    w.commit(1)
    state = open(state_path(out), "rb").read()
    w.finish(1)
    with open(state_path(out), "wb") as fh:  # as if the state file had not been removed
        fh.write(state)
    with pytest.raises(ExportError, match="already complete"):
        ResumableJsonlWriter(out, SOURCE)
    assert not os.path.exists(state_path(out))
    assert list(iter_records(out)) == [("1", "a")]


def test_lone_surrogates_are_replaced(tmp_path):
    out = str(tmp_path / "s.jsonl")
    w = ResumableJsonlWriter(out, SOURCE)
    w.write("1", "bad \ud800 text")
    w.finish(None)
    assert list(iter_records(out)) == [("1", "bad \ufffd text")]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
def test_resume_cuts_the_uncommitted_tail_even_if_nothing_follows(tmp_path, suffix):
    out = str(tmp_path / f"t{suffix}")
    w = ResumableJsonlWriter(out, SOURCE)
    w.write("1", "a")
    w.commit(1)
    w.write("2", "uncommitted")
    w.close()
    with open(partial_path(out), "ab") as fh:
        fh.write(b'{"_id": "torn')
    w = ResumableJsonlWriter(out, SOURCE)
    assert w.rows == 1
    w.finish(1)
    assert list(iter_records(out)) == [("1", "a")]
