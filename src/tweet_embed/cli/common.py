"""What every command's parser shares: the help formatter, exit codes, the directory options."""

from __future__ import annotations

import argparse

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_BACKEND, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def at_least_one(value: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def add_dir_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("directories")
    g.add_argument(
        "--work-dir", help="one directory for all three: D/tmp, D/progress, D/shards (default ./embeddings)"
    )
    g.add_argument("--tmp-dir", help="staging for shards being written (fast disk)")
    g.add_argument("--progress-dir", help="markers, manifest, plan, rejects")
    g.add_argument("--output-dir", help="final Parquet shards (large disk)")


def dirs_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from tweet_embed.embed.chunks import WorkDirs

    return WorkDirs.from_options(args.work_dir, args.tmp_dir, args.progress_dir, args.output_dir)


def add_format_options(g: argparse._ArgumentGroup) -> None:
    """``--format`` and ``--text-mode``: how input files are read (embed, verify)."""
    g.add_argument(
        "--format",
        dest="input_format",
        choices=("auto", "jsonl", "json", "csv", "tsv", "parquet", "twarc2"),
        default="auto",
        help="input format; auto: told from each file's content (docs/input.md)",
    )
    g.add_argument(
        "--text-mode",
        choices=("full", "raw"),
        default="full",
        help="Twitter API objects: full = the whole text a reader sees (extended text, retweets rebuilt, "
        "HTML entities unescaped); raw = the API's text field as is",
    )


def add_filter_options(p: argparse.ArgumentParser) -> None:
    """``--lang``, ``--skip-retweets``, ``--min-text-length`` (embed, verify)."""
    g = p.add_argument_group("filters (skipped rows are counted by reason, not rejected)")
    g.add_argument("--lang", help="keep only records whose 'lang' is one of these, e.g. en,es")
    g.add_argument("--skip-retweets", action="store_true", help="leave retweets out")
    g.add_argument(
        "--min-text-length",
        type=int,
        default=0,
        metavar="N",
        help="leave out texts shorter than N characters (surrounding whitespace not counted)",
    )


def rules_from_args(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The run's input rules (input.rules.Rules), or an error message for a bad value."""
    from tweet_embed.input.rules import Rules

    langs = tuple(sorted({x.strip() for x in (args.lang or "").split(",") if x.strip()}))
    if args.lang is not None and not langs:
        return "--lang needs at least one language code, e.g. --lang en,es"
    return Rules(args.text_mode, langs, args.skip_retweets, max(0, args.min_text_length))
