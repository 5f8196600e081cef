"""The cold-item protocol (data.cold_items) and the baselines it is read against (pop, textnn), on a catalog
the test builds: items enter it one after another, so "the newest by first interaction" is known."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from recpipe.artifacts import run_stage
from recpipe.config import load_config
from recpipe.errors import ConfigError
from recpipe.models.base import build_model
from recpipe.pipeline import data as D
from recpipe.pipeline import evaluate as E
from recpipe.pipeline import train as T
from recpipe.pipeline import whiten

N_ITEMS, N_USERS, PER_USER = 40, 120, 10
QUIET = dict(log=lambda m: None)


def build_catalog(tmp_path: Path, seed: int = 0) -> Path:
    """Item k (original id 100 + k) is first available at time 10 k; each user picks PER_USER items and meets
    them in that order, so the newest items are the highest ids and many users end on one of them."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(N_USERS):
        for k in np.sort(rng.choice(N_ITEMS, PER_USER, replace=False)):
            rows.append((f"u{u}", 100 + int(k), 10 * int(k) + int(rng.integers(5))))
    d = tmp_path / "data" / "cat"
    d.mkdir(parents=True)
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(d / "interactions.csv", index=False)
    pd.DataFrame({"item_id": 100 + np.arange(N_ITEMS), "title": [f"item {k}" for k in range(N_ITEMS)],
                  "genres": ["Comedy", "Drama"] * (N_ITEMS // 2)}).to_csv(d / "items.csv", index=False)
    return tmp_path / "data"


def cfg_for(tmp_path: Path, run: str, **over):
    base = {"run.dataset": "cat", "run.data_dir": str(tmp_path / "data"), "run.run_dir": str(tmp_path / run),
            "data.kcore": 2, "train.epochs": 2, "train.batch_size": 64, "train.warmup_steps": 5,
            "train.threads": 1}
    return load_config(None, {**base, **over})


def fake_embed(cfg, dim: int = 8, seed: int = 0) -> np.ndarray:
    """An embed stage of random unit vectors (what `recpipe embed` writes, minus the TEM)."""
    ds = D.load_run(cfg.run_dir)
    V = np.random.default_rng(seed).standard_normal((ds.n_items + 1, dim)).astype(np.float32)
    V /= np.linalg.norm(V, axis=1, keepdims=True)
    V[0] = 0

    def build(out: Path):
        np.save(out / "item_embeddings.npy", V)
        return {"tem": "test", "model": "random", "dim": dim, "normalized": True}

    run_stage(cfg.run_dir, "embed", {"fake": True, "seed": seed}, {"data": "x"}, build)
    return V


@pytest.fixture
def cold_run(tmp_path):
    build_catalog(tmp_path)
    cfg = cfg_for(tmp_path, "cold", **{"data.cold_items": 0.1})
    res = D.run(cfg, **QUIET)
    return cfg, res


# ------------------------------------------------------------------------------------------------ data
def test_cold_items_appear_only_as_test_targets(tmp_path, cold_run):
    cfg, res = cold_run
    ds = D.load_run(cfg.run_dir)
    assert list(ds.cold_items) == [37, 38, 39, 40]  # the 4 newest (dense ids of originals 136..139)
    is_cold = np.isin(np.arange(N_ITEMS + 1), ds.cold_items)
    groups = ds.test_groups()
    for u in range(ds.n_users):
        s = ds.sequence(u)
        assert len(s) >= 3
        assert not is_cold[s[:-1]].any()  # training and validation parts
        assert is_cold[s[-1]] == (u in groups["cold"])
    assert len(groups["cold"]) > 10 and len(groups["cold"]) + len(groups["warm"]) == ds.n_users
    assert not np.intersect1d(groups["cold"], groups["warm"]).size
    # every item keeps its row (text models rank cold items), and users keep their other items in order
    plain = cfg_for(tmp_path, "plain")
    D.run(plain, **QUIET)
    base = D.load_run(plain.run_dir)
    assert ds.items.equals(base.items)
    kept = {uid: u for u, uid in enumerate(ds.users["user_id"])}
    for u, uid in enumerate(base.users["user_id"]):
        s = base.sequence(u)
        want = np.r_[s[:-1][~is_cold[s[:-1]]], s[-1]]
        if uid in kept:
            assert np.array_equal(ds.sequence(kept[uid]), want)
        else:
            assert len(want) < 3
    summary = res.manifest.info["summary"]["cold"]
    assert summary["items"] == 4 and summary["dropped_users"] == base.n_users - ds.n_users
    assert summary["cold_test_users"] == len(groups["cold"])
    lines = dict(D.format_summary(res.manifest.info["summary"]))
    assert "users dropped" in lines["test users"]


def test_default_split_is_unchanged(tmp_path, cold_run):
    """cold_items = 0 records the config it always recorded and writes the files it always wrote, so data
    stages made before the option stay current."""
    plain = cfg_for(tmp_path, "plain")
    first = D.run(plain, **QUIET)
    assert first.manifest.config["data"] == {"dedup": "first", "kcore": 2, "max_len": 200, "min_rating": 0.0}
    assert sorted(first.manifest.outputs) == ["items.parquet", "sequences.npz", "users.parquet"]
    assert D.load_run(plain.run_dir).test_groups() is None
    # the same settings in a fresh directory: byte-identical artifacts
    again = D.run(cfg_for(tmp_path, "plain2", **{"data.cold_items": 0}), **QUIET)
    assert again.manifest.outputs == first.manifest.outputs and again.manifest.config == first.manifest.config
    assert D.run(plain, **QUIET).skipped
    cfg, res = cold_run
    assert res.manifest.config["data"]["cold_items"] == 0.1 and "cold.npz" in res.manifest.outputs


@pytest.mark.parametrize("value", ["-0.1", "1", "1.5", "nan", "lots"])
def test_bad_cold_items_is_one_config_error(tmp_path, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, {"data.cold_items": value})
    assert "data.cold_items" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- models
def test_pop_ranks_by_training_count():
    m = build_model("pop", {}, n_items=6)
    m.observe_training(torch.tensor([0, 1, 1, 3, 0, 2, 0]))  # the trainer's counts of the training items
    assert m.counts.tolist() == [0, 1, 1, 3, 0, 2, 0]
    m.train()
    m.loss({"history": torch.tensor([[4, 4, 4]])})  # batches teach it nothing
    assert m.counts[4] == 0
    s = m.score_all({"history": torch.tensor([[1]])})
    assert s[0, 0] == -torch.inf
    assert s[0, 1:].argsort(descending=True, stable=True).tolist()[:3] == [2, 4, 0]  # items 3, 5, then 1
    assert [p.requires_grad for p in m.parameters()] == [True]  # the trainer's optimiser needs one


def test_pop_counts_every_training_interaction_once(tmp_path, cold_run, one_thread):
    """The trainer hands pop the training parts of the data stage's sequences: its counts are those of the
    split's training interactions, whatever the batches or processes."""
    cfg, _ = cold_run
    T.run(cfg, "pop", progress=False, **QUIET)
    from safetensors.torch import load_file

    counts = load_file(str(cfg.run_dir / "train" / "pop" / "model.safetensors"))["counts"]
    ds = D.load_run(cfg.run_dir)
    want = np.zeros(ds.n_items + 1, dtype=np.int64)
    for u in range(ds.n_users):
        np.add.at(want, ds.seq_items[ds.offsets[u]: ds.offsets[u + 1] - 2], 1)
    want[0] = 0
    assert counts.tolist() == want.tolist() and want.sum() > 0


def test_textnn_ranks_the_last_items_nearest_text_vector_first():
    g = torch.Generator().manual_seed(0)
    V = torch.cat([torch.zeros(1, 8), torch.randn(10, 8, generator=g)])
    V[7] = V[3] * 0.9 + 0.05 * torch.randn(8, generator=g)  # item 7 is the nearest to item 3 but itself
    m = build_model("textnn", {}, n_items=10, item_vectors=V)
    s = m.score_all({"history": torch.tensor([[5, 3], [0, 3]])})
    torch.testing.assert_close(s[:, 1:], (V[3] @ V[1:].T).expand(2, -1))
    others = s[0].clone()
    others[3] = -torch.inf  # the seen-masked column hides the item itself
    assert int(others.argmax()) == 7
    assert torch.equal(m.generate({"history": torch.tensor([[5, 3]])})[0], V[3])
    assert m.uses_text and not m.uses_intent and torch.equal(m.item_table(), V)


# ------------------------------------------------------------------------------------ train + evaluate
def _rows(res) -> dict[str, dict]:
    return {r["name"]: r for r in res.manifest.info["rows"]}


def test_evaluate_reports_all_cold_and_warm_users_and_baselines_train(tmp_path, cold_run, one_thread):
    cfg, _ = cold_run
    ds = D.load_run(cfg.run_dir)
    groups = ds.test_groups()
    fake_embed(cfg)
    out = {}
    for name in ("pop", "textnn"):
        T.run(cfg, name, progress=False, **QUIET)
        out[name] = ev = E.run(cfg, name, progress=False, **QUIET)
        rows = _rows(ev)
        assert list(rows) == [name, f"{name} [cold targets]", f"{name} [warm targets]"]
        assert [rows[n]["group"] for n in rows] == ["all", "cold", "warm"]
        assert rows[f"{name} [cold targets]"]["users"] == len(groups["cold"])
        assert rows[f"{name} [warm targets]"]["users"] == len(groups["warm"])
        for col in ("masked", "unmasked"):  # the groups split the users: their means weigh back to the whole
            whole = sum(rows[f"{name} [{g} targets]"][col]["NDCG@10"] * len(groups[g]) for g in groups)
            assert whole / ds.n_users == pytest.approx(rows[name][col]["NDCG@10"])
        table = (ev.stage_dir / "table.md").read_text()
        assert f"| {name} [cold targets] |" in table and "| users |" in table
        saved = json.loads((ev.stage_dir / "metrics.json").read_text())
        assert [r["name"] for r in saved["rows"]] == list(rows)
    # popularity never ranks an item nobody trained on (count 0, ties against the target): 36 warm items with
    # counts come first; text vectors rank cold items like any other
    assert _rows(out["pop"])["pop [cold targets]"]["unmasked"]["HR@20"] == 0.0
    assert _rows(out["textnn"])["textnn [cold targets]"]["unmasked"]["MRR"] > 0.0


def test_idreamrec_residual_of_a_cold_item_stays_zero(tmp_path, cold_run, one_thread):
    """CE over every item (and PreferDiff's random negatives) would train every row of the residual; a cold
    item's row, which no training batch holds, gets no gradient and is zero at scoring."""
    cfg, _ = cold_run
    fake_embed(cfg)
    for loss in ("ce", "preferdiff"):
        c = cfg_for(tmp_path, "cold", **{
            "data.cold_items": 0.1, "train.model": "idreamrec", "train.epochs": 1, "model.idreamrec.loss": loss,
            "model.idreamrec.item_residual": True, "model.idreamrec.width": 16, "model.idreamrec.heads": 2,
            "model.idreamrec.depth": 1, "model.idreamrec.history_len": 5, "model.idreamrec.window": 4})
        whiten.run(c, **QUIET)
        T.run(c, progress=False, force=True, **QUIET)
        from recpipe.pipeline import bundle

        run = bundle.load(c, "idreamrec", **QUIET)
        W = run.model.item_residual.weight.detach()
        cold = run.ds.cold_items
        assert (W[cold] == 0).all(), loss
        trained = np.unique(np.concatenate([run.ds.sequence(u)[:-2] for u in range(run.ds.n_users)]))
        assert (W[trained] != 0).any(dim=1).all(), loss  # an item of some training part has learned
        assert not np.intersect1d(trained, cold).size
        torch.testing.assert_close(run.model.item_table()[cold], run.model.item_vectors[cold], rtol=0, atol=0)
    ev = E.run(c, "idreamrec", progress=False, **QUIET)
    assert {r.get("group") for r in ev.manifest.info["rows"]} == {"all", "cold", "warm"}


def test_idreamrec_new_item_vector_reaches_the_cold_items(tmp_path, cold_run, one_thread):
    """new_items through the trainer: the items no training part holds are the cold items, the newest by
    first training interaction are the ones trained in the new form, and a cold item scores as its text plus
    the learned new-item vector, after a reload too."""
    cfg, _ = cold_run
    fake_embed(cfg)
    c = cfg_for(tmp_path, "cold", **{
        "data.cold_items": 0.1, "train.model": "idreamrec", "train.epochs": 1, "model.idreamrec.loss": "ce",
        "model.idreamrec.item_residual": True, "model.idreamrec.new_items": 0.2, "model.idreamrec.width": 16,
        "model.idreamrec.heads": 2, "model.idreamrec.depth": 1, "model.idreamrec.history_len": 5,
        "model.idreamrec.window": 4})
    whiten.run(c, **QUIET)
    T.run(c, progress=False, force=True, **QUIET)
    from recpipe.pipeline import bundle

    run = bundle.load(c, "idreamrec", **QUIET)
    m, ds = run.model, run.ds
    cold = ds.cold_items
    first = np.full(ds.n_items + 1, np.inf)
    for u in range(ds.n_users):
        part = slice(ds.offsets[u], ds.offsets[u + 1] - 2)
        np.minimum.at(first, ds.seq_items[part], ds.seq_times[part].astype(float))
    trained = np.flatnonzero(np.isfinite(first))
    unseen = m.unseen.nonzero().squeeze(1).numpy()  # every cold item, and any only a held-out target holds
    assert np.isin(cold, unseen).all()
    assert unseen.tolist() == np.setdiff1d(np.arange(1, ds.n_items + 1), trained).tolist()
    newest = m.newest.nonzero().squeeze(1).numpy()
    assert len(newest) == round(0.2 * len(trained))
    assert first[newest].min() >= first[np.setdiff1d(trained, newest)].max()  # the latest first interactions
    assert m.new_vec.abs().sum() > 0  # learned from the newest items' steps in the new form
    table = m.item_table().detach()
    torch.testing.assert_close(table[cold], m.item_vectors[cold] + m.new_vec.detach())
    assert (table[trained] != m.item_vectors[trained]).any(dim=1).all()  # their own residuals
    ev = E.run(c, "idreamrec", progress=False, **QUIET)
    assert {r.get("group") for r in ev.manifest.info["rows"]} == {"all", "cold", "warm"}


def test_new_item_offset_is_chosen_on_validation_and_reaches_scoring_and_recommend(tmp_path, cold_run, one_thread):
    """train.new_bias_grid: the finished run resumes and only sweeps; each offset is scored with the training's
    newest items as new items; the chosen one is the checkpoint's, raises exactly the cold items' scores by
    offset x the oracle's norm, and recommend's index path returns what score_all ranks."""
    from recpipe.pipeline import bundle
    from recpipe.pipeline.recommend import RecommendService

    cfg, _ = cold_run
    fake_embed(cfg)
    over = {"data.cold_items": 0.1, "train.model": "idreamrec", "train.epochs": 1, "model.idreamrec.loss": "ce",
            "model.idreamrec.item_residual": True, "model.idreamrec.new_items": 0.2, "model.idreamrec.new_drop": 1,
            "model.idreamrec.width": 16, "model.idreamrec.heads": 2, "model.idreamrec.depth": 1,
            "model.idreamrec.history_len": 5, "model.idreamrec.window": 4}
    c = cfg_for(tmp_path, "cold", **over)
    whiten.run(c, **QUIET)
    plain = T.run(c, progress=False, **QUIET)
    assert "new_bias" not in plain.manifest.info
    assert "new_bias_grid" not in T.train_config_dict(c, "idreamrec")["train"]
    c2 = cfg_for(tmp_path, "cold", **over, **{"train.new_bias_grid": "1,5,40"})
    logs: list[str] = []
    res = T.run(c2, progress=False, log=logs.append)
    assert any("resuming at step" in m for m in logs)
    assert res.manifest.info["steps"] == plain.manifest.info["steps"]
    nb = res.manifest.info["new_bias"]
    by = nb["valid_ndcg10_masked"]
    assert nb["grid"] == [0.0, 1.0, 5.0, 40.0] and set(by) == {"0", "1", "5", "40"}
    assert by[f"{nb['new_bias']:g}"] == max(by.values())
    # an offset of 40 norms puts the newest items above every other: the figure moves with the offset
    assert len(set(by.values())) > 1
    run = bundle.load(c2, "idreamrec", **QUIET)
    m, ds = run.model, run.ds
    assert m.config.new_bias == nb["new_bias"]
    from recpipe.pipeline.batches import Batcher
    from recpipe.pipeline.scoring import evaluate_split

    b = Batcher(ds, m.history_len)

    r = evaluate_split(m, b, "valid", [10], score_kwargs={"new_bias": 40.0, "pseudo_new": True}, seed=c2.run.seed)
    assert r["masked"]["NDCG@10"] == pytest.approx(by["40"], abs=1e-6)
    # score_all: the offset goes to the unseen (cold) items alone, in units of the oracle's norm
    batch, _ = b.eval_batch(np.arange(8), "test")
    g = torch.Generator().manual_seed(0)
    s0 = m.score_all(batch, new_bias=0.0, generator=torch.Generator().manual_seed(0))
    s3 = m.score_all(batch, new_bias=3.0, generator=torch.Generator().manual_seed(0))
    oracle = m.generate(batch, generator=g)
    diff = (s3 - s0)[:, 1:]
    new = m.unseen.numpy()  # the cold items, and any item only a held-out target holds
    assert new[ds.cold_items].all()
    torch.testing.assert_close(diff[:, new[1:]], (3.0 * oracle.norm(dim=1, keepdim=True)).expand(-1, int(new.sum())))
    assert (diff[:, ~new[1:]] == 0).all()
    # recommend through the index: the same top items as ranking score_all with the history masked
    svc = RecommendService(c2)
    m2 = svc.model
    cold_set = set(ds.cold_items.tolist())
    mixed = False
    for bias in (0.5, 1.0, 2.0, 4.0):
        m2.config.new_bias = bias
        for user in ds.users["user_id"].head(6):
            recs = svc.recommend(str(user), k=10)
            seq = ds.sequence(ds.user_index(user))
            L = m2.history_len
            hist = np.zeros((1, L), dtype=np.int64)
            hist[0, L - len(seq[-L:]):] = seq[-L:]
            gen = torch.Generator().manual_seed(c2.run.seed)
            with torch.no_grad():
                s = m2.score_all({"history": torch.from_numpy(hist)}, generator=gen)[0]
            s[torch.from_numpy(seq)] = -torch.inf
            want = torch.topk(s, 10).indices.tolist()
            assert [r.item for r in recs] == want, (bias, user)
            assert [r.score for r in recs] == pytest.approx(s[want].tolist(), rel=1e-5, abs=1e-5)
            mixed |= bool(cold_set & set(want)) and not set(want) <= cold_set
    assert mixed  # some case ranks new and trained items together
    # the server's batched path applies the same offset
    from recpipe.serve.engine import Engine

    eng = Engine(c2, log=lambda m: None)
    eng.model.config.new_bias = m2.config.new_bias = 2.0
    us = [str(u) for u in ds.users["user_id"].head(6)]
    answers = eng.run_batch([eng.parse(u, None, None, 10, None, None, None, True) for u in us])
    for u, a in zip(us, answers):
        assert [x["id"] for x in a.items] == [r.item_id for r in svc.recommend(u, k=10)]
    # a grid for a model without new items is refused before it trains; the finished run stays as it was
    done = sorted((p.name, p.read_bytes()) for p in (c2.run_dir / "train" / "idreamrec").iterdir() if p.is_file())
    c3 = cfg_for(tmp_path, "cold", **{**over, "model.idreamrec.new_items": 0.0, "train.new_bias_grid": "1"})
    with pytest.raises(ConfigError, match="new_items > 0"):
        T.run(c3, progress=False, **QUIET)
    assert sorted((p.name, p.read_bytes()) for p in (c2.run_dir / "train" / "idreamrec").iterdir()
                  if p.is_file()) == done


def test_held_out_newest_items_are_never_targets_and_choose_the_offset(tmp_path, cold_run, one_thread):
    """new_holdout: the newest training items by first interaction are no target, no CE class and no negative;
    the validation sweep offsets exactly them (and the untrained items), as test scoring and recommend do."""
    from recpipe.pipeline import bundle
    from recpipe.pipeline.batches import Batcher

    cfg, _ = cold_run
    fake_embed(cfg)
    over = {"data.cold_items": 0.1, "train.model": "idreamrec", "train.epochs": 1, "model.idreamrec.loss": "ce",
            "model.idreamrec.item_residual": True, "model.idreamrec.new_items": 0.2, "model.idreamrec.new_drop": 1,
            "model.idreamrec.new_holdout": 0.1, "model.idreamrec.width": 16, "model.idreamrec.heads": 2,
            "model.idreamrec.depth": 1, "model.idreamrec.history_len": 5, "model.idreamrec.window": 4,
            "train.new_bias_grid": "1,40"}
    c = cfg_for(tmp_path, "cold", **over)
    whiten.run(c, **QUIET)
    logs: list[str] = []
    res = T.run(c, progress=False, log=logs.append)
    assert any("held-out newest items as new" in m for m in logs)
    run = bundle.load(c, "idreamrec", **QUIET)
    m, ds = run.model, run.ds
    first = np.full(ds.n_items + 1, np.inf)
    for u in range(ds.n_users):
        part = slice(ds.offsets[u], ds.offsets[u + 1] - 2)
        np.minimum.at(first, ds.seq_items[part], ds.seq_times[part].astype(float))
    trained = np.flatnonzero(np.isfinite(first))
    held = m.heldout.nonzero().squeeze(1).numpy()
    newest = m.newest.nonzero().squeeze(1).numpy()
    assert len(held) == round(0.1 * len(trained)) and np.isin(held, newest).all()
    assert first[held].min() >= first[np.setdiff1d(trained, held)].max()  # the latest of the training items
    # never a target: a batch whose targets are all held out trains nothing, and no CE class is theirs
    m.observe_training(torch.from_numpy(np.isfinite(first).astype(np.int64)), torch.from_numpy(
        np.where(np.isfinite(first), first, 0)))
    assert not m._known[torch.from_numpy(held)].any() and m._known[torch.from_numpy(np.setdiff1d(trained, held))].all()
    b = Batcher(ds, m.history_len)
    batch, _ = b.eval_batch(np.arange(8), "valid")
    win = batch["history"]  # (B, 5) windows; their last 4 slots' targets all held-out items
    tgt = torch.from_numpy(np.resize(held, (len(win), 4)))
    m.train()
    m.zero_grad()
    loss = m.loss({"window": win, "target": tgt}, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(p.grad is None or not p.grad.any() for p in m.parameters())
    m.eval()
    # the sweep and test scoring offset the same items: held-out ones and those with no training data
    offset = m.offset_items().numpy()
    assert offset[held].all() and offset[ds.cold_items].all()
    assert offset.sum() == len(held) + int(m.unseen.sum())
    with torch.no_grad():
        s0 = m.score_all(batch, new_bias=0.0, generator=torch.Generator().manual_seed(0))
        s5 = m.score_all(batch, new_bias=5.0, generator=torch.Generator().manual_seed(0))
        p5 = m.score_all(batch, new_bias=5.0, pseudo_new=True, generator=torch.Generator().manual_seed(0))
        oracle = m.generate(batch, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p5, s5)
    diff = (s5 - s0)[:, 1:]
    want = (5.0 * oracle.norm(dim=1, keepdim=True)).expand(-1, int(offset.sum()))
    torch.testing.assert_close(diff[:, offset[1:]], want)
    assert (diff[:, ~offset[1:]] == 0).all()
    ids, bias = m.new_item_offset()
    assert sorted(ids.tolist()) == np.flatnonzero(offset).tolist() and bias == res.manifest.info["new_bias"]["new_bias"]


@pytest.mark.parametrize("holdout", [0.3, -0.1])
def test_new_holdout_outside_new_items_is_refused(holdout):
    from recpipe.models.idreamrec import IDreamRecConfig

    with pytest.raises(ValueError, match="new_holdout must be in"):
        IDreamRecConfig(new_items=0.2, new_holdout=holdout)
