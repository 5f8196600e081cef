"""iDreamRec's causal layout (recpipe.models.dit.CausalDiT) and its window batches (train.Batcher.windows)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from recpipe.models.base import build_model
from recpipe.models.dit import CausalDiT
from recpipe.models.idreamrec import IDreamRecConfig
from recpipe.pipeline import data as D
from recpipe.pipeline.batches import Batcher, iterate_training, n_batches, targets_per_batch

pytestmark = pytest.mark.usefixtures("one_thread")

DIM, L = 8, 5


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = gen(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return module.eval()


def dit(copy: bool = False) -> CausalDiT:
    """Perturbed, so that a copy path's zero-initialised gate is open too."""
    torch.manual_seed(0)
    return perturbed(CausalDiT(dim=DIM, max_len=L, width=16, depth=2, heads=4, dropout=0.0, copy=copy))


def inputs(B=3, N=7, C=4, seed=0):
    g = gen(seed)
    hist = torch.randn(B, N, DIM, generator=g)
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    x_t = torch.randn(B, C, DIM, generator=g)
    t = torch.randint(0, 100, (B, C), generator=g)
    anchor = (N - C + torch.arange(C)).expand(B, C).contiguous()
    keep = torch.ones(B, C, dtype=torch.bool)
    keep[0, 1] = False
    return hist, valid, x_t, t, anchor, keep


