"""The shards a consolidation reads: their footers (rows, bytes, metadata), refusing mixed models or sizes."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from tweet_embed.backends.vectors import VECTOR_KEYS
from tweet_embed.consolidate.layout import ConsolidateError
from tweet_embed.parquet import META_PREFIX, TEXT_HASH

# Metadata that must agree across shards; other keys (device, dtype, version) are taken from the first shard.
IDENTITY_KEYS = ("backend", "model", "dim", "normalize")


@dataclass(frozen=True)
class ShardInfo:
    name: str
    path: str
    rows: int
    bytes: int
    text_hash: bool = False  # has the text_hash column (embed writes it since dedupe; --reuse matches by it)


def _meta_of(schema: pa.Schema) -> dict[str, str]:
    out = {}
    for k, v in (schema.metadata or {}).items():
        key = k.decode()
        if key.startswith(META_PREFIX):
            out[key[len(META_PREFIX) :]] = v.decode()
    return out


def embedding_dim(field_type: pa.DataType) -> int | None:
    """The fixed dimension of an embedding column type, or None for a variable-size list."""
    if pa.types.is_fixed_size_list(field_type):
        return int(field_type.list_size)
    return None


def scan_shards(paths: Sequence[str]) -> tuple[list[ShardInfo], dict[str, str], int]:
    """Read every shard's footer: row counts, metadata, and refuse mixed models or dimensions."""
    if not paths:
        raise ConsolidateError("no shards to consolidate")
    infos: list[ShardInfo] = []
    groups: dict[tuple[str, ...], list[str]] = {}
    first_meta: dict[str, str] | None = None
    for p in paths:
        try:
            md = pq.read_metadata(p)
            schema = md.schema.to_arrow_schema()
        except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for damaged files
            raise ConsolidateError(f"cannot read shard {p}: {exc}") from exc
        if "id" not in schema.names or "embedding" not in schema.names:
            raise ConsolidateError(f"{p} is not an embedding shard (columns: {', '.join(schema.names)})")
        etype = schema.field("embedding").type
        if not (pa.types.is_fixed_size_list(etype) or pa.types.is_list(etype)) or not pa.types.is_floating(
            etype.value_type
        ):
            raise ConsolidateError(f"{p}: embedding column has type {etype}, expected a list of floats")
        meta = _meta_of(schema)
        fixed = embedding_dim(etype)
        if "dim" not in meta and fixed is not None:
            meta["dim"] = str(fixed)
        if fixed is not None and meta.get("dim") != str(fixed):
            raise ConsolidateError(f"{p}: metadata says dim {meta.get('dim')} but vectors have {fixed}")
        if first_meta is None:
            first_meta = meta
        # prompt and dimensions only where recorded: shards from before those options keep their key
        key = tuple(f"{k}={meta.get(k, '?')}" for k in IDENTITY_KEYS) + tuple(
            f"{k}={meta[k]}" for k in VECTOR_KEYS if k in meta
        )
        groups.setdefault(key, []).append(os.path.basename(p))
        has_hash = TEXT_HASH in schema.names and schema.field(TEXT_HASH).type == pa.binary(16)
        infos.append(ShardInfo(os.path.basename(p), p, md.num_rows, os.path.getsize(p), has_hash))
    if len(groups) > 1:
        lines = [f"  {', '.join(k)}: {len(v)} shard(s), e.g. {v[0]}" for k, v in groups.items()]
        raise ConsolidateError(
            "shards come from different models or dimensions and cannot go into one table:\n"
            + "\n".join(lines)
            + "\nmove the shards of each model into its own directory and consolidate them separately"
        )
    assert first_meta is not None
    try:
        dim = int(first_meta["dim"])
    except (KeyError, ValueError):
        raise ConsolidateError(f"{paths[0]}: no usable dimension in metadata (tweet_embed.dim)") from None
    return infos, first_meta, dim
