#!/usr/bin/env python3
"""Consolidate the shards of embed_tweets.py into BigQuery-ready Parquet.

With no arguments: ./embeddings/shards → ./embeddings/consolidated. Every option of
``tweet-embed consolidate`` works here too (see --help).
"""

import os
import sys

try:
    from tweet_embed.cli import consolidate_main as main
except ImportError:  # a clone that was not pip-installed: use the source tree
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
    from tweet_embed.cli import consolidate_main as main

if __name__ == "__main__":
    sys.exit(main())