@pytest.mark.parametrize("copy", [False, True])
def test_window_equals_one_target_at_a_time_when_it_fits(copy):
    m = dit(copy)
    hist, valid, x_t, t, anchor, keep = inputs(N=5, C=3)  # every window within max_len
    out = m(hist, valid, x_t, t, anchor, keep)
    for b in range(3):
        for g in range(3):
            a = int(anchor[b, g])
            one = m(hist[b:b + 1, :a], valid[b:b + 1, :a], x_t[b:b + 1, g:g + 1], t[b:b + 1, g:g + 1],
                    torch.tensor([[a]]), keep[b:b + 1, g:g + 1])
            torch.testing.assert_close(one[0, 0], out[b, g], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("copy", [False, True])
def test_targets_see_neither_the_future_nor_each_other_nor_padding(copy):
    m = dit(copy)
    hist, valid, x_t, t, anchor, keep = inputs()
    out = m(hist, valid, x_t, t, anchor, keep)
    # changing the item at slot s changes only targets anchored after s (and within max_len of it)
    for s in range(7):
        h2 = hist.clone()
        h2[:, s] += 5.0
        out2 = m(h2, valid, x_t, t, anchor, keep)
        for g in range(4):
            a = int(anchor[0, g])
            changed = not torch.allclose(out2[2, g], out[2, g])
            assert changed == (s < a and keep[2, g].item()), (s, g)
    # another target's noisy input or timestep never matters
    x2, t2 = x_t.clone(), t.clone()
    x2[:, 0] += 3.0
    t2[:, 0] = (t2[:, 0] + 50) % 100
    out3 = m(hist, valid, x2, t2, anchor, keep)
    torch.testing.assert_close(out3[:, 1:], out[:, 1:])
    assert not torch.allclose(out3[:, 0], out[:, 0])
    # padding values are never read, NaN included
    h4 = hist.clone()
    h4[1, :3] = float("nan")
    torch.testing.assert_close(m(h4, valid, x_t, t, anchor, keep), out)


@pytest.mark.parametrize("copy", [False, True])
def test_dropped_history_reads_the_null_token_only(copy):
    m = dit(copy)
    hist, valid, x_t, t, anchor, keep = inputs()
    drop = torch.zeros_like(keep)
    a = m(hist, valid, x_t, t, anchor, drop)
    b = m(torch.randn_like(hist), valid, x_t, t, anchor, drop)
    torch.testing.assert_close(a, b)
    # an empty history window (all padding) is the same as a dropped one
    torch.testing.assert_close(m(hist, torch.zeros_like(valid), x_t, t, anchor, keep), a)


@pytest.mark.parametrize("copy", [False, True])
def test_left_padding_amount_does_not_matter(copy):
    m = dit(copy)
    hist, valid, x_t, t, anchor, keep = inputs()
    pad = 3
    hist2 = torch.cat([torch.randn(3, pad, DIM), hist], dim=1)
    valid2 = torch.cat([torch.zeros(3, pad, dtype=torch.bool), valid], dim=1)
    out2 = m(hist2, valid2, x_t, t, anchor + pad, keep)
    torch.testing.assert_close(out2, m(hist, valid, x_t, t, anchor, keep), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the model
N_ITEMS = 30


def vectors(n: int = N_ITEMS, d: int = 16, seed: int = 1) -> torch.Tensor:
    x = torch.randn(n, d, generator=gen(seed))
    return torch.cat([torch.zeros(1, d), (x - x.mean(0)) / x.std(0)])


def model(**kw):
    torch.manual_seed(0)
    cfg = IDreamRecConfig(**{**dict(width=32, depth=2, heads=4, history_len=6, T=100, dropout=0.0,
                                    layout="causal", window=4), **kw})
    return build_model("idreamrec", cfg, n_items=N_ITEMS, item_vectors=vectors())


def test_causal_guidance_is_one_forward_and_combines_branches():
    m = perturbed(model())
    B = 9
    hist = torch.randint(1, N_ITEMS + 1, (B, 6), generator=gen(2))
    hist[:3, :2] = 0
    intent = torch.randn(B, 16, generator=gen(3))
    mask = torch.arange(B) % 2 == 0
    x_t, t = torch.randn(B, 16, generator=gen(4)), torch.full((B,), 99)
    anchor = torch.full((B, 1), 6)

    def f(keep: bool, use_i: bool) -> torch.Tensor:
        return m.dit(m.item_vecs(hist), hist != 0, x_t[:, None], t[:, None], anchor,
                     torch.full((B, 1), keep), intent[:, None], (mask & use_i)[:, None])[:, 0]

    f_uu, f_hu, f_hi = f(False, False), f(True, False), f(True, True)
    calls = []
    orig = m.dit.forward
    m.dit.forward = lambda *a, **k: calls.append(a[2].shape[1]) or orig(*a, **k)
    for w, rho in [(3.0, 1.0), (1.0, 0.0), (0.0, 0.0), (2.5, 0.7)]:
        got = m.guided_x0(x_t, t, hist, intent, mask, w, rho)
        want = f_uu + w * (f_hu - f_uu) + rho * torch.where(mask[:, None], f_hi - f_hu, torch.zeros(()))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert calls == [3, 1, 1, 3]  # one forward per step; only the branches with a non-zero weight


def _train_on_windows(m, seqs, steps: int, lr: float) -> list[float]:
    """AdamW on `steps` fresh batches seqs(64, 100 + step), the last 4 positions of each window as targets."""
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    g = gen(3)
    m.train()
    losses = []
    for step in range(steps):
        s = seqs(64, 100 + step)
        loss = m.loss({"window": s, "target": s[:, -4:]}, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_causal_overfits_next_item_rule_from_window_batches(loss):
    """next item = perm[previous item]; trained on windows of 4 targets, scored one target at a time."""
    perm = torch.randperm(N_ITEMS, generator=gen(2)) + 1

    def seqs(n: int, seed: int) -> torch.Tensor:  # 6 random items, then 4 that follow the rule
        s = torch.randint(1, N_ITEMS + 1, (n, 10), generator=gen(seed))
        for j in range(6, 10):
            s[:, j] = perm[s[:, j - 1] - 1]
        return s

    m = model(width=64, loss=loss)
    losses = _train_on_windows(m, seqs, steps=200, lr=3e-3)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    m.eval()
    s = seqs(200, 7)
    acc = (m.score_all({"history": s[:, 3:9]}, generator=gen(4)).argmax(1) == s[:, 9]).float().mean().item()
    assert acc > 0.8, acc


def test_causal_loss_masks_non_targets_and_follows_the_generator():
    m = perturbed(model())
    win = torch.randint(1, N_ITEMS + 1, (5, 10), generator=gen(0))
    tgt = win[:, -4:].clone()

    def loss(model, w, t, seed=1):
        return model.loss({"window": w, "target": t}, gen(seed)).item()

    assert loss(m, win, tgt) == loss(m, win, tgt)
    assert loss(m, win, tgt) != loss(m, win, tgt, seed=2)
    # with every history dropped, a slot's item matters only as a target: once its target is 0
    # (not a target), changing the item there changes nothing
    m1 = perturbed(model(p_uncond=1.0))
    win2 = win.clone()
    win2[:, -4] = (win2[:, -4] % N_ITEMS) + 1
    tgt0 = tgt.clone()
    tgt0[:, 0] = 0
    assert loss(m1, win2, win2[:, -4:]) != loss(m1, win, tgt)  # as a target, the item counts
    assert loss(m1, win2, tgt0) == pytest.approx(loss(m1, win, tgt0), rel=1e-6)
    with pytest.raises(ValueError, match="adaln_zero"):
        model(adaln_zero=True)


# ------------------------------------------------------------------------------------------- the batches
def toy_dataset(lengths: list[int], seed: int = 0) -> D.Dataset:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = rng.integers(1, 50, offsets[-1]).astype(np.int64)
    n_users = len(lengths)
    return D.Dataset(pd.DataFrame({"item": np.arange(1, 50)}), pd.DataFrame({"user": np.arange(n_users)}),
                     offsets, items, np.arange(offsets[-1], dtype=np.int64))


def test_windows_cover_every_training_target_once_with_its_history():
    ds = toy_dataset([3, 4, 9, 25, 60, 2])
    b = Batcher(ds, 5)
    C = 4
    seen = []
    for batch in iterate_training(b, "window", 8, epoch=0, seed=0, window=C):  # 8 targets = 2 windows
        win, tgt = batch["window"].numpy(), batch["target"].numpy()
        N = win.shape[1]
        assert win.shape[0] <= 2 and N <= 5 + C
        for r in range(len(win)):
            for g in range(C):
                if tgt[r, g] == 0:
                    continue
                seen.append(tgt[r, g])
                slot = N - C + g
                assert win[r, slot] == tgt[r, g]
                # the history the target sees (up to 5 items before it) is the user's real past
                hist = win[r, max(0, slot - 5):slot]
                hist = hist[hist != 0]
                assert len(hist) >= 1
                found = False
                for u in range(ds.n_users):
                    s = ds.sequence(u)[:-2]
                    for p in range(1, len(s)):
                        if s[p] == tgt[r, g] and np.array_equal(s[max(0, p - 5):p][-len(hist):], hist) and \
                                len(hist) == min(5, p):
                            found = True
                assert found
    want = np.concatenate([ds.sequence(u)[1:-2] for u in range(ds.n_users)])
    assert sorted(seen) == sorted(want.tolist())
    assert n_batches(b, "window", 8, C) == len(list(iterate_training(b, "window", 8, 0, 0, window=C)))


@pytest.mark.parametrize("chunked", [True, False])
def test_sequences_cover_every_training_transition_once_when_chunked(chunked):
    """SASRec's "sequence" batches: each target's input is the item just before it, in the same user; chunked
    batches hold every training transition exactly once, unchunked ones each user's last L transitions."""
    lengths = [3, 4, 9, 25, 60, 2, 8]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = np.arange(1, offsets[-1] + 1, dtype=np.int64)  # item id = global position + 1: unique
    ds = D.Dataset(pd.DataFrame({"item": items}), pd.DataFrame({"user": np.arange(len(lengths))}),
                   offsets, items, np.arange(offsets[-1], dtype=np.int64))
    b, L = Batcher(ds, 5), 5
    user_of = np.repeat(np.arange(len(lengths)), lengths)
    got = []
    for batch in iterate_training(b, "sequence", 3, epoch=0, seed=0, chunked=chunked):
        inp, tgt = batch["input_seq"].numpy(), batch["target_seq"].numpy()
        assert inp.shape == tgt.shape and inp.shape[1] <= L
        assert np.array_equal(inp == 0, tgt == 0), "an input exactly where there is a target"
        for i, t in zip(inp[tgt > 0], tgt[tgt > 0]):
            assert i == t - 1 and user_of[i - 1] == user_of[t - 1], "input = the same user's previous item"
            got.append(int(t))
    want = []
    for u, n in enumerate(lengths):
        targets = list(range(offsets[u] + 2, offsets[u] + n - 1))  # ids of positions 1 .. n-3 of the user
        want += targets if chunked else targets[-L:]
    assert sorted(got) == sorted(want)
    assert n_batches(b, "sequence", 3, chunked=chunked) == len(list(
        iterate_training(b, "sequence", 3, 0, 0, chunked=chunked)))


@pytest.mark.parametrize("copy", [False, True])
def test_last_block_reads_only_the_target_tokens_exactly(copy):
    """The last block computes queries for the x_t tokens only; the same as running it on every token."""
    m = dit(copy)
    hist, valid, x_t, t, anchor, keep = inputs()
    out = m(hist, valid, x_t, t, anchor, keep)
    block_cls = type(m.blocks[0])
    orig = block_cls.forward
    queries = []

    def every_token(self, x, attn_mask, c=None, query=None):
        queries.append(query)
        y = orig(self, x, m.attention_bias(valid, anchor, keep, x.dtype), c, query=None)
        return y[:, query] if query is not None else y

    block_cls.forward = every_token
    try:
        ref = m(hist, valid, x_t, t, anchor, keep)
    finally:
        block_cls.forward = orig
    assert queries[0] is None and queries[-1] is not None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_inference_attention_equals_sdpa():
    """Under no_grad with an additive mask, Attention uses plain matmuls; they must equal SDPA (the training
    path), masked keys, a query subset and -inf entries included."""
    import torch.nn.functional as F

    from recpipe.models.dit import _attention_math

    g = torch.Generator().manual_seed(0)
    B, H, S, hd = 5, 4, 11, 8
    q, k, v = (torch.randn(B, H, S, hd, generator=g) for _ in range(3))
    bias = torch.randn(B, H, S, S, generator=g)
    bias[torch.rand(B, H, S, S, generator=g) < 0.4] = float("-inf")
    bias[..., 0] = 0.0  # every query sees at least one key
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(_attention_math(q, k, v, bias), ref, atol=1e-5, rtol=1e-5)
    qs = q[:, :, 3::3]
    ref = F.scaled_dot_product_attention(qs, k, v, attn_mask=bias[:, :, 3::3])
    torch.testing.assert_close(_attention_math(qs, k, v, bias[:, :, 3::3]), ref, atol=1e-5, rtol=1e-5)
    # the whole model: no_grad output (matmul path) == grad-enabled output (SDPA path)
    m = CausalDiT(dim=6, max_len=4, width=16, depth=2, heads=2, dropout=0.0).eval()
    hist = torch.randn(3, 7, 6, generator=g)
    valid = torch.rand(3, 7, generator=g) > 0.3
    args = (hist, valid, torch.randn(3, 2, 6, generator=g), torch.randint(0, 100, (3, 2), generator=g),
            torch.tensor([[7, 3]] * 3), torch.tensor([[True, False]] * 3))
    with torch.no_grad():
        fast = m(*args)
    torch.testing.assert_close(fast, m(*args).detach(), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------- the copy path
def test_copy_path_is_off_at_init_and_silent_without_history():
    """copy=True with its zero-initialised gate is copy=False's function; with the gate open, a target
    whose history is dropped (or empty) still gets nothing from it."""
    plain = dit()
    hist, valid, x_t, t, anchor, keep = inputs()
    torch.manual_seed(0)
    c = CausalDiT(dim=DIM, max_len=L, width=16, depth=2, heads=4, dropout=0.0, copy=True)
    assert (c.copy_gate == 0).all()
    c.load_state_dict(plain.state_dict(), strict=False)
    c.eval()
    torch.testing.assert_close(c(hist, valid, x_t, t, anchor, keep), plain(hist, valid, x_t, t, anchor, keep))
    with torch.no_grad():
        c.copy_gate.fill_(1.0)
    out = c(hist, valid, x_t, t, anchor, keep)
    assert not torch.allclose(out[keep], plain(hist, valid, x_t, t, anchor, keep)[keep])
    drop = torch.zeros_like(keep)
    torch.testing.assert_close(c(hist, valid, x_t, t, anchor, drop), plain(hist, valid, x_t, t, anchor, drop))
    none = torch.zeros_like(valid)
    torch.testing.assert_close(c(hist, none, x_t, t, anchor, keep), plain(hist, none, x_t, t, anchor, keep))


def test_copy_path_returns_history_vectors_a_narrow_denoiser_cannot():
    """Items in d = 32, a denoiser of width 8 (rank-8 output), the rule "the item two back comes again":
    the copy path learns it far better in the same 150 steps."""
    n, d = 60, 32
    vec = vectors(n, d, seed=1)

    def seqs(b: int, seed: int) -> torch.Tensor:
        s = torch.randint(1, n + 1, (b, 10), generator=gen(seed))
        for j in range(6, 10):
            s[:, j] = s[:, j - 2]
        return s

    acc = {}
    for copy in (False, True):
        torch.manual_seed(0)
        cfg = IDreamRecConfig(width=8, depth=1, heads=2, history_len=6, T=100, dropout=0.0, layout="causal",
                              window=4, loss="ce", copy=copy)
        m = build_model("idreamrec", cfg, n_items=n, item_vectors=vec)
        _train_on_windows(m, seqs, steps=150, lr=1e-2)
        m.eval()
        s = seqs(300, 7)
        acc[copy] = (m.score_all({"history": s[:, 3:9]}, generator=gen(4)).argmax(1) == s[:, 9]).float().mean()
    assert acc[True] > 0.5 and acc[False] < 0.3, acc
    with pytest.raises(ValueError, match="copy"):
        IDreamRecConfig(copy=True, layout="full")


def mostly_short(n: int = 300, seed: int = 0, n_items: int | None = None) -> D.Dataset:
    """An Amazon-like catalog: 95% of the users with 4-9 items, the rest 40-89. Item ids are unique (the
    global position + 1) unless n_items is given (then drawn from 1..n_items)."""
    rng = np.random.default_rng(seed)
    lengths = np.where(rng.random(n) < 0.95, rng.integers(4, 10, n), rng.integers(40, 90, n))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    items = (np.arange(1, offsets[-1] + 1) if n_items is None else rng.integers(1, n_items + 1, offsets[-1]))
    items = items.astype(np.int64)
    return D.Dataset(pd.DataFrame({"item": np.arange(1, int(items.max()) + 1)}),
                     pd.DataFrame({"user": np.arange(len(lengths))}), offsets, items,
                     np.arange(offsets[-1], dtype=np.int64))


@pytest.mark.parametrize("mode", ["position", "sequence", "window"])
def test_length_pool_batches_are_narrow_and_cover_the_same_samples(mode):
    """train.length_pool: batches of similar history length. The same samples, each once a pass, the same
    number of batches, resumable (skip), reshuffled every epoch, and far narrower batches than a plain
    shuffle on a catalog of mostly short histories."""
    b = Batcher(mostly_short(), 50)
    key = "target_seq" if mode == "sequence" else "target"
    wide = {"position": "history", "sequence": "input_seq", "window": "window"}[mode]

    def run(pool, epoch=0, skip=0):
        return list(iterate_training(b, mode, 32, epoch=epoch, seed=1, skip=skip, window=20, chunked=True,
                                     length_pool=pool))

    plain, pooled = run(0), run(8)
    assert len(pooled) == len(plain) == n_batches(b, mode, 32, window=20, chunked=True)
    targets = [np.sort(np.concatenate([x[key].numpy().ravel() for x in bs])) for bs in (plain, pooled)]
    targets = [t[t > 0] for t in targets]  # sequence rows are padded to their batch's width
    np.testing.assert_array_equal(targets[0], targets[1])
    assert len(np.unique(targets[1])) == len(targets[1]), "each sample once (item ids are unique here)"
    cols_plain = sum(x[wide].shape[1] for x in plain)
    cols_pooled = sum(x[wide].shape[1] for x in pooled)
    assert cols_pooled < 0.5 * cols_plain, (cols_pooled, cols_plain)
    again = run(8, skip=5)
    assert len(again) == len(pooled) - 5
    for x, y in zip(again, pooled[5:]):
        assert torch.equal(x[key], y[key]), "a resumed pass continues the same batches"
    other = run(8, epoch=1)
    assert not all(torch.equal(x[key], y[key]) for x, y in zip(other, pooled) if x[key].shape == y[key].shape)


def test_window_batches_hold_batch_size_targets_and_cut_what_no_row_uses():
    """On short histories a window of C slots holds a few targets: a batch takes as many windows as hold
    batch_size targets at the data's mean, and drops the target columns no row fills, which changes no
    target's denoised output (against the full L + C window)."""
    b, C = Batcher(mostly_short(), 50), 20
    batches = list(iterate_training(b, "window", 64, epoch=0, seed=0, window=C, length_pool=8))
    per_batch = [int((x["target"] > 0).sum()) for x in batches]
    assert sum(per_batch) == len(b.train_positions)
    assert abs(np.mean(per_batch) - 64) < 0.1 * 64, np.mean(per_batch)  # batch_size // C windows held ~14
    assert sum(x["target"].shape[1] for x in batches) < 0.5 * C * len(batches), "pooled batches are narrow"
    assert targets_per_batch(b, "window", 64, C) == pytest.approx(np.mean(per_batch))

    m = perturbed(model())  # history_len 6, window 4
    Lm, Cm = m.config.history_len, m.config.window
    b = Batcher(mostly_short(seed=1, n_items=N_ITEMS), Lm)
    units = b.window_units(Cm)
    short = units[b.window_targets(units, Cm) < Cm]
    rng = np.random.default_rng(0)
    cut = 0
    for ends in [short[:6], rng.choice(units, 6, replace=False), short[-3:]]:
        got = b.windows(ends, Cm)
        start = b.offsets[b.user_of[ends - 1]]
        full = torch.from_numpy(b._window(ends, start, Lm + Cm))
        pos = ends[:, None] - Cm + np.arange(Cm)[None, :]
        full_tgt = torch.from_numpy(np.where(pos > start[:, None], full.numpy()[:, -Cm:], 0))
        c = got["target"].shape[1]
        cut += c < Cm
        assert torch.equal(got["target"], full_tgt[:, Cm - c:]) and not full_tgt[:, :Cm - c].any()
        x_t = torch.randn(len(ends), Cm, m.dim, generator=gen(3))
        t = torch.randint(0, 100, (len(ends), Cm), generator=gen(4))
        keep = torch.ones(len(ends), Cm, dtype=torch.bool)
        with torch.no_grad():
            want = m._denoise_targets(m._condition({"window": full, "target": full_tgt}), x_t, t, keep, None, None)
            out = m._denoise_targets(m._condition(got), x_t[:, Cm - c:], t[:, Cm - c:], keep[:, Cm - c:], None,
                                     None)
        real = got["target"] > 0
        torch.testing.assert_close(out[real], want[:, Cm - c:][real], rtol=1e-5, atol=1e-5)
    assert cut >= 1, "some batch of short windows is cut"
