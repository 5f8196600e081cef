"""The bundle of a trained run (recpipe.pipeline.bundle): each piece read once, and the index stage's saved
index served by recommend when it holds the model's item table (built in memory, and said so, when not)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from test_pipeline import _build, _cfg, _fake_embed

from recpipe.pipeline import bundle, whiten
from recpipe.pipeline import data as D
from recpipe.pipeline import train as T
from recpipe.pipeline.index import ItemIndex
from recpipe.pipeline.recommend import RecommendService


@pytest.fixture(scope="module")
def trained_idreamrec(tmp_path_factory):
    """A small idreamrec trained on the toy catalog's random text vectors (no index stage)."""
    tmp = tmp_path_factory.mktemp("bundle")
    _build(tmp)
    over = {"train.model": "idreamrec", "train.epochs": 1, "model.idreamrec.width": 32,
            "model.idreamrec.history_len": 5}
    cfg = _cfg(tmp, **over)
    D.run(cfg, log=lambda m: None)
    _fake_embed(cfg)
    logs: list[str] = []
    T.run(cfg, log=logs.append, progress=False)  # a text model: the train stage whitens the vectors first
    assert any(m.startswith("whiten: whiten over") for m in logs), logs
    return tmp, over


def _recpipe(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recpipe.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_recommend_serves_the_index_stage_hnsw_index(trained_idreamrec, monkeypatch):
    tmp, over = trained_idreamrec
    cfg = _cfg(tmp, **over)
    users = [str(u) for u in range(0, 200, 7)]

    # no index stage: a flat index is built in memory, and the log says so and why
    logs: list[str] = []
    flat = RecommendService(cfg, log=logs.append)
    assert flat.bundle.index_source == "built" and flat.index.kind == "flat"
    assert any("no index stage" in m and "built a flat index" in m for m in logs), logs
    want = {u: flat.recommend(u, k=10) for u in users}

    r = _recpipe("index", "--kind", "hnsw", "--run-dir", str(cfg.run_dir), "--cache-dir", str(tmp / "cache"),
                 cwd=tmp)
    assert r.returncode == 0, r.stderr

    # the same settings as before (index.kind is still flat): the saved hnsw index is what recommend searches
    logs.clear()
    svc = RecommendService(_cfg(tmp, **over), log=logs.append)
    assert isinstance(svc.index, ItemIndex) and svc.index.kind == "hnsw"
    assert type(svc.index._cpu).__name__ == "IndexHNSWFlat" and svc.bundle.index_source == "saved"
    assert any("serving the index stage's hnsw index" in m for m in logs) and not any("built" in m for m in logs)
    overlap, agree = [], 0
    for u in users:
        got = svc.recommend(u, k=10)
        flat_scores = {x.item: x.score for x in want[u]}
        overlap.append(len(flat_scores.keys() & {x.item for x in got}) / 10)
        # an item both return has the same inner product: both indexes hold the same vectors
        agree += all(abs(x.score - flat_scores[x.item]) <= 1e-5 * max(1.0, abs(x.score))
                     for x in got if x.item in flat_scores)
    assert np.mean(overlap) >= 0.9 and agree == len(users), (overlap, agree)


def test_a_trained_run_reads_the_whitening_once(trained_idreamrec, monkeypatch):
    tmp, over = trained_idreamrec
    cfg = _cfg(tmp, **over)
    calls = []
    load = whiten.Whitening.load.__func__

    def counting(cls, path, dim=None):
        calls.append(path)
        return load(cls, path, dim)

    monkeypatch.setattr(whiten.Whitening, "load", classmethod(counting))
    svc = RecommendService(cfg, log=lambda m: None)
    assert len(calls) == 1, calls
    assert svc.whitening is svc.bundle.text.whitening
    np.testing.assert_array_equal(svc.model.item_table().numpy(), svc.bundle.text.items)
    b = bundle.load(cfg, log=lambda m: None)
    assert b.index is None, "an index only when asked for (evaluate scores without one)"


def test_an_index_over_other_vectors_is_not_served(trained_idreamrec):
    """A model that learns its own item table (item_residual) scores against other vectors than the whiten
    stage's: the index stage's index (built over those) is left alone and one over the model's table is built."""
    tmp, over = trained_idreamrec
    over = {**over, "model.idreamrec.item_residual": True, "train.epochs": 1}
    cfg = _cfg(tmp, **over)
    T.run(cfg, log=lambda m: None, progress=False)
    cfg.index.kind = "ivf"
    from recpipe.pipeline import index as index_stage

    index_stage.run(cfg, log=lambda m: None)
    logs: list[str] = []
    svc = RecommendService(_cfg(tmp, **over), log=logs.append)
    assert svc.bundle.index_source == "built" and svc.index.kind == "flat"
    assert any("holds other item vectors than the model scores against" in m for m in logs), logs
    assert svc.index.holds(svc.model.item_table().detach().numpy())
