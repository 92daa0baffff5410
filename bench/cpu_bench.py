"""CPU embedding, side by side (issue 17): tweet-embed's CPU runtimes against what a user could run instead.

One process, the same texts for every method, methods interleaved round by round (a noisy or shared machine
slows them all alike; the table shows the best and the median round). Rows:

- ``tweet-embed end to end (default)`` / ``(--runtime torch, fp32)``: a real ``run_embed`` over a JSONL file of
  the texts (read, parse, embed, write Parquet shards, markers) with the backend already loaded;
- ``tweet-embed model-only (default)``: ``LocalBackend.embed_sync`` in calls of its ``max_batch`` (the default
  runtime: OpenVINO, bf16 where the CPU has it natively, else fp32);
- ``tweet-embed model-only, as embed drives it``: the same backend through ``LocalBackend.embed`` with its
  ``max_in_flight`` calls at once (OpenVINO on CPU: 2, one tokenizing while the other runs), as the runner
  drives it, without reading input or writing shards;
- ``... (no bf16, forced)``: the same with ``TWEET_EMBED_CPU_BF16=0`` (what a CPU without bf16 gets; the
  same as the default on one);
- ``... (--dtype fp32)``: OpenVINO in fp32;
- ``... (--runtime torch, fp32)``: the torch path, today's fp32 CPU default before this issue;
- ``raw OpenVINO loop``: what a user's own script would do with the exported model: the Rust tokenizer, texts
  sorted by length, batches of 64 padded to their longest text, one synchronous request per batch on every
  core, the runtime's default precision;
- ``raw OpenVINO loop, int8 (NNCF)`` (``--int8``, needs ``nncf``): the same model quantized to int8 (static,
  MIXED preset, calibrated on 512 synthetic tweets that are not the measured ones);
- ``SentenceTransformer.encode``: batch 64, fp32;
- fastembed: not run. It runs ONNX models only (none is exported here), and installing fastembed 0.9.1 would
  downgrade huggingface_hub (2.x -> 1.x) under transformers in the environment; the issue's own measurement
  had it at 160-185 docs/s fp32, below SentenceTransformer.encode.

Quality columns: each method's vectors for the bundled sample (``sample/tweets.jsonl``, 2,000 tweets) against the
torch fp32 path's: minimum and mean cosine, and the overlap of the top-10 neighbours (within the sample) of 100
query tweets (every 20th).

Run::

    python bench/cpu_bench.py                          # 4,000 texts, 3 rounds
    python bench/cpu_bench.py --texts 20000 --rounds 5 --int8 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_bench import bench_texts  # noqa: E402
from tweet_embed.backends.base import Backend, BackendInfo  # noqa: E402
from tweet_embed.backends.local import LocalBackend, minilm_dir  # noqa: E402
from tweet_embed.backends.local.openvino import agreement as quality  # noqa: E402


def sample_texts() -> list[str]:
    with open(ROOT / "sample" / "tweets.jsonl", "rb") as fh:
        return [json.loads(line)["text"] for line in fh]


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def started(**kw: Any) -> LocalBackend:
    b = LocalBackend(device="cpu", **kw)
    asyncio.run(b.start())
    return b


def model_only(b: LocalBackend) -> Callable[[Sequence[str]], np.ndarray]:
    assert b.info is not None
    step = b.info.max_batch

    def run(texts: Sequence[str]) -> np.ndarray:
        return np.vstack([b.embed_sync(texts[i : i + step]) for i in range(0, len(texts), step)])

    return run


def model_driven(b: LocalBackend) -> Callable[[Sequence[str]], np.ndarray]:
    """The backend as ``embed`` drives it, without reading or writing: calls of ``max_batch`` texts through
    ``LocalBackend.embed`` with ``max_in_flight`` of them at once (on CPU with OpenVINO: 2, so one call is
    tokenized while the other runs on the cores)."""
    assert b.info is not None
    step, in_flight = b.info.max_batch, max(1, b.info.max_in_flight)

    async def run_all(texts: Sequence[str]) -> np.ndarray:
        sem = asyncio.Semaphore(in_flight)

        async def one(i: int) -> np.ndarray:
            async with sem:
                return await b.embed(texts[i : i + step])

        return np.vstack(await asyncio.gather(*(one(i) for i in range(0, len(texts), step))))

    return lambda texts: asyncio.run(run_all(texts))


class _Loaded(Backend):
    """An already started backend that ``run_embed`` may close: it stays loaded for the next round."""

    def __init__(self, inner: LocalBackend) -> None:
        self.inner = inner

    async def start(self) -> BackendInfo:
        return await self.inner.start()

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        return await self.inner.embed(texts)

    async def close(self) -> None:
        pass


def end_to_end(b: LocalBackend, corpus: Path) -> Callable[[Sequence[str]], None]:
    """Always the whole corpus (the measured texts): the warm-up call runs it once too."""
    from tweet_embed.embed.chunks import WorkDirs
    from tweet_embed.embed.runner import EmbedOptions, run_embed

    with open(corpus, "rb") as fh:
        lines = sum(1 for _ in fh)

    def run(texts: Sequence[str]) -> None:
        with tempfile.TemporaryDirectory(prefix="cpu-bench-") as d:
            dirs = WorkDirs.from_options(d, None, None, None)
            opts = EmbedOptions(inputs=[str(corpus)], dirs=dirs, chunk_lines=2000, log_interval=3600)
            summary = run_embed(opts, lambda: _Loaded(b))
            assert summary.rows == lines, summary.rows

    return run


def raw_loop(
    infer: Callable[[np.ndarray, np.ndarray], np.ndarray], dtype: Any = np.int32
) -> Callable[[Sequence[str]], np.ndarray]:
    """A user's plain loop (see module doc) around one runtime's ``infer(ids, mask) -> pooled``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(max_length=256)

    def run(texts: Sequence[str]) -> np.ndarray:
        encs = tok.encode_batch(list(texts))
        order = np.argsort([len(e.ids) for e in encs], kind="stable")
        out = np.empty((len(texts), 384), dtype=np.float32)
        for i in range(0, len(texts), 64):
            rows = order[i : i + 64]
            length = max(len(encs[r].ids) for r in rows)
            ids = np.zeros((len(rows), length), dtype=dtype)
            mask = np.zeros((len(rows), length), dtype=dtype)
            for j, r in enumerate(rows):
                e = encs[r].ids
                ids[j, : len(e)] = e
                mask[j, : len(e)] = 1
            out[rows] = infer(ids, mask)
        return out / np.linalg.norm(out, axis=1, keepdims=True)

    return run


