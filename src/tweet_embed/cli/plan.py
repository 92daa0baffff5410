"""``plan``: argument parsing only (the embed parser plus the plan's own flags); the library is
tweet_embed.embed.estimate."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from tweet_embed.cli.common import EXIT_BACKEND, EXIT_ERROR, EXIT_OK

log = logging.getLogger("tweet_embed")

PLAN_EXAMPLES = """\
examples:
  tweet-embed plan tweets.jsonl --tei-urls http://gpu1:8080/embed,http://gpu2:8080/embed
  tweet-embed plan part-*.jsonl.zst --tei-urls http://gpu1:8080/embed --calibrate 60 --json
  tweet-embed plan tweets.jsonl --calibrate 0          # no traffic to the servers: counts and bytes only
A later `tweet-embed embed` with the same inputs and --work-dir reuses the plan's scan (plan.json).
"""


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    from tweet_embed.cli.embed import add_embed_parser

    p = add_embed_parser(
        sub,
        "plan",
        help="before a run: lines, chunks, rejects, repeats, token lengths, measured docs/s, time and bytes",
        description="Estimate a run (takes every embed option) without running it.",
        epilog=PLAN_EXAMPLES,
    )
    g = p.add_argument_group("plan")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    g.add_argument(
        "--calibrate",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="send real batches of sampled texts for this long to measure docs/s (0: skip)",
    )
    g.add_argument("--sample-lines", type=int, default=10_000, help="at least this many lines sampled")
    g.add_argument(
        "--distinct",
        choices=("auto", "exact", "sample"),
        default="auto",
        help="distinct texts: exact builds the whole input's dedupe map (which a later embed reuses), sample "
        "estimates from the sample (an upper bound: far-apart repeats are missed); auto: exact up to 20M lines",
    )
    p.set_defaults(plan_runner=run_plan)  # cmd_embed builds the options, then hands them to run_plan


def run_plan(args: argparse.Namespace, opts: Any, spec: Any) -> int:
    import asyncio

    import orjson

    from tweet_embed.backends import BackendError
    from tweet_embed.embed.chunks import PlanError
    from tweet_embed.embed.estimate import format_table, make_estimate
    from tweet_embed.input.records import InputError

    try:
        report = asyncio.run(
            make_estimate(
                opts,
                spec,
                sample_lines=args.sample_lines,
                calibrate=max(0.0, args.calibrate),
                distinct=args.distinct,
            )
        )
    except (PlanError, InputError) as exc:
        log.error("%s", exc)
        return EXIT_ERROR
    except BackendError as exc:
        log.error("%s", exc)
        return EXIT_BACKEND
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        print(format_table(report))
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    add_plan_parser(sub)
