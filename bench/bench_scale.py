"""Every stage measured as the catalog grows: wall time, peak memory and disk, on seeded synthetic data.

Stages and what is measured (each measurement runs in its own subprocess, so its memory peak is its own):

- `data`: recpipe's data stage (load `interactions.csv` + `items.csv`, dedup, 5-core, split) on a synthetic
  log of N interactions: N / 25 users (mean history 25), N / 10 items with Zipf(0.8) popularity, per-user
  increasing timestamps. Written in the generic layout `recpipe data -d DIR` reads.
- `embed`: the local TEM (all-MiniLM-L6-v2) is not run over a whole large catalog (hours on one core): its
  texts/s is measured on a sample of metadata-like and of description-length texts and extrapolated; the
  writing of an n x 384 float32 table is measured through the embed stage's own chunked writer
  (`embed.write_tables`, with a seeded random encoder in place of the TEM).
- `index`: flat / ivf / ivfpq / hnsw with the shipped [index] defaults over n clustered, whitened 384-d
  vectors (bench/bench_index.py's recipe, generated in chunks): build time, memory, index bytes, recall@10
  against exact flat search and queries/s for one batch of 1,000 queries (item vectors + N(0, 0.25) noise).
- `evaluate`: evaluate's full-ranking loop body (`scores = oracle @ item_table.T`, column 0 = -inf, then
  `history_mask` and `RankAccumulator.add` from recpipe.models.metrics) over U users in batches of
  `evaluate.batch_size`, random oracles and 20-item histories: time per 1,000 users and memory. The scoring
  loop in recpipe/pipeline/scoring.py holds one batch x (n_items + 1) score matrix at a time, never users x
  items; this measures what that batch costs as n_items grows.
- `train`: recpipe's trainer (`recpipe.pipeline.train.run`, as `recpipe train` runs it) on the data stage's split of
  each log size (interactions), for SASRec (bench/bench_budget.py's SASREC_SETTINGS: batch 128, lr 2e-3, history 50)
  and iDreamRec (`model.idreamrec.loss=mse`, the paper's loss, which has no term over the item catalog; the
  trainer's defaults otherwise). iDreamRec's input, the whitened item table, is an embed stage of seeded random unit
  384-d vectors run through recpipe's whiten stage (not measured). Each model trains for --train-warmup untimed +
  --train-steps timed + 1 optimiser steps (train.max_steps; quick 2 + 5 + 1, --full 10 + 200 + 1) and validates once
  on --train-eval-users users (train.eval_users). Measured: seconds per step (the intervals between the trainer's
  consecutive loss calls: everything a step does), training targets per second, steps per epoch (the trainer's),
  seconds per epoch extrapolated from them, the setup before the first step (of which the Batcher), peak memory, and
  the EMA update's share of a step (train.ema: the trained parameters; before 92ca154 it also averaged
  iDreamRec's (items + 1) x 384 item-vector buffer). SASRec's full-softmax loss holds a targets x items logit
  matrix every step, so its step cost also grows with the item count the row states (the items grow with the log
  here: N / 10 before the 5-core filter); `--train-set model.sasrec.ce_negatives=1024` measures the sampled
  softmax instead. With `--stages train` alone, the log and its data stage are generated first (unmeasured).

Memory: `peak RSS` is the subprocess's high-water resident set (os.wait4's ru_maxrss: interpreter, imports,
inputs and page-cache pages of memory-mapped files included); `peak anon` is the largest anonymous (heap)
resident memory sampled every 20 ms during the measured section, above its level when the section began
(inputs already loaded): what the stage itself allocates.

Growth: for each measured series, least squares on log(value) = a + b log(size); b is reported with a reading
(b < 0.8 sublinear, < 1.08 linear, < 1.3 n log n, < 1.7 between n log n and quadratic, else quadratic or
worse; n log n is an exponent of about 1.1 over these ranges, so linear and n log n are close calls).

Threads: every subprocess runs on --threads (default 1: OMP/MKL/OpenBLAS env, torch.set_num_threads,
faiss.omp_set_num_threads).

    python bench/bench_scale.py                      # quick subset, a few minutes
    python bench/bench_scale.py --full               # items 10k, 100k, 1M; interactions 1M, 10M; 200 train steps
    python bench/bench_scale.py --stages data train --interactions 1000000 --train-steps 100
    python bench/bench_scale.py --interactions 1000000 10000000 --index-items 10000 100000 1000000 \\
        --stages data index                          # any sizes, any stages
    python bench/bench_scale.py --from-json cache/bench_scale/bench_scale.json   # reprint a saved run

Outputs in --out (default cache/bench_scale/): bench_scale.json (raw figures), bench_scale.md (the tables),
bench_scale.png (matplotlib, when installed), and work/ (the generated inputs; --keep-work keeps them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

QUICK = {"interactions": [250_000, 1_000_000], "index_items": [10_000, 100_000],
         "embed_items": [10_000, 100_000], "eval_items": [10_000, 100_000], "train_steps": 5, "train_warmup": 2}
FULL = {"interactions": [1_000_000, 10_000_000], "index_items": [10_000, 100_000, 1_000_000],
        "embed_items": [10_000, 100_000, 1_000_000], "eval_items": [10_000, 100_000, 1_000_000],
        "train_steps": 200, "train_warmup": 10}
STAGES = ("data", "embed", "index", "evaluate", "train")
TRAIN_MODELS = ("sasrec", "idreamrec")
# train: SASRec with bench/bench_budget.py's SASREC_SETTINGS (the ML-1M recipe, history 50); iDreamRec with the
# paper's x0-MSE loss (no term over the item catalog; `ce` and `preferdiff` would add one) and the trainer's
# defaults otherwise (batch 256 targets, causal windows of 20)
TRAIN_SETTINGS = {
    "sasrec": {"train.batch_size": "128", "train.lr": "0.002", "train.warmup_steps": "50",
               "model.sasrec.history_len": "50"},
    "idreamrec": {"model.idreamrec.loss": "mse"},
}
KINDS = ("flat", "ivf", "ivfpq", "hnsw")
DIM = 384  # all-MiniLM-L6-v2, the default TEM
MB = 2**20


# ============================================================================================ memory probe
def _status() -> dict[str, int]:
    """Resident-set figures of this process from /proc/self/status, in bytes (empty where unreadable)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class AnonPeak:
    """Samples RssAnon every 20 ms in a thread: the heap high-water mark of a section (the kernel keeps only the
    whole-process VmHWM, which also counts file pages of memory maps)."""

    def __init__(self) -> None:
        self.start = _status().get("RssAnon", 0)
        self.peak = self.start
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _status().get("RssAnon", 0))

    def stop(self) -> int:
        """Peak anonymous memory above the section's start, in bytes."""
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _status().get("RssAnon", 0))
        return self.peak - self.start


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ================================================================================================ workers
def _set_threads(n: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def gen_log(task: dict) -> dict:
    """interactions.csv + items.csv for N interactions (not measured: an input)."""
    import pandas as pd

    n, seed, out = int(task["n"]), int(task["seed"]), Path(task["dir"])
    rng = np.random.default_rng(seed)
    n_users, n_items = max(10, n // 25), max(20, n // 10)
    lengths = np.maximum(1, rng.geometric(1 / 25, n_users))
    lengths = np.maximum(1, np.round(lengths * n / lengths.sum()).astype(np.int64))
    total = int(lengths.sum())
    p = 1.0 / np.arange(1, n_items + 1) ** 0.8  # Zipf(0.8) popularity: a long tail the 5-core filter trims
    items = rng.choice(n_items, size=total, p=p / p.sum()) + 1
    users = np.repeat(np.arange(n_users), lengths)
    start = np.repeat(rng.integers(0, 10**8, n_users), lengths)
    step = rng.integers(1, 10**4, total)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    cum = np.cumsum(step)
    times = start + cum - np.repeat(cum[offsets] - step[offsets], lengths)  # increasing within each user
    order = rng.permutation(total)  # file order is not chronological
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"user_id": users[order], "item_id": items[order], "timestamp": times[order]}).to_csv(
        out / "interactions.csv", index=False)
    genres = np.array(["Comedy", "Drama", "Action", "Romance", "Thriller", "Horror", "Documentary", "Animation"])
    g = rng.integers(0, len(genres), (n_items, 2))
    pd.DataFrame({"item_id": np.arange(1, n_items + 1),
                  "title": [f"Item {i} ({1950 + i % 70})" for i in range(1, n_items + 1)],
                  "genres": [f"{genres[a]}|{genres[b]}" for a, b in g]}).to_csv(out / "items.csv", index=False)
    return {"rows": total, "users": n_users, "items": n_items, "csv_bytes": _dir_bytes(out)}


