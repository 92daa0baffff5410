"""Consolidation when the shards or the output live on an object store (``s3://``, ``gs://``, ...).

Why staging: deduplication (DuckDB) and the output writer need seekable local files, and an object store
has no rename. So the shards are copied into a local stage (resumable: a shard already there with the same
size is not fetched again), consolidated there with the ordinary code, and the output files are uploaded with
``_manifest.json`` last: the remote manifest is the commit point, as the marker is for a shard. A re-run
whose remote manifest equals the local one uploads nothing. Needs local disk for the shards and the output.
"""

from __future__ import annotations

import logging
import os
import shutil

from tweet_embed import storage
from tweet_embed.consolidate.merge import MANIFEST, ConsolidateResult, consolidate

log = logging.getLogger("tweet_embed")


def _copy_down(src: str, dest: str) -> None:
    tmp = os.path.join(os.path.dirname(dest), f".{os.path.basename(dest)}.partial")
    with storage.open_raw(src) as fh, open(tmp, "wb") as out:
        shutil.copyfileobj(fh, out, 8 << 20)
    os.replace(tmp, dest)


def _copy_up(src: str, dest: str) -> None:
    fs, inner = storage.resolve(dest)
    with open(src, "rb") as fh, fs.open_output_stream(inner, compression=None) as out:  # one atomic PUT
        shutil.copyfileobj(fh, out, 8 << 20)


def stage_shards(shards_uri: str, stage: str) -> list[str]:
    """Fetch ``part-*.parquet`` from ``shards_uri`` into ``stage`` (skipping complete copies); their names."""
    os.makedirs(stage, exist_ok=True)
    names = sorted(
        n for n in storage.list_names(shards_uri) if n.startswith("part-") and n.endswith(".parquet")
    )
    wanted = set(names)
    for n in os.listdir(stage):  # a shard deleted remotely must not survive in the stage
        if n not in wanted and n.startswith("part-"):
            os.unlink(os.path.join(stage, n))

    def fetch(name: str) -> None:
        src, dest = storage.join(shards_uri, name), os.path.join(stage, name)
        size, _ = storage.stat(src)
        if not (os.path.exists(dest) and os.path.getsize(dest) == size):
            _copy_down(src, dest)

    storage.parallel_map(fetch, names, remote=True, workers=8)
    log.info("staged %d shard(s) from %s in %s", len(names), shards_uri, stage)
    return names


def publish_output(local_out: str, out_uri: str) -> int:
    """Upload the output files, then ``_manifest.json``; returns the number of files uploaded."""
    local_manifest = os.path.join(local_out, MANIFEST)
    with open(local_manifest, "rb") as fh:
        manifest = fh.read()
    if storage.read_bytes(storage.join(out_uri, MANIFEST)) == manifest:
        return 0
    files = sorted(n for n in os.listdir(local_out) if not n.startswith(".") and n != MANIFEST)
    storage.parallel_map(
        lambda n: _copy_up(os.path.join(local_out, n), storage.join(out_uri, n)),
        files,
        remote=True,
        workers=4,
    )
    for n in files:  # verify before committing: every object complete
        if storage.stat(storage.join(out_uri, n))[0] != os.path.getsize(os.path.join(local_out, n)):
            raise OSError(f"upload of {n} to {out_uri} is incomplete")
    storage.write_bytes(storage.join(out_uri, MANIFEST), manifest)
    return len(files) + 1


def consolidate_staged(
    shards_dir: str, out_dir: str, stage_dir: str, *, delete_shards: bool = False, **kw: object
) -> ConsolidateResult:
    """:func:`consolidate` with remote shards and/or output, through a local stage."""
    local_shards = shards_dir
    if storage.is_uri(shards_dir):
        local_shards = os.path.join(stage_dir, "shards")
        stage_shards(shards_dir, local_shards)
    local_out = os.path.join(stage_dir, "consolidated") if storage.is_uri(out_dir) else out_dir
    delete_local = delete_shards and local_shards == shards_dir
    result = consolidate(local_shards, local_out, delete_shards=delete_local, **kw)  # type: ignore[arg-type]
    if storage.is_uri(out_dir):
        n = publish_output(local_out, out_dir)
        result.messages.append(
            f"uploaded {n} file(s) to {out_dir}" if n else f"{out_dir} is already up to date"
        )
    if delete_shards and local_shards != shards_dir:  # remote shards go only once the output is committed
        for name in os.listdir(local_shards):
            if name.startswith("part-"):
                storage.delete(storage.join(shards_dir, name))
    return result
