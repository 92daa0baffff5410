"""What a run of ``embed`` is asked to do (EmbedOptions) and what it reports at the end (Summary).

Kept apart from the runner so that the engines (devices, Ray), which the runner calls, can take both without
importing the runner back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tweet_embed.backends.base import BackendInfo
from tweet_embed.backends.vectors import VECTOR_KEYS
from tweet_embed.embed.chunks import DEFAULT_CHUNK_LINES, WorkDirs
from tweet_embed.input.rules import DEFAULT_RULES, Rules


@dataclass
class EmbedOptions:
    inputs: list[str]
    dirs: WorkDirs
    chunk_lines: int = DEFAULT_CHUNK_LINES
    id_field: str = "_id"
    text_field: str = "text"
    dedupe_texts: bool = False
    input_format: str = "auto"  # or jsonl, json, csv, tsv, parquet, twarc2 (input.formats)
    rules: Rules = DEFAULT_RULES  # --text-mode and the filters (input.rules)
    restart: bool = False
    chunks_in_flight: int = 3
    log_interval: float = 5.0
    max_chunks: int | None = None  # stop after this many chunks (tests, dry runs)
    devices: list[str] | None = None  # more than one: one worker process per device (engines/devices.py)
    ray: Any = None  # an engines.ray.RayOptions: schedule the chunks on a Ray cluster (engines/ray.py)
    metrics_port: int | None = None  # serve Prometheus metrics here while the run lasts (embed/metrics.py)
    metrics_addr: str = "127.0.0.1"


@dataclass
class Summary:
    rows: int = 0
    rejected: int = 0
    chunks_done_now: int = 0
    chunks_skipped: int = 0
    chunks_total: int = 0
    embedded_texts: int = 0
    elapsed: float = 0.0
    model: str = ""
    dim: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)  # rows left out by a filter, by reason
    rejects_file: str | None = None
    shards_dir: str = ""

    @property
    def docs_per_s(self) -> float:
        return self.rows / self.elapsed if self.elapsed > 0 else 0.0

    def text(self) -> str:
        lines = [
            f"Embedded {self.rows} rows in {self.chunks_done_now} chunks "
            f"({self.chunks_skipped} of {self.chunks_total} already done) in {self.elapsed:.1f}s: "
            f"{self.docs_per_s:.1f} docs/s",
            f"Rejected: {self.rejected} lines" + (f" (see {self.rejects_file})" if self.rejects_file else ""),
        ]
        if self.skipped:
            lines.append(
                f"Skipped by filters: {sum(self.skipped.values())} rows ("
                + ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
                + ")"
            )
        if self.model:
            lines.append(f"Model: {self.model} ({self.dim} dimensions); shards in {self.shards_dir}")
        if self.embedded_texts and self.embedded_texts != self.rows:
            lines.append(f"Texts sent: {self.embedded_texts} (the rest were repeats, --dedupe-texts)")
        if self.stats:
            lines.append("Backend: " + ", ".join(f"{k}={v}" for k, v in self.stats.items()))
        return "\n".join(lines)


def output_options(opts: EmbedOptions, info: BackendInfo) -> dict[str, object]:
    """What besides the model and dimension must match on resume. Prompt and dimensions only when given, so a
    run from before they existed resumes with the same key."""
    out: dict[str, object] = {
        "normalize": info.normalize,
        "id_field": opts.id_field,
        "text_field": opts.text_field,
    }
    # only what differs from the defaults, so a run started before these options resumes unchanged
    if opts.input_format != "auto":
        out["format"] = opts.input_format
    out.update(opts.rules.describe())
    out.update({k: info.extra[k] for k in VECTOR_KEYS if k in info.extra})
    return out
