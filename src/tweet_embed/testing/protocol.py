"""TEI 1.9.3's wire format, as the test server speaks it: request parsing, error bodies, answer bodies.

Mirrors router/src/http/{server,types}.rs and axum's ``Json`` extractor (plain-text framework errors).
Stateless: the server passes in what it is configured with.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from aiohttp import web

__all__ = [
    "CONTROL_PREFIX",
    "DEFAULT_PAYLOAD_LIMIT",
    "TEI_VERSION",
    "Counters",
    "Received",
    "Reject",
    "deserialize_error",
    "ids_text",
    "json_response",
    "parse_inputs",
    "read_json",
    "render",
    "tei_error",
    "text_response",
    "version_tuple",
]

TEI_VERSION = "1.9.3"
DEFAULT_PAYLOAD_LIMIT = 2_000_000  # TEI's --payload-limit default (bytes)
CONTROL_PREFIX = "/__testserver__"  # the test-only control routes live under this prefix


class Counters(dict[str, int]):
    """A snapshot of the counters; also callable (``srv.counters()``) for code that reads it as a method."""

    def __call__(self) -> Counters:
        return self


@dataclass(frozen=True)
class Received:
    """One well-formed embed or tokenize request, as received (for tests: what did the client send?)."""

    route: str  # "embed", "openai" or "tokenize" (aliases count as their route)
    texts: tuple[str, ...]  # as sent, before any prompt
    prompt_name: str | None
    dimensions: int | None
    normalize: bool
    truncate: bool
    encoding_format: str
    model: str | None
    status: int  # the answer's status; 0 when the connection was dropped or is still open


class Reject(Exception):
    """An early answer (error) from request parsing/validation; ``outcome`` names its counter."""

    def __init__(self, response: web.StreamResponse, outcome: str):
        super().__init__(outcome)
        self.response = response
        self.outcome = outcome


def text_response(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message, content_type="text/plain")


def json_response(status: int, obj: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(obj), content_type="application/json")


def version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for p in version.split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def deserialize_error(what: str) -> Reject:
    """axum's 422 for valid JSON of the wrong shape (plain text)."""
    return Reject(
        text_response(422, f"Failed to deserialize the JSON body into the target type: {what}"), "422"
    )


def tei_error(status: int, message: str, error_type: str, openai: bool) -> Reject:
    """TEI's own JSON error: ``ErrorResponse`` on TEI routes, ``OpenAICompatErrorResponse`` on OpenAI's."""
    if openai:
        body: dict[str, Any] = {"message": message, "code": status, "error_type": error_type}
    else:
        body = {"error": message, "error_type": error_type}
    return Reject(json_response(status, body), str(status))


async def read_json(request: web.Request, payload_limit: int) -> Any:
    """axum's ``Json`` extractor: content type, body limit, then parse; errors in plain text."""
    ctype = request.headers.get("Content-Type", "")
    mime = ctype.split(";", 1)[0].strip().lower()
    if not (mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json"))):
        raise Reject(text_response(415, "Expected request with `Content-Type: application/json`"), "415")
    too_big = Reject(text_response(413, "Failed to buffer the request body: length limit exceeded"), "413")
    clen = request.content_length
    if clen is not None and clen > payload_limit:
        await _drain(request)
        raise too_big
    body = await request.read()
    if len(body) > payload_limit:
        raise too_big
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise Reject(text_response(400, f"Failed to parse the request body as JSON: {e}"), "400") from None


async def _drain(request: web.Request) -> None:
    """Read and discard an oversized body so the client can finish sending and read the 413."""
    while True:
        chunk = await request.content.read(1 << 20)
        if not chunk:
            return


def ids_text(ids: list[int]) -> str:
    """Stable text stand-in for an input given as token ids (its vector derives from this)."""
    return "\x00ids:" + ",".join(map(str, ids))


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value
    )


def parse_inputs(value: Any, field: str, allow_ids: bool = True) -> tuple[list[str], bool, list[bool]]:
    """TEI ``Input``: a string, token ids, or a list of those.  Returns (texts, was_batch, is_text) where
    ``is_text[i]`` is false for an input given as token ids (a prompt is prepended to text only)."""
    if isinstance(value, str):
        return [value], False, [True]
    if isinstance(value, list):
        if allow_ids and value and _is_ids(value):
            return [ids_text(value)], False, [False]  # a single input of token ids
        texts: list[str] = []
        is_text: list[bool] = []
        for item in value:
            if isinstance(item, str):
                texts.append(item)
                is_text.append(True)
            elif allow_ids and _is_ids(item):
                texts.append(ids_text(item))
                is_text.append(False)
            else:
                raise deserialize_error(f"{field}: data did not match any variant of untagged enum Input")
        return texts, True, is_text
    if value is None:
        raise deserialize_error(f"missing field `{field}`")
    raise deserialize_error(f"{field}: data did not match any variant of untagged enum Input")


def render(vecs: np.ndarray, encoding: str, openai: bool, tokens: int, model: str) -> bytes:
    """The 200 body: ``/embed``'s list of float lists, or OpenAI's list object (float or base64)."""
    vecs = np.ascontiguousarray(vecs, dtype=np.float32)
    if not openai:
        return orjson.dumps(vecs, option=orjson.OPT_SERIALIZE_NUMPY)
    if encoding == "base64":
        le = vecs.astype("<f4", copy=False)
        data = [
            {"object": "embedding", "embedding": base64.b64encode(row.tobytes()).decode("ascii"), "index": i}
            for i, row in enumerate(le)
        ]
    else:
        data = [{"object": "embedding", "embedding": row, "index": i} for i, row in enumerate(vecs)]
    return orjson.dumps(
        {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        option=orjson.OPT_SERIALIZE_NUMPY,
    )
