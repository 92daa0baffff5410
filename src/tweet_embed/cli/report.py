"""``report``: argument parsing only; the library is tweet_embed.embed.report."""

from __future__ import annotations

import argparse
import logging
import os

from tweet_embed.cli.common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, Formatter, add_dir_options, dirs_from_args

log = logging.getLogger("tweet_embed")


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="after (or during) a run: one self-contained HTML page of where the time went, plus a PNG",
        description="Charts from the run journal (events.jsonl) and the plan's estimate, in one HTML file "
        "that opens without a network (needs matplotlib: pip install 'tweet-embed[report]').",
        epilog="example:\n  tweet-embed report --work-dir /nvme/run1 --out run1.html   # also writes run1.png",
        formatter_class=Formatter,
    )
    add_dir_options(p)
    p.add_argument(
        "--out", default="report.html", help="the HTML file; the main chart goes beside it as .png"
    )
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from tweet_embed.embed.report import MissingDependency, write_report

    dirs = dirs_from_args(args)
    png = os.path.splitext(args.out)[0] + ".png"
    try:
        d = write_report(dirs.progress, args.out, png)
    except MissingDependency as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except FileNotFoundError as exc:
        log.error("%s", exc)
        return EXIT_ERROR
    print(f"{args.out} ({len(d['runs'])} run(s), {d['rows']:,} rows); main chart: {png}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    add_report_parser(sub)
