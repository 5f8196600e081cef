"""Whiten stage: a fixed affine map from TEM space to the space the diffusion models generate in.

iDreamRec (arXiv 2410.13428) whitens the item text embeddings once, before training:

    A(e) = (e - mu) O Lambda^(-1/2) O^T          (method "whiten", ZCA form)

where mu is the item mean and C = O Lambda O^T the eigendecomposition of the item covariance. Text
embeddings are anisotropic (a few directions carry most of the variance, the mean is far from zero); after
whitening every direction has unit variance, which matches the N(0, I) noise the diffusion model adds.
The alternatives, for comparison:

    A(e) = a * e                                  (method "scale")
    A(e) = e                                      (method "none")

"scale" does not centre, so inner products keep their ranking (a > 0 multiplies them all by a^2); `a` is
chosen so the scaled item vectors have unit *average per-dimension variance*: a = 1 / sqrt(trace(C) / d)
(for unit-norm MiniLM vectors this is roughly sqrt(d)). Values are never clipped, by any method.

Numerical choices:
- statistics in float64 over item rows 1..n only (row 0 is padding and never enters them); the covariance
  uses ddof = 1 like `torch.cov` and `np.cov`;
- `eps` is a *floor* on the eigenvalues (lambda -> max(lambda, eps)), not an addend: directions with variance
  above eps come out with variance exactly 1 (an addend would shrink every small direction, e.g. to 0.91
  for lambda = 10 eps), while near-null directions are amplified by at most 1/sqrt(eps). With d > n - 1
  (more dimensions than items) the covariance is rank-deficient; the null directions are floored and the
  whitened items have identity covariance on their span and zero variance elsewhere;
- W is invertible by construction, so `inverse(transform(x)) == x` for any x (up to float rounding).

Outputs (`<run_dir>/whiten/`):
- `whitening.npz`       the fitted map (method, eps, mean, eigenvalues, eigenvectors, scale)
- `item_vectors.npy`    float32 (n_items + 1, d): whitened items, row 0 = padding zeros
- `intent_vectors.npy`  float32, same shape, when the embed stage wrote intent embeddings (all-zero rows,
                        meaning "no intention", stay zero)
- manifest `info`       method, eps, dim, n_items, the embed stage's TEM info (`embed`; pass it to
                        `recpipe.pipeline.embed.load_tem` to embed queries with the same TEM), the spectrum
                        of the item covariance (min/max eigenvalue, condition number, floored count) and a
                        self-check of the whitened statistics (largest |mean|, largest |cov - I|)
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recpipe.artifacts import StageResult, atomic_path, require_stage, run_stage
from recpipe.config import Config, to_dict
from recpipe.errors import ArtifactError, ConfigError
from recpipe.pipeline import embed

STAGE = "whiten"
EMBED_STAGE = embed.STAGE
METHODS = ("whiten", "scale", "none")
FORMAT_VERSION = 1
CHUNK = 16384  # rows per float64 block when fitting / transforming big tables
# embed-manifest info keys that describe the run, not the TEM; the rest (tem, model, dim, normalized,
# max_input_chars, base_url, ...) is copied to info["embed"], enough for `embed.load_tem` to embed queries
NOT_TEM_KEYS = ("items", "intents", "items_per_s", "report")


class Whitening:
    """A fitted affine map y = (x - mean) @ W (whiten), y = a * x (scale) or y = x (none).

    >>> w = Whitening("whiten", eps=1e-6).fit(item_embeddings[1:])   # item rows only, never padding
    >>> y = w.transform(x); x_again = w.inverse(y)
    """

    def __init__(self, method: str = "whiten", eps: float = 1e-6):
        if method not in METHODS:
            raise ConfigError(f"whiten.method must be one of {', '.join(METHODS)}, got {method!r}")
        if not eps > 0:
            raise ConfigError(f"whiten.eps must be > 0, got {eps!r}")
        self.method = method
        self.eps = float(eps)
        self.dim: int | None = None
        self.mean: np.ndarray | None = None  # (d,) float64; zeros unless method == "whiten"
        self.eigvals: np.ndarray | None = None  # (d,) float64, ascending, of the item covariance (unfloored)
        self.eigvecs: np.ndarray | None = None  # (d, d) float64, columns = O
        self.scale = 1.0  # a, for "scale"
        self.n_fit = 0
        self._W: np.ndarray | None = None
        self._W_inv: np.ndarray | None = None

    # ------------------------------------------------------------------------------------------ fitting
    def fit(self, X: np.ndarray) -> Whitening:
        """Fit on item vectors (n, d): pass rows 1..n of an embedding table, never the padding row."""
        X = np.asarray(X)
        if X.ndim != 2:
            raise ArtifactError(f"whitening needs a 2-D (items x dim) array, got shape {X.shape}")
        n, d = X.shape
        if n < 2 or d < 1:
            raise ArtifactError(f"whitening needs at least 2 item vectors of dimension >= 1, got shape {X.shape}")
        bad = first_nonfinite_row(X)
        if bad is not None:
            raise ArtifactError(f"item vector {bad + 1} contains NaN or inf; re-run `recpipe embed --force`")
        mean, cov = table_cov(X)  # two passes over row blocks: memory O(CHUNK * d + d^2) whatever n is
        cov = (cov + cov.T) / 2  # exact symmetry for eigh
        lam, U = np.linalg.eigh(cov)
        self.dim, self.n_fit = d, n
        self.eigvals, self.eigvecs = lam, U
        if self.method == "whiten":
            self.mean = mean
        else:
            self.mean = np.zeros(d)
        if self.method == "scale":
            avg_var = float(np.trace(cov)) / d
            if not avg_var > 0:
                raise ArtifactError("all item vectors are identical; cannot scale them to unit variance")
            self.scale = 1.0 / np.sqrt(avg_var)
        self._build()
        return self

    def _build(self) -> None:
        if self.method == "whiten":
            lam = np.maximum(self.eigvals, self.eps)
            U = self.eigvecs
            self._W = (U / np.sqrt(lam)) @ U.T
            self._W_inv = (U * np.sqrt(lam)) @ U.T
        else:
            self._W = self._W_inv = None

    def _check(self, X: np.ndarray, what: str) -> tuple[np.ndarray, np.dtype]:
        if self.dim is None:
            raise RuntimeError("Whitening is not fitted; call fit() or load() first")
        X = np.asarray(X)
        dtype = X.dtype if X.dtype in (np.float32, np.float64) else np.dtype(np.float32)
        if X.shape[-1:] != (self.dim,):
            raise ArtifactError(
                f"{what} vectors have dimension {X.shape[-1] if X.ndim else 0} but the whitening was fitted on "
                f"dimension {self.dim} (another TEM?)"
            )
        return X.astype(np.float64, copy=False), dtype

    # --------------------------------------------------------------------------------------- applying
    def transform(self, X: np.ndarray) -> np.ndarray:
        """A(X) for (..., d) vectors; computed in float64, returned in X's float dtype (float32 otherwise)."""
        X64, dtype = self._check(X, "input")
        if self.method == "whiten":
            Y = (X64 - self.mean) @ self._W
        elif self.method == "scale":
            Y = X64 * self.scale
        else:
            Y = X64.copy()
        return Y.astype(dtype, copy=False)

    def inverse(self, Y: np.ndarray) -> np.ndarray:
        """A^-1(Y): back from the whitened space to TEM space."""
        Y64, dtype = self._check(Y, "whitened")
        if self.method == "whiten":
            X = Y64 @ self._W_inv + self.mean
        elif self.method == "scale":
            X = Y64 / self.scale
        else:
            X = Y64.copy()
        return X.astype(dtype, copy=False)

    def transform_table(self, E: np.ndarray, keep_zero_rows: bool = False, out: np.ndarray | None = None
                        ) -> np.ndarray:
        """Whiten an id-indexed table (n_items + 1, d) as float32; row 0 (padding) stays zeros.

        keep_zero_rows: other all-zero rows (an upstream "missing" marker, e.g. an item without an
        intention) also stay zeros instead of becoming A(0) = -mean @ W.
        out: a float32 array of E's shape to write into (a memory-mapped file: E may be one too, so a table
        larger than memory streams through in blocks of CHUNK rows).
        """
        E = np.asarray(E) if not isinstance(E, np.memmap) else E
        out = np.zeros(E.shape, dtype=np.float32) if out is None else out
        out[0] = 0.0
        for i in range(1, len(E), CHUNK):
            block = E[i : i + CHUNK]
            y = self.transform(block.astype(np.float64))
            if keep_zero_rows:
                y[~block.any(axis=1)] = 0.0
            out[i : i + CHUNK] = y
        return out

    @property
    def weight(self) -> np.ndarray:
        """(d, d) float64 matrix M with transform(x) = x @ M + bias (for applying A in torch)."""
        if self.dim is None:
            raise RuntimeError("Whitening is not fitted")
        if self.method == "whiten":
            return self._W.copy()
        return np.eye(self.dim) * (self.scale if self.method == "scale" else 1.0)

    @property
    def bias(self) -> np.ndarray:
        """(d,) float64 vector with transform(x) = x @ weight + bias."""
        if self.dim is None:
            raise RuntimeError("Whitening is not fitted")
        return -(self.mean @ self._W) if self.method == "whiten" else np.zeros(self.dim)

    def target_cov(self) -> np.ndarray:
        """The covariance whitened items have exactly: O diag(lambda / max(lambda, eps)) O^T (identity when
        no eigenvalue is floored)."""
        lam = self.eigvals
        return (self.eigvecs * (np.maximum(lam, 0) / np.maximum(lam, self.eps))) @ self.eigvecs.T

    def spectrum_info(self) -> dict[str, Any]:
        """Summary of the item covariance spectrum (what the manifest records)."""
        lam = self.eigvals
        lo = float(lam[0])
        hi = float(lam[-1])
        return {
            "min_eig": lo,
            "max_eig": hi,
            "cond": hi / max(lo, self.eps),  # condition number of the (floored) covariance that W inverts
            "n_floored": int((lam < self.eps).sum()),
            "min_eig_above_eps": float(lam[lam >= self.eps].min()) if (lam >= self.eps).any() else None,
            "rank_deficient": bool(self.n_fit - 1 < self.dim),
        }

    # ------------------------------------------------------------------------------------------- files
    def save(self, path: str | Path) -> None:
        """Write an .npz atomically (a crash never leaves a half-written file under `path`)."""
        if self.dim is None:
            raise RuntimeError("Whitening is not fitted")
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(
                f, version=np.int64(FORMAT_VERSION), method=np.str_(self.method), eps=np.float64(self.eps),
                mean=self.mean, eigvals=self.eigvals, eigvecs=self.eigvecs, scale=np.float64(self.scale),
                n_fit=np.int64(self.n_fit),
            )

    @classmethod
    def load(cls, path: str | Path, dim: int | None = None) -> Whitening:
        """Read a file written by `save`; ArtifactError (one line) if it is missing, corrupt or mismatched."""
        path = Path(path)
        hint = "re-run `recpipe whiten --force`"
        try:
            with np.load(path, allow_pickle=False) as z:
                d = {k: z[k] for k in z.files}
        except FileNotFoundError:
            raise ArtifactError(f"{path}: missing; {hint}") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
            raise ArtifactError(f"{path}: corrupt whitening file ({type(e).__name__}); {hint}") from None
        need = ("version", "method", "eps", "mean", "eigvals", "eigvecs", "scale", "n_fit")
        missing = [k for k in need if k not in d]
        if missing:
            raise ArtifactError(f"{path}: not a recpipe whitening file (missing {', '.join(missing)}); {hint}")
        if int(d["version"]) != FORMAT_VERSION:
            raise ArtifactError(f"{path}: whitening format {int(d['version'])}, expected {FORMAT_VERSION}; {hint}")
        method, eps = str(d["method"]), float(d["eps"])
        if method not in METHODS or not eps > 0:
            raise ArtifactError(f"{path}: invalid method {method!r} or eps {eps!r}; {hint}")
        mean, lam, U = d["mean"], d["eigvals"], d["eigvecs"]
        k = mean.shape[0] if mean.ndim == 1 else -1
        if k < 1 or lam.shape != (k,) or U.shape != (k, k):
            raise ArtifactError(
                f"{path}: inconsistent shapes (mean {mean.shape}, eigvals {lam.shape}, eigvecs {U.shape}); {hint}"
            )
        if not all(np.isfinite(a).all() for a in (mean, lam, U, d["scale"])) or not float(d["scale"]) > 0:
            raise ArtifactError(f"{path}: non-finite or invalid values; {hint}")
        if dim is not None and k != dim:
            raise ArtifactError(f"{path}: whitening of dimension {k}, expected {dim} (another TEM?); {hint}")
        w = cls(method, eps)
        w.dim, w.n_fit = k, int(d["n_fit"])
        w.mean, w.eigvals, w.eigvecs = mean.astype(np.float64), lam.astype(np.float64), U.astype(np.float64)
        w.scale = float(d["scale"])
        w._build()
        return w

    def __repr__(self) -> str:
        return f"Whitening(method={self.method!r}, eps={self.eps:g}, dim={self.dim})"


