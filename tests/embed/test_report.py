"""``tweet-embed report``: the HTML's figures against the run journal and the plan's estimate (real CLI runs
against real local servers); opened in Debian's chromium, headless, when it is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tweet_embed.embed.report import MissingDependency, write_report
from tweet_embed.embed.telemetry import read_journal
from tweet_embed.testing.server import TEIServer
from tweet_embed.testing.synth import write_jsonl

from conftest import run_cli

DIM = 16


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plan, then a run interrupted after 3 chunks and resumed, against two servers (one flaky)."""
    tmp = tmp_path_factory.mktemp("report")
    src = tmp / "in.jsonl"
    write_jsonl(str(src), 3000, seed=6)
    with src.open("ab") as f:
        f.write(b"{broken\n")
    work = tmp / "w"
    with (
        TEIServer(dim=DIM, capacity=1500, max_client_batch_size=16) as a,
        TEIServer(dim=DIM, capacity=1500, max_client_batch_size=16, p_503=0.1, seed=2) as b,
    ):
        args = [str(src), "--tei-urls", f"{a.embed_url},{b.embed_url}", "--work-dir", str(work),
                "--chunk-size", "500", "--log-interval", "0.5"]  # fmt: skip
        for cmd in (
            ["plan", *args, "--calibrate", "1"],
            ["embed", *args, "--max-chunks", "3"],
            ["embed", *args],
        ):
            r = run_cli(*cmd)
            assert r.returncode == 0, r.stderr
    return work


def report_of(html_text: str) -> dict:
    m = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', html_text, re.S)
    assert m
    return orjson.loads(m.group(1).replace("<\\/", "</"))


def test_report_numbers_match_the_journal(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.html"
    r = run_cli("report", "--work-dir", str(run_dir), "--out", str(out))
    assert r.returncode == 0, r.stderr
    page = out.read_text()
    d = report_of(page)
    events = read_journal(str(run_dir / "progress"))
    ends = [e for e in events if e["event"] == "end"]
    intervals = [e for e in events if e["event"] == "interval"]
    assert len(d["runs"]) == 2 == len(ends) and all(x["ended"] for x in d["runs"])
    assert d["rows"] == sum(e["rows"] for e in ends) == 3000
    assert d["texts_sent"] == sum(e["texts_sent"] for e in ends)
    assert d["rejects"] == {"malformed JSON": 1}
    assert d["chunks_timed"] == d["chunks_total"] == 7
    assert sorted(d["chunk_seconds"]) == sorted(c for e in intervals for c in e["chunk_seconds"])
    estimate = orjson.loads((run_dir / "progress" / "estimate.json").read_bytes())
    assert d["estimate"]["estimated_seconds"] == estimate["estimated_seconds"] > 0
    assert set(d["throughput"]) == set(intervals[-1]["endpoints"]) and len(d["throughput"]) == 2
    last_of_run = {e["run"]: e for e in intervals}  # each run's last line holds its cumulative retries
    retries = sum(sum(e["retries"].values()) for e in last_of_run.values())
    assert sum(y for _, y in d["retries"]) == retries > 0  # the flaky server's 503s, per interval
    # Self-contained: images inline, nothing fetched when the page opens.
    assert page.count('src="data:image/png;base64,') >= 4
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert f"{3000:,}" in page
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_opens_in_a_real_browser(run_dir: Path, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    out = tmp_path / "r.html"
    write_report(str(run_dir / "progress"), str(out))
    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--screenshot={shot}",
            "--window-size=1100,1400",
            out.as_uri(),
        ],  # fmt: skip
        capture_output=True,
        timeout=120,
        check=False,
    )
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    colors = img.getcolors(maxcolors=1 << 20)
    assert img.size == (1100, 1400) and colors is not None and len(colors) > 50  # text and charts drawn


def test_report_without_matplotlib_says_how_to_get_it(run_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependency, match=r"pip install 'tweet-embed\[report\]'"):
        write_report(str(run_dir / "progress"), str(tmp_path / "r.html"))


def test_report_without_a_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no run journal"):
        write_report(str(tmp_path / "none"), str(tmp_path / "r.html"))


def test_report_by_device_of_the_in_process_model(tmp_path: Path) -> None:
    """A run of the in-process model (a ``random:`` shape on CPU, the real CLI): throughput stacked by device
    and the device's busy share, both the journal's own figures."""
    src = tmp_path / "in.jsonl"
    write_jsonl(str(src), 1500, seed=11)
    work = tmp_path / "w"
    r = run_cli("embed", str(src), "--model", "random:L2-H64", "--device", "cpu", "--runtime", "torch",
                "--work-dir", str(work), "--chunk-size", "300", "--log-interval", "0.3")  # fmt: skip
    assert r.returncode == 0, r.stderr
    d = write_report(str(work / "progress"), str(tmp_path / "r.html"))
    intervals = [e for e in read_journal(str(work / "progress")) if e["event"] == "interval"]
    assert set(d["throughput"]) == set(d["device_busy"]) == {"cpu"}
    assert [y for _, y in d["throughput"]["cpu"]] == [e["devices"]["cpu"]["docs_per_s"] for e in intervals]
    assert [y for _, y in d["device_busy"]["cpu"]] == [e["devices"]["cpu"]["busy"] for e in intervals]
    assert sum(e["devices"]["cpu"]["docs_per_s"] for e in intervals) > 0
    assert 'alt="device_busy"' in (tmp_path / "r.html").read_text()
