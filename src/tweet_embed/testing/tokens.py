"""The test server's tokenizer: simple, deterministic, and the single source of every token count it reports.

Not a real tokenizer (no vocabulary can be fetched here, and the server must stay fast): each
whitespace-separated word is cut into pieces of about 4 UTF-8 bytes (a piece holds the characters whose
first byte's offset within the word falls in the same 4-byte bucket, so no character is split), and ``[CLS]`` /
``[SEP]`` frame the text when special tokens are added.  Ids are stable (blake2b of the piece, above the 1000
reserved for special tokens).  ``/tokenize`` returns these tokens with TEI's byte offsets; ``/embed``'s
length check (``max_input_length``) and ``usage`` token counts use :func:`approx_tokens`, the same count.
For English text this gives about 1.3 pieces per word, near what WordPiece gives for tweets.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["Token", "approx_tokens", "simple_tokenize"]

CLS_ID, SEP_ID = 101, 102  # BERT's ids, so a reader recognises them


@dataclass(frozen=True)
class Token:
    """TEI's ``SimpleToken``: ``start``/``stop`` are UTF-8 byte offsets, ``None`` for special tokens."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "text": self.text,
            "special": self.special,
            "start": self.start,
            "stop": self.stop,
        }


def _pieces(text: str) -> list[tuple[int, int]]:
    """(start, stop) byte offsets of every word piece."""
    out: list[tuple[int, int]] = []
    pos = 0  # byte offset of the current character
    word_start = -1  # byte offset where the current word began, -1 between words
    piece_start = -1
    bucket = -1
    for ch in text:
        size = len(ch.encode("utf-8", "surrogatepass"))
        if ch.isspace():
            if word_start >= 0:
                out.append((piece_start, pos))
                word_start = -1
        elif word_start < 0:
            word_start = piece_start = pos
            bucket = 0
        else:
            b = (pos - word_start) // 4
            if b != bucket:
                out.append((piece_start, pos))
                piece_start, bucket = pos, b
        pos += size
    if word_start >= 0:
        out.append((piece_start, pos))
    return out


def _word_pieces(word: str) -> int:
    if word.isascii():
        return (len(word) + 3) // 4
    buckets = set()
    pos = 0
    for ch in word:
        buckets.add(pos // 4)
        pos += len(ch.encode("utf-8", "surrogatepass"))
    return len(buckets)


def approx_tokens(text: str) -> int:
    """Token count with special tokens: ``2 + pieces`` (see the module docstring); = len(simple_tokenize)."""
    # str.split() splits on exactly the characters str.isspace() accepts, as _pieces does.
    return 2 + sum(_word_pieces(w) for w in text.split())


def simple_tokenize(text: str, add_special_tokens: bool = True) -> list[Token]:
    """The tokens of ``text`` as TEI's ``/tokenize`` lists them."""
    data = text.encode("utf-8", "surrogatepass")
    toks = []
    for start, stop in _pieces(text):
        piece = data[start:stop]
        ident = 1000 + int.from_bytes(hashlib.blake2b(piece, digest_size=4).digest(), "little") % 29_000
        toks.append(Token(ident, piece.decode("utf-8", "replace"), False, start, stop))
    if add_special_tokens:
        toks = [Token(CLS_ID, "[CLS]", True, None, None), *toks, Token(SEP_ID, "[SEP]", True, None, None)]
    return toks
