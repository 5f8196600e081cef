"""An inference-only forward pass of a BERT encoder (the architecture of all-MiniLM-L6-v2 and most
sentence-transformers models), for embedding a request's intention fast.

transformers' BertModel spends most of a short text's forward on module dispatch and mask bookkeeping: on
2 CPU cores, 5 tokens through MiniLM take 10-12 ms there for ~50 M multiply-adds. This module holds the same
weights as plain tensors (query, key and value fused into one matrix) and runs the same arithmetic as a few
dozen torch calls. It reads the weights from a loaded BertModel and supports exactly the configuration it
checks (absolute positions, post-LN blocks, exact GELU, encoder only); anything else is refused, and the
caller keeps the model's own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class _Layer:
    qkv_w: torch.Tensor  # (3H, H): query, key, value stacked
    qkv_b: torch.Tensor  # (3H,)
    out_w: torch.Tensor  # (H, H) attention output projection
    out_b: torch.Tensor
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    up_w: torch.Tensor  # (I, H)
    up_b: torch.Tensor
    down_w: torch.Tensor  # (H, I)
    down_b: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor


def unsupported(model) -> str:
    """Why `model` is not a BERT encoder this module runs exactly ('' when it is)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "bert":
        return "not a BERT model"
    checks = {
        "position_embedding_type": (getattr(cfg, "position_embedding_type", "absolute"), "absolute"),
        "hidden_act": (cfg.hidden_act, "gelu"),
        "is_decoder": (bool(getattr(cfg, "is_decoder", False)), False),
        "add_cross_attention": (bool(getattr(cfg, "add_cross_attention", False)), False),
    }
    for name, (got, want) in checks.items():
        if got != want:
            return f"{name}={got!r} (supported: {want!r})"
    if cfg.hidden_size % cfg.num_attention_heads:
        return "hidden size not divisible by the heads"
    return ""


class LeanBert:
    """BERT's encoder forward on plain tensors: token embeddings (n, L, H) equal to BertModel's
    last_hidden_state up to float rounding. `dtype` is the compute type (float32, or bfloat16 on CPUs with
    native bf16 dot products); the weights are copied once in that type."""

    def __init__(self, model, dtype: torch.dtype = torch.float32):
        why = unsupported(model)
        if why:
            raise ValueError(f"LeanBert: {why}")
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.eps = cfg.layer_norm_eps
        self.dtype = dtype

        def t(p: torch.Tensor) -> torch.Tensor:
            return p.detach().to(dtype).contiguous()

        e = model.embeddings
        self.word = t(e.word_embeddings.weight)  # (V, H)
        self.pos = t(e.position_embeddings.weight)  # (P, H)
        self.types = t(e.token_type_embeddings.weight)  # (T, H)
        self.emb_ln = (t(e.LayerNorm.weight), t(e.LayerNorm.bias))
        self.max_len = self.pos.shape[0]
        self.layers = []
        for blk in model.encoder.layer:
            a = blk.attention
            self.layers.append(_Layer(
                qkv_w=t(torch.cat([a.self.query.weight, a.self.key.weight, a.self.value.weight])),
                qkv_b=t(torch.cat([a.self.query.bias, a.self.key.bias, a.self.value.bias])),
                out_w=t(a.output.dense.weight), out_b=t(a.output.dense.bias),
                ln1_w=t(a.output.LayerNorm.weight), ln1_b=t(a.output.LayerNorm.bias),
                up_w=t(blk.intermediate.dense.weight), up_b=t(blk.intermediate.dense.bias),
                down_w=t(blk.output.dense.weight), down_b=t(blk.output.dense.bias),
                ln2_w=t(blk.output.LayerNorm.weight), ln2_b=t(blk.output.LayerNorm.bias)))

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        n, L = input_ids.shape
        if L > self.max_len:
            raise ValueError(f"LeanBert: {L} tokens, over the model's {self.max_len} positions")
        H = self.word.shape[1]
        tt = self.types[0] if token_type_ids is None else F.embedding(token_type_ids, self.types)
        x = F.embedding(input_ids, self.word) + self.pos[:L] + tt  # (n, L, H)
        x = F.layer_norm(x, (H,), *self.emb_ln, self.eps)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # (n, 1, 1, L): padding is never attended to
        d = H // self.heads
        for ly in self.layers:
            qkv = F.linear(x, ly.qkv_w, ly.qkv_b).view(n, L, 3, self.heads, d).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask)  # (n, h, L, d)
            a = a.transpose(1, 2).reshape(n, L, H)
            x = F.layer_norm(x + F.linear(a, ly.out_w, ly.out_b), (H,), ly.ln1_w, ly.ln1_b, self.eps)
            h = F.gelu(F.linear(x, ly.up_w, ly.up_b))
            x = F.layer_norm(x + F.linear(h, ly.down_w, ly.down_b), (H,), ly.ln2_w, ly.ln2_b, self.eps)
        return x
