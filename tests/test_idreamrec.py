"""iDreamRec (recpipe.models.idreamrec) and its DiT denoiser (recpipe.models.dit)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from safetensors.torch import load_file, save_file

from recpipe.models import diffusion as D
from recpipe.models.base import build_model, get_model_config_cls
from recpipe.models.dit import DiT
from recpipe.models.idreamrec import IDreamRec, IDreamRecConfig

pytestmark = pytest.mark.usefixtures("one_thread")


N_ITEMS, DIM = 40, 12
SMALL = dict(width=32, depth=2, heads=4, history_len=6, T=100, dropout=0.0, layout="full")  # causal: test_causal.py


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def whitened(n_items: int, d: int, seed: int = 0) -> torch.Tensor:
    """(n_items + 1, d): rows 1.. exactly whitened (zero mean, identity covariance), row 0 = zeros."""
    x = torch.randn(n_items, d, generator=gen(seed), dtype=torch.float64)
    x = x - x.mean(0)
    evals, evecs = torch.linalg.eigh(x.T @ x / (n_items - 1))
    x = x @ evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    return torch.cat([torch.zeros(1, d, dtype=torch.float64), x]).float()


def make(seed: int = 0, vectors: torch.Tensor | None = None, **kw) -> IDreamRec:
    torch.manual_seed(seed)
    cfg = IDreamRecConfig(**{**SMALL, **kw})
    vec = whitened(N_ITEMS, DIM) if vectors is None else vectors
    return build_model("idreamrec", cfg, n_items=vec.shape[0] - 1, item_vectors=vec)


def histories(B: int, width: int, n_items: int = N_ITEMS, seed: int = 0, min_len: int = 0) -> torch.Tensor:
    """(B, width) left-padded random histories of random lengths in [min_len, width]."""
    g = gen(seed)
    lens = torch.randint(min_len, width + 1, (B,), generator=g)
    h = torch.randint(1, n_items + 1, (B, width), generator=g)
    h[torch.arange(width)[None] < (width - lens[:, None])] = 0
    return h


def batch(B: int = 16, width: int = 6, seed: int = 0, intent: bool = False) -> dict[str, torch.Tensor]:
    b = {
        "history": histories(B, width, seed=seed),
        "target": torch.randint(1, N_ITEMS + 1, (B,), generator=gen(seed + 100)),
    }
    if intent:
        b["intent"] = torch.randn(B, DIM, generator=gen(seed + 200))
        b["intent_mask"] = torch.arange(B) % 2 == 0
    return b


# ------------------------------------------------------------------------------------------------
# registry, config, shapes
# ------------------------------------------------------------------------------------------------


def test_registered_and_config_defaults_documented():
    assert get_model_config_cls("idreamrec") is IDreamRecConfig
    m = build_model("idreamrec", {"width": 32, "depth": 1, "heads": 2}, N_ITEMS, whitened(N_ITEMS, DIM))
    assert isinstance(m, IDreamRec) and m.generative and m.train_mode == "window"  # the causal layout
    full = build_model("idreamrec", {"width": 32, "depth": 1, "heads": 2, "layout": "full"}, N_ITEMS,
                       whitened(N_ITEMS, DIM))
    assert full.train_mode == "position" and isinstance(full.dit, DiT)
    assert m.uses_text and m.uses_intent
    assert m.history_len == IDreamRecConfig().history_len == 20
    with pytest.raises(KeyError):
        build_model("idreamrec", {"nope": 1}, N_ITEMS, whitened(N_ITEMS, DIM))
    with pytest.raises(ValueError):
        build_model("idreamrec", {}, N_ITEMS, None)
    with pytest.raises(ValueError):
        IDreamRecConfig(loss="bpr")
    # nanoGPT style: every default carries a one-line reason
    lines = inspect.getsource(IDreamRecConfig).splitlines()
    for f in dataclasses.fields(IDreamRecConfig):
        line = next(x for x in lines if x.strip().startswith(f"{f.name}:"))
        assert "#" in line, f"default of {f.name} has no comment"


def test_lam_default_follows_the_loss_and_is_recorded_as_a_number():
    from recpipe.config import load_config

    # unset: each loss's own default (CE with the residual 0.1, measured better on ML-1M; else 0.5); the MSE
    # config keeps 0.5, so its fingerprint is the one it had before lam depended on the loss
    assert IDreamRecConfig().lam == 0.5
    assert IDreamRecConfig(loss="preferdiff").lam == 0.5
    assert IDreamRecConfig(loss="ce", item_residual=True).lam == 0.1
    assert IDreamRecConfig(loss="ce").lam == 0.5  # frozen vectors: the MSE half keeps x0 in the text space
    assert IDreamRecConfig(loss="ce", item_residual=True, lam=0.5).lam == 0.5  # an explicit value always wins
    # through the CLI's --set: the model config (what checkpoints and fingerprints record) holds the number
    res = {"model.idreamrec.loss": "ce", "model.idreamrec.item_residual": "true"}
    for sets, want in ((res, 0.1), ({"model.idreamrec.loss": "ce"}, 0.5),
                       ({"model.idreamrec.loss": "preferdiff", "model.idreamrec.item_residual": "true"}, 0.5),
                       ({**res, "model.idreamrec.lam": "0.3"}, 0.3), ({**res, "model.idreamrec.lam": "none"}, 0.1)):
        mcfg = load_config(None, sets).model_config("idreamrec")
        assert dataclasses.asdict(mcfg)["lam"] == want, sets
    assert dataclasses.asdict(load_config(None, {}).model_config("idreamrec")) == dataclasses.asdict(
        IDreamRecConfig(lam=0.5))
    with pytest.raises(ValueError, match="lam"):
        IDreamRecConfig(loss="ce", lam=1.5)


@pytest.mark.parametrize("adaln_zero", [False, True])
def test_shapes_and_finite(adaln_zero):
    m = make(adaln_zero=adaln_zero)
    b = batch(intent=True)
    m.train()
    loss = m.loss(b, gen(1))
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    x = m.generate(b, generator=gen(2))
    assert x.shape == (16, DIM) and torch.isfinite(x).all()
    s = m.score_all(b, generator=gen(2))
    assert s.shape == (16, N_ITEMS + 1)
    assert torch.isneginf(s[:, 0]).all() and torch.isfinite(s[:, 1:]).all()
    torch.testing.assert_close(s[:, 1:], x @ m.item_vectors[1:].T)
    for steps in (1, 3):
        assert m.score_all(b, steps=steps, w=2.0, rho=0.5, generator=gen(2)).shape == (16, N_ITEMS + 1)


def test_fully_padded_histories_no_nan():
    m = make(p_uncond=0.5)
    b = {"history": torch.zeros(8, 6, dtype=torch.long), "target": torch.arange(1, 9)}
    b["intent"] = torch.full((8, DIM), float("nan"))  # absent intentions are never read
    b["intent_mask"] = torch.zeros(8, dtype=torch.bool)
    m.train()
    for loss_kind in ("mse", "preferdiff", "ce"):
        m.config.loss = loss_kind
        loss = m.loss(b, gen(0))
        assert torch.isfinite(loss)
        loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    s = m.score_all(b, generator=gen(0))
    assert torch.isfinite(s[:, 1:]).all()
    # an empty history IS the null history: equal to the unconditional branch
    u = m.generate(b, w=0.0, rho=0.0, generator=gen(3))
    c = m.generate(b, w=1.0, rho=0.0, generator=gen(3))
    torch.testing.assert_close(u, c, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# padding and leakage
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("adaln_zero", [False, True])
def test_padding_never_affects_outputs(adaln_zero):
    m = make(adaln_zero=adaln_zero)
    _perturb(m)  # leave the zero-initialised output layers, so outputs depend on everything
    m.eval()
    real = histories(10, 5, seed=1)  # at most 5 real items, history_len = 6
    outs = []
    for width in (5, 6, 9, 30):  # amount of left padding changes, and the input can be wider than L
        h = torch.cat([torch.zeros(10, width - 5, dtype=torch.long), real], dim=1)
        outs.append(m.generate({"history": h}, generator=gen(4)))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)
    # the vector stored at padding row 0 is never read
    m2 = make(adaln_zero=adaln_zero)
    m2.load_state_dict(m.state_dict())
    m2.item_vectors[0] = 100 * torch.randn(DIM)
    m2.eval()
    torch.testing.assert_close(m2.generate({"history": real}, generator=gen(4)), outs[0], rtol=1e-5, atol=1e-5)
    # ... also not in training
    m.train(), m2.train()
    b = {"history": real, "target": torch.arange(1, 11)}
    torch.testing.assert_close(m.loss(b, gen(5)), m2.loss(b, gen(5)))


@pytest.mark.parametrize("adaln_zero", [False, True])
def test_padding_tokens_are_as_if_absent(adaln_zero):
    """A left-padded history of k real items gives exactly what a DiT with only k history slots (the same
    weights, positions counted from the most recent item) gives on the k items alone."""
    torch.manual_seed(0)
    L, B = 6, 6
    dit = DiT(dim=DIM, max_len=L, width=32, depth=2, heads=4, dropout=0.0, adaln_zero=adaln_zero).eval()
    _perturb(dit)
    x_t, t = torch.randn(B, DIM), torch.randint(0, 1000, (B,))
    intent = torch.randn(B, DIM)
    ks = [1, 3, 5, 2, 4, 5]  # real items per row: every row but the longest ones has masked padding
    hist = torch.randn(B, L, DIM)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for i, k in enumerate(ks):
        hist[i, : L - k] = float("nan")  # padding values are never read
        mask[i, L - k :] = True
    out = dit(x_t, t, hist, mask, intent)
    assert torch.isfinite(out).all()
    for i, k in enumerate(ks):
        short = DiT(dim=DIM, max_len=k, width=32, depth=2, heads=4, dropout=0.0, adaln_zero=adaln_zero).eval()
        sd = dit.state_dict()
        sd["pos_emb"] = sd["pos_emb"][:k]
        short.load_state_dict(sd)
        r = slice(i, i + 1)
        ref = short(x_t[r], t[r], hist[r, L - k :], mask[r, L - k :], intent[r])
        torch.testing.assert_close(out[r], ref, rtol=1e-5, atol=1e-5)


def test_history_len_truncates_to_most_recent():
    m = make()
    _perturb(m)
    m.eval()
    h = histories(6, 12, seed=3, min_len=12)
    out = m.generate({"history": h}, generator=gen(1))
    torch.testing.assert_close(m.generate({"history": h[:, -6:]}, generator=gen(1)), out)
    h2 = h.clone()
    h2[:, :6] = torch.randint(1, N_ITEMS + 1, (6, 6))  # older than history_len: never read
    torch.testing.assert_close(m.generate({"history": h2}, generator=gen(1)), out)
    h3 = h.clone()
    h3[:, -1] = h3[:, -1] % N_ITEMS + 1  # the most recent item is read
    assert not torch.allclose(m.generate({"history": h3}, generator=gen(1)), out)


def test_no_leak_of_target_or_other_rows():
    m = make()
    _perturb(m)
    m.eval()
    b = batch(12, seed=7, intent=True)
    s = m.score_all(b, generator=gen(1))
    # the target is never read when scoring
    other_target = dict(b, target=torch.randint(1, N_ITEMS + 1, (12,)))
    no_target = {k: v for k, v in b.items() if k != "target"}
    torch.testing.assert_close(m.score_all(other_target, generator=gen(1)), s)
    torch.testing.assert_close(m.score_all(no_target, generator=gen(1)), s)
    # the oracle of a user depends only on the vectors of items in its history (not its target's)
    row = 0
    outside = sorted(set(range(1, N_ITEMS + 1)) - set(b["history"][row].tolist()))
    m2 = make()
    m2.load_state_dict(m.state_dict())
    m2.item_vectors[outside] += torch.randn(len(outside), DIM)
    m2.eval()
    x1 = m.generate(b, generator=gen(1))[row]
    torch.testing.assert_close(m2.generate(b, generator=gen(1))[row], x1)
    # each row of a batch is computed independently of the others
    x_t, t = torch.randn(12, DIM, generator=gen(2)), torch.randint(0, 100, (12,), generator=gen(3))
    hist = m._history(b["history"])
    keep = torch.tensor([True, False] * 6)
    full = m.denoise(x_t, t, hist, keep, b["intent"], b["intent_mask"])
    for i in range(12):
        sl = slice(i, i + 1)
        one = m.denoise(x_t[sl], t[sl], hist[sl], keep[sl], b["intent"][sl], b["intent_mask"][sl])
        torch.testing.assert_close(one, full[sl], rtol=1e-5, atol=1e-5)


def test_dit_last_block_shortcut_is_exact():
    torch.manual_seed(0)
    for adaln in (False, True):
        dit = DiT(dim=DIM, max_len=5, width=32, depth=3, heads=4, dropout=0.0, adaln_zero=adaln).eval()
        _perturb(dit)
        B = 7
        x_t, t = torch.randn(B, DIM), torch.randint(0, 1000, (B,))
        hist, mask = torch.randn(B, 5, DIM), histories(B, 5, seed=2) > 0
        intent, imask = torch.randn(B, DIM), torch.rand(B) > 0.5
        out = dit(x_t, t, hist, mask, intent, imask)
        # reference: every block over every token, then read the last token
        calls = []
        orig = type(dit.blocks[0]).forward

        def full_forward(self, x, attn_mask, c=None, query=None, calls=calls, orig=orig):
            calls.append(query is not None)
            return orig(self, x, attn_mask, c, query=None)

        type(dit.blocks[0]).forward = full_forward
        try:
            ref = dit(x_t, t, hist, mask, intent, imask)
        finally:
            type(dit.blocks[0]).forward = orig
        assert calls == [False, False, True]
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _sgd_steps(m: IDreamRec, steps: int = 3) -> IDreamRec:
    """A few plain SGD steps (lr 1) on random batches, in train mode; returns the model."""
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    for i in range(steps):
        opt.zero_grad()
        m.loss(batch(16, seed=i), gen(i)).backward()
        opt.step()
    return m


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Randomise every parameter (zero-initialised layers would hide dependencies)."""
    g = gen(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "item_residual" in name:
                continue
            p.add_(0.2 * torch.randn(p.shape, generator=g))


# ------------------------------------------------------------------------------------------------
# guidance
# ------------------------------------------------------------------------------------------------


def test_guidance_branches():
    m = make()
    _perturb(m)
    m.eval()
    b = batch(10, seed=5, intent=True)
    hist = m._history(b["history"])
    x_t, t = torch.randn(10, DIM, generator=gen(1)), torch.full((10,), 99)
    keep_all, drop_all = torch.ones(10, dtype=torch.bool), torch.zeros(10, dtype=torch.bool)
    f_uu = m.denoise(x_t, t, hist, drop_all, None, None)
    f_hu = m.denoise(x_t, t, hist, keep_all, None, None)
    f_hi = m.denoise(x_t, t, hist, keep_all, b["intent"], b["intent_mask"])
    present = b["intent_mask"][:, None]
    assert not torch.allclose(f_uu, f_hu) and not torch.allclose(f_hu[present[:, 0]], f_hi[present[:, 0]])
    torch.testing.assert_close(f_hi[~present[:, 0]], f_hu[~present[:, 0]])  # no intention = null intention
    for w, rho in [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (3.0, 1.0), (2.5, 0.7), (0.0, 2.0)]:
        got = m.guided_x0(x_t, t, hist, b["intent"], b["intent_mask"], w, rho)
        want = f_uu + w * (f_hu - f_uu) + rho * torch.where(present, f_hi - f_hu, torch.zeros(()))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # without intentions: DreamRec's (1 + w')·f(h) − w'·f(∅) with w' = w − 1, whatever rho
    got = m.guided_x0(x_t, t, hist, None, None, 3.0, 5.0)
    torch.testing.assert_close(got, D.cfg_combine(f_hu, f_uu, 2.0), rtol=1e-4, atol=1e-5)
    # f(∅, ∅) reads the learned null-history token; f(h, ∅) does not (every row has a real item)
    with torch.no_grad():
        m.dit.null_hist.add_(1.0)
    assert not torch.allclose(m.denoise(x_t, t, hist, drop_all, None, None), f_uu)
    nonempty = (hist > 0).any(1)
    torch.testing.assert_close(m.denoise(x_t, t, hist, keep_all, None, None)[nonempty], f_hu[nonempty])
    with torch.no_grad():
        m.dit.null_hist.sub_(1.0)
    # end to end: w = 0, rho = 0 is the unconditional model, i.e. the same users with empty histories
    empty = {"history": torch.zeros_like(b["history"])}
    torch.testing.assert_close(
        m.generate(b, w=0.0, rho=0.0, generator=gen(9)),
        m.generate(empty, w=1.0, rho=0.0, generator=gen(9)),
        rtol=1e-5,
        atol=1e-6,
    )
    assert not torch.allclose(m.generate(b, w=0.0, rho=0.0, generator=gen(9)), m.generate(b, generator=gen(9)))


def test_branches_batched_per_step():
    """Per sampling step: one forward for the conditional branches, one (short) for the unconditional."""
    m = make()
    _perturb(m)
    m.eval()
    calls = []
    orig = m.dit.forward
    m.dit.forward = lambda *a, **k: calls.append((a[0].shape[0], bool(a[3].any(1).all()))) or orig(*a, **k)
    b = batch(10, intent=True)  # 5 rows with an intention
    b["history"][:, -1] = 1  # every row has a real item
    full = m.generate(b, generator=gen(0))  # defaults w = 3, rho = 1: all three branches
    assert calls == [(10 + 5, True), (10, False)]
    calls.clear()
    m.generate(b, steps=4, w=1.0, rho=0.0, generator=gen(0))  # only f(h, ∅), 4 steps
    assert calls == [(10, True)] * 4
    calls.clear()
    m.sample_chunk = 4  # chunked forwards give the same result, up to float32 GEMM blocking (which follows the
    # batch size: 2e-6 apart on AVX512 cores after guidance's w = 3 amplification, measured); a wrong row is O(1) off
    torch.testing.assert_close(m.generate(b, generator=gen(0)), full, rtol=1e-4, atol=1e-5)
    assert [n for n, _ in calls] == [4, 4, 4, 3, 4, 4, 2]


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


def test_loss_deterministic_under_generator_and_preferdiff_negatives():
    m = make()
    _perturb(m)  # at init the output is 0 whatever the noise
    m.eval()  # no dropout: the generator is the only source of randomness
    b = batch(16, intent=True)
    assert m.loss(b, gen(3)).item() == m.loss(b, gen(3)).item()
    assert m.loss(b, gen(3)).item() != m.loss(b, gen(4)).item()
    m = make(loss="preferdiff", n_neg=5)
    m.eval()
    seen = []
    orig = m.item_vecs
    m.item_vecs = lambda ids: seen.append(ids) or orig(ids)
    b = {"history": histories(64, 6), "target": torch.randint(1, N_ITEMS + 1, (64,))}
    loss = m.loss(b, gen(0))
    assert torch.isfinite(loss)
    negs = [ids for ids in seen if ids.shape == (64, 5)]
    assert len(negs) == 1
    neg = negs[0]
    assert (neg >= 1).all() and (neg <= N_ITEMS).all() and (neg != b["target"][:, None]).all()
    assert len(neg.unique()) > N_ITEMS // 2


@pytest.mark.parametrize("layout", ["full", "causal"])
def test_ce_loss_is_lam_mse_plus_cross_entropy_over_real_items(layout):
    """loss="ce": lam·MSE + (1 − lam)·CE of x0_hat·item_table()ᵀ/√d against the target, padding never a
    class; lam = 1 is exactly the MSE loss under the same draws."""
    import torch.nn.functional as F

    kw = dict(layout=layout, window=4) if layout == "causal" else {}
    if layout == "causal":
        win = histories(12, 10, seed=5, min_len=10)
        tgt = win[:, -4:].clone()
        tgt[0, :2] = 0  # not targets: out of both terms
        b = {"window": win, "target": tgt}
        sel = tgt != 0
    else:
        b = batch(12)
        sel = torch.ones(12, dtype=torch.bool)
    mse_m = make(**kw)
    _perturb(mse_m)
    mse_m.eval()
    for lam in (1.0, 0.3):
        m = make(loss="ce", lam=lam, item_residual=True, **kw)
        m.load_state_dict(mse_m.state_dict(), strict=False)
        with torch.no_grad():
            m.item_residual.weight[1:] += torch.randn(N_ITEMS, DIM, generator=gen(9))
        m.eval()
        outs: list[torch.Tensor] = []
        hook = m.dit.register_forward_hook(lambda mod, args, out, outs=outs: outs.append(out))
        got = m.loss(b, gen(2))
        hook.remove()
        x0_hat = outs[0][sel]
        target = b["target"][sel]
        table = m.item_vectors + m.item_residual.weight
        mse = ((x0_hat - table[target]) ** 2).mean()
        ce = F.cross_entropy(x0_hat @ table[1:].T / DIM**0.5, target - 1)
        torch.testing.assert_close(got, lam * mse + (1 - lam) * ce)
        if lam == 1.0:
            m_off = make(item_residual=True, **kw)
            m_off.load_state_dict(m.state_dict())
            m_off.eval()
            torch.testing.assert_close(m_off.loss(b, gen(2)), got)


def test_ce_loss_trains_the_item_residual_from_the_targets():
    """With every history dropped, the residual is reached only through the targets: MSE stops that
    gradient (its targets would collapse), CE uses it, and padding's row stays zero."""
    for loss, moves in (("mse", False), ("ce", True)):
        m = make(loss=loss, item_residual=True, p_uncond=1.0)
        _perturb(m)
        W = _sgd_steps(m).item_residual.weight
        assert (W[0] == 0).all()
        assert bool(W[1:].abs().sum() > 0) is moves, loss


def test_sampled_ce_trains_only_targets_and_drawn_training_items():
    """ce_negatives: the CE reaches the residual rows of the targets and of the negatives drawn, and under the
    cold-item protocol (observe_training) never the rows of items without training data."""
    m = make(loss="ce", item_residual=True, ce_negatives=6, p_uncond=1.0)
    _perturb(m)  # a zero-initialised output would give the table no gradient at all
    counts = torch.ones(N_ITEMS + 1)
    counts[0] = 0
    counts[N_ITEMS - 9:] = 0  # the last 10 items never occur in training
    m.observe_training(counts)
    b = {"history": histories(16, 6), "target": torch.randint(1, N_ITEMS - 9, (16,), generator=gen(4))}
    m.loss(b, gen(1)).backward()
    rows = set((m.item_residual.weight.grad.abs().sum(1) > 0).nonzero().squeeze(1).tolist())
    extra = rows - set(b["target"].tolist())
    assert extra and len(extra) <= 6 and max(extra) <= N_ITEMS - 10, rows
    assert torch.isfinite(m.loss(b, gen(1))) and m.loss(b, gen(1)) != m.loss(b, gen(2))


def test_p_uncond_drops_history():
    """p_uncond = 1: every training sample is unconditional, so the history cannot change the loss."""
    m = make(p_uncond=1.0)
    _perturb(m)
    m.eval()
    b = batch(16)
    b2 = dict(b, history=histories(16, 6, seed=99))
    torch.testing.assert_close(m.loss(b, gen(0)), m.loss(b2, gen(0)))
    # ... nor the intention: a dropped history makes the sample fully unconditional
    bi = batch(16, intent=True)
    bi2 = dict(bi, intent=torch.randn(16, DIM))
    torch.testing.assert_close(m.loss(bi, gen(0)), m.loss(bi2, gen(0)))
    m0 = make(p_uncond=0.0, p_intent_drop=0.0)
    m0.load_state_dict(m.state_dict())
    m0.eval()
    assert m0.loss(b, gen(0)).item() != m0.loss(b2, gen(0)).item()
    assert m0.loss(bi, gen(0)).item() != m0.loss(bi2, gen(0)).item()


def test_overfits_next_item_rule():
    """30 items, random whitened vectors, next item = perm[last item]: after 200 AdamW steps the
    one-step oracle ranks the true next item first for most users."""
    n, d, L = 30, 16, 8
    vec = whitened(n, d, seed=1)
    perm = torch.randperm(n, generator=gen(2)) + 1
    torch.manual_seed(0)
    cfg = IDreamRecConfig(width=64, depth=2, heads=4, history_len=L, T=1000, dropout=0.0, layout="full")
    m = build_model("idreamrec", cfg, n_items=n, item_vectors=vec)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = gen(3)
    m.train()
    first = last = None
    for step in range(200):
        h = histories(128, L, n_items=n, seed=1000 + step, min_len=1)
        loss = m.loss({"history": h, "target": perm[h[:, -1] - 1]}, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    assert last < 0.5 * first
    m.eval()
    h = histories(300, L, n_items=n, seed=7, min_len=1)
    s = m.score_all({"history": h}, generator=gen(4))
    acc = (s.argmax(1) == perm[h[:, -1] - 1]).float().mean().item()
    assert acc > 0.8, acc
    # the denoiser under bf16 autocast: float32 scores, the same top item for nearly every user
    s16 = m.score_all({"history": h}, generator=gen(4), dtype=torch.bfloat16)
    assert s16.dtype == torch.float32 and not torch.equal(s16, s)
    assert (s16.argmax(1) == s.argmax(1)).float().mean().item() > 0.95
    # the unconditional model knows nothing of the history: near chance
    s0 = m.score_all({"history": h}, w=0.0, rho=0.0, generator=gen(4))
    assert (s0.argmax(1) == perm[h[:, -1] - 1]).float().mean().item() < 0.3


# ------------------------------------------------------------------------------------------------
# checkpoints and the item residual
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("item_residual", [False, True])
def test_safetensors_round_trip(tmp_path, item_residual):
    m = make(item_residual=item_residual)
    _perturb(m)
    if item_residual:
        with torch.no_grad():
            m.item_residual.weight[1:] += torch.randn(N_ITEMS, DIM)
    m.eval()
    b = batch(9, intent=True)
    s = m.score_all(b, generator=gen(1))
    save_file(m.state_dict(), tmp_path / "m.safetensors")
    m2 = make(seed=123, item_residual=item_residual)
    m2.load_state_dict(load_file(tmp_path / "m.safetensors"))
    m2.eval()
    assert torch.equal(m2.score_all(b, generator=gen(1)), s)


def test_item_residual():
    off, on = make(), make(item_residual=True)
    assert off.item_residual is None
    assert not any("residual" in k for k in off.state_dict())
    assert on.num_parameters() - off.num_parameters() == (N_ITEMS + 1) * DIM
    assert off.num_parameters() == sum(p.numel() for p in off.dit.parameters())
    # zero at init: the same model as without it
    on.load_state_dict(off.state_dict(), strict=False)
    _perturb(off), _perturb(on)
    off.eval(), on.eval()
    b = batch(8)
    torch.testing.assert_close(on.score_all(b, generator=gen(0)), off.score_all(b, generator=gen(0)))
    # trained: history tokens, targets and scores all use the same corrected vectors; padding stays 0
    W = _sgd_steps(on).item_residual.weight
    assert (W[0] == 0).all() and W[1:].abs().sum() > 0
    on.eval()
    x = on.generate(b, generator=gen(0))
    torch.testing.assert_close(on.score_all(b, generator=gen(0))[:, 1:], x @ (on.item_vectors + W)[1:].T)
    ids = torch.tensor([[0, 3, 5]])
    torch.testing.assert_close(on.item_vecs(ids), (on.item_vectors + W)[ids])


def test_text_residual_starts_as_the_paper_and_reaches_items_without_training_data():
    """text_residual: a learned map from an item's text vector to a residual. Zero at init (the paper's frozen
    vectors); trained, it moves the vectors of items that never occur in training too, where the per-item
    residual leaves them as their text; padding stays zero and every path reads the same table."""
    off, on = make(loss="ce"), make(loss="ce", text_residual=16)
    on.load_state_dict(off.state_dict(), strict=False)
    _perturb(off.dit), _perturb(on.dit)
    off.eval(), on.eval()
    b = batch(8)
    torch.testing.assert_close(on.score_all(b, generator=gen(0)), off.score_all(b, generator=gen(0)))
    counts = torch.ones(N_ITEMS + 1)
    counts[0] = 0
    counts[N_ITEMS - 9:] = 0  # the last 10 items never occur in training
    moved = {}
    for name, kw in (("text", {"text_residual": 16}), ("item", {"item_residual": True})):
        m = make(loss="ce", **kw)
        _perturb(m.dit)
        m.observe_training(counts)
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        for i in range(3):
            bb = {"history": histories(16, 6, n_items=N_ITEMS - 10, seed=i),  # no new item anywhere in training
                  "target": torch.randint(1, N_ITEMS - 9, (16,), generator=gen(i))}
            opt.zero_grad()
            m.loss(bb, gen(i)).backward()
            opt.step()
        table = m.item_table().detach()
        assert (table[0] == 0).all()
        moved[name] = float((table[N_ITEMS - 9:] - m.item_vectors[N_ITEMS - 9:]).abs().sum())
        ids = torch.tensor([[0, 3, N_ITEMS]])
        torch.testing.assert_close(m.item_vecs(ids).detach(), table[ids])
    assert moved["text"] > 0 and moved["item"] == 0, moved
    with pytest.raises(ValueError, match="text_residual must be >= 0"):
        IDreamRecConfig(text_residual=-1)


def test_new_item_vector_reaches_items_without_training_data_and_trains_on_the_newest():
    """new_items: items without training data score as text + text map + a learned new-item vector (no
    residual of their own); the newest training items take that form in a share new_drop of the steps, which
    is where the vector learns, and keep their own residual for scoring."""
    counts = torch.ones(N_ITEMS + 1, dtype=torch.long)
    counts[0] = 0
    counts[N_ITEMS - 4:] = 0  # items 36..40: never in training
    first = torch.arange(N_ITEMS + 1, dtype=torch.float64) * 10.0  # item i first seen at 10 i
    first[N_ITEMS - 4:] = float("inf")
    first[0] = float("inf")
    m = make(loss="ce", item_residual=True, text_residual=8, new_items=0.1, new_drop=1.0)
    with pytest.raises(ValueError, match="first_seen"):
        m.observe_training(counts)
    m.observe_training(counts, first)
    assert m.unseen.nonzero().squeeze(1).tolist() == list(range(N_ITEMS - 4, N_ITEMS + 1))
    assert m.newest.nonzero().squeeze(1).tolist() == [32, 33, 34, 35]  # 10% of the 35 trained, the latest
    _perturb(m.dit)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    for i in range(3):
        bb = {"history": histories(16, 6, n_items=N_ITEMS - 5, seed=i),
              "target": torch.tensor([33, 34] * 8)}  # only the newest are targets: their new form trains
        opt.zero_grad()
        m.loss(bb, gen(i)).backward()
        assert m.item_residual.weight.grad[32:36].abs().sum() == 0  # new_drop = 1: always the new form
        assert m.item_residual.weight.grad[1:32].abs().sum() > 0  # the CE's other classes
        opt.step()
    assert m.new_vec.abs().sum() > 0
    with torch.no_grad():
        m.item_residual.weight[32:] = 1.0  # a residual a new item must not read
    table = m.item_table().detach()
    text = m.item_vectors + m.text_map(m.item_vectors).detach()
    torch.testing.assert_close(table[36:], text[36:] + m.new_vec.detach())
    # scoring, new_drop = 1: the newest never trained in another form, so they keep the new one
    torch.testing.assert_close(table[32:36], text[32:36] + m.new_vec.detach())
    assert (table[0] == 0).all() and m._form is None
    twin = make(loss="ce", item_residual=True, text_residual=8, new_items=0.1, new_drop=1.0)
    twin.load_state_dict(m.state_dict())  # the item groups travel with the weights
    torch.testing.assert_close(twin.item_table(), m.item_table())
    half = make(loss="ce", item_residual=True, text_residual=8, new_items=0.1, new_drop=0.5)
    half.load_state_dict(m.state_dict())
    torch.testing.assert_close(half.item_table()[32:36].detach(), text[32:36] + 1.0)  # they keep their own
    torch.testing.assert_close(half.item_table()[36:].detach(), text[36:] + m.new_vec.detach())
    off = make(loss="ce", item_residual=True, text_residual=8)
    assert off.new_vec is None and not any("new" in k or "unseen" in k for k in off.state_dict())
    for bad in ({"new_items": 1.0}, {"new_items": -0.1}, {"new_drop": 0.0}, {"new_bias": 1.0},
                {"new_items": 0.1, "new_bias": float("nan")}):
        with pytest.raises(ValueError, match="new_"):
            IDreamRecConfig(**bad)


@pytest.mark.parametrize("layout, steps", [("full", 1), ("causal", 1), ("full", 4)])
def test_train_t_sampler_trains_only_the_timesteps_the_sampler_visits(layout, steps, monkeypatch):
    """train_t = "sampler": every training target is noised to a timestep of the configured DDIM grid (steps = 1:
    t = T-1 alone); "all" (the paper's) draws from every t."""
    import recpipe.models.idreamrec as I

    seen: list[torch.Tensor] = []
    real = I.q_sample
    monkeypatch.setattr(I, "q_sample", lambda s, x0, t, noise: seen.append(t.clone()) or real(s, x0, t, noise))
    kw = {"layout": layout, "steps": steps, **({"window": 3} if layout == "causal" else {})}
    if layout == "causal":
        b = {"window": histories(32, 9, min_len=9), "target": torch.randint(1, N_ITEMS + 1, (32, 3))}
    else:
        b = {"history": histories(96, 6), "target": torch.randint(1, N_ITEMS + 1, (96,))}
    for train_t in ("sampler", "all"):
        seen.clear()
        m = make(train_t=train_t, **kw)
        assert torch.isfinite(m.loss(b, gen(5)))
        t = torch.cat(seen).unique()
        grid = set(D.ddim_timesteps(SMALL["T"], steps))
        if train_t == "sampler":
            assert set(t.tolist()) == grid, (t, grid)
        else:
            assert len(t) > 20 and not set(t.tolist()) <= grid


def test_a_late_option_at_its_default_stays_out_of_the_train_fingerprint():
    from recpipe.models.base import config_key

    late = {f.name for f in dataclasses.fields(IDreamRecConfig) if f.metadata.get("late")}
    assert late == {"train_t", "ce_negatives", "text_residual", "new_items", "new_drop", "new_bias",
                    "new_holdout"}
    key = config_key(IDreamRecConfig())
    assert key == {k: v for k, v in dataclasses.asdict(IDreamRecConfig()).items() if k not in late}
    assert config_key(IDreamRecConfig(train_t="sampler"))["train_t"] == "sampler"
    assert config_key(IDreamRecConfig(ce_negatives=64))["ce_negatives"] == 64
    assert config_key(IDreamRecConfig(new_items=0.1))["new_items"] == 0.1
    assert config_key(IDreamRecConfig(new_items=0.2, new_holdout=0.1))["new_holdout"] == 0.1
    with pytest.raises(ValueError, match="train_t"):
        IDreamRecConfig(train_t="low")
