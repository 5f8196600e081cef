"""Index stage: a FAISS inner-product index over the whitened item vectors.

`ItemIndex` wraps one FAISS index over item rows 1..n of an id-indexed table (row 0 is padding: it is
never added, so it can never be returned) and answers top-k queries in dense item ids 1..n, optionally
excluding each query's seen items. Kinds:

- `flat` (default): `IndexFlatIP`, exact. Full ranking of a few thousand to a few hundred thousand items
  is a matrix product; this is what `evaluate` must use.
- `ivf`: `IndexIVFFlat` with inner product; the coarse quantizer is trained by FAISS's seeded (spherical)
  k-means. nlist = None picks 4*sqrt(n), clamped to n // 39 so every centroid gets FAISS's minimum of 39
  training points; `nprobe` cells are scanned per query.
- `ivfpq`: `IndexIVFPQ` with inner product: the same coarse cells as `ivf` (same nlist rule, seeded k-means),
  each item stored as `pq_m` one-byte product-quantizer codes of its residual to its cell centre (8 bits: 256
  centroids per sub-quantizer, also seeded). pq_m = None picks the largest divisor of d up to d // 8 (48 for
  384-d: 48 bytes an item against 1,536 as float32). It needs at least 256 items (one training point per
  codebook centroid; FAISS warns below 39 * 256 = 9,984 and the codes get coarser). Its scores are the
  PQ-approximated inner products unless the index is given the item table (`refine_with`, which `build_index`,
  `load_matching` and `get_index` do with `index.rerank`): then rerank x k candidates are taken by PQ score
  and the k best by exact inner product are returned, read from the table row by row (a memory-mapped table
  stays on disk). The exact completion of short rows searches the decoded vectors: the index holds no exact
  copy. For catalogs whose float32 vectors do not fit in memory.
- `hnsw`: `IndexHNSWFlat` with METRIC_INNER_PRODUCT; graph degree `hnsw_m`, `ef_construction` at build,
  `ef_search` (raised to the number of candidates asked for) at query time. FAISS has no GPU HNSW.

Device: `auto` uses the GPU when `faiss.get_num_gpus() > 0` (the `gpu` extra installs faiss-gpu-cu12)
and the kind has a GPU implementation, else the CPU. An explicit `gpu` with no GPU (or with `hnsw`) is a
ConfigError, never a silent fallback. Indexes are built on the CPU (so IVF's k-means is reproducible) and
copied to the GPU; the CPU twin is kept for saving and for candidate lists longer than the GPU's k limit.

Output (`<run_dir>/index/`): `items.faiss` (always a CPU index) and manifest info (kind, device, n, d,
nlist, nprobe, build time; for ivfpq also pq_m and `table_sha256`, the digest of the float32 vectors it was
built from: its codes cannot be compared with a table bit for bit, so `load_matching` compares digests).
`recommend` (through `recpipe.pipeline.bundle`) serves the saved index whatever its
kind when it holds exactly the item table the model scores against (`load_matching`), and otherwise builds
one in memory from the [index] settings and says so; `get_index` is the same for a caller that wants the
index these settings describe (the saved one only when it was built with them).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recpipe.artifacts import StageResult, atomic_path, load_manifest, require_stage, run_stage
from recpipe.config import Config, IndexConfig, to_dict
from recpipe.errors import ArtifactError, BackendError, ConfigError
from recpipe.pipeline.whiten import STAGE as WHITEN
from recpipe.pipeline.whiten import load_whitening

STAGE = "index"
INDEX_FILE = "items.faiss"
KINDS = ("flat", "ivf", "ivfpq", "hnsw")
IVF_KINDS = ("ivf", "ivfpq")  # kinds with coarse cells (nlist, nprobe)
PQ_NBITS = 8  # bits per PQ code: one byte per sub-quantizer, the layout FAISS's fast CPU and GPU scanners use
REFINE_ROWS = 2048  # candidate rows gathered at a time when re-ranking (3 MB of 384-d float32)
GPU_MAX_K = 2048  # FAISS GPU limit on k (and nprobe); longer candidate lists are searched on the CPU twin
MIN_POINTS_PER_CENTROID = 39  # FAISS warns (and k-means degrades) below this many training points per cell


def _faiss():
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - faiss-cpu is a core dependency
        raise BackendError(f"FAISS is not importable ({e}); reinstall recpipe (faiss-cpu or the gpu extra)") from None
    return faiss


def num_gpus() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    faiss = _faiss()
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def resolve_device(device: str, kind: str) -> str:
    """'cpu' or 'gpu' for a requested device ('auto' | 'cpu' | 'gpu') and index kind."""
    if device not in ("auto", "cpu", "gpu"):
        raise ConfigError(f"index device must be auto, cpu or gpu, got {device!r}")
    if device == "cpu":
        return "cpu"
    gpus = num_gpus()
    if device == "gpu":
        if gpus == 0:
            raise ConfigError(
                "index.device = gpu but FAISS sees no GPU (faiss-cpu, or no CUDA device); install the `gpu` "
                "extra (faiss-gpu-cu12) on a CUDA machine, or use index.device = auto or cpu"
            )
        if kind == "hnsw":
            raise ConfigError("index.kind = hnsw has no FAISS GPU implementation; use index.device = auto or cpu")
        return "gpu"
    return "gpu" if gpus > 0 and kind != "hnsw" else "cpu"


def resolve_nlist(n: int, nlist: int | None = None) -> int:
    """IVF cell count: `nlist` or 4*sqrt(n), at most n // 39 (FAISS's minimum training points per cell)."""
    want = nlist if nlist is not None else int(round(4 * math.sqrt(n)))
    return max(1, min(want, n // MIN_POINTS_PER_CENTROID, n))


def resolve_pq_m(d: int, pq_m: int | None = None) -> int:
    """PQ sub-quantizers for dimension d: `pq_m` when it divides d (ConfigError otherwise), else the largest
    divisor of d up to d // 8 (8 dimensions a one-byte code: FAISS's usual accuracy / size trade-off)."""
    if pq_m is None:
        cap = max(1, d // 8)
        return max(m for m in range(1, cap + 1) if d % m == 0)
    m = int(pq_m)
    if m < 1 or d % m:
        divisors = [x for x in range(1, d + 1) if d % x == 0]
        near = sorted(divisors, key=lambda x: (abs(x - m), x))[:3]
        raise ConfigError(f"index.pq_m = {pq_m} must divide the vector dimension {d} (nearest divisors: "
                          f"{', '.join(map(str, sorted(near)))}); or leave it unset for {resolve_pq_m(d)}")
    return m


def table_digest(vectors: np.ndarray) -> str:
    """sha256 of rows 1..n of an (n_items + 1, d) table as contiguous float32: what an ivfpq index was built from."""
    X = np.ascontiguousarray(np.asarray(vectors)[1:], dtype=np.float32)
    h = hashlib.sha256(f"{X.shape[0]}x{X.shape[1]}".encode())
    h.update(memoryview(X).cast("B"))
    return h.hexdigest()


class ItemIndex:
    """Top-k item retrieval by inner product over rows 1..n of an (n_items + 1, d) vector table.

    Why inner product: every recpipe model scores an item as the dot product between the vector it
    generates (or its sequence representation) and the item's vector (DreamRec / iDreamRec rank by
    x0_hat . e_i; SASRec / DiffuRec train a softmax over h . E^T), and `evaluate` ranks all items the same
    way, so the index has to reproduce that order exactly. Whitened vectors are not unit-norm: cosine would
    drop the norm, and L2 distance ||q - e||^2 = ||q||^2 - 2 q.e + ||e||^2 adds a penalty on long item
    vectors that the models never saw. For unit vectors (TEM space, method "none") all three agree.

    Returned ids are dense item ids 1..n (FAISS position + 1). Slots that cannot be filled (the catalog
    minus the excluded items has fewer than k items) hold id 0 (padding, "no item") with score -inf.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        kind: str = "flat",
        device: str = "auto",
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        seed: int = 2024,
        ef_search: int = 64,
        ef_construction: int = 80,
        pq_m: int | None = None,
    ):
        if kind not in KINDS:
            raise ConfigError(f"index kind must be one of {', '.join(KINDS)}, got {kind!r}")
        for name, value, low in (("nlist", 1 if nlist is None else nlist, 1), ("nprobe", nprobe, 1),
                                 ("hnsw_m", hnsw_m, 2), ("hnsw_ef_search", ef_search, 1),
                                 ("hnsw_ef_construction", ef_construction, 1)):
            if int(value) < low:
                raise ConfigError(f"index.{name} must be >= {low}, got {value}")
        V = np.asarray(vectors)
        if V.ndim != 2 or V.shape[0] < 2 or V.shape[1] < 1:
            raise ArtifactError(f"item vectors must be (n_items + 1, dim) with n_items >= 1, got shape {V.shape}")
        X = np.ascontiguousarray(V[1:], dtype=np.float32)  # row 0 = padding: never indexed
        if not np.isfinite(X).all():
            bad = int(np.flatnonzero(~np.isfinite(X).all(axis=1))[0]) + 1
            raise ArtifactError(f"item vector {bad} contains NaN or inf; re-run `recpipe whiten --force`")
        faiss = _faiss()
        self.device = resolve_device(device, kind)
        n, d = X.shape
        t0 = time.perf_counter()
        if kind == "flat":
            cpu = faiss.IndexFlatIP(d)
        elif kind in IVF_KINDS:
            nl = resolve_nlist(n, nlist)
            quantizer = faiss.IndexFlatIP(d)
            if kind == "ivf":
                cpu = faiss.IndexIVFFlat(quantizer, d, nl, faiss.METRIC_INNER_PRODUCT)
            else:
                m = resolve_pq_m(d, pq_m)
                if n < 2**PQ_NBITS:
                    raise ConfigError(f"index.kind = ivfpq needs at least {2**PQ_NBITS} items to train its "
                                      f"{PQ_NBITS}-bit codebooks, got {n}; use flat, ivf or hnsw")
                cpu = faiss.IndexIVFPQ(quantizer, d, nl, m, PQ_NBITS, faiss.METRIC_INNER_PRODUCT)
                cpu.pq.cp.seed = int(seed) % (2**31)  # seeded codebooks: the same codes on every build
                # below 39 * 256 items FAISS prints its too-few-points warning once per sub-quantizer (48 lines
                # for 384-d); the docstring says what fewer items cost, once
                cpu.pq.cp.min_points_per_centroid = min(cpu.pq.cp.min_points_per_centroid, n // 2**PQ_NBITS)
            cpu.cp.seed = int(seed) % (2**31)  # seeded k-means: the same cells on every build
            cpu.train(X)
            cpu.nprobe = max(1, min(int(nprobe), nl))
        else:
            cpu = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
            cpu.hnsw.efConstruction = int(ef_construction)
            cpu.hnsw.efSearch = int(ef_search)
        cpu.add(X)
        self._init(cpu, kind)
        if kind == "ivfpq":
            self.table_digest = table_digest(V)
        self.build_s = time.perf_counter() - t0

    # ---------------------------------------------------------------------------------------- internals
    def _init(self, cpu, kind: str) -> None:
        faiss = _faiss()
        self.kind = kind
        self._cpu = cpu
        self._exact = cpu if kind == "flat" else None  # built lazily for approximate indexes
        self.n = int(cpu.ntotal)
        self.d = int(cpu.d)
        self._gpu = None
        self._res = None
        # ivfpq's codes are no exact copy of the vectors: `holds` compares this digest (set at build, or from
        # the index stage's manifest by `load_matching`); None = unknown, so such an index holds no table
        self.table_digest: str | None = None
        self._refine: np.ndarray | None = None  # ivfpq: the exact (n + 1, d) table candidates are re-scored from
        self.rerank = 1
        if self.device == "gpu":
            try:
                self._res = faiss.StandardGpuResources()
                co = faiss.GpuClonerOptions()
                # float16 PQ lookup tables: 48 sub-quantizers x 256 float32 entries is the GPU's whole 48 KiB of
                # shared memory per block, which FAISS refuses; float16 halves it (scores stay approximate anyway)
                co.useFloat16 = kind == "ivfpq"
                self._gpu = faiss.index_cpu_to_gpu(self._res, 0, cpu, co)
            except (RuntimeError, AttributeError) as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise BackendError(f"FAISS could not move the {kind} index to the GPU: {msg}") from None
        self.build_s = 0.0

    @classmethod
    def _wrap(cls, cpu, kind: str, device: str) -> ItemIndex:
        self = cls.__new__(cls)
        self.device = resolve_device(device, kind)
        self._init(cpu, kind)
        return self

    @property
    def nlist(self) -> int:
        return int(self._cpu.nlist) if self.kind in IVF_KINDS else 0

    @property
    def nprobe(self) -> int:
        return int(self._cpu.nprobe) if self.kind in IVF_KINDS else 0

    @property
    def pq_m(self) -> int:
        return int(self._cpu.pq.M) if self.kind == "ivfpq" else 0

    def _raw_search(self, Q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        if self._gpu is not None and k <= GPU_MAX_K:
            return self._gpu.search(Q, k)
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            params.efSearch = max(int(self._cpu.hnsw.efSearch), k)
            return self._cpu.search(Q, k, params=params)
        return self._cpu.search(Q, k)

    def _stored(self) -> np.ndarray:
        """The (n, d) float32 item vectors the index holds: exact for flat, ivf and hnsw, which store them
        uncompressed; ivfpq's decoded (approximate) vectors."""
        if self.kind in IVF_KINDS:
            self._cpu.make_direct_map()
        return np.ascontiguousarray(self._cpu.reconstruct_n(0, self.n), dtype=np.float32)

    def _exact_index(self):
        """A flat twin of an approximate index (for rows an approximate search could not fill)."""
        if self._exact is None:
            flat = _faiss().IndexFlatIP(self.d)
            flat.add(self._stored())
            self._exact = flat
        return self._exact

    def refine_with(self, vectors: np.ndarray, rerank: int) -> ItemIndex:
        """ivfpq: re-score rerank x k PQ candidates a query exactly against `vectors` (the (n + 1, d) table the
        index was built from, in memory or memory-mapped) and keep the best k. Other kinds store exact vectors
        already: nothing changes. Returns self."""
        _check_rerank(rerank)
        if self.kind != "ivfpq":
            return self
        if tuple(np.shape(vectors)) != (self.n + 1, self.d):
            raise ArtifactError(f"the re-ranking table has shape {tuple(np.shape(vectors))}, the index holds "
                                f"{self.n} items of dimension {self.d}")
        self._refine, self.rerank = (vectors if int(rerank) > 1 else None), int(rerank)
        return self

    def holds(self, vectors: np.ndarray) -> bool:
        """Whether the index holds exactly rows 1..n of an (n_items + 1, d) table, bit for bit: a saved index is
        served only for the item table it was built from."""
        V = np.asarray(vectors)
        if V.ndim != 2 or V.shape != (self.n + 1, self.d):
            return False
        if self.kind == "ivfpq":
            return self.table_digest is not None and self.table_digest == table_digest(V)
        return bool(np.array_equal(self._stored(), np.asarray(V[1:], dtype=np.float32)))

    # -------------------------------------------------------------------------------------------- search
    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray | Sequence[int] | None] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items by inner product: (scores float32 (B, k), item ids int64 (B, k)), best first.

        exclude[b]: item ids (1..n) that query b must not get back (its seen items); ids outside 1..n are
        ignored. The index is searched for k + max_b len(exclude[b]) candidates, so every row still gets k
        items whenever the catalog minus its exclusions has k; rows an approximate index leaves short are
        completed by an exact search. Unfillable slots: id 0 with score -inf.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        Q = np.asarray(queries)
        if Q.ndim == 1:
            Q = Q[None, :]
        if Q.ndim != 2 or Q.shape[1] != self.d:
            raise ArtifactError(
                f"query vectors have shape {Q.shape} but the index holds dimension {self.d} (another TEM or whitening?)"
            )
        Q = np.ascontiguousarray(Q, dtype=np.float32)
        if not np.isfinite(Q).all():
            raise ArtifactError("query vectors contain NaN or inf (a diverged model?)")
        B = Q.shape[0]
        if exclude is not None and len(exclude) != B:
            raise ValueError(f"exclude has {len(exclude)} rows for {B} queries")
        excl = [np.asarray(e if e is not None else [], dtype=np.int64).ravel() for e in exclude] if exclude else None
        extra = max((len(e) for e in excl), default=0) if excl else 0
        k_search = min(self.n, k + extra)
        scores, ids = self._candidates(Q, k_search, excl)
        need = np.minimum(k, self.n - self._n_excluded(excl, B))
        short = np.flatnonzero((ids[:, :k] > 0).sum(axis=1) < need)
        if len(short) and self.kind != "flat":  # approximate search came back short: complete exactly
            s2, i2 = self._candidates(Q[short], k_search, [excl[b] for b in short] if excl else None, exact=True)
            scores[short], ids[short] = s2, i2
        if ids.shape[1] < k:  # k exceeds the catalog
            scores, ids = _pad(scores, ids, k)
        return scores[:, :k], ids[:, :k]

    def _n_excluded(self, excl: list[np.ndarray] | None, B: int) -> np.ndarray:
        if not excl:
            return np.zeros(B, dtype=np.int64)
        return np.array([len(np.unique(e[(e >= 1) & (e <= self.n)])) for e in excl], dtype=np.int64)

    def _candidates(
        self, Q: np.ndarray, k_search: int, excl: list[np.ndarray] | None, exact: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Search k_search candidates, map to item ids, drop excluded and missing ones, keep the rest in order."""
        refine = self._refine is not None and not exact
        if exact:
            D, pos = self._exact_index().search(Q, k_search)
        elif refine:
            D, pos = self._raw_search(Q, min(self.n, k_search * self.rerank))
        else:
            D, pos = self._raw_search(Q, k_search)
        ids = np.where(pos >= 0, pos + 1, 0).astype(np.int64)
        if refine:  # exact inner products of the PQ candidates, best first (a missing one: -inf, id 0)
            exact_s = np.empty(ids.shape, dtype=np.float32)
            step = max(1, REFINE_ROWS // max(1, ids.shape[1]))  # queries a block: their candidate rows stay in cache
            for a in range(0, len(Q), step):
                rows = np.asarray(self._refine[ids[a:a + step]], dtype=np.float32)  # (b, K, d)
                exact_s[a:a + step] = np.matmul(rows, Q[a:a + step, :, None])[..., 0]
            D = np.where(ids > 0, exact_s, -np.inf)
            top = np.argsort(-D, axis=1, kind="stable")[:, :k_search]
            D, ids = np.take_along_axis(D, top, axis=1), np.take_along_axis(ids, top, axis=1)
            ids = np.where(np.isfinite(D), ids, 0)
        keep = ids > 0
        if excl:
            B = len(Q)
            stride = self.n + 1
            keys = np.arange(B, dtype=np.int64)[:, None] * stride + ids
            lens = np.array([len(e) for e in excl])
            ex_keys = np.repeat(np.arange(B, dtype=np.int64), lens) * stride + (
                np.concatenate(excl) if lens.sum() else np.zeros(0, np.int64)
            )
            keep &= ~np.isin(keys, ex_keys)
        order = np.argsort(~keep, axis=1, kind="stable")  # kept candidates first, in score order
        ids = np.take_along_axis(np.where(keep, ids, 0), order, axis=1)
        scores = np.take_along_axis(np.where(keep, D, -np.inf).astype(np.float32), order, axis=1)
        return scores, ids

    # --------------------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> None:
        """Write the index atomically; GPU indexes are written as their CPU form."""
        faiss = _faiss()
        index = faiss.index_gpu_to_cpu(self._gpu) if self._gpu is not None else self._cpu
        with atomic_path(path) as tmp:
            faiss.write_index(index, str(tmp))

    @classmethod
    def load(cls, path: str | Path, device: str = "auto") -> ItemIndex:
        """Read an index written by `save`; ArtifactError (one line) if missing, corrupt or not recpipe's kind."""
        faiss = _faiss()
        path = Path(path)
        hint = "re-run `recpipe index --force`"
        if not path.exists():
            raise ArtifactError(f"{path}: missing; {hint}")
        try:
            index = faiss.read_index(str(path))
        except (RuntimeError, MemoryError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ArtifactError(f"{path}: corrupt FAISS index ({first[:160]}); {hint}") from None
        kind = {"IndexFlatIP": "flat", "IndexIVFFlat": "ivf", "IndexIVFPQ": "ivfpq",
                "IndexHNSWFlat": "hnsw"}.get(type(index).__name__)
        if kind is None or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ArtifactError(f"{path}: a {type(index).__name__} index is not a recpipe inner-product index; {hint}")
        return cls._wrap(index, kind, device)

    def __repr__(self) -> str:
        extra = f", nlist={self.nlist}, nprobe={self.nprobe}" if self.kind in IVF_KINDS else ""
        extra += f", pq_m={self.pq_m}, rerank={self.rerank}" if self.kind == "ivfpq" else ""
        if self.kind == "hnsw":  # M: the neighbours a node keeps above the base level (which keeps 2M)
            extra += f", M={self._cpu.hnsw.nb_neighbors(1)}, ef_search={self._cpu.hnsw.efSearch}"
        return f"ItemIndex(kind={self.kind!r}, device={self.device!r}, n={self.n}, d={self.d}{extra})"


def _check_rerank(rerank: int) -> None:
    if int(rerank) < 1:
        raise ConfigError(f"index.rerank must be >= 1 (1 = PQ scores as they are), got {rerank}")


def _pad(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Widen (B, m < k) results to k columns of (-inf, 0): only when k exceeds the catalog."""
    B, m = ids.shape
    s = np.full((B, k), -np.inf, dtype=np.float32)
    i = np.zeros((B, k), dtype=np.int64)
    s[:, :m], i[:, :m] = scores, ids
    return s, i


# ---------------------------------------------------------------------------------------------- stage
def build_index(items: np.ndarray, icfg: IndexConfig, seed: int, device: str | None = None) -> ItemIndex:
    """An ItemIndex over an (n_items + 1, d) table as the [index] config describes it (ivfpq re-ranked
    against `items` itself)."""
    _check_rerank(icfg.rerank)  # before a build that may take minutes, not after it
    return ItemIndex(
        items, kind=icfg.kind, device=device or icfg.device, nlist=icfg.nlist, nprobe=icfg.nprobe,
        hnsw_m=icfg.hnsw_m, seed=seed, ef_search=icfg.hnsw_ef_search, ef_construction=icfg.hnsw_ef_construction,
        pq_m=icfg.pq_m,
    ).refine_with(items, icfg.rerank)


def _stage_key(cfg: Config) -> dict[str, Any]:
    # The saved file is a CPU index whatever the device, so the device is not part of the cache key; pq_m
    # shapes only an ivfpq index, so other kinds' saved stages stay current whatever it says.
    # rerank is a search setting: the saved index is the same whatever it says.
    skip = {"device", "rerank"} | ({"pq_m"} if cfg.index.kind != "ivfpq" else set())
    return {"index": {k: v for k, v in to_dict(cfg.index).items() if k not in skip}, "seed": cfg.run.seed}


def run(cfg: Config, force: bool = False, log=print) -> StageResult:
    wm = require_stage(cfg.run_dir, WHITEN, hint="recpipe whiten")
    inputs = {WHITEN: wm.fingerprint}

    def build(out_dir: Path) -> dict[str, Any]:
        _, items, _ = load_whitening(cfg.run_dir)
        idx = build_index(items, cfg.index, cfg.run.seed)
        idx.save(out_dir / INDEX_FILE)
        log(f"index: {idx!r} built in {idx.build_s:.2f} s")
        info = {"kind": idx.kind, "device": idx.device, "n": idx.n, "d": idx.d, "nlist": idx.nlist,
                "nprobe": idx.nprobe, "build_s": round(idx.build_s, 3)}
        if idx.kind == "ivfpq":
            info.update(pq_m=idx.pq_m, table_sha256=idx.table_digest)
        return info

    return run_stage(cfg.run_dir, STAGE, _stage_key(cfg), inputs, build, force=force, log=log)


def load_index(run_dir: str | Path, device: str = "auto") -> ItemIndex:
    """The saved index of a finished index stage, on `device`."""
    require_stage(run_dir, STAGE, hint="recpipe index")
    return ItemIndex.load(Path(run_dir) / STAGE / INDEX_FILE, device=device)


def load_matching(run_dir: str | Path, table: np.ndarray, device: str = "auto", rerank: int = 1
                  ) -> tuple[ItemIndex | None, str]:
    """(the index stage's saved index, "") when it holds exactly `table`'s items (the item table a model scores
    against), else (None, why not): no index stage, an unreadable one, or one over other vectors. An ivfpq
    index re-ranks against `table` (`rerank` x k candidates)."""
    stage_dir = Path(run_dir) / STAGE
    try:
        m = load_manifest(stage_dir)
        if m is None:
            return None, f"no index stage in {Path(run_dir)} (`recpipe index` saves one)"
        idx = load_index(run_dir, device=device)
    except ArtifactError as e:
        return None, str(e)
    if idx.kind == "ivfpq":
        idx.table_digest = (m.info or {}).get("table_sha256")
    if not idx.holds(table):
        return None, (f"{stage_dir / INDEX_FILE} holds other item vectors than the model scores against (made "
                      "before the whitening changed, or the model learns its own item table)")
    return idx.refine_with(table, rerank), ""


def get_index(cfg: Config, log=print) -> ItemIndex:
    """The index stage's saved index when it is current (same whitened vectors and config), else one built
    in memory from `<run_dir>/whiten/item_vectors.npy` (fast: nothing is written)."""
    wm = require_stage(cfg.run_dir, WHITEN, hint="recpipe whiten")
    m = load_manifest(Path(cfg.run_dir) / STAGE)
    key = json.loads(json.dumps(_stage_key(cfg), sort_keys=True))
    if m is not None and m.inputs == {WHITEN: wm.fingerprint} and m.config == key:
        try:
            idx = load_index(cfg.run_dir, device=cfg.index.device)
        except ArtifactError as e:
            log(f"index: {e}; building in memory")
        else:
            return idx if idx.kind != "ivfpq" else idx.refine_with(load_whitening(cfg.run_dir)[1], cfg.index.rerank)
    _, items, _ = load_whitening(cfg.run_dir)
    return build_index(items, cfg.index, cfg.run.seed)


__all__ = ["ItemIndex", "run", "load_index", "load_matching", "get_index", "build_index", "resolve_device",
           "resolve_nlist", "resolve_pq_m", "table_digest", "num_gpus", "KINDS"]
