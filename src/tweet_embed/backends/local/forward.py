"""The model's forward on one device: ids and lengths in, pooled (and normalised) vectors out.

:class:`LeanBert` (a BERT or XLM-R encoder in a few torch calls per layer, checked against transformers' forward when the
model loads and dropped if it differs) and CUDA graphs per batch shape.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("tweet_embed")

ROBERTA_TYPES = ("roberta", "xlm-roberta")  # BERT's layers, positions counted past the padding id


class LeanBert:
    """BERT encoder forward in a dozen torch calls per layer, on the weights of a transformers ``BertModel``, or
    of a RoBERTa / XLM-RoBERTa model (the same layers; positions counted past the padding id, as transformers
    does: multilingual-e5, paraphrase-multilingual-*, bge-m3's dense output).

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
        # RoBERTa / XLM-R count positions from padding_idx + 1 over the non-pad tokens (BERT: from 0)
        self.pad: int | None = None
        if getattr(cfg, "model_type", "") in ROBERTA_TYPES:
            self.pad = int(cfg.pad_token_id)
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
            and getattr(cfg, "model_type", "") in ("bert", *ROBERTA_TYPES)
            and getattr(cfg, "position_embedding_type", "absolute") in (None, "absolute")
            and getattr(cfg, "hidden_act", "") == "gelu"
            and not getattr(cfg, "is_decoder", False)
            and hasattr(model, "embeddings")
            and hasattr(model, "encoder")
        )

    def __call__(self, ids: Any, mask: Any) -> Any:
        """ids (B, L) int, mask (B, 1, 1, L) bool (True = attend) -> last hidden state (B, L, H)."""
        import torch
        import torch.nn.functional as F  # noqa: N812

        b, length = ids.shape
        h, nh = self.hidden, self.heads
        if self.pad is None:
            x = F.embedding(ids, self.word) + (self.pos[:length] + self.type0)
        else:  # as transformers' create_position_ids_from_input_ids
            keep = (ids != self.pad).int()
            positions = (keep.cumsum(1, dtype=torch.int32) * keep).long() + self.pad
            x = F.embedding(ids, self.word) + F.embedding(positions, self.pos) + self.type0
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


