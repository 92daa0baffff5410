"""The test server's routes beyond plain embedding: what it counts and records, ``prompt_name``,
``dimensions``, ``/tokenize`` and ``/metrics`` — as TEI 1.9.3 answers them."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import pytest

from tweet_embed.testing.server import TEIServer, approx_tokens, expected_vectors, simple_tokenize

DIM = 32
PROMPTS = {"query": "query: ", "passage": "passage: "}


def post(url: str, payload: Any) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST")
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def srv():
    with TEIServer(dim=DIM, prompts=PROMPTS) as s:
        yield s


def test_every_route_counts_and_records_what_it_received(srv) -> None:
    assert post(srv.embed_url, {"inputs": ["a", "b", "a"], "prompt_name": "query", "dimensions": 8})[0] == 200
    assert post(srv.openai_url, {"input": "c", "dimensions": 4, "encoding_format": "base64"})[0] == 200
    assert post(srv.tokenize_url, {"inputs": ["d", "e"]})[0] == 200
    assert post(srv.embed_url, {"inputs": ["f"], "prompt_name": "nope"})[0] == 422  # received, refused
    srv.queue_faults("503")
    assert post(srv.embed_url, {"inputs": "g"})[0] == 503
    c = srv.counters
    assert c["texts_received"] == 3 + 1 + 1 + 1  # /tokenize's texts are counted apart
    assert c["texts"] == 4 and c["distinct_texts"] == 3 and c["texts_tokenized"] == 2
    assert c == srv.counters()  # readable as a property or a call
    assert srv.embedded == {"a": 2, "b": 1, "c": 1}
    assert srv.received_texts == {"a": 2, "b": 1, "c": 1, "f": 1, "g": 1}  # /tokenize is not embedding
    got = [(r.route, r.texts, r.prompt_name, r.dimensions, r.encoding_format, r.status) for r in srv.received]
    assert got == [
        ("embed", ("a", "b", "a"), "query", 8, "float", 200),
        ("openai", ("c",), None, 4, "base64", 200),
        ("tokenize", ("d", "e"), None, None, "", 200),
        ("embed", ("f",), "nope", None, "float", 422),
        ("embed", ("g",), None, None, "float", 503),
    ]
    srv.reset_counters()
    assert srv.counters["texts_received"] == 0 and srv.received == [] and not srv.embedded


def test_counts_and_records_reach_a_child_process() -> None:
    with TEIServer.spawn_process(dim=DIM, prompts=PROMPTS) as proc:
        assert (
            post(proc.embed_url, {"inputs": ["x", "y"], "prompt_name": "passage", "dimensions": 16})[0] == 200
        )
        assert proc.counters["texts_received"] == 2 and proc.counters()["distinct_texts"] == 2
        [r] = proc.received
        assert (r.texts, r.prompt_name, r.dimensions, r.status) == (("x", "y"), "passage", 16, 200)
        assert proc.received_texts == {"x": 1, "y": 1}
        proc.reset_counters()
        assert proc.counters["texts_received"] == 0


def test_prompt_name_prepends_the_prompt(srv) -> None:
    status, body = post(srv.embed_url, {"inputs": ["hello", "world"], "prompt_name": "query"})
    assert status == 200
    want = expected_vectors(["query: hello", "query: world"], DIM)
    assert np.array_equal(np.asarray(body, dtype=np.float32), want)
    assert not np.allclose(want, expected_vectors(["hello", "world"], DIM))
    # Token ids get no prompt (TEI prepends to text only); a text without prompt_name gets none either.
    status, body = post(srv.embed_url, {"inputs": "hello"})
    assert np.array_equal(np.asarray(body, dtype=np.float32), expected_vectors(["hello"], DIM))


def test_unknown_prompt_name_is_teis_validation_error(srv) -> None:
    status, body = post(srv.embed_url, {"inputs": "x", "prompt_name": "document"})
    assert status == 422 and body["error_type"] == "Validation"
    assert body["error"] == (
        "Input validation error: `default-prompt-name` is set to `document` but it was not found in the "
        'Sentence Transformers prompts. Available prompts: ["query", "passage"]'
    )
    with TEIServer(dim=DIM) as bare:
        status, body = post(bare.embed_url, {"inputs": "x", "prompt_name": "query"})
        assert (
            status == 422
            and "no prompts were found in the Sentence Transformers configuration" in body["error"]
        )


def test_openai_route_ignores_prompt_name_like_tei(srv) -> None:
    status, body = post(srv.openai_url, {"input": ["hello"], "prompt_name": "query"})
    assert status == 200
    got = np.asarray(body["data"][0]["embedding"], dtype=np.float32)
    assert np.array_equal(got, expected_vectors(["hello"], DIM)[0])


def test_default_prompt_name_applies_when_none_is_sent() -> None:
    with TEIServer(dim=DIM, prompts=PROMPTS, default_prompt_name="passage") as s:
        status, body = post(s.embed_url, {"inputs": ["t"]})
        assert np.array_equal(np.asarray(body, dtype=np.float32), expected_vectors(["passage: t"], DIM))
    with pytest.raises(ValueError):
        TEIServer(dim=DIM, prompts=PROMPTS, default_prompt_name="missing")


def test_dimensions_truncate_then_renormalise(srv) -> None:
    texts = ["alpha", "beta"]
    status, body = post(srv.embed_url, {"inputs": texts, "dimensions": 8})
    got = np.asarray(body, dtype=np.float32)
    full = expected_vectors(texts, DIM, normalize=False)
    want = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    assert got.shape == (2, 8) and np.allclose(got, want, atol=1e-6)
    assert np.array_equal(got, expected_vectors(texts, DIM, dimensions=8))
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
    # normalize=false: plain truncation of the raw vector.
    status, body = post(srv.embed_url, {"inputs": texts, "dimensions": 8, "normalize": False})
    assert np.array_equal(np.asarray(body, dtype=np.float32), full[:, :8])
    # OpenAI route, base64: the same vectors.
    status, body = post(srv.openai_url, {"input": texts, "dimensions": 8, "encoding_format": "base64"})
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]]
    assert np.array_equal(np.stack(rows), got)
    # The model's own dimension is allowed and is the full vector.
    status, body = post(srv.embed_url, {"inputs": texts, "dimensions": DIM})
    assert np.array_equal(np.asarray(body, dtype=np.float32), expected_vectors(texts, DIM))


def test_dimensions_errors_are_teis(srv) -> None:
    status, body = post(srv.embed_url, {"inputs": "x", "dimensions": DIM + 1})
    assert (status, body) == (
        422,
        {
            "error": "Input validation error: `dimensions` should be smaller than the maximum embedding dimension.",
            "error_type": "Validation",
        },
    )
    status, body = post(srv.openai_url, {"input": "x", "dimensions": 0})
    assert status == 422 and body["message"] == "Input validation error: `dimensions` should be positive"
    assert body["code"] == 422
    req = urllib.request.Request(srv.embed_url, data=b'{"inputs": "x", "dimensions": -1}', method="POST")
    req.add_header("Content-Type", "application/json")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 422 and e.value.headers["Content-Type"].startswith("text/plain")  # serde's usize


def test_tokenize_route(srv) -> None:
    status, body = post(srv.tokenize_url, {"inputs": "héllo wörld"})
    assert status == 200 and len(body) == 1
    toks = body[0]
    assert toks[0] == {"id": 101, "text": "[CLS]", "special": True, "start": None, "stop": None}
    assert toks[-1]["text"] == "[SEP]" and toks[-1]["special"]
    data = "héllo wörld".encode()
    assert all(data[t["start"] : t["stop"]].decode() == t["text"] for t in toks[1:-1])
    assert len(toks) == approx_tokens("héllo wörld")  # the same count /embed's length check uses
    status, body = post(srv.tokenize_url, {"inputs": ["a b", "c"], "add_special_tokens": False})
    assert [[t["text"] for t in row] for row in body] == [["a", "b"], ["c"]]
    status, body = post(srv.tokenize_url, {"inputs": "x y", "prompt_name": "query"})
    assert [t["text"] for t in body[0]] == ["[CLS]", "quer", "y:", "x", "y", "[SEP]"]
    assert post(srv.tokenize_url, {"inputs": []}) == (
        400,
        {"error": "`inputs` cannot be empty", "error_type": "Empty"},
    )
    assert post(srv.tokenize_url, {"inputs": ["x"] * 33})[0] == 422  # max_client_batch_size


def test_prompt_counts_towards_the_token_limit() -> None:
    text = " ".join(["w"] * 8)  # 10 tokens with [CLS]/[SEP]
    with TEIServer(dim=DIM, prompts={"long": "p " * 5}, max_input_length=12) as s:
        assert post(s.embed_url, {"inputs": text})[0] == 200
        status, body = post(s.embed_url, {"inputs": text, "prompt_name": "long"})
        assert status == 422 and body["error"].endswith("Given: 15")


def test_tokenizer_count_is_the_length_check_count() -> None:
    for text in ["", "  ", "a", "RT @user: héllo 🎉🎉 https://t.co/abc", "日本語のテキスト です", "x" * 17]:
        assert len(simple_tokenize(text)) == approx_tokens(text)
        assert len(simple_tokenize(text, add_special_tokens=False)) == approx_tokens(text) - 2


def test_metrics_route(srv) -> None:
    post(srv.embed_url, {"inputs": ["a", "b"]})
    post(srv.embed_url, {"inputs": "c"})
    post(srv.embed_url, {"inputs": ["x"] * 40})
    text = urllib.request.urlopen(srv.url + "/metrics", timeout=5).read().decode()
    from prometheus_client.parser import text_string_to_metric_families

    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert samples[("te_request_count_total", (("method", "batch"),))] == 2
    assert samples[("te_request_count_total", (("method", "single"),))] == 1
    assert samples[("te_request_failure_total", (("err", "batch_size"),))] == 1
    assert samples[("te_embed_count_total", ())] == 3
