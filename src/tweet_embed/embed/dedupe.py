"""Each distinct text embedded once per run: the chunk-side half (text hashes, the dedupe map, the slot store).

The planning scan (:mod:`tweet_embed.embed.dedupe_plan`) hashes every valid text and names, for every valid row
(global index ``g`` over the valid rows in plan order), its *canonical* row: the first row with the same text.
A row is embedded only where it is its own canonical. A repeat in the same chunk copies its canonical's vector;
a repeat of a text first seen in an earlier chunk reads it from the **slot store**: a fixed-record file of
float32 vectors (one slot per text that occurs in more than one chunk) with a one-byte flag per slot.

Why a slot store rather than reading the canonical's shard: a chunk's repeats point at canonicals spread over
all earlier chunks (the tail of the repeat distribution), and a Parquet shard cannot be read by row; a slot is
one ``pread`` at a known offset.

Crash safety and determinism:
- A canonical chunk writes its vectors, fsyncs them, then sets the flags (1 = vector, 2 = the server refused
  the text), all before its shard and marker; a marker therefore implies its slots are set.
- Slots are write-once: a chunk that finds its slot already set (a killed run wrote it) takes that vector
  instead of embedding the text again, so a repeat that read the slot and the canonical's shard always hold the
  same bytes, whatever moment the run was killed at.
- Publishing is first-writer-wins under a lock (:meth:`SlotStore.publish`), and the publisher's own rows take
  what the slot holds afterwards.
- A repeat waits for its slot's flag. Chunks are handed out in plan order and canonicals come first, so the
  earliest chunk still writing slots never waits; and a repeat that has waited ``PATIENCE`` seconds embeds
  and publishes the text itself, so a lost chunk cannot hold the others up.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tweet_embed.backends.base import BackendError

HASH_BYTES = 16
MAP_RECORD = np.dtype([("canon", "<i8"), ("slot", "<i8")])  # per valid row, in plan order
SLOT_OK, SLOT_REFUSED = 1, 2
WAIT_POLL = 0.01  # seconds between looks at the flags of slots another chunk is still embedding
# A repeat waits this long for the chunk that embeds its text first, then embeds and publishes the text itself
# (first publisher wins, so both chunks still hold the same bytes): a lost or stalled chunk (an actor gone with
# its node, a task Ray has not started) never holds the run up for longer.
PATIENCE = 120.0


class DedupeError(BackendError):
    """The dedupe map or slot store does not fit this chunk (changed input, lost files), a slot never came, or
    ``--reuse`` output was made with other vector-changing settings than this run's."""


# shard metadata that does not decide a text's vector: the tool version, the device it ran on, and the text
# mode (it changes which text is embedded, and the text hash follows the text itself)
NOT_VECTOR_META = ("version", "device", "text_mode")


def vector_meta(meta: dict[str, str]) -> dict[str, str]:
    """The metadata that must match for vectors to be interchangeable (model, dim, normalize, prompt, ...)."""
    return {k: v for k, v in sorted(meta.items()) if k not in NOT_VECTOR_META}