class Forward:
    """A loaded transformers encoder on one device as the backend runs it: pooling and normalisation after the
    encoder, a ready 4-D mask or :class:`LeanBert` where they give the same vectors, and CUDA graphs per batch
    shape when ``graphs_on``."""

    def __init__(self, torch: Any, model: Any, device: str, pooling: str, normalize: bool) -> None:
        self._torch = torch
        self.model = model
        self.device = device
        self.pooling = pooling
        self.normalize = normalize
        self.dims: int | None = None  # keep the first N dimensions (Matryoshka), before normalising
        self.mask4d = False
        self.lean: LeanBert | None = None
        self.graphs_on = False
        self.graphs: dict[tuple[int, int], Any] = {}
        self.captured = 0  # graphs captured so far
        self._graph_pool: Any = None
        self._capture_stream: Any = None

    def check_mask4d(self) -> None:
        """Use a ready 4-D boolean mask when this transformers version takes one and gives the same vectors."""
        torch = self._torch
        ids = torch.tensor([[101, 7592, 2088, 102], [101, 102, 0, 0]], dtype=torch.int32, device=self.device)
        ids %= self._vocab()  # a small model's table may end below these ids
        lens = torch.tensor([4, 2], dtype=torch.int32, device=self.device)
        with torch.inference_mode():
            self.mask4d = False
            ref = self(ids, lens)
            try:
                self.mask4d = True
                got = self(ids, lens)
                self.mask4d = bool(torch.allclose(got, ref, atol=2e-3, rtol=2e-3))
            except Exception:  # noqa: BLE001 - older transformers reject 4-D masks: keep the 2-D form
                self.mask4d = False

    def check_lean(self) -> None:
        """Switch to :class:`LeanBert` when the model is a plain BERT and both forwards agree."""
        torch = self._torch
        if not LeanBert.supports(self.model):
            return
        g = torch.Generator(device="cpu").manual_seed(1)
        top = min(20000, self._vocab())
        ids = torch.randint(min(1000, top // 2), top, (3, 24), generator=g, dtype=torch.int32).to(self.device)
        lens = torch.tensor([24, 9, 1], dtype=torch.int32, device=self.device)
        try:
            with torch.inference_mode():
                ref = self(ids, lens)
                self.lean = LeanBert(self.model)
                got = self(ids, lens)
            tol = 5e-3 if self._dtype_is_half() else 1e-4
            if not torch.allclose(got, ref, atol=tol, rtol=tol):
                log.warning("lean BERT forward differs from transformers': using transformers'")
                self.lean = None
        except Exception as exc:  # noqa: BLE001 - any surprise: keep the transformers forward
            log.warning("lean BERT forward unavailable (%s): using transformers'", exc)
            self.lean = None

    def _vocab(self) -> int:
        return int(getattr(self.model.config, "vocab_size", 0) or 30522)

    def _dtype_is_half(self) -> bool:
        return next(self.model.parameters()).dtype != self._torch.float32

    def run_batch(self, ids: Any, lens: Any) -> Any:
        """One batch on the GPU from pinned host arrays: eager, or a CUDA graph replay for this shape.

        Why graphs: a small model's batch is a few milliseconds of GPU work but as long again of Python
        launching a hundred kernels; a replay launches them all at once. One graph per (rows, length) shape,
        all sharing one memory pool: safe because every replay and the copy of its output run in order on one
        stream, under the backend's lock.
        """
        torch = self._torch
        if not self.graphs_on:
            return self(ids.to(self.device, non_blocking=True), lens.to(self.device, non_blocking=True))
        key = (int(ids.shape[0]), int(ids.shape[1]))
        entry = self.graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(key)
            except Exception as exc:  # noqa: BLE001 - graphs are an optimisation: fall back to eager
                log.warning("CUDA graph capture failed (%s); running eagerly from now on", exc)
                self.graphs_on = False
                torch.cuda.synchronize(self.device)
                return self.run_batch(ids, lens)
            self.graphs[key] = entry
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
        s_ids = torch.full((rows, length), 1000, dtype=torch.int32, device=self.device)
        s_lens = torch.full((rows,), length, dtype=torch.int32, device=self.device)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
            self._capture_stream = torch.cuda.Stream(self.device)
        side = self._capture_stream
        main = torch.cuda.current_stream(self.device)
        side.wait_stream(main)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):
            for _ in range(2):  # library handles and workspaces for this stream exist before the capture
                self(s_ids, s_lens)
            graph.capture_begin(pool=self._graph_pool, capture_error_mode="thread_local")
            try:
                s_out = self(s_ids, s_lens)
            finally:
                graph.capture_end()
        main.wait_stream(side)
        self.captured += 1
        return graph, s_ids, s_lens, s_out

    def __call__(self, ids: Any, lens: Any) -> Any:
        """ids (B, L) int32 and lengths (B,) on the device -> pooled (and normalised) float32 (B, d)."""
        torch = self._torch
        length = ids.shape[1]
        mask = torch.arange(length, device=ids.device)[None, :] < lens[:, None]
        if self.lean is not None:
            hidden = self.lean(ids, mask[:, None, None, :])
        else:
            if self.mask4d:
                # a ready 4-D mask skips transformers' "is anything padded?" check, a host sync per batch that
                # would stop the CPU from queueing the next batches while the GPU works
                attn = mask[:, None, None, :]
            else:
                attn = mask.to(torch.int64)
            hidden = self.model(input_ids=ids, attention_mask=attn).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0].float()
        else:
            summed = torch.bmm(mask.to(hidden.dtype).unsqueeze(1), hidden).squeeze(1).float()
            pooled = summed / lens.to(torch.float32).clamp(min=1.0).unsqueeze(1)
        if self.dims is not None:
            pooled = pooled[:, : self.dims]
        if self.normalize:
            pooled = torch.nn.functional.normalize(pooled, p=2.0, dim=1)
        return pooled

    def close(self) -> None:
        self.graphs.clear()
        self._graph_pool = None
        self.model = None
        self.lean = None
