"""Response bodies → validated float32 ``(n, d)`` arrays, and the worker pool that does it off the event loop.

Why a module of its own: decoding is the client's hot path. A TEI ``/embed`` answer at 1,024 dimensions is
~400 KB of JSON per 32 texts; ``json`` + numpy handles ~2,000 texts/s on one core, which is what a single
GPU serves. Here:

* JSON float arrays are parsed with simdjson straight into a C buffer of doubles (``as_buffer``: no Python
  float per value, ~3x ``orjson`` + ``np.asarray``), falling back to orjson when simdjson is missing or the
  body is malformed (the slow path then gives the precise error).
* base64 (``encoding_format: "base64"`` of ``/v1/embeddings``) is decoded with pybase64 (SIMD, releases
  the GIL), falling back to :mod:`binascii`.
* :class:`DecodePool` runs JSON-float decoding of large bodies in worker *processes* (simdjson and orjson hold
  the GIL, so threads would not scale), bodies and vectors passing through shared memory, and the rest
  (base64, small bodies) on the event loop itself. Sized by ``--workers`` (default: all cores but the one the
  event loop runs on; 1 or fewer: everything on the loop).

  Why not a decode thread: a 400 KB body decodes in ~1 ms, and a thread that holds the GIL for it makes the
  event loop wait up to the 5 ms switch interval after each of its syscalls (the convoy effect), and pays the
  hand-over both ways. Measured on 2 cores (client and test server, 100k lines, 1,024 dimensions): decode on
  the loop ~18-20k docs/s JSON and ~35k base64, one thread ~17k / ~30k, two processes ~16k / ~30k (and a
  third more CPU).

Every decoder validates what it returns: the number of vectors, one dimension for all, finite values, and
(OpenAI) the ``index`` order. A bad answer raises :class:`DecodeError` (a ``ValueError``), which the HTTP
backends retry.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from typing import Any

import numpy as np
import orjson

from tweet_embed.procs import available_cores, exit_with_parent, leave_ctrl_c_to_parent

try:  # optional accelerators (core dependencies, but the slow paths keep working without them)
    import simdjson as _simdjson
except ImportError:  # pragma: no cover - exercised only without the wheel
    _simdjson = None  # type: ignore[assignment]
try:
    import pybase64 as _pybase64

    def _b64decode(s: str | bytes) -> bytes:
        return _pybase64.b64decode(s, validate=True)
except ImportError:  # pragma: no cover

    def _b64decode(s: str | bytes) -> bytes:
        return binascii.a2b_base64(s, strict_mode=True)


__all__ = [
    "DecodeError",
    "DecodePool",
    "decode_embed_json",
    "decode_openai_base64",
    "decode_openai_floats",
    "DECODERS",
    "accelerators",
    "default_workers",
]


class DecodeError(ValueError):
    """The server's answer is not what was asked for (count, dimension, NaN, order, syntax)."""


def accelerators() -> dict[str, bool]:
    """Which fast decoders are importable (shown by the benchmark)."""
    return {"simdjson": _simdjson is not None, "pybase64": "_pybase64" in globals()}


def default_workers() -> int:
    """Decode processes by default: every core but the event loop's (which also parses the input, speaks
    HTTP and decodes small bodies). On 2 cores that is 1, i.e. no process: handing bodies to a process
    there cost more than it saved (see the module docstring)."""
    return max(1, available_cores() - 1)


