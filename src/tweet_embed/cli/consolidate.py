"""Subcommands ``consolidate``, ``verify`` and ``search`` (parsing only; the work is in the library modules)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

log = logging.getLogger("tweet_embed")

CONSOLIDATE_EXAMPLES = """\
examples:
  tweet-embed consolidate                                  # ./embeddings/shards → ./embeddings/consolidated
  tweet-embed consolidate --work-dir /nvme/run1 --target-size 1GB
  tweet-embed consolidate --shards-dir /ssd/shards --out-dir /ssd/bq --delete-shards
  tweet-embed consolidate --keep-text tweets.jsonl         # adds a text column (same inputs, same order as embed)
Re-running after a crash resumes; re-running over finished output is a no-op.
"""

VERIFY_EXAMPLES = """\
examples:
  tweet-embed verify tweets.jsonl                          # checks ./embeddings/consolidated (or the shards)
  tweet-embed verify part-*.jsonl.zst --work-dir /nvme/run1
Exit code 0 only when every valid input id appears exactly once with a finite vector of the declared size.
"""

SEARCH_EXAMPLES = """\
examples:
  tweet-embed search "watching the football match tonight" --input sample/tweets.jsonl
  tweet-embed search "rain again" --k 20 --work-dir /nvme/run1 --url http://gpu1:8080/embed
