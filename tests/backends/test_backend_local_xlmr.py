"""The fast local path for the XLM-RoBERTa family, on the CPU: a random-weight XLM-R in sentence-transformers
layout with a real Unigram tokenizer trained here (offline, on generated text). The lean forward must give
sentence-transformers' vectors (cosine > 0.9999), fall back to transformers' forward when it differs, and the
model's prompts and Matryoshka dimensions must act as sentence-transformers' do."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from tweet_embed.backends.base import BackendError
from tweet_embed.backends.local import LocalBackend, model_width
from tweet_embed.backends.local import backend as backend_mod
from tweet_embed.backends.local import forward as forward_mod
from tweet_embed.backends.local.spec import xlmr_tokenizer_file
from tweet_embed.backends.vectors import VectorOptions
from tweet_embed.testing.synth import synth_tweets

torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")
st_mod = pytest.importorskip("sentence_transformers")

MULTILINGUAL = [
    "Das Wetter ist heute schön, wir gehen in den Park.",
    "今日はいい天気ですね。散歩に行きましょう",
    "¿Vamos al partido esta noche? ¡Qué golazo! 😂😂",
    "Il pleut encore à Paris… café et croissants ☕",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "Сегодня отличный день для прогулки",
    "हिन्दी भाषा में एक ट्वीट",
    "RT @someone: the quick brown fox jumps over the lazy dog https://t.co/abc123",
]
TEXTS = [*MULTILINGUAL, "", "x", "a " * 300, "<s> </s> <pad> tokens as text", *MULTILINGUAL[:3]] * 3
PROMPTS = {"query": "query: ", "passage": "passage: "}


def train_unigram(texts: list[str], vocab_size: int) -> object:
    """A Unigram tokenizer with XLM-R's pipeline as transformers' ``XLMRobertaTokenizer`` builds it from a
    vocabulary without a SentencePiece charsmap (whitespace split, Metaspace words, <s> … </s>, ids 0-3
    special), trained here, so sentence-transformers and the backend see the same ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always"),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        unk_token="<unk>",
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return tok


@pytest.fixture(scope="module")
def xlmr_dir(tmp_path_factory) -> Path:
    """A random-weight XLM-R (2 layers, 64 wide) in sentence-transformers layout: mean pooling, Normalize,
    prompts, 128 tokens."""
    from transformers import XLMRobertaConfig, XLMRobertaModel

    d = tmp_path_factory.mktemp("xlmr")
    corpus = [t for _, t in synth_tweets(3000, seed=5)] + MULTILINGUAL * 20
    tok = train_unigram(corpus, 1500)
    tok.save(str(d / "tokenizer.json"))  # type: ignore[attr-defined]
    vocab = tok.get_vocab_size()  # type: ignore[attr-defined]
    cfg = XLMRobertaConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=130,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(3)
    XLMRobertaModel(cfg, add_pooling_layer=False).save_pretrained(str(d))
    (d / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "XLMRobertaTokenizer",
                "model_max_length": 128,
                "bos_token": "<s>",
                "eos_token": "</s>",
                "cls_token": "<s>",
                "sep_token": "</s>",
                "pad_token": "<pad>",
                "unk_token": "<unk>",
                "mask_token": "<mask>",
            }
        )
    )
    (d / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                },
            ]
        )
    )
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    (d / "config_sentence_transformers.json").write_text(json.dumps({"prompts": PROMPTS}))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 64, "pooling_mode_mean_tokens": True})
    )
    (d / "2_Normalize").mkdir()
    return d


@pytest.fixture(scope="module")
def reference(xlmr_dir):
    return st_mod.SentenceTransformer(str(xlmr_dir), device="cpu", local_files_only=True)


def start(path: Path, **kw) -> LocalBackend:
    # These tests are about the torch forward (lean XLM-R, the fallback): on the CPU the default runtime is
    # OpenVINO (tests/backends/test_backend_local_openvino.py covers XLM-R through it), so ask for torch.
    kw.setdefault("runtime", "torch")
    b = LocalBackend(str(path), device="cpu", **kw)
    asyncio.run(b.start())
    return b


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_lean_xlmr_forward_matches_sentence_transformers(xlmr_dir, reference) -> None:
    b = start(xlmr_dir)
    try:
        assert b._fwd is not None and b._fwd.lean is not None  # the fast path, not SentenceTransformer.encode
        assert b._fwd.lean.pad == 1  # positions counted past the padding id, as XLM-R does
        assert "pipeline" not in b.info.extra  # type: ignore[union-attr]
        # the same ids on both sides, so what is compared below is the forward
        flat, offsets, lengths = b.tokenize(TEXTS)
        ours = [flat[o : o + n].tolist() for o, n in zip(offsets, lengths, strict=True)]
        assert ours == reference.tokenizer(TEXTS, truncation=True, max_length=128)["input_ids"]
        got = b.embed_sync(TEXTS)
        ref = reference.encode(TEXTS, normalize_embeddings=True, convert_to_numpy=True)
        assert got.shape == (len(TEXTS), 64)
        assert cosines(got, ref).min() > 0.9999
        # and against the transformers forward through the same pipeline
        saved, b._fwd.lean = b._fwd.lean, None
        try:
            hf = b.embed_sync(TEXTS)
        finally:
            b._fwd.lean = saved
        assert cosines(got, hf).min() > 0.9999
        # the tokenizer's own ids: the trained Unigram, truncated at 128 with </s> kept
        flat, _, lengths = b.tokenize(["a " * 300, "hello"])
        assert lengths.tolist()[0] == 128 and flat[127] == 2 and flat[0] == 0
    finally:
        asyncio.run(b.close())


