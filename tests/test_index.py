"""Item index: exact search, padding, exclusion, approximate recall, files, devices, and the stage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recpipe.artifacts import run_stage
from recpipe.config import Config, IndexConfig
from recpipe.errors import ArtifactError, ConfigError
from recpipe.pipeline import index as index_mod
from recpipe.pipeline import whiten
from recpipe.pipeline.index import ItemIndex, get_index, load_index, resolve_device, resolve_nlist


def random_table(n: int, d: int, seed: int = 0) -> np.ndarray:
    """(n + 1, d) float32 Gaussian vectors (no ties), row 0 padding zeros."""
    V = np.random.default_rng(seed).standard_normal((n + 1, d)).astype(np.float32)
    V[0] = 0
    return V


def clustered_table(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Item vectors with topic structure, whitened (as the index holds them): random clusters, then ZCA."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(8, n // 50), d)) * np.linspace(2, 0.2, d)
    X = centres[rng.integers(0, len(centres), n)] + 0.4 * rng.standard_normal((n, d))
    T = np.zeros((n + 1, d), dtype=np.float64)
    T[1:] = X
    return whiten.Whitening().fit(X).transform_table(T)


def brute_topk(V: np.ndarray, Q: np.ndarray, k: int, exclude=None) -> tuple[np.ndarray, np.ndarray]:
    S = Q.astype(np.float64) @ V[1:].astype(np.float64).T
    if exclude is not None:
        for b, e in enumerate(exclude):
            e = np.asarray(e, dtype=np.int64)
            e = e[(e >= 1) & (e <= len(V) - 1)]
            S[b, e - 1] = -np.inf
    order = np.argsort(-S, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(S, order, axis=1), order + 1


def recall(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(y) for x, y in zip(a, b)]))


# ---------------------------------------------------------------------------------------------- search
def test_flat_equals_brute_force_inner_product():
    V = random_table(2000, 32)
    Q = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    idx = ItemIndex(V, "flat", device="cpu")
    assert (idx.n, idx.d, idx.device) == (2000, 32, "cpu")
    s, i = idx.search(Q, 10)
    bs, bi = brute_topk(V, Q, 10)
    assert s.shape == i.shape == (64, 10) and s.dtype == np.float32 and i.dtype == np.int64
    np.testing.assert_array_equal(i, bi)
    np.testing.assert_allclose(s, bs, rtol=1e-5, atol=1e-4)
    s1, i1 = idx.search(Q[0], 5)  # a single 1-D query
    np.testing.assert_array_equal(i1, bi[:1, :5])


def test_padding_is_never_indexed_or_returned():
    V = random_table(300, 16)
    V[0] = 1e6  # the padding vector would win every query if it were indexed
    Q = np.ones((8, 16), dtype=np.float32)
    for kind in ("flat", "ivf", "ivfpq", "hnsw"):
        idx = ItemIndex(V, kind, device="cpu", nlist=4, nprobe=4)
        assert idx.n == 300
        _, i = idx.search(Q, 10)
        assert (i >= 1).all() and (i <= 300).all(), kind
    _, i = ItemIndex(V, "flat", device="cpu").search(Q, 300)  # k = n: every item exactly once, no padding
    assert all(sorted(row) == list(range(1, 301)) for row in i)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_exclusion_removes_seen_items_and_still_returns_k(kind):
    V = clustered_table(1500, 24)
    rng = np.random.default_rng(2)
    Q = (V[1 + rng.integers(0, 1500, 40)] + 0.3 * rng.standard_normal((40, 24))).astype(np.float32)
    _, top = brute_topk(V, Q, 60)
    exclude = []
    for b in range(40):
        seen = top[b, : rng.integers(0, 50)]  # the best-scoring items are the seen ones: the hard case
        extra = rng.integers(1, 1501, rng.integers(0, 30))
        exclude.append(np.concatenate([seen, extra, seen[:3], [0, 1501, -4]]))  # duplicates, out of range
    exclude[5] = np.array([], dtype=np.int64)
    exclude[6] = None
    idx = ItemIndex(V, kind, device="cpu", nprobe=8)
    s, i = idx.search(Q, 10, exclude=exclude)
    assert i.shape == (40, 10)
    assert (i >= 1).all() and np.isfinite(s).all()
    for b, e in enumerate(exclude):
        assert not set(i[b]) & set(e if e is not None else []), b
        assert len(set(i[b])) == 10
        assert (np.diff(s[b]) <= 1e-6).all()  # best first
    _, bi = brute_topk(V, Q, 10, [e if e is not None else [] for e in exclude])
    if kind == "flat":
        np.testing.assert_array_equal(i, bi)
    else:
        assert recall(i, bi) >= 0.9


def test_exclusion_when_the_catalog_runs_out():
    V = random_table(20, 8)
    Q = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    for kind in ("flat", "ivf", "hnsw"):
        idx = ItemIndex(V, kind, device="cpu", nlist=1)
        s, i = idx.search(Q, 10, exclude=[np.arange(1, 16), np.arange(1, 4)])
        assert sorted(i[0][:5]) == [16, 17, 18, 19, 20] and (i[0][5:] == 0).all() and np.isneginf(s[0][5:]).all()
        assert (i[1] >= 4).all() and len(set(i[1])) == 10
        s, i = idx.search(Q, 25)  # k > n
        assert sorted(i[0][:20]) == list(range(1, 21)) and (i[0][20:] == 0).all() and np.isneginf(s[0][20:]).all()


def test_approximate_rows_left_short_are_completed_exactly():
    """IVF with nprobe = 1 scans one cell; a query whose cell is all excluded still gets k items."""
    V = clustered_table(2000, 16)
    idx = ItemIndex(V, "ivf", device="cpu", nlist=40, nprobe=1)
    q = V[1:2]
    _, raw = idx._raw_search(q, 2000)  # what the one probed cell holds (FAISS positions, -1 past the end)
    found = raw[0][raw[0] >= 0] + 1
    assert 10 < len(found) < 500
    _, i = idx.search(q, 2000)  # more than the cell holds: completed by an exact search
    assert sorted(i[0]) == list(range(1, 2001))
    s, i = idx.search(q, 10, exclude=[found])  # everything the probed cell holds is excluded
    assert (i > 0).all() and not set(i[0]) & set(found)
    _, bi = brute_topk(V, q, 10, [found])
    np.testing.assert_array_equal(i, bi)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_recall_against_flat(kind):
    V = clustered_table(4000, 64)
    rng = np.random.default_rng(4)
    Q = (V[1 + rng.integers(0, 4000, 300)] + 0.5 * rng.standard_normal((300, 64))).astype(np.float32)
    cfg = IndexConfig()  # the shipped defaults
    _, exact = ItemIndex(V, "flat", device="cpu").search(Q, 10)
    idx = index_mod.build_index(V, IndexConfig(**{**cfg.__dict__, "kind": kind}), seed=7, device="cpu")
    _, got = idx.search(Q, 10)
    assert recall(got, exact) >= 0.9


def test_ivf_is_seeded():
    V = clustered_table(3000, 32)
    Q = V[1:50] + 0.1
    a = ItemIndex(V, "ivf", device="cpu", nprobe=2, seed=11)
    b = ItemIndex(V, "ivf", device="cpu", nprobe=2, seed=11)
    assert a.nlist == resolve_nlist(3000) == 3000 // 39
    np.testing.assert_array_equal(a.search(Q, 10)[1], b.search(Q, 10)[1])


def test_resolve_nlist():
    assert resolve_nlist(100_000) == round(4 * 100_000**0.5)
    assert resolve_nlist(3416) == 3416 // 39  # clamped: at least 39 training points per cell
    assert resolve_nlist(10) == 1
    assert resolve_nlist(10_000, nlist=50) == 50


def test_bad_queries_and_settings():
    idx = ItemIndex(random_table(50, 8), "flat", device="cpu")
    with pytest.raises(ArtifactError, match="dimension 8"):
        idx.search(np.ones((2, 9), np.float32), 5)
    with pytest.raises(ArtifactError, match="NaN"):
        idx.search(np.full((1, 8), np.nan, np.float32), 5)
    with pytest.raises(ValueError):
        idx.search(np.ones((2, 8), np.float32), 5, exclude=[[1]])
    with pytest.raises(ValueError):
        idx.search(np.ones((2, 8), np.float32), 0)
    with pytest.raises(ConfigError):
        ItemIndex(random_table(50, 8), "lsh")
    with pytest.raises(ConfigError, match="nprobe"):
        ItemIndex(random_table(50, 8), "ivf", nprobe=0)
    V = random_table(50, 8)
    V[3, 1] = np.inf
    with pytest.raises(ArtifactError, match="item vector 3"):
        ItemIndex(V)


# ---------------------------------------------------------------------------------------------- devices
def test_device_selection(monkeypatch):
    if index_mod.num_gpus() == 0:
        assert resolve_device("auto", "flat") == "cpu"
        with pytest.raises(ConfigError, match="no GPU") as e:
            ItemIndex(random_table(10, 4), device="gpu")
        assert "\n" not in str(e.value)
    monkeypatch.setattr(index_mod, "num_gpus", lambda: 1)
    assert resolve_device("auto", "flat") == "gpu" and resolve_device("auto", "ivf") == "gpu"
    assert resolve_device("auto", "hnsw") == "cpu"  # FAISS has no GPU HNSW
    assert resolve_device("cpu", "flat") == "cpu"
    with pytest.raises(ConfigError, match="hnsw"):
        resolve_device("gpu", "hnsw")
    monkeypatch.setattr(index_mod, "num_gpus", lambda: 0)
    assert resolve_device("auto", "ivf") == "cpu"


@pytest.mark.skipif(index_mod.num_gpus() == 0, reason="needs faiss-gpu and a GPU")
def test_gpu_matches_cpu(tmp_path):  # pragma: no cover - GPU machines only
    V = random_table(5000, 64)
    Q = np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32)
    cpu = ItemIndex(V, "flat", device="cpu")
    gpu = ItemIndex(V, "flat", device="gpu")
    assert gpu.device == "gpu"
    np.testing.assert_array_equal(cpu.search(Q, 10)[1], gpu.search(Q, 10)[1])
    excl = [np.arange(1, 2500)] * 32  # candidate list longer than the GPU's k limit: searched on the CPU twin
    np.testing.assert_array_equal(cpu.search(Q, 10, excl)[1], gpu.search(Q, 10, excl)[1])
    gpu.save(tmp_path / "g.faiss")
    assert ItemIndex.load(tmp_path / "g.faiss", device="cpu").device == "cpu"


# ------------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, kind):
    V = clustered_table(1200, 16)
    Q = V[1:30] + 0.05
    idx = ItemIndex(V, kind, device="cpu", nprobe=5)
    p = tmp_path / "items.faiss"
    idx.save(p)
    assert [x.name for x in tmp_path.iterdir()] == ["items.faiss"]
    back = ItemIndex.load(p, device="auto")
    assert (back.kind, back.n, back.d, back.nprobe) == (kind, 1200, 16, idx.nprobe)
    for a, b in zip(idx.search(Q, 10, [[1, 2]] * len(Q)), back.search(Q, 10, [[1, 2]] * len(Q))):
        np.testing.assert_array_equal(a, b)


def test_corrupt_or_foreign_index_file(tmp_path):
    import faiss

    (tmp_path / "bad.faiss").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ArtifactError, match="corrupt FAISS index") as e:
        ItemIndex.load(tmp_path / "bad.faiss")
    assert "\n" not in str(e.value)
    good = tmp_path / "good.faiss"
    ItemIndex(random_table(100, 8), "flat", device="cpu").save(good)
    (tmp_path / "trunc.faiss").write_bytes(good.read_bytes()[:60])
    with pytest.raises(ArtifactError, match="corrupt"):
        ItemIndex.load(tmp_path / "trunc.faiss")
    l2 = faiss.IndexFlatL2(8)
    faiss.write_index(l2, str(tmp_path / "l2.faiss"))
    with pytest.raises(ArtifactError, match="not a recpipe inner-product index"):
        ItemIndex.load(tmp_path / "l2.faiss")
    with pytest.raises(ArtifactError, match="missing"):
        ItemIndex.load(tmp_path / "nope.faiss")


# ------------------------------------------------------------------------------------------------ stage
def make_whiten_stage(run_dir: Path, n: int = 600, d: int = 16, tag: str = "a") -> np.ndarray:
    E = np.zeros((n + 1, d), dtype=np.float32)
    E[1:] = np.random.default_rng(len(tag)).standard_normal((n, d))

    def build(out: Path):
        np.save(out / "item_embeddings.npy", E)
        return {"tem": "local", "model": "m", "dim": d, "normalized": False}

    run_stage(run_dir, "embed", {"tag": tag}, {}, build, force=True, log=None)
    cfg = Config()
    cfg.run.run_dir = str(run_dir)
    whiten.run(cfg, log=lambda m: None)
    return E


def test_stage_builds_saves_and_get_index_reuses_it(tmp_path):
    cfg = Config()
    cfg.run.run_dir = str(tmp_path / "run")
    with pytest.raises(ArtifactError, match="'whiten' has not been run"):
        index_mod.run(cfg, log=lambda m: None)
    make_whiten_stage(Path(cfg.run_dir))
    _, items, _ = whiten.load_whitening(cfg.run_dir)

    built = get_index(cfg, log=lambda m: None)  # no index stage yet: built in memory, nothing written
    assert built.n == 600 and not (Path(cfg.run_dir) / "index").exists()

    res = index_mod.run(cfg, log=lambda m: None)
    assert not res.skipped and (res.stage_dir / "items.faiss").exists()
    info = res.manifest.info
    assert (info["kind"], info["device"], info["n"], info["d"]) == ("flat", "cpu", 600, 16)
    idx = load_index(cfg.run_dir)
    Q = items[1:20]
    np.testing.assert_array_equal(idx.search(Q, 5)[1], brute_topk(items, Q, 5)[1])

    cfg.index.device = "cpu"  # the device does not change the saved artifact
    assert index_mod.run(cfg, log=lambda m: None).skipped
    cfg.index.kind = "hnsw"
    assert get_index(cfg, log=lambda m: None).kind == "hnsw"  # stale stage: rebuilt in memory
    assert not index_mod.run(cfg, log=lambda m: None).skipped
    assert get_index(cfg, log=lambda m: None).kind == "hnsw"
    cfg.index.kind = "ivfpq"  # the saved ivfpq index is served re-ranked against the whitened table
    assert not index_mod.run(cfg, log=lambda m: None).skipped
    cfg.index.rerank = 4  # a search setting: the saved index stays current
    assert index_mod.run(cfg, log=lambda m: None).skipped
    served = get_index(cfg, log=lambda m: None)
    assert (served.kind, served.rerank) == ("ivfpq", 4)
    s, i = served.search(Q, 5)
    np.testing.assert_allclose(s, np.einsum("bkd,bd->bk", items[i], Q), rtol=1e-5, atol=1e-5)
    matched, why = index_mod.load_matching(cfg.run_dir, items, device="cpu", rerank=2)
    assert why == "" and matched.rerank == 2


# ------------------------------------------------------------------------------------------------ ivfpq
def test_ivfpq_recall_against_flat_beats_random_and_tracks_ivf():
    """On a clustered 384-d table, ivfpq (48 one-byte codes an item) finds most of the exact top 10: far above a
    random ranking (k / n), and at least half what ivf (same cells, exact vectors) finds."""
    n, k = 3000, 10
    V = clustered_table(n, 384)
    rng = np.random.default_rng(4)
    Q = (V[1 + rng.integers(0, n, 300)] + 0.5 * rng.standard_normal((300, 384))).astype(np.float32)
    _, exact = ItemIndex(V, "flat", device="cpu").search(Q, k)
    pq = index_mod.build_index(V, IndexConfig(kind="ivfpq"), seed=7, device="cpu")
    assert (pq.kind, pq.pq_m, pq.nlist) == ("ivfpq", 48, resolve_nlist(n))
    ivf = index_mod.build_index(V, IndexConfig(kind="ivf"), seed=7, device="cpu")
    r_pq, r_ivf = recall(pq.search(Q, k)[1], exact), recall(ivf.search(Q, k)[1], exact)
    r_random = recall(np.stack([rng.choice(n, k, replace=False) + 1 for _ in Q]), exact)
    assert r_random < 0.02  # k / n = 0.0033: the synthetic table is not degenerate
    assert r_pq >= 100 * k / n and r_pq >= 0.5 * r_ivf, (r_pq, r_ivf, r_random)


def test_ivfpq_rerank_restores_the_cells_recall_with_exact_scores(tmp_path):
    """rerank x k PQ candidates re-scored from the table: recall@10 rises from the PQ figure to what the cells
    themselves allow (ivf, same cells, exact vectors), and the scores returned are exact inner products."""
    n, k = 3000, 10
    V = clustered_table(n, 384)
    rng = np.random.default_rng(4)
    Q = (V[1 + rng.integers(0, n, 300)] + 0.5 * rng.standard_normal((300, 384))).astype(np.float32)
    _, exact = ItemIndex(V, "flat", device="cpu").search(Q, k)
    r_ivf = recall(index_mod.build_index(V, IndexConfig(kind="ivf"), seed=7, device="cpu").search(Q, k)[1], exact)
    got = {}
    for r in (1, 8):
        pq = index_mod.build_index(V, IndexConfig(kind="ivfpq", rerank=r), seed=7, device="cpu")
        assert pq.rerank == r and f"rerank={r}" in repr(pq)
        s, i = pq.search(Q, k)
        got[r] = recall(i, exact)
        if r > 1:
            np.testing.assert_allclose(s, np.einsum("bkd,bd->bk", V[i], Q), rtol=1e-5, atol=1e-4)
            assert (np.diff(s, axis=1) <= 0).all()
    assert got[8] >= 0.95 * r_ivf and got[8] - got[1] >= 0.1, (got, r_ivf)
    # exclusions hold after re-ranking, and a memory-mapped table serves as well as one in memory
    mm = np.lib.format.open_memmap(tmp_path / "t.npy", "w+", np.float32, V.shape)
    mm[:] = V
    pq = index_mod.build_index(V, IndexConfig(kind="ivfpq", rerank=1), seed=7, device="cpu").refine_with(mm, 8)
    excl = [e[:5] for e in exact]
    s, i = pq.search(Q, k, exclude=excl)
    assert not any(set(a) & set(b) for a, b in zip(i, excl)) and (i > 0).all()
    for bad, msg in ((0, "index.rerank must be >= 1"), (-3, "index.rerank must be >= 1")):
        with pytest.raises(ConfigError, match=msg):
            pq.refine_with(V, bad)
    with pytest.raises(ArtifactError, match="re-ranking table has shape"):
        pq.refine_with(V[:-1], 8)


def test_ivfpq_is_seeded_excludes_and_fills_k():
    V = clustered_table(1500, 32)
    Q = V[1:40] + 0.05
    a = ItemIndex(V, "ivfpq", device="cpu", nprobe=4, seed=3)
    b = ItemIndex(V, "ivfpq", device="cpu", nprobe=4, seed=3)
    assert a.pq_m == index_mod.resolve_pq_m(32) == 4
    excl = [np.arange(1, 200)] * len(Q)
    s, i = a.search(Q, 10, exclude=excl)
    np.testing.assert_array_equal(i, b.search(Q, 10, exclude=excl)[1])
    assert (i > 199).all() and all(len(set(r)) == 10 for r in i) and np.isfinite(s).all()


def test_ivfpq_save_load_round_trip_and_holds(tmp_path):
    V = clustered_table(1200, 64)
    Q = V[1:30] + 0.05
    idx = ItemIndex(V, "ivfpq", device="cpu", nprobe=5, pq_m=16)
    assert idx.holds(V) and not idx.holds(V + 1e-3)  # compared by the digest of the float32 table
    p = tmp_path / "items.faiss"
    idx.save(p)
    back = ItemIndex.load(p, device="cpu")
    assert (back.kind, back.n, back.d, back.nlist, back.nprobe, back.pq_m) == ("ivfpq", 1200, 64, idx.nlist, 5, 16)
    assert p.stat().st_size < V[1:].nbytes / 2  # codes, not vectors
    for a, b in zip(idx.search(Q, 10, [[1, 2]] * len(Q)), back.search(Q, 10, [[1, 2]] * len(Q))):
        np.testing.assert_array_equal(a, b)
    assert not back.holds(V)  # a bare file does not say what it was built from: the stage manifest does


def test_ivfpq_bad_settings_are_one_line_config_errors():
    V = clustered_table(600, 48)
    for bad in (5, 0, 100):
        with pytest.raises(ConfigError, match="pq_m") as e:
            index_mod.build_index(V, IndexConfig(kind="ivfpq", pq_m=bad), seed=0, device="cpu")
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="must divide the vector dimension 48"):
        ItemIndex(V, "ivfpq", pq_m=7, device="cpu")
    with pytest.raises(ConfigError, match="at least 256 items") as e:
        ItemIndex(random_table(200, 16), "ivfpq", device="cpu")
    assert "\n" not in str(e.value)
    assert [index_mod.resolve_pq_m(d) for d in (384, 768, 64, 12, 26, 7)] == [48, 96, 8, 1, 2, 1]


def test_stage_saves_ivfpq_and_load_matching_serves_it(tmp_path):
    cfg = Config()
    cfg.run.run_dir = str(tmp_path / "run")
    cfg.index.kind = "ivfpq"
    make_whiten_stage(Path(cfg.run_dir), n=600, d=16)
    _, items, _ = whiten.load_whitening(cfg.run_dir)
    info = index_mod.run(cfg, log=lambda m: None).manifest.info
    assert (info["kind"], info["pq_m"], info["table_sha256"]) == ("ivfpq", 2, index_mod.table_digest(items))
    idx, why = index_mod.load_matching(cfg.run_dir, items, device="cpu")
    assert why == "" and idx.kind == "ivfpq" and idx.n == 600
    other = items.copy()
    other[5] += 1
    idx, why = index_mod.load_matching(cfg.run_dir, other, device="cpu")
    assert idx is None and "holds other item vectors" in why
    assert get_index(cfg, log=lambda m: None).kind == "ivfpq"
    cfg.index.pq_m = 4  # another code size: the saved stage is stale
    assert not index_mod.run(cfg, log=lambda m: None).skipped


def test_pq_m_does_not_invalidate_other_kinds(tmp_path):
    cfg = Config()
    cfg.run.run_dir = str(tmp_path / "run")
    make_whiten_stage(Path(cfg.run_dir))
    assert not index_mod.run(cfg, log=lambda m: None).skipped
    cfg.index.pq_m = 8  # only an ivfpq index has sub-quantizers
    assert index_mod.run(cfg, log=lambda m: None).skipped


def test_ivfpq_rows_left_short_are_completed_from_the_decoded_vectors():
    """nprobe = 1 and every item of the probed cell excluded: the row is still filled, from ivfpq's decoded
    vectors (it keeps no exact copy), with none of the excluded items."""
    V = clustered_table(1000, 32)
    idx = ItemIndex(V, "ivfpq", device="cpu", nlist=20, nprobe=1)
    q = V[1:2]
    _, raw = idx._raw_search(q, 1000)
    found = raw[0][raw[0] >= 0] + 1
    assert 10 < len(found) < 500
    s, i = idx.search(q, 10, exclude=[found])
    assert (i > 0).all() and len(set(i[0])) == 10 and not set(i[0]) & set(found) and np.isfinite(s).all()
