"""Per-core speed of the local backend's tokenize step: the Rust tokenizer (before) against the
WordCacheTokenizer that gives the same ids (after), on the same texts, in the same process.

Run it pinned to one core, so the figures are per core and comparable between machines::

    taskset -c 1 python bench/tokenizer_bench.py                  # 20,000 texts, calls of 333, 5 rounds
    taskset -c 1 python bench/tokenizer_bench.py --texts 50000 --call 4000 --json out.json

Texts come from ``bench_texts`` in ``bench/gpu_bench.py`` (synthetic tweets joined 1-5 at a time, ~30 tokens
like real tweets). Calls default to 333 texts: a 4,000-text embed call cut across 12 tokenizer processes.
Every method runs once per round, rounds interleaved, so a noisy machine slows all of them alike; the table
shows the best and the median round (CPU time of this process, so other load on the core counts less).

Rows:
- ``reference``: ``encode_ids`` with the plain ``tokenizers.Tokenizer`` (what the backend did before);
- ``fast (steady)``: ``encode_ids`` with ``WordCacheTokenizer`` whose caches were filled on other texts of
  the same generator (the steady state of a long run: common words known, each text's own mentions, links
  and numbers new); reset to that state before every round;
- ``fast (warm)``: the same after a pass over the measured texts themselves (an upper bound);
- ``fast (cold)``: the word caches emptied before every call, so every word is new to it (worst case);
- the other rows are measurements behind choices made: the Rust tokenizer alone (Encodings not turned into
  ids), ``encode_batch``, and the Rust tokenizer with a cheaper normalizer on ASCII-only texts (the
  "ASCII fast path inside Rust" idea: not used, the word caches beat it by far).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core: the Rust tokenizer must not start threads

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from gpu_bench import bench_texts  # noqa: E402
from tweet_embed.backends import local  # noqa: E402
from tweet_embed.backends.local import WordCacheTokenizer, encode_ids, minilm_dir  # noqa: E402


def load_tokenizer(max_len: int) -> Any:
    return local.load_tokenizer(str(minilm_dir() / "tokenizer.json"), max_len)  # as the backend sets it


def check_identical(tok: Any, fast: WordCacheTokenizer, texts: list[str]) -> None:
    want = encode_ids(tok, texts)
    got = encode_ids(fast, texts)
    for a, b in zip(got, want, strict=True):
        if a.dtype != b.dtype or not np.array_equal(a, b):
            raise SystemExit("the fast path gave different ids: not benchmarking it")


def check_all_code_points(tok: Any) -> int:
    """Every code point (surrogates aside) next to letters, itself and a combining mark: same ids?"""
    fast = WordCacheTokenizer.for_tokenizer(tok)
    assert fast is not None
    cps = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    bad = 0
    for s in range(0, len(cps), 50_000):
        texts = [f"Ab{chr(c)}Cd {chr(c)}{chr(c)} x{chr(c)}e\u0301 " for c in cps[s : s + 50_000]]
        want = [e.ids for e in tok.encode_batch(texts)]
        flat, lengths = encode_ids(fast, texts)
        got = [g.tolist() for g in np.split(flat, np.cumsum(lengths)[:-1])]
        bad += sum(w != g for w, g in zip(want, got, strict=True))
    print(f"{len(cps):,} code points: {bad} differ; {fast.fallbacks} texts went through the tokenizer itself")
    return 1 if bad else 0


Method = tuple[Callable[[list[str]], Any], list[str], Callable[[], None] | None]


def rounds(methods: dict[str, Method], call: int, repeat: int) -> dict[str, list[float]]:
    """docs/s per round for each method (CPU time of this process), rounds interleaved."""
    out: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(repeat):
        for name, (fn, texts, setup) in methods.items():
            if setup is not None:
                setup()
            t0 = time.process_time()
            for i in range(0, len(texts), call):
                fn(texts[i : i + call])
            out[name].append(len(texts) / max(time.process_time() - t0, 1e-9))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", type=int, default=20_000)
    ap.add_argument("--call", type=int, default=333, help="texts per tokenize call (default: 4,000 / 12)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument(
        "--check-all-code-points",
        action="store_true",
        help="only check identity for every Unicode code point in context (a few minutes), no timing",
    )
    args = ap.parse_args(argv)
    if args.check_all_code_points:
        return check_all_code_points(load_tokenizer(args.max_len))

    from tokenizers import normalizers

    texts = [t for _, t in bench_texts(args.texts, args.seed)]
    ascii_texts = [t for t in texts if t.isascii()]
    tok = load_tokenizer(args.max_len)
    fast = WordCacheTokenizer.for_tokenizer(tok)
    if fast is None:
        raise SystemExit("WordCacheTokenizer does not apply to this tokenizer")
    check_identical(tok, fast, texts)  # also fills the caches: the warm state
    lens = np.diff(np.concatenate([[0], np.cumsum(encode_ids(fast, texts)[1])]))
    cheap = load_tokenizer(args.max_len)
    cheap.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=False, strip_accents=False, lowercase=True
    )

    # steady state of a long run: caches filled by other texts (same topics, different mentions, links,
    # numbers), reset to that state before every round so the measured texts are never seen twice
    steady = WordCacheTokenizer.for_tokenizer(tok)
    assert steady is not None
    encode_ids(steady, [t for _, t in bench_texts(args.texts, args.seed + 1)])
    snapshot = dict(steady._chunks), dict(steady._words)

    def reset_steady() -> None:
        assert steady is not None
        steady._chunks, steady._words = dict(snapshot[0]), dict(snapshot[1])

    cold_tok = WordCacheTokenizer.for_tokenizer(tok)
    assert cold_tok is not None

    def cold(batch: list[str]) -> Any:
        cold_tok._chunks.clear()  # every chunk and word new to it (the character table stays: per process)
        cold_tok._words.clear()
        return encode_ids(cold_tok, batch)

    methods: dict[str, Method] = {
        "reference: Rust tokenizer + ids (before)": (lambda b: encode_ids(tok, b), texts, None),
        "fast (steady): WordCacheTokenizer (after)": (lambda b: encode_ids(steady, b), texts, reset_steady),
        "fast (warm): every text seen before": (lambda b: encode_ids(fast, b), texts, None),
        "fast (cold): caches emptied every call": (cold, texts, None),
        "Rust encode_batch_fast, Encodings only": (lambda b: tok.encode_batch_fast(b), texts, None),
        "Rust encode_batch + ids": (lambda b: [e.ids for e in tok.encode_batch(b)], texts, None),
        "ASCII texts: reference": (lambda b: encode_ids(tok, b), ascii_texts, None),
        "ASCII texts: Rust, cheap BertNormalizer": (lambda b: encode_ids(cheap, b), ascii_texts, None),
        "ASCII texts: fast (steady)": (lambda b: encode_ids(steady, b), ascii_texts, reset_steady),
    }
    print(
        f"{len(texts):,} texts ({len(ascii_texts) / len(texts):.0%} ASCII), tokens per text mean "
        f"{lens.mean():.1f}, p95 {np.percentile(lens, 95):.0f}; calls of {args.call}; {args.repeat} rounds; "
        f"CPU affinity {sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}"
    )
    print("ids identical to the reference: yes (checked on every text before timing)")
    res = rounds(methods, args.call, args.repeat)
    base = float(np.median(res["reference: Rust tokenizer + ids (before)"]))
    figures = {}
    print(f"{'':44} {'best':>10} {'median':>10}  docs/s per core   x reference (median)")
    for name, values in res.items():
        best, med = max(values), float(np.median(values))
        ref_med = base if not name.startswith("ASCII") else float(np.median(res["ASCII texts: reference"]))
        figures[name] = {"best": round(best), "median": round(med), "rounds": [round(v) for v in values]}
        print(f"{name:44} {best:>10,.0f} {med:>10,.0f}  {med / ref_med:>24.2f} x")
    print(
        f"fallbacks to the tokenizer: {fast.fallbacks}; steady state: {len(snapshot[0]):,} chunks and "
        f"{len(snapshot[1]):,} words cached before a round, "
        f"{len(steady._chunks):,} and {len(steady._words):,} after"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "figures": figures}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
