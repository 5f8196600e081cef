"""Baselines: SASRec, DreamRec, DiffuRec / DiffuRecSys, DiffRec (recpipe/models/*.py).

Every model: shapes, no NaN with padded / empty histories, padding invariance, column 0 never rankable,
determinism given a generator, state_dict round trip, and learning a synthetic deterministic next-item
task (next = (last * 7 + 3) % 40 + 1) well enough to rank the true next item in the top 5 for most users.
"""

from __future__ import annotations

import math

import pytest
import torch

from recpipe.models import diffusion as D
from recpipe.models.base import build_model, model_names

N = 40  # items of the synthetic task
L = 10  # history width used by the tests


def succ_table() -> torch.Tensor:
    """succ[i] = (i * 7 + 3) % N + 1 for items 1..N (a permutation: 7 is invertible mod 40); succ[0] = 0."""
    i = torch.arange(N + 1)
    return torch.where(i > 0, (i * 7 + 3) % N + 1, torch.zeros_like(i))


SUCC = succ_table()


def chains(B: int, g: torch.Generator, min_len: int = 1, max_len: int = L, width: int = L) -> torch.Tensor:
    """(B, width) left-padded chains item, succ(item), ... of random start and length in [min_len, max_len]."""
    start = torch.randint(1, N + 1, (B,), generator=g)
    lengths = torch.randint(min_len, max_len + 1, (B,), generator=g)
    cols = [start]
    for _ in range(max_len - 1):
        cols.append(SUCC[cols[-1]])
    full = torch.stack(cols, dim=1)  # (B, max_len), oldest first
    out = torch.zeros(B, width, dtype=torch.long)
    for b in range(B):
        n = int(lengths[b])
        out[b, width - n :] = full[b, :n]
    return out


def position_batch(B: int, g: torch.Generator, **kw) -> dict[str, torch.Tensor]:
    h = chains(B, g, **kw)
    return {"history": h, "target": SUCC[h[:, -1]]}


