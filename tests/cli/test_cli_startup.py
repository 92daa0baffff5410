"""The CLI starts quickly: parsing arguments and printing help imports none of the heavy libraries."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("numpy", "pyarrow", "torch", "aiohttp", "duckdb", "orjson", "pymongo", "ray", "httptools")

PROBE = """
import sys
from tweet_embed.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("HEAVY:" + ",".join(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["embed", "--help"],
        ["consolidate", "--help"],
        ["export", "mongo", "--help"],
        ["status", "--help"],
    ],
)
def test_help_imports_no_heavy_library(argv: list[str]) -> None:
    r = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "usage:" in r.stdout
    loaded = r.stdout.rsplit("HEAVY:", 1)[1].strip()
    assert loaded == "", f"imported at start-up: {loaded}"


def test_library_entry_point_still_importable() -> None:
    import tweet_embed

    assert callable(tweet_embed.embed_multi)
    with pytest.raises(AttributeError):
        _ = tweet_embed.no_such_name  # type: ignore[attr-defined]
