"""CLI for ``export mongo``, ``export bigquery`` and ``load bigquery`` (parsing only; see tweet_embed.export).

Database clients are optional extras, imported only when a command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from typing import Any

log = logging.getLogger("tweet_embed")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

EXPORT_EXAMPLES = """\
examples:
  tweet-embed export mongo --uri mongodb://host:27017 --db twitter --collection tweets --out tweets.jsonl.zst
  tweet-embed export mongo --db twitter --collection tweets --query '{"lang": "en"}' --out en.jsonl.gz
  tweet-embed export bigquery --table my-project.twitter.tweets --out tweets.jsonl.zst
  tweet-embed export bigquery --query 'SELECT id, text FROM `p.d.t` WHERE lang = "en"' --out en.jsonl.zst
Re-running the same command after an interruption resumes where the last commit left off.
"""

LOAD_EXAMPLES = """\
examples:
  tweet-embed load bigquery --table my-project.twitter.embeddings embeddings/consolidated
  tweet-embed load bigquery --table my-project.twitter.embeddings gs://my-bucket/run1/consolidated --replace
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _add_out_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output file: .jsonl, .jsonl.gz or .jsonl.zst")
    g.add_argument(
        "--restart", action="store_true", help="discard an unfinished export to --out and start again"
    )
    g.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    g.add_argument("--commit-rows", type=int, default=None, help=argparse.SUPPRESS)