def check(arr: np.ndarray, n: int, dim: int | None) -> np.ndarray:
    """Count, dimension and finiteness of a decoded batch; returns C-contiguous float32."""
    if arr.ndim != 2 or arr.shape[0] != n:
        raise DecodeError(f"expected {n} vectors, got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise DecodeError(f"expected dimension {dim}, got {arr.shape[1]}")
    if arr.shape[1] == 0:
        raise DecodeError("empty vectors")
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise DecodeError("response holds non-finite values (NaN or inf)")
    return out


# ------------------------------------------------------------------------------------ TEI /embed floats


def _embed_json_slow(body: bytes, n: int, dim: int | None) -> np.ndarray:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"invalid JSON: {exc}") from None
    if not isinstance(obj, list):
        raise DecodeError(f"expected a JSON array of vectors, got {type(obj).__name__}")
    if len(obj) != n or n == 0:
        raise DecodeError(f"expected {n} vectors, got {len(obj)}")
    lengths = {len(r) if isinstance(r, list) else -1 for r in obj}
    if -1 in lengths:
        raise DecodeError("expected arrays of numbers")
    if len(lengths) > 1:
        raise DecodeError(f"vectors of different lengths: {sorted(lengths)[:5]}")
    return _rows_to_array(obj, n, dim)


def _rows_to_array(rows: list[list[Any]], n: int, dim: int | None) -> np.ndarray:
    """Parsed rows (lists of one length) → the checked float32 array; a null (NaN or inf) or a non-number
    is a DecodeError."""
    if any(v is None for r in rows for v in r):
        raise DecodeError("response holds non-finite values (null, i.e. NaN or inf)")
    try:
        arr = np.asarray(rows, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise DecodeError(f"not numbers: {exc}") from None
    return check(arr, n, dim)


_local = threading.local()


def _parser() -> Any:
    """One simdjson parser per thread (reused: its buffers are sized by the largest body seen)."""
    p = getattr(_local, "parser", None)
    if p is None:
        p = _local.parser = _simdjson.Parser()
    return p


def _flat_rows(rows: Any, n: int) -> np.ndarray | None:
    """A simdjson array of ``n`` equal-length arrays of numbers → float64 ``(n, d)``, else None."""
    if not isinstance(rows, _simdjson.Array) or len(rows) != n or n == 0:
        return None
    d = -1
    for row in rows:
        if not isinstance(row, _simdjson.Array) or (d >= 0 and len(row) != d):
            return None
        d = len(row)
    flat = np.frombuffer(rows.as_buffer(of_type="d"), dtype=np.float64)
    if flat.size != n * d:  # nested deeper than two levels
        return None
    return flat.reshape(n, d)


def _embed_json_fast(body: bytes, n: int, dim: int | None) -> np.ndarray | None:
    """simdjson: one C pass into a double buffer. None when anything is off (the slow path explains)."""
    doc = None
    try:
        doc = _parser().parse(body)
        arr = _flat_rows(doc, n)
    except (ValueError, TypeError, RuntimeError):
        return None
    finally:
        doc = None  # a reused parser refuses to parse while proxies of the last document live
    return None if arr is None else check(arr, n, dim)


def decode_embed_json(body: bytes, n: int, dim: int | None) -> np.ndarray:
    """TEI ``/embed`` body (a JSON array of ``n`` arrays of floats) → float32 ``(n, d)``."""
    if _simdjson is not None:
        out = _embed_json_fast(body, n, dim)
        if out is not None:
            return out
    return _embed_json_slow(body, n, dim)


# ------------------------------------------------------------------------------ OpenAI /v1/embeddings


def _data(body: bytes, n: int) -> list[dict[str, Any]]:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"invalid JSON: {exc}") from None
    data = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise DecodeError('expected {"data": [{"embedding": ..., "index": ...}, ...]}')
    if len(data) != n:
        raise DecodeError(f"expected {n} embeddings, got {len(data)}")
    if any(d.get("index") != i for i, d in enumerate(data)):
        try:
            data = sorted(data, key=lambda d: d["index"])
        except (KeyError, TypeError):
            raise DecodeError("response items lack a valid index") from None
        if [d["index"] for d in data] != list(range(n)):
            raise DecodeError("response indices do not match the inputs")
    return data


