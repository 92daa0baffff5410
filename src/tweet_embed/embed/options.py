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
from tweet_embed.embed.worker import ChunkOptions
from tweet_embed.input.rules import DEFAULT_RULES, Rules


@dataclass
class EmbedOptions:
    inputs: list[str]
    dirs: WorkDirs
    chunk_lines: int = DEFAULT_CHUNK_LINES
    id_field: str = "_id"
    text_field: str = "text"
    dedupe: bool = True  # each distinct text sent once per run (embed/dedupe.py); False: every row is sent
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
    reuse: list[str] = field(default_factory=list)  # earlier runs' shards/consolidated dirs: texts not sent
    dedupe_files: Any = None  # set by the runner once the dedupe map is planned (a dedupe.DedupeFiles)


@dataclass
class Summary:
    rows: int = 0
    rejected: int = 0
    chunks_done_now: int = 0
    chunks_skipped: int = 0
    chunks_total: int = 0
    embedded_texts: int = 0  # texts sent to the backend by this invocation
    reused: int = 0  # rows of this invocation whose vector came from an earlier run (--reuse)
    distinct_texts: int = 0  # distinct texts among the run's valid rows (0: not deduplicated)
    planned_rows: int = 0  # valid rows of the whole run, as the dedupe plan counted them
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
        if self.distinct_texts:
            lines.append(
                f"Texts: {self.planned_rows} rows in the run, {self.distinct_texts} distinct; "
                f"sent now: {self.embedded_texts}, reused from earlier runs: {self.reused}"
            )
        if self.stats:
            lines.append("Backend: " + ", ".join(f"{k}={v}" for k, v in self.stats.items()))
        return "\n".join(lines)


def runtime_options(extra: dict[str, str]) -> dict[str, object]:
    """The in-process model's runtime and precision (``openvino``/``torch``, ``float32``/``bfloat16``/...),
    for the manifest: two runtimes or precisions give different vectors, so a resume may not mix them."""
    return {k: extra[k] for k in ("runtime", "dtype")} if "runtime" in extra else {}


def output_options(opts: EmbedOptions, info: BackendInfo | None) -> dict[str, object]:
    """What besides the model and dimension must match on resume (without ``info``: all but what the backend
    reports). Prompt and dimensions only when given, so a run from before they existed resumes with the same key."""
    out: dict[str, object] = {
        "id_field": opts.id_field,
        "text_field": opts.text_field,
        "dedupe": opts.dedupe_files is not None,  # a repeat holds its first occurrence's vector, bit for bit
        "reuse": list(opts.reuse),  # vectors copied from these earlier outputs
    }
    # only what differs from the defaults, so a run started before these options resumes unchanged
    if opts.input_format != "auto":
        out["format"] = opts.input_format
    out.update(opts.rules.describe())
    if info is not None:
        out.update(backend_options(info.normalize, info.extra))
    return out


def backend_options(normalize: bool, extra: dict[str, str]) -> dict[str, object]:
    """The manifest's part that the started backend reports: normalisation, prompt and dimensions, runtime and
    precision. One function for every engine, so none can leave one out (device workers report theirs)."""
    out: dict[str, object] = {"normalize": normalize}
    out.update({k: extra[k] for k in VECTOR_KEYS if k in extra})
    out.update(runtime_options(extra))
    return out


def chunk_options(opts: EmbedOptions) -> ChunkOptions:
    """What each chunk's work needs (picklable, for device workers and Ray)."""
    return ChunkOptions(opts.id_field, opts.text_field, dedupe=opts.dedupe_files, rules=opts.rules)
