"""DDSR (Xie et al., "Breaking Determinism: Fuzzy Modeling of Sequential Recommendation Using Discrete State
Space Diffusion Model", NeurIPS 2024; seed 004): discrete diffusion over the semantic-ID codes of a sequence.

Items are written as `code_levels` semantic-ID codes (residual k-means, see `semantic_ids`), plus one last
level that tells apart items whose codes collide, so that every item has its own code tuple. Training
(the seed's Algorithm 1): draw t in {0..T} per sequence (0 = clean) and noise every code of the history with the
uniform transition Q_t = alpha_t I + (1 - alpha_t)/K 11^T of its level (K codes). Uniform matrices commute,
so the t-step product Q_1...Q_t is abar_t I + (1 - abar_t)/K 11^T: q(x_t | x_0) keeps the code with
probability abar_t and otherwise draws one uniformly (the "fuzzy set" of each history item). A causal
transformer over the noised codes (an item's input is the sum of its code embeddings, plus a position and a
timestep embedding) predicts the next item's codes at every position; the loss is their cross-entropy,
averaged over levels. (The seed's Q_t keeps a code with probability beta_t and moves it to each other code
with (1 - beta_t)/(K - 1): the same family, beta_t = alpha_t + (1 - alpha_t)/K.)

Scoring: the clean history (t = 0) goes through the network once, and every item is scored by the
log-probability of its code tuple, level by level given the levels before (`code_heads="chained"`; or the
sum of each level's marginal, "independent"): a full ranking over all items; padding is never rankable.

Semantic IDs: from the item text vectors when the model is built with `item_vectors` (residual k-means over
the item table, seeded), else from a seeded random Gaussian table (hashed, not semantic, IDs, still one
unique tuple per item). `recpipe train` hands DDSR the whitened text vectors when `codes_from="text"`
(`reads_text`); DDSR is no text model otherwise (it has no `generate` / `item_table` search).

No public implementation of DDSR was found; this follows the paper's description and ../shared/REFERENCE.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from recpipe.models import diffusion as D
from recpipe.models.base import Recommender, register
from recpipe.models.sasrec import PreLNBlock, attention_mask, crop_history, rand, right_aligned_positions


@dataclass
class DDSRConfig:
    history_len: int = 50  # the max_len 50 of the other sequential baselines here (DiffuRec, DreamRec's 10 aside)
    hidden: int = 64  # SASRec's width (RecBole default), the transformer DDSR's approximator is built on
    n_blocks: int = 2  # SASRec: 2 self-attention blocks
    n_heads: int = 2  # 2 heads of width 32; SASRec's single head would make the code levels share one pattern
    dropout: float = 0.2  # SASRec's ML-1M dropout; noised codes already regularise, so no more than that
    code_levels: int = 3  # RQ-VAE semantic IDs in TIGER/DDSR use 3 levels (plus one to resolve collisions)
    codebook_size: int = 64  # 64^3 tuples >> 12k items: few collisions, and ~n_items/64 items share a 1st code
    T: int = 32  # diffusion steps; only abar_t at the sampled t matters, 32 resolves the schedule finely enough
    schedule: Literal["cosine", "linear"] = "cosine"  # keep-probability abar_t; cosine (D3PM) noises slowly early
    kmeans_iters: int = 25  # Lloyd iterations per level; assignments settle well before on these table sizes
    code_seed: int = 0  # seeds k-means (and the random table without text vectors): codes are reproducible
    whole_history: bool = True  # train on every chunk of a long history, as SASRec here does
    # where the semantic IDs come from: "random" = residual k-means over a seeded random table (hashed IDs: items
    # sharing a code have nothing in common); "text" = over the whitened item text vectors (DDSR's semantic
    # IDs: items sharing a code read alike, so a code's probability is shared by similar items). "text" makes
    # `recpipe train` run describe / embed / whiten first; the codes are saved with the weights
    codes_from: Literal["random", "text"] = field(default="random", metadata={"late": True})  # see above
    # how the levels of the next item's codes are predicted: "chained" = level j given the item's codes at
    # levels < j (teacher-forced in training, exact at scoring: an item scores log p(c_0) + log p(c_1 | c_0) +
    # ...); "independent" = one head per level, and an item scores the sum of the levels' marginals. Residual
    # k-means codes are unbalanced (on whitened ML-1M text one level-0 code holds 777 of 3,416 items), so the
    # marginals rank every item of the largest clusters first whatever the history: the target lands at the
    # median rank (validation NDCG@10 0.0008, pop 0.018). A level-j prediction needs its prefix
    code_heads: Literal["chained", "independent"] = "chained"


class TransitionSchedule:
    """abar_t for t = 0..T (abar_0 = 1: the clean codes) and the uniform transitions built from it."""

    def __init__(self, kind: str, T: int):
        # the Gaussian schedules' alphas_cumprod as keep-probabilities; DiffuRec's names, DDSR's role
        abar = D.make_schedule(kind, T).alphas_cumprod.double()
        self.abar = torch.cat([torch.ones(1, dtype=abar.dtype), abar]).float()
        self.T = T

    def alpha(self, t: int) -> float:
        """The one-step keep coefficient alpha_t = abar_t / abar_{t-1} (t >= 1)."""
        return float(self.abar[t] / self.abar[t - 1])

    @staticmethod
    def step_matrix(alpha: float, K: int) -> torch.Tensor:
        """Q = alpha I + (1 - alpha)/K 11^T (K x K, rows sum to 1)."""
        return alpha * torch.eye(K, dtype=torch.float64) + (1 - alpha) / K * torch.ones(K, K, dtype=torch.float64)

    def marginal(self, x0: torch.Tensor, t: torch.Tensor, K: int) -> torch.Tensor:
        """q(x_t | x_0) (..., K): abar_t one-hot(x0) + (1 - abar_t)/K; t broadcasts against x0."""
        a = self.abar.to(x0.device)[t].unsqueeze(-1)
        return a * F.one_hot(x0, K).float() + (1 - a) / K


def residual_kmeans(vectors: torch.Tensor, levels: int, K: int, iters: int, seed: int) -> torch.Tensor:
    """(n, levels) codes: level l clusters what levels < l left unexplained (k-means++ init, seeded)."""
    g = torch.Generator().manual_seed(seed)
    resid = vectors.double().clone()
    k = min(K, resid.shape[0])
    codes = []
    for _ in range(levels):
        cent = _kmeans_pp(resid, k, g)
        for _ in range(iters):
            assign = torch.cdist(resid, cent).argmin(1)
            sums = torch.zeros_like(cent).index_add_(0, assign, resid)
            counts = torch.bincount(assign, minlength=k).unsqueeze(1)
            cent = torch.where(counts > 0, sums / counts.clamp(min=1), cent)  # an empty cluster keeps its centre
        assign = torch.cdist(resid, cent).argmin(1)
        codes.append(assign)
        resid = resid - cent[assign]
    return torch.stack(codes, dim=1)


def _kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    idx = [int(torch.randint(0, x.shape[0], (1,), generator=g))]
    d2 = ((x - x[idx[0]]) ** 2).sum(1)
    for _ in range(k - 1):
        p = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / len(d2))
        idx.append(int(torch.multinomial(p, 1, generator=g)))
        d2 = torch.minimum(d2, ((x - x[idx[-1]]) ** 2).sum(1))
    return x[idx].clone()


def disambiguate(codes: torch.Tensor) -> torch.Tensor:
    """The extra level: each item's rank among the items that share its whole code tuple (0 when alone)."""
    seen: dict[tuple[int, ...], int] = {}
    extra = []
    for row in codes.tolist():
        key = tuple(row)
        extra.append(seen.get(key, 0))
        seen[key] = extra[-1] + 1
    return torch.tensor(extra, dtype=torch.long)


