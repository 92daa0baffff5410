"""``verify``: every valid input id appears exactly once in the output, with a finite vector of the right size.

Why DuckDB: 100M ids (a few GB as strings) do not fit a Python set on a laptop-sized machine; DuckDB keeps them
in a temporary on-disk database and spills its joins and aggregates to disk under ``memory_limit``. The input is
read through embed's own chunk plan and parser (``chunks.make_plan``, ``records.parse_lines``; Parquet inputs by
row range), so "valid id" means the same in both; JSONL chunks are parsed in a process pool. Vectors are checked by streaming the ``embedding`` column with pyarrow, one batch at a time.

The target is the consolidated output when ``<out-dir>/_manifest.json`` exists, else the shards (before
consolidation; then an id that the input holds twice is reported as duplicated, as it will be until
``consolidate`` drops the later copy).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tweet_embed.backends.vectors import VECTOR_KEYS
from tweet_embed.consolidate.layout import OUTPUT_RE, duckdb_connect, list_shards, read_manifest
from tweet_embed.embed.chunks import InputFile, Plan, iter_chunk_bytes, make_plan
from tweet_embed.embed.worker import ChunkOptions, read_block
from tweet_embed.input.formats import parse_block
from tweet_embed.input.rules import DEFAULT_RULES, Rules
from tweet_embed.parquet import META_PREFIX, file_sha256

ID_BATCH = 1_000_000
BUCKET_IDS = 4_000_000  # ids per hash bucket compared at once
VERIFY_CHUNK_LINES = 50_000


class VerifyError(Exception):
    """Nothing to verify (no output, no shards) or an unreadable input."""


@dataclass
class Finding:
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, n: int, examples: Sequence[str], limit: int) -> None:
        self.count += n
        room = limit - len(self.examples)
        if room > 0:
            self.examples.extend(list(examples)[:room])


@dataclass
class VerifyReport:
    target: str
    files: int = 0
    input_lines_valid: int = 0
    input_ids: int = 0
    input_repeated_ids: int = 0
    rejects: int = 0
    reject_examples: list[str] = field(default_factory=list)
    output_rows: int = 0
    dim: int | None = None
    missing: Finding = field(default_factory=Finding)
    extra: Finding = field(default_factory=Finding)
    duplicated: Finding = field(default_factory=Finding)
    bad_dim: Finding = field(default_factory=Finding)
    non_finite: Finding = field(default_factory=Finding)
    file_problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.missing.count
            or self.extra.count
            or self.duplicated.count
            or self.bad_dim.count
            or self.non_finite.count
            or self.file_problems
        )

    def text(self) -> str:
        lines = [
            f"verify: {self.target} ({self.files} file(s))",
            f"  input: {self.input_lines_valid} valid record(s), {self.input_ids} distinct id(s)"
            + (f", {self.input_repeated_ids} id(s) repeated in the input" if self.input_repeated_ids else "")
            + f", {self.rejects} rejected line(s)",
            f"  output: {self.output_rows} row(s), dimension {self.dim}",
        ]
        for label, f in (
            ("missing ids (in the input, not in the output)", self.missing),
            ("extra ids (in the output, not in the input)", self.extra),
            ("duplicated ids (more than once in the output)", self.duplicated),
            ("vectors of the wrong dimension or NULL", self.bad_dim),
            ("vectors with NaN/inf", self.non_finite),
        ):
            mark = "ok" if not f.count else "FAIL"
            line = f"  [{mark}] {label}: {f.count}"
            if f.examples:
                line += "  e.g. " + ", ".join(repr(e) for e in f.examples)
            lines.append(line)
        for p in self.file_problems:
            lines.append(f"  [FAIL] {p}")
        if self.reject_examples:
            lines.append(
                "  rejected input lines (not expected in the output), e.g.: "
                + "; ".join(self.reject_examples)
            )
        lines.append("OK: every valid id appears exactly once with a finite vector" if self.ok else "FAILED")
        return "\n".join(lines)


def _targets(out_dir: str | None, shards_dir: str | None) -> tuple[str, list[str], dict | None]:  # type: ignore[type-arg]
    if out_dir and os.path.isdir(out_dir):
        manifest = read_manifest(out_dir)
        if manifest is not None:
            return (
                f"consolidated output in {out_dir}",
                [os.path.join(out_dir, f["name"]) for f in manifest["files"]],
                manifest,
            )
    if shards_dir:
        shards = list_shards(shards_dir)
        if shards:
            return f"shards in {shards_dir} (not consolidated yet)", shards, None
    where = " or ".join(
        d
        for d in (out_dir and f"{out_dir}/_manifest.json", shards_dir and f"{shards_dir}/part-*.parquet")
        if d
    )
    raise VerifyError(f"nothing to verify: no {where}")


def _parse_ids(
    data: bytes,
    first_line: int,
    f: InputFile,
    id_field: str,
    text_field: str,
    examples: int,
    rules: Rules = DEFAULT_RULES,
) -> tuple[list[str], int, list[str]]:
    """Parse one text chunk (JSONL, array, CSV...) exactly as embed does; only ids and reject counts travel
    back."""
    block = parse_block(f.kind, data, first_line, f.label, id_field, text_field, rules, f.tweets, f.header)
    shown = [f"{os.path.basename(r.file)}:{r.line} {r.reason}" for r in block.rejects[:examples]]
    return block.ids, len(block.rejects), shown


def iter_input_ids(
    plan: Plan,
    id_field: str,
    text_field: str,
    examples: int = 10,
    workers: int | None = None,
    rules: Rules = DEFAULT_RULES,
) -> Iterator[tuple[list[str], int, list[str]]]:
    """``(valid ids, rejects, reject examples)`` per chunk of the input, read through embed's own chunk plan.

    JSONL chunks are parsed in a process pool (parsing is the slow part: ~5 µs a line in Python); the bytes
    are read once, sequentially, also from .gz/.zst. Parquet inputs are read by row range as embed reads them.
    """
    copts = ChunkOptions(id_field=id_field, text_field=text_field, rules=rules)
    for f in plan.files:
        if f.damaged:
            raise VerifyError(f"{f.label}: {f.damaged}")
    for c in plan.chunks:
        f = plan.files[c.file_index]
        if f.kind == "parquet":
            b = read_block(f, c, copts)
            yield (
                b.ids,
                len(b.rejects),
                [f"{os.path.basename(r.file)}:{r.line} {r.reason}" for r in b.rejects],
            )
    jsonl = [c for c in plan.chunks if plan.files[c.file_index].kind != "parquet"]
    if not jsonl:
        return
    workers = workers or min(8, os.cpu_count() or 1)
    if workers <= 1:
        for c, data in iter_chunk_bytes(plan, jsonl):
            yield _parse_ids(
                data, c.first_line, plan.files[c.file_index], id_field, text_field, examples, rules
            )
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        pending: deque[Future[tuple[list[str], int, list[str]]]] = deque()
        for c, data in iter_chunk_bytes(plan, jsonl):
            f = plan.files[c.file_index]
            pending.append(
                ex.submit(_parse_ids, data, c.first_line, f, id_field, text_field, examples, rules)
            )
            if len(pending) > workers + 1:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _insert_bucketed(con, table: str, ids: pa.Array, buckets: int) -> None:  # type: ignore[no-untyped-def]
    """Append ids with their bucket ``hash(id) % buckets``, sorted by bucket so each bucket's rows cluster."""
    con.register("id_batch", pa.table({"id": ids}))
    con.execute(
        f"INSERT INTO {table} SELECT id, (hash(id) % {int(buckets)})::USMALLINT AS b FROM id_batch ORDER BY b"
    )
    con.unregister("id_batch")


