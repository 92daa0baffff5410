"""What every backend does the same way with ``--prompt``, ``--prompt-name`` and ``--dimensions``.

The prompt is text put before every input (E5's ``passage: ``, nomic's ``search_document: ``); a prompt name
is looked up in the model's sentence-transformers ``prompts`` (by TEI itself, or here for the local model).
Dimensions keep the first N of a Matryoshka model's vector, then renormalise when normalising: what TEI and
sentence-transformers' ``truncate_dim`` do, so a server that ignores the field can be made up for here.
Every one of them changes the vectors, so all go into the shard metadata and the run manifest
(:func:`vector_options`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tweet_embed.backends.base import BackendError

# shard-metadata keys of the options that change a vector beyond model, dim and normalize
VECTOR_KEYS = ("prompt", "prompt_name", "dimensions")


@dataclass(frozen=True)
class VectorOptions:
    prompt: str | None = None  # text put before every input
    prompt_name: str | None = None  # a name in the model's sentence-transformers prompts
    dimensions: int | None = None  # keep the first N dimensions (Matryoshka)

    def __post_init__(self) -> None:
        if self.dimensions is not None and self.dimensions < 1:
            raise BackendError(f"--dimensions must be at least 1 (got {self.dimensions})")
        if self.prompt is not None and self.prompt_name is not None:
            raise BackendError("give --prompt or --prompt-name, not both")

    def with_prompt(self, texts: Sequence[str]) -> Sequence[str]:
        """``texts`` with the ``--prompt`` text before each (the texts themselves when there is none)."""
        if not self.prompt:
            return texts
        p = self.prompt
        return [p + t for t in texts]

    def check_width(self, full: int, model: str) -> None:
        """A clear error before any work when N is above what the model makes."""
        if self.dimensions is not None and self.dimensions > full:
            raise BackendError(
                f"--dimensions {self.dimensions} is more than model {model} makes ({full} dimensions)"
            )

    def metadata(self) -> dict[str, str]:
        """The shard-metadata entries (only the options given, so runs without them keep their old keys)."""
        out: dict[str, str] = {}
        if self.prompt is not None:
            out["prompt"] = self.prompt
        if self.prompt_name is not None:
            out["prompt_name"] = self.prompt_name
        if self.dimensions is not None:
            out["dimensions"] = str(self.dimensions)
        return out


def truncate(vectors: np.ndarray, dimensions: int, normalize: bool) -> np.ndarray:
    """The first ``dimensions`` columns, renormalised to unit length when ``normalize`` (a new array)."""
    out = np.array(vectors[:, :dimensions], dtype=np.float32, order="C")  # a copy, whatever came in
    if normalize:
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, np.maximum(norms, 1e-12), out=out)
    return out
