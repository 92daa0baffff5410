"""TEI 1.9.3's wire format, as the test server speaks it: request parsing, error bodies, answer bodies.

Mirrors router/src/http/{server,types}.rs and axum's ``Json`` extractor (plain-text framework errors).
Stateless: the server passes in what it is configured with.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson
from aiohttp import web

__all__ = [
    "CONTROL_PREFIX",
    "DEFAULT_PAYLOAD_LIMIT",
    "TEI_VERSION",
    "Counters",
    "EmbedRequest",
    "Received",
    "Reject",
    "ServerURLs",
    "deserialize_error",
    "ids_text",
    "json_response",
    "parse_embed_request",
    "parse_inputs",
    "parse_tokenize_request",
    "read_json",
    "read_struct",
    "render",
    "tei_error",
    "text_response",
    "version_tuple",
]

TEI_VERSION = "1.9.3"
DEFAULT_PAYLOAD_LIMIT = 2_000_000  # TEI's --payload-limit default (bytes)
CONTROL_PREFIX = "/__testserver__"  # the test-only control routes live under this prefix


class _HasURL(Protocol):
    @property
    def url(self) -> str: ...


class ServerURLs:
    """The routes a client calls, under ``self.url`` (``http://host:port``): shared by the in-thread server
    (``url`` a property) and the child-process one (``url`` known once the child listens)."""

    @property
    def embed_url(self: _HasURL) -> str:
        return self.url + "/embed"

    @property
    def openai_url(self: _HasURL) -> str:
        return self.url + "/v1/embeddings"

    @property
    def tokenize_url(self: _HasURL) -> str:
        return self.url + "/tokenize"


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
    """An early answer (error) from request parsing/validation; ``outcome`` names its counter, ``failure``
    (if any) TEI's ``te_request_failure{err}`` label."""

    def __init__(self, response: web.StreamResponse, outcome: str, failure: str | None = None):
        super().__init__(outcome)
        self.response = response
        self.outcome = outcome
        self.failure = failure


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


def tei_error(status: int, message: str, error_type: str, openai: bool, failure: str | None = None) -> Reject:
    """TEI's own JSON error: ``ErrorResponse`` on TEI routes, ``OpenAICompatErrorResponse`` on OpenAI's."""
    if openai:
        body: dict[str, Any] = {"message": message, "code": status, "error_type": error_type}
    else:
        body = {"error": message, "error_type": error_type}
    return Reject(json_response(status, body), str(status), failure)


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


async def read_struct(request: web.Request, payload_limit: int) -> dict[str, Any]:
    """:func:`read_json` of a body that must be a JSON object (every API route's request is a struct)."""
    body = await read_json(request, payload_limit)
    if not isinstance(body, dict):
        raise deserialize_error("invalid type: expected struct")
    return body


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


@dataclass
class EmbedRequest:
    """A parsed ``/embed``, ``/v1/embeddings`` or ``/tokenize`` request."""

    texts: list[str]
    is_text: list[bool]
    was_batch: bool
    normalize: bool
    truncate: bool
    encoding: str
    prompt_name: str | None
    dimensions: int | None
    model: str | None


def _prompt_name(req: dict[str, Any]) -> str | None:
    name = req.get("prompt_name")
    if name is not None and not isinstance(name, str):
        raise deserialize_error("prompt_name: invalid type: expected a string")
    return name


def parse_embed_request(
    req: dict[str, Any], openai: bool, *, auto_truncate: bool, supports_base64: bool, ignore_dimensions: bool
) -> EmbedRequest:
    """An ``/embed`` (``openai`` false) or ``/v1/embeddings`` body as TEI's serde reads it, under the server's
    settings: ``auto_truncate`` (the default of ``truncate``), ``supports_base64`` (``encoding_format``
    variants), ``ignore_dimensions`` (a server without Matryoshka support drops the field)."""
    dimensions = None if ignore_dimensions else req.get("dimensions")
    if dimensions is not None and (
        not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 0
    ):
        raise deserialize_error(f"dimensions: invalid value: `{dimensions}`, expected usize")
    if openai:
        if "input" not in req:
            raise deserialize_error("missing field `input`")
        texts, was_batch, is_text = parse_inputs(req["input"], "input")
        encoding = req.get("encoding_format", "float")
        if encoding is None:
            encoding = "float"
        allowed = ("float", "base64") if supports_base64 else ("float",)
        if encoding not in allowed:
            variants = " or ".join(f"`{a}`" for a in allowed)
            raise deserialize_error(f"encoding_format: unknown variant `{encoding}`, expected {variants}")
        model = req.get("model")
        if model is not None and not isinstance(model, str):
            raise deserialize_error("model: invalid type: expected a string")
        # TEI's OpenAI route has no prompt_name field (serde ignores it) and always normalises.
        prompt_name = req.get("prompt_name") if isinstance(req.get("prompt_name"), str) else None
        return EmbedRequest(
            texts, is_text, was_batch, True, auto_truncate, encoding, prompt_name, dimensions, model
        )
    if "inputs" not in req:
        raise deserialize_error("missing field `inputs`")
    texts, was_batch, is_text = parse_inputs(req["inputs"], "inputs")
    normalize = req.get("normalize", True)
    if not isinstance(normalize, bool):
        raise deserialize_error("normalize: invalid type: expected a boolean")
    truncate = req.get("truncate")
    if truncate is None:
        truncate = auto_truncate
    elif not isinstance(truncate, bool):
        raise deserialize_error("truncate: invalid type: expected a boolean")
    prompt_name = _prompt_name(req)
    return EmbedRequest(
        texts, is_text, was_batch, normalize, truncate, "float", prompt_name, dimensions, None
    )


def parse_tokenize_request(req: dict[str, Any]) -> tuple[EmbedRequest, bool]:
    """A ``/tokenize`` body (text inputs only): the request and its ``add_special_tokens``."""
    if "inputs" not in req:
        raise deserialize_error("missing field `inputs`")
    texts, was_batch, _ = parse_inputs(req["inputs"], "inputs", allow_ids=False)
    special = req.get("add_special_tokens", True)
    if not isinstance(special, bool):
        raise deserialize_error("add_special_tokens: invalid type: expected a boolean")
    name = _prompt_name(req)
    return EmbedRequest(texts, [True] * len(texts), was_batch, False, False, "", name, None, None), special


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
