"""DiffuRec (Li et al., TOIS 2023) and DiffuRecSys (seed 002): diffusion over the target item's embedding
with a transformer approximator conditioned on the history, trained with cross-entropy over all items.

Faithful to WHUIR/DiffuRec (see shared/REFERENCE.md):
- approximator input at every position: LN(dropout(E[seq])) + lambda * (x_t + t_emb), lambda ~ N(0.001, 0.001)
  per element, drawn afresh at every call (training and every reverse step); 4 pre-LN transformer blocks
  (4 heads, GELU FFN of width 4D, block-output dropout), then LN(dropout(.)); x0_hat = the last position;
- t_emb = sinusoidal(t * 1000 / T) -> Linear(D, 4D) -> SiLU -> Linear(4D, D);
- `trunc_lin` schedule with T = 32; uniform timesteps (the reference's "lossaware" sampler is never updated,
  so it stays uniform); loss = CE of x0_hat . E^T over all items; inference = 32 ancestral reverse steps
  from N(0, I) with the reference's variance choice (`reverse_variance="large"`: beta_t, the first step
  using the posterior variance), scores = x_T0 . E^T;
- no position embeddings (the reference has them commented out; `position_embeddings=True` adds them).

Fixed faults: padding KEYS are masked and attention is causal (the reference masks padded queries and has
no causal mask); the padding embedding is fixed at zero and never rankable; every block feeds the next.

DiffuRecSys options (all off for "diffurec", on for "diffurecsys"):
- `cross_attention`: in each block, before self-attention, a cross-attention sublayer whose queries are
  lambda * (x_t + t_emb) (one per position) and whose keys/values are the normalised history; x_t then enters
  only through it (as in DiffuRecSys). Standard scaled dot-product attention with padding/causal masks: the
  reference's linear attention normalised keys over the head axis (a bug) and fed the original input to
  every block (only the last counted) -- here each block feeds the next;
- `offset_noise`: training noise eps + offset * c with c ~ N(0, 1) ONE constant per sample (the paper's
  N(offset * c, I); the reference adds a full second Gaussian instead); inference starts from N(0, I);
- `ensemble_seeds`: multi-seed inference (its Algorithm 3): the softmax score distributions of that many
  seeded reverse runs are averaged. Scores are log-probabilities (log of the mean distribution), so one seed
  gives exactly the single run's log-softmax. The runs go stacked along the batch, one approximator call per
  reverse step for every user and seed, each run drawing only from its own seed's generator (what it draws
  alone); this saves per-call overhead at small batches, not arithmetic.
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
    PreLNBlock,
    attention_mask,
    crop_history,
    right_aligned_positions,
)

LN_EPS = 1e-12  # DiffuRec's TF-style LayerNorm epsilon

#: a noise source: None, one generator, or one generator per run of a stack of equal-sized runs
Noise = torch.Generator | list[torch.Generator] | None


def stacked_randn(shape: tuple[int, ...], generator: Noise, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """N(0, I) of `shape`; for a list of k generators, k blocks of shape[0] / k rows, block j from generator j.

    Each run of a stack then draws exactly what it would draw alone, so stacking changes no result.
    """
    if not isinstance(generator, list):
        return D.randn(shape, generator, device, dtype)
    k = len(generator)
    if shape[0] % k:
        raise ValueError(f"{shape[0]} rows do not split into {k} stacked runs")
    rows = (shape[0] // k, *shape[1:])
    return torch.cat([D.randn(rows, g, device, dtype) for g in generator])


@dataclass
class DiffuRecConfig:
    history_len: int = 50  # DiffuRec: max_len 50 on every dataset
    hidden: int = 128  # DiffuRec: hidden_size 128
    n_blocks: int = 4  # DiffuRec: num_blocks 4
    n_heads: int = 4  # DiffuRec: 4 attention heads (hard-coded)
    dropout: float = 0.1  # DiffuRec: dropout 0.1 (attention, FFN, residuals, output)
    emb_dropout: float = 0.3  # DiffuRec: emb_dropout 0.3 on the history embeddings
    T: int = 32  # DiffuRec: diffusion_steps 32
    schedule: Literal["trunc_lin", "linear", "cosine"] = "trunc_lin"  # DiffuRec: noise_schedule trunc_lin
    lambda_uncertainty: float = 0.001  # DiffuRec: lambda ~ N(0.001, 0.001) scales x_t into the history
    rescale_timesteps: bool = True  # DiffuRec: timesteps fed to the embedding as t * 1000 / T
    reverse_variance: Literal["large", "posterior"] = "large"  # DiffuRec's reverse step uses beta_t ("large")
    position_embeddings: bool = False  # DiffuRec has them commented out; causal attention still orders items
    cross_attention: bool = False  # DiffuRecSys' cross-attention conditioning; off in DiffuRec
    offset_noise: float = 0.0  # DiffuRecSys: 0.1; 0 = plain Gaussian noise as in DiffuRec
    ensemble_seeds: int = 1  # DiffuRecSys averages several seeded reverse runs; 1 = a single run (DiffuRec)
    ensemble_seed: int = 0  # seeds used when score_all gets no generator: ensemble_seed, +1, ... (reproducible)
    # how training reads a user's sequence: "position" = one (history, next item) sample per row, x0_hat read at
    # the last position (DiffuRec); "sequence" = a target at every position of a chunk of history_len items in
    # one forward (SASRec's layout; every chunk of the whole history), each position carrying lambda * (x_t +
    # t_emb) of its OWN noised target. Attention is causal and position j's target (item j + 1) is already an
    # input of every later position, so nothing leaks; the history positions of a sample then carry their own
    # targets' noise where DiffuRec broadcasts the last target's (both scaled by lambda ~ 0.001). Inference is
    # unchanged. About history_len times fewer approximator passes per target
    train_layout: Literal["position", "sequence"] = field(default="position", metadata={"late": True})
    # training settings live in TrainConfig; DiffuRec used Adam lr 1e-3, batch 512, no weight decay


@dataclass
class DiffuRecSysConfig(DiffuRecConfig):
    cross_attention: bool = True  # DiffuRecSys: cross-attention between x_t and the history in every block
    offset_noise: float = 0.1  # DiffuRecSys: offset noise N(0.1 c, I)
    ensemble_seeds: int = 5  # DiffuRecSys Algorithm 3 (multi-seed ensemble); 5 runs bounds inference at 5x
    # paper/code also used max_len 100 and weight decay 1e-4 (TrainConfig); kept at DiffuRec's 50 here so the
    # two differ only by the three DiffuRecSys techniques


class DiffuBlock(nn.Module):
    """[cross-attention sublayer] + pre-LN self-attention/FFN block + block-output dropout."""

    def __init__(self, d: int, n_heads: int, dropout: float, cross: bool):
        super().__init__()
        self.cross = MultiHeadAttention(d, n_heads, dropout) if cross else None
        self.ln_cross = nn.LayerNorm(d, eps=LN_EPS) if cross else None
        self.block = PreLNBlock(d, n_heads, dropout, 4 * d, "gelu_tanh", ln_eps=LN_EPS)
        self.drop = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor, query: torch.Tensor | None = None, last_only: bool = False
    ) -> torch.Tensor:
        if self.cross is not None:
            x = x + self.drop(self.cross(query, self.ln_cross(x), mask))
        return self.drop(self.block(x, mask, last_only))


@register("diffurecsys", DiffuRecSysConfig)
@register("diffurec", DiffuRecConfig)
class DiffuRec(Recommender):
    train_mode = "position"
    generative = False  # scores are a softmax over items; no CFG or step-count knobs for the evaluator
    sampler_params = ("dtype",)  # evaluate.dtype: the approximator's precision during the reverse runs

    def __init__(self, config: DiffuRecConfig, n_items: int):
        if config.train_layout not in ("position", "sequence"):
            raise ValueError(f"train_layout must be position or sequence, not {config.train_layout!r}")
        if config.train_layout == "sequence":  # read by the trainer's Batcher (set before the contract check)
            self.train_mode = "sequence"
        super().__init__(n_items, config.history_len, chunked=config.train_layout == "sequence")
        c = self.config = config
        d = c.hidden
        if c.reverse_variance not in ("large", "posterior"):
            raise ValueError(f"unknown reverse_variance {c.reverse_variance!r}")
        if c.ensemble_seeds < 1:
            raise ValueError("ensemble_seeds must be >= 1")
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)  # N(0, 1) as nn.Embedding's default
        self.pos_emb = nn.Embedding(c.history_len, d) if c.position_embeddings else None
        self.emb_drop = nn.Dropout(c.emb_dropout)
        self.emb_ln = nn.LayerNorm(d, eps=LN_EPS)
        self.time_mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d))
        self.blocks = nn.ModuleList(DiffuBlock(d, c.n_heads, c.dropout, c.cross_attention) for _ in range(c.n_blocks))
        self.out_drop = nn.Dropout(c.dropout)
        self.out_ln = nn.LayerNorm(d, eps=LN_EPS)
        for blk in self.blocks:  # DiffuRec: Xavier-normal FFN weights and attention output projections
            for lin in (blk.block.ffn.net[0], blk.block.ffn.net[3], blk.block.attn.out):
                nn.init.xavier_normal_(lin.weight)
        kw = {  # DiffuRec's own versions: linear scaled by 1000 / T, cosine capped at 0.999 with no floor
            "linear": {"beta_start": 1e-4 * 1000 / c.T, "beta_end": 0.02 * 1000 / c.T},
            "cosine": {"clip_min": 0.0, "clip_max": 0.999},
        }.get(c.schedule, {})
        self._schedule = D.make_schedule(c.schedule, c.T, **kw)
        #: compute only the last position in the last block (same result; a switch for the equivalence test)
        self.last_only = True

    # -- pieces -------------------------------------------------------------------------------------------
    def schedule(self, device: torch.device) -> D.Schedule:
        if self._schedule.betas.device != device:
            self._schedule = self._schedule.to(device)
        return self._schedule

    def history_rep(self, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LN(dropout(E[seq] (+ positions))) (B, L, D) and the attention mask."""
        seq = crop_history(history, self.history_len)
        x = self.item_emb(seq)
        if self.pos_emb is not None:
            x = x + self.pos_emb(right_aligned_positions(seq.shape[1], seq.device))
        return self.emb_ln(self.emb_drop(x)), attention_mask(seq > 0, causal=True)

    def approximate(
        self,
        rep: torch.Tensor,
        mask: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        generator: Noise = None,
    ) -> torch.Tensor:
        """x0_hat (B, D) from the history representation and the noisy target x_t (B, D) at step t (B,): x_t + t_emb
        enters every position. With x_t (B, L, D) and t (B, L), one noisy target per position ("sequence"
        training): x0_hat (B, L, D) at every position.

        generator: one torch.Generator (or None), or a list of k generators when the batch is k stacked
        runs of B / k rows each: run j's draws then come from generator j alone.
        """
        c = self.config
        per_position = x_t.dim() == 3
        tt = t.reshape(-1).float() * (1000.0 / c.T) if c.rescale_timesteps else t.reshape(-1).float()
        z = x_t + self.time_mlp(D.timestep_embedding(tt, c.hidden).to(x_t.dtype)).view(x_t.shape)
        # drawn for the full history_len and right-aligned, so extra left padding never changes the draws
        B, L, d = rep.shape
        std = stacked_randn((B, self.history_len, d), generator, rep.device, rep.dtype)
        lam = c.lambda_uncertainty * (1.0 + std[:, self.history_len - L :])
        query = lam * (z if per_position else z[:, None, :])
        if c.cross_attention:
            h = rep
        else:
            h, query = rep + query, None
        last = len(self.blocks) - 1
        last_only = self.last_only and not per_position
        for i, blk in enumerate(self.blocks):  # only x0_hat = the last position is read: skip the rest at the end
            h = blk(h, mask, query, last_only=i == last and last_only)
        out = self.out_ln(self.out_drop(h))
        return out if per_position else out[:, -1]

    # -- interface ----------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        """"position" batches: "history" (B, L), "target" (B,); "sequence" batches: "input_seq" / "target_seq"
        (B, L), a target wherever target_seq > 0."""
        if "input_seq" in batch:
            return self._sequence_loss(batch, generator)
        c = self.config
        target = batch["target"]
        B, dev = target.shape[0], target.device
        s = self.schedule(dev)
        rep, mask = self.history_rep(batch["history"])
        x0 = self.item_emb(target)
        t = D.sample_timesteps(B, c.T, generator=generator, device=dev)
        noise = D.randn(x0.shape, generator, dev, x0.dtype)
        if c.offset_noise:
            noise = noise + c.offset_noise * D.randn((B, 1), generator, dev, x0.dtype)
        x0_hat = self.approximate(rep, mask, D.q_sample(s, x0, t, noise), t, generator)
        logits = x0_hat @ self.item_emb.weight[1:].T  # padding column excluded
        return F.cross_entropy(logits, target - 1)

    def _sequence_loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
        c = self.config
        inp = crop_history(batch["input_seq"], self.history_len)
        tgt = crop_history(batch["target_seq"], self.history_len)
        (B, L), dev = tgt.shape, tgt.device
        s = self.schedule(dev)
        rep, mask = self.history_rep(inp)
        x0 = self.item_emb(tgt)  # (B, L, D); padding targets embed to 0 and are never counted
        t = D.sample_timesteps(B * L, c.T, generator=generator, device=dev)
        noise = D.randn((B * L, c.hidden), generator, dev, x0.dtype)
        if c.offset_noise:  # one constant per target, as for a position sample
            noise = noise + c.offset_noise * D.randn((B * L, 1), generator, dev, x0.dtype)
        x_t = D.q_sample(s, x0.reshape(B * L, -1), t, noise).view(B, L, -1)
        x0_hat = self.approximate(rep, mask, x_t, t.view(B, L), generator)  # (B, L, D)
        sel = tgt > 0
        if not bool(sel.any()):
            return x0_hat.sum() * 0.0
        logits = x0_hat[sel] @ self.item_emb.weight[1:].T  # padding column excluded
        return F.cross_entropy(logits, tgt[sel] - 1)

    @torch.no_grad()
    def reverse(self, history: torch.Tensor, generator: Noise = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Reverse runs: T ancestral steps from N(0, I) -> x0.

        One generator (or None): one run, (B, D). A list of k generators: k runs stacked along the batch,
        (k * B, D), run j in rows [j * B, (j + 1) * B) drawing only from generator j, so each run is the one
        `reverse(history, generators[j])` makes alone; the stack costs one approximator call per step.
        dtype = torch.bfloat16 runs the approximator under bf16 autocast (the result stays float32).
        """
        rep, mask = self.history_rep(history)
        k = len(generator) if isinstance(generator, list) else 1
        if k > 1:  # the history representation is deterministic in eval: computed once, shared by every run
            rep, mask = rep.repeat(k, 1, 1), mask.repeat(k, 1, 1, 1)
        return self._reverse_from(rep, mask, generator, dtype)

    def _reverse_from(
        self, rep: torch.Tensor, mask: torch.Tensor, generator: Noise, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        c = self.config
        B, dev = rep.shape[0], rep.device
        # bf16 autocast covers the approximator's matmuls only: the noise draws, the posterior mean and x stay
        # float32, so the draws are the float32 run's and only the approximator's rounding differs
        amp = dtype is not None and dtype != torch.float32
        s = self.schedule(dev)
        if c.reverse_variance == "posterior":
            log_var = s.posterior_log_variance_clipped
        else:  # DiffuRec's p_sample: variance beta_t (the posterior variance at the first step)
            log_var = torch.log(torch.cat([s.posterior_variance[1:2], s.betas[1:]]))
        log_var = log_var.to(rep.dtype)
        # the posterior mean, no noise at t = 0; draws in the order D.ddpm_sample makes them
        x = stacked_randn((B, c.hidden), generator, dev, rep.dtype)
        for i in reversed(range(c.T)):
            t = torch.full((B,), i, device=dev, dtype=torch.long)
            with torch.autocast(dev.type, dtype=dtype, enabled=amp):
                x0_hat = self.approximate(rep, mask, x, t, generator).to(x.dtype)
            mean = D.q_posterior(s, x0_hat, x, t)[0]
            if i > 0:
                x = mean + torch.exp(0.5 * log_var[i]) * stacked_randn(x.shape, generator, dev, x.dtype)
            else:
                x = mean
        return x

    def _log_probs(self, history: torch.Tensor, generator: Noise, dtype: torch.dtype | None) -> torch.Tensor:
        """log_softmax over items of each run: (B, n_items), or (k, B, n_items) for k generators."""
        x0 = self.reverse(history, generator, dtype)
        logp = F.log_softmax(x0 @ self.item_emb.weight[1:].T, dim=-1)
        return logp.view(len(generator), history.shape[0], -1) if isinstance(generator, list) else logp

    @torch.no_grad()
    def score_all(
        self,
        batch: dict[str, torch.Tensor],
        generator: torch.Generator | None = None,
        seeds: list[int] | None = None,
        dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Log-probabilities over items (B, n_items + 1), column 0 = -inf; float32 whatever `dtype` the
        approximator ran at (bf16 scores would tie).

        seeds: explicit ensemble seeds (one reverse run each, averaged in probability space). Without them,
        `ensemble_seeds` > 1 draws that many seeds from `generator`, and 1 makes a single run with `generator`.
        Without a generator (the evaluator passes none to non-generative models) the seeds are
        ensemble_seed, ensemble_seed + 1, ...: inference is reproducible either way. Other kwargs are ignored.
        """
        history = batch["history"]
        dev = history.device
        k = self.config.ensemble_seeds
        if seeds is None and generator is None:
            seeds = [self.config.ensemble_seed + i for i in range(k)]
        elif seeds is None and k > 1:
            seeds = torch.randint(0, 2**62, (k,), generator=generator, device=generator.device).tolist()
        if seeds is None:
            logp = self._log_probs(history, generator, dtype)
        else:  # every seed's run at once, stacked along the batch (one approximator call per reverse step)
            gens = [torch.Generator(device=dev).manual_seed(int(sd)) for sd in seeds]
            logp = torch.logsumexp(self._log_probs(history, gens, dtype), dim=0) - math.log(len(gens))
        pad = torch.full((logp.shape[0], 1), float("-inf"), device=dev, dtype=logp.dtype)
        return torch.cat([pad, logp], dim=1)