def _load_input_ids(  # type: ignore[no-untyped-def]
    con,
    plan: Plan,
    id_field: str,
    text_field: str,
    report: VerifyReport,
    examples: int,
    workers: int | None,
    buckets: int,
    rules: Rules = DEFAULT_RULES,
) -> None:
    con.execute("CREATE TABLE input_raw (id VARCHAR, b USMALLINT)")
    buf: list[str] = []

    def flush() -> None:
        if buf:
            _insert_bucketed(con, "input_raw", pa.array(buf, pa.string()), buckets)
            report.input_lines_valid += len(buf)
            buf.clear()

    for ids, n_rejects, shown in iter_input_ids(plan, id_field, text_field, examples, workers, rules):
        buf.extend(ids)
        report.rejects += n_rejects
        report.reject_examples.extend(shown[: max(0, examples - len(report.reject_examples))])
        if len(buf) >= ID_BATCH:
            flush()
    flush()


def load_parquet_ids(con, files: Sequence[str], buckets: int, table: str = "out_raw") -> None:  # type: ignore[no-untyped-def]
    """The ``id`` column of Parquet files into a bucketed DuckDB table (streamed, a batch at a time)."""
    con.execute(f"CREATE TABLE {table} (id VARCHAR, b USMALLINT)")
    for p in files:
        for batch in pq.ParquetFile(p).iter_batches(batch_size=ID_BATCH, columns=["id"]):
            _insert_bucketed(con, table, batch.column(0), buckets)


