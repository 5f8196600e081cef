"""SASRec (Kang & McAuley, ICDM 2018) trained with full-softmax cross-entropy over all items.

Differences from the original TF code / pmixer/SASRec.pytorch, on purpose:
- loss: cross-entropy over every item at every position (as RecBole's `loss_type="CE"`), not BCE with one
  sampled negative; CE is the stronger and now standard SASRec setting.
- training reads every transition of a long history, in chunks of history_len (`whole_history`), where the
  original keeps only each user's last history_len items.
- positions are counted from the most recent item (index 0 = last column), so the same real history gives
  the same scores whatever the amount of left padding (with a fixed width this is the original's scheme
  mirrored: the newest item always gets the same position embedding).
- padding keys are masked in every attention; each query may always attend to itself, so fully padded
  rows produce finite values instead of NaN (their outputs are never read by real positions).

The small attention pieces here (`MultiHeadAttention`, `FeedForward`, `PreLNBlock`, `attention_mask`,
`right_aligned_positions`, `crop_history`) are reused by dreamrec.py and diffurec.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from recpipe.models.base import Recommender, register
from recpipe.models.losses import catalog_ce

# ----------------------------------------------------------------------------------------------------------
# shared helpers


def crop_history(seq: torch.Tensor, history_len: int | None) -> torch.Tensor:
    """Keep the `history_len` most recent columns of a left-padded (B, L) id tensor."""
    if history_len is not None and seq.shape[1] > history_len:
        seq = seq[:, -history_len:]
    return seq


def right_aligned_positions(width: int, device: torch.device | None = None) -> torch.Tensor:
    """Position ids for a left-padded row of `width` columns: the last column is 0, the one before 1, ..."""
    return torch.arange(width - 1, -1, -1, device=device)


def oldest_first_positions(seq: torch.Tensor) -> torch.Tensor:
    """(B, L) position ids counted from each row's oldest real item (0), whatever the left padding; padding
    columns get 0 (their outputs are never read)."""
    return ((seq > 0).long().cumsum(1) - 1).clamp(min=0)


def attention_mask(valid: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Boolean (B, 1, L, L) mask for F.scaled_dot_product_attention (True = may attend).

    Padding keys are masked; with `causal`, query i sees keys j <= i. The diagonal is always allowed so that
    a padded query (which has no valid key) still has one finite entry: no NaN, and since padded keys are
    masked for every real query, padded positions never leak into real ones.
    """
    B, L = valid.shape
    allowed = valid[:, None, None, :].expand(B, 1, L, L)
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=valid.device).tril()
    return allowed | torch.eye(L, dtype=torch.bool, device=valid.device)


