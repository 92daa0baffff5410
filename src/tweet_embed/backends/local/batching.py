"""Batches by token budget: texts sorted by length, cut into one-padded-length batches, padded into arrays.

Lengths are padded to a multiple (16 on a GPU) and partial batches' row counts rounded, so the set of shapes a
GPU sees stays small and can be warmed (or captured as CUDA graphs) once.
"""

from __future__ import annotations

import numpy as np


def pad_length(n: int, multiple: int, max_len: int) -> int:
    """Round a token count up to the padding multiple (never past the model's maximum)."""
    return min(-(-int(n) // multiple) * multiple, max_len) if multiple > 1 else int(n)


def rows_for(length: int, token_budget: int, max_rows: int) -> int:
    """Rows per batch at a padded length: as many as the token budget allows, a multiple of 8 above 8."""
    r = max(1, min(max_rows, token_budget // max(1, length)))
    return r - r % 8 if r > 8 else r


def plan_batches(
    sorted_lengths: np.ndarray,
    token_budget: int,
    max_rows: int,
    multiple: int,
    max_len: int,
    min_tokens: int = 0,
) -> list[tuple[int, int, int]]:
    """Cut length-sorted texts into ``(start, end, padded_length)`` batches within the token budget.

    Each batch holds texts of one padded length (a bucket), so padding costs at most ``multiple - 1`` tokens
    per text; a bucket is cut into full batches of ``rows_for(length)`` rows and one partial batch. Then a
    batch under ``min_tokens`` is merged with its neighbour when both fit the budget at the longer length:
    on a GPU every batch costs milliseconds of Python launching, which for a small model like MiniLM weighs
    more than the extra padding.
    """
    n = len(sorted_lengths)
    if n == 0:
        return []
    padded = np.minimum(-(-np.asarray(sorted_lengths, dtype=np.int64) // multiple) * multiple, max_len)
    out: list[tuple[int, int, int]] = []
    # bucket boundaries: where the padded length changes (sorted input, so buckets are contiguous)
    cuts = np.flatnonzero(np.diff(padded)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [n]])
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        length = int(padded[s])
        rows = rows_for(length, token_budget, max_rows)
        out.extend((i, min(i + rows, e), length) for i in range(s, e, rows))
    if min_tokens <= 0:
        return out
    merged: list[tuple[int, int, int]] = []
    for s, e, length in out:
        if merged:
            ps, pe, plen = merged[-1]
            small = (pe - ps) * plen < min_tokens or (e - s) * length < min_tokens
            if small and e - ps <= rows_for(length, token_budget, max_rows):
                merged[-1] = (ps, e, length)  # sorted: ``length`` is the longer one
                continue
        merged.append((s, e, length))
    return merged


def shape_rows(rows: int, length: int, token_budget: int, max_rows: int, steps: int = 8) -> int:
    """Rows to actually run for a batch: a partial batch rounded up by at most 1/steps of its size.

    Why: every new (rows, length) shape is slow the first time it runs (kernel choice, allocator growth);
    rounding to ``steps`` values per power of two keeps the set of shapes small at the cost of a few dummy
    rows (at most 12.5%, never more than a full batch).
    """
    full = rows_for(length, token_budget, max_rows)
    if rows >= full:
        return rows
    quantum = max(8, (1 << (int(rows).bit_length() - 1)) // steps)
    return min(full, -(-rows // quantum) * quantum)


def pad_rows(
    flat: np.ndarray,
    offsets: np.ndarray,
    lengths: np.ndarray,
    rows: np.ndarray,
    length: int,
    total_rows: int | None = None,
) -> np.ndarray:
    """Gather the token ids of ``rows`` into a zero-padded ``(total_rows, length)`` int32 array (vectorised)."""
    cols = np.arange(length, dtype=np.int64)
    lens = lengths[rows]
    mask = cols[None, :] < lens[:, None]
    out = np.zeros((total_rows or len(rows), length), dtype=np.int32)
    out[: len(rows)][mask] = flat[(offsets[rows][:, None] + cols[None, :])[mask]]
    return out