def compare_buckets(con, buckets: int, report: VerifyReport, examples: int) -> None:  # type: ignore[no-untyped-def]
    """Exact set comparisons one hash bucket at a time: each query holds ~BUCKET_IDS ids, whatever the total.

    (One DISTINCT over 100M string ids ran DuckDB out of memory at a 1 GB limit; per-bucket work never does.)
    """
    found: dict[str, list[str]] = {"missing": [], "extra": [], "duplicated": []}
    counts = dict.fromkeys(found, 0)
    queries = {
        "missing": "SELECT DISTINCT i.id FROM ins i ANTI JOIN outs o ON i.id = o.id",
        "extra": "SELECT DISTINCT o.id FROM outs o ANTI JOIN ins i ON o.id = i.id",
        "duplicated": "SELECT id FROM outs GROUP BY id HAVING count(*) > 1",
    }
    for k in range(buckets):
        ins = f"(SELECT id FROM input_raw WHERE b = {k})"
        outs = f"(SELECT id FROM out_raw WHERE b = {k})"
        n_ids, n_rep = con.execute(
            f"SELECT count(*), count(*) FILTER (WHERE c > 1) FROM (SELECT id, count(*) AS c FROM {ins} GROUP BY id)"
        ).fetchone()
        report.input_ids += int(n_ids)
        report.input_repeated_ids += int(n_rep)
        for name, sql in queries.items():
            con.execute(f"CREATE OR REPLACE TEMP TABLE found AS WITH ins AS {ins}, outs AS {outs} {sql}")
            (n,) = con.execute("SELECT count(*) FROM found").fetchone()
            counts[name] += int(n)
            if n:
                found[name] += [
                    r[0] for r in con.execute(f"SELECT id FROM found ORDER BY id LIMIT {examples}").fetchall()
                ]
    for name, finding in (
        ("missing", report.missing),
        ("extra", report.extra),
        ("duplicated", report.duplicated),
    ):
        finding.add(counts[name], sorted(found[name])[:examples], examples)


def _check_vectors(
    path: str, dim: int, report: VerifyReport, examples: int, batch_rows: int = 32_768
) -> None:
    pf = pq.ParquetFile(path)
    for batch in pf.iter_batches(batch_size=batch_rows, columns=["id", "embedding"]):
        ids = batch.column(0)
        emb = batch.column(1)
        n = batch.num_rows
        bad = np.zeros(n, dtype=bool)
        if emb.null_count:
            bad |= emb.is_null().to_numpy(zero_copy_only=False)
        if pa.types.is_fixed_size_list(emb.type):
            if emb.type.list_size != dim:
                bad[:] = True
            lengths_ok = not bad.any()
        else:
            lengths = pc.list_value_length(emb).to_numpy(zero_copy_only=False)
            bad |= np.nan_to_num(lengths, nan=-1).astype(np.int64) != dim
            lengths_ok = not bad.any()
        if bad.any():
            idx = np.flatnonzero(bad)
            report.bad_dim.add(len(idx), [ids[int(i)].as_py() for i in idx[:examples]], examples)
        values = emb.flatten()
        vals = values.to_numpy(zero_copy_only=False)  # element NULLs become NaN: not allowed either
        nonfinite = ~np.isfinite(vals)
        if nonfinite.any():
            if lengths_ok:
                rows = np.flatnonzero(nonfinite.reshape(n, dim).any(axis=1))
            else:
                parents = pc.list_parent_indices(emb).to_numpy()
                rows = np.unique(parents[nonfinite])
            report.non_finite.add(len(rows), [ids[int(i)].as_py() for i in rows[:examples]], examples)


