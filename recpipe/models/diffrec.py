"""DiffRec (Wang et al., SIGIR 2023): diffusion over each user's whole multi-hot interaction vector.

Faithful to YiyanXu/DiffRec (see shared/REFERENCE.md):
- x0 = the user's multi-hot vector over all items (built here from the history ids; 0 = padding ignored),
  or T-DiffRec's time-weighted one (`w_min` < `w_max`: weights linear in the interaction's order);
- MLP denoiser (DiffRec's DNN): dropout on the input, concat with a Linear-projected sinusoidal timestep
  embedding (size 10), tanh MLP encoder/decoder [n_items + 10] -> dims... -> [n_items], x0 prediction;
- schedule `linear_var`: the variance 1 - abar_t linear in noise_scale * [noise_min, noise_max], beta_0 = 1e-5;
- training: importance-sampled timesteps (p_t ~ sqrt(E[L_t^2]) over the last 10 losses of each step, with
  uniform sampling until every step has 10, mixed with 0.1% uniform), loss / (T p_t), and the x0 reweighting
  SNR(t-1) - SNR(t) (1 at t = 0) that DiffRec's ML-1M checkpoint used (`reweight`);
- inference: the clean multi-hot noised to step T' (`sampling_steps`, 0 = not noised), then the reverse mean
  over all T steps, T-1 .. 0, without sampling noise (DiffRec's p_sample with sampling_noise=False).

Seen items are NOT masked here: the evaluator does that (seen-masked and unmasked columns side by side).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from recpipe.models import diffusion as D
from recpipe.models.base import Recommender, register


@dataclass
class DiffRecConfig:
    hidden_dims: list[int] = field(default_factory=lambda: [200, 600])  # DiffRec's ML-1M-clean checkpoint
    time_emb: int = 10  # DiffRec: emb_size 10 for the timestep embedding
    dropout: float = 0.5  # DiffRec's DNN default dropout on the (noisy) input vector
    norm_input: bool = False  # DiffRec: norm=False (no L2 normalisation of the input)
    T: int = 40  # DiffRec ML-1M clean best: steps 40
    noise_scale: float = 0.005  # DiffRec ML-1M clean best
    noise_min: float = 0.005  # DiffRec ML-1M clean best
    noise_max: float = 0.01  # DiffRec ML-1M clean best
    sampling_steps: int = 0  # DiffRec's best T': inference starts from the clean (un-noised) multi-hot
    sampling_noise: bool = False  # DiffRec: the reverse pass uses the posterior mean only
    reweight: bool = True  # DiffRec's ML-1M checkpoint: x0 loss weighted by SNR(t-1) - SNR(t)
    timestep_sampling: Literal["importance", "uniform"] = "importance"  # DiffRec samples t by importance
    history_per_step: int = 10  # DiffRec: history_num_per_term, losses kept per step for importance sampling
    uniform_prob: float = 0.001  # DiffRec: share of uniform probability mixed into the importance weights
    # T-DiffRec (the same paper, its temporal variant): a user's interactions weighted linearly by their order,
    # from w_min (the oldest) to w_max (the newest), in the vector the model trains on and reads at inference,
    # so a recent interaction counts more than an old one (a next-item split rewards that). 1.0 = plain
    # DiffRec's multi-hot; T-DiffRec's default is w_min 0.1, w_max 1.0
    w_min: float = field(default=1.0, metadata={"late": True})
    w_max: float = field(default=1.0, metadata={"late": True})  # see w_min
    # training settings live in TrainConfig; DiffRec ML-1M used AdamW lr 1e-3, batch 400, no weight decay


class DiffRecDNN(nn.Module):
    """DiffRec's denoiser: tanh MLP on concat(dropout(x_t), Linear(sinusoidal(t)))."""

    def __init__(self, n_items: int, dims: list[int], time_emb: int, dropout: float, norm_input: bool):
        super().__init__()
        self.time_emb, self.norm_input = time_emb, norm_input
        self.emb_layer = nn.Linear(time_emb, time_emb)
        # DiffRec: out_dims = dims + [n_items], in_dims = reversed(out_dims) with the time embedding appended
        enc = [n_items + time_emb] + list(reversed(dims))
        dec = list(dims) + [n_items]
        self.in_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(enc[:-1], enc[1:]))
        self.out_layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dec[:-1], dec[1:]))
        self.drop = nn.Dropout(dropout)
        for layer in [self.emb_layer, *self.in_layers, *self.out_layers]:  # DiffRec: Xavier-normal, N(0, 1e-3) bias
            fan_out, fan_in = layer.weight.shape
            nn.init.normal_(layer.weight, 0.0, math.sqrt(2.0 / (fan_in + fan_out)))
            nn.init.normal_(layer.bias, 0.0, 0.001)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.emb_layer(D.timestep_embedding(t, self.time_emb).to(x.dtype))
        if self.norm_input:
            x = nn.functional.normalize(x, dim=-1)
        h = torch.cat([self.drop(x), emb], dim=-1)
        for layer in self.in_layers:
            h = torch.tanh(layer(h))
        for i, layer in enumerate(self.out_layers):
            h = layer(h)
            if i < len(self.out_layers) - 1:
                h = torch.tanh(h)
        return h


