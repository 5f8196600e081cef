"""recpipe.models.diffusion against closed forms (docs/diffusion_api.md)."""

from __future__ import annotations

import math

import pytest
import torch

from recpipe.models import diffusion as D

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------
# schedules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", D.BETA_SCHEDULES)
def test_schedule_derived_quantities(kind):
    T = 50
    s = D.make_schedule(kind, T)
    b = s.betas.tolist()
    abar, prod = [], 1.0
    for beta in b:
        prod *= 1.0 - beta
        abar.append(prod)
    abar = torch.tensor(abar, dtype=F64)
    prev = torch.cat([torch.ones(1, dtype=F64), abar[:-1]])
    assert s.T == T and s.betas.dtype == F64 and s.betas.shape == (T,)
    torch.testing.assert_close(s.alphas, 1 - s.betas)
    torch.testing.assert_close(s.alphas_cumprod, abar, rtol=1e-12, atol=0)
    torch.testing.assert_close(s.alphas_cumprod_prev, prev, rtol=1e-12, atol=0)
    assert s.alphas_cumprod_prev[0] == 1.0
    torch.testing.assert_close(s.sqrt_alphas_cumprod**2, abar)
    torch.testing.assert_close(s.sqrt_one_minus_alphas_cumprod**2, 1 - abar)
    torch.testing.assert_close(s.posterior_variance, s.betas * (1 - prev) / (1 - abar))
    assert s.posterior_variance[0] == 0
    assert torch.isfinite(s.posterior_log_variance_clipped).all()
    torch.testing.assert_close(s.posterior_log_variance_clipped[1:], s.posterior_variance[1:].log())
    assert s.posterior_log_variance_clipped[0] == s.posterior_log_variance_clipped[1]
    # decreasing signal, every beta in (0, 1)
    assert (s.betas > 0).all() and (s.betas < 1).all()
    assert (s.alphas_cumprod[1:] < s.alphas_cumprod[:-1]).all()


