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
