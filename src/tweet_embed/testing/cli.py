"""``python -m tweet_embed.testing.server``: the test server as a standalone process (prints its URL)."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from collections.abc import Sequence
from typing import Any

from .app import TEIServer
from .faults import FAULT_FIELDS
from .protocol import TEI_VERSION

__all__ = ["main"]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tweet_embed.testing.server",
        description="A TEI 1.9.3-compatible test embedding server (deterministic vectors, faults, capacity).",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = ephemeral")
    p.add_argument("--dim", type=int, default=None)
    p.add_argument("--model-id", default=None)
    p.add_argument("--version", default=None, help=f"TEI version to claim (default {TEI_VERSION})")
    p.add_argument("--max-client-batch-size", type=int, default=None)
    p.add_argument(
        "--max-concurrent-requests",
        type=int,
        default=None,
        help="inputs accepted and not yet answered before 429 (TEI's permits; default 512)",
    )
    p.add_argument("--max-input-length", type=int, default=None)
    p.add_argument("--payload-limit", type=int, default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument(
        "--capacity", type=float, default=None, help="GPU-like mode: docs/s of one simulated device (FIFO)"
    )
    p.add_argument("--prompts", default=None, help='JSON object of prompts, e.g. \'{"query": "query: "}\'')
    p.add_argument("--default-prompt-name", default=None)
    p.add_argument("--no-base64", action="store_true", help="reject encoding_format=base64 with 422")
    p.add_argument("--auto-truncate", action="store_true")
    p.add_argument("--precomputed", action="store_true", help="fast mode: vectors do not depend on texts")
    p.add_argument("--seed", type=int, default=None)
    for name in sorted(FAULT_FIELDS):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=None)
    p.add_argument("--config-json", default=None, help="JSON object of TEIServer keyword arguments")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    opts: dict[str, Any] = json.loads(args.config_json) if args.config_json else {}
    simple = {
        "dim": args.dim,
        "model_id": args.model_id,
        "version": args.version,
        "max_client_batch_size": args.max_client_batch_size,
        "max_concurrent_requests": args.max_concurrent_requests,
        "max_input_length": args.max_input_length,
        "payload_limit": args.payload_limit,
        "api_key": args.api_key,
        "capacity": args.capacity,
        "prompts": json.loads(args.prompts) if args.prompts else None,
        "default_prompt_name": args.default_prompt_name,
        "seed": args.seed,
    }
    opts.update({k: v for k, v in simple.items() if v is not None})
    opts.update({k: getattr(args, k) for k in FAULT_FIELDS if getattr(args, k) is not None})
    if args.no_base64:
        opts["supports_base64"] = False
    if args.auto_truncate:
        opts["auto_truncate"] = True
    if args.precomputed:
        opts["precomputed"] = True
    opts["host"] = args.host
    if args.port or "port" not in opts:
        opts["port"] = args.port

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    srv = TEIServer(**opts).start()
    print(srv.url, flush=True)
    try:
        while not done.wait(3600):
            pass
    finally:
        srv.stop()
    return 0
