"""The endpoint pool's resting, against the real test server going away and coming back."""

from __future__ import annotations

import asyncio
import time

from tweet_embed.backends.tei import TEIBackend
from tweet_embed.testing.server import TEIServer

DIM = 8


def test_an_outage_rests_the_endpoint_per_outage_not_per_failed_request() -> None:
    """64 requests in flight when the server drops every connection and is gone for 3 s: they fail in the
    same moment, which is one outage. The rest grows per rest (0.5, 1, 2, 4 s...), not per failed request
    (64 failures made it the 30 s cap before), so the run goes on within seconds of the server's return."""
    with TEIServer(dim=DIM, latency=0.4) as srv:
        backend = TEIBackend([srv.url])

        async def go() -> tuple[float, float, int, int]:
            await backend.start()
            [ep] = backend.endpoints()
            longest = 0.0

            async def watch() -> None:
                nonlocal longest
                while True:
                    longest = max(longest, ep.rest_until - time.monotonic())
                    await asyncio.sleep(0.02)

            watcher = asyncio.ensure_future(watch())
            try:
                calls = [asyncio.ensure_future(backend.embed([f"text {i}"])) for i in range(64)]
                await asyncio.sleep(0.15)  # all sent; the server holds each one 0.4 s
                in_flight = ep.outstanding
                t_dead = time.monotonic()
                await asyncio.to_thread(srv.set_faults, dead=True, revive_after=3.0)
                vecs = await asyncio.gather(*calls)
                took = time.monotonic() - t_dead
            finally:
                watcher.cancel()
                await backend.close()
            assert all(v.shape == (1, DIM) for v in vecs)
            return took, longest, in_flight, ep.errors["connection"]

        took, longest, in_flight, failures = asyncio.run(go())
    assert in_flight == 64
    assert failures >= 64  # every request in flight failed (and the probes after each rest)
    assert longest <= 4.05  # rests of 0.5, 1 and 2 s cover the 3 s; the next would be 4 s
    assert took < 3.0 + 4.0 + 1.5  # back within one rest of the server's return
