"""Train stage: any registered model on the data stage's split, with model selection on validation only.

- Batches follow the model's `train_mode`: "position" (every training position of every user, in shuffled
  passes), "window" (the same targets, in runs of `window` consecutive targets that share one history
  window; batch_size still counts targets), "sequence" (each user's training sequence, a target at every
  position: its last history_len transitions, or all of them in chunks of history_len when the model sets
  `chunked`) or "user" (each user's whole training history).
- AdamW, linear warm-up then cosine decay, gradient clipping, EMA weights (used for validation and saved).
- Validation every `eval_every` steps (default once per epoch) on the validation split, seen items masked,
  early stopping on NDCG@10. The test split is never read here.
- Resumable: the full training state (weights, AdamW moments, EMA, step counters, random states) is saved to
  `<run_dir>/work/train-<model>-<fingerprint>/state.safetensors` (tensors; the rest as JSON in its header) at
  every validation, every `train.save_every_s` seconds and when Ctrl-C / SIGTERM stops the run; a re-run with
  the same config resumes from it mid-epoch and ends with the weights an unbroken run gets. Never a pickle: a
  planted file runs no code.
- Output `<run_dir>/train/<model>/`: model.safetensors + config.json (everything needed to rebuild the model),
  log.jsonl (losses and validation metrics), valid.json (the best validation metrics).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import random
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recpipe import cpu
from recpipe.artifacts import (
    StageResult,
    atomic_path,
    fingerprint_obj,
    require_stage,
    run_stage,
    write_json,
)
from recpipe.config import Config, TrainConfig, check_model_name, to_dict
from recpipe.errors import ArtifactError, ConfigError, Stopped
from recpipe.models.base import Recommender
from recpipe.models.metrics import RankAccumulator, history_mask
from recpipe.pipeline import data as data_stage
from recpipe.pipeline import readers, whiten
from recpipe.pipeline.bundle import WHITEN_HINT, make_model, needs_text, save_checkpoint


# ----------------------------------------------------------------------------------------------- batches
class Batcher:
    """Builds left-padded tensor batches from the data stage's CSR sequences (vectorised numpy)."""

    def __init__(self, ds: data_stage.Dataset, history_len: int | None):
        self.ds = ds
        self.L = history_len
        self.offsets = ds.offsets
        self.items = ds.seq_items
        lens = np.diff(ds.offsets)
        self.user_of = np.repeat(np.arange(ds.n_users), lens)
        # training targets: every position p with a non-empty history inside the training part
        # (user sequence s: s[:-2] is training; targets s[1:-2])
        pos = np.arange(len(self.items))
        start = self.offsets[self.user_of]
        end_train = self.offsets[self.user_of + 1] - 2
        self.train_positions = pos[(pos > start) & (pos < end_train)]

    def capped(self, lengths: np.ndarray) -> np.ndarray:
        """History lengths as the model reads them: at most history_len (no cap without one)."""
        return np.minimum(lengths, self.L) if self.L else lengths

    def _width(self, need: np.ndarray) -> int:
        """Columns for a batch: the longest real history in it, capped at the model's history_len.
        Models are invariant to the amount of left padding, so short-history batches stay cheap."""
        longest = max(int(need.max()) if len(need) else 1, 1)
        return min(self.L, longest) if self.L else longest

    def _window(self, end: np.ndarray, start: np.ndarray, L: int) -> np.ndarray:
        """(B, L) items at [end-L, end), left-padded with 0 where before `start`."""
        idx = end[:, None] - L + np.arange(L)[None, :]
        valid = idx >= start[:, None]
        out = np.where(valid, self.items[np.clip(idx, 0, None)], 0)
        return out

    def positions(self, pos: np.ndarray) -> dict[str, torch.Tensor]:
        """One sample per global position: history = items before it (same user), target = it."""
        u = self.user_of[pos]
        start = self.offsets[u]
        hist = self._window(pos, start, self._width(pos - start))
        return {"history": torch.from_numpy(hist), "target": torch.from_numpy(self.items[pos].copy()),
                "_pos": torch.from_numpy(pos)}

    def window_units(self, C: int) -> np.ndarray:
        """Exclusive end positions of the target windows: each user's training targets, cut into runs of C
        from the end of the training part backwards (the first run of a user may be shorter)."""
        start = self.offsets[:-1] + 1  # first target position of each user
        end = self.offsets[1:] - 2  # exclusive end of the training part
        n = np.maximum(end - start, 0)
        return _run_ends(end, -(-n // C), C)  # ceil(n / C) runs a user

    def windows(self, ends: np.ndarray, C: int) -> dict[str, torch.Tensor]:
        """For each window end e: "window" (B, L + C) the items at [e - C - L, e), left-padded before the
        user's start, and "target" (B, C) the items at [e - C, e) that are training targets (0 elsewhere).
        Leading columns that are padding in every row are dropped (the causal model is invariant to them)."""
        u = self.user_of[ends - 1]
        start = self.offsets[u]
        win = self._window(ends, start, self.L + C)
        pos = ends[:, None] - C + np.arange(C)[None, :]
        tgt = np.where(pos > start[:, None], win[:, -C:], 0)
        used = (win != 0).any(axis=0)
        first = min(int(used.argmax()), self.L) if used.any() else self.L
        return {"window": torch.from_numpy(np.ascontiguousarray(win[:, first:])), "target": torch.from_numpy(tgt)}

    def sequence_units(self, chunked: bool) -> np.ndarray:
        """Exclusive end positions of the training sequences: one per user with at least two training items
        (the end of its training part), or with `chunked` every user's training transitions cut into runs
        of L from the end backwards, so that histories longer than L are trained on whole."""
        start = self.offsets[:-1]
        end = self.offsets[1:] - 2  # exclusive end of the training part
        n = np.maximum(end - start - 1, 0)  # training transitions (targets) of each user
        if not chunked or not self.L:
            return end[n > 0]
        return _run_ends(end, -(-n // self.L), self.L)

    def sequences(self, ends: np.ndarray) -> dict[str, torch.Tensor]:
        """input_seq / target_seq for sequences ending (exclusive) at `ends`: the targets are the (up to) L
        training items before each end, the inputs the item before each target; 0 where there is none."""
        start = self.offsets[self.user_of[ends - 1]]
        L = self._width(ends - start - 1)
        inp = self._window(ends - 1, start, L)
        tgt = self._window(ends, start + 1, L)
        inp = np.where(tgt > 0, inp, 0)
        return {"input_seq": torch.from_numpy(inp), "target_seq": torch.from_numpy(tgt)}

    def user_histories(self, users: np.ndarray, cut: int) -> dict[str, torch.Tensor]:
        """Whole history before position len - cut (cut=2: training part), left-padded to the batch max."""
        start = self.offsets[users]
        end = self.offsets[users + 1] - cut
        return {"history": torch.from_numpy(self._window(end, start, self._width(end - start)))}

    def eval_lengths(self, users: np.ndarray, split: str) -> np.ndarray:
        """Each user's history length before the target of "valid" / "test" (uncapped)."""
        return self.offsets[users + 1] - {"test": 1, "valid": 2}[split] - self.offsets[users]

    def eval_batch(self, users: np.ndarray, split: str) -> tuple[dict[str, torch.Tensor], list[np.ndarray]]:
        """History (model window) and target for "valid" / "test", plus each user's full history (for masking)."""
        start = self.offsets[users]
        end = start + self.eval_lengths(users, split)  # the target's position
        batch = {"history": torch.from_numpy(self._window(end, start, self._width(end - start))),
                 "target": torch.from_numpy(self.items[end].copy())}
        seen = [self.items[s:e] for s, e in zip(start, end)]
        return batch, seen


def _run_ends(end: np.ndarray, runs: np.ndarray, size: int) -> np.ndarray:
    """Exclusive ends of `runs[u]` consecutive runs of `size` positions per user u, counted back from end[u]."""
    user = np.repeat(np.arange(len(runs)), runs)
    k = np.arange(runs.sum()) - np.repeat(np.cumsum(runs) - runs, runs)  # run index within its user
    return end[user] - k * size


def _units(b: Batcher, mode: str, batch_size: int, window: int, chunked: bool = False) -> tuple[np.ndarray, int]:
    """(the units one epoch shuffles, units per batch) for a train mode; batch_size counts targets in
    "window" mode too, so a batch holds batch_size // window windows; `chunked`: see Batcher.sequence_units."""
    if mode == "position":
        return b.train_positions, batch_size
    if mode == "window":
        return b.window_units(window), max(1, batch_size // window)
    if mode == "sequence":
        return b.sequence_units(chunked), batch_size
    users = np.arange(b.ds.n_users)
    train_len = np.diff(b.offsets) - 2
    return users[train_len >= 1], batch_size


def _unit_lengths(b: Batcher, mode: str, units: np.ndarray) -> np.ndarray | None:
    """The history length (capped at the model's window) each training unit's batch row needs, which for
    "sequence" units is also its number of targets; None for modes whose rows are all alike ("window")."""
    if mode == "position":
        return b.capped(units - b.offsets[b.user_of[units]])
    if mode == "sequence":
        return b.capped(units - b.offsets[b.user_of[units - 1]] - 1)
    if mode == "user":
        return b.capped(b.offsets[units + 1] - 2 - b.offsets[units])
    return None


def bucket_by_length(perm: np.ndarray, lengths: np.ndarray, batch_size: int, pool: int,
                     rng: np.random.Generator) -> np.ndarray:
    """Reorder a shuffled pass so that batches hold units of similar length: the pass is cut into pools of
    `pool` batches, each pool is sorted by length and cut into batches, and the full batches of the whole
    pass are shuffled (a short last batch stays last, so the caller's fixed-size slices stay batches).
    Every unit still comes exactly once; only which units share a batch changes."""
    size = pool * batch_size
    perm = np.concatenate([perm[i: i + size][np.argsort(lengths[i: i + size], kind="stable")]
                           for i in range(0, len(perm), size)] or [perm])
    n_full = len(perm) // batch_size
    full = perm[: n_full * batch_size].reshape(n_full, batch_size)[rng.permutation(n_full)]
    return np.concatenate([full.reshape(-1), perm[n_full * batch_size:]])


def iterate_training(b: Batcher, mode: str, batch_size: int, epoch: int, seed: int, skip: int = 0,
                     window: int = 0, chunked: bool = False, length_pool: int | None = None
                     ) -> Iterator[dict[str, torch.Tensor]]:
    """One shuffled pass (epoch) over the training data; `skip` batches already done (resume).
    mode "window": windows of `window` targets, batch_size targets a batch. length_pool (a number): batches of
    similar history length (`bucket_by_length`), which cuts padded compute on short-history catalogs."""
    rng = np.random.default_rng([seed, epoch])
    units, batch_size = _units(b, mode, batch_size, window, chunked)
    perm = units[rng.permutation(len(units))]
    lengths = _unit_lengths(b, mode, perm) if length_pool else None
    if lengths is not None:
        perm = bucket_by_length(perm, lengths, batch_size, length_pool, rng)
    for i in range(skip * batch_size, len(perm), batch_size):
        chunk = perm[i: i + batch_size]
        if mode == "position":
            yield b.positions(chunk)
        elif mode == "window":
            yield b.windows(chunk, window)
        elif mode == "sequence":
            yield b.sequences(chunk)
        else:
            yield b.user_histories(chunk, cut=2)


def n_batches(b: Batcher, mode: str, batch_size: int, window: int = 0, chunked: bool = False) -> int:
    units, batch_size = _units(b, mode, batch_size, window, chunked)
    return math.ceil(len(units) / batch_size)


# -------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_split(
    model: Recommender, b: Batcher, split: str, ks: list[int], batch_size: int = 1024,
    users: np.ndarray | None = None, device: str | torch.device = "cpu", score_kwargs: dict | None = None,
    intent_fn=None, seed: int = 0, progress: str = "",
) -> dict[str, Any]:
    """Full-ranking metrics (masked and unmasked columns) over every user of a split (or `users`).

    intent_fn(users, targets) -> (B, d) float tensor | None adds an intention to each batch.
    progress: a label shows a progress bar (users scored, rate, time left) under that name; "" shows none.
    """
    was_training = model.training
    model.eval()
    users = np.arange(b.ds.n_users) if users is None else np.asarray(users)
    # Batches of users with similar history lengths: a batch is as wide as its longest history (capped at the
    # model's window), so on short-history catalogs (Amazon: ~7 items) this cuts padded compute several-fold.
    # The metrics are means over users, so the order changes nothing but the noise a generative model draws.
    users = users[np.argsort(b.capped(b.eval_lengths(users, split)), kind="stable")]
    acc = RankAccumulator()
    gen = torch.Generator(device=device).manual_seed(seed)
    kwargs = dict(score_kwargs or {})
    if model.generative:
        kwargs["generator"] = gen
    n_items = model.n_items
    bar = _user_progress(progress, len(users))
    try:
        for i in range(0, len(users), batch_size):
            u = users[i: i + batch_size]
            batch, seen = b.eval_batch(u, split)
            if intent_fn is not None:
                intent = intent_fn(u, batch["target"].numpy())
                if intent is not None:
                    batch["intent"] = intent
            batch = {k: v.to(device) for k, v in batch.items()}
            scores = model.score_all(batch, **kwargs)
            acc.add(scores, batch["target"], history_mask(seen, n_items, device=scores.device))
            if bar is not None:
                bar.advance(bar.task_ids[0], len(u))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.stop()
    return acc.result(ks)


PLAIN_EVERY_S = 30.0  # off a terminal (a log file, nohup, a batch job) a progress line this often


def progress_bar(title: str, info: str, disable: bool = False, transient: bool = False):
    """The one progress bar layout: title, bar, done/total, info, elapsed, remaining (rich markup allowed).
    Off a terminal rich draws nothing until the bar stops, so there it prints a plain line instead every
    PLAIN_EVERY_S seconds: done/total, the info text, rate and time left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class _Progress(Progress):
        def __init__(self, *columns, **kwargs):
            super().__init__(*columns, **kwargs)
            self._plain = not self.disable and not self.console.is_terminal
            self._last = time.monotonic()

        def update(self, task_id, **kwargs) -> None:
            super().update(task_id, **kwargs)
            if self._plain and time.monotonic() - self._last >= PLAIN_EVERY_S:
                self._last = time.monotonic()
                self._line(self._tasks[task_id])

        def advance(self, task_id, advance: float = 1) -> None:
            self.update(task_id, advance=advance)

        def _line(self, task) -> None:
            head = Text.from_markup(title.format(task=task)).plain
            tail = Text.from_markup(info.format(task=task)).plain
            done = f"{task.completed:,.0f}/{task.total:,.0f}" if task.total else f"{task.completed:,.0f}"
            rate, left = task.speed, task.time_remaining
            rest = f"{rate:,.1f}/s" if rate else "rate pending"
            if left is not None:
                rest += f", {_hms(left)} left"
            self.console.print(f"{head}: {done} {tail} ({rest})", markup=False, highlight=False, soft_wrap=True)

    return _Progress(TextColumn(title), BarColumn(), MofNCompleteColumn(), TextColumn(info), TimeElapsedColumn(),
                     TimeRemainingColumn(), disable=disable, transient=transient)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _user_progress(label: str, total: int):
    """A started rich progress bar counting users, or None without a label."""
    if not label:
        return None
    bar = progress_bar(f"[bold]evaluate[/] {label}", "users", transient=True)
    bar.add_task(label, total=total)
    bar.start()
    return bar


# ---------------------------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = cuda but torch sees no GPU")
    return torch.device(name)


def native_bf16() -> bool:
    """True where this CPU computes bfloat16 natively (x86 avx512_bf16 or amx_bf16); elsewhere bf16 is
    emulated and slower than float32. RECPIPE_CPU_BF16 overrides it (recpipe.cpu)."""
    return cpu.cpuinfo_has_bf16()


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """float32 | bfloat16 | auto (bfloat16 on a CUDA GPU that supports it or a CPU with native bf16)."""
    if name == "auto":
        dev = torch.device(device)
        ok = torch.cuda.is_bf16_supported() if dev.type == "cuda" else native_bf16()
        return torch.bfloat16 if ok else torch.float32
    if name not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype must be auto, float32 or bfloat16, not {name!r}")
    return getattr(torch, name)


def load_text_vectors(run_dir: Path) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any], str]:
    """Whitened item vectors, whitened LLM-intent vectors (or None), the whiten info, its fingerprint."""
    text = whiten.load(run_dir, hint=WHITEN_HINT)
    return text.items, text.intent_vectors(), text.info, text.fingerprint


class EMA:
    """Exponential moving average of parameters (and a copy of buffers), swapped in for evaluation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        # warm-up of the decay ((1 + n) / (10 + n), as in TF's ExponentialMovingAverage with num_updates):
        # early on the average follows the weights closely instead of staying near the initialisation
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v, 1.0 - decay)
            else:
                self.shadow[k].copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    prog = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))  # cosine to 10% of lr


# ------------------------------------------------------------------------------------------ resume state
STATE_FILE = "state.safetensors"
LEGACY_STATE_FILE = "state.pt"  # a pickle: never loaded, since unpickling a planted file runs its code
STATE_FORMAT = "recpipe-train-state/1"


class UnusableState(Exception):
    """A resume state file that cannot be used (unreadable, foreign or of another run); training starts over."""


def write_resume_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """One safetensors file: the tensors (model, optimizer moments, EMA, best weights, RNG states) and, in its
    header metadata, the JSON of everything else. One file, so one atomic rename keeps both halves in step."""
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share memory (tied weights), and .cpu() of a CPU tensor is itself
    flat = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={"format": STATE_FORMAT, "state": json.dumps(meta, default=_plain)})