def test_a_differing_lean_forward_falls_back_to_transformers(
    xlmr_dir, reference, monkeypatch, caplog
) -> None:
    real = forward_mod.LeanBert.__call__

    def off(self, ids, mask):  # a lean forward that is slightly wrong
        return real(self, ids, mask) * 1.01 + 0.01

    monkeypatch.setattr(forward_mod.LeanBert, "__call__", off)
    b = start(xlmr_dir)
    try:
        assert b._fwd is not None and b._fwd.lean is None
        assert "differs from transformers'" in caplog.text
        got = b.embed_sync(TEXTS[:8])
        ref = reference.encode(TEXTS[:8], normalize_embeddings=True, convert_to_numpy=True)
        assert cosines(got, ref).min() > 0.9999
    finally:
        asyncio.run(b.close())


def test_prompt_names_and_dimensions_as_sentence_transformers(xlmr_dir, reference) -> None:
    b = start(xlmr_dir, options=VectorOptions(prompt_name="query", dimensions=24))
    try:
        info = b.info
        assert info is not None and info.dim == 24
        assert info.extra["prompt_name"] == "query" and info.extra["dimensions"] == "24"
        got = b.embed_sync(MULTILINGUAL)
        ref = reference.encode(
            MULTILINGUAL,
            prompt_name="query",
            normalize_embeddings=True,
            truncate_dim=24,
            convert_to_numpy=True,
        )
        ref /= np.linalg.norm(ref, axis=1, keepdims=True)  # truncate_dim cuts after Normalize: renormalise
        assert got.shape == (len(MULTILINGUAL), 24)
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
        assert cosines(got, ref).min() > 0.9999
    finally:
        asyncio.run(b.close())
    # a prompt given as text is the same prompt
    b = start(xlmr_dir, options=VectorOptions(prompt="query: ", dimensions=24))
    try:
        assert np.allclose(b.embed_sync(MULTILINGUAL), got, atol=1e-6)
    finally:
        asyncio.run(b.close())


def test_unknown_prompt_name_and_too_many_dimensions_are_clear_errors(xlmr_dir) -> None:
    with pytest.raises(BackendError, match=r"no such prompt \(its prompts: passage, query\)"):
        start(xlmr_dir, options=VectorOptions(prompt_name="document"))
    with pytest.raises(BackendError, match="--dimensions 65 is more than model .* makes \\(64 dimensions\\)"):
        start(xlmr_dir, options=VectorOptions(dimensions=65))


def test_random_xlmr_shapes(monkeypatch) -> None:
    assert model_width("random:xlmr-base") == 768 and model_width("random:xlmr-large") == 1024
    # the shape's pipeline, on a tiny shape: XLM-R config, Unigram tokenizer, the lean forward in use
    assert model_width("random:xlmr-L1-H32") == 32
    monkeypatch.setattr(backend_mod, "XLMR_VOCAB", 31000)  # a smaller table: quicker to initialise
    b = LocalBackend("random:xlmr-L1-H32", device="cpu", runtime="torch")
    info = asyncio.run(b.start())
    try:
        assert info.dim == 32 and b._fwd is not None and b._fwd.lean is not None
        assert b._fwd.model.config.model_type == "xlm-roberta"
        assert b.embed_sync(MULTILINGUAL).shape == (len(MULTILINGUAL), 32)
    finally:
        asyncio.run(b.close())
    spec = json.loads(xlmr_tokenizer_file().read_text())
    assert spec["model"]["type"] == "Unigram" and spec["pre_tokenizer"]["type"] == "Metaspace"
    assert [v[0] for v in spec["model"]["vocab"][:4]] == ["<s>", "<pad>", "</s>", "<unk>"]


def test_the_sentence_transformers_fallback_takes_prompts_and_dimensions(
    xlmr_dir, reference, tmp_path
) -> None:
    """A layout the fast path does not take (max pooling) goes through ``SentenceTransformer.encode``, with the
    model's prompts and the dimensions all the same."""
    d = tmp_path / "maxpool"
    d.mkdir()
    for entry in xlmr_dir.iterdir():
        if entry.name != "1_Pooling":
            (d / entry.name).symlink_to(entry)
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 64, "pooling_mode_max_tokens": True})
    )
    b = start(d, options=VectorOptions(prompt_name="passage", dimensions=16))
    try:
        assert b._fwd is None and b.info is not None and b.info.extra["pipeline"] == "sentence-transformers"
        assert b.info.dim == 16 and b.info.extra["prompt_name"] == "passage"
        got = b.embed_sync(MULTILINGUAL)
        st = st_mod.SentenceTransformer(str(d), device="cpu", local_files_only=True)
        ref = st.encode(MULTILINGUAL, prompt_name="passage", convert_to_numpy=True)[:, :16]
        assert got.shape == (len(MULTILINGUAL), 16) and cosines(got, ref).min() > 0.9999
        assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    finally:
        asyncio.run(b.close())
