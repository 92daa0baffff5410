"""The in-process model on CPU through OpenVINO: exported once into a cache, bf16 where the CPU has it.

Why OpenVINO: measured side by side (issue 17; ``bench/cpu_bench.py``), its CPU plugin ran MiniLM about 2.8x
faster than the torch fp32 path on an AMX CPU in bf16 at a minimum cosine of 1.0000 against fp32, and faster
than torch in fp32 as well on a CPU without bf16 (AMD EPYC, AVX2), where ONNX Runtime's and its own int8 lose
too much (minimum cosine 0.88-0.98). The torch path stays one flag away (``--runtime torch``), and fp32 with
OpenVINO is ``--dtype fp32``.

What is here:

- :func:`choose_precision`: ``bf16`` when the CPU has it (OpenVINO's ``OPTIMIZATION_CAPABILITIES``), else
  ``f32``; ``TWEET_EMBED_CPU_BF16=0`` makes a bf16 CPU act as one without (tests, the benchmark).
- :func:`export_cached`: the loaded transformers encoder with its pooling, converted by ``openvino.convert_model``
  and saved (fp32 weights, the precision is chosen at compile time) under a key made of the weights' content
  hash, the pooling, and the versions of OpenVINO, torch and transformers. A finished export is published by
  one rename, with a checksum file written last; a copy whose checksums do not match is removed and exported
  again, never loaded. A file lock keeps concurrent worker processes from exporting the same model twice.
- :class:`OpenVINOForward`: the compiled model; batches go through one infer request per stream, kept busy
  (the runtime spreads streams over cores) and come back pooled; normalisation is done here, so one
  export serves both ``--normalize`` settings.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tweet_embed.backends.base import BackendError

log = logging.getLogger("tweet_embed")

EXPORT_FORMAT = 1  # bump when what is exported changes (inputs, outputs, pooling graph)
CACHE_ENV = "TWEET_EMBED_CACHE_DIR"
BF16_ENV = "TWEET_EMBED_CPU_BF16"
OPENVINO_HINT = "pip install 'tweet-embed[local]' (or: pip install openvino)"
CHECKSUMS = "checksums.json"
FILES = ("model.xml", "model.bin")

PRECISIONS = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp32": "f32",
    "float32": "f32",
    "float": "f32",
    "f32": "f32",
}


def import_openvino() -> Any:
    try:
        import openvino
    except ImportError as e:
        raise BackendError(f"--runtime openvino needs the openvino package: {OPENVINO_HINT}") from e
    return openvino


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_has_bf16(core: Any) -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 natively here (AVX-512 BF16 or AMX); ``TWEET_EMBED_CPU_BF16=0``
    answers no regardless, so the no-bf16 path can be forced on any machine."""
    if os.environ.get(BF16_ENV, "") == "0":
        return False
    try:
        caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - an old plugin without the property: assume the plain path
        return False
    return "BF16" in {str(c).upper() for c in caps}


def choose_precision(requested: str | None, has_bf16: bool) -> str:
    """``bf16`` or ``f32``: the request (``--dtype``) when given, else bf16 where the CPU has it.

    bf16 asked for on a CPU without it is refused: OpenVINO would quietly run f32 and the run would record
    a precision it does not have.
    """
    if requested is None or requested.lower() == "auto":
        return "bf16" if has_bf16 else "f32"
    got = PRECISIONS.get(requested.lower())
    if got is None:
        raise BackendError(f"--runtime openvino: unknown --dtype {requested!r} (bf16 or fp32)")
    if got == "bf16" and not has_bf16:
        raise BackendError(
            "--dtype bf16: this CPU has no native bf16 (no AVX-512 BF16 or AMX); use --dtype fp32 "
            "(or leave --dtype out: fp32 is then chosen)"
        )
    return got