def run_data(task: dict) -> dict:
    """recpipe's data stage on a generated directory."""
    from recpipe.config import load_config
    from recpipe.pipeline import data as D

    src, run_dir = Path(task["dir"]), Path(task["run_dir"])
    cfg = load_config(None, {"run.dataset": str(src), "run.run_dir": str(run_dir), "run.cache_dir": task["cache"]})
    mem = AnonPeak()
    t = time.perf_counter()
    res = D.run(cfg, force=True, log=lambda m: None)
    wall = time.perf_counter() - t
    s = res.manifest.info["summary"]
    return {"wall_s": wall, "anon_bytes": mem.stop(), "disk_bytes": _dir_bytes(run_dir / D.STAGE),
            "users": s["users"], "items": s["items"], "interactions": s["interactions"]}


def embed_rate(task: dict) -> dict:
    """The local TEM's texts/s on metadata-like and description-length texts."""
    import pandas as pd

    from recpipe.config import EmbedConfig
    from recpipe.pipeline.describe import metadata_texts
    from recpipe.pipeline.embed import TEM

    rng = np.random.default_rng(int(task["seed"]))
    n = int(task["sample"])
    genres = ["Comedy", "Drama", "Action", "Romance", "Thriller", "Horror"]
    items = pd.DataFrame({"item_id": [str(i) for i in range(n)],
                          "title": [f"Item {i} ({1950 + i % 70})" for i in range(n)],
                          "genres": ["|".join(rng.choice(genres, 2, replace=False)) for _ in range(n)]})
    vocab = np.array("a film story about the young man woman family who finds love war city night dark funny "
                     "quiet journey friends secret past future world life death music road home town old new "
                     "strange adventure lost found brother sister mother father dream fight escape truth".split())
    long = [" ".join(rng.choice(vocab, 60)) + "." for _ in range(n)]  # describe's ~60-token descriptions
    ecfg = EmbedConfig()
    t = time.perf_counter()
    tem = TEM.from_config(ecfg)
    load_s = time.perf_counter() - t
    tem.encode(["warm up"] * 16, batch_size=ecfg.batch_size)
    out = {"load_s": load_s, "batch_size": ecfg.batch_size, "model": tem.model, "dim": tem.dim}
    mem = AnonPeak()
    for name, texts in (("metadata", metadata_texts(items)), ("description", long)):
        t = time.perf_counter()
        tem.encode(texts, batch_size=ecfg.batch_size)
        out[f"{name}_texts_per_s"] = len(texts) / (time.perf_counter() - t)
        out[f"{name}_chars"] = float(np.mean([len(x) for x in texts]))
    out["anon_bytes"] = mem.stop()
    out["sample"] = n
    return out


