"""The on-disk layout of a consolidation: file names, the manifest, sizes, and the DuckDB connection every
reader of the shards (consolidate, verify, search) opens the same way.

Shared by ``merge`` (which writes the layout) and ``verify`` / ``search`` (which read it), so that neither
reader imports the writer.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

FORMAT = "tweet-embed-consolidated/1"
OUTPUT_PREFIX = "embeddings-"
OUTPUT_RE = re.compile(r"^embeddings-\d{5,}\.parquet$")
SHARD_RE = re.compile(r"^part-.*\.parquet$")
MANIFEST = "_manifest.json"
STAGING = ".consolidate"
LOCK = ".consolidate.lock"
PROGRESS = "progress.json"
DROPS = "drops.parquet"

MIB = 1 << 20
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
    "ki": 1 << 10,
    "mi": 1 << 20,
    "gi": 1 << 30,
    "ti": 1 << 40,
}


class ConsolidateError(Exception):
    """Consolidation cannot start or cannot finish (clear message for the user, exit code 1)."""


def parse_size(text: str | int) -> int:
    """``"2GB"`` → 2·10⁹, ``"128MiB"`` → 128·2²⁰, ``"5000000"`` → 5000000."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(text)
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 2GB, 512MB, 128MiB, 1000000)")
    value = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def list_shards(shards_dir: str) -> list[str]:
    """Shard file paths in name order (= input order); hidden/temporary and non-shard files are ignored."""
    if not os.path.isdir(shards_dir):
        return []
    names = sorted(n for n in os.listdir(shards_dir) if SHARD_RE.match(n) and not n.startswith("."))
    return [os.path.join(shards_dir, n) for n in names]


def duckdb_connect(
    temp_dir: str | None,
    memory_limit: str = "1GB",
    threads: int | None = None,  # type: ignore[no-untyped-def]
    path: str = ":memory:",
):
    """A DuckDB connection that spills to ``temp_dir`` instead of growing past ``memory_limit``."""
    import duckdb

    if temp_dir:
        os.makedirs(temp_dir, exist_ok=True)
    if path != ":memory:":
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    con = duckdb.connect(path)
    con.execute(f"SET memory_limit='{memory_limit}'")
    if temp_dir:
        con.execute(f"SET temp_directory='{_sql_str(temp_dir)}'")
    con.execute("SET preserve_insertion_order=false")
    con.execute(f"SET threads={int(threads or os.cpu_count() or 1)}")
    return con


def _sql_str(s: str) -> str:
    return s.replace("'", "''")


def sql_list(paths: Sequence[str]) -> str:
    return "[" + ", ".join(f"'{_sql_str(p)}'" for p in paths) + "]"


def _read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read())  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None
    except ValueError:
        return None  # torn/garbage file: treat as absent (manifest/progress are written atomically)


def read_manifest(out_dir: str) -> dict[str, Any] | None:
    m = _read_json(os.path.join(out_dir, MANIFEST))
    return m if m and m.get("format") == FORMAT else None
