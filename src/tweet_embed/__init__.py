"""tweet-embed: embed tens to hundreds of millions of tweets into Parquet, resumably and exactly once.

Library use (the CLI is a thin layer over this)::

    from tweet_embed import embed_multi
    for id_, vector in embed_multi([("1", "hello"), ("2", "world")]):
        ...
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import embed_multi  # noqa: E402

__all__ = ["__version__", "embed_multi"]
