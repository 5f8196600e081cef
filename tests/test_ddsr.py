"""DDSR (recpipe/models/ddsr.py): discrete diffusion over semantic-ID codes.

Shapes and full ranking (padding never rankable), the forward process's marginals under the uniform
transition (closed form = the product of the step matrices = what the sampler draws), semantic IDs (unique,
seeded, semantic when built from vectors), and learning a synthetic next-item task (item i -> i + 1).
"""

from __future__ import annotations

import math

import pytest
import torch

from recpipe.models.base import build_model, model_class
from recpipe.models.ddsr import DDSR, TransitionSchedule, residual_kmeans

pytestmark = pytest.mark.usefixtures("one_thread")

N = 40  # items of the synthetic task
L = 10  # history width
SMALL = {"history_len": L, "hidden": 32, "n_blocks": 2, "code_levels": 2, "codebook_size": 8, "T": 20}


def build(seed: int = 0, item_vectors: torch.Tensor | None = None, **over) -> DDSR:
    torch.manual_seed(seed)
    return build_model("ddsr", {**SMALL, **over}, n_items=N, item_vectors=item_vectors)


def next_of(i: torch.Tensor) -> torch.Tensor:
    """The synthetic task: item i is followed by i + 1 (N by 1); padding stays padding."""
    return torch.where(i > 0, i % N + 1, torch.zeros_like(i))


def chains(B: int, g: torch.Generator, width: int = L) -> torch.Tensor:
    """(B, width) left-padded runs start, start + 1, ... of random start and length 1..width."""
    start = torch.randint(1, N + 1, (B,), generator=g)
    lengths = torch.randint(1, width + 1, (B,), generator=g)
    cols = [start]
    for _ in range(width - 1):
        cols.append(next_of(cols[-1]))
    full = torch.stack(cols, dim=1)
    out = torch.zeros(B, width, dtype=torch.long)
    for b in range(B):
        n = int(lengths[b])
        out[b, width - n:] = full[b, :n]
    return out