def cache_root() -> Path:
    """Where exported models live: ``TWEET_EMBED_CACHE_DIR``, else ``$XDG_CACHE_HOME/tweet-embed`` (or
    ``~/.cache/tweet-embed``), ``openvino/`` below it."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser() / "openvino"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tweet-embed" / "openvino"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def weights_fingerprint(path: Path) -> str:
    """Content hash of what defines a model directory's vectors (config, weights, pooling settings)."""
    h = hashlib.sha256()
    names = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and (p.suffix in (".safetensors", ".bin", ".pt", ".pth") or p.name.endswith("config.json"))
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    for p in names:
        h.update(str(p.relative_to(path)).encode() + b"\0" + file_digest(p).encode() + b"\n")
    return h.hexdigest()


def export_key(source: str, pooling: str) -> str:
    """The cache key: the model's identity and everything the exported graph depends on."""
    import openvino
    import torch
    import transformers

    parts = {
        "format": EXPORT_FORMAT,
        "source": source,
        "pooling": pooling,
        "openvino": openvino.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def is_valid_export(path: Path) -> bool:
    """A finished, undamaged export: the checksum file (written last) matches every file."""
    try:
        sums = json.loads((path / CHECKSUMS).read_text())
        return all(sums.get(name) == file_digest(path / name) for name in FILES)
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    import fcntl

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def export_cached(
    model: Callable[[], Any],
    source: str,
    pooling: str,
    root: Path | None = None,
) -> Path:
    """The directory of the exported model for ``source``, exporting it first when it is missing or damaged.

    ``model`` returns the loaded transformers encoder (called only on a cache miss); ``source`` identifies
    its weights (:func:`weights_fingerprint` of a directory, or a ``random:`` spec with its seed).
    """
    ov = import_openvino()
    root = root or cache_root()
    key = export_key(source, pooling)
    final = root / key
    with _locked(root / f"{key}.lock"):
        if final.is_dir():
            if is_valid_export(final):
                return final
            log.warning("exported model in %s is damaged or incomplete: exporting it again", final)
            shutil.rmtree(final, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
        try:
            os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide a shared cache from other users
            _export(ov, model(), pooling, tmp)
            sums = {name: file_digest(tmp / name) for name in FILES}
            (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1, sort_keys=True))
            for name in (*FILES, CHECKSUMS):
                with open(tmp / name, "rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("exported the model for OpenVINO into %s", final)
        return final


def _export(ov: Any, encoder: Any, pooling: str, out: Path) -> None:
    """Convert encoder + pooling (ids, mask int32 in; pooled float32 out) and save it with fp32 weights."""
    import torch

    class Pooled(torch.nn.Module):
        def __init__(self, encoder: Any) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            if pooling == "cls":
                return hidden[:, 0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    wrapped = Pooled(encoder.float().eval())
    example = {
        "input_ids": torch.full((2, 8), 1000, dtype=torch.int32),
        "attention_mask": torch.ones((2, 8), dtype=torch.int32),
    }
    shapes = [("input_ids", [-1, -1], ov.Type.i32), ("attention_mask", [-1, -1], ov.Type.i32)]
    with torch.no_grad():
        converted = ov.convert_model(wrapped, example_input=example, input=shapes)
    # Deterministic bytes: operations the converter leaves unnamed get names from process-wide counters
    # ("Constant_6462"), so a second export in one process would differ; name every operation by its position
    converted.set_friendly_name("tweet_embed")
    for i, op in enumerate(converted.get_ordered_ops()):
        if op.get_type_name() != "Parameter":  # inputs keep their names (input_ids, attention_mask)
            op.set_friendly_name(f"op{i}_{op.get_type_name()}")
    # fp32 on disk: the precision is chosen when compiling (bf16 or f32), and fp16 weights would change f32
    ov.save_model(converted, str(out / "model.xml"), compress_to_fp16=False)


def agreement(ref: np.ndarray, got: np.ndarray, queries: int = 100, k: int = 10) -> dict[str, float]:
    """How closely ``got`` follows ``ref`` (the fp32 vectors of the same texts): minimum and mean cosine, and
    the mean overlap of the top-``k`` neighbours (within the set, the query left out) of ``queries`` evenly
    spaced rows. The CPU default must keep ``cos_min >= 0.99`` and ``top10 >= 0.9`` on the bundled sample."""
    a = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    b = got / np.linalg.norm(got, axis=1, keepdims=True)
    cos = (a * b).sum(axis=1)
    q = np.linspace(0, len(a) - 1, min(queries, len(a))).astype(np.int64)

    def top(x: np.ndarray) -> np.ndarray:
        s = x[q] @ x.T
        s[np.arange(len(q)), q] = -np.inf
        return np.argsort(-s, axis=1, kind="stable")[:, :k]

    ta, tb = top(a), top(b)
    overlap = float(np.mean([len(set(ta[i].tolist()) & set(tb[i].tolist())) / k for i in range(len(q))]))
    return {"cos_min": float(cos.min()), "cos_mean": float(cos.mean()), "top10": overlap}


class OpenVINOForward:
    """The exported model compiled for this CPU: ids and lengths of length-sorted batches in, pooled (and
    normalised) float32 rows out."""

    def __init__(
        self,
        model_dir: Path,
        precision: str,
        threads: int,
        normalize: bool,
        width: int,
        hint: str | None = None,
    ) -> None:
        ov = import_openvino()
        self._ov = ov
        core = ov.Core()
        # THROUGHPUT: several streams, each on its share of the cores with its own request in flight (the
        # plugin's way to use many cores, NUMA nodes included); LATENCY: one stream on every core
        hint = (hint or os.environ.get("TWEET_EMBED_OPENVINO_HINT") or "THROUGHPUT").upper()
        config: dict[str, Any] = {
            "PERFORMANCE_HINT": hint,
            "INFERENCE_NUM_THREADS": int(threads),
            "INFERENCE_PRECISION_HINT": precision,
        }
        from tweet_embed.procs import available_cores

        if threads < available_cores():
            # several worker processes share this machine's cores: pinning each one's threads to the same
            # first cores would stack them up
            config["ENABLE_CPU_PINNING"] = False
        self.compiled = core.compile_model(str(model_dir / "model.xml"), "CPU", config)
        got = str(self.compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
        self.precision = "bf16" if "bf16" in got else "f32" if "f32" in got or "float32" in got else got
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        self.requests = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self.normalize = normalize
        self.width = width
        self.dims: int | None = None  # keep the first N dimensions (Matryoshka), before normalising
        self.hint = hint
        self.model_dir = model_dir
        self._requests: list[Any] = []

    def run(self, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """``(ids (B, L) int32, lengths (B,))`` batches -> their rows, concatenated in batch order.

        One infer request per stream, kept busy: a batch starts on a free request, and when none is free the
        oldest is waited for and its rows copied out. Plain requests, not ``AsyncInferQueue``: that queue's
        callbacks run Python on the runtime's threads, and dropping the queue (``close``) while one of them
        wanted the GIL hung the process for good (seen in CI: ``search`` stuck in ``close``; OpenVINO fixed the
        destructor upstream in PR 37073). ``wait`` releases the GIL, and no Python runs on the runtime's threads.
        """
        total = sum(len(lens) for _, lens in batches)
        out = np.empty((total, self.width), dtype=np.float32)
        if not self._requests:
            self._requests = [self.compiled.create_infer_request() for _ in range(self.requests)]
        free = list(self._requests)
        pending: collections.deque[tuple[Any, int, int]] = collections.deque()

        def collect() -> None:
            request, begin, rows = pending.popleft()
            request.wait()
            out[begin : begin + rows] = request.get_output_tensor(0).data
            free.append(request)

        start = 0
        try:
            for ids, lens in batches:
                if not free:
                    collect()
                mask = (np.arange(ids.shape[1], dtype=np.int32)[None, :] < lens[:, None]).astype(np.int32)
                request = free.pop()
                request.start_async({"input_ids": ids, "attention_mask": mask})
                pending.append((request, start, len(lens)))
                start += len(lens)
            while pending:
                collect()
        except Exception as exc:
            for request, _, _ in pending:  # none left running on arrays this call owns
                with contextlib.suppress(Exception):
                    request.wait()
            raise BackendError(f"OpenVINO inference failed: {exc}") from exc
        if self.dims is not None:
            out = np.ascontiguousarray(out[:, : self.dims])
        if self.normalize:
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            np.divide(out, np.maximum(norms, 1e-12), out=out)
        return out

    def close(self) -> None:
        self._requests = []
        self.compiled = None
