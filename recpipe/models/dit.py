"""A small Diffusion Transformer (DiT) denoiser for item vectors, with in-context conditioning.

After facebookresearch/DiT `models.py` (TimestepEmbedder, adaLN-Zero blocks, zero-initialised final
layer), adapted to sequential recommendation as iDreamRec describes it: the condition is a set of tokens
in the sequence, and the prediction is read at one token.

    tokens = [h_{L-1}, ..., h_1, h_0,  intention,  timestep,  x_t]        (B, L + 3, W)
              history, left-padded       cond.       cond.     noisy target
    output = Linear(LN(tokens[:, -1]))                                    (B, d)  the predicted x0

- History token = Linear(d -> W)(item vector) + learned position, where position 0 is the most recent
  item (the last column of a left-padded history), so the same real items give the same tokens whatever
  the amount of left padding.
- Padding tokens are masked as attention keys (and their inputs zeroed, so even NaN there is harmless):
  they never influence any other token, exactly as if absent (tested against a shorter model). The
  intention, timestep and target tokens are always valid keys, so no attention row is empty (no NaN).
- A history with no valid item (dropped for classifier-free guidance, or empty) is ONE learned null token
  placed at the most recent slot (rather than masking every history token: a learned token lets the
  unconditional branch carry its own learned "population" signal, as DreamRec's none-embedding does, and
  keeps one fixed token layout for all guidance branches); an absent/dropped intention is a learned null
  intention token.
- adaln_zero=True adds, on top of the tokens, adaLN-Zero modulation of every block and of the final layer
  by c = timestep embedding + intention embedding (DiT's conditioning); the token layout is unchanged.
- Dropout (config `dropout`) on the input tokens and on each residual branch's output; not on attention
  probabilities or the MLP hidden layer (on CPU those bernoulli draws cost as much as the matmuls).

CPU cost (exact shortcuts, outputs unchanged): the last block computes queries, attention output and MLP
for the read-out token only (keys/values for all tokens), and columns that are padding in every row of
the batch are dropped before the transformer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recpipe.models.diffusion import timestep_embedding


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x: (B, S, W); shift, scale: (B, W) -> x·(1 + scale) + shift."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Integer timesteps -> (B, W): sinusoidal(freq_dim) -> Linear -> SiLU -> Linear (as in DiT)."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        # t: (B,) -> (B, W)
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class Attention(nn.Module):
    """Multi-head self-attention with a key padding mask, via F.scaled_dot_product_attention.

    No dropout on the attention probabilities (only on the output): on CPU the extra bernoulli draws cost
    as much as the matmuls, for a regulariser that the output dropout already provides.
    """

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None, query: slice | None = None) -> Tensor:
        # x: (B, S, W); attn_mask: bool (True = may attend) or additive float, broadcastable to
        # (B, H, S_q, S); query: the tokens that query (a slice of S) -> (B, S_q, W); None: all of them
        B, S, W = x.shape
        hd = W // self.heads
        if query is not None:
            xq = x[:, query]
            Sq = xq.shape[1]
            q = F.linear(xq, self.qkv.weight[:W], self.qkv.bias[:W])  # (B, S_q, W)
            kv = F.linear(x, self.qkv.weight[W:], self.qkv.bias[W:])  # (B, S, 2W)
            q = q.view(B, Sq, self.heads, hd).transpose(1, 2)  # (B, H, S_q, hd)
            k, v = kv.view(B, S, 2, self.heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, S, hd)
        else:
            qkv = self.qkv(x).view(B, S, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # each (B, H, S, hd)
        if torch.is_grad_enabled() or attn_mask is None or attn_mask.dtype == torch.bool:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, S_q, hd)
        else:  # inference with an additive mask: plain batched matmuls beat SDPA's CPU kernel on short
            # sequences; training keeps SDPA, whose backward is faster
            y = _attention_math(q, k, v, attn_mask)
        y = y.transpose(1, 2).reshape(B, q.shape[2], W)
        return self.proj_drop(self.proj(y))


def _attention_math(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(hd) + bias) v; q: (B, H, S_q, hd), k/v: (B, H, S, hd), bias broadcastable to
    (B, H, S_q, S) -> (B, H, S_q, hd). Equals F.scaled_dot_product_attention with the same additive mask."""
    B, H, Sq, hd = q.shape
    S = k.shape[2]
    bias = bias.to(q.dtype).expand(B, H, Sq, S).reshape(B * H, Sq, S)
    a = torch.baddbmm(bias, q.reshape(B * H, Sq, hd), k.reshape(B * H, S, hd).transpose(1, 2), alpha=hd ** -0.5)
    return torch.bmm(a.softmax(-1), v.reshape(B * H, S, hd)).view(B, H, Sq, hd)


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        # (B, S, W) -> (B, S, W); dropout on the output only (see Attention)
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class DiTBlock(nn.Module):
    """Pre-LN transformer block; with adaln_zero, LN shift/scale and residual gates come from c."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float, adaln_zero: bool):
        super().__init__()
        self.adaln_zero = adaln_zero
        # with adaLN the affine parameters of the LayerNorms are produced from c instead
        self.norm1 = nn.LayerNorm(width, elementwise_affine=not adaln_zero, eps=1e-6)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=not adaln_zero, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio), dropout)
        if adaln_zero:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: Tensor, attn_mask: Tensor | None, c: Tensor | None = None, query: slice | None = None
                ) -> Tensor:
        # x: (B, S, W); c: (B, W) or None -> (B, S, W), or (B, S_q, W) for the `query` tokens only: the
        # last block only needs the read-out tokens, whose outputs are the same either way
        res = x if query is None else x[:, query]
        if not self.adaln_zero:
            x = res + self.attn(self.norm1(x), attn_mask, query)
            return x + self.mlp(self.norm2(x))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = res + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), attn_mask, query)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """LN (adaLN-modulated if enabled) -> Linear(W -> d), zero-initialised: the first prediction is
    x0_hat = 0, the mean of whitened vectors."""

    def __init__(self, width: int, out_dim: int, adaln_zero: bool):
        super().__init__()
        self.adaln_zero = adaln_zero
        self.norm = nn.LayerNorm(width, elementwise_affine=not adaln_zero, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        if adaln_zero:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        # x: (B, W) the target token; c: (B, W) or None -> (B, d)
        x = self.norm(x)
        if self.adaln_zero:
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            x = x * (1 + scale) + shift
        return self.linear(x)


def init_linears(module: nn.Module) -> None:
    """Xavier-uniform weights and zero biases for every Linear (DiT's _basic_init)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def init_denoiser_params(module: nn.Module) -> None:
    """The learned null tokens and the timestep MLP ~ N(0, 0.02) (as DiT); the output layer zero, so the
    first prediction is x0_hat = 0, the mean of whitened vectors."""
    nn.init.normal_(module.null_hist, std=0.02)
    nn.init.normal_(module.null_intent, std=0.02)
    nn.init.normal_(module.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(module.t_embedder.mlp[2].weight, std=0.02)
    nn.init.zeros_(module.final.linear.weight)
    nn.init.zeros_(module.final.linear.bias)


def intent_tokens(proj: nn.Linear, null: Tensor, intent: Tensor | None, keep: Tensor, shape: tuple[int, ...]
                  ) -> Tensor:
    """Intention tokens (*shape, W): proj(intent) where `keep`, the learned null token elsewhere (and
    everywhere when intent is None). Absent intentions are zeroed before the projection, so NaN or garbage
    there cannot leak. intent: (*shape, d) or None; keep: (*shape) bool or None (= all kept)."""
    if intent is None:
        return null.expand(*shape, -1)
    keep = (torch.ones(shape, dtype=torch.bool, device=intent.device) if keep is None else keep.bool())[..., None]
    e = proj(torch.where(keep, intent, torch.zeros((), dtype=intent.dtype)))
    return torch.where(keep, e, null.to(e.dtype))


class DiT(nn.Module):
    """Denoiser x0_hat = DiT(x_t, t | history, intention) over item vectors of dimension `dim`.

    Args:
        dim: item-vector dimension d (input and output).
        max_len: number of history slots L (histories are left-padded/truncated to it by the caller).
        width, depth, heads, mlp_ratio, dropout: transformer size.
        adaln_zero: add adaLN-Zero modulation by (timestep + intention) embedding.
    """

    def __init__(
        self,
        dim: int,
        max_len: int,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
        adaln_zero: bool = False,
    ):
        super().__init__()
        self.dim, self.max_len, self.width, self.adaln_zero = dim, max_len, width, adaln_zero
        self.hist_proj = nn.Linear(dim, width)
        self.pos_emb = nn.Parameter(torch.zeros(max_len, width))  # index 0 = most recent item
        self.null_hist = nn.Parameter(torch.zeros(width))  # the whole history, dropped or empty
        self.intent_proj = nn.Linear(dim, width)
        self.null_intent = nn.Parameter(torch.zeros(width))  # absent or dropped intention
        self.t_embedder = TimestepEmbedder(width)
        self.x_proj = nn.Linear(dim, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio, dropout, adaln_zero) for _ in range(depth))
        self.final = FinalLayer(width, dim, adaln_zero)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_linears(self)
        nn.init.normal_(self.pos_emb, std=0.02)
        init_denoiser_params(self)
        # adaLN-Zero: every block and the final layer start as the identity (gates = 0)
        if self.adaln_zero:
            for mod in [block.adaLN_modulation for block in self.blocks] + [self.final.adaLN_modulation]:
                nn.init.zeros_(mod[-1].weight)
                nn.init.zeros_(mod[-1].bias)

    def forward(
        self,
        x_t: Tensor,
        t: Tensor,
        hist: Tensor,
        hist_mask: Tensor,
        intent: Tensor | None = None,
        intent_mask: Tensor | None = None,
    ) -> Tensor:
        """Predict x0.

        x_t: (B, d) noisy target; t: LongTensor (B,);
        hist: (B, L, d) history item vectors, left-padded (values at padding are ignored);
        hist_mask: (B, L) bool, True where a real item the model may see (False: padding, or the whole
            row when the history is dropped); a row with no True gets the null history token;
        intent: (B, d) or None; intent_mask: (B,) bool, True where the intention is used (else the null
            intention token). intent=None means no intention anywhere.
        Returns (B, d).
        """
        B, L, _ = hist.shape
        if L != self.max_len:
            raise ValueError(f"history has {L} slots, the model was built for {self.max_len}")
        hist_mask = hist_mask.bool()
        use_null = ~hist_mask.any(dim=1)  # (B,) history dropped or empty
        null_slot = torch.zeros_like(hist_mask)
        null_slot[:, -1] = use_null  # the null token takes the most recent slot
        valid = hist_mask | null_slot  # (B, L) the keys that may be attended to
        pos = self.pos_emb.flip(0)  # (L, W): slot L-1 (most recent) gets position 0
        # columns that are padding in every row change nothing (masked keys): drop them to save compute
        col_used = valid.any(dim=0)  # (L,); the last column is always used
        if not bool(col_used[0]):
            first = int(col_used.int().argmax())
            hist, hist_mask, null_slot, valid, pos = (
                hist[:, first:],
                hist_mask[:, first:],
                null_slot[:, first:],
                valid[:, first:],
                pos[first:],
            )
        # history tokens; padding values are never read (zeroed before the projection, masked as keys)
        zero = torch.zeros((), dtype=hist.dtype, device=hist.device)
        h = self.hist_proj(torch.where(hist_mask[..., None], hist, zero)) + pos[None]  # (B, L', W)
        h = torch.where(null_slot[..., None], self.null_hist.to(h.dtype), h)

        # condition tokens
        e_int = intent_tokens(self.intent_proj, self.null_intent.to(h.dtype), intent, intent_mask, (B,))  # (B, W)
        e_t = self.t_embedder(t)  # (B, W)
        e_x = self.x_proj(x_t)  # (B, W)

        tokens = torch.cat([h, e_int[:, None], e_t[:, None], e_x[:, None]], dim=1)  # (B, L+3, W)
        tokens = self.drop(tokens)
        key_ok = torch.cat([valid, torch.ones(B, 3, dtype=torch.bool, device=valid.device)], dim=1)
        attn_mask = None if bool(key_ok.all()) else key_ok[:, None, None, :]  # (B, 1, 1, L+3)

        c = (e_t + e_int) if self.adaln_zero else None  # (B, W)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, attn_mask, c, query=slice(-1, None) if i == len(self.blocks) - 1 else None)
        return self.final(tokens[:, -1], c)  # (B, d)


class CausalDiT(nn.Module):
    """The same denoiser with the history tokens SHARED by several targets ("causal" layout).

    One forward reads a window of N history items once and denoises G targets against it, each target
    seeing the (at most max_len) items before its own anchor, so training covers every target of a
    window in one pass and the guidance branches of a sample share one history:

        tokens = [null, h_0 ... h_{N-1},  (intention_g, timestep_g, x_t,g) for g in 0..G-1]   (B, 1+N+3G, W)

    - h_i = Linear(d -> W)(item vector), oldest first; NO absolute position (a token is shared by targets
      at different distances). Order enters through learned relative-position biases, one per head and
      distance, initialised to an ALiBi recency prior: history token i attends to history k for
      i - max_len < k <= i (causal, bias_hh[i - k]); a target anchored at a attends to history k for
      a - max_len <= k < a (bias_th[a-1-k]).
    - A target group (its intention, timestep and noisy-target tokens) attends to its own three tokens and
      to its history; with the history dropped, or no real item in its window, to the learned null token
      instead. History tokens never attend to target tokens, so targets cannot see each other.
    - The output is read at each group's x_t token: (B, G, d).
    - copy=True adds a full-rank path: the x_t token attends (one head) over the null token and the history
      it may see (the null token only, with the history dropped); the attention-weighted sum of those items'
      own d-dim vectors (0 for the null token), scaled per dimension by a zero-initialised gate, is added to
      the output. Without it the output is a linear map of a W-dim state, rank W < d, which cannot even
      return the last item's vector; with it the model can copy (mixtures of) history vectors exactly.
      Zero gate: the same function as copy=False at init.

    With N <= max_len and a target anchored at N, the function equals a single-target model over the same
    history; a longer training window lets a history token see up to max_len items of its own past, one
    more than a single-target window gives its earliest items (as in SASRec's training).
    """

    def __init__(self, dim: int, max_len: int, width: int = 128, depth: int = 2, heads: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.1, copy: bool = False):
        super().__init__()
        self.dim, self.max_len, self.width, self.heads = dim, max_len, width, heads
        self.hist_proj = nn.Linear(dim, width)
        self.null_hist = nn.Parameter(torch.zeros(width))
        self.intent_proj = nn.Linear(dim, width)
        self.null_intent = nn.Parameter(torch.zeros(width))
        self.t_embedder = TimestepEmbedder(width)
        self.x_proj = nn.Linear(dim, width)
        self.rel_hh = nn.Parameter(torch.zeros(heads, max_len))  # history -> history, by distance i - k
        self.rel_th = nn.Parameter(torch.zeros(heads, max_len))  # target -> history, by distance a - 1 - k
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(DiTBlock(width, heads, mlp_ratio, dropout, False) for _ in range(depth))
        self.final = FinalLayer(width, dim, False)
        if copy:
            self.copy_norm = nn.LayerNorm(width, eps=1e-6)
            self.copy_q = nn.Linear(width, width)
            self.copy_k = nn.Linear(width, width)
            self.copy_gate = nn.Parameter(torch.zeros(dim))  # zero: copy=False's function at init
            self.copy_rel = nn.Parameter(torch.zeros(max_len))  # target -> history bias by distance a - 1 - k
        self.copy = copy
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_linears(self)
        init_denoiser_params(self)
        # recency prior as in ALiBi (bias = -slope_h · distance), slopes 4, 2, 1, 1/2, ...: one head starts
        # on the most recent item, the others average further back; learned from there (without the steep
        # first head, a next-item rule is learned more slowly)
        slopes = 2.0 ** (2 - torch.arange(self.heads, dtype=torch.float32))
        dist = torch.arange(self.max_len, dtype=torch.float32)
        with torch.no_grad():
            self.rel_hh.copy_(-slopes[:, None] * dist[None])
            self.rel_th.copy_(-slopes[:, None] * dist[None])
        if self.copy:
            nn.init.zeros_(self.copy_gate)
            with torch.no_grad():
                self.copy_rel.copy_(-dist)  # recency prior: starts on the most recent items

    def attention_bias(self, hist_valid: Tensor, anchor: Tensor, hist_keep: Tensor, dtype: torch.dtype) -> Tensor:
        """Additive attention mask (B, H, S, S), S = 1 + N + 3G, -inf where a token may not look.

        hist_valid: (B, N) bool; anchor: (B, G) long in [0, N]; hist_keep: (B, G) bool."""
        B, N = hist_valid.shape
        G = anchor.shape[1]
        L, H, dev = self.max_len, self.heads, hist_valid.device
        S = 1 + N + 3 * G
        ninf = torch.tensor(float("-inf"), dtype=dtype, device=dev)
        bias = torch.full((B, H, S, S), float("-inf"), dtype=dtype, device=dev)
        bias[:, :, 0, 0] = 0  # null token: itself
        # history -> history: causal, within max_len, real keys only; a padding token sees itself only
        i = torch.arange(N, device=dev)
        dist = i[:, None] - i[None, :]  # (N, N) i - k
        ok = (dist >= 0) & (dist < L)
        rel = self.rel_hh.to(dtype)[:, dist.clamp(0, L - 1)]  # (H, N, N)
        hh = torch.where(ok[None, None] & hist_valid[:, None, None, :], rel[None], ninf)  # (B, H, N, N)
        eye = torch.eye(N, dtype=torch.bool, device=dev)
        hh = torch.where(eye[None, None] & ~hist_valid[:, None, :, None], torch.zeros((), dtype=dtype, device=dev), hh)
        bias[:, :, 1 : 1 + N, 1 : 1 + N] = hh
        # target group -> history (or the null token) and its own three tokens
        dk = anchor[:, :, None] - 1 - i[None, None, :]  # (B, G, N) a - 1 - k
        see = (dk >= 0) & (dk < L) & hist_valid[:, None, :]  # (B, G, N)
        use_hist = see.any(dim=2) & hist_keep  # (B, G)
        see = see & use_hist[..., None]
        rel_t = self.rel_th.to(dtype)[:, dk.clamp(0, L - 1)]  # (H, B, G, N)
        th = torch.where(see[:, None], rel_t.permute(1, 0, 2, 3), ninf)  # (B, H, G, N)
        th = th.repeat_interleave(3, dim=2)  # (B, H, 3G, N): the group's three tokens look alike
        bias[:, :, 1 + N :, 1 : 1 + N] = th
        null_col = torch.where(use_hist, ninf, torch.zeros((), dtype=dtype, device=dev))  # (B, G)
        bias[:, :, 1 + N :, 0] = null_col.repeat_interleave(3, dim=1)[:, None]
        g = torch.arange(3 * G, device=dev) // 3
        own = g[:, None] == g[None, :]  # (3G, 3G) block diagonal
        bias[:, :, 1 + N :, 1 + N :] = torch.where(own, 0.0, float("-inf")).to(dtype)
        return bias

    def forward(self, hist: Tensor, hist_valid: Tensor, x_t: Tensor, t: Tensor, anchor: Tensor, hist_keep: Tensor,
                intent: Tensor | None = None, intent_mask: Tensor | None = None) -> Tensor:
        """Predict x0 for G targets per row.

        hist: (B, N, d) item vectors, oldest first (values at invalid slots are ignored);
        hist_valid: (B, N) bool, real items; x_t: (B, G, d); t: (B, G) long;
        anchor: (B, G) long: target g sees the history items before slot anchor[b, g];
        hist_keep: (B, G) bool, False = history dropped (null token);
        intent: (B, G, d) or None; intent_mask: (B, G) bool, False = null intention.
        Returns (B, G, d).
        """
        B, N, _ = hist.shape
        G = x_t.shape[1]
        hist_valid = hist_valid.bool()
        zero = torch.zeros((), dtype=hist.dtype, device=hist.device)
        hist = torch.where(hist_valid[..., None], hist, zero)  # (B, N, d)
        h = self.hist_proj(hist)  # (B, N, W)
        e_int = intent_tokens(self.intent_proj, self.null_intent.to(h.dtype), intent, intent_mask, (B, G))  # (B, G, W)
        e_t = self.t_embedder(t.reshape(-1)).view(B, G, -1)  # (B, G, W)
        e_x = self.x_proj(x_t)  # (B, G, W)
        groups = torch.stack([e_int, e_t, e_x], dim=2).reshape(B, 3 * G, -1)  # (B, 3G, W)
        null = self.null_hist.to(h.dtype).expand(B, 1, -1)
        tokens = self.drop(torch.cat([null, h, groups], dim=1))  # (B, 1+N+3G, W)
        bias = self.attention_bias(hist_valid, anchor, hist_keep.bool(), tokens.dtype)
        read = slice(1 + N + 2, None, 3)  # the x_t tokens
        for i, block in enumerate(self.blocks):
            last = i == len(self.blocks) - 1
            if last:
                keys = tokens[:, : 1 + N]  # (B, 1+N, W) null + history states entering the last block
            tokens = block(tokens, bias[:, :, read] if last else bias, None, query=read if last else None)
        out = self.final(tokens)  # (B, G, d)
        if not self.copy:
            return out
        # one-head attention of each x_t token over what it may see (the head-0 bias says where: -inf = not)
        q = self.copy_q(self.copy_norm(tokens))  # (B, G, W)
        k = self.copy_k(self.copy_norm(keys))  # (B, 1+N, W)
        logits = q @ k.transpose(1, 2) / self.width**0.5  # (B, G, 1+N)
        dk = (anchor[:, :, None] - 1 - torch.arange(N, device=anchor.device)).clamp(0, self.max_len - 1)
        logits[:, :, 1:] += self.copy_rel.to(logits.dtype)[dk]  # order: the history states carry none
        allowed = torch.isfinite(bias[:, 0, read, : 1 + N])  # (B, G, 1+N)
        allowed[..., 0] = True  # the null token (value 0) always: the model may copy nothing
        a = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        copied = a[:, :, 1:] @ hist  # (B, G, d): the null token contributes 0
        return out + self.copy_gate * copied