def sequence_batch(B: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    seq = chains(B, g, width=L + 1)
    return {"input_seq": seq[:, :-1], "target_seq": torch.where(seq[:, :-1] > 0, seq[:, 1:], 0)}


def test_contract_and_shapes():
    cls = model_class("ddsr")
    assert cls is DDSR and cls.train_mode == "sequence" and not cls.uses_text and not cls.generative
    model = build()
    model.eval()
    hist = chains(6, torch.Generator().manual_seed(1))
    hist[0] = 0  # an empty history
    s = model.score_all({"history": hist})
    assert s.shape == (6, N + 1)
    assert torch.isneginf(s[:, 0]).all() and torch.isfinite(s[:, 1:]).all()
    # every item has its own code tuple, so the scores tell every item apart (no forced ties)
    assert len({tuple(r) for r in model.codes[1:].tolist()}) == N
    # extra left padding changes nothing (positions count from the newest item)
    wide = torch.cat([torch.zeros(6, 5, dtype=torch.long), hist], dim=1)
    torch.testing.assert_close(model.score_all({"history": wide}), s)


def test_transition_marginals_are_the_product_of_uniform_steps():
    """q(x_t | x_0) = abar_t one-hot + (1 - abar_t)/K equals row x_0 of Q_1 ... Q_t."""
    sch = TransitionSchedule("cosine", 20)
    K = 8
    x0 = torch.arange(K)
    prod = torch.eye(K, dtype=torch.float64)
    for t in range(1, 21):
        prod = prod @ sch.step_matrix(sch.alpha(t), K)
        closed = sch.marginal(x0, torch.full((K,), t), K).double()
        torch.testing.assert_close(closed, prod, rtol=1e-5, atol=1e-6)
    assert float(sch.abar[0]) == 1.0 and float(sch.abar[-1]) < 0.01  # clean at t = 0, ~uniform at t = T


@pytest.mark.parametrize("t", [0, 5, 12, 20])
def test_noise_codes_draws_the_marginal(t):
    """The sampler's empirical frequencies match abar_t one-hot + (1 - abar_t)/K within 5 binomial sigmas."""
    model = build()
    n = 20000
    seq = torch.full((n, 1), 7, dtype=torch.long)
    codes = model.codes[seq]  # (n, 1, levels)
    noised = model.noise_codes(codes, torch.full((n,), t), torch.Generator().manual_seed(t))
    for j, K in enumerate(model.sizes):
        freq = torch.bincount(noised[:, 0, j], minlength=K).double() / n
        expect = model.transitions.marginal(codes[0, 0, j], torch.tensor(t), K).double()
        sigma = (expect * (1 - expect) / n).sqrt()
        assert ((freq - expect).abs() <= 5 * sigma + 1e-12).all(), (j, freq, expect)


def test_semantic_ids_from_vectors_group_similar_items_and_are_seeded():
    g = torch.Generator().manual_seed(0)
    # 4 well-separated clusters of 10 items each: the first level must recover them
    centers = torch.randn(4, 16, generator=g) * 10
    cluster = torch.arange(N) % 4
    vecs = centers[cluster] + 0.1 * torch.randn(N, 16, generator=g)
    codes = residual_kmeans(vecs, levels=2, K=4, iters=25, seed=0)
    first = codes[:, 0]
    for c in range(4):
        assert first[cluster == c].unique().numel() == 1
    assert first.unique().numel() == 4
    torch.testing.assert_close(codes, residual_kmeans(vecs, levels=2, K=4, iters=25, seed=0))
    model = build(item_vectors=torch.cat([torch.zeros(1, 16), vecs]), codebook_size=4)
    assert len({tuple(r) for r in model.codes[1:].tolist()}) == N  # a collision level makes them unique
    with pytest.raises(ValueError, match="rows"):
        DDSR(model.config, N, vecs)  # no padding row


def test_state_dict_round_trip_and_deterministic_training_loss():
    model = build(seed=0)
    clone = build(seed=1)
    clone.load_state_dict(model.state_dict())
    batch = sequence_batch(16, torch.Generator().manual_seed(2))
    model.eval(), clone.eval()
    torch.testing.assert_close(model.score_all({"history": batch["input_seq"]}),
                               clone.score_all({"history": batch["input_seq"]}))
    a = model.loss(batch, torch.Generator().manual_seed(3))
    b = model.loss(batch, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)


def fit_next_item(model: DDSR, seed: int = 0, steps: int = 300) -> tuple[list[float], float]:
    """Train on item i -> i + 1 (AdamW 3e-3, batches of 64); the losses and hit@1 on 200 held-out chains."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    model.train()
    for _ in range(steps):
        loss = model.loss(sequence_batch(64, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    hist = chains(200, torch.Generator().manual_seed(99))
    s = model.score_all({"history": hist})
    return losses, (s.argmax(1) == next_of(hist[:, -1])).float().mean().item()


def test_learns_next_item_task():
    """item i -> i + 1: after training, the true next item is ranked first far above chance (1/N)."""
    losses, hit1 = fit_next_item(build())
    assert sum(losses[-20:]) / 20 < 0.8 * sum(losses[:20]) / 20
    assert hit1 > 0.8, f"hit@1 {hit1:.2f} (chance {1 / N:.3f})"
    assert math.isfinite(losses[-1])


def test_pipeline_trains_evaluates_and_recommends_ddsr(tmp_path):
    """`recpipe train --model ddsr` end to end on test_pipeline's synthetic catalog (next = item + 7, 90%)."""
    from test_pipeline import _build, _cfg

    from recpipe.pipeline import data as Data
    from recpipe.pipeline import evaluate as E
    from recpipe.pipeline import train as T
    from recpipe.pipeline.recommend import RecommendService

    _build(tmp_path)
    cfg = _cfg(tmp_path, **{"train.model": "ddsr", "train.lr": 5e-3, "train.epochs": 8,
                            "model.ddsr.history_len": 12, "model.ddsr.code_levels": 2, "model.ddsr.codebook_size": 8})
    Data.run(cfg, log=lambda m: None)
    res = T.run(cfg, log=lambda m: None, progress=False)
    assert res.manifest.info["valid"]["masked"]["NDCG@10"] > 0.3, res.manifest.info["valid"]  # chance ~0.05
    row = E.run(cfg, log=lambda m: None).manifest.info["rows"][0]
    assert row["masked"]["HR@10"] > 0.6
    recs = RecommendService(cfg).recommend("0", k=5)
    assert [r.rank for r in recs] == [1, 2, 3, 4, 5]


def test_pipeline_ddsr_codes_from_text(tmp_path):
    """codes_from="text": train whitens the embed stage's vectors and builds the semantic IDs from them (the
    train stage records the whiten fingerprint); the codes travel in the checkpoint, so evaluate and recommend
    load the model without the vectors. The default ("random") reads no text stage at all."""
    from test_pipeline import _build, _cfg, _fake_embed

    from recpipe.models.ddsr import semantic_ids
    from recpipe.pipeline import bundle, stages, whiten
    from recpipe.pipeline import data as Data
    from recpipe.pipeline import evaluate as E
    from recpipe.pipeline import train as T
    from recpipe.pipeline.recommend import RecommendService

    _build(tmp_path)
    over = {"train.model": "ddsr", "train.lr": 5e-3, "train.epochs": 3, "model.ddsr.history_len": 12,
            "model.ddsr.code_levels": 2, "model.ddsr.codebook_size": 8}
    plain = _cfg(tmp_path, **over)
    assert "embed" not in [s.name for s in stages.walk(["ddsr"], plain)]
    cfg = _cfg(tmp_path, **over, **{"model.ddsr.codes_from": "text"})
    assert [s.name for s in stages.walk(["ddsr"], cfg)][:3] == ["data", "describe", "embed"]
    Data.run(cfg, log=lambda m: None)
    _fake_embed(cfg)
    res = T.run(cfg, log=lambda m: None, progress=False)
    assert "whiten" in res.manifest.inputs
    text = whiten.load(cfg.run_dir)
    mcfg = cfg.model_config("ddsr")
    expect = semantic_ids(text.items.shape[0] - 1, mcfg, torch.from_numpy(text.items))
    b = bundle.load(cfg, "ddsr")
    torch.testing.assert_close(b.model.codes[1:], expect)
    assert not torch.equal(expect, semantic_ids(text.items.shape[0] - 1, mcfg, None))  # not the hashed IDs
    assert E.run(cfg, log=lambda m: None).manifest.info["rows"][0]["masked"]["HR@10"] > 0.1
    assert len(RecommendService(cfg).recommend("0", k=5)) == 5


def test_chained_scores_are_the_code_tuple_log_probability():
    """code_heads="chained": an item's score is log p(c_0) + log p(c_1 | c_0) + ..., each level's head reading
    h plus the embedding of the item's own prefix, the very terms the training loss teacher-forces; the scores
    are a proper distribution over code tuples, so over items (every item has its own tuple): they sum to 1."""
    model = build(seed=4, code_levels=3, codebook_size=4)
    for emb in model.prefix_emb:  # trained-like prefix embeddings (they start random anyway; make them matter)
        torch.nn.init.normal_(emb.weight, std=2.0)
    model.eval()
    hist = chains(5, torch.Generator().manual_seed(6))
    s = model.score_all({"history": hist})
    h = model.encode(hist, torch.zeros(5, dtype=torch.long))[:, -1]
    for i in (1, 7, N):
        expect = torch.zeros(5)
        for j, head in enumerate(model.heads):
            hj = h if j == 0 else h + model.prefix_emb[j - 1].weight[model.prefix[i, j]]
            expect += torch.log_softmax(head(hj), -1)[:, model.codes[i, j]]
        torch.testing.assert_close(s[:, i], expect, rtol=1e-5, atol=1e-5)
    # items sharing a prefix share its embedding; distinct prefixes get distinct rows
    same = model.codes[1:, 0] == model.codes[1, 0]
    assert (model.prefix[1:, 1][same] == model.prefix[1, 1]).all()
    # the tuples cover only some of all possible ones, so the mass over items is at most 1
    assert (torch.logsumexp(s[:, 1:], 1) <= 1e-5).all()
    # the prefix table is derived from the codes, never saved: an "independent" checkpoint holds no prefix part
    assert "prefix" not in model.state_dict()
    assert not any("prefix" in k for k in build(code_heads="independent").state_dict())


def test_chained_heads_learn_with_unbalanced_codes():
    """Text codes are unbalanced (a few huge clusters): item vectors where half the items sit in one tight
    cluster, so its items differ only in their later levels, which the chained heads read given the prefix;
    they learn item i -> i + 1 through that (both kinds do on this deterministic task; the gap is on real data,
    docs/results.md#r-baselines-budget-2)."""
    g = torch.Generator().manual_seed(0)
    vecs = torch.randn(N + 1, 16, generator=g)
    vecs[1: N // 2 + 1] = vecs[1] + 0.01 * torch.randn(N // 2, 16, generator=g)  # one big cluster
    model = build(seed=0, item_vectors=vecs, code_heads="chained")
    assert max(torch.bincount(model.codes[1:, 0])) >= N // 2  # the level-0 code of the cluster
    _, hit1 = fit_next_item(model, seed=1)
    assert hit1 > 0.8, hit1
