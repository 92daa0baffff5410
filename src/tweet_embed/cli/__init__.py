"""Command line: argument parsing only; every command calls the library.

Heavy libraries (torch, duckdb, ray, database clients) are imported inside the commands that need them, so
``tweet-embed --help`` starts fast. Each command's parser lives in its own module here (embed, consolidate,
export) and registers itself; this module only dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable

from tweet_embed._version import __version__
from tweet_embed.cli.common import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Formatter

log = logging.getLogger("tweet_embed")

# Modules that add subcommands: each exposes ``register(subparsers)``. The optional ones may be missing from a
# trimmed install, so they are imported by name.
_REGISTRARS: list[str] = [
    "tweet_embed.cli.embed",
    "tweet_embed.cli.plan",
    "tweet_embed.cli.report",
    "tweet_embed.cli.consolidate",
    "tweet_embed.cli.export",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tweet-embed",
        formatter_class=Formatter,
        description="Embed tens to hundreds of millions of tweets into Parquet, resumably and exactly once.",
        epilog="phases: export → embed → consolidate (see each command's --help)",
    )
    parser.add_argument("--version", action="version", version=f"tweet-embed {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _REGISTRARS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        register: Callable[[argparse._SubParsersAction], None] = module.register
        register(sub)
    return parser


def setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("tweet_embed")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    setup_logging(args.quiet, args.verbose)
    import signal

    def terminate(signum: int, frame: object) -> None:
        # Treat SIGTERM as Ctrl-C: inside asyncio.run that cancels the main task cleanly (asyncio's own
        # SIGINT handling) instead of raising wherever the main thread happens to be.
        signal.raise_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, terminate)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        log.error("interrupted; finished chunks are kept; re-run the same command to resume")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())


def consolidate_main(argv: list[str] | None = None) -> int:
    """Entry point of ``consolidate_embeddings.py``: the CLI's main with ``consolidate`` in front."""
    return main(["consolidate", *(sys.argv[1:] if argv is None else argv)])