def raw_openvino(model_xml: Path, precision: str | None) -> Callable[[Sequence[str]], np.ndarray]:
    """The exported model in OpenVINO, one synchronous request per batch on every core."""
    import openvino as ov

    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    request = ov.Core().compile_model(str(model_xml), "CPU", config).create_infer_request()
    return raw_loop(lambda ids, mask: request.infer({"input_ids": ids, "attention_mask": mask})[0])


def onnx_model(torch_backend: LocalBackend, out_dir: Path) -> Path:
    """The torch model + mean pooling exported to ONNX (opset 17, dynamic batch and length), as a user of ONNX
    Runtime would have it (what fastembed and optimum run)."""
    import torch

    assert torch_backend._fwd is not None
    encoder = torch_backend._fwd.model.float().eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    path = out_dir / "model.onnx"
    axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"}}
    example = (torch.full((2, 8), 1000, dtype=torch.int64), torch.ones((2, 8), dtype=torch.int64))
    with torch.no_grad(), contextlib.redirect_stderr(open(os.devnull, "w")):  # noqa: SIM115 - tracer warnings
        torch.onnx.export(
            Pooled(), example, str(path), input_names=["input_ids", "attention_mask"], output_names=["pooled"],
            dynamic_axes=axes, opset_version=17, dynamo=False,
        )  # fmt: skip
    return path


def onnx_int8(fp32: Path) -> Path:
    """ONNX Runtime's dynamic int8 quantization, per channel (the better of its two in the issue's table)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = fp32.with_name("model-int8.onnx")
    quantize_dynamic(str(fp32), str(path), per_channel=True, weight_type=QuantType.QInt8)
    return path


def raw_onnxruntime(path: Path) -> Callable[[Sequence[str]], np.ndarray]:
    """The ONNX model in ONNX Runtime's CPU provider, every core (intra-op threads), graph optimisations on."""
    import onnxruntime as ort

    from tweet_embed.procs import available_cores

    so = ort.SessionOptions()
    so.intra_op_num_threads = available_cores()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return raw_loop(lambda ids, mask: sess.run(None, {"input_ids": ids, "attention_mask": mask})[0], np.int64)


