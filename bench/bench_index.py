"""Item index benchmark: build time, queries/s and recall@10 (against exact search) for flat / ivf / hnsw.

Catalogs of n = 3,416 (ML-1M's item count after 5-core) and n = 100,000, d = 384 (all-MiniLM-L6-v2), in the
form the index holds after the whiten stage (zero mean, identity covariance):

- `clustered` (default): topic clusters with decaying spread across dimensions, then whitened; text
  embeddings look like this (measured: recall on real whitened MiniLM vectors is close to it);
- `isotropic`: a low-rank-plus-noise cloud whitened into a near-Gaussian ball: the worst case for IVF and
  HNSW (no neighbourhood structure to exploit); `--data isotropic` to see it;
- `--vectors path.npy`: a real (n_items + 1, d) table, e.g. `<run_dir>/whiten/item_vectors.npy`.

Queries are item vectors plus N(0, 0.25) noise per dimension, like a generated x0 near its target item.

    python bench/bench_index.py [--n 3416 100000] [--d 384] [--data clustered] [--queries 2000] [--device auto]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from recpipe.config import IndexConfig
from recpipe.pipeline.index import ItemIndex, num_gpus


def _whiten(X: np.ndarray) -> np.ndarray:
    X = X - X.mean(0)
    lam, U = np.linalg.eigh(np.cov(X, rowvar=False))
    X = X @ (U / np.sqrt(np.maximum(lam, 1e-6))) @ U.T
    out = np.zeros((len(X) + 1, X.shape[1]), dtype=np.float32)
    out[1:] = X
    return out


def make_vectors(kind: str, n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """(n + 1, d) float32 whitened item vectors, row 0 padding."""
    if kind == "clustered":
        centres = rng.standard_normal((max(8, n // 50), d)) * np.linspace(2, 0.2, d)
        X = centres[rng.integers(0, len(centres), n)] + 0.4 * rng.standard_normal((n, d))
    else:
        r = min(64, d)
        X = rng.standard_normal((n, r)) @ (rng.standard_normal((r, d)) * np.linspace(3, 0.3, r)[:, None])
        X += 0.3 * rng.standard_normal((n, d))
    return _whiten(X)


def bench(V: np.ndarray, label: str, a: argparse.Namespace, cfg: IndexConfig) -> None:
    rng = np.random.default_rng(a.seed + 1)
    n, d = V.shape[0] - 1, V.shape[1]
    Q = V[1 + rng.integers(0, n, a.queries)] + 0.5 * rng.standard_normal((a.queries, d)).astype(np.float32)
    exact = None
    for kind, sweep in (("flat", [None]), ("ivf", [cfg.nprobe, 4 * cfg.nprobe]),
                        ("hnsw", [cfg.hnsw_ef_search, 2 * cfg.hnsw_ef_search])):
        device = "cpu" if kind == "hnsw" and a.device == "gpu" else a.device
        t = time.perf_counter()
        idx = ItemIndex(V, kind=kind, device=device, nlist=cfg.nlist, nprobe=cfg.nprobe, hnsw_m=cfg.hnsw_m,
                        seed=a.seed, ef_search=cfg.hnsw_ef_search, ef_construction=cfg.hnsw_ef_construction)
        build = time.perf_counter() - t
        for value in sweep:
            if kind == "ivf":
                idx._cpu.nprobe = min(value, idx.nlist)
                if idx._gpu is not None:
                    idx._gpu.nprobe = min(value, idx.nlist)
                setting = f"nlist {idx.nlist} np {idx._cpu.nprobe}"
            elif kind == "hnsw":
                idx._cpu.hnsw.efSearch = value
                setting = f"M {cfg.hnsw_m} ef {value}"
            else:
                setting = "exact"
            idx.search(Q[:16], a.k)  # warm-up
            t = time.perf_counter()
            _, ids = idx.search(Q, a.k)
            qps = len(Q) / (time.perf_counter() - t)
            if exact is None:
                exact = ids
            recall = float(np.mean([len(set(x) & set(y)) / a.k for x, y in zip(ids, exact)]))
            print(f"{label:<10} {n:>8} {kind:<5} {setting:<17} {idx.device:<6} {build:>8.2f} {qps:>10,.0f} "
                  f"{recall:>9.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[3416, 100_000])
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--data", choices=["clustered", "isotropic"], nargs="+", default=["clustered"])
    ap.add_argument("--vectors", help="a real (n_items + 1, d) .npy table instead of synthetic data")
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    import faiss

    cfg = IndexConfig()
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads, {num_gpus()} GPU(s); "
          f"{a.queries} queries, k = {a.k}; build includes IVF k-means / HNSW insertion")
    print(f"{'data':<10} {'n':>8} {'kind':<5} {'setting':<17} {'device':<6} {'build s':>8} {'queries/s':>10} "
          f"{'recall@10':>9}")
    if a.vectors:
        bench(np.load(a.vectors).astype(np.float32), "file", a, cfg)
        return
    for data in a.data:
        for n in a.n:
            bench(make_vectors(data, n, a.d, np.random.default_rng(a.seed)), data, a, cfg)


if __name__ == "__main__":
    main()
