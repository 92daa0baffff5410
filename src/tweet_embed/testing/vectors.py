"""The test server's deterministic "model": one pseudo-random float32 vector per text.

Why deterministic: a test must know the exact vector a server answers for a text without asking it, so it can
check bytes end to end (shards, consolidate, verify) and prove which text a row came from.

blake2b of the UTF-8 bytes picks signed rows of a fixed Gaussian table (seeded by the dimension), summed; then,
like TEI (core/src/infer.rs ``embed_pooled``), the vector is truncated to ``dimensions`` (Matryoshka) and
L2-normalised when ``normalize`` is true — in that order, so a truncated vector is renormalised.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

__all__ = ["expected_vector", "expected_vectors"]

_TABLE_ROWS = 4096  # rows of the Gaussian table; 16-bit hash words pick rows with the low 12 bits
_TERMS = 8  # signed rows summed per vector
_CHUNK = 256  # rows per vectorised step (keeps the (rows, terms, dim) gather in cache)


@lru_cache(maxsize=8)
def _table(dim: int) -> np.ndarray:
    """Fixed Gaussian table for one dimension (same in every process: seeded by the dimension)."""
    rng = np.random.default_rng([0x7E1E, dim])
    tab = rng.standard_normal((_TABLE_ROWS, dim), dtype=np.float32)
    tab.flags.writeable = False
    return tab


def _vectors_chunk(texts: Sequence[str], dim: int, normalize: bool, dimensions: int | None) -> np.ndarray:
    n = len(texts)
    digest = b"".join(
        hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=2 * _TERMS).digest() for t in texts
    )
    words = np.frombuffer(digest, dtype="<u2").reshape(n, _TERMS)
    idx = (words & (_TABLE_ROWS - 1)).astype(np.intp)
    signs = np.where(words & 0x8000, np.float32(-1.0), np.float32(1.0)).astype(np.float32)
    # (n, 1, T) @ (n, T, dim): one small product per row, so a row never depends on the batch around it.
    out = np.matmul(signs[:, None, :], _table(dim)[idx])[:, 0, :]
    if dimensions is not None and dimensions < dim:
        out = np.ascontiguousarray(out[:, :dimensions])
    if normalize:
        # Row-wise reduction: each row's norm does not depend on the other rows in the batch.
        norms = np.sqrt(np.add.reduce(out * out, axis=1, keepdims=True))
        out /= norms
    return out


def expected_vectors(
    texts: Sequence[str], dim: int, normalize: bool = True, dimensions: int | None = None
) -> np.ndarray:
    """The float32 ``(n, dimensions or dim)`` vectors the server returns for ``texts`` (row i is texts[i]'s).

    Deterministic, independent of batching, and fast (vectorised; ~1 µs per text at dim 384).  ``texts`` are
    what the model sees: with a prompt, pass ``prompt + text``.  ``dimensions`` truncates before normalising.
    """
    n = len(texts)
    width = dim if dimensions is None else min(dim, dimensions)
    if n <= _CHUNK:
        if n == 0:
            return np.zeros((0, width), dtype=np.float32)
        return _vectors_chunk(texts, dim, normalize, dimensions)
    out = np.empty((n, width), dtype=np.float32)
    for start in range(0, n, _CHUNK):
        out[start : start + _CHUNK] = _vectors_chunk(
            texts[start : start + _CHUNK], dim, normalize, dimensions
        )
    return out


@lru_cache(maxsize=4096)
def expected_vector(text: str, dim: int, normalize: bool = True, dimensions: int | None = None) -> np.ndarray:
    """The float32 vector the server returns for one text (read-only, cached)."""
    v = _vectors_chunk([text], dim, normalize, dimensions)[0]
    v.flags.writeable = False
    return v
