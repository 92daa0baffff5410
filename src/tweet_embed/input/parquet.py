"""Reading Parquet input (e.g. a BigQuery ``EXPORT DATA ... FORMAT PARQUET``) like JSONL input.

Why: a table exported from BigQuery as Parquet can be embedded without a JSON step. The rules are those of
:mod:`tweet_embed.input.records` for JSON: ids are strings or integers (written in decimal), a text that is null,
empty or not a string is a reject with a reason; a reject's ``line`` is the 1-based row number in the file.

Chunks follow the file's row groups (read from the footer only), so a chunk reads whole row groups and
only the two columns it needs; a row group larger than a chunk is split into equal parts.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from tweet_embed.input.records import SNIPPET_CHARS, InputError, ParsedBlock, Reject, clean_text, normalise_id
from tweet_embed.input.rules import Rules, filter_record

PARQUET_SUFFIX = ".parquet"


def is_parquet_spec(spec: str) -> bool:
    """True when an input argument names Parquet input (a .parquet file or glob, or a directory of them)."""
    return spec.lower().endswith(PARQUET_SUFFIX) or os.path.isdir(spec)


def expand_parquet_inputs(spec: str) -> list[str]:
    """The sorted ``.parquet`` files named by ``spec``: a file, a directory (its ``*.parquet``) or a glob.

    Hidden files (a leading ".") are left out, as everywhere in this tool.
    """
    if os.path.isdir(spec):
        files = [
            os.path.join(spec, n)
            for n in os.listdir(spec)
            if n.lower().endswith(PARQUET_SUFFIX) and not n.startswith(".")
        ]
        files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise InputError(f"no .parquet files in directory {spec}")
        return sorted(files)
    if glob.has_magic(spec):
        files = [f for f in glob.glob(spec) if os.path.isfile(f) and not os.path.basename(f).startswith(".")]
        if not files:
            raise InputError(f"no files match {spec}")
        return sorted(files)
    if not os.path.exists(spec):
        raise InputError(f"input file not found: {spec}")
    if not os.access(spec, os.R_OK):
        raise InputError(f"input file is not readable: {spec}")
    return [spec]


def _open(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError:
        raise InputError(f"input file not found: {path}") from None
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path} is not a readable Parquet file: {exc}") from exc


def parquet_row_count(path: str) -> int:
    """Rows in the file, from its footer."""
    return int(_open(path).metadata.num_rows)


def parquet_chunks(path: str, rows_per_chunk: int) -> list[tuple[int, int]]:
    """Deterministic ``(start_row, n_rows)`` chunks of ``path`` from its row groups, reading no data.

    Whole row groups are packed into a chunk while it stays within ``rows_per_chunk`` rows; a row group
    larger than that is cut into equal parts. The same file and size always give the same chunks.
    """
    if rows_per_chunk < 1:
        raise ValueError("rows_per_chunk must be at least 1")
    md = _open(path).metadata
    chunks: list[tuple[int, int]] = []
    start = 0  # first row of the chunk being packed
    size = 0  # rows packed so far
    row = 0
    for i in range(md.num_row_groups):
        n = md.row_group(i).num_rows
        if n == 0:
            continue
        if size and size + n > rows_per_chunk:
            chunks.append((start, size))
            start, size = row, 0
        if n > rows_per_chunk:
            parts = -(-n // rows_per_chunk)
            base, extra = divmod(n, parts)
            pos = row
            for k in range(parts):
                m = base + (1 if k < extra else 0)
                chunks.append((pos, m))
                pos += m
            start, size = row + n, 0
        else:
            size += n
        row += n
    if size:
        chunks.append((start, size))
    return chunks


def _check_columns(pf: pq.ParquetFile, path: str, columns: list[str]) -> None:
    present = pf.schema_arrow.names
    for c in columns:
        if c not in present:
            raise InputError(
                f"{path}: no column {c!r} (columns: {', '.join(present)}); "
                "choose them with --id-field / --text-field"
            )


def check_parquet_columns(path: str, id_field: str, text_field: str) -> None:
    """Raise :class:`InputError` when ``path`` lacks a column; reads the footer only (call it when planning,
    so a wrong ``--id-field`` fails before a model is loaded)."""
    _check_columns(_open(path), path, [id_field, text_field])


def _snippet(rid: Any, text: Any, id_field: str, text_field: str) -> str:
    raw = orjson.dumps({id_field: rid, text_field: text}, default=repr)
    return raw[: SNIPPET_CHARS * 4].decode("utf-8", "replace")[:SNIPPET_CHARS]


def _type_name(value: Any) -> str:
    # The names that records.parse_line would give the same value decoded from JSON.
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "dict"
    return type(value).__name__


def read_parquet_chunk(
    path: str,
    start_row: int,
    n_rows: int,
    id_field: str = "_id",
    text_field: str = "text",
    file_label: str | None = None,
) -> tuple[list[str], list[str], list[Reject]]:
    """Rows ``[start_row, start_row + n_rows)`` of ``path`` as ids, texts and rejects (in row order).

    Reads only the row groups that hold those rows and only the two columns.
    """
    label = file_label if file_label is not None else path
    pf = _open(path)
    _check_columns(pf, path, [id_field, text_field])
    md = pf.metadata
    end_row = start_row + n_rows
    if start_row < 0 or n_rows < 0 or end_row > md.num_rows:
        raise InputError(
            f"{path} has {md.num_rows} rows, not the rows {start_row}..{end_row} that were "
            "planned (changed or replaced?)"
        )
    groups: list[int] = []
    first_group_row = None
    row = 0
    for i in range(md.num_row_groups):
        n = md.row_group(i).num_rows
        if row < end_row and row + n > start_row and n > 0:
            groups.append(i)
            if first_group_row is None:
                first_group_row = row
        row += n
    if not groups or n_rows == 0:
        return [], [], []
    columns = [id_field] if id_field == text_field else [id_field, text_field]
    try:
        table = pf.read_row_groups(groups, columns=columns, use_threads=False)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{path}: cannot read rows {start_row}..{end_row}: {exc}") from exc
    assert first_group_row is not None
    table = table.slice(start_row - first_group_row, n_rows)
    try:
        id_values = table.column(id_field).to_pylist()
        text_values = table.column(text_field).to_pylist()
    except (pa.ArrowException, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot decode rows {start_row}..{end_row}: {exc}") from exc
    ids: list[str] = []
    texts: list[str] = []
    rejects: list[Reject] = []
    for k, (raw_id, text) in enumerate(zip(id_values, text_values, strict=True)):
        rid = normalise_id(raw_id)
        reason = None
        if rid is None:
            r = repr(raw_id)
            reason = f"invalid id {r if len(r) <= 60 else r[:57] + '...'}"
        elif text is None:
            reason = "text is null"
        elif not isinstance(text, str):
            reason = f"text is not a string (a {_type_name(text)})"
        elif not text:
            reason = "text is empty"
        if reason is not None:
            rejects.append(
                Reject(label, start_row + k + 1, reason, _snippet(raw_id, text, id_field, text_field))
            )
            continue
        ids.append(rid)  # type: ignore[arg-type]
        texts.append(clean_text(text))
    return ids, texts, rejects


def filter_parquet_block(
    block: ParsedBlock, path: str, start_row: int, n_rows: int, rules: Rules
) -> ParsedBlock:
    """The filters of :mod:`tweet_embed.input.rules` on a Parquet chunk: ``--lang`` reads the file's ``lang``
    column (a file without one has no language: every row is skipped as ``lang``), ``--skip-retweets`` looks
    for the ``RT @`` prefix, ``--min-text-length`` counts the text."""
    langs: list[Any] | None = None
    if rules.langs:
        pf = _open(path)
        if "lang" in pf.schema_arrow.names:
            md = pf.metadata
            groups, row, first_group_row = [], 0, None
            for i in range(md.num_row_groups):
                n = md.row_group(i).num_rows
                if row < start_row + n_rows and row + n > start_row and n > 0:
                    groups.append(i)
                    first_group_row = row if first_group_row is None else first_group_row
                row += n
            table = pf.read_row_groups(groups, columns=["lang"], use_threads=False)
            langs = table.slice(start_row - (first_group_row or 0), n_rows).column("lang").to_pylist()
    out = ParsedBlock([], [], [], block.rejects, dict(block.skipped))
    base = start_row + 1  # row number of the chunk's first row
    for rid, text, line in zip(block.ids, block.texts, block.lines, strict=True):
        obj = {"lang": langs[line - base]} if langs is not None else {}
        skip = filter_record(obj, text, rules)
        if skip is not None:
            out.skipped[skip.reason] = out.skipped.get(skip.reason, 0) + 1
            continue
        out.ids.append(rid)
        out.texts.append(text)
        out.lines.append(line)
    return out