class MultiHeadAttention(nn.Module):
    """Multi-head attention on top of F.scaled_dot_product_attention; queries and keys may differ."""

    def __init__(self, d: int, n_heads: int, dropout: float, out_proj: bool = True, scale: float | None = None):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"hidden size {d} not divisible by {n_heads} heads")
        self.n_heads, self.dropout, self.scale = n_heads, dropout, scale
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.out = nn.Linear(d, d) if out_proj else nn.Identity()

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, Lq, D = queries.shape
        Lk, h = keys.shape[1], self.n_heads
        q = self.q(queries).view(B, Lq, h, D // h).transpose(1, 2)
        k = self.k(keys).view(B, Lk, h, D // h).transpose(1, 2)
        v = self.v(keys).view(B, Lk, h, D // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=self.scale
        )
        return self.out(out.transpose(1, 2).reshape(B, Lq, D))


class FeedForward(nn.Module):
    """Position-wise two-layer MLP: Linear(d, inner) -> act -> dropout -> Linear(inner, d)."""

    def __init__(self, d: int, inner: int, dropout: float, activation: str = "relu"):
        super().__init__()
        acts = {"relu": nn.ReLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh")}
        if activation not in acts:
            raise ValueError(f"unknown activation {activation!r}; known: {', '.join(acts)}")
        self.net = nn.Sequential(nn.Linear(d, inner), acts[activation], nn.Dropout(dropout), nn.Linear(inner, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PreLNBlock(nn.Module):
    """x + Dropout(Attn(LN(x))), then x + Dropout(FFN(LN(x))) -- the SASRec paper's block (its Eq. 5-6)."""

    def __init__(self, d: int, n_heads: int, dropout: float, ffn_inner: int, activation: str, ln_eps: float = 1e-5):
        super().__init__()
        self.ln1 = nn.LayerNorm(d, eps=ln_eps)
        self.attn = MultiHeadAttention(d, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d, eps=ln_eps)
        self.ffn = FeedForward(d, ffn_inner, dropout, activation)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, L, d) -> (B, L, d); with last_only, only the last position's output (B, 1, d) is computed
        (exact for a model that reads only the last position: keys still come from every position)."""
        y = self.ln1(x)
        if last_only:
            x, q, mask = x[:, -1:], y[:, -1:], mask[:, :, -1:]
        else:
            q = y
        x = x + self.drop(self.attn(q, y, mask))
        return x + self.drop(self.ffn(self.ln2(x)))


class PostLNBlock(nn.Module):
    """LN(x + Dropout(Attn(x))), then LN(x + Dropout(FFN(x))) -- the BERT / RecBole TransformerLayer block."""

    def __init__(self, d: int, n_heads: int, dropout: float, ffn_inner: int, activation: str, ln_eps: float = 1e-12):
        super().__init__()
        self.attn = MultiHeadAttention(d, n_heads, dropout)
        self.ln1 = nn.LayerNorm(d, eps=ln_eps)
        self.ffn = FeedForward(d, ffn_inner, dropout, activation)
        self.ln2 = nn.LayerNorm(d, eps=ln_eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        q = x
        if last_only:
            q, mask = x[:, -1:], mask[:, :, -1:]
        x = self.ln1(q + self.drop(self.attn(q, x, mask)))
        return self.ln2(x + self.drop(self.ffn(x)))


def rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """U[0, 1) drawn on the generator's device (as recpipe.models.diffusion.randn), returned on `device`."""
    on = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=on).to(device)


def randint(low: int, high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device):
    """Integers in [low, high) drawn on the generator's device, returned on `device`."""
    on = generator.device if generator is not None else device
    return torch.randint(low, high, shape, generator=generator, device=on).to(device)


def exclude_padding_column(scores: torch.Tensor) -> torch.Tensor:
    """Set score column 0 (padding) to -inf in place and return the tensor."""
    scores[:, 0] = float("-inf")
    return scores


# ----------------------------------------------------------------------------------------------------------
# SASRec


@dataclass
class SASRecConfig:
    history_len: int = 200  # original SASRec's ML-1M max_len; ML-1M histories are long (median ~100 items)
    hidden: int = 64  # RecBole's SASRec default; the original used 50 on ML-1M, 64 is the common modern choice
    n_blocks: int = 2  # original SASRec and RecBole: 2 self-attention blocks
    n_heads: int = 1  # original SASRec: one head was best on all its datasets
    ffn_mult: int = 1  # original SASRec: point-wise FFN of width d (RecBole uses 4d with GELU)
    activation: Literal["relu", "gelu"] = "relu"  # original SASRec's point-wise FFN uses ReLU
    # full-softmax CE SASRec's (Klenitskiy & Vasilev, RecSys'23); the original's ML-1M value, 0.2, trains worse with
    # CE: ML-1M, 30 epochs, test NDCG@10 0.1713 vs 0.1638 seen-masked (sparse catalogs may want the original's 0.5)
    dropout: float = 0.1  # see above
    scale_embeddings: bool = True  # original code multiplies item embeddings by sqrt(d) before adding positions
    # pre: the SASRec paper's pre-LN blocks and a final LN; post: RecBole's (BERT's) post-LN blocks with a LN on
    # the embeddings and none at the end, to compare with RecBole's SASRec on equal terms
    norm: Literal["pre", "post"] = "pre"
    # newest: position 0 is the most recent item (the query at test time always sits there, but a training
    # target at chunk column t sees its query at position L-1-t); oldest: position 0 is the oldest item read, so
    # every training target sees its prefix exactly as a test query sees a history of that length (RecBole's
    # left-aligned positions)
    positions: Literal["newest", "oldest"] = "newest"
    # xavier: Xavier-normal matrices (pmixer/SASRec.pytorch); normal: N(0, 0.02) for every matrix (RecBole, BERT)
    init: Literal["xavier", "normal"] = "xavier"
    # train on every training transition, long histories cut into chunks of history_len (the original reads
    # only each user's last history_len items: at 100 that leaves out 55% of ML-1M's training transitions)
    whole_history: bool = True
    # with whole_history: windows of history_len that end every `stride` positions and train their last `stride`
    # targets, so each target reads at least history_len - stride items (RecBole and the original train each
    # target on its full window); None: disjoint chunks (a chunk's first targets read little), cost 1x; L/2: 2x
    stride: int | None = None
    # 0: the full softmax over every item; N: the sampled softmax against N uniform negatives shared by the
    # batch (recpipe.models.losses), whose cost does not grow with the catalog: for catalogs of millions,
    # where the (targets x items) logits of the full softmax are what breaks first
    ce_negatives: int = field(default=0, metadata={"late": True})  # see above
    # training settings live in TrainConfig; the original used Adam lr 1e-3, batch 128, no weight decay


@register("sasrec", SASRecConfig)
class SASRec(Recommender):
    train_mode = "sequence"

    def __init__(self, config: SASRecConfig, n_items: int):
        # chunked: the trainer's "sequence" batches hold every chunk of every user
        super().__init__(n_items, config.history_len, chunked=config.whole_history)
        if config.ce_negatives < 0:
            raise ValueError(f"ce_negatives must be >= 0 (0 = full softmax), not {config.ce_negatives}")
        if config.stride is not None and not 1 <= config.stride <= config.history_len:
            raise ValueError(f"stride must be in 1..history_len ({config.history_len}), not {config.stride}")
        self.stride = config.stride if config.whole_history else None  # read by the trainer's Batcher
        c = self.config = config
        self.item_emb = nn.Embedding(n_items + 1, c.hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(c.history_len, c.hidden)
        self.emb_drop = nn.Dropout(c.dropout)
        block = PreLNBlock if c.norm == "pre" else PostLNBlock
        self.blocks = nn.ModuleList(
            block(c.hidden, c.n_heads, c.dropout, c.ffn_mult * c.hidden, c.activation) for _ in range(c.n_blocks)
        )
        # pre-LN blocks leave the residual stream unnormalised: a final LN; post-LN normalises the input instead
        self.final_ln = nn.LayerNorm(c.hidden) if c.norm == "pre" else nn.Identity()
        self.emb_ln = nn.LayerNorm(c.hidden, eps=1e-12) if c.norm == "post" else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1:
                if self.config.init == "xavier":  # pmixer/SASRec.pytorch, the strong public PyTorch port
                    nn.init.xavier_normal_(p)
                else:
                    nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def encode(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded ids -> (B, L, d) causal representations."""
        seq = crop_history(seq, self.history_len)
        x = self.item_emb(seq)
        if self.config.scale_embeddings:
            x = x * math.sqrt(self.config.hidden)
        if self.config.positions == "newest":
            pos = right_aligned_positions(seq.shape[1], seq.device)
        else:
            pos = oldest_first_positions(seq)
        x = x + self.pos_emb(pos)
        x = self.emb_drop(self.emb_ln(x))
        mask = attention_mask(seq > 0, causal=True)
        for block in self.blocks:
            x = block(x, mask)
        return self.final_ln(x)

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        inp = crop_history(batch["input_seq"], self.history_len)
        tgt = crop_history(batch["target_seq"], self.history_len)
        h = self.encode(inp)
        sel = tgt > 0
        if not bool(sel.any()):
            return h.sum() * 0.0
        # the padding row is no class of the softmax
        return catalog_ce(h[sel], tgt[sel], self.item_emb.weight[1:], n_neg=self.config.ce_negatives,
                          generator=generator)

    @torch.no_grad()
    def score_all(self, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        h = self.encode(batch["history"])[:, -1]
        return exclude_padding_column(h @ self.item_emb.weight.T)

