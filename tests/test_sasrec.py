"""SASRec's RecBole-style variant (model.sasrec.norm=post, init=normal): causal, padding-invariant, learns; and
its overlapping training windows (model.sasrec.stride)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_baselines import L, N, build, chains, fit, scores, top5_hit_rate

POST = {"norm": "post", "init": "normal", "activation": "gelu", "scale_embeddings": False}


def test_post_ln_blocks_normalise_after_the_residual_and_the_embeddings():
    pre, post = build("sasrec"), build("sasrec", **POST)
    assert isinstance(post.final_ln, torch.nn.Identity) and isinstance(post.emb_ln, torch.nn.LayerNorm)
    assert isinstance(pre.final_ln, torch.nn.LayerNorm) and isinstance(pre.emb_ln, torch.nn.Identity)
    post.eval()
    out = post.encode(chains(4, torch.Generator().manual_seed(1), min_len=L, max_len=L))
    # every position leaves a LayerNorm with unit weight and zero bias at init: mean 0, variance 1 per row
    torch.testing.assert_close(out.mean(-1), torch.zeros(out.shape[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(-1, unbiased=False), torch.ones(out.shape[:2]), atol=1e-3, rtol=0)
    std = torch.cat([p.flatten() for n, p in post.named_parameters() if p.dim() > 1]).std().item()
    assert abs(std - 0.02) < 0.002, std  # N(0, 0.02) init, not Xavier's (about 0.1 at these widths)


def test_post_ln_is_causal_and_padding_invariant():
    model = build("sasrec", **POST)
    fit(model, "sasrec", 3, 1e-3)
    model.eval()
    seq = chains(4, torch.Generator().manual_seed(5), min_len=L, max_len=L)
    changed = seq.clone()
    changed[:, -1] = (changed[:, -1] % N) + 1
    a, b = model.encode(seq), model.encode(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])
    hist = chains(8, torch.Generator().manual_seed(2), min_len=1, max_len=6, width=6)
    wider = torch.cat([torch.zeros(8, 4, dtype=torch.long), hist], dim=1)
    torch.testing.assert_close(scores(model, hist), scores(model, wider))


def test_post_ln_learns_the_next_item_task():
    model = build("sasrec", **POST)
    before = top5_hit_rate(model, "sasrec")
    losses = fit(model, "sasrec", 120, 5e-3)
    after = top5_hit_rate(model, "sasrec")
    assert sum(losses[-20:]) < sum(losses[:20])
    assert after >= 0.8 and after > before + 0.3, (before, after)


def test_oldest_first_positions_make_each_training_position_its_own_test_query():
    """positions=oldest: the output at column t of a training row equals the test-time output for the prefix
    ending at t (so sequence training trains exactly what evaluation asks); newest-first positions do not."""
    hist = chains(4, torch.Generator().manual_seed(7), min_len=L, max_len=L)
    gaps = {}
    for positions in ("oldest", "newest"):
        model = build("sasrec", positions=positions)
        fit(model, "sasrec", 3, 1e-3)
        model.eval()
        with torch.no_grad():
            full = model.encode(hist)
            gaps[positions] = max(float((full[:, t] - model.encode(hist[:, : t + 1])[:, -1]).abs().max())
                                  for t in range(L))
    assert gaps["oldest"] < 1e-5 < gaps["newest"], gaps


@pytest.mark.parametrize("stride", [None, 4, 2])
def test_overlapping_windows_train_every_target_once_with_at_least_l_minus_stride_context(tmp_path, stride):
    from toy_data import build_toy

    from recpipe.config import load_config
    from recpipe.pipeline import data as D
    from recpipe.pipeline.batches import Batcher

    build_toy(tmp_path, n_users=30, length=23, items=False)
    cfg = load_config(None, {"run.dataset": "toy", "run.data_dir": str(tmp_path / "data"),
                             "run.cache_dir": str(tmp_path / "c"), "data.kcore": 2})
    D.run(cfg, log=lambda m: None)
    ds = D.load_run(cfg.run_dir)
    W_L = 8
    b = Batcher(ds, W_L, stride=stride)
    ends = b.sequence_units(chunked=True)
    batch = b.sequences(ends)
    tgt, inp = batch["target_seq"].numpy(), batch["input_seq"].numpy()
    trained = {}  # (user, position) -> context the target reads inside its window
    for row, e in enumerate(ends):
        u = b.user_of[e - 1]
        W = tgt.shape[1]
        for j in np.flatnonzero(tgt[row]):
            pos = e - W + j
            assert tgt[row, j] == ds.seq_items[pos] and inp[row, j] == ds.seq_items[pos - 1]
            assert (u, pos) not in trained, "a target trained twice in one pass"
            trained[(u, pos)] = int((inp[row, : j + 1] > 0).sum())
    # every training target (positions 1 .. len-3 of each user) exactly once
    want = {(u, p) for u in range(ds.n_users) for p in range(ds.offsets[u] + 1, ds.offsets[u + 1] - 2)}
    assert set(trained) == want
    floor = W_L - (stride or W_L) + 1  # the inputs a target reads: its own input and what precedes it in the window
    for (u, p), ctx in trained.items():
        assert ctx >= min(floor, p - ds.offsets[u]), (u, p, ctx)
    if stride:
        with pytest.raises(ValueError, match="stride must be in 1..history_len"):
            build("sasrec", history_len=4, stride=5)


def test_sampled_softmax_learns_the_next_item_task():
    """model.sasrec.ce_negatives: SASRec trained against a few uniform negatives a step learns the chains as the
    full softmax does; the loss draws its negatives from the trainer's generator."""
    model = build("sasrec", ce_negatives=8)
    g = torch.Generator().manual_seed(0)
    from test_baselines import train_batch

    b = train_batch("sasrec", 16, g)
    model.eval()  # no dropout: the negatives are the only draw
    assert model.loss(b, torch.Generator().manual_seed(1)) == model.loss(b, torch.Generator().manual_seed(1))
    assert model.loss(b, torch.Generator().manual_seed(1)) != model.loss(b, torch.Generator().manual_seed(2))
    before = top5_hit_rate(model, "sasrec")
    fit(model, "sasrec", 120, 5e-3)
    after = top5_hit_rate(model, "sasrec")
    assert after >= 0.8 and after > before + 0.3, (before, after)
    with pytest.raises(ValueError, match="ce_negatives must be >= 0"):
        build("sasrec", ce_negatives=-1)