def check_reuse_meta(reused: dict[str, str], run: dict[str, str], source: str) -> None:
    """Refuse vectors from an earlier run that differ in any vector-changing setting, naming both values."""
    a, b = vector_meta(reused), vector_meta(run)
    diffs = [
        f"{k}: {a.get(k)!r} there, {b.get(k)!r} in this run"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    if diffs:
        raise DedupeError(
            f"--reuse {source} was embedded with other settings than this run:\n  "
            + "\n  ".join(diffs)
            + "\nreuse only output of the same model and options (or drop --reuse)"
        )


def text_hashes(texts: Sequence[str]) -> np.ndarray:
    """XXH3-128 of each text's UTF-8 bytes, as an ``(n, 16)`` uint8 array (the shards' ``text_hash``).

    Why XXH3-128 (the ``xxhash`` package): a 128-bit hash made for this, twice as fast as blake2b-128 per short
    text here; the chance that two of n distinct texts collide is about n²/2¹²⁹ (1.5e-21 for a billion).
    """
    from xxhash import xxh3_128_digest

    n = len(texts)
    if n == 0:
        return np.empty((0, HASH_BYTES), np.uint8)
    # Bytes, not str: xxhash 4 refuses str (3.x hashed its UTF-8 bytes, so the digests are the same).
    # surrogatepass: never a crash here on a stray lone surrogate (texts are cleaned before this).
    digests = (xxh3_128_digest(t.encode("utf-8", "surrogatepass")) for t in texts)
    return np.frombuffer(b"".join(digests), np.uint8).reshape(n, HASH_BYTES)


@dataclass(frozen=True)
class DedupeFiles:
    """Where one run's dedupe map and slot store live (a local directory every worker can reach)."""

    root: str
    chunk_offsets: tuple[int, ...]  # chunks planned before each input file: a chunk's position in the plan
    slots: int  # texts that occur in more than one chunk, or come from an earlier run
    reuse_meta: tuple[tuple[str, str], ...] = ()  # vector metadata of the --reuse sources (checked per chunk)
    reuse_label: str = ""

    def position(self, file_index: int, chunk_index: int) -> int:
        return self.chunk_offsets[file_index] + chunk_index

    @property
    def map_path(self) -> str:
        return os.path.join(self.root, "map.bin")

    @property
    def bounds_path(self) -> str:
        return os.path.join(self.root, "bounds.npy")

    @property
    def index_path(self) -> str:
        return os.path.join(self.root, "index.json")

    @property
    def vectors_path(self) -> str:
        return os.path.join(self.root, "slots.f32")

    @property
    def flags_path(self) -> str:
        return os.path.join(self.root, "slots.flags")


@dataclass
class ChunkMap:
    """One chunk's slice of the map: for each valid row its canonical (global index) and slot (or -1)."""

    first: int  # global index of the chunk's first valid row
    canon: np.ndarray
    slot: np.ndarray

    @classmethod
    def read(cls, files: DedupeFiles, file_index: int, chunk_index: int) -> ChunkMap:
        pos = files.position(file_index, chunk_index)
        bounds = np.load(files.bounds_path, mmap_mode="r")
        lo, hi = int(bounds[pos]), int(bounds[pos + 1])
        with open(files.map_path, "rb") as fh:
            fh.seek(lo * MAP_RECORD.itemsize)
            data = fh.read((hi - lo) * MAP_RECORD.itemsize)
        if len(data) != (hi - lo) * MAP_RECORD.itemsize:
            raise DedupeError(f"dedupe map {files.map_path} is shorter than planned")
        rec = np.frombuffer(data, MAP_RECORD)
        return cls(lo, rec["canon"].astype(np.int64), rec["slot"].astype(np.int64))


class SlotStore:
    """The run's shared vectors: ``slots.f32`` (``slots x dim`` float32) and ``slots.flags`` (a byte each)."""

    def __init__(self, files: DedupeFiles, dim: int) -> None:
        self.files, self.slots, self.dim = files, files.slots, dim
        slots = files.slots
        self._vec = os.open(files.vectors_path, os.O_RDWR | os.O_CREAT, 0o644)
        self._flg = os.open(files.flags_path, os.O_RDWR | os.O_CREAT, 0o644)
        for fd, size in ((self._vec, slots * dim * 4), (self._flg, slots)):
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)  # sparse: disk is used only by the slots written

    def close(self) -> None:
        for fd in (self._vec, self._flg):
            with contextlib.suppress(OSError):
                os.close(fd)

    def flags(self, slots: np.ndarray) -> np.ndarray:
        if len(slots) == 0:
            return np.empty(0, np.uint8)
        lo, hi = int(slots.min()), int(slots.max()) + 1
        window = np.frombuffer(os.pread(self._flg, hi - lo, lo), np.uint8)
        return window[slots - lo]

    def read(self, slots: np.ndarray) -> np.ndarray:
        rec = self.dim * 4
        out = np.empty((len(slots), self.dim), np.float32)
        for i, s in enumerate(slots.tolist()):
            out[i] = np.frombuffer(os.pread(self._vec, rec, s * rec), np.float32)
        return out

    def publish(
        self, slots: np.ndarray, vectors: np.ndarray, flags: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Publish vectors into slots that are still unset; the first publisher wins.

        Returns the vectors and flags the slots hold afterwards (ours, or an earlier publisher's), which the
        caller must use for its own rows, so that a shard and every repeat read from the slot agree bit for bit.
        Under an exclusive ``flock`` of the flags file: check, write vectors, make them durable, then the flags.
        """
        vectors = np.array(vectors, dtype=np.float32, copy=True)
        flags = np.array(flags, dtype=np.uint8, copy=True)
        if len(slots) == 0:
            return vectors, flags
        fcntl.flock(self._flg, fcntl.LOCK_EX)
        try:
            current = self.flags(slots)
            taken = current != 0
            if taken.any():
                vectors[taken] = self.read(slots[taken])
                flags[taken] = current[taken]
            if (~taken).any():
                self.write(slots[~taken], vectors[~taken], flags[~taken])
        finally:
            fcntl.flock(self._flg, fcntl.LOCK_UN)
        return vectors, flags

    def write(self, slots: np.ndarray, vectors: np.ndarray, flags: np.ndarray) -> None:
        """Vectors first, made durable, then the flags that publish them (a reader never sees a torn one).
        Unconditional: use :meth:`publish` where another chunk may publish the same slots."""
        if len(slots) == 0:
            return
        rec = self.dim * 4
        order = np.argsort(slots, kind="stable")
        slots, vectors, flags = slots[order], np.ascontiguousarray(vectors[order], np.float32), flags[order]
        for s, v in zip(slots.tolist(), vectors, strict=True):
            os.pwrite(self._vec, v.tobytes(), s * rec)
        os.fdatasync(self._vec)
        for s, f in zip(slots.tolist(), flags.tolist(), strict=True):
            os.pwrite(self._flg, bytes((f,)), s)
        os.fdatasync(self._flg)

    async def wait(self, slots: np.ndarray, patience: float) -> np.ndarray:
        """The flags of ``slots``, once all are set or ``patience`` seconds have passed (0 = unset)."""
        t0 = time.monotonic()
        delay = WAIT_POLL
        while True:
            f = self.flags(slots)
            if len(f) == 0 or f.all() or time.monotonic() - t0 > patience:
                return f
            await asyncio.sleep(delay)
            delay = min(0.2, delay * 1.5)