# ---------------------------------------------------------------------------------------------- stage
def first_nonfinite_row(X: np.ndarray) -> int | None:
    """The first row holding NaN or inf, read in blocks (a memory-mapped table never needs to be in memory)."""
    for i in range(0, len(X), CHUNK):
        finite = np.isfinite(X[i : i + CHUNK]).all(axis=1)
        if not finite.all():
            return i + int(np.flatnonzero(~finite)[0])
    return None


def missing_rows(E: np.ndarray) -> int:
    """All-zero rows among 1..n (items without a vector, e.g. no intention), counted in blocks."""
    return sum(int((~E[i : i + CHUNK].any(axis=1)).sum()) for i in range(1, len(E), CHUNK))


def _table_file(path: Path, like: np.ndarray) -> np.ndarray:
    """A float32 .npy file of `like`'s shape, memory-mapped for writing block by block."""
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=like.shape)


def table_cov(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance with ddof = 1) of the rows of Y, in float64 over blocks of CHUNK rows."""
    n = len(Y)
    mu = sum(Y[i : i + CHUNK].astype(np.float64).sum(axis=0) for i in range(0, n, CHUNK)) / n
    cov = np.zeros((Y.shape[1], Y.shape[1]))
    for i in range(0, n, CHUNK):
        Yc = Y[i : i + CHUNK].astype(np.float64) - mu
        cov += Yc.T @ Yc
    return mu, cov / (n - 1)


def whitened_stats(Y: np.ndarray, w: Whitening | None = None) -> dict[str, float]:
    """Largest |mean| and largest |cov - target| of whitened item vectors (ddof = 1).

    The target is the identity, or with `w` (method "whiten") `w.target_cov()`: the identity except along
    floored directions (zero-variance directions of the items, e.g. MiniLM's 3 constant dimensions), where
    no affine map can create variance.
    """
    mu, cov = table_cov(Y)
    target = w.target_cov() if w is not None and w.method == "whiten" else np.eye(Y.shape[1])
    return {"max_abs_mean": float(np.abs(mu).max()), "max_abs_cov_dev": float(np.abs(cov - target).max())}


def run(cfg: Config, force: bool = False, log=print) -> StageResult:
    emb = require_stage(cfg.run_dir, EMBED_STAGE, hint="recpipe embed")
    inputs = {EMBED_STAGE: emb.fingerprint}
    config = {"whiten": to_dict(cfg.whiten)}

    def build(out_dir: Path) -> dict[str, Any]:
        # memory maps in and out: tables of millions of items stream through in blocks of CHUNK rows
        E = embed.load_vectors(cfg.run_dir, "items", mmap=True)
        n, d = E.shape[0] - 1, E.shape[1]
        if "dim" in emb.info and emb.info["dim"] != d:
            raise ArtifactError(f"embed stage: item embeddings of dimension {d} but its manifest says "
                                f"{emb.info['dim']}; re-run `recpipe embed --force`")
        w = Whitening(cfg.whiten.method, cfg.whiten.eps).fit(E[1:])
        items = w.transform_table(E, out=_table_file(out_dir / "item_vectors.npy", E))
        items.flush()
        w.save(out_dir / "whitening.npz")
        info: dict[str, Any] = {
            "method": w.method, "eps": w.eps, "dim": d, "n_items": n, "scale": w.scale,
            "embed": {k: v for k, v in emb.info.items() if k not in NOT_TEM_KEYS},
            **w.spectrum_info(),
        }
        if w.method == "whiten":
            info.update(whitened_stats(items[1:], w))
        else:
            info["avg_var"] = float(np.trace(table_cov(items[1:])[1]) / d)
        intents = embed.load_vectors(cfg.run_dir, "intents", mmap=True)
        if intents is not None:
            if intents.shape != E.shape:
                raise ArtifactError(f"embed stage: intent embeddings of shape {intents.shape} differ from the item "
                                    f"embeddings' {E.shape}; re-run `recpipe embed --force`")
            if first_nonfinite_row(intents) is not None:
                raise ArtifactError("embed stage: its intent embeddings contain NaN or inf; re-run "
                                    "`recpipe embed --force`")
            w.transform_table(intents, keep_zero_rows=True, out=_table_file(out_dir / "intent_vectors.npy",
                                                                            intents)).flush()
            info["intents"] = True
            info["intents_missing"] = missing_rows(intents)
        else:
            info["intents"] = False
        check = (
            f"whitened |mean| <= {info['max_abs_mean']:.2g}, |cov - I| <= {info['max_abs_cov_dev']:.2g}"
            if w.method == "whiten" else f"average per-dimension variance {info['avg_var']:.3g}"
        )
        log(
            f"whiten: {w.method} over {n:,} items x {d} dims; covariance eigenvalues "
            f"{max(info['min_eig'], 0):.3g}..{info['max_eig']:.3g} ({info['n_floored']} below eps={w.eps:g}); "
            + check
        )
        return info

    return run_stage(cfg.run_dir, STAGE, config, inputs, build, force=force, log=log)


# ----------------------------------------------------------------------------------------- downstream
@dataclass
class Whitened:
    """A finished whiten stage, read once: the fitted map, the whitened item table (float32 (n_items + 1, d),
    row 0 zeros), the manifest info (with the TEM identity under "embed") and the stage's fingerprint."""

    whitening: Whitening
    items: np.ndarray
    info: dict[str, Any]
    fingerprint: str
    run_dir: Path

    def intent_vectors(self, mmap: bool = False) -> np.ndarray | None:
        """The whitened intention table, or None when the embed stage wrote no intentions."""
        return load_intent_vectors(self.run_dir, mmap=mmap)


def load(run_dir: str | Path, hint: str = "recpipe whiten") -> Whitened:
    """The whiten stage's files, verified against its manifest; `hint` is the command the error names when
    the stage has not run."""
    m = require_stage(run_dir, STAGE, hint=hint)
    stage_dir = Path(run_dir) / STAGE
    w = Whitening.load(stage_dir / "whitening.npz")
    path = stage_dir / "item_vectors.npy"
    try:
        items = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ArtifactError(f"{path}: corrupt ({type(e).__name__}); re-run `recpipe whiten --force`") from None
    if items.ndim != 2 or items.shape[1] != w.dim or items.dtype != np.float32:
        raise ArtifactError(f"{path}: {items.dtype} {items.shape} does not match the whitening (dim {w.dim})")
    return Whitened(w, items, dict(m.info), m.fingerprint, Path(run_dir))


def load_whitening(run_dir: str | Path) -> tuple[Whitening, np.ndarray, dict[str, Any]]:
    """(the fitted map, item_vectors float32 (n_items + 1, d) with row 0 zeros, the manifest info)."""
    got = load(run_dir)
    return got.whitening, got.items, got.info


def load_intent_vectors(run_dir: str | Path, mmap: bool = False) -> np.ndarray | None:
    """Whitened intent vectors (n_items + 1, d) float32, or None when the embed stage wrote none; `mmap`: a
    read-only memory map (a caller that reads a few rows of a large catalog's table)."""
    path = Path(run_dir) / STAGE / "intent_vectors.npy"
    if not path.exists():
        return None
    try:
        return np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as e:
        raise ArtifactError(f"{path}: corrupt ({type(e).__name__}); re-run `recpipe whiten --force`") from None


def check_tem(info: dict[str, Any], tem: str | None = None, model: str | None = None, dim: int | None = None) -> None:
    """Raise ArtifactError unless a query TEM (backend, model, dimension) matches the one items were embedded with."""
    emb = info.get("embed", {})
    for key, want in (("tem", tem), ("model", model), ("dim", dim)):
        have = emb.get(key, info.get(key) if key == "dim" else None)
        if want is not None and have is not None and want != have:
            raise ArtifactError(
                f"query TEM {key} {want!r} differs from the item vectors' {have!r}; embed queries with the same TEM"
            )


__all__ = ["Whitening", "Whitened", "run", "load", "load_whitening", "load_intent_vectors", "check_tem",
           "whitened_stats", "METHODS"]
