"""Fault injection for the test server: per-request probabilities, latency, and scripted outcomes."""

from __future__ import annotations

import random
from dataclasses import dataclass, fields

__all__ = ["FAULT_FIELDS", "FAULT_KINDS", "OUTCOMES", "Faults"]

# Outcome counters (pre-created so snapshots never race a dict resize).
OUTCOMES = (
    "ok",
    "429",
    "503",
    "dropped",
    "hung",
    "bad_count",
    "bad_dim",
    "nan",
    "413",
    "422",
    "400",
    "401",
    "415",
)
# Scriptable outcomes for queue_faults (same order as the probability checks).
FAULT_KINDS = ("ok", "429", "503", "drop", "hang", "bad_count", "bad_dim", "nan")


@dataclass(frozen=True)
class Faults:
    """Per-request fault probabilities and latency; replaced as a whole so other threads may flip them."""

    p_429: float = 0.0
    p_503: float = 0.0
    p_drop: float = 0.0
    p_hang: float = 0.0
    p_bad_count: float = 0.0
    p_bad_dim: float = 0.0
    p_nan: float = 0.0
    latency: float = 0.0  # seconds added to every embed request (not device time: requests overlap)
    latency_per_text: float = 0.0  # seconds added per input text
    hang_seconds: float = 3600.0  # a hung request is dropped after this long (or at stop())

    def draw(self, rng: random.Random) -> str:
        for kind, p in (
            ("429", self.p_429),
            ("503", self.p_503),
            ("drop", self.p_drop),
            ("hang", self.p_hang),
            ("bad_count", self.p_bad_count),
            ("bad_dim", self.p_bad_dim),
            ("nan", self.p_nan),
        ):
            if p > 0.0 and (p >= 1.0 or rng.random() < p):
                return kind
        return "ok"


FAULT_FIELDS = frozenset(f.name for f in fields(Faults))
