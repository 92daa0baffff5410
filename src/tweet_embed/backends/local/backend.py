"""LocalBackend: the in-process model, on one device (CPU or one GPU).

Why its own pipeline instead of ``SentenceTransformer.encode``: see the package's docstring. Here the parts
meet: the model spec is resolved (:mod:`.spec`), the model loaded (``random:`` shapes built), texts tokenized
(:mod:`.tokenizer`, in tokenizer processes on a GPU), sorted and cut into batches (:mod:`.batching`) and run
through :class:`~.forward.Forward`, with the GPU work of one call overlapping the tokenization of the next.

torch, transformers and sentence-transformers are imported inside :meth:`LocalBackend.start`, never at module
import, so the CLI starts fast and machines without the ``local`` extra can still use HTTP backends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tweet_embed.backends.base import Backend, BackendError, BackendInfo, check_vectors
from tweet_embed.backends.local.batching import pad_rows, plan_batches, rows_for, shape_rows
from tweet_embed.backends.local.forward import Forward
from tweet_embed.backends.local.openvino import (
    OPENVINO_HINT,
    PRECISIONS,
    OpenVINOForward,
    choose_precision,
    cpu_has_bf16,
    export_cached,
    import_openvino,
    openvino_available,
    weights_fingerprint,
)
from tweet_embed.backends.local.spec import (
    _RANDOM_LH,
    INSTALL_HINT,
    MINILM_ALIASES,
    MINILM_ID,
    RANDOM_SHAPES,
    RANDOM_XLMR_SHAPES,
    XLMR_VOCAB,
    _fast_layout,
    minilm_dir,
    random_xlmr_shape,
    read_prompts,
    xlmr_tokenizer_file,
)
from tweet_embed.backends.local.tokenizer import (
    default_tokenizer_workers,
    encode_ids,
    encode_in_processes,
    fast_tokenizer,
    load_tokenizer,
    start_tokenizer_processes,
)
from tweet_embed.backends.vectors import VectorOptions, truncate
from tweet_embed.procs import cpu_threads

log = logging.getLogger("tweet_embed")


class LocalBackend(Backend):
    """Runs a sentence-embedding model in this process, on one device (CPU or one GPU)."""

    def __init__(
        self,
        model: str = "all-MiniLM-L6-v2",
        device: str | None = None,
        normalize: bool = True,
        batch_size: int | None = None,
        dtype: str | None = None,
        *,
        token_budget: int | None = None,
        warmup: bool = True,
        threads: int | None = None,
        tokenizer_workers: int | None = None,
        options: VectorOptions | None = None,
        runtime: str | None = None,
    ) -> None:
        self.model_spec = model
        self.options = options or VectorOptions()
        self._prompt = (
            ""  # the text put before every input: --prompt, or the model's prompt --prompt-name names
        )
        self._prompts: dict[str, str] = {}  # the model's sentence-transformers prompts
        self.device_spec = device
        self.normalize = normalize
        self.batch_size = batch_size
        self.dtype_spec = dtype
        self.token_budget = token_budget
        self.warmup = warmup
        self.threads = threads
        self.tokenizer_workers = tokenizer_workers
        self.runtime_spec = runtime  # CPU runtime: "openvino", "torch", or None/"auto" (see _choose_runtime)
        self.runtime = "torch"  # the one in use, once loaded
        self._ov: Any = None  # OpenVINOForward when the CPU runs through OpenVINO
        self._pool: Any = None  # ProcessPoolExecutor of tokenizer workers, or None: tokenize in the thread
        self._executor: Any = None  # threads that run embed calls
        self._tok_path = ""
        self.info: BackendInfo | None = None
        self._lock = threading.Lock()  # one call at a time on the device; the other one tokenizes meanwhile
        self._stats = {
            "texts": 0,
            "tokens": 0,
            "padded_tokens": 0,
            "batches": 0,
            "calls": 0,
            "tokenize_ms": 0,
            "device_ms": 0,
            "warmup_ms": 0,
            "load_ms": 0,
            "launch_ms": 0,
            "wait_ms": 0,
            "gpu_ms": 0,
            "tokenizer_workers": 0,
            "graphs": 0,
        }
        self._stats_lock = threading.Lock()
        # What the model ran on its device, for /metrics and the journal (``device_counters``): forward
        # batches, texts, real and padded tokens, and device seconds (see _embed_sync for how each runtime's
        # seconds are measured).
        self._device_figs: dict[str, float] = {
            "batches": 0,
            "texts": 0,
            "tokens": 0,
            "padded_tokens": 0,
            "seconds": 0.0,
        }
        # filled by _load
        self._torch: Any = None
        self._st: Any = None  # SentenceTransformer when the fast pipeline does not apply
        self._tok: Any = None
        self._enc: Any = None  # what tokenizes: the tokenizer's WordCacheTokenizer, or the tokenizer itself
        self._pooling = "mean"
        self._max_len = 256
        self._dim = 0
        self._device = "cpu"
        self._cuda = False
        self._multiple = 1
        self._max_rows = 256
        self._min_tokens = 0
        self._fwd: Forward | None = None  # the model's forward (None: the sentence-transformers pipeline)
        self.lean = True  # use LeanBert when it applies and agrees with transformers

    # ---- set-up

    async def start(self) -> BackendInfo:
        if self.info is None:
            self.info = await asyncio.to_thread(self._load)
        return self.info

    def _load(self) -> BackendInfo:
        t0 = time.perf_counter()
        try:
            import torch
        except ImportError as e:
            raise BackendError(f"the local backend needs torch: {INSTALL_HINT}") from e
        self._torch = torch
        device = self.device_spec or ("cuda:0" if torch.cuda.is_available() else "cpu")
        if device == "cuda":
            device = "cuda:0"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise BackendError(f"device {device} asked for but torch sees no CUDA device")
        self._device = device
        self._cuda = device.startswith("cuda")
        if self._cuda:
            torch.cuda.set_device(torch.device(device))
            torch.backends.cuda.matmul.allow_tf32 = True
            # the CPU side only copies small arrays: one intra-op thread, so no OpenMP team per calling
            # thread spins on the cores the tokenizer processes and the run loop need
            torch.set_num_threads(max(1, int(self.threads or 1)))
        else:
            torch.set_num_threads(max(1, int(self.threads or cpu_threads())))

        spec = self.model_spec
        canonical = spec
        if spec in MINILM_ALIASES:
            path: Path | None = minilm_dir()
            canonical = MINILM_ID
        elif spec.startswith("random:"):
            path = None
        else:
            path = Path(spec).expanduser() if Path(spec).expanduser().is_dir() else None
        fast = spec.startswith("random:") or (path is not None and _fast_layout(path) is not None)
        self.runtime = self._choose_runtime(fast)
        # OpenVINO exports the fp32 model and picks its precision when compiling (--dtype is read there)
        dtype = torch.float32 if self.runtime == "openvino" else self._resolve_dtype(torch)

        try:  # a "Loading weights" bar per process (and per device worker) is noise among our log lines
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # each loader names the missing extra
            pass
        if spec.startswith("random:"):
            self._load_random(spec[len("random:") :], dtype)
        elif path is not None and (layout := _fast_layout(path)) is not None:
            self._load_fast(path, layout, dtype, offline=spec in MINILM_ALIASES)
        else:
            self._load_st(str(path) if path is not None else spec, dtype, offline=spec in MINILM_ALIASES)
        if self.runtime == "openvino":
            self._start_openvino(spec if path is None else None, path)
        self._apply_options(canonical)

        # batch geometry: a token budget per forward pass, shapes padded to x16 on GPU
        hidden = self._dim
        if self._cuda:
            self._multiple = 16
            default_budget = 1 << 18 if hidden <= 384 else (1 << 17 if hidden <= 768 else 1 << 16)
            self._max_rows = 8192
            max_batch = self.batch_size or 16384
            in_flight = 2
        else:
            # CPU: no shapes to warm, so pad less; calls large enough that sorting by length pays
            self._multiple = 4
            default_budget = 1 << 13
            self._max_rows = 512
            max_batch = self.batch_size or 1024
            in_flight = 1
            if self._ov is not None:
                # enough batches per call for every stream to have one in flight twice over, and a second
                # call tokenizing while this one runs
                max_batch = self.batch_size or min(16384, max(1024, 512 * self._ov.streams))
                in_flight = 2
        self.token_budget = self.token_budget or default_budget
        # merge only tiny batches (a bucket's last few texts): each batch costs a launch, each merge padding
        self._min_tokens = self.token_budget // 32 if self._cuda else 0
        if self.batch_size:
            self._max_rows = min(self._max_rows, self.batch_size)
        self._stats["load_ms"] = int((time.perf_counter() - t0) * 1000)
        if self._fwd is not None:
            self._fwd.check_mask4d()
            if self.lean:
                self._fwd.check_lean()
            workers = self.tokenizer_workers
            if workers is None:
                workers = default_tokenizer_workers(self._cuda)
            if workers > 0:
                self._start_pool(workers)
        if self._cuda and self._fwd is not None and self._fwd.lean is not None:
            env = os.environ.get("TWEET_EMBED_CUDA_GRAPHS")
            # on by default for small models, whose batches are launch-bound; large ones keep the GPU busy anyway
            self._fwd.graphs_on = env == "1" if env in ("0", "1") else self._dim <= 512
        if self._cuda and self.warmup and self._fwd is not None:
            self._warm_up()
        # extra goes into every shard's metadata: only what is the same on every device of a run
        extra = {"runtime": self.runtime, "dtype": str(dtype).replace("torch.", "")}
        if self._ov is not None:
            extra["dtype"] = {"bf16": "bfloat16", "f32": "float32"}.get(
                self._ov.precision, self._ov.precision
            )
        elif self._fwd is None:
            extra["pipeline"] = "sentence-transformers"
        extra.update(self.options.metadata())
        return BackendInfo(
            kind="local",
            model=canonical,
            dim=self._dim,
            normalize=self.normalize,
            max_batch=max_batch,
            max_in_flight=in_flight,
            extra=extra,
        )

    def _choose_runtime(self, fast: bool) -> str:
        """``openvino`` or ``torch``.

        Default (``auto``): OpenVINO on CPU for models the fast pipeline runs, when it is installed and can give
        the precision asked for (the measured fastest at the same quality, ``bench/cpu_bench.py``); torch on
        GPUs, for other models, and for precisions OpenVINO cannot give here (``--dtype bf16`` on a CPU
        without native bf16 keeps torch's emulated bf16, fp16 keeps its error).
        """
        asked = (self.runtime_spec or "auto").lower()
        if asked not in ("auto", "torch", "openvino"):
            raise BackendError(f"unknown runtime {self.runtime_spec!r} (auto, openvino or torch)")
        if asked == "torch":
            return "torch"
        if asked == "openvino":
            if self._cuda:
                raise BackendError("--runtime openvino runs on CPU; use --device cpu (or --runtime torch)")
            if not fast:
                raise BackendError(
                    f"--runtime openvino: {self.model_spec!r} is not a Transformer + mean/CLS pooling model "
                    "the in-process pipeline runs; use --runtime torch"
                )
            ov = import_openvino()  # the install hint now, not after loading the model
            choose_precision(self.dtype_spec, cpu_has_bf16(ov.Core()))  # a precision it cannot give: now too
            return "openvino"
        if self._cuda or not fast:
            return "torch"
        dtype = (self.dtype_spec or "auto").lower()
        if dtype not in ("auto", *PRECISIONS):
            return "torch"  # fp16 and unknown names: torch's own errors
        if not openvino_available():
            log.warning("openvino is not installed: the CPU runs the slower torch path (%s)", OPENVINO_HINT)
            return "torch"
        if PRECISIONS.get(dtype) == "bf16":
            import openvino

            if not cpu_has_bf16(openvino.Core()):
                return "torch"
        return "openvino"

    def _start_openvino(self, random_spec: str | None, path: Path | None) -> None:
        """Export the loaded model (or reuse its cached export) and compile it; the torch copy is dropped."""
        import openvino as ov_mod

        fwd = self._fwd
        assert fwd is not None
        source = f"{random_spec}@seed0" if random_spec else f"sha256:{weights_fingerprint(path)}"  # type: ignore[arg-type]
        model_dir = export_cached(lambda: fwd.model, source, self._pooling)
        precision = choose_precision(self.dtype_spec, cpu_has_bf16(ov_mod.Core()))
        self._ov = OpenVINOForward(
            model_dir, precision, int(self.threads or cpu_threads()), self.normalize, width=self._dim
        )
        fwd.close()
        self._fwd = None
        log.info(
            "CPU runtime: OpenVINO %s, %s, %d stream(s), model from %s",
            ov_mod.__version__,
            self._ov.precision,
            self._ov.streams,
            model_dir,
        )

    def _resolve_dtype(self, torch: Any) -> Any:
        spec = (self.dtype_spec or ("float16" if self._cuda else "float32")).lower()
        table = {
            "fp16": torch.float16,
            "float16": torch.float16,
            "half": torch.float16,
            "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16,
            "fp32": torch.float32,
            "float32": torch.float32,
            "float": torch.float32,
        }
        if spec not in table:
            raise BackendError(f"unknown dtype {self.dtype_spec!r} (fp16, bf16 or fp32)")
        if table[spec] == torch.float16 and not self._cuda:
            raise BackendError("fp16 is for GPUs; use fp32 or bf16 on CPU")
        return table[spec]

    def _tokenizer_from(self, path: Path, max_len: int) -> Any:
        """The tokenizer of a model directory (or a ``tokenizer.json`` file itself)."""
        try:
            import tokenizers  # noqa: F401
        except ImportError as e:
            raise BackendError(f"the local backend needs tokenizers: {INSTALL_HINT}") from e
        self._tok_path = str(path if path.suffix == ".json" else path / "tokenizer.json")
        tok = load_tokenizer(self._tok_path, max_len)
        self._enc = fast_tokenizer(tok)
        return tok

    def _finish_model(self, model: Any, dtype: Any, pooling: str) -> None:
        model = model.to(device=self._device, dtype=dtype).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self._pooling = pooling
        self._fwd = Forward(self._torch, model, self._device, pooling, self.normalize)

    def _apply_options(self, model: str) -> None:
        """Resolve the prompt and check the dimensions against the loaded model (before any work)."""
        opts = self.options
        if opts.prompt_name is not None:
            if opts.prompt_name not in self._prompts:
                known = ", ".join(sorted(self._prompts)) or "none"
                raise BackendError(
                    f"--prompt-name {opts.prompt_name!r}: model {model} has no such prompt (its prompts: {known})"
                )
            self._prompt = self._prompts[opts.prompt_name]
        else:
            self._prompt = opts.prompt or ""
        if opts.dimensions is not None:
            opts.check_width(self._dim, model)
            self._dim = opts.dimensions
            if self._fwd is not None:
                self._fwd.dims = opts.dimensions
            if self._ov is not None:
                self._ov.dims = opts.dimensions

    def _load_fast(self, path: Path, layout: tuple[str, int], dtype: Any, offline: bool) -> None:
        if offline:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from transformers import AutoConfig, AutoModel
        except ImportError as e:
            raise BackendError(f"the local backend needs transformers: {INSTALL_HINT}") from e
        pooling, max_seq = layout
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
        self._max_len = min(max_seq, int(getattr(cfg, "max_position_embeddings", max_seq) or max_seq))
        try:
            model = AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="sdpa")
        except (ValueError, TypeError):
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
        self._finish_model(model, dtype, pooling)
        self._dim = int(cfg.hidden_size)
        self._prompts = read_prompts(path)
        self._tok = self._tokenizer_from(path, self._max_len)

    def _load_random(self, shape: str, dtype: Any) -> None:
        try:
            from transformers import BertConfig, BertModel
        except ImportError as e:
            raise BackendError(f"the local backend needs transformers: {INSTALL_HINT}") from e
        if (xlmr := random_xlmr_shape(shape)) is not None:
            self._load_random_xlmr(*xlmr, dtype)
            return
        if shape in RANDOM_SHAPES:
            layers, hidden, heads, inter = RANDOM_SHAPES[shape]
        elif m := _RANDOM_LH.match(shape):
            layers, hidden = int(m.group(1)), int(m.group(2))
            heads, inter = max(1, hidden // 64), 4 * hidden
        else:
            known = ", ".join([*RANDOM_SHAPES, *RANDOM_XLMR_SHAPES])
            raise BackendError(
                f"unknown random shape {shape!r}: {known}, L<layers>-H<hidden> or xlmr-L<layers>-H<hidden>"
            )
        tok_dir = minilm_dir()
        cfg = BertConfig(
            vocab_size=30522,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=inter,
            max_position_embeddings=512,
        )
        self._seeded_model(BertModel, cfg, dtype, 256, tok_dir)

    def _load_random_xlmr(self, layers: int, hidden: int, heads: int, inter: int, dtype: Any) -> None:
        """An XLM-RoBERTa of that shape with seeded random weights, XLM-R's vocabulary size and a Unigram
        tokenizer (:func:`~.spec.xlmr_tokenizer_file`), mean pooling, 512 tokens (as multilingual-e5)."""
        from transformers import XLMRobertaConfig, XLMRobertaModel

        cfg = XLMRobertaConfig(
            vocab_size=XLMR_VOCAB,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=inter,
            max_position_embeddings=514,
            type_vocab_size=1,
            layer_norm_eps=1e-5,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )
        self._seeded_model(XLMRobertaModel, cfg, dtype, 512, xlmr_tokenizer_file())

    def _seeded_model(self, model_cls: Any, cfg: Any, dtype: Any, max_len: int, tokenizer: Path) -> None:
        """``model_cls(cfg)`` with random weights from seed 0 (the same vectors in every process), mean
        pooling, ``max_len`` tokens, the tokenizer at ``tokenizer``."""
        torch = self._torch
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(self._device):
            model = model_cls(cfg, add_pooling_layer=False)
        self._finish_model(model, dtype, "mean")
        self._max_len, self._dim = max_len, int(cfg.hidden_size)
        self._tok = self._tokenizer_from(tokenizer, self._max_len)

    def _load_st(self, name: str, dtype: Any, offline: bool) -> None:
        if offline:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise BackendError(f"the local backend needs sentence-transformers: {INSTALL_HINT}") from e
        try:
            st = SentenceTransformer(name, device=self._device, local_files_only=offline)
        except Exception as e:  # noqa: BLE001 - any loader failure is a BackendError for the CLI
            raise BackendError(f"cannot load model {name!r}: {e}") from e
        if dtype != self._torch.float32:
            st = st.to(dtype)
        self._st = st
        self._prompts = dict(getattr(st, "prompts", None) or {})
        get_dim: Any = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
        self._dim = int(get_dim())

    def _start_pool(self, workers: int) -> None:
        self._pool = start_tokenizer_processes(self._tok_path, self._max_len, workers)
        if self._pool is not None:
            self._stats["tokenizer_workers"] = workers

    def _warm_up(self) -> None:
        """Run every padded length once at full batch size, so no timed batch meets a cold shape."""
        torch, fwd = self._torch, self._fwd
        t0 = time.perf_counter()
        g = torch.Generator(device="cpu").manual_seed(0)
        assert self.token_budget is not None and fwd is not None
        with torch.inference_mode():
            for length in range(self._multiple, self._max_len + 1, self._multiple):
                rows = rows_for(length, self.token_budget, self._max_rows)
                ids = torch.randint(1000, 30000, (rows, length), generator=g, dtype=torch.int32)
                lens = torch.full((rows,), length, dtype=torch.int32)
                fwd.run_batch(ids.pin_memory(), lens.pin_memory())
            torch.cuda.synchronize(self._device)
        self._stats["warmup_ms"] = int((time.perf_counter() - t0) * 1000)

    # ---- the pipeline

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat int32 ids, offsets and lengths per text.

        In the tokenizer processes when there are any (split into pieces, one per process), else here with the
        Rust tokenizer's own threads (GIL released while encoding, held while turning Encodings into ids).
        """
        texts = texts if isinstance(texts, list) else list(texts)
        n = len(texts)
        pool = self._pool
        flat = lengths = None
        if pool is not None:
            try:
                got = encode_in_processes(pool, self._stats["tokenizer_workers"], texts)
                if got is not None:
                    flat, lengths = got
            except Exception as exc:  # noqa: BLE001 - a dead worker: carry on in this process
                log.warning("tokenizer processes failed (%s); tokenizing in this process from now on", exc)
                self._pool = None
                pool.shutdown(wait=False, cancel_futures=True)
        if flat is None or lengths is None:
            flat, lengths = encode_ids(self._enc, texts)
        offsets = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1], out=offsets[1:])
        return flat, offsets, lengths

    def _embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        n = len(texts)
        if n == 0:
            return np.zeros((0, self._dim), dtype=np.float32)
        if self._prompt:
            texts = [self._prompt + t for t in texts]
        fwd = self._fwd
        if fwd is None and self._ov is None:
            with self._lock, torch.inference_mode():
                t_st = time.perf_counter()
                vecs = self._st.encode(
                    list(texts),
                    batch_size=self.batch_size or 64,
                    convert_to_numpy=True,
                    normalize_embeddings=self.normalize,
                    show_progress_bar=False,
                )
                # sentence-transformers tokenizes inside encode: seconds are the whole call's wall time,
                # tokens are not known here (0)
                self._count_device(-(-n // (self.batch_size or 64)), n, 0, 0, time.perf_counter() - t_st)
            if self.options.dimensions is not None:
                vecs = truncate(np.asarray(vecs), self.options.dimensions, self.normalize)
            return check_vectors(np.asarray(vecs, dtype=np.float32), n, self._dim)

        t0 = time.perf_counter()
        flat, offsets, lengths = self.tokenize(texts)
        order = np.argsort(lengths, kind="stable")
        assert self.token_budget is not None
        batches = plan_batches(
            lengths[order],
            self.token_budget,
            self._max_rows,
            self._multiple,
            self._max_len,
            self._min_tokens,
        )
        t1 = time.perf_counter()
        padded = sum((e - s) * length for s, e, length in batches)
        ov_batches = (
            [
                (pad_rows(flat, offsets, lengths, order[s:e], length), lengths[order[s:e]])
                for s, e, length in batches
            ]
            if self._ov is not None
            else []
        )
        forward_s = 0.0  # device seconds of this call (CPU runtimes: wall time of the forward calls)
        with self._lock, torch.inference_mode():
            if self._ov is not None:
                t_fw = time.perf_counter()
                host = self._ov.run(ov_batches)
                forward_s = time.perf_counter() - t_fw
                done = None
            elif self._cuda:
                assert fwd is not None
                with torch.cuda.device(self._device):
                    began = torch.cuda.Event(enable_timing=True)
                    began.record()
                    host = torch.empty((n, self._dim), dtype=torch.float32, pin_memory=True)
                    for s, e, length in batches:
                        rows = order[s:e]
                        total = shape_rows(e - s, length, self.token_budget, self._max_rows)
                        padded += (total - (e - s)) * length
                        ids_np = pad_rows(flat, offsets, lengths, rows, length, total)
                        lens_np = np.ones(total, dtype=np.int32)
                        lens_np[: e - s] = lengths[rows]
                        ids = torch.from_numpy(ids_np).pin_memory()
                        lens = torch.from_numpy(lens_np).pin_memory()
                        out = fwd.run_batch(ids, lens)
                        host[s:e].copy_(out[: e - s], non_blocking=True)
                    done = torch.cuda.Event(enable_timing=True)
                    done.record()
            else:
                assert fwd is not None
                host = torch.empty((n, self._dim), dtype=torch.float32)
                for s, e, length in batches:
                    rows = order[s:e]
                    ids = torch.from_numpy(pad_rows(flat, offsets, lengths, rows, length))
                    lens = torch.from_numpy(lengths[rows].astype(np.int32))
                    t_fw = time.perf_counter()
                    host[s:e] = fwd(ids, lens)
                    forward_s += time.perf_counter() - t_fw
                done = None
        t_launched = time.perf_counter()
        gpu_ms = 0.0
        if done is not None:
            done.synchronize()  # outside the lock: the next call may queue its batches meanwhile
            gpu_ms = began.elapsed_time(done)
            # CUDA: device seconds are the GPU's own clock between the events around this call's batches
            # (read once the synchronising call returns), not wall time around that call: two calls overlap
            # (one launches while the other waits), and wall time would count the overlap twice, whereas
            # both calls' batches queue on one stream, so their event intervals never overlap.
            forward_s = gpu_ms / 1000.0
        t_synced = time.perf_counter()
        result = np.empty((n, self._dim), dtype=np.float32)
        result[order] = host if isinstance(host, np.ndarray) else host.numpy()
        t2 = time.perf_counter()
        with self._stats_lock:
            st = self._stats
            st["texts"] += n
            st["tokens"] += int(lengths.sum())
            st["padded_tokens"] += int(padded)
            st["batches"] += len(batches)
            st["calls"] += 1
            st["tokenize_ms"] += int((t1 - t0) * 1000)
            st["device_ms"] += int((t2 - t1) * 1000)
            st["launch_ms"] += int((t_launched - t1) * 1000)
            st["wait_ms"] += int((t_synced - t_launched) * 1000)
            st["gpu_ms"] += int(gpu_ms)
        self._count_device(len(batches), n, int(lengths.sum()), int(padded), forward_s)
        return check_vectors(result, n, self._dim)

    def _count_device(self, batches: int, texts: int, tokens: int, padded: int, seconds: float) -> None:
        with self._stats_lock:
            d = self._device_figs
            d["batches"] += batches
            d["texts"] += texts
            d["tokens"] += tokens
            d["padded_tokens"] += padded
            d["seconds"] += seconds

    def device_counters(self) -> dict[str, dict[str, float]]:
        with self._stats_lock:
            return {self._device: dict(self._device_figs)}

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.info is None:
            await self.start()
        if self._executor is None:
            # own threads (not asyncio's shared pool): the same few threads always run the model, so the
            # device and thread-local state are set up once; two on a GPU so one call tokenizes while the
            # other's batches run
            from concurrent.futures import ThreadPoolExecutor

            workers = self.info.max_in_flight if self.info is not None else 1
            self._executor = ThreadPoolExecutor(max(1, workers), thread_name_prefix="local-model")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._embed_sync, texts)

    def embed_sync(self, texts: Sequence[str]) -> np.ndarray:
        """Blocking form for scripts and the benchmark (``start`` must have run)."""
        return self._embed_sync(texts)

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._pool is not None:
            # wait: its idle processes exit at once, and a process that ends before they are reaped leaves
            # the resource tracker warning about leaked semaphores
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        if self._fwd is not None:
            self._stats["graphs"] = self._fwd.captured
            self._fwd.close()
            self._fwd = None
        if self._ov is not None:
            self._ov.close()
            self._ov = None
        self._st = None
        torch = self._torch
        if torch is not None and self._cuda:
            torch.cuda.empty_cache()

    def token_lengths(self, texts: Sequence[str]) -> tuple[list[int], int] | None:
        """Each text's token count as the model would see it before truncation (special tokens and the prompt
        included), and the length the model truncates at: for ``plan``'s token figures. None before start."""
        if self._tok_path:
            from tokenizers import Tokenizer

            tok = Tokenizer.from_file(self._tok_path)  # a copy without truncation: the true lengths
            tok.no_padding()
            tok.no_truncation()
            encs = tok.encode_batch([self._prompt + t for t in texts] if self._prompt else list(texts))
            return [len(e.ids) for e in encs], self._max_len
        st = self._st
        if st is None:
            return None
        hf = st.tokenizer  # the sentence-transformers fallback: its own tokenizer and limit
        prompted = [self._prompt + t for t in texts] if self._prompt else list(texts)
        counts = [len(ids) for ids in hf(prompted, truncation=False)["input_ids"]]
        return counts, int(st.max_seq_length)

    def stats(self) -> dict[str, int]:
        with self._stats_lock:
            out = dict(self._stats)
        if self._fwd is not None:
            out["graphs"] = self._fwd.captured
        return out