def embed_write(task: dict) -> dict:
    """The embed stage's table writer (`write_tables`) for n items, a seeded random encoder in place of the TEM."""
    from recpipe.pipeline.embed import write_tables

    n, d = int(task["n"]), DIM
    out = Path(task["dir"])
    out.mkdir(parents=True, exist_ok=True)
    distinct = [f"text {i}" for i in range(n)]
    state = {"rng": np.random.default_rng(int(task["seed"]))}

    def encode(chunk: list[str]) -> np.ndarray:
        V = state["rng"].standard_normal((len(chunk), d)).astype(np.float32)
        return V / np.linalg.norm(V, axis=1, keepdims=True)

    rows = np.arange(n, dtype=np.int64)
    mem = AnonPeak()
    t = time.perf_counter()
    encode_s, _ = write_tables(encode, distinct, {out / "item_embeddings.npy": rows})
    wall = time.perf_counter() - t
    return {"wall_s": wall, "write_s": wall - encode_s, "random_encode_s": encode_s, "anon_bytes": mem.stop(),
            "disk_bytes": (out / "item_embeddings.npy").stat().st_size, "table_bytes": n * d * 4}


def gen_vectors(task: dict) -> dict:
    """(n + 1, 384) clustered, whitened float32 vectors (bench_index.py's clustered recipe, built in chunks into
    a .npy memory map) and 1,000 queries; not measured: an input."""
    n, d, seed = int(task["n"]), DIM, int(task["seed"])
    path, qpath = Path(task["vectors"]), Path(task["queries"])
    rng = np.random.default_rng(seed)
    centres = (rng.standard_normal((max(8, n // 50), d)) * np.linspace(2, 0.2, d)).astype(np.float32)
    V = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n + 1, d))
    chunk = 100_000
    s1, s2 = np.zeros(d), np.zeros((d, d))
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        X = centres[rng.integers(0, len(centres), b - a)] + 0.4 * rng.standard_normal((b - a, d), dtype=np.float32)
        V[1 + a: 1 + b] = X
        X64 = X.astype(np.float64)
        s1 += X64.sum(0)
        s2 += X64.T @ X64
    mu = s1 / n
    lam, U = np.linalg.eigh(s2 / n - np.outer(mu, mu))
    W = (U / np.sqrt(np.maximum(lam, 1e-6))) @ U.T
    for a in range(0, n, chunk):  # whiten in place: zero mean, identity covariance, as the whiten stage leaves them
        b = min(n, a + chunk)
        V[1 + a: 1 + b] = ((V[1 + a: 1 + b].astype(np.float64) - mu) @ W).astype(np.float32)
    V.flush()
    q = int(task["queries_n"])
    Q = V[1 + rng.integers(0, n, q)] + 0.5 * rng.standard_normal((q, d)).astype(np.float32)
    np.save(qpath, Q.astype(np.float32))
    return {"bytes": path.stat().st_size}


def run_index(task: dict) -> dict:
    """Build one kind over the generated vectors with the shipped [index] defaults, then time 1,000 queries."""
    from recpipe.config import IndexConfig
    from recpipe.pipeline.index import build_index

    kind, k = task["kind"], 10
    V = np.load(task["vectors"], mmap_mode="r")  # the table stays in the page cache: the index's own copy counts
    Q = np.load(task["queries"])
    cfg = IndexConfig(kind=kind)
    mem = AnonPeak()
    t = time.perf_counter()
    idx = build_index(V, cfg, seed=int(task["seed"]), device="cpu")
    build_s = time.perf_counter() - t
    idx.search(Q[:16], k)  # warm-up
    t = time.perf_counter()
    _, ids = idx.search(Q, k)
    search_s = time.perf_counter() - t
    anon = mem.stop()
    path = Path(task["index_file"])
    idx.save(path)
    nbytes = path.stat().st_size
    path.unlink()
    exact_path = Path(task["exact"])
    if kind == "flat":
        np.save(exact_path, ids)
        rec = 1.0
    elif exact_path.exists():
        exact = np.load(exact_path)
        rec = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact)]))
    else:
        rec = None
    return {"build_s": build_s, "search_s": search_s, "qps": len(Q) / search_s, "recall": rec,
            "anon_bytes": anon, "index_bytes": nbytes, "setting": repr(idx)}


def run_eval(task: dict) -> dict:
    """evaluate's scoring loop body over U users against an (n + 1, 384) item table."""
    import torch

    from recpipe.config import EvaluateConfig
    from recpipe.models.metrics import RankAccumulator, history_mask

    n, users, seed = int(task["n"]), int(task["users"]), int(task["seed"])
    batch = int(task.get("batch") or EvaluateConfig().batch_size)
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(n + 1, DIM, generator=g) / math.sqrt(DIM)
    table[0] = 0
    rng = np.random.default_rng(seed)
    mem = AnonPeak()
    acc = RankAccumulator()
    t = time.perf_counter()
    with torch.no_grad():
        for a in range(0, users, batch):
            b = min(users, a + batch) - a
            oracle = torch.randn(b, DIM, generator=g)
            seen = [rng.integers(1, n + 1, 20) for _ in range(b)]
            target = torch.as_tensor(rng.integers(1, n + 1, b))
            scores = oracle @ table.T  # (B, n_items + 1): the one large matrix, per batch
            scores[:, 0] = float("-inf")
            acc.add(scores, target, history_mask(seen, n))
            del scores
    wall = time.perf_counter() - t
    acc.result([10])
    return {"wall_s": wall, "per_1k_users_s": wall / users * 1000, "anon_bytes": mem.stop(), "batch": batch,
            "users": users, "score_matrix_bytes": batch * (n + 1) * 4}


