"""DreamRec (Yang et al., NeurIPS 2023): guided diffusion that generates the next item's ID embedding.

Faithful to YangZhengyi98/DreamRec (see shared/REFERENCE.md):
- history encoder: learned ID embedding + learned positions, dropout, padding zeroed; one self-attention
  block (LN -> attention with the normalised queries as residual -> LN -> point-wise FFN with residual and
  LN -> padding zeroed -> LN); h = the output at the last real position (the last column: histories are
  left-padded);
- denoiser `mlp1`: Linear(3D -> D) on concat(x_t, h, t_emb), t_emb = sinusoidal -> Linear(D, 2D) -> GELU ->
  Linear(2D, D); x0 prediction, MSE against the (jointly trained, N(0, 1)-initialised) target embedding;
- classifier-free guidance: h replaced by a learned none-embedding with probability p_uncond during training;
  x0 = (1 + w) f(x, h, t) - w f(x, none, t) at every reverse step; full ancestral DDPM (DDIM optional).

What recpipe does differently (the reference's faults): padding keys are masked with a causal mask that
cannot produce NaN for empty histories; positions are counted from the most recent item so extra left
padding changes nothing; score column 0 (padding) is never rankable; train/eval modes are respected;
every random draw takes the caller's generator.
Optional `loss_type="preferdiff"`: PreferDiff's loss (lam * MSE + (1 - lam) * BPR-Diff over sampled negatives).
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
from recpipe.models.sasrec import (
    MultiHeadAttention,
    attention_mask,
    crop_history,
    exclude_padding_column,
    rand,
    randint,
    right_aligned_positions,
)


@dataclass
class DreamRecConfig:
    history_len: int = 50  # recpipe's common sequence length (DiffuRec, RecBole SASRec); DreamRec's data had 10
    hidden: int = 64  # DreamRec: hidden_factor 64 on every dataset
    n_heads: int = 1  # DreamRec's encoder uses one head
    dropout: float = 0.1  # DreamRec: dropout_rate 0.1 (embeddings, attention, FFN)
    T: int = 500  # DreamRec's YooChoose setting (T=500, exp schedule, w=2), its most used configuration
    schedule: Literal["exp", "linear", "cosine"] = "exp"  # DreamRec: exp (beta_min 0.1, beta_max 10) on YooChoose
    beta_start: float = 1e-4  # "linear" schedule only: DreamRec's beta_start
    beta_end: float = 0.02  # "linear" schedule only: DreamRec's beta_end
    p_uncond: float = 0.1  # DreamRec: probability of training with the none-embedding (CFG)
    w: float = 2.0  # DreamRec: guidance strength on YooChoose and KuaiRec
    sampler: Literal["ddpm", "ddim"] = "ddpm"  # DreamRec samples with full ancestral DDPM over all T steps
    ddim_steps: int = 50  # only for sampler="ddim" (or score_all(steps=k)): deterministic DDIM with k steps
    # which t a training target is noised to: "all" = Uniform{0..T-1} (DreamRec); "sampler" = only the
    # timesteps the configured sampler visits (ddim with ddim_steps = 1: t = T-1 alone; ddpm visits every t, so
    # there it equals "all"). Every update then trains the denoising the scoring asks for (iDreamRec's lever,
    # docs/results.md#r-onestep-ml1m-60); such a model must be scored with that same sampler
    train_t: Literal["all", "sampler"] = field(default="all", metadata={"late": True})  # see above
    # how training reads a user's sequence: "position" = one (history, next item) sample per row (DreamRec);
    # "sequence" = a target at every position of a chunk of history_len items in one forward (SASRec's layout;
    # every chunk of the whole history). The encoder is causal, so position i reads items <= i only and each
    # target is denoised from its own h_i: the same samples, about history_len times fewer encoder passes
    train_layout: Literal["position", "sequence"] = field(default="position", metadata={"late": True})
    loss_type: Literal["mse", "preferdiff"] = "mse"  # DreamRec: x0 MSE; "preferdiff" adds BPR-Diff on negatives
    pd_lam: float = 0.5  # PreferDiff's config default lamda (MSE weight); same as idreamrec's `lam`
    pd_scale: float = 5.0  # PreferDiff's config default gamma inside the log-sigmoid; same as idreamrec's
    n_neg: int = 4  # uniform negatives per target, averaged into one centroid; same as idreamrec's
    pd_centroid: bool = True  # PreferDiff's L_BPR-Diff-C: one denoised centroid instead of n_neg pairs
    # DreamRec trains the target embedding through the x0 loss too, and that loss also falls by shrinking the
    # embeddings towards the predictions (the collapse iDreamRec's per-item residual showed). False stops the
    # gradient at the x0 target (as BYOL / SimSiam do): embeddings learn only as history inputs. True = the
    # reference. Measured on amazon-beauty, 3,000 steps: validation at chance either way (DreamRec learns slowly).
    target_grad: bool = True
    # training settings live in TrainConfig; DreamRec used AdamW, batch 256, lr 1e-3 (YooChoose), no decay


@register("dreamrec", DreamRecConfig)
class DreamRec(Recommender):
    train_mode = "position"
    generative = True
    sampler_params = ("steps", "w")

    def __init__(self, config: DreamRecConfig, n_items: int):
        if config.train_layout not in ("position", "sequence"):
            raise ValueError(f"train_layout must be position or sequence, not {config.train_layout!r}")
        if config.train_layout == "sequence":  # read by the trainer's Batcher (set before the contract check)
            self.train_mode = "sequence"
        super().__init__(n_items, config.history_len, chunked=config.train_layout == "sequence")
        c = self.config = config
        d = c.hidden
        if c.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"unknown sampler {c.sampler!r}")
        if c.loss_type not in ("mse", "preferdiff"):
            raise ValueError(f"unknown loss_type {c.loss_type!r}")
        if c.train_t not in ("all", "sampler"):
            raise ValueError(f"train_t must be all or sampler, not {c.train_t!r}")
        if not 1 <= c.ddim_steps <= c.T:
            raise ValueError(f"ddim_steps must be in [1, T={c.T}], got {c.ddim_steps}")
        self.item_emb = nn.Embedding(n_items + 1, d)
        self.none_emb = nn.Parameter(torch.empty(1, d))
        self.pos_emb = nn.Embedding(c.history_len, d)
        self.emb_drop = nn.Dropout(c.dropout)
        self.ln_1 = nn.LayerNorm(d)
        self.attn = MultiHeadAttention(d, c.n_heads, c.dropout, out_proj=False, scale=1.0 / math.sqrt(d))
        self.ln_2 = nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d), nn.Dropout(c.dropout))
        self.ln_ffn = nn.LayerNorm(d)
        self.ln_3 = nn.LayerNorm(d)
        self.step_mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.denoiser = nn.Linear(3 * d, d)  # DreamRec's `mlp1` diffuser
        nn.init.normal_(self.item_emb.weight, 0.0, 1.0)
        nn.init.normal_(self.none_emb, 0.0, 1.0)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()  # padding: never a target, masked in the encoder, never ranked
        kw = {"beta_start": c.beta_start, "beta_end": c.beta_end} if c.schedule == "linear" else {}
        self._schedule = D.make_schedule(c.schedule, c.T, **kw)

    # -- pieces -------------------------------------------------------------------------------------------
    def schedule(self, device: torch.device) -> D.Schedule:
        if self._schedule.betas.device != device:
            self._schedule = self._schedule.to(device)
        return self._schedule

    def encode(self, history: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded ids -> h (B, D), the encoder output at the most recent position."""
        return self.encode_all(history)[:, -1]

    def encode_all(self, history: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded ids -> (B, L', D) the causal encoder's output at every position (L' <= history_len);
        position i reads items <= i only."""
        seq = crop_history(history, self.history_len)
        valid = (seq > 0).unsqueeze(-1).to(self.item_emb.weight.dtype)
        x = self.item_emb(seq) + self.pos_emb(right_aligned_positions(seq.shape[1], seq.device))
        x = self.emb_drop(x) * valid
        q = self.ln_1(x)
        a = self.attn(q, x, attention_mask(seq > 0, causal=True)) + q
        a = self.ln_2(a)
        f = self.ln_ffn(self.ffn(a) + a) * valid
        return self.ln_3(f)

    def denoise(self, x_t: torch.Tensor, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """f(x_t, h, t) -> predicted x0."""
        if t.numel() > 1 and bool((t == t[0]).all()):  # sampling: one step for the whole batch, embed it once
            t_emb = self.step_mlp(D.timestep_embedding(t[:1], self.config.hidden).to(x_t.dtype)).expand(len(t), -1)
        else:
            t_emb = self.step_mlp(D.timestep_embedding(t, self.config.hidden).to(x_t.dtype))
        return self.denoiser(torch.cat([x_t, h, t_emb], dim=-1))

    def guided(self, h: torch.Tensor, w: float):
        """model_fn(x_t, t) for the samplers: (1 + w) f(x, h, t) - w f(x, none, t)."""
        none = self.none_emb.expand_as(h)

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if w == 0:
                return self.denoise(x, h, t)
            cond, uncond = self.denoise(torch.cat([x, x]), torch.cat([h, none]), torch.cat([t, t])).chunk(2)
            return D.cfg_combine(cond, uncond, w)

        return fn

    def train_timesteps(self) -> list[int] | None:
        """The t a training target may be noised to: None = every t (Uniform{0..T-1})."""
        c = self.config
        if c.train_t == "sampler" and c.sampler == "ddim":
            return D.ddim_timesteps(c.T, c.ddim_steps)
        return None

    # -- interface ----------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """"position" batches: "history" (B, L), "target" (B,); "sequence" batches: "input_seq" / "target_seq"
        (B, L), a target wherever target_seq > 0, each conditioned on the encoder output at its position."""
        if "input_seq" in batch:
            tgt = crop_history(batch["target_seq"], self.history_len)
            h_all = self.encode_all(batch["input_seq"])
            sel = tgt > 0
            if not bool(sel.any()):
                return h_all.sum() * 0.0
            return self._diffusion_loss(h_all[sel], tgt[sel], generator)
        return self._diffusion_loss(self.encode(batch["history"]), batch["target"], generator)

    def _diffusion_loss(self, h: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None):
        """h (B, D) conditions, target (B,) item ids -> the x0 loss (MSE or PreferDiff), CFG drop included."""
        c = self.config
        B, dev = target.shape[0], target.device
        s = self.schedule(dev)
        drop = rand((B, 1), generator, dev) < c.p_uncond
        h = torch.where(drop, self.none_emb.expand_as(h), h)
        x0 = self.item_emb(target)
        if not c.target_grad:
            x0 = x0.detach()
        t = D.sample_timesteps(B, c.T, generator=generator, device=dev, choices=self.train_timesteps())
        noise = D.randn(x0.shape, generator, dev, x0.dtype)
        x0_hat = self.denoise(D.q_sample(s, x0, t, noise), h, t)
        if c.loss_type == "mse":
            return F.mse_loss(x0_hat, x0)
        # PreferDiff: negatives uniform over the other items, noised at the positive's t, same condition
        n = c.n_neg
        neg = randint(1, self.n_items, (B, n), generator, dev)
        neg = neg + (neg >= target[:, None]).long()  # skip the target: uniform over the n_items - 1 others
        x0_neg = self.item_emb(neg)  # (B, n, d)
        if not c.target_grad:
            x0_neg = x0_neg.detach()
        if c.pd_centroid:  # PreferDiff's "-C": one centroid of the negatives, noised and denoised once
            x0_neg, n = x0_neg.mean(dim=1, keepdim=True), 1
        t_neg = t.repeat_interleave(n)
        noise_neg = D.randn(x0_neg.shape, generator, dev, x0.dtype)
        xt_neg = D.q_sample(s, x0_neg.reshape(B * n, -1), t_neg, noise_neg.reshape(B * n, -1))
        x0_hat_neg = self.denoise(xt_neg, h.repeat_interleave(n, dim=0), t_neg).view(B, n, -1)
        return D.preferdiff_loss(x0_hat, x0, x0_hat_neg, x0_neg, lam=c.pd_lam, scale=c.pd_scale)

    @torch.no_grad()
    def generate(
        self,
        history: torch.Tensor,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        w: float | None = None,
    ) -> torch.Tensor:
        """The oracle item vector (B, D). steps: None/0 -> the config's sampler; k > 0 -> DDIM with k steps."""
        c = self.config
        h = self.encode(history)
        s = self.schedule(h.device)
        fn = self.guided(h, c.w if w is None or w < 0 else float(w))
        shape, dev = tuple(h.shape), h.device
        if not steps and c.sampler == "ddpm":
            return D.ddpm_sample(fn, s, shape, prediction_type="x0", generator=generator, device=dev)
        k = int(steps) if steps else c.ddim_steps
        return D.ddim_sample(fn, s, shape, k, prediction_type="x0", generator=generator, device=dev)

    @torch.no_grad()
    def score_all(
        self,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator | None = None,
        steps: int | None = None,
        w: float | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Inner product of the generated vector with every item embedding; other kwargs are ignored."""
        x0 = self.generate(batch["history"], generator=generator, steps=steps, w=w)
        return exclude_padding_column(x0 @ self.item_emb.weight.T)

