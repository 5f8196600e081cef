"""Train / evaluate / recommend stages end to end on a dataset the test builds (no ../shared needed).

The synthetic catalog has a learnable rule (the next item follows from the last one) and item "text" vectors
that carry the item's identity, so a working trainer must beat chance by a wide margin.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from toy_data import N_ITEMS, build_toy, next_item

from recpipe import progress
from recpipe.artifacts import run_stage
from recpipe.config import load_config
from recpipe.errors import ArtifactError, ConfigError, DataError
from recpipe.pipeline import batches as B
from recpipe.pipeline import bundle
from recpipe.pipeline import data as D
from recpipe.pipeline import evaluate as E
from recpipe.pipeline import intents as I
from recpipe.pipeline import scoring as S
from recpipe.pipeline import train as T


def _next(i: int) -> int:
    return next_item(i)


def _build(tmp_path: Path, n_users: int = 200, length: int = 12, seed: int = 0) -> Path:
    return build_toy(tmp_path, n_users, length, seed)


def _cfg(tmp_path: Path, **over):
    base = {"run.dataset": "toy", "run.data_dir": str(tmp_path / "data"), "run.cache_dir": str(tmp_path / "cache"),
            "data.kcore": 2, "train.epochs": 30, "train.batch_size": 32, "train.warmup_steps": 10,
            "train.patience": 30, "train.threads": 2}
    base.update(over)
    return load_config(None, base)


def _fake_embed(cfg, dim: int = 16, seed: int = 0) -> None:
    """An embed stage with random unit vectors (what `recpipe embed` writes, minus the TEM)."""
    ds = D.load(cfg.run_dir / "data")
    rng = np.random.default_rng(seed)

    def build(out: Path):
        E_ = rng.standard_normal((ds.n_items + 1, dim)).astype(np.float32)
        E_ /= np.linalg.norm(E_, axis=1, keepdims=True)
        E_[0] = 0
        np.save(out / "item_embeddings.npy", E_)
        return {"tem": "test", "model": "random", "dim": dim, "normalized": True}

    run_stage(cfg.run_dir, "embed", {"fake": True, "seed": seed}, {"data": "x"}, build)


def test_sasrec_train_evaluate_recommend(tmp_path):
    _build(tmp_path)
    cfg = _cfg(tmp_path, **{"train.model": "sasrec", "train.lr": 5e-3, "train.epochs": 8,
                            "model.sasrec.history_len": 12})
    D.run(cfg, log=lambda m: None)
    res = T.run(cfg, log=lambda m: None, progress=False)
    assert not res.skipped
    info = res.manifest.info
    assert info["valid"]["masked"]["NDCG@10"] > 0.6, info["valid"]  # chance is ~0.05
    assert (res.stage_dir / "model.safetensors").exists() and (res.stage_dir / "log.jsonl").exists()
    assert T.run(cfg, log=lambda m: None, progress=False).skipped
    ev = E.run(cfg, log=lambda m: None)
    row = ev.manifest.info["rows"][0]
    assert row["users"] == D.load(cfg.run_dir / "data").n_users
    assert row["masked"]["HR@10"] > 0.7
    from recpipe.pipeline.recommend import RecommendService

    svc = RecommendService(cfg)
    recs = svc.recommend("0", k=5)
    assert len(recs) == 5 and [r.rank for r in recs] == [1, 2, 3, 4, 5]
    seen = set(D.load(cfg.run_dir / "data").sequence(0).tolist())
    assert not seen & {r.item for r in recs}, "seen items are never recommended"
    with pytest.raises(DataError, match="unknown user"):
        svc.recommend("nobody")
    for bad in ({"k": 0}, {"k": -2}, {"steps": 0}):  # 0 is an error, never silently the default
        with pytest.raises(ConfigError, match="must be >= 1"):
            svc.recommend("0", **bad)
    for bad in ({"w": float("nan")}, {"rho": float("inf")}):  # was a misleading "diverged model?" error
        with pytest.raises(ConfigError, match="must be a finite number"):
            svc.recommend("0", **bad)


def test_length_pooled_sequence_training_learns(tmp_path):
    """train.length_pool on SASRec's sequence batches (short and long histories mixed): it trains as well
    as a plain shuffle on the toy rule, and it is part of the fingerprint (a pooled run is a new run)."""
    rng = np.random.default_rng(1)
    rows = []
    for u in range(200):
        i = int(rng.integers(N_ITEMS))
        for j in range(int(rng.choice([4, 5, 6, 30]))):
            rows.append((u, 100 + i, j))
            i = _next(i) if rng.random() < 0.9 else int(rng.integers(N_ITEMS))
    d = tmp_path / "data" / "toy"
    d.mkdir(parents=True)
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).drop_duplicates(["user_id", "item_id"]).to_csv(
        d / "interactions.csv", index=False)
    over = {"train.model": "sasrec", "train.lr": 5e-3, "train.epochs": 8, "model.sasrec.history_len": 30}
    cfg = _cfg(tmp_path, **over)
    D.run(cfg, log=lambda m: None)
    plain = T.run(cfg, log=lambda m: None, progress=False).manifest.info["valid"]["masked"]["NDCG@10"]
    cfg = _cfg(tmp_path, **over, **{"train.length_pool": 4})
    res = T.run(cfg, log=lambda m: None, progress=False)
    assert not res.skipped, "length_pool is part of the training fingerprint"
    pooled = res.manifest.info["valid"]["masked"]["NDCG@10"]
    assert pooled > 0.5 and pooled > plain - 0.05, (pooled, plain)  # chance is ~0.05


def test_evaluation_batches_users_of_similar_length(tmp_path):
    """Users are scored in order of history length, so a batch is only as wide as its own longest history;
    every user is still scored once, and the metrics are the same as one unsorted pass."""
    import torch

    from recpipe.models.base import Recommender

    rng = np.random.default_rng(3)
    d = tmp_path / "data" / "toy"
    d.mkdir(parents=True)
    rows = []
    for u in range(60):  # half the users walk the catalog in order (the scorer below gets them right)
        n = int(rng.integers(4, 30))
        walk = (rng.integers(N_ITEMS) + np.arange(n)) % N_ITEMS if u % 2 else rng.permutation(N_ITEMS)[:n]
        rows += [(u, 100 + int(i), j) for j, i in enumerate(walk)]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(d / "interactions.csv", index=False)
    cfg = _cfg(tmp_path)
    D.run(cfg, log=lambda m: None)
    ds = D.load(cfg.run_dir / "data")

    class LastItem(Recommender):  # scores item (last + 1): deterministic, reads the history, records widths
        def __init__(self):
            super().__init__(ds.n_items, history_len=20)
            self.widths: list[tuple[int, int]] = []
            self.rows: list[int] = []

        def score_all(self, batch, **_):
            h = batch["history"]
            self.widths.append((h.shape[1], int((h > 0).sum(1).max())))
            self.rows.append(len(h))
            s = torch.zeros(len(h), self.n_items + 1)
            s[torch.arange(len(h)), h[:, -1] % self.n_items + 1] = 1.0
            return s

    b = B.Batcher(ds, 20)
    m = LastItem()
    res = S.evaluate_split(m, b, "test", [5, 10], batch_size=8)
    lens = np.minimum(b.eval_lengths(np.arange(ds.n_users), "test"), 20)
    assert res["users"] == ds.n_users and 0.3 < res["masked"]["NDCG@10"] < 0.9
    assert all(w == longest for w, longest in m.widths), "a batch is as wide as its longest history"
    assert [w for w, _ in m.widths] == sorted(w for w, _ in m.widths)
    assert sum(w for w, _ in m.widths) < sum(int(lens[i: i + 8].max()) for i in range(0, ds.n_users, 8))
    one = S.evaluate_split(LastItem(), b, "test", [5, 10], batch_size=ds.n_users)
    assert res == one
    # a cap on history slots (users x width) cuts the same sorted order into more, narrower-or-smaller batches
    capped = LastItem()
    assert S.evaluate_split(capped, b, "test", [5, 10], batch_size=ds.n_users, slots=100) == one
    assert len(capped.widths) > 1
    assert all(n * w <= 100 for n, w in zip(capped.rows, (w for w, _ in capped.widths)))


def test_training_resumes_after_interruption(tmp_path):
    _build(tmp_path)
    cfg = _cfg(tmp_path, **{"train.model": "sasrec", "train.epochs": 2, "train.eval_every": 3,
                            "model.sasrec.history_len": 12})
    D.run(cfg, log=lambda m: None)
    calls = {"n": 0}
    orig = T.evaluate_split

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed in the middle of training
        return orig(*a, **k)

    T.evaluate_split = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            T.run(cfg, log=lambda m: None, progress=False)
    finally:
        T.evaluate_split = orig
    assert not (cfg.run_dir / "train" / "sasrec" / "manifest.json").exists(), "nothing half-written"
    logs: list[str] = []
    res = T.run(cfg, log=logs.append, progress=False)
    resumed = [int(re.search(r"resuming at step (\d+)", m).group(1)) for m in logs if "resuming at step" in m]
    # stopped during the validation at step 9: that step's state is saved, and the resumed run validates it
    assert resumed == [9], logs
    steps = [e["step"] for e in map(__import__("json").loads, (res.stage_dir / "log.jsonl").read_text().splitlines())]
    assert steps[:2] == [3, 6] and steps == sorted(set(steps))
    assert steps[-1] == res.manifest.info["steps"], "the last steps are validated even off the eval_every grid"


def test_idreamrec_pipeline_on_text_vectors(tmp_path):
    from recpipe.pipeline import whiten

    _build(tmp_path)
    cfg = _cfg(tmp_path, **{"train.model": "idreamrec", "train.lr": 3e-3, "train.epochs": 8,
                            "model.idreamrec.width": 64, "model.idreamrec.history_len": 5})
    D.run(cfg, log=lambda m: None)
    _fake_embed(cfg)
    whiten.run(cfg, log=lambda m: None)
    res = T.run(cfg, log=lambda m: None, progress=False)
    assert res.manifest.info["valid"]["masked"]["NDCG@10"] > 0.25, res.manifest.info["valid"]
    ev = E.run(cfg, log=lambda m: None)
    hr = ev.manifest.info["rows"][0]["masked"]["HR@10"]
    assert hr > 0.4
    # a bf16 denoiser (evaluate.dtype): a new evaluation, float32 scores, about the same quality
    cfg.evaluate.dtype = "bfloat16"
    ev16 = E.run(cfg, log=lambda m: None)
    assert not ev16.skipped and ev16.manifest.config["evaluate"]["dtype"] == "bfloat16"
    assert abs(ev16.manifest.info["rows"][0]["masked"]["HR@10"] - hr) < 0.05
    from recpipe.pipeline.recommend import RecommendService

    svc = RecommendService(cfg)
    recs = svc.recommend("3", k=10)
    assert len(recs) == 10
    assert not set(D.load(cfg.run_dir / "data").sequence(3).tolist()) & {r.item for r in recs}

    # the same intent twice: the TEM runs once (a warm service keeps recent intent vectors)
    class CountingTEM:
        calls = 0

        def encode(self, texts, dtype="float32"):
            CountingTEM.calls += 1
            return np.full((len(texts), 16), 0.25, np.float32)

    svc._tem = CountingTEM()
    a = svc.recommend("3", intent="cozy  mystery", k=5)
    b = svc.recommend("4", intent="cozy mystery", k=5)
    assert CountingTEM.calls == 1 and len(a) == len(b) == 5
    svc.recommend("3", intent="a different request", k=5)
    assert CountingTEM.calls == 2
    # the whitening was refit on other vectors: the trained model no longer matches, and says so
    _fake_embed(cfg, seed=1)
    whiten.run(cfg, log=lambda m: None)
    with pytest.raises(ArtifactError, match="other text vectors"):
        RecommendService(cfg)


def test_guidance_weight_selected_on_validation(tmp_path):
    from recpipe.pipeline import whiten

    _build(tmp_path)
    cfg = _cfg(tmp_path, **{"train.model": "idreamrec", "train.lr": 3e-3, "train.epochs": 3,
                            "model.idreamrec.width": 32, "model.idreamrec.history_len": 5,
                            "train.guidance_grid": "1,1.5,5"})
    assert "guidance_grid" not in T.train_config_dict(_cfg(tmp_path), "idreamrec")["train"]  # off: old fingerprints
    D.run(cfg, log=lambda m: None)
    _fake_embed(cfg)
    whiten.run(cfg, log=lambda m: None)
    plain = T.run(_cfg(tmp_path, **{"train.model": "idreamrec", "train.lr": 3e-3, "train.epochs": 3,
                                    "model.idreamrec.width": 32, "model.idreamrec.history_len": 5}),
                  log=lambda m: None, progress=False)
    assert "guidance" not in plain.manifest.info
    # the sweep follows training and does not change its path: the finished run resumes and only sweeps
    logs: list[str] = []
    res = T.run(cfg, log=logs.append, progress=False)
    assert any("resuming at step" in m for m in logs)
    assert res.manifest.info["steps"] == plain.manifest.info["steps"]
    assert res.manifest.info["train_time_s"] == plain.manifest.info["train_time_s"]
    g = res.manifest.info["guidance"]
    assert g["grid"] == [1.0, 1.5, 5.0] and g["trained_w"] == 3.0
    assert set(g["valid_ndcg10_masked"]) == {"3", "1", "1.5", "5"}
    assert g["valid_ndcg10_masked"][f"{g['w']:g}"] == max(g["valid_ndcg10_masked"].values())
    model, conf, _ = bundle.load_model(cfg.run_dir, "idreamrec")
    assert conf["model_config"]["w"] == model.config.w == g["w"]  # evaluate and recommend use the chosen w
    assert res.manifest.info["valid"]["masked"]["NDCG@10"] == max(g["valid_ndcg10_masked"].values())
    # the recorded figures are what the saved model scores at each w on the validation split
    b = B.Batcher(D.load(cfg.run_dir / "data"), model.history_len)
    for w in (1.0, 5.0):
        r = S.evaluate_split(model, b, "valid", [10], score_kwargs={"w": w}, seed=cfg.run.seed)
        assert r["masked"]["NDCG@10"] == pytest.approx(g["valid_ndcg10_masked"][f"{w:g}"], abs=1e-6)
    # a model without a guidance weight is refused before it trains
    cfg2 = _cfg(tmp_path, **{"train.model": "sasrec", "train.guidance_grid": "1,2", "model.sasrec.history_len": 5})
    with pytest.raises(ConfigError, match="has no guidance weight"):
        T.run(cfg2, log=lambda m: None, progress=False)
    assert not (cfg2.run_dir / "train" / "sasrec").exists()


def test_select_guidance_keeps_the_trained_w_on_a_tie():
    from recpipe.models.idreamrec import IDreamRecConfig

    class M:
        sampler_params = ("w",)  # the model contract: score_all takes a guidance weight w

        def score_all(self, batch, w=None):
            pass

    def res(v):
        return {"masked": {"NDCG@10": v}, "unmasked": {"NDCG@10": v / 2}}

    table = {1.0: 0.2, 2.0: 0.1, 5.0: 0.3}
    best = {"step": 7, "valid": res(0.3)}  # trained at w = 3 (the default)
    mcfg, rec, b = T.select_guidance(M(), IDreamRecConfig(), [1, 2, 5], best, lambda w: res(table[w]), "x",
                                     log=lambda m: None)
    assert mcfg.w == 3.0 and rec["w"] == 3.0 and b["valid"] == best["valid"]  # 5 ties with 3: keep 3
    table[2.0] = 0.31
    mcfg, rec, b = T.select_guidance(M(), IDreamRecConfig(), [1, 2, 5], best, lambda w: res(table[w]), "x",
                                     log=lambda m: None)
    assert mcfg.w == 2.0 and b["valid"]["masked"]["NDCG@10"] == 0.31 and b["step"] == 7
    mcfg, rec, b = T.select_guidance(M(), IDreamRecConfig(), [1, 2, 5], best, lambda w: res(table[w]), "x",
                                     log=lambda m: None, column="unmasked")
    assert mcfg.w == 2.0 and rec["column"] == "unmasked"  # 0.155 unmasked beats the trained 0.15
    table[1.0] = 0.5
    mcfg, rec, b = T.select_guidance(M(), IDreamRecConfig(), [1, 2, 5], best, lambda w: res(table[w]), "x",
                                     log=lambda m: None, column="unmasked")
    assert mcfg.w == 1.0 and b["valid"]["unmasked"]["NDCG@10"] == 0.25


@pytest.mark.parametrize("select", ["masked", "unmasked"])
def test_train_select_picks_the_checkpoint_and_stops_on_its_column(tmp_path, monkeypatch, select):
    """The two columns peak at different validations (scripted over the real metrics): train.select decides
    which validation's weights are saved and which column early stopping waits on."""
    _build(tmp_path)
    cfg = _cfg(tmp_path, **{"train.model": "sasrec", "train.epochs": 4, "train.eval_every": 2,
                            "train.patience": 2, "model.sasrec.history_len": 12, "train.select": select})
    D.run(cfg, log=lambda m: None)
    script = {"masked": [0.1, 0.5, 0.2, 0.3, 0.4, 0.45], "unmasked": [0.1, 0.2, 0.6, 0.3, 0.7, 0.2]}
    real, calls = T.evaluate_split, []

    def scripted(*a, **k):
        res = real(*a, **k)
        i = len(calls)
        calls.append(i)
        for col in ("masked", "unmasked"):
            res[col]["NDCG@10"] = script[col][min(i, 5)]
        return res

    monkeypatch.setattr(T, "evaluate_split", scripted)
    res = T.run(cfg, log=lambda m: None, progress=False)
    log = [json.loads(line) for line in (res.stage_dir / "log.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in log]
    if select == "masked":  # peak at the 2nd validation, then 2 without a better one: stop after the 4th
        assert len(log) == 4 and res.manifest.info["best_step"] == steps[1]
    else:  # 0.6 at the 3rd, 0.7 at the 5th, then 0.2 and the epochs run out or patience ends it
        assert len(log) >= 6 and res.manifest.info["best_step"] == steps[4]
    assert res.manifest.info["valid"][select]["NDCG@10"] == max(script[select][: len(log)])
    assert ("select" in T.train_config_dict(cfg, "sasrec")["train"]) == (select == "unmasked")


def test_cli_train_missing_upstream_is_one_line(tmp_path):
    _build(tmp_path)
    r = subprocess.run([sys.executable, "-m", "recpipe.cli", "evaluate", "--dataset", "toy", "--data-dir",
                        str(tmp_path / "data"), "--model", "sasrec"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "has not been run" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # an unknown model name is refused before any stage runs (was a KeyError traceback from train)
    r = subprocess.run([sys.executable, "-m", "recpipe.cli", "run", "--dataset", "toy", "--data-dir",
                        str(tmp_path / "data"), "--model", "sasrek"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "unknown model 'sasrek'; known: " in r.stderr and "sasrec" in r.stderr and "diffrec" in r.stderr
    assert not (tmp_path / "cache" / "toy" / "data").exists(), "nothing ran"


def test_benchmark_table_chart_and_reuse(tmp_path):
    from recpipe.pipeline import benchmark

    _build(tmp_path, n_users=60)
    cfg = _cfg(tmp_path, **{"train.max_steps": 6, "train.eval_every": 3, "model.sasrec.history_len": 12})
    logs: list[str] = []
    res = benchmark.run(cfg, ["sasrec", "diffrec"], log=logs.append)
    assert [r["model"] for r in res["rows"]] == ["sasrec", "diffrec"]
    for r in res["rows"]:
        assert r["users"] == D.load(cfg.run_dir / "data").n_users and r["parameters"] > 0
        assert 0 <= r["masked"]["NDCG@10"] <= 1 and r["train_time_s"] > 0
    out = cfg.run_dir / "benchmark"
    table = (out / "table.md").read_text()
    assert table.count("| sasrec |") == 2 and table.count("| diffrec |") == 2  # masked + unmasked lines
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logs.clear()
    benchmark.run(cfg, ["sasrec"], log=logs.append)
    assert any("train/sasrec: up to date" in m for m in logs), "a finished model is reused, not retrained"
    with pytest.raises(ConfigError, match="unknown model"):
        benchmark.run(cfg, ["nope"], log=logs.append)

    # --reuse: models trained with their own budgets are tabled as they are, never retrained
    other = _cfg(tmp_path, **{"train.max_steps": 9, "train.eval_every": 3, "model.sasrec.history_len": 12})
    T.run(other, "sasrec", log=lambda m: None, progress=False)
    logs.clear()
    with pytest.raises(ArtifactError, match="scored an earlier train/sasrec"):
        benchmark.run(other, ["sasrec", "diffrec"], log=logs.append, reuse=True)
    E.run(other, "sasrec", log=lambda m: None)
    res = benchmark.run(cfg, ["sasrec", "diffrec"], log=logs.append, reuse=True)  # cfg's own budget is ignored
    assert [r["steps"] for r in res["rows"]] == [9, 6] and not any("train/" in m for m in logs)
    assert "| 9 |" in (out / "table.md").read_text()
    with pytest.raises(ArtifactError, match="dreamrec"):
        benchmark.run(cfg, ["dreamrec"], log=logs.append, reuse=True)


class _HashTEM:
    """A deterministic stand-in TEM: a text's vector comes from its hash (no model download needed)."""

    calls: list[list[str]] = []

    def encode(self, texts, dtype="float32"):
        _HashTEM.calls.append(list(texts))
        out = np.stack([np.random.default_rng(abs(hash(t)) % 2**32).standard_normal(16) for t in texts])
        return (out / np.linalg.norm(out, axis=1, keepdims=True)).astype(np.float32)


def test_category_text_agrees_its_article_and_refuses_bad_templates():
    assert I.category_text("a {category} movie", "action") == "an action movie"
    assert I.category_text("A {category} film", "Animation") == "An Animation film"
    assert I.category_text("a {category} movie", "comedy") == "a comedy movie"
    assert I.category_text("a game about {category}, a epic one", "action") == "a game about action, a epic one"
    assert I.category_text("{category}", "") == ""
    with pytest.raises(ConfigError, match="category_template"):
        I.category_text("a {genre} movie", "action")


def test_category_training_intentions(tmp_path, monkeypatch):
    import torch

    from recpipe.pipeline import embed, whiten

    _build(tmp_path)
    cfg = _cfg(tmp_path, **{"train.model": "idreamrec", "train.epochs": 1, "train.intent_source": "category",
                            "model.idreamrec.width": 32, "model.idreamrec.history_len": 5})
    D.run(cfg, log=lambda m: None)
    _fake_embed(cfg)
    whiten.run(cfg, log=lambda m: None)
    monkeypatch.setattr(embed, "load_tem", lambda info: _HashTEM())
    ds = D.load(cfg.run_dir / "data")
    cats = I.category_intents(cfg, ds)
    assert cats.texts == ["an action movie", "a comedy movie", "a drama movie", "a horror movie"]
    assert cats.vectors.shape == (4, 16) and cats.items.shape == (ds.n_items + 1, 2)
    assert (cats.items[0] == -1).all()  # padding has none
    for i in range(1, ds.n_items + 1):
        want = {I.category_text("a {category} movie", g.lower()) for g in ds.items["genres"].iloc[i - 1].split("|")}
        assert {cats.texts[c] for c in cats.items[i] if c >= 0} == want

    # the sampler draws only the target's own categories, each about equally often
    s = I.IntentSampler("category", None, cats, torch.device("cpu"))
    comedy_drama = 1 + int(np.flatnonzero(ds.items["genres"].to_numpy() == "Comedy|Drama")[0])
    tgt = torch.full((4000,), comedy_drama)
    tgt[:10] = 0
    vec, ok = s(tgt, torch.Generator().manual_seed(0))
    assert not ok[:10].any() and ok[10:].all()
    hits = [(vec[10:] == torch.from_numpy(cats.vectors[c])).all(1).float().mean().item() for c in range(4)]
    assert hits[0] == hits[3] == 0 and abs(hits[1] - 0.5) < 0.05 and abs(hits[1] + hits[2] - 1) < 1e-6

    llm = np.full((ds.n_items + 1, 16), 7.0, np.float32)
    vec, ok = I.IntentSampler("mixed", llm, cats, torch.device("cpu"))(tgt, torch.Generator().manual_seed(1))
    assert abs((vec[10:, 0] == 7.0).float().mean().item() - 0.5) < 0.05 and ok[10:].all()

    # a training run records where its intentions came from, and the default keeps old fingerprints
    res = T.run(cfg, log=lambda m: None, progress=False)
    assert res.manifest.config["intent_categories"] == {"column": "genres", "template": "a {category} movie"}
    assert "intent_source" not in T.train_config_dict(_cfg(tmp_path), "idreamrec")["train"]
    cfg.evaluate.category_column = "nope"
    with pytest.raises(ConfigError, match="category_column"):
        T.run(cfg, log=lambda m: None, progress=False)


def test_anchor_intent_weights_the_nearest_training_intentions():
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((6, 8)).astype(np.float32)
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    white = rng.standard_normal((6, 8)).astype(np.float32) * 5
    from recpipe.pipeline.intents import anchor_intent

    vec, top, p = anchor_intent(raw[2], raw, white, 1, 0.05)  # the query is a training intention: its vector
    np.testing.assert_allclose(vec, white[2], rtol=1e-6) and top.tolist() == [2]
    vec, top, p = anchor_intent(raw[2] + 0.3 * raw[4], raw, white, 3, 0.05)
    cos = raw @ (raw[2] + 0.3 * raw[4])
    assert top.tolist() == np.argsort(-cos)[:3].tolist() and abs(p.sum() - 1) < 1e-9 and (np.diff(p) <= 0).all()
    np.testing.assert_allclose(p[1] / p[0], np.exp((cos[top[1]] - cos[top[0]]) / 0.05), rtol=1e-5)
    np.testing.assert_allclose(vec, p @ white[top], rtol=1e-5, atol=1e-5)
    assert len(anchor_intent(raw[0], raw, white, 50, 1.0)[1]) == 6  # k past the bank: all of it
    with pytest.raises(ValueError, match="empty"):
        anchor_intent(raw[0], raw[:0], white[:0], 8, 0.05)
    # distinct intentions: by text where every text is known, else by vector to 1e-4
    from recpipe.pipeline.intents import _distinct

    vecs = np.stack([raw[0], raw[1], raw[0] + 1e-6, raw[2]])
    assert _distinct(["a", "b", "a", "c"], vecs, np.arange(4)).tolist() == [0, 1, 3]
    assert _distinct([None] * 4, vecs, np.arange(4)).tolist() == [0, 1, 3]
    assert _distinct(["a", "b", "c", "d"], vecs, np.arange(4)).tolist() == [0, 1, 2, 3]  # texts decide


def test_typed_intent_is_anchored_to_the_trained_intentions(tmp_path):
    """Real TEM (local MiniLM) on a dataset whose training intentions are the metadata ones ("I am looking for
    something in genres Comedy, Drama."): a request typed in other words is mapped to the trained intention it
    means, not whitened as a text the denoiser never saw; intent_anchor=None keeps the paper's direct vector."""
    from test_describe import make_dataset

    from recpipe.pipeline import describe as DS
    from recpipe.pipeline import embed, whiten
    from recpipe.pipeline.intents import anchor_intent
    from recpipe.pipeline.recommend import RecommendService

    make_dataset(tmp_path / "ds")
    cfg = load_config(None, {"run.dataset": str(tmp_path / "ds"), "run.cache_dir": str(tmp_path / "cache"),
                             "data.kcore": 1, "describe.llm": "metadata", "train.model": "idreamrec",
                             "train.epochs": 1, "train.threads": 2, "model.idreamrec.width": 32,
                             "model.idreamrec.history_len": 5, "recommend.dtype": "float32"})
    for stage in (D, DS, embed, whiten):
        stage.run(cfg, log=lambda m: None)
    T.run(cfg, log=lambda m: None, progress=False)
    ds = D.load(cfg.run_dir / "data")
    assert D.load(str(cfg.run_dir / "data")).n_items == ds.n_items  # a str path is no "corrupt artifact"
    texts = pd.read_parquet(cfg.run_dir / "describe" / "intents.parquet")["text"].tolist()
    white = whiten.load_intent_vectors(cfg.run_dir)
    svc = RecommendService(cfg)
    bank_raw, bank_white = svc.intent_bank()
    assert len(bank_raw) == len(set(texts)) < ds.n_items  # an intention many items share counts once
    comedy = 1 + next(i for i, g in enumerate(ds.items["genres"]) if g == "Comedy|Drama")
    action = 1 + next(i for i, g in enumerate(ds.items["genres"]) if g == "Action|Thriller")
    assert "Comedy" in texts[comedy - 1] and "Action" in texts[action - 1]
    tem = svc.tem()
    for typed, means, other in (("a funny comedy", comedy, action), ("an action-packed thriller", action, comedy)):
        _, top, p = anchor_intent(tem.encode([typed])[0], bank_raw, bank_white, 8, 0.05)
        np.testing.assert_allclose(bank_white[top[0]], white[means], rtol=1e-6)  # the nearest: what it means
        vec = svc.intent_vector(typed)
        dist = {i: float(np.linalg.norm(vec - white[i])) for i in (means, other)}
        assert dist[means] < dist[other], dist
        assert len(svc.recommend("u1", intent=typed, k=3)) == 3
        near = svc.anchored_to(typed)
        assert near[0][0] == texts[means - 1] and near[0][1] > 0.5 and abs(sum(w for _, w in near) - 1) < 1e-6
    # evaluate: category texts ("a comedy movie") anchored the same way, in a row of their own
    conf = bundle.load_model(cfg.run_dir, "idreamrec", "cpu")[1]
    _, targets = ds.split("test")
    it = E.build_intentions(cfg, "category", ds, targets, log=lambda m: None)
    anchored = E.anchored_intentions(cfg, conf, ds, it, 8)
    plain = {"a comedy movie": comedy, "a drama movie": comedy, "an action movie": action, "a thriller movie": action}
    checked = [u for u, text in enumerate(it.texts) if text in plain]  # (one item's genre is "Epic Epic ...")
    assert len(checked) >= len(it.texts) // 2
    for u in checked:
        means = plain[it.texts[u]]
        other = action if means == comedy else comedy
        a, m = anchored.whitened[u], white[means]
        assert a @ m / np.linalg.norm(a) / np.linalg.norm(m) > 0.95  # the trained intention's vector, about
        assert np.linalg.norm(a - m) < np.linalg.norm(a - white[other])
    cfg.evaluate.intent, cfg.evaluate.steps, cfg.evaluate.intent_anchor = "category", [1], 8
    rows = {r["name"] for r in E.run(cfg, log=lambda m: None, progress=False).manifest.info["rows"]}
    assert {"category: history + intention", "category: history + intention (anchored)"} <= rows
    cfg.evaluate.intent_anchor = None
    ev = E.run(cfg, log=lambda m: None, progress=False)
    assert "intent_anchor" not in ev.manifest.config["evaluate"]  # off: the fingerprint evaluations had before
    assert "category: history + intention (anchored)" not in {r["name"] for r in ev.manifest.info["rows"]}
    cfg.recommend.intent_anchor = None  # the typed text's own whitened vector
    direct = RecommendService(cfg).intent_vector("a funny comedy")
    np.testing.assert_allclose(direct, svc.whitening.transform(tem.encode(["a funny comedy"]))[0], rtol=1e-5,
                               atol=1e-4)
    assert not np.allclose(direct, svc.intent_vector("a funny comedy"), atol=1e-2)


def test_training_off_a_terminal_prints_plain_progress_lines(tmp_path, capsys, monkeypatch):
    """Under nohup or a batch job rich draws no bar until the end; train and the user counter of
    evaluation then print a plain line (done/total, loss, rate, time left) every PLAIN_EVERY_S."""
    _build(tmp_path, n_users=60)
    cfg = _cfg(tmp_path, **{"train.model": "sasrec", "train.epochs": 2, "model.sasrec.history_len": 12,
                            "evaluate.batch_size": 16})  # several batches of users, so lines between them
    D.run(cfg, log=lambda m: None)
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)
    capsys.readouterr()
    res = T.run(cfg, log=lambda m: None, progress=True)
    total = res.manifest.info["steps"]
    out = capsys.readouterr().out
    lines = re.findall(r"^train sasrec: (\d+)/(\d+) loss (\S+) best \S+ \((.*)\)$", out, flags=re.M)
    assert len(lines) >= total - 1, out[-2000:]
    done = [int(d) for d, _, _, _ in lines]
    assert done == sorted(done) and done[-1] == total and {int(t) for _, t, _, _ in lines} == {total}
    assert all(np.isfinite(float(loss)) for _, _, loss, _ in lines)
    assert any(re.fullmatch(r"[\d,.]+/s, \d+:\d\d:\d\d left", rest) for *_, rest in lines), lines[-3:]
    E.run(cfg, log=lambda m: None, progress=True)
    out = capsys.readouterr().out
    ev_lines = re.findall(r"^evaluate \S+: (\d+)/(\d+) users", out, flags=re.M)
    assert ev_lines and {int(t) for _, t in ev_lines} == {60}, out[-2000:]


def test_bench_seen_share_splits_window_and_older_items(tmp_path):
    """bench/bench_seen.py: a model that ranks its own window first fills every top-k slot with window
    items; one that avoids its window fills none with them; items older than the window count apart."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("bench_seen", Path(__file__).parents[1] / "bench" / "bench_seen.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    _build(tmp_path, n_users=50)
    cfg = _cfg(tmp_path)
    D.run(cfg, log=lambda m: None)
    ds = D.load(cfg.run_dir / "data")

    class Fake:
        history_len = 3
        generative = False

        def __init__(self, sign: float):
            self.sign = sign

        def score_all(self, batch):
            h = batch["history"]
            s = torch.zeros(h.shape[0], ds.n_items + 1)
            s.scatter_(1, h, self.sign)  # +1 / -1 on the window's items (padding column 0 is excluded anyway)
            return s

    b = B.Batcher(ds, 3)
    assert bench.seen_share(Fake(1.0), b, "test", 3, {}) == (1.0, 0.0)
    inside, older = bench.seen_share(Fake(-1.0), b, "test", 3, {})
    assert inside == 0.0 and 0.0 < older < 1.0  # ties among the rest: some are older seen items, some unseen


def test_benchmark_minutes_budget_names_budget_cpu_and_curves(tmp_path):
    from recpipe import cpu
    from recpipe.pipeline import benchmark

    _build(tmp_path, n_users=60)
    # a budget far below one step's time: every model stops after its first step, then validates
    cfg = _cfg(tmp_path, **{"train.max_minutes": 1e-6, "train.max_steps": 50, "train.eval_every": 5,
                            "model.sasrec.history_len": 12})
    res = benchmark.run(cfg, ["sasrec", "diffrec"], log=lambda m: None)
    for r in res["rows"]:
        assert r["budget_minutes"] == 1e-6 and r["steps"] < 50, "the budget, not max_steps, ended training"
        assert r["curve"] and r["curve"][-1]["step"] == r["steps"] and r["epochs"] is not None
    c = res["cpu"]
    assert c["threads"] >= 1 and set(c["features"]) <= set(cpu.FEATURES) and c["model"]
    out = cfg.run_dir / "benchmark"
    table = (out / "table.md").read_text()
    assert "Training budget: 1e-06 min of training per model" in table and f"CPU: {c['text']}." in table
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "results.json").read_text())["cpu"] == c
    # models trained under different budgets say so, not one budget for all
    mixed = {**res, "rows": [{**res["rows"][0], "budget_minutes": None}, res["rows"][-1]]}
    assert benchmark.budget_line(mixed).startswith("Training budgets differ: sasrec none, diffrec 1e-06 min")


def test_cli_benchmark_minutes_with_reuse_is_refused(tmp_path):
    _build(tmp_path)
    r = subprocess.run([sys.executable, "-m", "recpipe.cli", "benchmark", "--dataset", "toy", "--data-dir",
                        str(tmp_path / "data"), "--reuse", "--minutes", "5"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "--reuse trains nothing" in r.stderr