def _sets(task: dict) -> dict[str, str]:
    """--train-set KEY=VALUE pairs of a task."""
    return dict(kv.split("=", 1) for kv in task.get("set", []))


def _train_config(task: dict, model: str | None = None, extra: dict | None = None):
    """recpipe's config for the generated run directory (the data stage's), with a model's bench settings."""
    from recpipe.config import load_config

    over = {"run.dataset": task["dir"], "run.run_dir": task["run_dir"], "run.cache_dir": task["cache"],
            "run.seed": int(task["seed"])}
    if model is not None:
        over.update(TRAIN_SETTINGS[model])
        over.update(_sets(task))
    return load_config(None, {**over, **(extra or {})})


def gen_text_vectors(task: dict) -> dict:
    """The text models' input (not measured): an embed stage of seeded random unit 384-d item vectors (the
    embed_write stage's random encoder in place of the TEM), then recpipe's whiten stage over them, so the
    trainer finds a current whiten stage exactly as after `recpipe embed`."""
    from recpipe.artifacts import require_stage, run_stage
    from recpipe.pipeline import embed, whiten

    cfg = _train_config(task)
    data_m = require_stage(cfg.run_dir, "data")
    n = int(data_m.info["summary"]["items"])
    rng = np.random.default_rng(int(task["seed"]))

    def build(out_dir: Path) -> dict:
        V = np.lib.format.open_memmap(out_dir / embed.FILES["items"], mode="w+", dtype=np.float32, shape=(n + 1, DIM))
        V[0] = 0
        for a in range(0, n, 100_000):
            X = rng.standard_normal((min(n, a + 100_000) - a, DIM), dtype=np.float32)
            V[1 + a: 1 + a + len(X)] = X / np.linalg.norm(X, axis=1, keepdims=True)
        V.flush()
        return {"tem": "bench_scale", "model": "seeded random unit vectors", "dim": DIM, "normalized": True,
                "items": n}

    run_stage(cfg.run_dir, embed.STAGE, {"bench_scale": "random unit vectors", "seed": int(task["seed"])},
              {"data": data_m.fingerprint}, build, force=True)
    t = time.perf_counter()
    whiten.run(cfg, force=True, log=lambda m: None)
    return {"items": n, "whiten_s": time.perf_counter() - t}