@register("diffrec", DiffRecConfig)
class DiffRec(Recommender):
    train_mode = "user"

    def __init__(self, config: DiffRecConfig, n_items: int):
        super().__init__(n_items, None)
        c = self.config = config
        if not c.hidden_dims:
            raise ValueError("hidden_dims must name at least one layer")
        if c.noise_scale <= 0:
            raise ValueError("noise_scale must be > 0 (DiffRec's noise-free variant is not supported)")
        if not 0 <= c.sampling_steps <= c.T:
            raise ValueError(f"sampling_steps must be in [0, T={c.T}]")
        if not 0 < c.w_min <= c.w_max:
            raise ValueError(f"need 0 < w_min <= w_max, got w_min={c.w_min}, w_max={c.w_max}")
        self.dnn = DiffRecDNN(n_items, list(c.hidden_dims), c.time_emb, c.dropout, c.norm_input)
        self._schedule = D.make_schedule(
            "linear_var", c.T, noise_scale=c.noise_scale, noise_min=c.noise_min, noise_max=c.noise_max
        )
        # importance sampling state (DiffRec's Lt_history / Lt_count), saved with the model
        self.register_buffer("lt_history", torch.zeros(c.T, c.history_per_step, dtype=torch.float64))
        self.register_buffer("lt_count", torch.zeros(c.T, dtype=torch.long))

    def schedule(self, device: torch.device) -> D.Schedule:
        if self._schedule.betas.device != device:
            self._schedule = self._schedule.to(device)
        return self._schedule

    def multi_hot(self, history: torch.Tensor) -> torch.Tensor:
        """(B, L) ids in time order (0 = padding, either side) -> (B, n_items) float vector over items
        1..n_items: 1 per interacted item, or T-DiffRec's weight w_min + (w_max - w_min) * k / (n - 1) for
        the user's k-th of n interactions (np.linspace(w_min, w_max, n), as its data loader; w_min when n = 1).
        An item repeated in the history keeps its largest (latest) weight."""
        c = self.config
        x = torch.zeros(history.shape[0], self.n_items + 1, device=history.device)
        if c.w_min == c.w_max:
            x.scatter_(1, history, c.w_max)
        else:
            real = history > 0
            k = real.cumsum(dim=1) - 1  # (B, L) order among the real ids
            n = real.sum(dim=1, keepdim=True)
            w = c.w_min + (c.w_max - c.w_min) * k / (n - 1).clamp(min=1)
            x.scatter_reduce_(1, history, torch.where(real, w, 0.0).to(x.dtype), reduce="amax")
        return x[:, 1:]

    # -- timestep sampling --------------------------------------------------------------------------------
    def sample_t(self, B: int, device: torch.device, generator: torch.Generator | None):
        """(t, p_t * T): importance sampling once every step has a full loss history, uniform before."""
        c = self.config
        if c.timestep_sampling == "importance" and bool((self.lt_count == c.history_per_step).all()):
            w = torch.sqrt((self.lt_history**2).mean(dim=-1))
            p = w / w.sum() * (1.0 - c.uniform_prob) + c.uniform_prob / c.T
            on = generator.device if generator is not None else p.device  # multinomial draws where p lives
            t = torch.multinomial(p.float().to(on), B, replacement=True, generator=generator).to(device)
            return t, (p.to(device)[t] * c.T).float()
        t = D.sample_timesteps(B, c.T, generator=generator, device=device)
        return t, torch.ones(B, device=device)

    @torch.no_grad()
    def _record(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Append each step's new losses to its FIFO of the last `history_per_step` values."""
        H = self.config.history_per_step
        t, losses = t.cpu(), losses.detach().double().cpu()
        hist, count = self.lt_history.cpu(), self.lt_count.cpu()
        for step in torch.unique(t).tolist():
            new = losses[t == step]
            n = int(count[step])
            row = torch.cat([hist[step, :n], new])[-H:]
            hist[step, : row.numel()] = row
            count[step] = row.numel()
        self.lt_history.copy_(hist)
        self.lt_count.copy_(count)

    # -- interface ----------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.config
        x0 = self.multi_hot(batch["history"])
        B, dev = x0.shape[0], x0.device
        s = self.schedule(dev)
        t, pt = self.sample_t(B, dev, generator)
        noise = D.randn(x0.shape, generator, dev, x0.dtype)
        x0_hat = self.dnn(D.q_sample(s, x0, t, noise), t)
        mse = ((x0_hat - x0) ** 2).mean(dim=-1)
        if c.reweight:
            abar = s.alphas_cumprod.to(dev)
            snr = abar / (1.0 - abar)
            weight = torch.where(t == 0, torch.ones_like(mse), (snr[(t - 1).clamp(min=0)] - snr[t]).to(mse.dtype))
        else:
            weight = torch.ones_like(mse)
        losses = weight * mse
        if self.training and c.timestep_sampling == "importance":
            self._record(t, losses)
        return (losses / pt).mean()

    @torch.no_grad()
    def score_all(
        self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """The reconstructed interaction vector (B, n_items + 1), column 0 = -inf. Other kwargs are ignored."""
        c = self.config
        x = self.multi_hot(batch["history"])
        B, dev = x.shape[0], x.device
        s = self.schedule(dev)
        if generator is None and (c.sampling_steps > 0 or c.sampling_noise):  # reproducible without one too
            generator = torch.Generator(device=dev).manual_seed(0)
        if c.sampling_steps > 0:
            t = torch.full((B,), c.sampling_steps - 1, device=dev, dtype=torch.long)
            x = D.q_sample(s, x, t, D.randn(x.shape, generator, dev, x.dtype))
        if c.sampling_noise:
            x = D.ddpm_sample(self.dnn, s, tuple(x.shape), prediction_type="x0", generator=generator, device=dev, x_T=x)
        else:
            for i in reversed(range(c.T)):
                t = torch.full((B,), i, device=dev, dtype=torch.long)
                x = D.q_posterior(s, self.dnn(x, t), x, t)[0]
        pad = torch.full((B, 1), float("-inf"), device=dev, dtype=x.dtype)
        return torch.cat([pad, x], dim=1)

