"""The one interface every backend implements: ``embed(texts) -> float32 (n, d)`` plus ``info()``.

Why so small: the run loop, the Ray engine and ``search`` only need to turn a list of texts into vectors;
retries, balancing and protocol details stay inside each backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class BackendError(Exception):
    """The backend cannot produce vectors (all endpoints failed for too long, a model will not load...)."""


@dataclass
class BackendInfo:
    """What the output's metadata and the run manifest record about the model."""

    kind: str  # "tei", "openai" or "local"
    model: str  # model id as the server or the loader reports it
    dim: int
    normalize: bool = True
    max_batch: int = 256  # texts per call that suit this backend
    max_in_flight: int = 8  # calls worth running at once
    extra: dict[str, str] = field(default_factory=dict)

    def metadata(self) -> dict[str, str]:
        md = {
            "backend": self.kind,
            "model": self.model,
            "dim": str(self.dim),
            "normalize": str(self.normalize).lower(),
        }
        md.update(self.extra)
        return md


class Backend(ABC):
    """Turns texts into vectors. Async so that HTTP backends can keep many requests in flight."""

    @abstractmethod
    async def start(self) -> BackendInfo:
        """Connect / load, learn the model id and dimension."""

    @abstractmethod
    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Return a new C-contiguous float32 array of shape ``(len(texts), dim)``, rows in input order (the
        caller keeps it: never a view of a buffer the backend reuses)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections, threads, GPU memory."""

    def stats(self) -> dict[str, int]:
        """Counters for the summary (retries by cause, splits...)."""
        return {}

    def waiting_note(self, after: float = 5.0) -> str | None:
        """While no server has answered for ``after`` s: one line saying so and why (HTTP backends)."""
        return None

    def endpoints(self) -> list[Any]:
        """The HTTP backends' :class:`~tweet_embed.backends.pool.Endpoint` objects (read-only use)."""
        return []

    def device_counters(self) -> dict[str, dict[str, float]]:
        """The in-process model's work per device (``"cpu"``, ``"cuda:1"``): ``batches``, ``texts``,
        ``tokens`` (real ones), ``padded_tokens`` (what the model ran, padding included) and ``seconds`` of
        device time, each cumulative since start. HTTP backends have none."""
        return {}

    def telemetry(self) -> dict[str, Any]:
        """Everything a driver needs to show this backend's figures, as plain picklable data: cumulative
        counters per endpoint (``Endpoint.snapshot``) and per device, and :meth:`stats`. Worker processes
        (``--devices``, ``--engine ray``) send it back with each finished chunk."""
        eps: dict[str, Any] = {}
        for e in self.endpoints():
            eps[e.host] = merge_endpoint(eps.get(e.host), e.snapshot())
        return {"endpoints": eps, "devices": self.device_counters(), "stats": dict(self.stats())}


def merge_endpoint(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Two snapshots of the same endpoint (two workers, or two URLs on one host:port) added up: counters
    and in-flight inputs summed, resting if either rests."""
    if a is None:
        return {**b, "errors": dict(b["errors"]), "latency_counts": list(b["latency_counts"])}
    errors = dict(a["errors"])
    for k, v in b["errors"].items():
        errors[k] = errors.get(k, 0) + v
    return {
        "requests": a["requests"] + b["requests"],
        "inputs": a["inputs"] + b["inputs"],
        "errors": errors,
        "latency_counts": [x + y for x, y in zip(a["latency_counts"], b["latency_counts"], strict=True)],
        "latency_sum": a["latency_sum"] + b["latency_sum"],
        "in_flight": a["in_flight"] + b["in_flight"],
        "resting": bool(a["resting"] or b["resting"]),
    }


def check_vectors(vectors: np.ndarray, n: int, dim: int | None) -> np.ndarray:
    """Validate a batch before it can be written: count, dimension, finite values.

    Raises ValueError (which HTTP backends treat as a retryable bad answer).
    """
    if vectors.ndim != 2 or vectors.shape[0] != n:
        raise ValueError(f"expected {n} vectors, got shape {vectors.shape}")
    if dim is not None and vectors.shape[1] != dim:
        raise ValueError(f"expected dimension {dim}, got {vectors.shape[1]}")
    if not np.isfinite(vectors).all():
        raise ValueError("response holds non-finite values (NaN or inf)")
    return np.ascontiguousarray(vectors, dtype=np.float32)