def verify(
    inputs: Sequence[str],
    *,
    out_dir: str | None = None,
    shards_dir: str | None = None,
    id_field: str = "_id",
    text_field: str = "text",
    examples: int = 10,
    checksums: bool = True,
    memory_limit: str = "512MB",
    temp_dir: str | None = None,
    workers: int | None = None,
    buckets: int | None = None,
    input_format: str = "auto",
    rules: Rules = DEFAULT_RULES,
) -> VerifyReport:
    """Check the output (or shards) against the input; see the module doc. ``input_format`` and ``rules``
    (text mode, filters) as given to ``embed``: a filtered row is not expected in the output."""
    plan = make_plan(list(inputs), VERIFY_CHUNK_LINES, input_format)  # validates the inputs first
    target, files, manifest = _targets(out_dir, shards_dir)
    report = VerifyReport(target=target, files=len(files))

    # files and metadata
    dims: set[int] = set()
    models: set[str] = set()
    settings: set[tuple[str, ...]] = set()  # prompt and dimensions, as recorded
    for p in files:
        if not os.path.exists(p):
            report.file_problems.append(f"{os.path.basename(p)} is listed in the manifest but missing")
            continue
        schema = pq.read_schema(p)
        md = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
        if f"{META_PREFIX}dim" in md:
            dims.add(int(md[f"{META_PREFIX}dim"]))
        models.add(md.get(f"{META_PREFIX}model", "?"))
        settings.add(tuple(f"{k}={md[META_PREFIX + k]}" for k in VECTOR_KEYS if META_PREFIX + k in md))
        asked = md.get(f"{META_PREFIX}dimensions")
        if asked is not None and asked != md.get(f"{META_PREFIX}dim"):
            report.file_problems.append(
                f"{os.path.basename(p)}: made with --dimensions {asked} but declares dim {md.get(f'{META_PREFIX}dim')}"
            )
    if manifest is not None:
        dims.add(int(manifest["dim"]))
        listed = {f["name"] for f in manifest["files"]}
        unlisted = sorted(n for n in os.listdir(out_dir or ".") if OUTPUT_RE.match(n) and n not in listed)
        if unlisted:
            report.file_problems.append(f"files not in the manifest: {', '.join(unlisted[:5])}")
        for f in manifest["files"]:
            p = os.path.join(out_dir or ".", f["name"])
            if not os.path.exists(p):
                continue
            if pq.read_metadata(p).num_rows != f["rows"]:
                report.file_problems.append(f"{f['name']}: row count differs from the manifest")
            if checksums and file_sha256(p) != f["sha256"]:
                report.file_problems.append(f"{f['name']}: sha256 differs from the manifest")
    if len(dims) != 1:
        report.file_problems.append(
            f"files declare different dimensions: {sorted(dims)}"
            if dims
            else "no declared dimension (tweet_embed.dim) in the files"
        )
    if len(models) > 1:
        report.file_problems.append(f"files come from different models: {sorted(models)}")
    if len(settings) > 1:
        shown = sorted(", ".join(s) or "no prompt or dimensions" for s in settings)
        report.file_problems.append(f"files were made with different prompts or dimensions: {shown}")
    report.dim = min(dims) if dims else None
    present = [p for p in files if os.path.exists(p)]

    n_lines = sum(f.lines for f in plan.files)
    p_buckets = buckets or max(1, -(-n_lines // BUCKET_IDS))
    tmp = tempfile.mkdtemp(prefix="tweet-embed-verify-", dir=temp_dir)
    try:
        con = duckdb_connect(os.path.join(tmp, "spill"), memory_limit, path=os.path.join(tmp, "ids.duckdb"))
        try:
            _load_input_ids(con, plan, id_field, text_field, report, examples, workers, p_buckets, rules)
            load_parquet_ids(con, present, p_buckets)
            (report.output_rows,) = con.execute("SELECT count(*) FROM out_raw").fetchone()  # type: ignore[misc]
            compare_buckets(con, p_buckets, report, examples)
        finally:
            con.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    if report.dim is not None:
        for p in present:
            _check_vectors(p, report.dim, report, examples)
    return report
