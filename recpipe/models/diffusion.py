"""Gaussian diffusion as pure functions (the contract is docs/diffusion_api.md).

Shared by every diffusion model in recpipe. In the style of diffusers' DDIM scheduler (explicit
`prediction_type`, numbered steps, a `generator` for every random draw) but as plain functions over a
frozen `Schedule`.

Conventions
- Timesteps are 0-based: t = 0 is the first noising step (x_0 -> x_1 in the papers' 1-based notation),
  t = T - 1 the last. `alphas_cumprod[t]` = prod_{s <= t} (1 - beta_s).
- Vectors are (B, d) (or (B, ..., d): coefficients broadcast over every non-batch dimension).
- prediction_type: "x0" (what recpipe's models predict) or "epsilon".
- Whitened item vectors have no natural range, so NOTHING here ever clips x0.
- The schedule is computed and kept in float64; each function casts the coefficients it gathers to the
  dtype of its input tensors, so float32 models get float32 results without float32 cumprod error.
- Random draws take a torch.Generator. Noise is drawn on the generator's device and then moved, so a CPU
  generator gives the same numbers whatever device the model runs on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PREDICTION_TYPES = ("x0", "epsilon")
BETA_SCHEDULES = ("linear", "cosine", "exp", "trunc_lin", "linear_var")

ModelFn = Callable[[Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------------------------------
# schedules
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """Every per-timestep quantity of a T-step Gaussian diffusion; each field is a (T,) tensor."""

    T: int
    betas: Tensor  # beta_t
    alphas: Tensor  # 1 - beta_t
    alphas_cumprod: Tensor  # abar_t = prod_{s<=t} alpha_s
    alphas_cumprod_prev: Tensor  # abar_{t-1}, with abar_{-1} = 1
    sqrt_alphas_cumprod: Tensor  # sqrt(abar_t)
    sqrt_one_minus_alphas_cumprod: Tensor  # sqrt(1 - abar_t)
    posterior_variance: Tensor  # beta_t (1 - abar_{t-1}) / (1 - abar_t)  (0 at t = 0)
    posterior_log_variance_clipped: Tensor  # log of the above, t = 0 replaced by t = 1 (finite)
    posterior_mean_coef1: Tensor  # coefficient of x0 in the posterior mean
    posterior_mean_coef2: Tensor  # coefficient of x_t in the posterior mean

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Schedule:
        """A copy with every tensor moved to `device` (and cast to `dtype` if given; default keeps float64)."""
        changes = {
            f.name: getattr(self, f.name).to(device=device, dtype=dtype)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return dataclasses.replace(self, **changes)

    @property
    def device(self) -> torch.device:
        return self.betas.device


def make_betas(kind: str, T: int, **kw: float) -> Tensor:
    """Beta schedule of length T, float64, every value in (0, 1).

    kind:
      "linear"     DDPM / DreamRec: linspace(beta_start=1e-4, beta_end=0.02, T).
      "cosine"     Nichol & Dhariwal as in DreamRec: abar(u) = cos²((u/T + s)/(1 + s)·π/2), s = 0.008,
                   beta_t = 1 - abar(t+1)/abar(t), clipped to [1e-4, 0.9999] (clip_min, clip_max).
      "exp"        DreamRec: beta_t = 1 - exp(-beta_min/T - x_t·0.5·(beta_max - beta_min)/T²),
                   x = linspace(1, 2T + 1, T), beta_min = 0.1, beta_max = 10.
      "trunc_lin"  DiffuRec: linspace((1000/T)·1e-4 + 0.01, (1000/T)·0.02 + 0.01, T)
                   (T = 32: 0.013125 -> 0.635). Undefined (beta >= 1) for T <= 16.
      "linear_var" DiffRec: the noise variance 1 - abar_t is linear from noise_scale·noise_min to
                   noise_scale·noise_max (defaults 0.1, 1e-4, 0.02, DiffRec's argparse defaults),
                   beta_t = min(1 - abar_t/abar_{t-1}, max_beta = 0.999); beta_fixed=True sets
                   beta_0 = 1e-5 as DiffRec does.
    """
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    f64 = torch.float64
    if kind == "linear":
        _check_kw(kind, kw, {"beta_start", "beta_end"})
        betas = torch.linspace(kw.get("beta_start", 1e-4), kw.get("beta_end", 0.02), T, dtype=f64)
    elif kind == "cosine":
        _check_kw(kind, kw, {"s", "clip_min", "clip_max"})
        s = kw.get("s", 0.008)
        u = torch.linspace(0, T, T + 1, dtype=f64)
        abar = torch.cos(((u / T) + s) / (1 + s) * math.pi * 0.5) ** 2
        abar = abar / abar[0]
        betas = (1 - abar[1:] / abar[:-1]).clamp(kw.get("clip_min", 1e-4), kw.get("clip_max", 0.9999))
    elif kind == "exp":
        _check_kw(kind, kw, {"beta_min", "beta_max"})
        beta_min, beta_max = kw.get("beta_min", 0.1), kw.get("beta_max", 10.0)
        x = torch.linspace(1, 2 * T + 1, T, dtype=f64)
        betas = 1 - torch.exp(-beta_min / T - x * 0.5 * (beta_max - beta_min) / (T * T))
    elif kind == "trunc_lin":
        _check_kw(kind, kw, set())
        scale = 1000.0 / T
        betas = torch.linspace(scale * 1e-4 + 0.01, scale * 0.02 + 0.01, T, dtype=f64)
    elif kind == "linear_var":
        _check_kw(kind, kw, {"noise_scale", "noise_min", "noise_max", "beta_fixed", "max_beta"})
        ns = kw.get("noise_scale", 0.1)
        var = torch.linspace(ns * kw.get("noise_min", 1e-4), ns * kw.get("noise_max", 0.02), T, dtype=f64)
        abar = 1 - var
        betas = torch.empty(T, dtype=f64)
        betas[0] = 1 - abar[0]
        if T > 1:
            betas[1:] = (1 - abar[1:] / abar[:-1]).clamp(max=kw.get("max_beta", 0.999))
        if kw.get("beta_fixed", True):
            betas[0] = 1e-5
    else:
        raise ValueError(f"unknown beta schedule {kind!r}; known: {', '.join(BETA_SCHEDULES)}")
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError(
            f"beta schedule {kind!r} with T={T} has betas outside (0, 1): "
            f"[{betas.min().item():.4g}, {betas.max().item():.4g}]"
        )
    return betas


def _check_kw(kind: str, kw: dict, allowed: set[str]) -> None:
    unknown = sorted(set(kw) - allowed)
    if unknown:
        raise TypeError(f"beta schedule {kind!r} takes no argument(s) {', '.join(unknown)}")


def schedule_from_betas(betas: Tensor) -> Schedule:
    """Every derived quantity of a beta schedule, in float64."""
    betas = betas.to(torch.float64)
    T = betas.shape[0]
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alphas_cumprod_prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    # posterior_variance[0] = 0: log-variance at t = 0 borrows t = 1's (as in improved-diffusion)
    if T > 1:
        log_var = torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
    else:
        log_var = torch.log(posterior_variance.clamp(min=1e-20))
    return Schedule(
        T=T,
        betas=betas,
        alphas=alphas,
        alphas_cumprod=alphas_cumprod,
        alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
        sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=log_var,
        posterior_mean_coef1=betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
    )


def make_schedule(kind: str, T: int, **kw: float) -> Schedule:
    """`Schedule` of the beta schedule `kind` (see make_betas) with T steps."""
    return schedule_from_betas(make_betas(kind, T, **kw))


# ----------------------------------------------------------------------------------------------------
# forward process and conversions
# ----------------------------------------------------------------------------------------------------


def extract(a: Tensor, t: Tensor, x_shape: Sequence[int]) -> Tensor:
    """a[t] reshaped to (B, 1, ..., 1) to broadcast against a tensor of shape x_shape.

    a: (T,), t: LongTensor (B,) -> (B,) + (1,) * (len(x_shape) - 1), on t's device, a's dtype.
    """
    out = a.to(t.device)[t]
    return out.reshape(t.shape[0], *([1] * (len(x_shape) - 1)))


def _coef(a: Tensor, t: Tensor, x: Tensor) -> Tensor:
    """extract(a, t, x.shape) cast to x's dtype and device."""
    return extract(a, t.to(x.device), x.shape).to(x.dtype)


def q_sample(s: Schedule, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """x_t ~ q(x_t | x0): sqrt(abar_t)·x0 + sqrt(1 - abar_t)·noise.  x0, noise: (B, d); t: (B,) -> (B, d)."""
    return _coef(s.sqrt_alphas_cumprod, t, x0) * x0 + _coef(s.sqrt_one_minus_alphas_cumprod, t, x0) * noise


def eps_from_x0(s: Schedule, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """The noise that takes x0 to x_t: (x_t - sqrt(abar_t)·x0) / sqrt(1 - abar_t).  (B, d)."""
    return (x_t - _coef(s.sqrt_alphas_cumprod, t, x_t) * x0) / _coef(s.sqrt_one_minus_alphas_cumprod, t, x_t)


def x0_from_eps(s: Schedule, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
    """The x0 that noise eps takes to x_t: (x_t - sqrt(1 - abar_t)·eps) / sqrt(abar_t).  (B, d)."""
    return (x_t - _coef(s.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) / _coef(s.sqrt_alphas_cumprod, t, x_t)


def q_posterior(s: Schedule, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q(x_{t-1} | x_t, x0) = N(mean, variance): (mean (B, d), variance (B, 1), log_variance (B, 1)).

    mean = coef1_t·x0 + coef2_t·x_t; at t = 0 the "previous" state is x0 itself (mean = x0, variance 0).
    """
    mean = _coef(s.posterior_mean_coef1, t, x_t) * x0 + _coef(s.posterior_mean_coef2, t, x_t) * x_t
    return mean, _coef(s.posterior_variance, t, x_t), _coef(s.posterior_log_variance_clipped, t, x_t)


def _to_x0(s: Schedule, pred: Tensor, x_t: Tensor, t: Tensor, prediction_type: str) -> Tensor:
    if prediction_type == "x0":
        return pred
    if prediction_type == "epsilon":
        return x0_from_eps(s, x_t, t, pred)
    raise ValueError(f"unknown prediction_type {prediction_type!r}; known: {', '.join(PREDICTION_TYPES)}")


def cfg_combine(cond: Tensor, uncond: Tensor, w: float) -> Tensor:
    """Classifier-free guidance, DreamRec form: (1 + w)·cond - w·uncond (w = 0: cond only)."""
    return (1.0 + w) * cond - w * uncond


# ----------------------------------------------------------------------------------------------------
# randomness
# ----------------------------------------------------------------------------------------------------


def _gen_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def randn(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """N(0, I) of `shape`, drawn on the generator's device, returned on `device`."""
    out = torch.randn(tuple(shape), generator=generator, device=_gen_device(generator, device), dtype=dtype)
    return out.to(device) if device is not None else out


def sample_timesteps(
    batch: int, T: int, generator: torch.Generator | None = None, device: torch.device | str | None = None,
    choices: Sequence[int] | None = None,
) -> Tensor:
    """t ~ Uniform{0, ..., T-1}, or uniform over `choices` (e.g. the timesteps a DDIM sampler visits):
    LongTensor (batch,)."""
    if choices is None:
        out = torch.randint(0, T, (batch,), generator=generator, device=_gen_device(generator, device))
        return out.to(device) if device is not None else out
    if not choices or not all(0 <= c < T for c in choices):
        raise ValueError(f"timestep choices must be a non-empty subset of 0..{T - 1}")
    pick = torch.randint(0, len(choices), (batch,), generator=generator, device=_gen_device(generator, device))
    table = torch.tensor(list(choices), dtype=torch.long, device=pick.device)
    out = table[pick]
    return out.to(device) if device is not None else out


# ----------------------------------------------------------------------------------------------------
# samplers
# ----------------------------------------------------------------------------------------------------


def _initial_noise(shape, generator, device, x_T) -> Tensor:
    if x_T is not None:
        if tuple(x_T.shape) != tuple(shape):
            raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {tuple(shape)}")
        return x_T.to(device) if device is not None else x_T
    return randn(shape, generator, device)


@torch.no_grad()
def ddpm_sample(
    model_fn: ModelFn,
    s: Schedule,
    shape: Sequence[int],
    *,
    prediction_type: str = "x0",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    x_T: Tensor | None = None,
    progress: bool = False,
) -> Tensor:
    """Full ancestral sampling: x_T ~ N(0, I), then for t = T-1, ..., 0
        x0_hat = model_fn(x_t, t)  (converted from epsilon if prediction_type == "epsilon")
        x_{t-1} = posterior_mean(x0_hat, x_t, t) + sqrt(posterior_variance_t)·z,  z ~ N(0, I), z = 0 at t = 0.

    model_fn(x_t: (B, d), t: LongTensor (B,)) -> (B, d).  Returns x_{-1} = the sample of x0, (B, d).
    """
    x = _initial_noise(shape, generator, device, x_T)
    B = x.shape[0]
    steps = range(s.T - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="ddpm", leave=False)
    for i in steps:
        t = torch.full((B,), i, dtype=torch.long, device=x.device)
        x0_hat = _to_x0(s, model_fn(x, t), x, t, prediction_type)
        mean, _, log_var = q_posterior(s, x0_hat, x, t)
        if i > 0:
            x = mean + torch.exp(0.5 * log_var) * randn(x.shape, generator, x.device, x.dtype)
        else:
            x = mean
    return x


def ddim_timesteps(T: int, num_steps: int) -> list[int]:
    """The DDIM timesteps, descending: round(T - i·T/num_steps) - 1 for i = 0..num_steps-1
    ("trailing" spacing: starts at T - 1, evenly spaced, len == num_steps, all distinct).

    ddim_timesteps(1000, 1) == [999]; ddim_timesteps(1000, 4) == [999, 749, 499, 249];
    ddim_timesteps(T, T) == [T-1, ..., 0].
    """
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, T={T}], got {num_steps}")
    step = T / num_steps
    return [round(T - i * step) - 1 for i in range(num_steps)]


@torch.no_grad()
def ddim_sample(
    model_fn: ModelFn,
    s: Schedule,
    shape: Sequence[int],
    num_steps: int,
    *,
    eta: float = 0.0,
    prediction_type: str = "x0",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    x_T: Tensor | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) over ddim_timesteps(T, num_steps), always with alphas_cumprod.

    For consecutive steps t -> p (p = -1 after the last one, abar_{-1} = 1):
        x0_hat  = model_fn(x_t, t)            (or from epsilon);   eps_hat = eps_from_x0(x_t, t, x0_hat)
        sigma   = eta · sqrt((1 - abar_p)/(1 - abar_t)) · sqrt(1 - abar_t/abar_p)
        x_p     = sqrt(abar_p)·x0_hat + sqrt(1 - abar_p - sigma²)·eps_hat + sigma·z
    The last step lands on x0_hat exactly, so num_steps = 1 is x0 = model_fn(x_T, T-1).
    eta = 0: deterministic given x_T; eta = 1: DDPM-like variance.  Returns (B, d).
    """
    x = _initial_noise(shape, generator, device, x_T)
    B = x.shape[0]
    ts = ddim_timesteps(s.T, num_steps)
    abar = s.alphas_cumprod
    for i, ti in enumerate(ts):
        t = torch.full((B,), ti, dtype=torch.long, device=x.device)
        x0_hat = _to_x0(s, model_fn(x, t), x, t, prediction_type)
        if i == len(ts) - 1:
            return x0_hat
        tp = ts[i + 1]
        a_t, a_p = float(abar[ti]), float(abar[tp])
        eps_hat = eps_from_x0(s, x, t, x0_hat)
        sigma = eta * math.sqrt((1 - a_p) / (1 - a_t)) * math.sqrt(1 - a_t / a_p)
        x = math.sqrt(a_p) * x0_hat + math.sqrt(max(1 - a_p - sigma**2, 0.0)) * eps_hat
        if sigma > 0:
            x = x + sigma * randn(x.shape, generator, x.device, x.dtype)
    return x  # unreachable: the loop returns at its last step


# ----------------------------------------------------------------------------------------------------
# embeddings and losses
# ----------------------------------------------------------------------------------------------------


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (DiT / ADM): [cos(t·f_k), sin(t·f_k)], f_k = max_period^(-k/half).

    t: (B,) (integer or fractional) -> (B, dim) float32; an odd dim gets a trailing zero column.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def preferdiff_loss(
    x0_hat_pos: Tensor, x0_pos: Tensor, x0_hat_neg: Tensor, x0_neg: Tensor, *, lam: float, scale: float
) -> Tensor:
    """PreferDiff (Liu et al., ICLR 2025): lam·L_simple + (1 - lam)·L_BPR-Diff, a scalar.

    S(a, b) = mean over the last dimension of (a - b)²: a per-sample squared distance on the same scale as
    L_simple = MSE (mean over dims and batch), as PreferDiff's `F.mse_loss` based model_diff.
        L_simple  = mean_b S(x0_hat_pos_b, x0_pos_b)
        L_BPR     = mean_b mean_k -log σ(-scale·[S(x0_hat_pos_b, x0_pos_b) - S(x0_hat_neg_bk, x0_neg_bk)])
                  = mean softplus(scale·[S_pos - S_neg])
    i.e. the positive must be denoised better than the negatives are.  Shapes: x0_hat_pos, x0_pos (B, d);
    negatives either (B, d) (one negative or the centroid of several: PreferDiff's "-C" variant, which
    averages the negatives' x0 before noising them) or (B, n_neg, d) (one BPR pair per negative).
    Differences from the PreferDiff code: the BPR term is per sample (the paper's expectation), not the
    log-sigmoid of batch-mean losses, and there is no +1e-8 inside the log-sigmoid.
    """
    s_pos = (x0_hat_pos - x0_pos).pow(2).mean(-1)  # (B,)
    s_neg = (x0_hat_neg - x0_neg).pow(2).mean(-1)  # (B,) or (B, n_neg)
    if s_neg.dim() == 2:
        diff = s_pos[:, None] - s_neg  # (B, n_neg)
    elif s_neg.dim() == 1:
        diff = s_pos - s_neg  # (B,)
    else:
        raise ValueError(f"negatives must be (B, d) or (B, n_neg, d), got {tuple(x0_neg.shape)}")
    bpr = F.softplus(scale * diff).mean()
    return lam * s_pos.mean() + (1.0 - lam) * bpr