def decode_openai_base64(body: bytes, n: int, dim: int | None) -> np.ndarray:
    """``encoding_format: "base64"``: each ``embedding`` is little-endian float32 bytes in base64."""
    data = _data(body, n)
    if data and isinstance(data[0].get("embedding"), list):  # a server that ignores encoding_format
        return decode_openai_floats(body, n, dim)
    try:
        raws = [_b64decode(d["embedding"]) for d in data]
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise DecodeError(f"embedding is not base64: {exc}") from None
    sizes = {len(r) for r in raws}
    if len(sizes) != 1 or (size := sizes.pop()) % 4:
        raise DecodeError("base64 embeddings of different or odd sizes")
    arr = np.frombuffer(b"".join(raws), dtype="<f4").reshape(n, size // 4)
    return check(arr, n, dim)


def _openai_floats_fast(body: bytes, n: int, dim: int | None) -> np.ndarray | None:
    doc = data = item = emb = None
    try:
        doc = _parser().parse(body)
        data = doc["data"] if isinstance(doc, _simdjson.Object) else None
        if not isinstance(data, _simdjson.Array) or len(data) != n or n == 0:
            return None
        parts = []
        for i, item in enumerate(data):
            if not isinstance(item, _simdjson.Object) or item.get("index") != i:
                return None
            emb = item.get("embedding")
            if not isinstance(emb, _simdjson.Array):
                return None
            parts.append(np.frombuffer(emb.as_buffer(of_type="d"), dtype=np.float64))
            emb = None
        if len({p.size for p in parts}) != 1:
            return None
        arr = np.stack(parts)
    except (ValueError, TypeError, RuntimeError, KeyError):
        return None
    finally:
        doc = data = item = emb = None
    return check(arr, n, dim)


def decode_openai_floats(body: bytes, n: int, dim: int | None) -> np.ndarray:
    """``encoding_format: "float"``: each ``embedding`` is a JSON array of numbers."""
    if _simdjson is not None:
        out = _openai_floats_fast(body, n, dim)
        if out is not None:
            return out
    data = _data(body, n)
    try:
        rows = [d["embedding"] for d in data]
    except KeyError:
        raise DecodeError("response item without embedding") from None
    lengths = {len(r) if isinstance(r, list) else -1 for r in rows}
    if -1 in lengths or len(lengths) != 1:
        raise DecodeError("embeddings are not arrays of one length")
    return _rows_to_array(rows, n, dim)


Decoder = Callable[[bytes, int, "int | None"], np.ndarray]
DECODERS: dict[str, Decoder] = {
    "embed_json": decode_embed_json,
    "openai_base64": decode_openai_base64,
    "openai_float": decode_openai_floats,
}
# Formats whose decoding holds the GIL for long: worth a trip to another process.
_HEAVY = {"embed_json", "openai_float"}


def _run(kind: str, body: bytes, n: int, dim: int | None) -> np.ndarray:
    return DECODERS[kind](body, n, dim)


# Bodies travel to the decode processes through shared-memory slots, and the vectors come back the same way:
# pickling them through the executor's pipes cost more CPU than the decoding itself (64 KiB pipe writes
# and reads, ping-ponging between processes, several copies).
SLOT_BYTES = 4 << 20  # larger bodies are pickled
# Handing a body to a process costs the event loop's process ~0.4 ms whatever its size; decoding JSON floats
# here costs ~2 µs per KB. Below this size a thread of this process is cheaper overall (32 vectors at 384
# dimensions are ~150 KB, at 1,024 ~400 KB).
PROCESS_MIN_BYTES = 256 << 10
_attached: dict[str, Any] = {}  # in a decode process: slot name → SharedMemory, attached once


def _run_slot(kind: str, name: str, size: int, n: int, dim: int | None) -> tuple[int, int] | np.ndarray:
    """(Decode process.) Decode the body in slot ``name``; write the vectors back into it when they fit
    and return their shape, else return them."""
    shm = _attached.get(name)
    if shm is None:
        from multiprocessing import shared_memory

        shm = _attached[name] = shared_memory.SharedMemory(name=name)
    buf: Any = shm.buf
    body = bytes(buf[:size])
    arr = DECODERS[kind](body, n, dim)
    if arr.nbytes > shm.size:
        return arr
    dst = np.ndarray(arr.shape, dtype=np.float32, buffer=shm.buf)
    dst[...] = arr
    del dst
    return arr.shape


def _warm() -> int:
    return os.getpid()


def _worker_init(parent: int) -> None:
    """In each decode process: leave Ctrl-C to the parent, and die with it (even after ``kill -9``)."""
    leave_ctrl_c_to_parent()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    exit_with_parent(parent)


class DecodePool:
    """Where decoding runs. ``workers`` <= 1: on the event loop; N > 1: N processes for JSON float bodies of
    ``PROCESS_MIN_BYTES`` or more (bodies and vectors pass through shared-memory slots), the event loop for
    the rest (base64, small bodies: cheaper than any hand-over, see the module docstring).

    Processes start with ``spawn`` (safe with the event loop's threads) when the pool starts, so the first
    batches do not pay for it. As with any ``spawn`` pool, a script that runs one needs the
    ``if __name__ == "__main__":`` guard.
    """

    def __init__(self, workers: int | None = None) -> None:
        self.workers = default_workers() if workers is None else max(0, workers)
        self._procs: ProcessPoolExecutor | None = None
        self._slots: list[Any] = []  # SharedMemory blocks, two per process (also bounds decodes in flight)
        self._free: asyncio.Queue[int] | None = None

    @property
    def uses_processes(self) -> bool:
        return self.workers > 1

    async def start(self) -> None:
        if self.uses_processes:
            import multiprocessing

            self._procs = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_worker_init,
                initargs=(os.getpid(),),
            )
            from multiprocessing import shared_memory

            try:
                loop = asyncio.get_running_loop()
                await asyncio.gather(*(loop.run_in_executor(self._procs, _warm) for _ in range(self.workers)))
                for _ in range(2 * self.workers):
                    self._slots.append(shared_memory.SharedMemory(create=True, size=SLOT_BYTES))
            except BaseException:
                self.close()
                raise
            self._free = asyncio.Queue()
            for i in range(len(self._slots)):
                self._free.put_nowait(i)

    def executor(self, kind: str) -> Executor | None:
        """The process pool for JSON floats when there is one; None: decoded on the event loop."""
        if kind in _HEAVY and self._procs is not None:
            return self._procs
        return None

    async def decode(self, kind: str, body: bytes, n: int, dim: int | None) -> np.ndarray:
        executor = self.executor(kind)
        if executor is None or len(body) < PROCESS_MIN_BYTES:
            return _run(kind, body, n, dim)  # cheaper here than any hand-over
        if self._free is not None and len(body) <= SLOT_BYTES:
            return await self._decode_in_slot(kind, body, n, dim)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(executor, _run, kind, body, n, dim)

    async def _decode_in_slot(self, kind: str, body: bytes, n: int, dim: int | None) -> np.ndarray:
        assert self._free is not None and self._procs is not None
        loop = asyncio.get_running_loop()
        i = await self._free.get()
        shm = self._slots[i]
        shm.buf[: len(body)] = body
        try:
            cf = self._procs.submit(_run_slot, kind, shm.name, len(body), n, dim)
        except BaseException:
            self._free.put_nowait(i)
            raise

        def release(_: object) -> None:  # once the process is done with the slot
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._free.put_nowait, i)  # type: ignore[union-attr]

        try:
            res = await asyncio.wrap_future(cf)
        except BaseException:  # cancelled or failed: the process may still be using the slot
            cf.add_done_callback(release)
            raise
        try:
            if isinstance(res, np.ndarray):
                return res
            view = np.ndarray(tuple(res), dtype=np.float32, buffer=shm.buf)
            out = view.copy()
            del view
            return out
        finally:
            self._free.put_nowait(i)

    def close(self) -> None:
        if self._procs is not None:
            self._procs.shutdown(wait=True, cancel_futures=True)
            self._procs = None
        for shm in self._slots:
            with contextlib.suppress(OSError, BufferError):
                shm.close()
                shm.unlink()
        self._slots, self._free = [], None
