"""A pool of HTTP endpoints: least-outstanding balancing, per-endpoint input caps, retries, resting.

Why shared: TEI and OpenAI-compatible servers fail the same ways (429 overload, 5xx, dropped connections,
hangs, bad answers). One place decides what is retried, where the next try goes, and when to give up.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from tweet_embed.backends.base import BackendError

log = logging.getLogger("tweet_embed")
T = TypeVar("T")


class RetryableError(Exception):
    """This try failed in a way another try (maybe elsewhere) can fix: overload, 5xx, network, bad answer."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(f"{cause}: {detail}")
        self.cause = cause


class BatchRefused(Exception):
    """The server refused this batch as such (too many inputs, body too large, a text it cannot take).

    The caller splits the batch; a single text that is still refused becomes a reject with this reason.
    """


class FatalError(BackendError):
    """Retrying cannot help (authentication failed, wrong URL): stop the run with this message."""


def redact_url(url: str) -> str:
    """Hide ``user:password@`` in URLs before they are printed or stored."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, f"***@{host}", parts.path, parts.query, parts.fragment))


# Upper bounds (seconds) of the request latency histogram, Prometheus-style (cumulative when exported).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"))
RECENT_LATENCIES = 4096  # latencies kept between two reads of recent_latencies (for p50/p95 per interval)


@dataclass
class Endpoint:
    url: str
    capacity: int = 512  # inputs in flight at once (TEI's max_concurrent_requests counts inputs)
    outstanding: int = 0
    consecutive_failures: int = 0
    rest_until: float = 0.0
    rest_started: float = 0.0  # when the last rest began: requests sent before it failed in the same outage
    rests: int = 0  # rests in the current failure streak (reset by a success): the next rest doubles
    last_error: str = ""
    last_cause: str = ""  # short: "connection refused", "503", "timeout"... (the waiting note shows it)
    ok: int = 0
    failed: int = 0
    inputs: int = 0  # inputs answered
    errors: Counter[str] = field(default_factory=Counter)  # by HTTP status or cause
    latency_counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_sum: float = 0.0
    recent_latencies: list[float] = field(default_factory=list)

    @property
    def name(self) -> str:
        return redact_url(self.url)

    @property
    def host(self) -> str:
        """``host:port`` only: what an operator recognises in one line."""
        return urlsplit(self.url).netloc.rsplit("@", 1)[-1] or self.name

    def observe(self, seconds: float) -> None:
        """Record a successful request's latency."""
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency_counts[i] += 1
                break
        self.latency_sum += seconds
        if len(self.recent_latencies) < RECENT_LATENCIES:
            self.recent_latencies.append(seconds)

    def take_recent_latencies(self) -> list[float]:
        """The latencies since the last call (another thread may call this: swap, never mutate in place)."""
        out, self.recent_latencies = self.recent_latencies, []
        return out

    def resting(self, now: float | None = None) -> bool:
        return self.rest_until > (time.monotonic() if now is None else now)

    def snapshot(self) -> dict[str, Any]:
        """Cumulative counters as plain data (for a driver in another process; see ``Backend.telemetry``)."""
        return {
            "requests": self.ok,
            "inputs": self.inputs,
            "errors": dict(self.errors),
            "latency_counts": list(self.latency_counts),
            "latency_sum": self.latency_sum,
            "in_flight": self.outstanding,
            "resting": self.resting(),
        }


def short_cause(cause: str, message: str) -> str:
    """A few words for a failure: the status code, or what the network said."""
    if cause == "connection":
        low = message.lower()
        for words in ("connection refused", "name or service not known", "no route to host", "reset"):
            if words in low:
                return words
        return "connection failed"
    if cause == "timeout":
        return "no answer (timeout)"
    if cause == "bad_answer":
        return "bad answer"
    return cause


@dataclass
class RetryPolicy:
    max_retry_time: float = 600.0  # give up when no endpoint has answered for this long
    base_delay: float = 0.05
    max_delay: float = 10.0
    rest_after: int = 3  # consecutive failures before an endpoint is rested
    max_rest: float = 30.0