def run_train(task: dict) -> dict:
    """recpipe's trainer (recpipe.pipeline.train.run) on the generated run directory for warm-up + timed + 1
    optimiser steps (train.max_steps), then its one validation on train.eval_users users. The model's loss, the
    EMA update, the Batcher and the input loading are wrapped with clocks (nothing else changes): seconds per
    step are the intervals between consecutive loss calls after the warm-up (batch building, forward, backward,
    clipping, AdamW, EMA: everything a step of the trainer does); the setup is from the call to the first loss."""
    import torch

    from recpipe.artifacts import require_stage
    from recpipe.pipeline import train as T
    from recpipe.pipeline import whiten
    from recpipe.pipeline.batches import batch_targets

    model, warm, steps = task["model"], int(task["warmup"]), int(task["steps"])
    cfg = _train_config(task, model, {
        "train.max_steps": warm + steps + 1, "train.eval_users": int(task["eval_users"]), "train.device": "cpu",
        "train.threads": int(task["threads"]), "train.save_every_s": 1e9})  # no resume-state save mid-timing
    for old in (cfg.run_dir / "work").glob(f"train-{model}-*"):  # a kept work dir: start over, never resume
        shutil.rmtree(old)
    marks: dict = {"calls": [], "targets": []}

    def clocked(name: str, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            marks[name] = marks.get(name, 0.0) + time.perf_counter() - t
            return out
        return wrapper

    make_model = T.make_model

    def make_clocked_model(*args, **kwargs):
        m = make_model(*args, **kwargs)
        if "model" not in marks:  # the trained model; validation builds its EMA copy with the same function
            marks["model"] = m
            loss = m.loss

            def loss_clocked(batch, generator=None):
                if not marks["calls"]:
                    marks["anon_at_first_step"] = _status().get("RssAnon", 0)
                marks["calls"].append(time.perf_counter())
                marks["targets"].append(batch_targets(batch))
                return loss(batch, generator=generator)

            m.loss = loss_clocked
        return m

    ema_update = T.EMA.update

    def ema_clocked(self, m):  # EMA.update: the trained parameters (buffers are held live, not copied)
        t = time.perf_counter()
        ema_update(self, m)
        marks.setdefault("ema", []).append(time.perf_counter() - t)

    T.make_model = make_clocked_model
    T.EMA.update = ema_clocked
    T.Batcher = clocked("batcher_s", T.Batcher)
    T.gather_inputs = clocked("inputs_s", T.gather_inputs)
    whiten.run = clocked("whiten_check_s", whiten.run)
    messages: list[str] = []
    # the first optimiser a process builds imports torch._dynamo (about 1.5 s, whatever the data): paid here,
    # outside the setup figure, so that the setup is what depends on the data
    t = time.perf_counter()
    torch.optim.AdamW([torch.zeros(1, requires_grad=True)])
    optim_import_s = time.perf_counter() - t
    mem = AnonPeak()
    t0 = time.perf_counter()
    res = T.run(cfg, model, force=True, log=messages.append, progress=False)
    wall = time.perf_counter() - t0
    anon = mem.stop()
    calls, targets = marks["calls"], marks["targets"]
    if len(calls) < warm + steps + 1:
        raise SystemExit(f"bench_scale: {model} took {len(calls)} steps, fewer than {warm + steps + 1} "
                         f"(an epoch shorter than that?): {messages}")
    timed = calls[warm + steps] - calls[warm]
    gaps = np.diff(calls[warm: warm + steps + 1])
    info = res.manifest.info
    per_epoch = int(info["steps_per_epoch"])
    n_items = int(marks["model"].n_items)
    s_step = timed / steps
    tps = float(np.sum(targets[warm: warm + steps])) / timed
    out = {"model": model, "steps_timed": steps, "warmup_steps": warm, "s_per_step": s_step,
           "median_step_s": float(np.median(gaps)), "max_step_s": float(gaps.max()),
           "targets_per_step": float(np.mean(targets[warm: warm + steps])), "targets_per_s": tps,
           "ema_s_per_step": float(np.mean(marks["ema"][warm: warm + steps])) if marks.get("ema") else None,
           "steps_per_epoch": per_epoch, "s_per_epoch": s_step * per_epoch,
           "targets_per_epoch": info.get("train_samples_per_epoch"),
           "setup_s": calls[0] - t0, "batcher_s": marks.get("batcher_s"), "inputs_s": marks.get("inputs_s"),
           "whiten_check_s": marks.get("whiten_check_s"), "optim_import_s": optim_import_s, "wall_s": wall,
           "final_s": wall - (calls[-1] - t0), "anon_bytes": anon,  # the last step, validation, checkpoint
           "anon_setup_bytes": marks["anon_at_first_step"] - mem.start, "parameters": int(info["parameters"]),
           "batch_size": int(info["batch_size"]), "items": n_items,
           "users": int(require_stage(cfg.run_dir, "data").info["summary"]["users"]),
           "settings": {**TRAIN_SETTINGS[model], **_sets(task)}}
    if model == "sasrec":  # full softmax: a (targets x items) float32 logit matrix each step; sampled: x negatives
        neg = int(cfg.model_config("sasrec").ce_negatives)
        out["logits_bytes"] = out["targets_per_step"] * (neg + 1 if neg else n_items) * 4
    return out


WORKERS = {"gen_log": gen_log, "data": run_data, "embed_rate": embed_rate, "embed_write": embed_write,
           "gen_vectors": gen_vectors, "index": run_index, "evaluate": run_eval, "text_vectors": gen_text_vectors,
           "train": run_train}


def worker_main(task_json: str) -> None:
    task = json.loads(task_json)
    _set_threads(int(task["threads"]))
    base = _status()
    res = WORKERS[task["what"]](task)
    res["rss_at_start_bytes"] = base.get("VmRSS", 0)
    Path(task["result"]).write_text(json.dumps(res))


# ================================================================================================= parent
def run_task(task: dict, a: argparse.Namespace) -> dict:
    """Run one worker in a fresh interpreter on --threads threads; its result plus its peak RSS (wait4)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads),
           "OPENBLAS_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    task = {**task, "threads": a.threads, "seed": a.seed, "result": str(result)}
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(task)], env=env)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    try:
        if p.returncode != 0:
            raise SystemExit(f"error: bench_scale worker {task['what']} ({task.get('n', '')}) exited with "
                             f"{p.returncode}")
        res = json.loads(result.read_text())
    finally:
        result.unlink(missing_ok=True)
    res["process_s"] = time.perf_counter() - t
    res["peak_rss_bytes"] = ru.ru_maxrss * 1024  # Linux reports kilobytes
    return res


def growth(sizes: list[float], values: list[float]) -> tuple[float, str] | None:
    """(exponent b of value ~ size^b by least squares on log-log, its reading), None under 2 usable points."""
    pts = [(s, v) for s, v in zip(sizes, values) if s and v and v > 0]
    if len({s for s, _ in pts}) < 2:
        return None
    x, y = np.log([s for s, _ in pts]), np.log([v for _, v in pts])
    b = float(np.polyfit(x, y, 1)[0])
    label = ("sublinear" if b < 0.8 else "linear" if b < 1.08 else "n log n" if b < 1.3
             else "between n log n and quadratic" if b < 1.7 else "quadratic or worse")
    return b, label


def _mb(x: float | None) -> str:
    return "" if x is None else f"{x / MB:,.0f}"


def _s(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:,.2f}" if x < 100 else f"{x:,.0f}"


def _setting(text: str) -> str:
    """An ItemIndex repr without the parts every row shares: "nlist=128, nprobe=16, pq_m=48"."""
    parts = text.split("(", 1)[-1].rstrip(")").split(", ")
    return ", ".join(p for p in parts if not p.startswith(("kind=", "device=", "n=", "d="))) or "exact"


def tables(R: dict) -> str:
    """The markdown report of a run's raw figures."""
    out = [f"CPU: {R['cpu']}", ""]
    if R.get("data"):
        out += ["### data stage (load + dedup + 5-core + split)", "",
                "| interactions (raw) | after 5-core: users / items / interactions | wall s | peak RSS MB | "
                "peak anon MB | csv MB | artifacts MB |", "|---|---|---|---|---|---|---|"]
        for r in R["data"]:
            out.append(f"| {r['n']:,} | {r['users']:,} / {r['items']:,} / {r['interactions']:,} | {_s(r['wall_s'])} "
                       f"| {_mb(r['peak_rss_bytes'])} | {_mb(r['anon_bytes'])} | {_mb(r['csv_bytes'])} "
                       f"| {_mb(r['disk_bytes'])} |")
        out.append("")
    if R.get("embed_rate"):
        e = R["embed_rate"]
        out += ["### embed: local TEM throughput (measured on a sample, extrapolated)", "",
                "| texts | mean chars | texts/s | 1M texts (extrapolated) |", "|---|---|---|---|"]
        for name in ("metadata", "description"):
            rate = e[f"{name}_texts_per_s"]
            out.append(f"| {e['sample']:,} {name} | {e[f'{name}_chars']:.0f} | {rate:,.1f} | "
                       f"{1e6 / rate / 3600:,.1f} h |")
        out += ["", f"{e['model']} ({e['dim']}-d), batch {e['batch_size']}; model load {e['load_s']:.1f} s; "
                f"peak RSS {_mb(e['peak_rss_bytes'])} MB", ""]
    if R.get("embed_write"):
        out += ["### embed: writing the item table (embed.write_tables, chunked into a memory-mapped .npy)", "",
                "| items | table MB | wall s (write only) | peak RSS MB | peak anon MB | file MB |",
                "|---|---|---|---|---|---|"]
        for r in R["embed_write"]:
            out.append(f"| {r['n']:,} | {_mb(r['table_bytes'])} | {_s(r['write_s'])} | {_mb(r['peak_rss_bytes'])} "
                       f"| {_mb(r['anon_bytes'])} | {_mb(r['disk_bytes'])} |")
        out.append("")
    if R.get("index"):
        out += ["### index (384-d clustered whitened vectors, shipped [index] defaults, 1,000 queries, k = 10)",
                "", "| items | kind | build s | queries/s | recall@10 vs flat | index MB | peak anon MB | "
                "peak RSS MB | setting |", "|---|---|---|---|---|---|---|---|---|"]
        for r in R["index"]:
            rec = "" if r["recall"] is None else f"{r['recall']:.3f}"
            out.append(f"| {r['n']:,} | {r['kind']} | {_s(r['build_s'])} | {r['qps']:,.0f} | {rec} "
                       f"| {_mb(r['index_bytes'])} | {_mb(r['anon_bytes'])} | {_mb(r['peak_rss_bytes'])} "
                       f"| {_setting(r['setting'])} |")
        out.append("")
    if R.get("evaluate"):
        out += ["### evaluate: full-ranking scoring (batch x items score matrix, ranks, seen mask)", "",
                "| items | users | batch | s per 1k users | one batch's score matrix MB | peak anon MB | "
                "peak RSS MB |", "|---|---|---|---|---|---|---|"]
        for r in R["evaluate"]:
            out.append(f"| {r['n']:,} | {r['users']:,} | {r['batch']} | {_s(r['per_1k_users_s'])} "
                       f"| {_mb(r['score_matrix_bytes'])} | {_mb(r['anon_bytes'])} | {_mb(r['peak_rss_bytes'])} |")
        out.append("")
    if R.get("train"):
        r0 = R["train"][0]
        out += [f"### train: recpipe.pipeline.train on the data stage's split, {r0['steps_timed']} timed steps after "
                f"{r0['warmup_steps']} (extrapolated to an epoch)", "",
                "| interactions (raw) | model | users / items | batch | targets/step | steps/epoch | s/step (EMA s) "
                "| targets/s | s/epoch (extrapolated) | setup s (Batcher s) | SASRec logits MB | peak anon MB "
                "| peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in R["train"]:
            logits = _mb(r["logits_bytes"]) if "logits_bytes" in r else "-"
            ema = "" if r.get("ema_s_per_step") is None else f" ({r['ema_s_per_step']:.3f})"
            out.append(f"| {r['n']:,} | {r['model']} | {r['users']:,} / {r['items']:,} | {r['batch_size']} "
                       f"| {r['targets_per_step']:,.0f} | {r['steps_per_epoch']:,} | {r['s_per_step']:.3f}{ema} "
                       f"| {r['targets_per_s']:,.0f} | {_s(r['s_per_epoch'])} | {_s(r['setup_s'])} "
                       f"({_s(r['batcher_s'])}) | {logits} | {_mb(r['anon_bytes'])} | {_mb(r['peak_rss_bytes'])} |")
        out += ["", "s/step: the mean interval between the trainer's consecutive loss calls (batch building, forward, "
                "backward, clipping, AdamW, EMA), of which the EMA update (train.ema, over the trained parameters); "
                "setup: from "
                "train.run to the first step (the whiten stage's check, loading the split and item vectors, the "
                "model, the Batcher, the first batch; not torch's one-time import of torch._dynamo by the first "
                "optimiser, paid before); SASRec's full softmax holds a targets x items logit matrix "
                "each step, so its step grows with the items as well as with the batch; peak anon: the whole "
                "train.run call, inputs loaded inside it; items: after the 5-core filter.", ""]
    if R.get("fits"):
        out += ["### growth (least squares on log-log: value ~ size^b)", "",
                "| series | size | points | b | reading |", "|---|---|---|---|---|"]
        for f in R["fits"]:
            out.append(f"| {f['series']} | {f['size']} | {f['points']} | {f['b']:.2f} | {f['reading']} |")
        out.append("")
    return "\n".join(out)


def fits(R: dict) -> list[dict]:
    series = []

    def add(name: str, size: str, rows: list[dict], key) -> None:
        rows = [r for r in rows if key(r) is not None]
        g = growth([r["n"] for r in rows], [key(r) for r in rows])
        if g is not None:
            series.append({"series": name, "size": size, "points": len({r["n"] for r in rows}), "b": g[0],
                           "reading": g[1]})

    d = R.get("data") or []
    add("data: wall time", "raw interactions", d, lambda r: r["wall_s"])
    add("data: peak anon memory", "raw interactions", d, lambda r: r["anon_bytes"])
    add("data: artifacts on disk", "raw interactions", d, lambda r: r["disk_bytes"])
    w = R.get("embed_write") or []
    add("embed: table write time", "items", w, lambda r: r["write_s"])
    add("embed: table write peak anon", "items", w, lambda r: r["anon_bytes"])
    for kind in KINDS:
        rows = [r for r in R.get("index") or [] if r["kind"] == kind]
        add(f"index {kind}: build time", "items", rows, lambda r: r["build_s"])
        add(f"index {kind}: time per query", "items", rows, lambda r: 1 / r["qps"])
        add(f"index {kind}: index bytes", "items", rows, lambda r: r["index_bytes"])
        add(f"index {kind}: peak anon", "items", rows, lambda r: r["anon_bytes"])
    e = R.get("evaluate") or []
    add("evaluate: time per user", "items", e, lambda r: r["per_1k_users_s"])
    add("evaluate: peak anon", "items", e, lambda r: r["anon_bytes"])
    for model in TRAIN_MODELS:
        rows = [r for r in R.get("train") or [] if r["model"] == model]
        add(f"train {model}: time per epoch", "raw interactions", rows, lambda r: r["s_per_epoch"])
        add(f"train {model}: time per step", "raw interactions", rows, lambda r: r["s_per_step"])
        add(f"train {model}: setup time", "raw interactions", rows, lambda r: r["setup_s"])
        add(f"train {model}: peak anon", "raw interactions", rows, lambda r: r["anon_bytes"])
        add(f"train {model}: peak RSS", "raw interactions", rows, lambda r: r["peak_rss_bytes"])
    return series


def plot(R: dict, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed in this environment: no plot (the JSON and the tables have every figure)"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    lines = [("data (x = raw interactions)", R.get("data") or [], "wall_s", "anon_bytes"),
             ("embed table write", R.get("embed_write") or [], "write_s", "anon_bytes"),
             ("evaluate per 1k users", R.get("evaluate") or [], "per_1k_users_s", "anon_bytes")]
    for model in TRAIN_MODELS:
        lines.append((f"train {model} per epoch (x = raw interactions)",
                      [r for r in R.get("train") or [] if r["model"] == model], "s_per_epoch", "anon_bytes"))
    for kind in KINDS:
        lines.append((f"index {kind} build", [r for r in R.get("index") or [] if r["kind"] == kind],
                      "build_s", "anon_bytes"))
    for label, rows, tkey, mkey in lines:
        rows = sorted(rows, key=lambda r: r["n"])
        if not rows:
            continue
        ax1.plot([r["n"] for r in rows], [max(r[tkey], 1e-4) for r in rows], "o-", label=label)
        ax2.plot([r["n"] for r in rows], [max(r[mkey], 1) / MB for r in rows], "o-", label=label)
    for ax, what in ((ax1, "seconds"), (ax2, "peak anon memory above start, MB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("size (items; interactions for data and train)")
        ax.set_ylabel(what)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle(f"recpipe stages as the catalog grows — {R['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot -> {path}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="every size: items 10k/100k/1M, interactions 1M/10M")
    ap.add_argument("--interactions", type=int, nargs="+", help="data stage log sizes")
    ap.add_argument("--index-items", type=int, nargs="+", help="index catalog sizes")
    ap.add_argument("--embed-items", type=int, nargs="+", help="embed table-write sizes")
    ap.add_argument("--eval-items", type=int, nargs="+", help="evaluate scoring catalog sizes")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--embed-sample", type=int, default=2000, help="texts per TEM throughput sample")
    ap.add_argument("--eval-users", type=int, default=2048)
    ap.add_argument("--eval-batch", type=int, default=0, help="users per scoring batch; 0 = evaluate.batch_size")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--train-models", nargs="+", choices=TRAIN_MODELS, default=list(TRAIN_MODELS))
    ap.add_argument("--train-steps", type=int, help="timed optimiser steps per model and size [quick 5, full 200]")
    ap.add_argument("--train-warmup", type=int, help="untimed steps before them [quick 2, full 10]")
    ap.add_argument("--train-eval-users", type=int, default=128, help="train.eval_users: the one validation's users")
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting added to every train row's (e.g. model.sasrec.ce_negatives=1024); repeatable")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="cache/bench_scale")
    ap.add_argument("--keep-work", action="store_true", help="keep the generated inputs in OUT/work")
    ap.add_argument("--from-json", help="reprint a saved run's tables (and plot) without measuring")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker_main(a.worker)
        return
    if a.threads < 1:
        raise SystemExit("error: --threads must be >= 1")
    for name in ("interactions", "index_items", "embed_items", "eval_items"):
        sizes = getattr(a, name) or (FULL if a.full else QUICK)[name]
        if any(s < 100 for s in sizes):
            raise SystemExit(f"error: --{name.replace('_', '-')} sizes must be >= 100, got {sizes}")
        setattr(a, name, sorted(set(sizes)))
    for name in ("train_steps", "train_warmup"):
        if getattr(a, name) is None:
            setattr(a, name, (FULL if a.full else QUICK)[name])
    if a.train_steps < 1 or a.train_warmup < 0 or a.train_eval_users < 1:
        raise SystemExit("error: --train-steps and --train-eval-users must be >= 1, --train-warmup >= 0")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.from_json:
        R = json.loads(Path(a.from_json).read_text())
        print(tables(R))
        print(plot(R, out / "bench_scale.png"))
        return

    from recpipe.cpu import describe

    R: dict = {"cpu": describe(threads=a.threads)["text"], "args": vars(a), "started": time.strftime("%F %T")}
    print(f"CPU: {R['cpu']}", flush=True)
    work = out / "work"
    work.mkdir(exist_ok=True)

    def save() -> None:
        R["fits"] = fits(R)
        (out / "bench_scale.json").write_text(json.dumps(R, indent=1))

    def note(msg: str) -> None:
        print(f"[{time.strftime('%T')}] {msg}", flush=True)

    if "data" in a.stages:
        R["data"] = []
        for n in a.interactions:
            d = work / f"log-{n}"
            g = run_task({"what": "gen_log", "n": n, "dir": str(d)}, a)
            r = run_task({"what": "data", "n": n, "dir": str(d), "run_dir": str(work / f"run-{n}"),
                          "cache": str(work)}, a)
            R["data"].append({"n": n, "csv_bytes": g["csv_bytes"], **r})
            note(f"data {n:,} interactions: {r['wall_s']:.1f} s, peak RSS {_mb(r['peak_rss_bytes'])} MB")
            save()
            if not a.keep_work:
                shutil.rmtree(d, ignore_errors=True)
                if "train" not in a.stages:  # else the train stage trains on it, then removes it
                    shutil.rmtree(work / f"run-{n}", ignore_errors=True)
    if "embed" in a.stages:
        R["embed_rate"] = run_task({"what": "embed_rate", "sample": a.embed_sample}, a)
        note(f"embed: {R['embed_rate']['metadata_texts_per_s']:.0f} metadata texts/s, "
             f"{R['embed_rate']['description_texts_per_s']:.0f} description texts/s")
        R["embed_write"] = []
        for n in a.embed_items:
            r = run_task({"what": "embed_write", "n": n, "dir": str(work / f"embed-{n}")}, a)
            R["embed_write"].append({"n": n, **r})
            note(f"embed write {n:,} x {DIM}: {r['write_s']:.1f} s, peak anon {_mb(r['anon_bytes'])} MB")
            save()
            if not a.keep_work:
                shutil.rmtree(work / f"embed-{n}", ignore_errors=True)
    if "index" in a.stages:
        R["index"] = []
        for n in a.index_items:
            vec, qs, exact = work / f"vectors-{n}.npy", work / f"queries-{n}.npy", work / f"exact-{n}.npy"
            run_task({"what": "gen_vectors", "n": n, "vectors": str(vec), "queries": str(qs),
                      "queries_n": a.queries}, a)
            exact.unlink(missing_ok=True)
            for kind in ["flat"] + [k for k in a.kinds if k != "flat"]:  # flat first: the exact top 10
                r = run_task({"what": "index", "n": n, "kind": kind, "vectors": str(vec), "queries": str(qs),
                              "exact": str(exact), "index_file": str(work / f"index-{kind}-{n}.faiss")}, a)
                if kind in a.kinds:
                    R["index"].append({"n": n, "kind": kind, **r})
                note(f"index {kind} {n:,}: build {r['build_s']:.1f} s, {r['qps']:,.0f} q/s, recall {r['recall']}")
                save()
            if not a.keep_work:
                for p in (vec, qs, exact):
                    p.unlink(missing_ok=True)
    if "evaluate" in a.stages:
        R["evaluate"] = []
        for n in a.eval_items:
            r = run_task({"what": "evaluate", "n": n, "users": a.eval_users, "batch": a.eval_batch}, a)
            R["evaluate"].append({"n": n, **r})
            note(f"evaluate {n:,} items: {r['per_1k_users_s']:.2f} s per 1k users, "
                 f"peak anon {_mb(r['anon_bytes'])} MB")
            save()
    if "train" in a.stages:
        R["train"] = []
        for n in a.interactions:
            d, run_dir = work / f"log-{n}", work / f"run-{n}"
            paths = {"dir": str(d), "run_dir": str(run_dir), "cache": str(work)}
            if not (run_dir / "data" / "manifest.json").exists():  # --stages train without data: its input
                run_task({"what": "gen_log", "n": n, "dir": str(d)}, a)
                run_task({"what": "data", "n": n, **paths}, a)
                shutil.rmtree(d, ignore_errors=True)
            if "idreamrec" in a.train_models:
                run_task({"what": "text_vectors", **paths}, a)
            for model in a.train_models:
                r = run_task({"what": "train", "model": model, "steps": a.train_steps, "warmup": a.train_warmup,
                              "eval_users": a.train_eval_users, "set": a.train_set, **paths}, a)
                R["train"].append({"n": n, **r})
                note(f"train {model} {n:,} interactions ({r['items']:,} items): {r['s_per_step']:.3f} s/step, "
                     f"{r['steps_per_epoch']:,} steps/epoch -> {r['s_per_epoch'] / 60:,.1f} min/epoch, "
                     f"peak RSS {_mb(r['peak_rss_bytes'])} MB")
                save()
            if not a.keep_work:
                shutil.rmtree(run_dir, ignore_errors=True)
    R["finished"] = time.strftime("%F %T")
    save()
    md = tables(R)
    (out / "bench_scale.md").write_text(md + "\n")
    print()
    print(md)
    print(plot(R, out / "bench_scale.png"))
    print(f"raw figures -> {out / 'bench_scale.json'}; tables -> {out / 'bench_scale.md'}")
    if not a.keep_work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
