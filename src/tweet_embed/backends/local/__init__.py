"""In-process model backend: the embedded default when no server URL is given.

Why its own pipeline instead of ``SentenceTransformer.encode``: ``encode`` tokenizes on one core and pads every
batch to its longest text, which leaves a GPU idle most of the time (5-9k docs/s for MiniLM on an H100/H200
against a forward limit above 200k). Here, on a GPU: texts are tokenized in worker processes, by
:class:`WordCacheTokenizer` where it applies (BERT-style tokenizers: the Rust tokenizer's ids, bit for bit,
for a fifth to a tenth of its CPU per text; the tokenizer was the limit of the whole pipeline), sorted by
length and cut into one-padded-length batches by a token budget (lengths padded to a multiple of 16, row
counts rounded, so the set of shapes stays small and is warmed); BERT models run through :class:`LeanBert` (a
few torch calls per layer instead of transformers' module code), small ones as CUDA graphs; host buffers are
pinned and copies asynchronous; and the GPU work of one call overlaps the tokenization of the next (two calls in
flight). Output rows come back in input order. On CPU the same pipeline runs in fp32 on every core. Measured
figures: README, "Local model and GPUs"; the tokenizer's: ``bench/tokenizer_bench.py``.

torch, transformers and sentence-transformers are imported inside :meth:`LocalBackend.start`, never at module
import, so the CLI starts fast and machines without the ``local`` extra can still use HTTP backends.


Modules: :mod:`.spec` (what ``--model`` and ``--devices`` name), :mod:`.tokenizer` (the tokenizer as set up
here, :class:`WordCacheTokenizer`, tokenizer processes), :mod:`.batching` (token-budget batches and padding),
:mod:`.forward` (:class:`LeanBert`, the pooled forward, CUDA graphs), :mod:`.backend` (:class:`LocalBackend`).
"""

from __future__ import annotations

from tweet_embed.backends.local.backend import LocalBackend
from tweet_embed.backends.local.batching import pad_length, pad_rows, plan_batches, rows_for, shape_rows
from tweet_embed.backends.local.forward import Forward, LeanBert
from tweet_embed.backends.local.spec import (
    INSTALL_HINT,
    MINILM_ALIASES,
    MINILM_ID,
    RANDOM_SHAPES,
    minilm_dir,
    model_width,
    resolve_devices,
)
from tweet_embed.backends.local.tokenizer import (
    PROBE_TEXTS,
    WordCacheTokenizer,
    default_tokenizer_workers,
    encode_ids,
    fast_tokenizer,
    load_tokenizer,
)

__all__ = [
    "INSTALL_HINT",
    "MINILM_ALIASES",
    "MINILM_ID",
    "PROBE_TEXTS",
    "RANDOM_SHAPES",
    "Forward",
    "LeanBert",
    "LocalBackend",
    "WordCacheTokenizer",
    "default_tokenizer_workers",
    "encode_ids",
    "fast_tokenizer",
    "load_tokenizer",
    "minilm_dir",
    "model_width",
    "pad_length",
    "pad_rows",
    "plan_batches",
    "resolve_devices",
    "rows_for",
    "shape_rows",
]