def _add_emulator_options(p: argparse.ArgumentParser, read: bool) -> None:
    g = p.add_argument_group("emulator (tests, local development; anonymous credentials)")
    g.add_argument("--api-endpoint", help="BigQuery REST endpoint, e.g. http://127.0.0.1:9050")
    if read:
        g.add_argument("--read-endpoint", help="Storage Read API gRPC endpoint, e.g. 127.0.0.1:9060")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export`` (mongo, bigquery) and ``load`` (bigquery) to the main parser."""
    export = sub.add_parser(
        "export",
        help="export {_id, text} from MongoDB or BigQuery to JSONL (resumable)",
        description="Export {_id, text} from a database to the JSONL that `embed` reads.",
        epilog=EXPORT_EXAMPLES,
        formatter_class=_Formatter,
    )
    export_sub = export.add_subparsers(dest="source", metavar="SOURCE")

    m = export_sub.add_parser(
        "mongo",
        help="a MongoDB collection (needs tweet-embed[mongo])",
        formatter_class=_Formatter,
        description="Stream _id and the text field of a collection, sorted by _id, to JSONL. "
        "An interrupted export resumes after the last _id written; documents "
        "inserted meanwhile with a smaller _id are not picked up.",
    )
    m.add_argument(
        "--uri",
        help="connection string (default: $MONGODB_URI, else mongodb://localhost:27017); "
        "prefer the variable for passwords: arguments are visible to other users",
    )
    m.add_argument("--db", required=True, help="database")
    m.add_argument("--collection", required=True, help="collection")
    m.add_argument("--query", help='filter in (extended) JSON, e.g. \'{"lang": "en"}\'')
    m.add_argument(
        "--text-field",
        default="text",
        help="field holding the text, dotted paths allowed (default: %(default)s)",
    )
    m.add_argument(
        "--text-mode",
        choices=("full", "raw"),
        default="full",
        help="raw Twitter API documents with the default --text-field: full = the whole text a reader sees "
        "(extended text, retweets rebuilt, HTML entities unescaped); raw = the 'text' field as stored",
    )
    m.add_argument("--batch-size", type=int, default=5000, help="documents per batch (default: %(default)s)")
    m.add_argument(
        "--max-retries",
        type=int,
        default=5,
        help="reconnections in a row before giving up (default: %(default)s)",
    )
    _add_out_options(m)
    m.set_defaults(func=cmd_export_mongo)

    b = export_sub.add_parser(
        "bigquery",
        help="a BigQuery table or query (needs tweet-embed[bigquery])",
        formatter_class=_Formatter,
        description="Read a table or a query result through the BigQuery Storage Read "
        "API (Arrow, several streams) with Application Default Credentials.",
    )
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--table", help="PROJECT.DATASET.TABLE")
    src.add_argument("--query", help="standard SQL; its result table is read")
    b.add_argument("--id-column", default="id", help="(default: %(default)s)")
    b.add_argument("--text-column", default="text", help="(default: %(default)s)")
    b.add_argument("--project", help="project billed for the query and the read session (default: from ADC)")
    b.add_argument("--location", help="query location, e.g. US or EU")
    b.add_argument(
        "--query-destination", help="write the query result to this table instead of BigQuery's anonymous one"
    )
    b.add_argument(
        "--streams", type=int, default=4, help="read streams (threads) requested (default: %(default)s)"
    )
    _add_out_options(b)
    _add_emulator_options(b, read=True)
    b.set_defaults(func=cmd_export_bigquery)
    export.set_defaults(func=_help_of(export))

    load = sub.add_parser(
        "load",
        help="load consolidated Parquet into a database (BigQuery)",
        description="Load the consolidated Parquet into a table.",
        epilog=LOAD_EXAMPLES,
        formatter_class=_Formatter,
    )
    load_sub = load.add_subparsers(dest="target", metavar="TARGET")
    lb = load_sub.add_parser(
        "bigquery",
        help="a BigQuery table (needs tweet-embed[bigquery])",
        formatter_class=_Formatter,
        epilog=LOAD_EXAMPLES,
        description="Run load jobs of the consolidated Parquet with list inference on, so "
        "the embedding lands as ARRAY<FLOAT64>; prints job ids and row count.",
    )
    lb.add_argument(
        "source",
        metavar="OUT_DIR_OR_GCS_URI",
        help="the consolidated directory (or one .parquet file), or gs://bucket/prefix[/*.parquet]",
    )
    lb.add_argument("--table", required=True, help="PROJECT.DATASET.TABLE")
    mode = lb.add_mutually_exclusive_group()
    mode.add_argument(
        "--replace",
        action="store_const",
        dest="mode",
        const="replace",
        help="replace the table's rows (WRITE_TRUNCATE); default: refuse a table with rows",
    )
    mode.add_argument(
        "--append",
        action="store_const",
        dest="mode",
        const="append",
        help="append to the table (WRITE_APPEND)",
    )
    lb.set_defaults(mode="empty")
    lb.add_argument("--project", help="project that runs the load jobs (default: from ADC)")
    lb.add_argument("--location", help="dataset location, e.g. US or EU")
    _add_emulator_options(lb, read=False)
    lb.set_defaults(func=cmd_load_bigquery)
    load.set_defaults(func=_help_of(load))


def _help_of(parser: argparse.ArgumentParser):  # type: ignore[no-untyped-def]
    def show(args: argparse.Namespace) -> int:
        parser.print_help()
        return EXIT_USAGE

    return show


def _summary(result) -> str:  # type: ignore[no-untyped-def]
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(result.skipped.items()) if v) or "none"
    resumed = " (resumed)" if result.resumed else ""
    return (
        f"wrote {result.rows} rows to {result.out}{resumed} in {result.seconds:.1f}s; "
        f"skipped {result.skipped_total} ({skipped})"
    )


def _commit_kw(args: argparse.Namespace) -> dict:
    return {"commit_rows": args.commit_rows} if args.commit_rows else {}


def _run_export(export: Callable[[], Any]) -> int:
    """Run one export and print its summary; an ExportError is logged (exit 2 for a missing extra, else 1)."""
    from tweet_embed.export import ExportError

    try:
        result = export()
    except ExportError as exc:
        log.error("%s", exc)
        return EXIT_USAGE if "pip install" in str(exc) else EXIT_ERROR
    print(_summary(result))
    return EXIT_OK


def cmd_export_mongo(args: argparse.Namespace) -> int:
    from tweet_embed.export.mongo import export_mongo, parse_query

    def export() -> Any:
        uri = args.uri or os.environ.get("MONGODB_URI") or "mongodb://localhost:27017"
        return export_mongo(
            uri,
            args.db,
            args.collection,
            args.out,
            query=parse_query(args.query),
            text_field=args.text_field,
            text_mode=args.text_mode,
            batch_size=args.batch_size,
            restart=args.restart,
            overwrite=args.overwrite,
            max_retries=args.max_retries,
            **_commit_kw(args),
        )

    return _run_export(export)


def cmd_export_bigquery(args: argparse.Namespace) -> int:
    from tweet_embed.export.bigquery import export_bigquery, make_clients

    def export() -> Any:
        bq = read = None
        if args.api_endpoint or args.read_endpoint:
            bq, read = make_clients(args.project, args.api_endpoint, args.read_endpoint)
        return export_bigquery(
            args.out,
            table=args.table,
            query=args.query,
            id_column=args.id_column,
            text_column=args.text_column,
            project=args.project,
            location=args.location,
            query_destination=args.query_destination,
            streams=args.streams,
            restart=args.restart,
            overwrite=args.overwrite,
            bq_client=bq,
            read_client=read,
            **_commit_kw(args),
        )

    return _run_export(export)


def cmd_load_bigquery(args: argparse.Namespace) -> int:
    from tweet_embed.export import ExportError
    from tweet_embed.load.bigquery import LoadError, load_bigquery

    try:
        bq = None
        if args.api_endpoint:
            from tweet_embed.export.bigquery import make_clients

            bq, _ = make_clients(args.project, args.api_endpoint)
        result = load_bigquery(
            args.table,
            args.source,
            mode=args.mode,
            project=args.project,
            location=args.location,
            bq_client=bq,
        )
    except (LoadError, ExportError) as exc:
        log.error("%s", exc)
        return EXIT_USAGE if "pip install" in str(exc) else EXIT_ERROR
    for job in result.jobs:
        print(f"job {job}")
    print(
        f"loaded {result.rows} rows into {result.table} ({result.files} file(s)"
        + (f", table now has {result.table_rows} rows)" if result.table_rows is not None else ")")
    )
    return EXIT_OK
