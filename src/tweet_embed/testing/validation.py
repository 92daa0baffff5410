"""TEI 1.9.3's request validation, as the test server applies it: batch size, ``dimensions``, prompts and input
length, in TEI's order (router/src/http/server.rs, core/src/infer.rs).

Stateless: the server passes itself in as :class:`Settings` and each check reads what it is configured with at
that moment. An error is a :class:`~.protocol.Reject`; ``failure`` names TEI's ``te_request_failure{err}``
label where TEI counts one.
"""

from __future__ import annotations

from typing import Protocol

from .protocol import EmbedRequest, tei_error
from .tokens import approx_tokens

__all__ = ["Settings", "check_batch", "prompt_text", "validate"]


class Settings(Protocol):
    dim: int
    max_client_batch_size: int
    max_input_length: int
    prompts: dict[str, str] | None
    default_prompt_name: str | None
    validation_status: int  # 422 from TEI 1.9.0 on, 413 before


def prompt_text(srv: Settings, name: str | None, openai: bool) -> str | None:
    """The prompt text for ``name`` (or the default prompt), or TEI's Validation error."""
    if name is None:
        return srv.prompts[srv.default_prompt_name] if srv.prompts and srv.default_prompt_name else None
    if srv.prompts is None:
        msg = (
            f"Input validation error: `default-prompt-name` is set to `{name}` but no prompts were found "
            "in the Sentence Transformers configuration"
        )
    elif name not in srv.prompts:
        known = "[" + ", ".join(f'"{k}"' for k in srv.prompts) + "]"  # Rust's Debug of the keys
        msg = (
            f"Input validation error: `default-prompt-name` is set to `{name}` but it was not found in the "
            f"Sentence Transformers prompts. Available prompts: {known}"
        )
    else:
        return srv.prompts[name]
    raise tei_error(srv.validation_status, msg, "Validation", openai)


def check_batch(srv: Settings, n: int, was_batch: bool, openai: bool) -> None:
    if was_batch and n == 0:
        raise tei_error(400, "`inputs` cannot be empty", "Empty", openai)
    if was_batch and n > srv.max_client_batch_size:
        raise tei_error(
            srv.validation_status,
            f"batch size {n} > maximum allowed batch size {srv.max_client_batch_size}",
            "Validation",
            openai,
            failure="batch_size",
        )


def validate(srv: Settings, req: EmbedRequest, openai: bool) -> list[str]:
    """TEI's own checks, in its order; returns the texts the model sees (prompt prepended)."""
    check_batch(srv, len(req.texts), req.was_batch, openai)
    if req.dimensions is not None:
        if req.dimensions == 0:
            raise tei_error(
                srv.validation_status,
                "Input validation error: `dimensions` should be positive",
                "Validation",
                openai,
            )
        if req.dimensions > srv.dim:
            # TEI finds this only after the forward pass; the answer is the same.
            raise tei_error(
                srv.validation_status,
                "Input validation error: `dimensions` should be smaller than the maximum embedding dimension.",
                "Validation",
                openai,
            )
    prompt = None if openai else prompt_text(srv, req.prompt_name, openai)
    seen = req.texts
    if prompt:
        seen = [prompt + t if is_text else t for t, is_text in zip(req.texts, req.is_text, strict=True)]
    if not req.truncate:
        limit = srv.max_input_length
        for t in seen:
            # Cheap pre-screen: approx_tokens(t) <= 2 + len(t), so short texts cannot exceed.
            if len(t) + 2 > limit:
                tokens = approx_tokens(t)
                if tokens > limit:
                    raise tei_error(
                        srv.validation_status,
                        f"Input validation error: `inputs` must have less than {limit} tokens. Given: {tokens}",
                        "Validation",
                        openai,
                        failure="validation",
                    )
    return seen
