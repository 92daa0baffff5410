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
from typing import TypeVar
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


@dataclass
class Endpoint:
    url: str
    capacity: int = 512  # inputs in flight at once (TEI's max_concurrent_requests counts inputs)
    outstanding: int = 0
    consecutive_failures: int = 0
    rest_until: float = 0.0
    last_error: str = ""
    ok: int = 0
    failed: int = 0

    @property
    def name(self) -> str:
        return redact_url(self.url)


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
        attempt = 0
        while True:
            deadline = self.last_success + self.policy.max_retry_time
            ep = await self._acquire(n_inputs, deadline)
            try:
                result = await fn(ep)
            except RetryableError as exc:
                await self._release(ep, n_inputs)
                self._failed(ep, exc.cause, str(exc))
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
            ep.ok += 1
            ep.consecutive_failures = 0
            self.last_success = time.monotonic()
            return result

    def _failed(self, ep: Endpoint, cause: str, message: str) -> None:
        self.retries[cause] += 1
        ep.failed += 1
        ep.consecutive_failures += 1
        ep.last_error = message[:300]
        if ep.consecutive_failures >= self.policy.rest_after:
            rest = min(self.policy.max_rest, 0.5 * 2 ** (ep.consecutive_failures - self.policy.rest_after))
            ep.rest_until = time.monotonic() + rest
            if ep.consecutive_failures == self.policy.rest_after:
                log.warning(
                    "resting %s for %.1fs after %d failures (%s)",
                    ep.name,
                    rest,
                    ep.consecutive_failures,
                    ep.last_error,
                )
