"""A real local HTTP server that speaks text-embeddings-inference (TEI) 1.9.3's API, with fault injection.

Why it exists: the HTTP backends, the integration tests and the benchmarks need a server that answers like
TEI (same routes, JSON shapes, status codes and plain-text framework errors) but is fast, deterministic and
can be told to misbehave (429/503, dropped connections, hangs, wrong shapes, NaN, dying).

Routes (as in TEI's router): ``GET /health`` (also ``GET /`` and ``GET /ping``), ``GET /info``,
``POST /embed`` (also ``POST /`` and ``/invocations``), ``POST /v1/embeddings`` (also ``/embeddings``).
``POST /tokenize``, ``GET /metrics``.  Test-only control routes, never faulted or authenticated:
``GET /__testserver__/counters``, ``GET /__testserver__/received`` (every request's texts, ``prompt_name``,
``dimensions``...), ``POST /__testserver__/reset`` and ``POST /__testserver__/faults`` (a JSON object of
:meth:`TEIServer.set_faults` keywords).

What it counts (``srv.counters`` or ``srv.counters()``, also over the control route for a process):
``requests``, ``texts_received`` (texts in every well-formed request to any embed route, whatever the answer),
``texts`` (answered with 200), ``distinct_texts``, per-outcome counts, ``max_batch``, ``max_queued_inputs``;
``srv.embedded`` / ``srv.received_texts`` count per text; ``srv.received`` lists each request
(:class:`Received`).

How it mirrors TEI (router/src/http/server.rs, axum):

* Vectors: :func:`expected_vectors` — a deterministic pseudo-random float32 vector per text (blake2b of the
  UTF-8 bytes picks signed rows of a fixed Gaussian table), L2-normalised when ``normalize`` is true.
  JSON floats are written in shortest float32 form, so ``np.float32(parsed)`` equals the vector bit for bit.
* Errors from TEI itself are JSON ``{"error", "error_type"}`` (``/embed``) or
  ``{"message", "code", "error_type"}`` (``/v1/embeddings``); ``error_type`` is one of
  Unhealthy/Backend/Overloaded/Validation/Tokenizer/Empty.  Status codes: Empty 400, Overloaded 429,
  Tokenizer 422, Unhealthy 503, Validation 422 for ``version >= 1.9.0`` and 413 before.
* Errors from axum's ``Json`` extractor are plain text: wrong/missing Content-Type → 415
  ``Expected request with `Content-Type: application/json```; body over ``payload_limit`` (TEI default
  2_000_000 bytes) → 413 ``Failed to buffer the request body: length limit exceeded``; invalid JSON —
  including a lone surrogate escape such as ``"\\ud83d"`` that serde_json refuses — → 400
  ``Failed to parse the request body as JSON: ...``; valid JSON of the wrong shape (missing ``inputs``,
  wrong types, unknown ``encoding_format``) → 422 ``Failed to deserialize the JSON body into the target
  type: ...``.
* Auth (``api_key``): every route but the health ones needs ``Authorization: Bearer <key>``, else 401 with
  an empty body (TEI's middleware).
* Tokens come from a simple deterministic tokenizer (:mod:`.tokens`, not a real vocabulary): ``POST /tokenize``
  returns them (TEI's ``SimpleToken`` list per text, byte offsets); more than ``max_input_length`` with
  truncation off gives TEI's Validation error ``Input validation error: `inputs` must have less than 512
  tokens. Given: N``.  With truncation the vector is still that of the whole text.  ``/v1/embeddings``
  truncates only when ``auto_truncate`` is set, like TEI, and always normalises.
* ``prompt_name`` (``/embed``, ``/tokenize``): the server is given a sentence-transformers ``prompts`` dict;
  the prompt is prepended to each text input (not to token-id inputs) before tokens and vector; an unknown
  name is TEI's Validation error (``... it was not found in the Sentence Transformers prompts. Available
  prompts: [...]``, or ``... no prompts were found ...`` when the server has none).  TEI 1.9.3's
  ``/v1/embeddings`` has no ``prompt_name`` field and ignores it; so does this server (it records it).
* ``dimensions`` (``/embed``, ``/v1/embeddings``): the vector is truncated to N, then L2-normalised when
  normalising (TEI's order); 0 → ``Input validation error: `dimensions` should be positive``; N above the
  model's ``dim`` → ``Input validation error: `dimensions` should be smaller than the maximum embedding
  dimension.`` (both Validation, 422); N equal to ``dim`` is the full vector.
* Overload (TEI 1.9.3's per-input permits, see :mod:`.device`): a request of n inputs gets 429 ``Model is
  overloaded`` when the inputs accepted and not yet answered plus n exceed ``max_concurrent_requests``.
  Inputs are "not yet answered" while the request waits for its latency or its turn on the device.
* Capacity mode (``capacity=C`` docs/s): one simulated device works requests in arrival order, n inputs in
  n/C s, so throughput is capped at C whatever the concurrency, latency grows with the queue, and the permits
  above make the queue bounded, like a GPU behind TEI.  ``latency`` faults add to it (not device time).
* ``GET /metrics``: a few of TEI's Prometheus metrics (``te_request_count``, ``te_request_success``,
  ``te_request_failure``, ``te_queue_size``, ``te_embed_count``) from the counters.
* The empty-batch message is TEI's real ``\\`inputs\\` cannot be empty`` (the OpenAPI example text
  "Batch is empty" is only an example); error_type ``Empty``, status 400.

Faults (probabilities per embed request, checked in this order, the first that fires wins; a seeded RNG
makes a sequential run reproducible): ``p_429``, ``p_503``, ``p_drop`` (close the connection, no
response), ``p_hang`` (never answer until ``hang_seconds`` pass or the server stops, then drop),
``p_bad_count`` (one vector too few, or one extra for a single input), ``p_bad_dim`` (each vector one
element short), ``p_nan`` (first element of the first vector is NaN: ``null`` in JSON floats, a real NaN
in base64).  :meth:`TEIServer.queue_faults` scripts the next outcomes exactly.  ``dead=True`` closes the
listening socket and every open connection (connections are refused) until ``dead=False`` rebinds the same
port (or ``revive_after`` seconds pass, the way back for a ServerProcess); :meth:`TEIServer.stop` is the
final shutdown (in-flight requests are dropped).

Fast mode (``precomputed=True``) for benchmarks: every answer of n vectors is a cached body of n fixed
vectors that do not depend on the texts (correctness checks on vectors are meaningless there; usage token
counts are fake).  Requests are still parsed and validated.

Use from sync tests::

    with TEIServer(dim=384, p_503=0.1) as srv:
        ...  # srv.url, srv.embed_url, srv.openai_url, srv.set_faults(...), srv.counters, srv.embedded

    with TEIServer(capacity=4000, max_concurrent_requests=512, prompts={"query": "query: "}) as srv:
        ...  # a GPU-like server: 4,000 docs/s, 429 past 512 queued inputs

Off-process (benchmarks)::

    with TEIServer.spawn_process(dim=384, precomputed=True) as proc:
        ...  # proc.url, proc.set_faults(...), proc.counters (via the control routes)

Standalone: ``python -m tweet_embed.testing.server --port 18090 --dim 384 [--capacity 4000
--max-concurrent-requests 512]`` prints its URL and serves until killed.

Layout: :mod:`.app` (TEIServer: routes, counters, lifecycle), :mod:`.protocol` (TEI's wire format),
:mod:`.validation` (TEI's request checks), :mod:`.vectors`, :mod:`.tokens`, :mod:`.faults`, :mod:`.device` (capacity mode), :mod:`.process`
(ServerProcess), :mod:`.cli` (this command line).  This module re-exports them.
"""

from __future__ import annotations

from .app import TEIServer
from .cli import main
from .device import Device, Permits
from .faults import FAULT_KINDS, OUTCOMES, Faults
from .process import ServerProcess
from .protocol import CONTROL_PREFIX, DEFAULT_PAYLOAD_LIMIT, TEI_VERSION, Counters, Received
from .tokens import Token, approx_tokens, simple_tokenize
from .vectors import expected_vector, expected_vectors

__all__ = [
    "CONTROL_PREFIX",
    "DEFAULT_PAYLOAD_LIMIT",
    "FAULT_KINDS",
    "OUTCOMES",
    "TEI_VERSION",
    "Counters",
    "Device",
    "Faults",
    "Permits",
    "Received",
    "ServerProcess",
    "TEIServer",
    "Token",
    "approx_tokens",
    "expected_vector",
    "expected_vectors",
    "main",
    "simple_tokenize",
]

if __name__ == "__main__":
    raise SystemExit(main())