def test_linear_first_last():
    b = D.make_betas("linear", 1000)
    assert b[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert b[-1].item() == pytest.approx(0.02, abs=1e-15)
    b = D.make_betas("linear", 10, beta_start=1e-3, beta_end=0.05)
    assert (b[0].item(), b[-1].item()) == pytest.approx((1e-3, 0.05))


def test_cosine_first_last():
    T, s = 100, 0.008

    def f(u):
        return math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2

    b = D.make_betas("cosine", T)
    assert b[0].item() == pytest.approx(1 - f(1) / f(0), rel=1e-12)
    assert b[-1].item() == pytest.approx(0.9999, abs=1e-15)  # 1 - f(T)/f(T-1) = 1, clipped
    assert b[50].item() == pytest.approx(1 - f(51) / f(50), rel=1e-12)


@pytest.mark.parametrize("T", [32, 500, 2000])
def test_exp_dreamrec_first_last(T):
    b = D.make_betas("exp", T)
    # DreamRec: x = linspace(1, 2T + 1, T); beta = 1 - exp(-0.1/T - x * 0.5 * (10 - 0.1) / T^2)
    first = 1 - math.exp(-0.1 / T - 1 * 0.5 * 9.9 / T**2)
    last = 1 - math.exp(-0.1 / T - (2 * T + 1) * 0.5 * 9.9 / T**2)
    mid_x = 1 + 7 * (2 * T) / (T - 1)
    assert b[0].item() == pytest.approx(first, rel=1e-10)
    assert b[-1].item() == pytest.approx(last, rel=1e-10)
    assert b[7].item() == pytest.approx(1 - math.exp(-0.1 / T - mid_x * 4.95 / T**2), rel=1e-10)


def test_trunc_lin_diffurec_first_last():
    b = D.make_betas("trunc_lin", 32)
    assert b[0].item() == pytest.approx(0.013125, abs=1e-12)  # (1000/32)·1e-4 + 0.01
    assert b[-1].item() == pytest.approx(0.635, abs=1e-12)  # (1000/32)·0.02 + 0.01
    assert round(b[0].item(), 4) == 0.0131
    b = D.make_betas("trunc_lin", 1000)
    assert (b[0].item(), b[-1].item()) == pytest.approx((0.0101, 0.03))
    with pytest.raises(ValueError):  # beta >= 1: undefined, refused rather than silently broken
        D.make_betas("trunc_lin", 16)


def test_linear_var_diffrec():
    T, ns, lo, hi = 40, 0.005, 0.005, 0.01
    s = D.make_schedule("linear_var", T, noise_scale=ns, noise_min=lo, noise_max=hi)
    var = torch.linspace(ns * lo, ns * hi, T, dtype=F64)
    assert s.betas[0].item() == pytest.approx(1e-5)  # DiffRec's beta_fixed
    # for t >= 1 the variance is linear: abar_t = (1 - beta_0) (1 - var_t) / (1 - var_0)
    expected = (1 - 1e-5) * (1 - var) / (1 - var[0])
    torch.testing.assert_close(s.alphas_cumprod[1:], expected[1:], rtol=1e-12, atol=0)
    s2 = D.make_schedule("linear_var", T, noise_scale=ns, noise_min=lo, noise_max=hi, beta_fixed=False)
    torch.testing.assert_close(s2.alphas_cumprod, 1 - var, rtol=1e-12, atol=0)


def test_schedule_errors_and_to():
    with pytest.raises(ValueError):
        D.make_betas("nope", 10)
    with pytest.raises(TypeError):
        D.make_betas("exp", 10, beta_start=0.1)
    s = D.make_schedule("linear", 10)
    s32 = s.to("cpu", torch.float32)
    assert s32.alphas_cumprod.dtype == torch.float32 and s.alphas_cumprod.dtype == F64
    assert s32.T == 10


# ------------------------------------------------------------------------------------------------
# forward process, conversions, posterior
# ------------------------------------------------------------------------------------------------


def test_extract_shapes():
    a = torch.arange(10, dtype=F64)
    t = torch.tensor([0, 3, 9])
    assert D.extract(a, t, (3, 5)).shape == (3, 1)
    assert D.extract(a, t, (3, 4, 5)).shape == (3, 1, 1)
    assert D.extract(a, t, (3, 5)).flatten().tolist() == [0.0, 3.0, 9.0]


def test_q_sample_statistics():
    s = D.make_schedule("linear", 1000)
    n, d = 200_000, 3
    x0 = torch.tensor([2.0, -1.0, 0.5]).expand(n, d)
    for step in (10, 300, 999):
        t = torch.full((n,), step, dtype=torch.long)
        noise = D.randn((n, d), gen(step))
        xt = D.q_sample(s, x0, t, noise)
        assert xt.dtype == torch.float32
        ab = s.alphas_cumprod[step].item()
        mean_err = (xt.mean(0) - math.sqrt(ab) * x0[0]).abs().max().item()
        assert mean_err < 5 * math.sqrt((1 - ab) / n) + 1e-6
        var = xt.var(0)
        assert ((var - (1 - ab)).abs() < 5 * (1 - ab) * math.sqrt(2 / n) + 1e-9).all()
        # and it is exactly the formula
        torch.testing.assert_close(xt, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise)


def test_eps_x0_roundtrip():
    s = D.make_schedule("cosine", 100)
    g = gen(1)
    x0, noise = D.randn((8, 5), g), D.randn((8, 5), g)
    t = D.sample_timesteps(8, 100, g)
    xt = D.q_sample(s, x0, t, noise)
    torch.testing.assert_close(D.eps_from_x0(s, xt, t, x0), noise, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(D.x0_from_eps(s, xt, t, noise), x0, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["linear", "exp", "trunc_lin"])
def test_q_posterior_is_bayes(kind):
    """q(x_{t-1}|x_t, x0) ∝ N(x_t; sqrt(alpha_t) x_{t-1}, beta_t) · N(x_{t-1}; sqrt(abar_{t-1}) x0, 1 - abar_{t-1})."""
    T = 32
    s = D.make_schedule(kind, T)
    g = gen(2)
    x0 = D.randn((T, 4), g).double()
    xt = D.randn((T, 4), g).double()
    t = torch.arange(T)
    mean, var, log_var = D.q_posterior(s, x0, xt, t)
    for i in range(1, T):
        a, b, abp = s.alphas[i].item(), s.betas[i].item(), s.alphas_cumprod[i - 1].item()
        prec = a / b + 1 / (1 - abp)  # product of the two Gaussians in x_{t-1}
        m = (math.sqrt(a) / b * xt[i] + math.sqrt(abp) / (1 - abp) * x0[i]) / prec
        torch.testing.assert_close(mean[i], m, rtol=1e-10, atol=1e-10)
        assert var[i].item() == pytest.approx(1 / prec, rel=1e-10)
        assert log_var[i].item() == pytest.approx(-math.log(prec), rel=1e-10)
    # t = 0: the previous state is x0 itself
    torch.testing.assert_close(mean[0], x0[0])
    assert var[0].item() == 0.0


def test_q_posterior_numeric_grid():
    """One case by brute-force Bayes on a 1-D grid (independent of any algebra)."""
    s = D.make_schedule("linear", 100)
    i, x0, xt = 40, 0.7, -0.3
    a, b, abp = s.alphas[i].item(), s.betas[i].item(), s.alphas_cumprod[i - 1].item()
    grid = torch.linspace(-6, 6, 200_001, dtype=F64)
    logp = -((xt - math.sqrt(a) * grid) ** 2) / (2 * b) - (grid - math.sqrt(abp) * x0) ** 2 / (2 * (1 - abp))
    p = torch.exp(logp - logp.max())
    p = p / p.sum()
    m_num = (p * grid).sum().item()
    v_num = (p * (grid - m_num) ** 2).sum().item()
    mean, var, _ = D.q_posterior(s, torch.tensor([[x0]], dtype=F64), torch.tensor([[xt]], dtype=F64), torch.tensor([i]))
    assert mean.item() == pytest.approx(m_num, abs=1e-6)
    assert var.item() == pytest.approx(v_num, rel=1e-4)


def test_cfg_combine():
    c, u = torch.tensor([1.0, 2.0]), torch.tensor([0.5, -1.0])
    torch.testing.assert_close(D.cfg_combine(c, u, 0.0), c)
    torch.testing.assert_close(D.cfg_combine(c, u, 2.0), torch.tensor([2.0, 8.0]))  # 3c - 2u
    torch.testing.assert_close(D.cfg_combine(c, u, -1.0), u)


# ------------------------------------------------------------------------------------------------
# samplers
# ------------------------------------------------------------------------------------------------


def test_ddim_timesteps():
    assert D.ddim_timesteps(1000, 1) == [999]
    assert D.ddim_timesteps(1000, 4) == [999, 749, 499, 249]
    assert D.ddim_timesteps(1000, 10) == list(range(999, 0, -100))
    assert D.ddim_timesteps(10, 10) == list(range(9, -1, -1))
    for T, k in [(1000, 3), (1000, 7), (32, 5), (2000, 20), (5, 4)]:
        ts = D.ddim_timesteps(T, k)
        assert len(ts) == k and ts[0] == T - 1 and ts[-1] >= 0
        assert all(a > b for a, b in zip(ts, ts[1:]))
        gaps = [a - b for a, b in zip(ts, ts[1:])]
        assert max(gaps) - min(gaps) <= 1
    for bad in (0, 11):
        with pytest.raises(ValueError):
            D.ddim_timesteps(10, bad)


def _point_oracle(s, x0, prediction_type, calls=None):
    def fn(x_t, t):
        if calls is not None:
            calls.append(t.clone())
        if prediction_type == "x0":
            return x0
        return D.eps_from_x0(s, x_t, t, x0)  # the exact noise for this x_t

    return fn


@pytest.mark.parametrize("prediction_type", ["x0", "epsilon"])
@pytest.mark.parametrize("k", [1, 2, 5, 50])
def test_ddim_perfect_oracle_recovers_x0(prediction_type, k):
    s = D.make_schedule("linear", 1000)
    x0 = D.randn((6, 7), gen(3)) * 3
    calls = []
    out = D.ddim_sample(
        _point_oracle(s, x0, prediction_type, calls), s, x0.shape, k, prediction_type=prediction_type, generator=gen(4)
    )
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    assert [int(c[0]) for c in calls] == D.ddim_timesteps(1000, k)


def test_ddim_one_step_is_model_at_T_minus_1():
    s = D.make_schedule("exp", 500)
    xT = D.randn((4, 3), gen(5))
    seen = {}

    def fn(x_t, t):
        seen["x"], seen["t"] = x_t, t
        return 2 * x_t + 1

    out = D.ddim_sample(fn, s, (4, 3), 1, x_T=xT)
    assert torch.equal(seen["x"], xT) and (seen["t"] == 499).all()
    torch.testing.assert_close(out, 2 * xT + 1)


def _gaussian_oracle(s, mu, sd):
    """E[x0 | x_t] for data x0 ~ N(mu, sd²): the exact x0 denoiser."""

    def fn(x_t, t):
        ab = D.extract(s.alphas_cumprod, t, x_t.shape).to(x_t.dtype)
        gain = ab.sqrt() * sd**2 / (ab * sd**2 + 1 - ab)
        return mu + gain * (x_t - ab.sqrt() * mu)

    return fn


def test_ddim_gaussian_data_distribution():
    """With the exact denoiser of Gaussian data N(mu, sd²), deterministic DDIM is an affine map
    x_T -> a·x_T + b, so its output law N(b, a²) is read exactly from x_T = 0 and x_T = 1. Over all T steps
    it is the data law; fewer steps converge to it monotonically (few-step DDIM shrinks the spread).
    A sampler that used alphas where alphas_cumprod belong (PreferDiff's ddim_sample) fails this."""
    s = D.make_schedule("linear", 1000)
    mu, sd = 1.5, 0.4
    xT = torch.tensor([[0.0], [1.0]], dtype=F64)
    stds = []
    for k in (5, 20, 100, 1000):
        out = D.ddim_sample(_gaussian_oracle(s, mu, sd), s, (2, 1), k, x_T=xT)
        assert out[0].item() == pytest.approx(mu, abs=0.01)
        stds.append((out[1] - out[0]).item())
    assert stds == sorted(stds)
    assert stds[-1] == pytest.approx(sd, rel=0.005)
    assert stds[-2] == pytest.approx(sd, rel=0.05)


def test_ddim_eta1_all_steps_is_ddpm():
    """DDIM with eta = 1 over every step is ancestral sampling: same noise stream, same result."""
    s = D.make_schedule("linear", 100, beta_end=0.1)
    fn = _gaussian_oracle(s, 0.3, 0.7)
    xT = D.randn((64, 3), gen(15))
    a = D.ddim_sample(fn, s, (64, 3), 100, eta=1.0, x_T=xT, generator=gen(16))
    b = D.ddpm_sample(fn, s, (64, 3), x_T=xT, generator=gen(16))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ddpm_gaussian_data_distribution():
    """Ancestral sampling with the exact denoiser reaches the data law (up to the slight under-dispersion
    of the posterior-variance choice: about 1% at T = 1000)."""
    s = D.make_schedule("linear", 1000)
    mu, sd, n = -0.5, 0.6, 10_000
    out = D.ddpm_sample(_gaussian_oracle(s, mu, sd), s, (n, 1), generator=gen(8))
    assert out.mean().item() == pytest.approx(mu, abs=0.03)
    assert out.std().item() == pytest.approx(sd, rel=0.03)


@pytest.mark.parametrize("prediction_type", ["x0", "epsilon"])
def test_ddpm_perfect_oracle_ends_at_x0(prediction_type):
    s = D.make_schedule("cosine", 50)
    x0 = D.randn((5, 4), gen(9))
    calls = []
    out = D.ddpm_sample(
        _point_oracle(s, x0, prediction_type, calls), s, x0.shape, prediction_type=prediction_type, generator=gen(10)
    )
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    assert [int(c[0]) for c in calls] == list(range(49, -1, -1))


def test_samplers_determinism_under_generator():
    s = D.make_schedule("linear", 100)

    def fn(x_t, t):
        return 0.5 * x_t

    a = D.ddpm_sample(fn, s, (3, 4), generator=gen(11))
    b = D.ddpm_sample(fn, s, (3, 4), generator=gen(11))
    c = D.ddpm_sample(fn, s, (3, 4), generator=gen(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    a = D.ddim_sample(fn, s, (3, 4), 10, eta=0.5, generator=gen(11))
    b = D.ddim_sample(fn, s, (3, 4), 10, eta=0.5, generator=gen(11))
    c = D.ddim_sample(fn, s, (3, 4), 10, eta=0.5, generator=gen(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # eta = 0 depends on the generator only through x_T
    xT = D.randn((3, 4), gen(13))
    a = D.ddim_sample(fn, s, (3, 4), 10, x_T=xT, generator=gen(1))
    b = D.ddim_sample(fn, s, (3, 4), 10, x_T=xT, generator=gen(2))
    assert torch.equal(a, b)
    t1, t2 = D.sample_timesteps(1000, 7, gen(14)), D.sample_timesteps(1000, 7, gen(14))
    assert torch.equal(t1, t2) and t1.dtype == torch.long and t1.min() == 0 and t1.max() == 6


def test_timestep_embedding():
    t = torch.tensor([0, 1, 500])
    e = D.timestep_embedding(t, 8)
    assert e.shape == (3, 8)
    torch.testing.assert_close(e[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    freqs = [10000 ** (-k / 4) for k in range(4)]
    torch.testing.assert_close(e[2, :4], torch.tensor([math.cos(500 * f) for f in freqs]))
    torch.testing.assert_close(e[2, 4:], torch.tensor([math.sin(500 * f) for f in freqs]))
    e = D.timestep_embedding(t, 7)
    assert e.shape == (3, 7) and (e[:, -1] == 0).all()


# ------------------------------------------------------------------------------------------------
# PreferDiff loss
# ------------------------------------------------------------------------------------------------


def test_preferdiff_loss_hand_computed():
    # B = 1, d = 2
    hat_pos, pos = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])  # S_pos = (1 + 0)/2 = 0.5
    hat_neg, neg = torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, 0.0]])  # S_neg = (0 + 4)/2 = 2
    # lam·0.5 + (1 - lam)·softplus(scale·(0.5 - 2))
    for lam, scale in [(1.0, 1.0), (0.0, 1.0), (0.5, 2.0), (0.4, 0.0)]:
        want = lam * 0.5 + (1 - lam) * math.log1p(math.exp(scale * -1.5))
        got = D.preferdiff_loss(hat_pos, pos, hat_neg, neg, lam=lam, scale=scale)
        assert got.item() == pytest.approx(want, rel=1e-6)
    # lam = 0, scale = 0: log 2 whatever the inputs
    assert D.preferdiff_loss(hat_pos, pos, hat_neg, neg, lam=0.0, scale=0.0).item() == pytest.approx(math.log(2))


def test_preferdiff_loss_batch_and_negatives():
    # B = 2, d = 1; n_neg = 2 for the 3-D form
    hat_pos = torch.tensor([[1.0], [0.0]])
    pos = torch.tensor([[0.0], [0.0]])  # S_pos = [1, 0]
    hat_neg = torch.tensor([[[0.0], [3.0]], [[1.0], [2.0]]])
    neg = torch.zeros(2, 2, 1)  # S_neg = [[0, 9], [1, 4]]
    sp = lambda x: math.log1p(math.exp(x))  # noqa: E731
    bpr = (sp(1 - 0) + sp(1 - 9) + sp(0 - 1) + sp(0 - 4)) / 4
    got = D.preferdiff_loss(hat_pos, pos, hat_neg, neg, lam=0.3, scale=1.0)
    assert got.item() == pytest.approx(0.3 * 0.5 + 0.7 * bpr, rel=1e-6)
    # 2-D negatives (e.g. a centroid): one pair per sample
    got = D.preferdiff_loss(hat_pos, pos, hat_neg[:, 1], neg[:, 1], lam=0.3, scale=2.0)
    assert got.item() == pytest.approx(0.3 * 0.5 + 0.7 * (sp(2 * (1 - 9)) + sp(2 * (0 - 4))) / 2, rel=1e-6)
    # lam = 1 is plain MSE
    assert D.preferdiff_loss(hat_pos, pos, hat_neg, neg, lam=1.0, scale=5.0).item() == pytest.approx(
        torch.nn.functional.mse_loss(hat_pos, pos).item()
    )


def test_sample_timesteps_from_a_sampler_grid():
    grid = D.ddim_timesteps(100, 4)  # [99, 74, 49, 24]
    t = D.sample_timesteps(4000, 100, gen(2), choices=grid)
    assert set(t.tolist()) == set(grid)
    counts = torch.bincount(t, minlength=100)[grid].double()
    assert ((counts - 1000).abs() < 5 * 1000**0.5).all(), counts  # uniform over the grid, within 5 sigma
    assert D.sample_timesteps(10, 100, gen(2), choices=[99]).eq(99).all()
    for bad in ([], [100], [-1, 5]):
        with pytest.raises(ValueError, match="timestep choices"):
            D.sample_timesteps(3, 100, gen(0), choices=bad)
