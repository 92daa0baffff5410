#!/usr/bin/env python3
"""The original entry point, kept working: ``python embed_tweets.py --input-file FILE --tei-urls URL[,URL]``.

It maps the original flags onto ``tweet-embed embed`` (same defaults: ./embeddings/{tmp,progress,shards}).
Without ``--tei-urls`` it uses the in-process all-MiniLM-L6-v2.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))

from tweet_embed.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