def sequence_batch(B: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    seq = chains(B, g, min_len=2, max_len=L + 1, width=L + 1)
    return {"input_seq": seq[:, :-1], "target_seq": torch.where(seq[:, :-1] > 0, seq[:, 1:], 0)}


def cycle_length(i: int) -> int:
    n, j = 1, int(SUCC[i])
    while j != i:
        n, j = n + 1, int(SUCC[j])
    return n


# the permutation splits into cycles (lengths 1, 2 and 4); DiffRec's task uses the ten 4-cycles
CYCLE4 = torch.tensor([i for i in range(1, N + 1) if cycle_length(i) == 4])


def cycle_chains(B: int, g: torch.Generator, length: int) -> torch.Tensor:
    """(B, length) chains of `length` <= 4 distinct items, each inside one 4-cycle."""
    cols = [CYCLE4[torch.randint(0, len(CYCLE4), (B,), generator=g)]]
    for _ in range(length - 1):
        cols.append(SUCC[cols[-1]])
    return torch.stack(cols, dim=1)


def user_batch(B: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """DiffRec: a user's whole training history = a whole 4-cycle, in chain order."""
    return {"history": cycle_chains(B, g, 4)}


# small configs: the defaults' structure, scaled down to keep the file fast on 2 CPU cores
pytestmark = pytest.mark.usefixtures("one_thread")


SMALL = {
    "sasrec": {"history_len": L, "hidden": 32, "dropout": 0.1},
    "dreamrec": {"history_len": L, "hidden": 32, "T": 50},
    "diffurec": {"history_len": L, "hidden": 32, "n_blocks": 2},
    "diffurecsys": {"history_len": L, "hidden": 32, "n_blocks": 2, "ensemble_seeds": 2},
    "diffrec": {"hidden_dims": [64], "T": 10},
}
MODELS = list(SMALL)


def build(name: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    return build_model(name, {**SMALL[name], **over}, n_items=N)


def train_batch(name: str, B: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    mode = build_model(name, SMALL[name], n_items=N).train_mode
    return {"sequence": sequence_batch, "position": position_batch, "user": user_batch}[mode](B, g)


def scores(model, history: torch.Tensor, seed: int = 0) -> torch.Tensor:
    model.eval()
    return model.score_all({"history": history}, generator=torch.Generator().manual_seed(seed))


def fit(model, name: str, steps: int, lr: float, B: int = 64, seed: int = 0) -> list[float]:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model.loss(train_batch(name, B, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# --------------------------------------------------------------------------------------------------------
# interface


def test_registered_with_config_classes():
    names = set(model_names())
    assert {"sasrec", "dreamrec", "diffurec", "diffurecsys", "diffrec"} <= names
    from recpipe.models.base import get_model_config_cls

    for name in MODELS:
        cls = get_model_config_cls(name)
        cls()  # every field has a default
    with pytest.raises(KeyError):
        build_model("sasrec", {"no_such_key": 1}, n_items=N)
    sys_cfg = get_model_config_cls("diffurecsys")()
    assert sys_cfg.cross_attention and sys_cfg.offset_noise == 0.1 and sys_cfg.ensemble_seeds > 1
    base_cfg = get_model_config_cls("diffurec")()
    assert not base_cfg.cross_attention and base_cfg.offset_noise == 0 and base_cfg.ensemble_seeds == 1


@pytest.mark.parametrize("name", MODELS)
def test_shapes_loss_and_padding_rows(name):
    g = torch.Generator().manual_seed(1)
    model = build(name)
    batch = train_batch(name, 16, g)
    if "history" in batch:  # one fully padded row (empty history) and one with a single item
        batch["history"][0] = 0
        batch["history"][1, :-1] = 0
    if "input_seq" in batch:
        batch["input_seq"][0] = 0
        batch["target_seq"][0] = 0
    model.train()
    loss = model.loss(batch, generator=g)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), pname

    hist = chains(6, g)
    hist[0] = 0  # empty history
    hist[1, :-2] = 0
    s = scores(model, hist)
    assert s.shape == (6, N + 1)
    assert torch.isneginf(s[:, 0]).all()  # padding is never rankable
    assert torch.isfinite(s[:, 1:]).all()


@pytest.mark.parametrize("name", MODELS)
def test_left_padding_never_changes_scores(name):
    g = torch.Generator().manual_seed(2)
    model = build(name)
    fit(model, name, 3, 1e-3)  # not just the initialisation
    hist = chains(8, g, min_len=1, max_len=6, width=6)
    wider = torch.cat([torch.zeros(8, 4, dtype=torch.long), hist], dim=1)  # same histories, more padding
    torch.testing.assert_close(scores(model, hist, seed=5), scores(model, wider, seed=5))


@pytest.mark.parametrize("name", MODELS)
def test_eval_is_deterministic_given_a_generator(name):
    model = build(name)
    hist = chains(8, torch.Generator().manual_seed(3))
    a, b = scores(model, hist, seed=11), scores(model, hist, seed=11)
    torch.testing.assert_close(a, b)
    if name in ("dreamrec", "diffurec", "diffurecsys"):  # stochastic samplers really use the generator
        assert not torch.equal(a, scores(model, hist, seed=12))


@pytest.mark.parametrize("name", MODELS)
def test_state_dict_round_trip(name):
    model = build(name, seed=0)
    fit(model, name, 15, 3e-3)
    clone = build(name, seed=123)
    clone.load_state_dict(model.state_dict())
    hist = chains(8, torch.Generator().manual_seed(4))
    torch.testing.assert_close(scores(model, hist, seed=9), scores(clone, hist, seed=9))


# --------------------------------------------------------------------------------------------------------
# learning the synthetic task

TRAIN = {  # steps, lr: about twice what each model needed to reach a top-5 hit rate of 0.95+ (seed 0)
    "sasrec": (60, 5e-3),
    "dreamrec": (150, 5e-3),
    "diffurec": (80, 3e-3),
    "diffurecsys": (80, 3e-3),
    "diffrec": (100, 3e-3),
}


def top5_hit_rate(model, name: str) -> float:
    g = torch.Generator().manual_seed(99)
    if name == "diffrec":
        # 3 items of a 4-cycle; the held-out 4th (the one they co-occur with) must rank top-5 among unseen items
        hist = cycle_chains(100, g, 3)
        target = SUCC[hist[:, -1]]
        s = scores(model, hist)
        s.scatter_(1, hist, float("-inf"))  # the evaluator's seen-item mask
    else:
        hist = chains(100, g, min_len=1, max_len=L)
        target = SUCC[hist[:, -1]]
        s = scores(model, hist)
    top5 = s.topk(5, dim=1).indices
    return (top5 == target[:, None]).any(dim=1).float().mean().item()


@pytest.mark.parametrize("name", MODELS)
def test_learns_deterministic_next_item(name):
    model = build(name)
    before = top5_hit_rate(model, name)
    steps, lr = TRAIN[name]
    losses = fit(model, name, steps, lr)
    after = top5_hit_rate(model, name)
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20
    assert after >= 0.8, f"{name}: top-5 hit rate {after:.2f} (before training {before:.2f})"
    assert after > before + 0.3


# --------------------------------------------------------------------------------------------------------
# model-specific behaviour


def test_sasrec_is_causal_and_ignores_padding_targets():
    model = build("sasrec")
    model.eval()
    seq = chains(4, torch.Generator().manual_seed(5), min_len=L, max_len=L)
    changed = seq.clone()
    changed[:, -1] = (changed[:, -1] % N) + 1  # change only the newest item
    a, b = model.encode(seq), model.encode(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])  # earlier positions cannot see it
    assert not torch.allclose(a[:, -1], b[:, -1])
    # the loss only counts positions with a target: zeroing all targets but one = CE of that one position
    model.train(False)
    batch = {"input_seq": seq, "target_seq": torch.zeros_like(seq)}
    batch["target_seq"][:, -1] = SUCC[seq[:, -1]]
    logits = model.encode(seq)[:, -1] @ model.item_emb.weight[1:].T
    expect = torch.nn.functional.cross_entropy(logits, SUCC[seq[:, -1]] - 1)
    torch.testing.assert_close(model.loss(batch), expect)


def test_dreamrec_guidance_sampler_and_preferdiff():
    model = build("dreamrec")
    hist = chains(6, torch.Generator().manual_seed(6))
    model.eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    s2 = model.score_all({"history": hist}, generator=g())
    s0 = model.score_all({"history": hist}, generator=g(), w=0.0)
    assert not torch.allclose(s2, s0)  # w changes the sample
    # steps=k -> DDIM with k steps; one step is x0 = guided f(x_T, T-1)
    x_T = D.randn((6, 32), g())
    h = model.encode(hist)
    expect = model.guided(h, 2.0)(x_T, torch.full((6,), 49, dtype=torch.long))
    torch.testing.assert_close(model.generate(hist, generator=g(), steps=1), expect)
    # PreferDiff loss: finite, differentiable, and different from MSE
    pd = build("dreamrec", loss_type="preferdiff")
    batch = position_batch(16, torch.Generator().manual_seed(7))
    loss = pd.loss(batch, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and pd.item_emb.weight.grad.abs().sum() > 0
    mse = build("dreamrec").loss(batch, generator=torch.Generator().manual_seed(0))
    assert not torch.isclose(loss, mse)


def test_dreamrec_cfg_dropout_rate():
    """p_uncond = 1: the history never reaches the denoiser, so the loss ignores it."""
    model = build("dreamrec", p_uncond=1.0, dropout=0.0)
    model.train()
    batch = position_batch(16, torch.Generator().manual_seed(8))
    other = dict(batch, history=chains(16, torch.Generator().manual_seed(9)))
    a = model.loss(batch, generator=torch.Generator().manual_seed(0))
    b = model.loss(other, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


def test_diffurec_ensemble_of_one_seed_equals_a_single_run():
    model = build("diffurec")
    fit(model, "diffurec", 5, 1e-3)
    model.eval()
    hist = chains(8, torch.Generator().manual_seed(10))
    single = model.score_all({"history": hist}, generator=torch.Generator().manual_seed(7))
    one = model.score_all({"history": hist}, seeds=[7])
    torch.testing.assert_close(single, one)
    # scores are log-probabilities: every row's distribution sums to 1
    torch.testing.assert_close(single[:, 1:].exp().sum(1), torch.ones(8))
    # a 3-seed ensemble is the log of the mean of the three runs' distributions
    runs = [model.score_all({"history": hist}, seeds=[s])[:, 1:].exp() for s in (1, 2, 3)]
    ens = model.score_all({"history": hist}, seeds=[1, 2, 3])
    torch.testing.assert_close(ens[:, 1:], torch.stack(runs).mean(0).log())
    # without a generator (what the evaluator does for non-generative models) inference is still reproducible
    torch.testing.assert_close(model.score_all({"history": hist}), model.score_all({"history": hist}, seeds=[0]))
    # the config's ensemble_seeds drives the same thing from a generator
    sys_model = build("diffurecsys")
    sys_model.eval()
    a = sys_model.score_all({"history": hist}, generator=torch.Generator().manual_seed(3))
    b = sys_model.score_all({"history": hist}, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[:, 1:].exp().sum(1), torch.ones(8))


@pytest.mark.parametrize("name", ["diffurec", "diffurecsys"])
def test_diffurec_every_block_counts(name):
    """DiffuRecSys' reference fed the original input to every block (only the last mattered): not here."""
    model = build(name)
    model.eval()
    hist = chains(4, torch.Generator().manual_seed(11))
    rep, mask = model.history_rep(hist)
    x_t, t = torch.randn(4, 32), torch.full((4,), 5, dtype=torch.long)
    a = model.approximate(rep, mask, x_t, t, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in model.blocks[0].parameters():
            p.add_(0.5 * torch.randn_like(p))
    b = model.approximate(rep, mask, x_t, t, torch.Generator().manual_seed(0))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("name", ["diffurec", "diffurecsys"])
def test_diffurec_last_block_shortcut_is_exact(name):
    model = build(name)
    fit(model, name, 3, 1e-3)
    model.eval()
    hist = chains(6, torch.Generator().manual_seed(14))
    hist[0] = 0
    rep, mask = model.history_rep(hist)
    x_t, t = torch.randn(6, 32), torch.full((6,), 20, dtype=torch.long)
    fast = model.approximate(rep, mask, x_t, t, torch.Generator().manual_seed(0))
    model.last_only = False
    full = model.approximate(rep, mask, x_t, t, torch.Generator().manual_seed(0))
    torch.testing.assert_close(fast, full)


def test_diffurec_uses_x_t_and_offset_noise_is_per_sample_constant(monkeypatch):
    for name in ("diffurec", "diffurecsys"):  # x_t reaches x0_hat (directly, or through cross-attention)
        model = build(name, lambda_uncertainty=1.0)
        model.eval()
        rep, mask = model.history_rep(chains(4, torch.Generator().manual_seed(12)))
        t = torch.full((4,), 3, dtype=torch.long)
        a = model.approximate(rep, mask, torch.zeros(4, 32), t, torch.Generator().manual_seed(0))
        b = model.approximate(rep, mask, torch.ones(4, 32) * 3, t, torch.Generator().manual_seed(0))
        assert not torch.allclose(a, b), name

    seen = []
    real_q_sample = D.q_sample

    def spy(s, x0, t, noise):
        seen.append(noise)
        return real_q_sample(s, x0, t, noise)

    monkeypatch.setattr(D, "q_sample", spy)
    batch = position_batch(512, torch.Generator().manual_seed(13))
    for offset in (0.0, 5.0):
        build("diffurec", offset_noise=offset).loss(batch, generator=torch.Generator().manual_seed(0))
    plain, offset = seen
    # per-sample mean over dimensions: ~N(0, 1/d) without offset, ~N(0, 25 + 1/d) with one constant per sample
    assert plain.mean(1).std() < 0.5
    assert 4.0 < offset.mean(1).std() < 6.0
    # within a sample the offset is constant: the spread around the sample's mean stays ~1
    assert abs((offset - offset.mean(1, keepdim=True)).std() - 1.0) < 0.1


def test_diffrec_multi_hot_importance_sampling_and_reverse():
    model = build("diffrec")
    x = model.multi_hot(torch.tensor([[0, 0, 3, 5], [1, 2, 3, 40]]))
    assert x.shape == (2, N)
    assert x[0].nonzero().flatten().tolist() == [2, 4]  # column j is item j + 1
    assert x[1].nonzero().flatten().tolist() == [0, 1, 2, 39] and x.sum() == 6
    # uniform until every step has history_per_step losses, importance-sampled after
    g = torch.Generator().manual_seed(0)
    model.train()
    assert not bool((model.lt_count == model.config.history_per_step).all())
    for _ in range(20):
        model.loss(user_batch(64, g), generator=g).backward()
    assert bool((model.lt_count == model.config.history_per_step).all())
    model.lt_history.zero_()
    model.lt_history[7] = 1.0  # all the loss mass on step 7 -> almost every sampled t is 7
    t, pt = model.sample_t(1000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert (t == 7).float().mean() > 0.95
    torch.testing.assert_close(pt[t == 7][0], torch.tensor((1 - 0.001 + 0.001 / 10) * 10))
    # inference: sampling_steps=0 runs the reverse mean over all T steps from the clean multi-hot
    model.eval()
    hist = user_batch(4, g)["history"]
    x = model.multi_hot(hist)
    s = model.schedule(x.device)
    for i in reversed(range(10)):
        ti = torch.full((4,), i, dtype=torch.long)
        x = D.q_posterior(s, model.dnn(x, ti), x, ti)[0]
    torch.testing.assert_close(model.score_all({"history": hist})[:, 1:], x)


def test_diffrec_temporal_weights():
    """T-DiffRec: weights linear in the order of the user's interactions, wherever the padding is; the model
    trains on and scores from that vector, and the plain model's vector is the same items at weight 1."""
    model = build("diffrec", w_min=0.1, w_max=1.0)
    x = model.multi_hot(torch.tensor([[0, 0, 3, 5, 7], [9, 8, 0, 0, 0], [4, 0, 0, 0, 0], [2, 6, 2, 0, 0]]))
    torch.testing.assert_close(x[0, [2, 4, 6]], torch.tensor([0.1, 0.55, 1.0]))
    torch.testing.assert_close(x[1, [8, 7]], torch.tensor([0.1, 1.0]))
    torch.testing.assert_close(x[2, 3], torch.tensor(0.1))  # one interaction: linspace(w_min, w_max, 1)
    torch.testing.assert_close(x[3, [1, 5]], torch.tensor([1.0, 0.55]))  # a repeat keeps its latest weight
    assert (x > 0).sum() == 8
    plain = build("diffrec").multi_hot(torch.tensor([[0, 0, 3, 5, 7]]))
    assert plain.sum() == 3 and plain[0, [2, 4, 6]].eq(1).all()
    # the weighted vector is what the reverse pass starts from: a different history order, other scores
    model.eval()
    a = model.score_all({"history": torch.tensor([[3, 5, 7]])})
    b = model.score_all({"history": torch.tensor([[7, 5, 3]])})
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="w_min <= w_max"):
        build("diffrec", w_min=1.0, w_max=0.5)


def test_default_configs_build_at_ml1m_size():
    """The real defaults (not the small test configs) build and score at ML-1M's item count."""
    n = 3416
    g = torch.Generator().manual_seed(0)
    hist = torch.randint(1, n + 1, (2, 30), generator=g)
    hist[0, :20] = 0
    for name, kw in [("sasrec", {}), ("dreamrec", {"sampler": "ddim"}), ("diffurec", {}), ("diffrec", {})]:
        torch.manual_seed(0)
        model = build_model(name, kw, n_items=n)
        model.eval()
        s = model.score_all({"history": hist}, generator=g)
        assert s.shape == (2, n + 1) and torch.isfinite(s[:, 1:]).all() and math.isinf(float(s[0, 0]))


@pytest.mark.parametrize(
    "name, options",
    [
        ("dreamrec", {"sampler": "ddim", "ddim_steps": 5}),
        ("dreamrec", {"schedule": "linear"}),
        ("dreamrec", {"schedule": "cosine", "loss_type": "preferdiff", "pd_centroid": False}),
        ("diffurec", {"reverse_variance": "posterior", "position_embeddings": True}),
        ("diffurec", {"schedule": "linear", "T": 100}),
        ("diffurec", {"schedule": "cosine", "cross_attention": True, "offset_noise": 0.1}),
        ("diffrec", {"sampling_steps": 3, "sampling_noise": True, "reweight": False}),
        ("diffrec", {"timestep_sampling": "uniform", "hidden_dims": [32, 48]}),
        ("sasrec", {"activation": "gelu", "n_heads": 2, "scale_embeddings": False}),
    ],
)
def test_options(name, options):
    model = build(name, **options)
    g = torch.Generator().manual_seed(0)
    model.train()
    loss = model.loss(train_batch(name, 8, g), generator=g)
    loss.backward()
    assert torch.isfinite(loss)
    hist = user_batch(4, g)["history"] if name == "diffrec" else chains(4, g)
    a, b = scores(model, hist, seed=1), scores(model, hist, seed=1)
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a[:, 1:]).all() and torch.isneginf(a[:, 0]).all()


def test_dreamrec_target_stop_gradient():
    """target_grad=False: the x0 loss reaches a target's embedding only through the history encoder, so
    an item that is a target but never in a history gets no gradient; with the reference (True) it does."""
    batch = position_batch(16, torch.Generator().manual_seed(7))
    only_target = sorted(set(batch["target"].tolist()) - set(batch["history"].flatten().tolist()))
    assert only_target
    for flag in (True, False):
        model = build("dreamrec", target_grad=flag, p_uncond=0.0)
        model.train()
        model.loss(batch, generator=torch.Generator().manual_seed(0)).backward()
        g = model.item_emb.weight.grad[only_target].abs().sum().item()
        assert (g > 0) == flag


@pytest.mark.parametrize("name, options", [("diffurecsys", {}), ("diffurec", {"reverse_variance": "posterior"})])
def test_diffurec_stacked_seeds_equal_one_run_at_a_time(name, options):
    """score_all runs every seed of an ensemble in one stack (one approximator call per reverse step for all
    users and seeds); each run must be the run its seed makes alone. In float64 the stack's only difference is
    matmul blocking, ~1e-15, so 1e-9 separates it from any difference in the noise drawn (O(1) in the scores)."""
    model = build(name, **options).double()
    fit(model, name, 5, 1e-3)
    model.eval()
    hist = chains(7, torch.Generator().manual_seed(15))
    hist[0] = 0  # an empty history stays in the stack
    seeds = [4, 9, 2]
    alone = [model.score_all({"history": hist}, seeds=[s])[:, 1:] for s in seeds]
    for a, b in zip(alone, alone[1:]):
        assert (a - b).abs().max() > 1e-3  # the seeds really draw different noise
    stacked = model.score_all({"history": hist}, seeds=seeds)
    expect = torch.logsumexp(torch.stack(alone), dim=0) - math.log(len(seeds))
    torch.testing.assert_close(stacked[:, 1:], expect, rtol=1e-9, atol=1e-9)
    assert torch.isneginf(stacked[:, 0]).all()
    # the stacked reverse returns each seed's own run, in seed order
    runs = model.reverse(hist, [torch.Generator().manual_seed(s) for s in seeds]).view(3, 7, -1)
    for j, s in enumerate(seeds):
        torch.testing.assert_close(runs[j], model.reverse(hist, torch.Generator().manual_seed(s)), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["diffurec", "diffurecsys"])
def test_diffurec_bf16_scoring(name):
    """evaluate.dtype=bfloat16 runs the approximator under autocast: scores stay float32, the noise is the
    float32 run's, so only bf16 rounding (relative 2^-8 per product) separates the two, far below the spread
    of the scores, and a trained model ranks the same next items. dtype=float32 is the plain run, exactly."""
    model = build(name)
    fit(model, name, 60, 3e-3)
    model.eval()
    hist = chains(128, torch.Generator().manual_seed(3), min_len=2)
    seeds = [0, 1]
    f32 = model.score_all({"history": hist}, seeds=seeds)
    torch.testing.assert_close(model.score_all({"history": hist}, seeds=seeds, dtype=torch.float32), f32,
                               rtol=0, atol=0)
    bf = model.score_all({"history": hist}, seeds=seeds, dtype=torch.bfloat16)
    assert bf.dtype == torch.float32 and torch.isneginf(bf[:, 0]).all()
    diff = (bf[:, 1:] - f32[:, 1:]).abs()
    assert diff.max() > 0, "autocast did not engage"
    assert diff.mean() < 0.05 * f32[:, 1:].std(), (diff.mean(), f32[:, 1:].std())
    target = SUCC[hist[:, -1]]
    hit = lambda s: (s.argmax(1) == target).float().mean().item()
    assert hit(f32) >= 0.8  # trained: the comparison below is about rankings that mean something
    assert abs(hit(bf) - hit(f32)) <= 0.05


def test_dreamrec_train_t_sampler_noises_only_the_sampler_timesteps(monkeypatch):
    """train_t="sampler" with a k-step DDIM sampler draws t from its k timesteps alone; with DDPM (which visits
    every t) and with "all" it draws from all T."""
    seen: list[torch.Tensor] = []
    real = D.q_sample

    def spy(s, x0, t, noise):
        seen.append(t.clone())
        return real(s, x0, t, noise)

    monkeypatch.setattr(D, "q_sample", spy)
    batch = position_batch(512, torch.Generator().manual_seed(11))
    for opts, expect in [({"sampler": "ddim", "ddim_steps": 1, "train_t": "sampler"}, {49}),
                         ({"sampler": "ddim", "ddim_steps": 4, "train_t": "sampler"}, set(D.ddim_timesteps(50, 4))),
                         ({"sampler": "ddpm", "train_t": "sampler"}, None),
                         ({"sampler": "ddim", "ddim_steps": 1}, None)]:
        seen.clear()
        build("dreamrec", **opts).loss(batch, generator=torch.Generator().manual_seed(0))
        got = set(seen[0].tolist())
        if expect is None:
            assert len(got) > 40, opts  # 512 draws over 50 timesteps cover nearly all of them
        else:
            assert got == expect, opts
    with pytest.raises(ValueError, match="train_t"):
        build("dreamrec", train_t="last")


SEQUENCE_LAYOUT = {"dreamrec": {"train_layout": "sequence", "sampler": "ddim", "ddim_steps": 1, "train_t": "sampler"},
                   "diffurec": {"train_layout": "sequence"},
                   "diffurecsys": {"train_layout": "sequence"}}


@pytest.mark.parametrize("name", list(SEQUENCE_LAYOUT))
def test_sequence_layout_learns_the_next_item(name):
    """train_layout="sequence": "sequence" batches (a target at every position, whole histories in chunks);
    the model still scores from histories and learns the synthetic task in fewer steps than TRAIN gives the
    one-target-per-row layout."""
    model = build(name, **SEQUENCE_LAYOUT[name])
    assert model.train_mode == "sequence" and model.chunked
    assert build(name).train_mode == "position"
    before = top5_hit_rate(model, name)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN[name][1], weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(TRAIN[name][0] // 2):
        loss = model.loss(sequence_batch(16, g), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = top5_hit_rate(model, name)
    assert sum(losses[-10:]) < sum(losses[:10])
    assert after >= 0.8 and after > before + 0.3, f"{name}: top-5 hit rate {before:.2f} -> {after:.2f}"


def test_dreamrec_sequence_loss_of_one_target_equals_the_position_loss():
    """A sequence batch whose only target is the last position is the position batch of that sample: the same
    encoder output (the encoder is causal) and the same draws, so the same loss."""
    model = build("dreamrec", train_layout="sequence", dropout=0.0)
    model.train()
    pos = position_batch(16, torch.Generator().manual_seed(12))
    seq = {"input_seq": pos["history"], "target_seq": torch.zeros_like(pos["history"])}
    seq["target_seq"][:, -1] = pos["target"]
    a = model.loss(pos, generator=torch.Generator().manual_seed(0))
    b = model.loss(seq, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["diffurec", "diffurecsys"])
def test_diffurec_per_position_targets_never_leak_backwards(name):
    """Per-position x_t ("sequence" training): position i's x0_hat reads items <= i and the noisy targets of
    positions <= i only, so changing a later item or a later position's x_t leaves it unchanged."""
    model = build(name, train_layout="sequence")
    model.eval()
    seq = chains(4, torch.Generator().manual_seed(13), min_len=L, max_len=L)
    rep, mask = model.history_rep(seq)
    g = torch.Generator().manual_seed(1)
    x_t, t = D.randn((4, L, 32), g, "cpu", torch.float32), torch.randint(0, model.config.T, (4, L), generator=g)
    out = model.approximate(rep, mask, x_t, t, torch.Generator().manual_seed(2))
    x_t2 = x_t.clone()
    x_t2[:, 6:] += 1.0
    seq2 = seq.clone()
    seq2[:, 6:] = seq2[:, 6:] % N + 1
    rep2, mask2 = model.history_rep(seq2)
    for r, m, x in [(rep, mask, x_t2), (rep2, mask2, x_t)]:
        out2 = model.approximate(r, m, x, t, torch.Generator().manual_seed(2))
        torch.testing.assert_close(out2[:, :6], out[:, :6])
        assert not torch.allclose(out2[:, 6:], out[:, 6:])
