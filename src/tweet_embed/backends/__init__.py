"""Embedding backends: one protocol per module behind :class:`tweet_embed.backends.base.Backend`.

``make_backend`` picks one: no URL → the in-process model (the embedded default); URLs ending in
``/v1/embeddings`` or ``/v1`` (or given as ``--openai-urls``) → OpenAI-compatible; any other URL → TEI ``/embed``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace

from tweet_embed.backends.base import Backend, BackendError, BackendInfo
from tweet_embed.backends.vectors import VectorOptions

__all__ = [
    "Backend",
    "BackendError",
    "BackendInfo",
    "BackendSpec",
    "VectorOptions",
    "make_backend",
    "read_api_key",
    "is_openai_url",
]

DEFAULT_LOCAL_MODEL = "all-MiniLM-L6-v2"
KEY_ENV = ("TWEET_EMBED_API_KEY", "OPENAI_API_KEY")


def is_openai_url(url: str) -> bool:
    u = url.rstrip("/")
    return u.endswith("/v1/embeddings") or u.endswith("/v1")


def read_api_key(key_file: str | None = None) -> str | None:
    """The API key: from ``key_file`` (must not be readable by group/others), else the environment."""
    if key_file:
        st = os.stat(key_file)
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise BackendError(f"{key_file} is readable by others; chmod 600 it first")
        with open(key_file, encoding="utf-8") as fh:
            key = fh.read().strip()
        if not key:
            raise BackendError(f"{key_file} is empty")
        return key
    for name in KEY_ENV:
        value = os.environ.get(name)
        if value:
            return value.strip()
    return None


def split_urls(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out.extend(u.strip() for u in v.split(",") if u.strip())
    return out


def make_backend(
    urls: Sequence[str] | None = None,
    model: str | None = None,
    normalize: bool = True,
    *,
    openai_urls: Sequence[str] | None = None,
    api_key: str | None = None,
    batch_size: int | None = None,
    request_timeout: float = 60.0,
    max_retry_time: float = 600.0,
    insecure: bool = False,
    device: str | None = None,
    decode_executor: Executor | None = None,
    workers: int | None = None,
    dtype: str | None = None,
    options: VectorOptions | None = None,
    runtime: str | None = None,
) -> Backend:
    """Build the backend a run asks for (see module doc); ``options``: prompt and dimensions."""
    tei = split_urls(urls)
    oai = split_urls(openai_urls)
    oai += [u for u in tei if is_openai_url(u)]
    tei = [u for u in tei if not is_openai_url(u)]
    if tei and oai:
        raise BackendError("mixing TEI /embed and OpenAI /v1/embeddings servers in one run is not supported")
    http_kw = dict(
        normalize=normalize,
        api_key=api_key,
        model=model,
        batch_size=batch_size,
        request_timeout=request_timeout,
        max_retry_time=max_retry_time,
        insecure=insecure,
        decode_executor=decode_executor,
        workers=workers,
        options=options,
    )
    if oai:
        from tweet_embed.backends.openai import OpenAIBackend

        return OpenAIBackend(oai, **http_kw)  # type: ignore[arg-type]
    if tei:
        from tweet_embed.backends.tei import TEIBackend

        return TEIBackend(tei, **http_kw)  # type: ignore[arg-type]
    from tweet_embed.backends.local import LocalBackend

    return LocalBackend(
        model or DEFAULT_LOCAL_MODEL,
        device=device,
        normalize=normalize,
        batch_size=batch_size,
        dtype=dtype,
        options=options,
        runtime=runtime,
    )


@dataclass(frozen=True)
class BackendSpec:
    """A picklable description of a backend, so worker processes (per GPU, or Ray tasks) build their own.

    ``api_key`` is excluded from ``repr`` so it never reaches a log line or a traceback.
    """

    urls: tuple[str, ...] = ()
    openai_urls: tuple[str, ...] = ()
    model: str | None = None
    normalize: bool = True
    api_key: str | None = field(default=None, repr=False)
    batch_size: int | None = None
    request_timeout: float = 60.0
    max_retry_time: float = 600.0
    insecure: bool = False
    device: str | None = None
    workers: int | None = None  # response-decoding processes of HTTP backends (None: one thread)
    dtype: str | None = None  # local model: fp16 / bf16 / fp32 (None: fp16 on GPUs; CPUs: see runtime)
    prompt: str | None = None  # text before every input (--prompt)
    prompt_name: str | None = None  # a name in the model's sentence-transformers prompts (--prompt-name)
    dimensions: int | None = None  # Matryoshka: keep the first N dimensions (--dimensions)
    runtime: str | None = None  # local model on CPU: openvino / torch (None: openvino when installed)

    def __repr__(self) -> str:  # URLs redacted, no key: safe in log lines, tracebacks and Ray task errors
        from tweet_embed.backends.pool import redact_url

        urls = [redact_url(u) for u in split_urls(self.urls) + split_urls(self.openai_urls)]
        return f"BackendSpec(urls={urls}, model={self.model!r}, device={self.device!r})"

    @property
    def is_local(self) -> bool:
        return not split_urls(self.urls) and not split_urls(self.openai_urls)

    def on_device(self, device: str | None) -> BackendSpec:
        return replace(self, device=device)

    def build(self, decode_executor: Executor | None = None) -> Backend:
        return make_backend(
            self.urls,
            self.model,
            self.normalize,
            openai_urls=self.openai_urls,
            api_key=self.api_key,
            batch_size=self.batch_size,
            request_timeout=self.request_timeout,
            max_retry_time=self.max_retry_time,
            insecure=self.insecure,
            device=self.device,
            decode_executor=decode_executor,
            workers=self.workers,
            dtype=self.dtype,
            options=VectorOptions(self.prompt, self.prompt_name, self.dimensions),
            runtime=self.runtime,
        )