def int8_model(fp32_xml: Path, out_dir: Path) -> Path:
    """The exported model quantized by NNCF (static int8, MIXED preset) on synthetic tweets."""
    import nncf
    import openvino as ov

    from tweet_embed.testing.synth import synth_tweets

    core = ov.Core()
    model = core.read_model(str(fp32_xml))
    b = started(runtime="torch")
    flat, offsets, lengths = b.tokenize([t for _, t in synth_tweets(512, seed=99)])
    from tweet_embed.backends.local import pad_rows

    items = []
    for i in range(0, 512, 16):
        rows = np.arange(i, i + 16)
        length = int(lengths[rows].max())
        ids = pad_rows(flat, offsets, lengths, rows, length)
        mask = (np.arange(length)[None, :] < lengths[rows][:, None]).astype(np.int32)
        items.append({"input_ids": ids, "attention_mask": mask})
    q = nncf.quantize(
        model,
        nncf.Dataset(items),
        model_type=nncf.ModelType.TRANSFORMER,
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(items),
    )
    path = out_dir / "int8.xml"
    ov.save_model(q, str(path), compress_to_fp16=False)
    return path


def sentence_transformers() -> Callable[[Sequence[str]], np.ndarray]:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(minilm_dir()), device="cpu", local_files_only=True)

    def run(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(
            st.encode(list(texts), batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        )

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=4000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--int8", action="store_true", help="add the NNCF int8 row (needs nncf; quantizing takes minutes)"
    )
    ap.add_argument(
        "--int8-xml", help="the int8 row from this model (an earlier --int8 run's, saved with --keep)"
    )
    ap.add_argument("--skip", default="", help="comma-separated row keys to leave out")
    ap.add_argument("--json", help="write the table here as JSON")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import openvino as ov

    from tweet_embed.procs import available_cores

    caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    texts = [t for _, t in bench_texts(args.texts, seed=11)]
    sample = sample_texts()
    work = Path(tempfile.mkdtemp(prefix="cpu-bench-"))
    corpus = work / "corpus.jsonl"
    with open(corpus, "w") as fh:
        for i, t in enumerate(texts):
            fh.write(json.dumps({"_id": str(i), "text": t}) + "\n")

    default = started()
    with env(TWEET_EMBED_CPU_BF16="0"):
        no_bf16 = started()
    fp32 = started(dtype="fp32", runtime="openvino")
    torch32 = started(runtime="torch")
    model_dir = Path(default._ov.model_dir)
    methods: dict[str, tuple[str, Callable[[Sequence[str]], Any], bool]] = {
        "e2e": ("tweet-embed end to end (default)", end_to_end(default, corpus), False),
        "e2e-torch": ("tweet-embed end to end (--runtime torch, fp32)", end_to_end(torch32, corpus), False),
        "default": (
            f"tweet-embed model-only (default: OpenVINO {default._ov.precision})",
            model_only(default),
            True,
        ),
        "driven": (
            f"tweet-embed model-only, as embed drives it (default, calls in flight: "
            f"{default.info.max_in_flight if default.info else '?'})",
            model_driven(default),
            True,
        ),
        "no-bf16": (
            f"tweet-embed model-only (no bf16, forced: {no_bf16._ov.precision})",
            model_only(no_bf16),
            True,
        ),
        "fp32": ("tweet-embed model-only (--dtype fp32)", model_only(fp32), True),
        "torch": ("tweet-embed model-only (--runtime torch, fp32)", model_only(torch32), True),
        "raw": (
            "raw OpenVINO loop (runtime default precision)",
            raw_openvino(model_dir / "model.xml", None),
            True,
        ),
        "raw-f32": ("raw OpenVINO loop (f32 hint)", raw_openvino(model_dir / "model.xml", "f32"), True),
        "st": ("SentenceTransformer.encode (batch 64, fp32)", sentence_transformers(), True),
    }
    try:
        onnx = onnx_model(torch32, work)
        methods["ort"] = ("raw ONNX Runtime loop (fp32)", raw_onnxruntime(onnx), True)
        methods["ort-int8"] = (
            "raw ONNX Runtime loop, dynamic int8 (per channel)",
            raw_onnxruntime(onnx_int8(onnx)),
            True,
        )
    except ImportError:
        print("onnxruntime (or onnx) is not installed: no ONNX Runtime rows", file=sys.stderr)
    if args.int8 or args.int8_xml:
        try:
            xml = Path(args.int8_xml) if args.int8_xml else int8_model(model_dir / "model.xml", work)
            methods["int8"] = ("raw OpenVINO loop, int8 (NNCF, MIXED)", raw_openvino(xml, None), True)
            print(f"int8 model: {xml}", file=sys.stderr)
        except ImportError:
            print("nncf is not installed: no int8 row", file=sys.stderr)
    for key in filter(None, args.skip.split(",")):
        methods.pop(key, None)

    ref = model_only(torch32)(sample)
    qual = {k: quality(ref, np.asarray(fn(sample))) for k, (_, fn, q) in methods.items() if q}
    for _, fn, _ in methods.values():
        fn(texts[:256])  # warm: first shapes, caches
    walls: dict[str, list[float]] = {k: [] for k in methods}
    cpus: dict[str, list[float]] = {k: [] for k in methods}
    for r in range(args.rounds):
        for k, (_, fn, _) in methods.items():
            t, c = time.perf_counter(), time.process_time()
            fn(texts)
            walls[k].append(len(texts) / (time.perf_counter() - t))
            cpus[k].append(len(texts) / max(1e-9, time.process_time() - c))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

    torch_best = max(walls["torch"]) if "torch" in walls else float("nan")
    print(
        f"\n{len(texts)} texts (bench_texts, seed 11), {args.rounds} interleaved rounds, {available_cores()} cores, "
        f"OpenVINO {ov.__version__}, CPU capabilities {list(caps)}\n"
    )
    print(
        "| method | docs/s best | docs/s median | x torch fp32 | docs per CPU-s (best) | cos min | cos mean | top-10 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for k, (label, _, _) in methods.items():
        q = qual.get(k)
        best, med = max(walls[k]), statistics.median(walls[k])
        row = {"key": k, "method": label, "best": best, "median": med, "cpu_best": max(cpus[k]), **(q or {})}
        rows.append(row)
        qs = f"{q['cos_min']:.4f} | {q['cos_mean']:.5f} | {q['top10']:.3f}" if q else "— | — | —"
        print(
            f"| {label} | {best:,.0f} | {med:,.0f} | {best / torch_best:.2f} | {max(cpus[k]):,.0f} | {qs} |"
        )
    # The targets of issue 17, against the raw loops of the same quality (cos min >= 0.99, top-10 >= 0.9)
    raw_keys = [k for k in walls if k.startswith(("raw", "ort", "int8"))]
    passing = [k for k in raw_keys if qual.get(k, {}).get("cos_min", 0) >= 0.99 and qual[k]["top10"] >= 0.9]
    if "default" in walls and "torch" in walls:
        print(
            f"\nmodel-only default / torch fp32 (today's path before issue 17): {max(walls['default']) / torch_best:.2f}"
        )
    if passing:
        best_raw = max(passing, key=lambda k: max(walls[k]))
        for k in ("default", "driven"):
            if k in walls:
                print(
                    f"{methods[k][0]} / best raw loop at the quality bar ({methods[best_raw][0]}): "
                    f"best {max(walls[k]) / max(walls[best_raw]):.2f}, "
                    f"median {statistics.median(walls[k]) / statistics.median(walls[best_raw]):.2f}"
                )
    failing = sorted(set(raw_keys) - set(passing))
    if failing:
        print("below the quality bar, not compared: " + ", ".join(methods[k][0] for k in failing))
    if "e2e" in walls and "default" in walls:
        print(f"end to end / model-only (default): {max(walls['e2e']) / max(walls['default']):.2f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"texts": len(texts), "rounds": args.rounds, "rows": rows}, indent=1)
        )
    for b in (default, no_bf16, fp32, torch32):
        asyncio.run(b.close())


if __name__ == "__main__":
    main()