def read_resume_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a state written by write_resume_state; UnusableState (one line) for anything else.
    safetensors and JSON only parse data, so a crafted file cannot run code here."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("format") != STATE_FORMAT:
                raise UnusableState("not a recpipe train state")
            meta = json.loads(md["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
        raise UnusableState(_one_line(e)) from None
    if not isinstance(meta, dict):
        raise UnusableState("its metadata is not a JSON object")
    return tensors, meta


def _plain(o: Any) -> Any:
    """JSON for numpy scalars (validation metrics may be numpy floats)."""
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:120]}" if text else type(e).__name__


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _prefixed(prefix: str, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in d.items()}


def flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state_dict as (tensors named "<param index>.<key>", JSON: param groups and scalars)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, s in sd["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, v in [*tensors.items(), *meta["scalars"].items()]:
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_snapshot(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global random states training draws from (torch's drives dropout), as tensors and JSON lists."""
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return tensors, {"numpy": [name, keys.tolist(), pos, has_gauss, gauss],
                     "python": [version, list(py_state), py_gauss]}


def rng_restore(tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    name, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = meta["python"]
    random.setstate((version, tuple(py_state), py_gauss))


_ST_KEYS = ("step", "epoch", "batch_in_epoch", "best", "best_step", "bad", "done", "train_time", "log")


def pack_state(run_id: str, model: torch.nn.Module, opt: torch.optim.Optimizer, ema: EMA | None,
               best_state: dict[str, torch.Tensor] | None, st: dict[str, Any], gen: torch.Generator,
               losses: list[float], device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything a resumed run needs to continue exactly as an uninterrupted one would, as (tensors, JSON)."""
    opt_t, opt_meta = flatten_optimizer(opt.state_dict())
    rng_t, rng_meta = rng_snapshot(device)
    tensors = {**_prefixed("model", model.state_dict()), **_prefixed("opt", opt_t), **_prefixed("rng", rng_t),
               "rng.gen": gen.get_state()}
    if ema is not None:
        tensors.update(_prefixed("ema", ema.shadow))
    if best_state is not None:
        tensors.update(_prefixed("best", best_state))
    meta = {"run": run_id, "st": st, "opt": opt_meta, "rng": rng_meta, "has_best": best_state is not None,
            "ema_updates": ema.updates if ema is not None else 0, "losses": losses}
    return tensors, meta


def unpack_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], run_id: str, model: torch.nn.Module,
                 opt: torch.optim.Optimizer, ema: EMA | None, gen: torch.Generator, device: torch.device
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, list[float]]:
    """Load a packed state into model, optimizer, EMA and generators; returns (st, best_state, losses).
    UnusableState if it belongs to another run or does not fit the model; then nothing is changed."""
    if meta.get("run") != run_id:
        raise UnusableState("written by another run (other settings or inputs)")
    st = meta.get("st")
    if not isinstance(st, dict) or not all(k in st for k in _ST_KEYS):
        raise UnusableState("its step counters are incomplete")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    ema_sd = _split(tensors, "ema") if ema is not None else None
    best = _split(tensors, "best") if meta.get("has_best") else None
    for name, sd in (("model", _split(tensors, "model")), ("EMA", ema_sd), ("best", best)):
        if sd is not None and {k: v.shape for k, v in sd.items()} != shapes:
            raise UnusableState(f"its {name} weights do not fit this model")
    opt_sd = unflatten_optimizer(_split(tensors, "opt"), meta["opt"])
    params = [p for g in opt.param_groups for p in g["params"]]
    for idx, s in opt_sd["state"].items():
        if not 0 <= idx < len(params) or any(torch.is_tensor(v) and v.dim() and v.shape != params[idx].shape
                                             for v in s.values()):
            raise UnusableState("its optimizer state does not fit this model")
    before = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict(), gen.get_state(),
              rng_snapshot(device))
    try:
        model.load_state_dict(_split(tensors, "model"))
        opt.load_state_dict(opt_sd)
        gen.set_state(tensors["rng.gen"])
        rng_restore(_split(tensors, "rng"), meta["rng"], device)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        model.load_state_dict(before[0])
        opt.load_state_dict(before[1])
        gen.set_state(before[2])
        rng_restore(*before[3], device)
        raise UnusableState(_one_line(e)) from None
    if ema is not None:
        ema.shadow = {k: v.to(device) for k, v in ema_sd.items()}
        ema.updates = int(meta.get("ema_updates", st["step"]))
    best = {k: v.to(device) for k, v in best.items()} if best is not None else None
    return st, best, [float(x) for x in meta.get("losses", [])]

class StopGuard:
    """Holds Ctrl-C / SIGTERM while the training state changes (a step, a save), so that a stop lands between
    steps and the state saved on the way out is one the run really passed through; anywhere else a stop
    raises at once. Only handlers that raise are wrapped (SIGINT's default, the CLI's); with SIG_DFL a
    SIGTERM still ends the process outright, and the last saved state is what a re-run resumes."""

    def __init__(self):
        self.depth = 0
        self.pending: tuple[int, Any] | None = None
        self._old: dict[int, Callable] = {}

    def __enter__(self) -> StopGuard:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                old = signal.getsignal(sig)
                if callable(old):
                    self._old[sig] = old
                    signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.depth:
            self.pending = (signum, frame)
        else:
            self._old[signum](signum, frame)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None:
            (signum, frame), self.pending = self.pending, None
            self._old[signum](signum, frame)

# ---------------------------------------------------------------------------------------------- training
@dataclasses.dataclass
class TrainInputs:
    ds: data_stage.Dataset
    item_vectors: np.ndarray | None
    intent_vectors: np.ndarray | None
    fingerprints: dict[str, str]
    text_info: dict[str, Any]
    categories: CategoryIntents | None = None  # train.intent_source = category | mixed


def gather_inputs(cfg: Config, model_name: str) -> TrainInputs:
    run_dir = cfg.run_dir
    dm = require_stage(run_dir, "data", hint="recpipe data")
    ds = readers.dataset(run_dir)
    fps = {"data": dm.fingerprint}
    iv = itv = cats = None
    info: dict[str, Any] = {}
    if needs_text(model_name):
        iv, itv, info, wfp = load_text_vectors(run_dir)
        fps["whiten"] = wfp
        if iv.shape[0] != ds.n_items + 1:
            raise ArtifactError(
                f"the whiten stage: vectors for {iv.shape[0] - 1} items but the data stage has {ds.n_items}; "
                "re-run `recpipe embed` and `recpipe train`"
            )
        if cfg.train.intent_source == "mixed" and itv is None:  # before loading the TEM for the categories
            raise ConfigError("train.intent_source=mixed needs the describe stage's intentions "
                              "(describe.intents=true); use train.intent_source=category")
        if cfg.train.intent_source != "llm" and cfg.train.intent_prob > 0:
            cats = category_intents(cfg, ds)
            fps["embed"] = require_stage(run_dir, "embed", hint="recpipe embed").fingerprint  # the TEM embeds them
    return TrainInputs(ds, iv, itv, fps, info, cats)


@dataclasses.dataclass
class CategoryIntents:
    """Category-level training intentions: one text per category, each item's categories."""

    texts: list[str]  # the template filled with each category (lower-cased, as evaluate does)
    vectors: np.ndarray  # (C, d) whitened TEM vectors of the texts
    items: np.ndarray  # (n_items + 1, M) int64 category index per item, -1 = none; row 0 = padding
    raw: np.ndarray | None = None  # (C, d) the texts' TEM vectors, before whitening


def category_text(template: str, category: str) -> str:
    """evaluate.category_template filled with one category: "a {category} movie" + "action" -> "an action
    movie" (the article before the category agrees with it; a text the TEM embeds should read as a person
    would type it). A template that does not format is a one-line ConfigError."""
    text = template
    if category[:1].lower() in tuple("aeiou"):
        text = re.sub(r"\b([Aa]) (?=\{category\})", r"\1n ", template)
    try:
        return text.format(category=category)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"evaluate.category_template {template!r}: {e}") from None


def category_intents(cfg: Config, ds: data_stage.Dataset, whitening=None, encode=None) -> CategoryIntents:
    """Embed "a <category> movie" (evaluate.category_template) for every category of evaluate.category_column
    with the items' TEM (`encode`, default: the embed stage's), whitened like the items (`whitening`, default:
    the whiten stage's)."""
    from recpipe.pipeline import whiten
    from recpipe.pipeline.embed import load_tem

    col, template = cfg.evaluate.category_column, cfg.evaluate.category_template
    cats = ds.item_categories(col)
    if cats is None or not any(cats):
        raise ConfigError(f"train.intent_source={cfg.train.intent_source} needs the item column "
                          f"evaluate.category_column={col!r} (absent or empty in this dataset)")
    names = sorted({c.lower() for cs in cats for c in cs})
    index = {c: i for i, c in enumerate(names)}
    width = max(len(cs) for cs in cats)
    items = np.full((ds.n_items + 1, width), -1, dtype=np.int64)
    for i, cs in enumerate(cats, start=1):
        ids = list(dict.fromkeys(index[c.lower()] for c in cs))
        items[i, : len(ids)] = ids
    texts = [category_text(template, c) for c in names]
    if encode is None:
        encode = load_tem(require_stage(cfg.run_dir, "embed", hint="recpipe embed").info).encode
    w = whitening if whitening is not None else whiten.load(cfg.run_dir).whitening
    raw = encode(texts)
    return CategoryIntents(texts, w.transform(raw).astype(np.float32), items, raw)


class IntentSampler:
    """Per-sample training intentions for targets (any shape), drawn with the trainer's generator.

    llm: the describe stage's intention of the target; category: one of the target's categories, uniformly;
    mixed: a fair coin between the two (category falls back to llm for an item without categories).
    Returns (intention vectors (..., d), available (...) bool)."""

    def __init__(self, source: str, llm: np.ndarray | None, cats: CategoryIntents | None, device: torch.device):
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
        self.source = source
        self.llm = as_t(llm.astype(np.float32)) if llm is not None else None
        if cats is not None:
            self.cat_vec, self.cat_items = as_t(cats.vectors), as_t(cats.items)
            self.cat_n = (self.cat_items >= 0).sum(1)  # (n_items + 1,)

    def __call__(self, tgt: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        real = tgt != 0
        if self.source == "llm":
            return self.llm[tgt], real
        u = torch.rand(tuple(tgt.shape), generator=gen, device=tgt.device)
        k = (u * self.cat_n[tgt]).long().clamp_max(self.cat_items.shape[1] - 1)
        c = self.cat_items[tgt, k]  # -1 where the item has no category
        vec = self.cat_vec[c.clamp_min(0)]
        if self.source == "category":
            return vec, real & (c >= 0)
        use_cat = (torch.rand(tuple(tgt.shape), generator=gen, device=tgt.device) < 0.5) & (c >= 0)
        return torch.where(use_cat[..., None], vec, self.llm[tgt]), real


def train_config_dict(cfg: Config, model_name: str) -> dict[str, Any]:
    mcfg = cfg.model_config(model_name)
    tc = to_dict(cfg.train)
    tc.pop("threads")
    tc.pop("device")  # where it runs does not change what it computes (within float tolerance)
    tc.pop("save_every_s")  # nor does how often its resume state is saved
    out = {"model": model_name, "model_config": dataclasses.asdict(mcfg), "train": tc, "seed": cfg.run.seed}
    if not tc["guidance_grid"]:
        tc.pop("guidance_grid")  # off by default, and before it existed: old runs stay valid
    if not tc["length_pool"]:
        tc.pop("length_pool")  # off by default, and before it existed: old runs stay valid
    if tc["intent_source"] == "llm":
        tc.pop("intent_source")  # the default (and the only behaviour before it existed): old runs stay valid
    elif needs_text(model_name):
        out["intent_categories"] = {"column": cfg.evaluate.category_column,
                                    "template": cfg.evaluate.category_template}
    return out


def run(cfg: Config, model_name: str | None = None, force: bool = False, log=print, progress: bool = True
        ) -> StageResult:
    model_name = model_name or cfg.train.model
    check_model_name(model_name)
    inputs = gather_inputs(cfg, model_name)
    config = train_config_dict(cfg, model_name)

    def build(out_dir: Path) -> dict[str, Any]:
        return _train(cfg, model_name, inputs, config, out_dir, log=log, progress=progress)

    return run_stage(cfg.run_dir, f"train/{model_name}", config, inputs.fingerprints, build, force=force, log=log)


def _train(cfg: Config, model_name: str, inp: TrainInputs, config: dict, out_dir: Path, log, progress: bool
           ) -> dict[str, Any]:
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    seed = cfg.run.seed
    torch.manual_seed(seed)
    mcfg = cfg.model_config(model_name)
    model = make_model(model_name, mcfg, inp.ds.n_items, inp.item_vectors).to(device)
    if tc.guidance_grid:
        check_guidance(model, mcfg, model_name)  # before any training, not after it
    b = Batcher(inp.ds, model.history_len)
    mode = model.train_mode
    intents = None  # IntentSampler: an intention for a share (intent_prob) of the training targets
    if model.uses_intent and tc.intent_prob > 0:
        if tc.intent_source == "llm" and inp.intent_vectors is not None:
            intents = IntentSampler("llm", inp.intent_vectors, None, device)
        elif tc.intent_source != "llm" and inp.categories is not None:
            intents = IntentSampler(tc.intent_source, inp.intent_vectors, inp.categories, device)
            log(f"train/{model_name}: {tc.intent_source} intentions, {len(inp.categories.texts)} categories "
                f"(e.g. {inp.categories.texts[0]!r})")

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr)
    ema = EMA(model, tc.ema) if tc.ema > 0 else None
    window = model.window or 0
    chunked = model.chunked
    per_epoch = n_batches(b, mode, tc.batch_size, window, chunked)
    total = tc.epochs * per_epoch if not tc.max_steps else min(tc.max_steps, tc.epochs * per_epoch)
    eval_every = tc.eval_every or per_epoch
    rng = np.random.default_rng([seed, 7])
    val_users = np.arange(inp.ds.n_users)
    if tc.eval_users and tc.eval_users < len(val_users):
        val_users = np.sort(rng.choice(val_users, tc.eval_users, replace=False))

    work = cfg.run_dir / "work" / f"train-{model_name}-{fingerprint_obj([config, inp.fingerprints])}"
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / STATE_FILE
    run_id = fingerprint_obj([config, inp.fingerprints])
    st = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": -1.0, "best_step": -1, "bad": 0, "done": False,
          "train_time": 0.0, "log": []}
    best_state: dict[str, torch.Tensor] | None = None
    losses: list[float] = []
    gen = torch.Generator(device=device).manual_seed(seed)
    if state_path.exists():
        try:
            st, best_state, losses = unpack_state(*read_resume_state(state_path), run_id, model, opt, ema, gen,
                                                  device)
            log(f"train/{model_name}: resuming at step {st['step']} (epoch {st['epoch'] + 1}) from {state_path}")
        except UnusableState as e:  # the state is only a shortcut: without it, training starts over
            log(f"train/{model_name}: ignoring resume state {state_path} ({e}); starting from step 0")
    elif (work / LEGACY_STATE_FILE).exists():
        log(f"train/{model_name}: ignoring {work / LEGACY_STATE_FILE} (a pickle, which recpipe never loads: "
            "unpickling can run code); starting from step 0")

    guard = StopGuard()
    last_save = time.monotonic()

    def save_state() -> None:
        nonlocal last_save
        keep = max(eval_every, 50)  # the losses a validation entry and the progress line average over
        with guard.hold():
            write_resume_state(state_path, *pack_state(run_id, model, opt, ema, best_state, st, gen, losses[-keep:],
                                                       device))
            (work / LEGACY_STATE_FILE).unlink(missing_ok=True)  # superseded; it would only be warned about again
        last_save = time.monotonic()

    def valid_metrics(m: Recommender, score_kwargs: dict | None = None, label: str = "") -> dict[str, Any]:
        """Model selection's metrics: the validation users (all, or train.eval_users of them), @10 and @20."""
        return evaluate_split(m, b, "valid", [10, 20], batch_size=cfg.evaluate.batch_size, users=val_users,
                              device=device, score_kwargs=score_kwargs, seed=seed, progress=label)

    def validate() -> dict[str, Any]:
        # forked: validation draws nothing from the random stream training continues with (building the EMA
        # model initialises weights), so a run resumed after a validation draws what an unbroken one draws
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            eval_model = model
            if ema is not None:
                eval_model = make_model(model_name, mcfg, inp.ds.n_items, inp.item_vectors).to(device)
                eval_model.load_state_dict(ema.shadow)
            return valid_metrics(eval_model)

    def check(final: bool) -> None:
        """Validate, keep the best EMA weights, decide on early stopping, save the resumable state. A stop
        during validation saves the state with `check_due` set: the resumed run validates this step first."""
        st["check_due"] = final
        res = validate()
        with guard.hold():
            record(res, final)
            st["check_due"] = None
            save_state()

    def record(res: dict[str, Any], final: bool) -> None:
        nonlocal best_state
        ndcg = res["masked"]["NDCG@10"]
        recent = losses[-eval_every:] or [float("nan")]
        entry = {"step": st["step"], "epoch": st["epoch"] + st["batch_in_epoch"] / per_epoch,
                 "loss": float(np.mean(recent)), "valid": res, "train_time_s": round(st["train_time"], 2)}
        st["log"].append(entry)
        log(f"step {st['step']}: loss {entry['loss']:.4f}  valid NDCG@10 {ndcg:.4f} "
            f"(unmasked {res['unmasked']['NDCG@10']:.4f})  HR@10 {res['masked']['HR@10']:.4f}")
        if ndcg > st["best"]:
            st["best"], st["best_step"], st["bad"] = ndcg, st["step"], 0
            src = ema.shadow if ema is not None else model.state_dict()
            best_state = {k: v.detach().clone() for k, v in src.items()}
        else:
            st["bad"] += 1
            if st["bad"] >= tc.patience:
                log(f"early stop: no better validation NDCG@10 for {tc.patience} validations")
                st["done"] = True
        if final:
            st["done"] = True

    # Sequence batches hold a variable number of targets and a model's loss is their mean. A plain shuffle
    # mixes lengths, so each batch has about the same count; length-pooled batches do not (128 short rows
    # hold ~5 targets each, 128 long ones ~L), which would weigh the targets of short histories up. Scaling
    # each batch's loss by its targets / the pass's mean per batch restores one weight per target.
    per_batch_targets = 0.0
    if tc.length_pool and mode == "sequence":
        units = _units(b, mode, tc.batch_size, window, chunked)[0]
        per_batch_targets = float(_unit_lengths(b, mode, units).sum()) / max(per_epoch, 1)

    def train_step(batch: dict[str, torch.Tensor]) -> None:
        if intents is not None:
            tgt = batch["target"].to(device)
            batch["intent"], ok = intents(tgt, gen)
            batch["intent_mask"] = (torch.rand(tuple(tgt.shape), generator=gen, device=device)
                                    < tc.intent_prob) & ok
        batch = {k: v.to(device) for k, v in batch.items() if not k.startswith("_")}
        for g in opt.param_groups:
            g["lr"] = lr_at(st["step"], total, tc)
        loss = model.loss(batch, generator=gen)
        if not torch.isfinite(loss):
            raise ArtifactError(f"train/{model_name}: loss became {loss.item()} at step {st['step']}; "
                                "lower train.lr or check the input vectors")
        opt.zero_grad(set_to_none=True)
        if per_batch_targets:
            (loss * (batch["target_seq"] > 0).sum() / per_batch_targets).backward()
        else:
            loss.backward()
        if tc.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model)
        st["step"] += 1
        st["batch_in_epoch"] += 1
        losses.append(loss.item())

    def status() -> str:
        loss = f"{np.mean(losses[-50:]):.4f}" if losses else "-"
        return f"loss {loss} best {max(st['best'], 0):.4f}"

    n_params = model.num_parameters()
    log(f"train/{model_name}: {n_params:,} parameters, {mode} batches, {per_epoch} steps/epoch, up to {total} "
        f"steps on {device}")
    model.train()
    with guard, progress_bar("[bold]train[/] {task.description}", "{task.fields[info]}", disable=not progress) as bar:
        task = bar.add_task(model_name, total=total, completed=st["step"], info=status())
        try:
            if st.get("check_due") is not None:  # the validation a stopped run did not finish
                check(st["check_due"])
            while not st["done"] and st["epoch"] < tc.epochs:
                t_epoch = time.perf_counter()
                for batch in iterate_training(b, mode, tc.batch_size, st["epoch"], seed, skip=st["batch_in_epoch"],
                                              window=window, chunked=chunked, length_pool=tc.length_pool):
                    with guard.hold():
                        train_step(batch)
                        bar.update(task, advance=1, info=status())
                    stop_now = bool(tc.max_steps) and st["step"] >= tc.max_steps
                    if st["step"] % eval_every == 0 or stop_now:
                        st["train_time"] += time.perf_counter() - t_epoch  # training time excludes validation
                        check(stop_now)
                        bar.update(task, info=status())  # the best just validated, not the one before it
                        t_epoch = time.perf_counter()
                        if st["done"]:
                            break
                    elif time.monotonic() - last_save >= tc.save_every_s:  # a kill loses at most this much
                        st["train_time"] += time.perf_counter() - t_epoch
                        save_state()
                        t_epoch = time.perf_counter()
                else:
                    with guard.hold():
                        st["epoch"] += 1
                        st["batch_in_epoch"] = 0
                        st["train_time"] += time.perf_counter() - t_epoch
                    last_epoch = st["epoch"] >= tc.epochs
                    if last_epoch and (not st["log"] or st["log"][-1]["step"] != st["step"]):
                        check(True)  # the steps after the last periodic validation must be validated too
                        bar.update(task, info=status())
                    else:
                        save_state()
        except (KeyboardInterrupt, Stopped):
            save_state()  # every change to the state is made under guard.hold, so this one is whole
            log(f"train/{model_name}: stopped at step {st['step']}; saved its state in {state_path}, from which "
                "the same command resumes")
            raise

    if best_state is None:
        raise ArtifactError(f"train/{model_name}: no validation was run (0 training batches?)")
    best = next(e for e in st["log"] if e["step"] == st["best_step"])
    guidance = None
    if tc.guidance_grid:
        model.load_state_dict(best_state)
        grid = list(dict.fromkeys(float(w) for w in tc.guidance_grid))

        def sweep(w: float) -> dict[str, Any]:  # each w scores every validation user: show its progress
            label = f"guidance w={w:g} ({grid.index(w) + 1}/{len(grid)})" if progress else ""
            return valid_metrics(model, {"w": w}, label)

        mcfg, guidance, best = select_guidance(model, mcfg, tc.guidance_grid, best, sweep, model_name, log)
    dim = None if inp.item_vectors is None else int(inp.item_vectors.shape[1])
    save_checkpoint(out_dir, model_name, mcfg, inp.ds.n_items, dim, best_state, inp.fingerprints, inp.text_info,
                    config)
    with atomic_path(out_dir / "log.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(e) + "\n" for e in st["log"]))
    write_json(out_dir / "valid.json", best)
    samples = len(b.train_positions) if mode in ("position", "window") or chunked else None
    info = {
        "model": model_name, "parameters": n_params, "steps": st["step"], "best_step": st["best_step"],
        "valid": best["valid"], "train_time_s": round(st["train_time"], 2), "steps_per_epoch": per_epoch,
        "train_samples_per_epoch": samples, "device": str(device),
    }
    if guidance is not None:
        info["guidance"] = guidance
    return info


def check_guidance(model: Recommender, mcfg: Any, model_name: str) -> None:
    if not hasattr(mcfg, "w") or "w" not in model.sampler_params:
        raise ConfigError(f"train.guidance_grid: model {model_name} has no guidance weight w; leave it empty")


def select_guidance(model: Recommender, mcfg: Any, grid: list[float], best: dict[str, Any],
                    validate: Callable[[float], dict[str, Any]], model_name: str, log=print
                    ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Pick the history-guidance weight w from `grid` by masked validation NDCG@10, the checkpoint's weights
    fixed; a tie keeps the trained w, else goes to the earlier grid value. Returns (mcfg with that w, a record
    of the sweep, the best log entry with its validation replaced by the chosen w's). validate(w) ->
    evaluate_split's result. The model config's own w competes too, so the sweep never picks a worse w than
    training validated with."""
    check_guidance(model, mcfg, model_name)
    trained_w = float(mcfg.w)
    results = {trained_w: best["valid"]}
    for w in grid:
        if float(w) not in results:
            results[float(w)] = validate(float(w))
    by_w = {w: r["masked"]["NDCG@10"] for w, r in results.items()}
    chosen = max(by_w, key=lambda w: (by_w[w], w == trained_w))  # a tie keeps the trained w
    log(f"train/{model_name}: guidance w on validation (masked NDCG@10): "
        + ", ".join(f"{w:g}: {v:.4f}" for w, v in by_w.items()) + f" -> w = {chosen:g}")
    record = {"grid": [float(w) for w in grid], "trained_w": trained_w, "w": chosen,
              "valid_ndcg10_masked": {f"{w:g}": v for w, v in by_w.items()},
              "valid_ndcg10_unmasked": {f"{w:g}": r["unmasked"]["NDCG@10"] for w, r in results.items()}}
    return dataclasses.replace(mcfg, w=chosen), record, {**best, "valid": results[chosen], "w": chosen}


__all__ = ["Batcher", "iterate_training", "evaluate_split", "run", "gather_inputs", "EMA", "lr_at",
           "load_text_vectors", "resolve_device"]