@dataclass
class EndpointPool:
    endpoints: list[Endpoint]
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    retries: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("no endpoints given")
        # Woken (replaced) whenever capacity frees up. Deliberately no Condition/Lock: the event loop is
        # single-threaded and pick+reserve has no await, and a lock held by a cancelled waiter (wait_for around
        # Condition.wait) deadlocked every other request at shutdown.
        self._wakeup: asyncio.Future[None] | None = None
        self.last_success = time.monotonic()
        self.active = 0  # calls not yet returned (sending, backing off, or waiting for an endpoint)

    def waiting_for(self, now: float | None = None) -> float:
        """Seconds no endpoint has answered while work is waiting for one (0 when things are fine)."""
        now = time.monotonic() if now is None else now
        busy = self.active > 0
        return max(0.0, now - self.last_success) if busy else 0.0

    def waiting_note(self, after: float = 5.0) -> str | None:
        """The "waiting for servers" sentence while no server has answered for ``after`` s, else None."""
        now = time.monotonic()
        silent = self.waiting_for(now)
        if silent < after:
            return None
        parts = []
        for e in self.endpoints:
            if e.consecutive_failures and e.last_cause:
                why = e.last_cause + (" (resting)" if e.resting(now) else "")
            elif e.outstanding:
                why = f"no answer yet ({e.outstanding} inputs in flight)"
            else:
                why = "idle"
            parts.append(f"{e.host} {why}")
        return (
            f"waiting for servers: none has answered for {silent:.0f} s "
            f"(giving up after {self.policy.max_retry_time:.0f} s); " + ", ".join(parts)
        )

    def _pick(self, n: int) -> Endpoint | None:
        now = time.monotonic()
        live = [e for e in self.endpoints if e.rest_until <= now]
        if not live:
            return None
        fits = [e for e in live if e.outstanding + n <= e.capacity or e.outstanding == 0]
        if not fits:
            return None
        return min(fits, key=lambda e: (e.outstanding / max(1, e.capacity), e.consecutive_failures))

    async def _acquire(self, n: int, deadline: float) -> Endpoint:
        while True:
            ep = self._pick(n)
            if ep is not None:
                ep.outstanding += n
                return ep
            now = time.monotonic()
            if now >= deadline:
                raise self._give_up()
            resting = [e.rest_until for e in self.endpoints if e.rest_until > now]
            wait = min([r - now for r in resting] + [1.0, deadline - now])
            if self._wakeup is None or self._wakeup.done():
                self._wakeup = asyncio.get_running_loop().create_future()
            # asyncio.wait neither cancels the shared future on timeout nor leaves a task behind
            await asyncio.wait([self._wakeup], timeout=max(0.01, wait))

    async def _release(self, ep: Endpoint, n: int) -> None:
        ep.outstanding -= n  # synchronous: a cancelled request cannot leak its reservation
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    def _give_up(self) -> BackendError:
        lines = [f"  {e.name}: {e.last_error or 'no error recorded'}" for e in self.endpoints]
        return BackendError(
            f"no embedding endpoint answered for {self.policy.max_retry_time:.0f} s "
            f"(--max-retry-time); last errors:\n" + "\n".join(lines)
        )

    async def call(self, n_inputs: int, fn: Callable[[Endpoint], Awaitable[T]]) -> T:
        """Run ``fn(endpoint)`` until it succeeds, moving between endpoints on retryable errors."""
        self.active += 1
        try:
            return await self._call(n_inputs, fn)
        finally:
            self.active -= 1

    async def _call(self, n_inputs: int, fn: Callable[[Endpoint], Awaitable[T]]) -> T:
        attempt = 0
        while True:
            deadline = self.last_success + self.policy.max_retry_time
            ep = await self._acquire(n_inputs, deadline)
            t0 = time.monotonic()
            try:
                result = await fn(ep)
            except RetryableError as exc:
                await self._release(ep, n_inputs)
                self._failed(ep, exc.cause, str(exc), t0)
                attempt += 1
                if time.monotonic() >= self.last_success + self.policy.max_retry_time:
                    raise self._give_up() from exc
                delay = min(self.policy.max_delay, self.policy.base_delay * 2 ** min(attempt, 10))
                await asyncio.sleep(random.uniform(0, delay))
                continue
            except BaseException:
                await self._release(ep, n_inputs)
                raise
            await self._release(ep, n_inputs)
            now = time.monotonic()
            ep.ok += 1
            ep.inputs += n_inputs
            ep.observe(now - t0)
            ep.consecutive_failures = 0
            ep.rests = 0
            self.last_success = now
            return result

    def _failed(self, ep: Endpoint, cause: str, message: str, sent: float | None = None) -> None:
        """Count a failed request (``sent``: when it went out) and rest the endpoint when it keeps failing.

        The rest grows per outage, not per request: ``rest_after`` consecutive failures rest it 0.5 s, and
        each later failure of a request sent after the rest began (the probe once the rest is over) doubles
        the rest, up to ``max_rest``. Requests that were already in flight when the rest began (64 of them
        failing together when a server drops its connections) are the same outage: they are counted, but
        neither start nor lengthen a rest, so a 3 s outage costs a few seconds of rest, not the 30 s cap.
        """
        now = time.monotonic()
        self.retries[cause] += 1
        ep.failed += 1
        ep.errors[cause] += 1
        ep.consecutive_failures += 1
        ep.last_error = message[:300]
        ep.last_cause = short_cause(cause, message)
        if sent is not None and sent < ep.rest_started:
            return  # in flight when the current rest began: already accounted for
        if ep.rests or ep.consecutive_failures >= self.policy.rest_after:
            rest = min(self.policy.max_rest, 0.5 * 2**ep.rests)
            ep.rests += 1
            ep.rest_started = now
            ep.rest_until = now + rest
            if ep.rests == 1:
                log.warning(
                    "resting %s for %.1fs after %d failures (%s)",
                    ep.name,
                    rest,
                    ep.consecutive_failures,
                    ep.last_error,
                )
