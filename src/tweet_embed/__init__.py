"""tweet-embed: embed tens to hundreds of millions of tweets into Parquet, resumably and exactly once.

Library use (the CLI is a thin layer over this)::

    from tweet_embed import embed_multi
    for id_, vector in embed_multi([("1", "hello"), ("2", "world")]):
        ...
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tweet_embed._version import __version__

if TYPE_CHECKING:
    from tweet_embed.api import embed_multi

__all__ = ["__version__", "embed_multi"]


def __getattr__(name: str) -> Any:
    """``embed_multi`` is imported on first use: ``tweet-embed --help`` and every CLI start-up would
    otherwise pay for numpy, pyarrow and asyncio (~0.2 s) before parsing an argument."""
    if name == "embed_multi":
        from tweet_embed.api import embed_multi

        return embed_multi
    raise AttributeError(f"module 'tweet_embed' has no attribute {name!r}")