"""


def _formatter():  # type: ignore[no-untyped-def]
    from tweet_embed.cli.common import Formatter

    return Formatter


def _add_dirs(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("directories")
    g.add_argument(
        "--work-dir",
        help="the embed run's directory: shards in D/shards, output in D/consolidated (default ./embeddings)",
    )
    g.add_argument("--shards-dir", help="shards written by embed (default: WORK_DIR/shards)")
    g.add_argument("--out-dir", help="consolidated output (default: WORK_DIR/consolidated)")


def _dirs(args: argparse.Namespace) -> tuple[str, str]:
    base = args.work_dir or "embeddings"
    return (
        args.shards_dir or os.path.join(base, "shards"),
        args.out_dir or os.path.join(base, "consolidated"),
    )


def register(sub: argparse._SubParsersAction) -> None:
    fmt = _formatter()
    p = sub.add_parser(
        "consolidate",
        help="merge shards into BigQuery-ready Parquet files (exactly once)",
        description="Merge the shards of `embed` into files of about --target-size with the "
        "3-level LIST layout BigQuery loads as ARRAY<FLOAT64>; drops duplicate ids "
        "(first occurrence wins) and writes _manifest.json.",
        epilog=CONSOLIDATE_EXAMPLES,
        formatter_class=fmt,
    )
    _add_dirs(p)
    p.add_argument("--target-size", default="2GB", help="approximate size of each output file")
    p.add_argument(
        "--row-group-size",
        default="128MiB",
        help="uncompressed bytes per row group (BigQuery advises at least 16 MiB)",
    )
    p.add_argument(
        "--delete-shards", action="store_true", help="delete the shards once the output is verified"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier consolidation in --out-dir (other files there are left alone)",
    )
    p.add_argument(
        "--keep-text",
        nargs="+",
        metavar="INPUT",
        help="join the input text back in by id (give embed's inputs in the same order)",
    )
    p.add_argument("--id-field", default="_id")
    p.add_argument("--text-field", default="text")
    p.add_argument(
        "--memory-limit", default="512MB", help="DuckDB memory for finding duplicates (spills beyond)"
    )
    p.add_argument(
        "--stage-dir",
        default=os.path.join("embeddings", "stage"),
        help="local staging when --shards-dir or --out-dir is an s3:// or gs:// URI",
    )
    p.add_argument("--bq-table", help="DATASET.TABLE for the printed bq load command")
    p.add_argument("--gcs-prefix", help="gs://bucket/path for the printed upload and bq load commands")
    p.set_defaults(func=cmd_consolidate)

    p = sub.add_parser(
        "verify",
        help="check that every valid input id is in the output exactly once",
        description="Read the input as embed does and check the consolidated output (or the shards, "
        "before consolidation): missing, extra and duplicated ids, dimension, NaN/inf.",
        epilog=VERIFY_EXAMPLES,
        formatter_class=fmt,
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="the input files given to embed")
    _add_dirs(p)
    p.add_argument("--id-field", default="_id")
    p.add_argument("--text-field", default="text")
    from tweet_embed.cli.common import add_filter_options, add_format_options

    g = p.add_argument_group("input format and filters: as given to embed (a filtered row is not expected)")
    add_format_options(g)
    add_filter_options(p)
    p.add_argument("--examples", type=int, default=10, help="example ids shown per problem")
    p.add_argument(
        "--no-checksums",
        dest="checksums",
        action="store_false",
        help="skip re-hashing output files against the manifest",
    )
    p.add_argument(
        "--memory-limit",
        default="512MB",
        help="DuckDB memory (spills to --temp-dir beyond it)",
    )
    p.add_argument("--temp-dir", help="where DuckDB keeps the id tables (default: the system temp dir)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "search",
        help="nearest neighbours of a query text (to eyeball the vectors)",
        description="Embed the query with the backend and model recorded in the output's metadata "
        "and print the k most similar ids (cosine, exact, DuckDB).",
        epilog=SEARCH_EXAMPLES,
        formatter_class=fmt,
    )
    p.add_argument("query")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--input", action="append", default=[], help="input file(s) to show the texts from")
    _add_dirs(p)
    p.add_argument("--url", action="append", help="server URL(s) when the vectors came from TEI/OpenAI")
    p.add_argument("--device", help="device for the in-process model (cpu, cuda)")
    p.add_argument("--query-prompt", metavar="TEXT", help="text put before the query, e.g. 'query: ' for E5")
    p.add_argument(
        "--query-prompt-name",
        metavar="NAME",
        help="a prompt of the model's config for the query, e.g. 'query'",
    )
    p.add_argument("--id-field", default="_id")
    p.add_argument("--text-field", default="text")
    p.set_defaults(func=cmd_search)


def cmd_consolidate(args: argparse.Namespace) -> int:
    from tweet_embed.consolidate.merge import (
        ConsolidateError,
        bq_load_command,
        consolidate,
        human,
        parse_size,
        upload_command,
    )

    shards_dir, out_dir = _dirs(args)
    try:
        target, rg = parse_size(args.target_size), parse_size(args.row_group_size)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if rg < 16 * (1 << 20) and rg < target:
        log.warning(
            "--row-group-size %s is under 16 MiB; BigQuery reads larger row groups faster",
            args.row_group_size,
        )
    log.info("consolidating %s → %s", shards_dir, out_dir)
    try:
        from tweet_embed import storage

        run = consolidate
        if storage.is_uri(shards_dir) or storage.is_uri(out_dir):
            from functools import partial

            from tweet_embed.consolidate.remote import consolidate_staged

            run = partial(consolidate_staged, stage_dir=args.stage_dir)  # type: ignore[assignment]
        res = run(
            shards_dir,
            out_dir,
            target_size=target,
            row_group_size=rg,
            keep_text=args.keep_text,
            id_field=args.id_field,
            text_field=args.text_field,
            delete_shards=args.delete_shards,
            overwrite=args.overwrite,
            memory_limit=args.memory_limit,
        )
    except ConsolidateError as exc:
        log.error("%s", exc)
        return 1
    except OSError as exc:
        log.error("%s\nre-run the same command to resume", exc)
        return 1
    m = res.manifest
    out = sys.stdout
    for msg in res.messages:
        print(msg, file=out)
    dd = m["duplicates"]
    if not res.noop:
        mb_s = m["source"]["bytes"] / 1e6 / max(res.seconds, 1e-9)
        print(
            f"consolidated {m['source']['shards']} shard(s), {m['source']['rows']} rows, "
            f"{human(m['source']['bytes'])} into {len(m['files'])} file(s), {m['rows']} rows, "
            f"{human(res.bytes_out)} in {res.seconds:.1f}s ({mb_s:.0f} MB/s)",
            file=out,
        )
    print(
        f"duplicate ids dropped: {dd['rows_dropped']} row(s) of {dd['ids']} id(s)"
        + (f", e.g. {', '.join(map(repr, dd['examples'][:5]))}" if dd["examples"] else ""),
        file=out,
    )
    if res.deleted_shards:
        print(f"deleted {res.deleted_shards} shard(s) after verifying the output", file=out)
    print(f"manifest: {os.path.join(out_dir, '_manifest.json')}", file=out)
    print("load into BigQuery (embedding becomes ARRAY<FLOAT64>):", file=out)
    print(f"  {upload_command(out_dir, args.gcs_prefix)}", file=out)
    print(f"  {bq_load_command(m, args.bq_table, args.gcs_prefix)}", file=out)
    if len(m["files"]) > 10_000 or res.bytes_out > 15 * 10**12:
        print(
            "  note: a load job takes at most 10,000 source URIs and 15 TB; split the files over several jobs "
            "(e.g. 'embeddings-000*.parquet', 'embeddings-001*.parquet', ...)",
            file=out,
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from tweet_embed.cli.common import rules_from_args
    from tweet_embed.consolidate.verify import VerifyError, verify
    from tweet_embed.input.records import InputError

    shards_dir, out_dir = _dirs(args)
    rules = rules_from_args(args)
    if isinstance(rules, str):
        log.error("%s", rules)
        return 2
    try:
        report = verify(
            args.inputs,
            input_format=args.input_format,
            rules=rules,
            out_dir=out_dir,
            shards_dir=shards_dir,
            id_field=args.id_field,
            text_field=args.text_field,
            examples=args.examples,
            checksums=args.checksums,
            memory_limit=args.memory_limit,
            temp_dir=args.temp_dir,
        )
    except (VerifyError, InputError) as exc:
        log.error("%s", exc)
        return 2
    print(report.text())
    return 0 if report.ok else 1


def cmd_search(args: argparse.Namespace) -> int:
    from tweet_embed.backends import BackendError
    from tweet_embed.consolidate.search import SearchError, format_hits, search

    shards_dir, out_dir = _dirs(args)
    try:
        hits = search(
            args.query,
            out_dir=out_dir,
            shards_dir=shards_dir,
            k=args.k,
            inputs=args.input,
            urls=args.url,
            device=args.device,
            id_field=args.id_field,
            text_field=args.text_field,
            query_prompt=args.query_prompt,
            query_prompt_name=args.query_prompt_name,
        )
    except (SearchError, BackendError) as exc:
        log.error("%s", exc)
        return 1
    print(format_hits(args.query, hits))
    return 0
