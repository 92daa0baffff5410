#!/usr/bin/env python3
"""Write synthetic tweet-like JSONL (``{"_id": ..., "text": ...}``) for the demo, tests and benchmarks."""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from tweet_embed.testing.synth import write_jsonl  # noqa: E402

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lines", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--repeat-fraction", type=float, default=0.0, help="share of lines repeating an earlier text"
    )
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    write_jsonl(a.out, a.lines, seed=a.seed, repeat_fraction=a.repeat_fraction)
