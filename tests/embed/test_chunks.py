from __future__ import annotations

import gzip
import os
import subprocess
import sys

import pytest
import zstandard

from tweet_embed.embed import chunks as ch
from tweet_embed.embed.chunks import (
    PlanError,
    WorkDirs,
    WorkLock,
    check_manifest,
    iter_chunk_bytes,
    make_plan,
)


def write(path, data: bytes) -> str:
    p = str(path)
    if p.endswith(".gz"):
        with gzip.open(p, "wb") as fh:
            fh.write(data)
    elif p.endswith(".zst"):
        with open(p, "wb") as fh:
            fh.write(zstandard.ZstdCompressor().compress(data))
    else:
        with open(p, "wb") as fh:
            fh.write(data)
    return p


def lines_blob(n: int, final_newline: bool = True) -> bytes:
    body = b"\n".join(b'{"_id":"%d","text":"t%d"}' % (i, i) for i in range(n))
    return body + (b"\n" if final_newline else b"")


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
@pytest.mark.parametrize(
    ("n", "size", "final"),
    [(0, 3, True), (1, 3, False), (9, 3, True), (10, 3, False), (10, 3, True), (1000, 7, True)],
)
def test_plan_covers_every_line_once(tmp_path, suffix, n, size, final) -> None:
    data = lines_blob(n, final) if n else b""
    p = write(tmp_path / f"in{suffix}", data)
    plan = make_plan([p], size)
    assert sum(c.n_lines for c in plan.chunks) == n
    assert plan.files[0].lines == n
    joined = b"".join(d for _, d in iter_chunk_bytes(plan, plan.chunks))
    assert joined == data
    line = 1
    for c in plan.chunks:
        assert c.first_line == line
        line += c.n_lines
        assert c.n_lines == size or c is plan.chunks[-1]


def test_plan_small_scan_blocks(tmp_path, monkeypatch) -> None:
    """Boundaries that fall across read blocks are found exactly."""
    monkeypatch.setattr(ch, "_SCAN_BLOCK", 7)
    data = lines_blob(50)
    p = write(tmp_path / "a.jsonl", data)
    plan = make_plan([p], 4)
    parts = [d for _, d in iter_chunk_bytes(plan, plan.chunks)]
    assert b"".join(parts) == data
    assert all(d.count(b"\n") == 4 for d in parts[:-1])


def test_plan_is_deterministic_and_reads_subsets(tmp_path) -> None:
    p = write(tmp_path / "a.jsonl.gz", lines_blob(100))
    a, b = make_plan([p], 10), make_plan([p], 10)
    assert a.chunks == b.chunks
    wanted = [a.chunks[3], a.chunks[7]]
    got = list(iter_chunk_bytes(a, wanted))
    assert [c for c, _ in got] == wanted
    assert got[0][1].split(b"\n")[0] == b'{"_id":"30","text":"t30"}'


def test_damaged_gzip_keeps_chunks_before_damage(tmp_path) -> None:
    p = tmp_path / "bad.jsonl.gz"
    good = gzip.compress(lines_blob(5000))
    p.write_bytes(good[: len(good) // 2])
    plan = make_plan([str(p)], 100)
    f = plan.files[0]
    assert f.damaged and "bad.jsonl.gz" in f.damaged
    assert 0 < len(plan.chunks) < 50
    for c, data in iter_chunk_bytes(plan, plan.chunks):
        assert data.count(b"\n") == c.n_lines


def test_fingerprint_changes_with_content(tmp_path) -> None:
    p = write(tmp_path / "a.jsonl", lines_blob(100))
    f1 = ch.describe_input(p).fingerprint
    data = bytearray(open(p, "rb").read())
    data[-5] ^= 1
    open(p, "wb").write(bytes(data))
    assert ch.describe_input(p).fingerprint != f1


def test_changed_input_is_refused(tmp_path) -> None:
    p = write(tmp_path / "a.jsonl", lines_blob(30))
    dirs = WorkDirs.from_options(str(tmp_path / "w"), None, None, None)
    dirs.create()
    plan, reused = ch.load_or_create_plan(dirs, [p], 10)
    assert not reused
    plan2, reused2 = ch.load_or_create_plan(dirs, [p], 10)
    assert reused2 and plan2.chunks == plan.chunks
    write(tmp_path / "a.jsonl", lines_blob(31))
    with pytest.raises(PlanError, match="different input"):
        ch.load_or_create_plan(dirs, [p], 10)


def test_manifest_mismatch_names_the_difference(tmp_path) -> None:
    dirs = WorkDirs.from_options(str(tmp_path / "w"), None, None, None)
    dirs.create()
    check_manifest(dirs, {"model": "a", "dim": 3})
    check_manifest(dirs, {"model": "a", "dim": 3})
    with pytest.raises(PlanError, match="model: was 'a', now 'b'"):
        check_manifest(dirs, {"model": "b", "dim": 3})


def test_input_given_twice_or_missing(tmp_path) -> None:
    p = write(tmp_path / "a.jsonl", lines_blob(3))
    with pytest.raises(ch.InputError, match="twice"):
        make_plan([p, p], 10)
    with pytest.raises(ch.InputError, match="not found"):
        make_plan([str(tmp_path / "missing.jsonl")], 10)


def test_lock_is_exclusive_across_processes(tmp_path) -> None:
    d = str(tmp_path / "progress")
    with WorkLock(d):
        code = (
            "import sys; from tweet_embed.embed.chunks import WorkLock, PlanError\n"
            f"try:\n    WorkLock({d!r}).acquire()\nexcept PlanError as e:\n    print(e); sys.exit(3)\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 3
        assert "already running" in r.stdout and str(os.getpid()) in r.stdout
    WorkLock(d).acquire()  # released


def test_clean_tmp_removes_only_staging_files(tmp_path) -> None:
    dirs = WorkDirs(str(tmp_path / "t"), str(tmp_path / "p"), str(tmp_path / "s"))
    dirs.create()
    (tmp_path / "t" / ".part-0000-0000001.123.parquet").write_bytes(b"x")
    (tmp_path / "s" / ".part-0000-0000001.parquet.9.partial").write_bytes(b"x")
    (tmp_path / "s" / "part-0000-0000001.parquet").write_bytes(b"keep")
    (tmp_path / "t" / "user-file.txt").write_bytes(b"keep")
    assert dirs.clean_tmp() == 2
    assert sorted(os.listdir(tmp_path / "s")) == ["part-0000-0000001.parquet"]
    assert os.listdir(tmp_path / "t") == ["user-file.txt"]
