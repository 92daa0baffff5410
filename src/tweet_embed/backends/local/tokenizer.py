"""Tokenizing for the in-process model: the Rust tokenizer as the backend sets it up, :class:`WordCacheTokenizer`
(the same ids for BERT-style tokenizers at a fraction of the CPU per text), and the tokenizer processes a GPU
run spreads the work over.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger("tweet_embed")

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


def start_tokenizer_processes(path: str, max_len: int, workers: int) -> Any:
    """A ``ProcessPoolExecutor`` of ``workers`` tokenizer processes, every one started, or None where this
    process may not have children or they cannot start (then the caller tokenizes in its own process)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if mp.current_process().daemon:
        # a daemonic process (e.g. a device worker) may not have children: tokenize in this process
        log.info("daemonic process: tokenizing in this process (Rust threads)")
        return None
    pool = None
    try:
        pool = ProcessPoolExecutor(
            workers,
            mp_context=mp.get_context("spawn"),
            initializer=_tok_init,
            initargs=(path, max_len),
        )
        # start every worker now (interpreter start, imports), not inside the first call
        list(pool.map(_tok_encode, [["warm up"]] * (2 * workers)))
    except Exception as exc:  # noqa: BLE001 - no processes to be had: tokenize in this process
        log.warning("tokenizer processes unavailable (%s); tokenizing in this process", exc)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        return None
    return pool


def encode_in_processes(pool: Any, workers: int, texts: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Flat ids and lengths from the tokenizer processes (split into one piece per process), or None when the
    call is too small to be worth the IPC. A failing worker raises: the caller stops using the pool."""
    n = len(texts)
    if n < 2 * MIN_PIECE:
        return None
    pieces = min(workers, n // MIN_PIECE)
    step = -(-n // pieces)
    parts = list(pool.map(_tok_encode, [texts[i : i + step] for i in range(0, n, step)]))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