def semantic_ids(n_items: int, config: DDSRConfig, item_vectors: torch.Tensor | None) -> torch.Tensor:
    """(n_items, levels) codes of items 1..n_items; a collision-resolving level is appended when needed."""
    c = config
    if item_vectors is not None:
        if item_vectors.shape[0] != n_items + 1:
            raise ValueError(f"item_vectors has {item_vectors.shape[0]} rows, expected n_items + 1 = {n_items + 1}")
        vecs = item_vectors[1:].float()
    else:  # no text: a seeded random table, so the codes are a reproducible hash of the item id
        vecs = torch.randn(n_items, c.hidden, generator=torch.Generator().manual_seed(c.code_seed))
    codes = residual_kmeans(vecs, c.code_levels, c.codebook_size, c.kmeans_iters, c.code_seed)
    extra = disambiguate(codes)
    return torch.cat([codes, extra[:, None]], dim=1) if int(extra.max()) > 0 else codes


@register("ddsr", DDSRConfig)
class DDSR(Recommender):
    train_mode = "sequence"
    generative = False  # scoring reads the clean history (t = 0): deterministic

    def __init__(self, config: DDSRConfig, n_items: int, item_vectors: torch.Tensor | None = None):
        super().__init__(n_items, config.history_len, chunked=config.whole_history)
        c = self.config = config
        codes = semantic_ids(n_items, c, item_vectors)
        #: (n_items + 1, levels) code of each item; row 0 (padding) is never read as a code
        self.register_buffer("codes", torch.cat([torch.zeros(1, codes.shape[1], dtype=torch.long), codes]))
        self.sizes = [int(codes[:, j].max()) + 1 for j in range(codes.shape[1])]
        # index 0 of each table = padding; code k is row k + 1
        self.code_emb = nn.ModuleList(nn.Embedding(K + 1, c.hidden, padding_idx=0) for K in self.sizes)
        self.pos_emb = nn.Embedding(c.history_len, c.hidden)
        self.time_mlp = nn.Sequential(nn.Linear(c.hidden, 4 * c.hidden), nn.SiLU(), nn.Linear(4 * c.hidden, c.hidden))
        self.emb_drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(PreLNBlock(c.hidden, c.n_heads, c.dropout, 4 * c.hidden, "gelu")
                                    for _ in range(c.n_blocks))
        self.final_ln = nn.LayerNorm(c.hidden)
        self.heads = nn.ModuleList(nn.Linear(c.hidden, K) for K in self.sizes)
        # chained heads: prefix[:, j] = the index of an item's code prefix (levels < j) among the distinct
        # prefixes at level j; its embedding is added to h before head j (column 0 unused: no prefix).
        # Derived from the codes, so not saved: an "independent" checkpoint has neither it nor prefix_emb
        self.prefix_emb = None
        self.register_buffer("prefix", None, persistent=False)
        if c.code_heads == "chained":
            prefix = torch.zeros_like(self.codes)
            n_prefixes = []
            for j in range(1, codes.shape[1]):
                uniq, inv = torch.unique(codes[:, :j], dim=0, return_inverse=True)
                prefix[1:, j] = inv
                n_prefixes.append(len(uniq))
            self.register_buffer("prefix", prefix, persistent=False)
            self.prefix_emb = nn.ModuleList(nn.Embedding(P, c.hidden) for P in n_prefixes)
        self.transitions = TransitionSchedule(c.schedule, c.T)
        self._init_weights()

    def _init_weights(self) -> None:
        """SASRec's (pmixer) init: xavier-normal matrices, zero biases. nn.Embedding's N(0, 1) default, times the
        sqrt(hidden) input scale and summed over the levels, puts ~16 a dimension into the residual stream, where
        the blocks add O(1). Each level's table is scaled by 1/sqrt(levels), so an item's summed input has one
        table's spread."""
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
        with torch.no_grad():
            for emb in self.code_emb:
                emb.weight.mul_(1.0 / math.sqrt(len(self.code_emb)))
                emb.weight[0].zero_()

    @classmethod
    def reads_text(cls, config: DDSRConfig) -> bool:
        return config.codes_from == "text"

    @classmethod
    def build(cls, config: Any, n_items: int, item_vectors: torch.Tensor | None = None) -> DDSR:
        return cls(config, n_items, item_vectors)

    # -- diffusion ----------------------------------------------------------------------------------------
    def noise_codes(self, codes: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) per code: (B, L, levels) codes, t (B,). Keep with prob abar_t, else uniform."""
        abar = self.transitions.abar.to(codes.device)[t][:, None, None]
        u = rand(codes.shape, generator, codes.device)
        K = torch.tensor(self.sizes, device=codes.device)
        uniform = (rand(codes.shape, generator, codes.device) * K).long().clamp(max=K - 1)
        return torch.where(u < abar, codes, uniform)

    # -- network ------------------------------------------------------------------------------------------
    def encode(self, seq: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, L) left-padded item ids, t (B,) -> (B, L, d); t > 0 noises the history's codes first."""
        seq = crop_history(seq, self.history_len)
        valid = seq > 0
        codes = self.codes[seq]
        if bool((t > 0).any()):
            codes = self.noise_codes(codes, t, generator)
        x = sum(emb(torch.where(valid, codes[..., j] + 1, 0)) for j, emb in enumerate(self.code_emb))
        tt = D.timestep_embedding(t.float(), self.config.hidden).to(x.dtype)
        x = x * math.sqrt(self.config.hidden) + self.pos_emb(right_aligned_positions(seq.shape[1], seq.device))
        x = self.emb_drop(x + self.time_mlp(tt)[:, None, :])
        mask = attention_mask(valid, causal=True)
        for block in self.blocks:
            x = block(x, mask)
        return self.final_ln(x)

    def code_log_probs(self, h: torch.Tensor) -> list[torch.Tensor]:
        return [F.log_softmax(head(h), dim=-1) for head in self.heads]

    # -- interface ----------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        inp = crop_history(batch["input_seq"], self.history_len)
        tgt = crop_history(batch["target_seq"], self.history_len)
        t = D.sample_timesteps(inp.shape[0], self.config.T + 1, generator, inp.device)  # 0..T, 0 = clean
        h = self.encode(inp, t, generator)
        sel = tgt > 0
        if not bool(sel.any()):
            return h.sum() * 0.0
        items = tgt[sel]
        target_codes = self.codes[items]
        hs = h[sel]
        total = 0.0
        for j, head in enumerate(self.heads):
            hj = hs if j == 0 or self.prefix_emb is None else hs + self.prefix_emb[j - 1](self.prefix[items, j])
            total = total + F.cross_entropy(head(hj), target_codes[:, j])
        return total / len(self.heads)

    @torch.no_grad()
    def score_all(self, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        """(B, n_items + 1): sum over levels of log p(level code = the item's code); column 0 = -inf."""
        history = batch["history"]
        t = torch.zeros(history.shape[0], dtype=torch.long, device=history.device)
        h = self.encode(history, t)[:, -1]
        codes = self.codes[1:]
        if self.prefix_emb is None:
            scores = sum(lp[:, codes[:, j]] for j, lp in enumerate(self.code_log_probs(h)))
        else:
            scores = F.log_softmax(self.heads[0](h), dim=-1)[:, codes[:, 0]]
            for j in range(1, len(self.heads)):
                head, pre = self.heads[j], self.prefix[1:, j]
                # head(h + e_p) = head(h) + W e_p: one (B, prefixes, K) table of log p(c_j | prefix p)
                lp = F.log_softmax(head(h)[:, None, :] + (self.prefix_emb[j - 1].weight @ head.weight.T)[None], -1)
                scores = scores + lp[:, pre, codes[:, j]]
        pad = torch.full((scores.shape[0], 1), float("-inf"), device=scores.device, dtype=scores.dtype)
        return torch.cat([pad, scores], dim=1)
