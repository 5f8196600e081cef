"""Training and evaluation batches from the data stage's CSR sequences, for the trainer and the scorer.

Training batches follow a model's `train_mode` (see `recpipe.models.base.TRAIN_MODES`): "position" (every
training position of every user, in shuffled passes), "window" (the same targets, in runs of `window`
consecutive targets that share one history window; batch_size still counts targets: a batch holds as many
windows as hold batch_size targets at the data's mean per window), "sequence" (each
user's training sequence, a target at every position: its last history_len transitions, or all of them in
chunks of history_len when the model sets `chunked`) or "user" (each user's whole training history).
Evaluation batches (`Batcher.eval_batch`) hold each user's history before the valid / test target.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from recpipe.pipeline import data as data_stage


class Batcher:
    """Builds left-padded tensor batches from the data stage's CSR sequences (vectorised numpy)."""

    def __init__(self, ds: data_stage.Dataset, history_len: int | None, stride: int | None = None):
        self.ds = ds
        self.L = history_len
        # chunked sequences: windows of L end every `stride` positions and train only their last `stride`
        # targets (the oldest window all of its own), so every target sees at least L - stride items of context
        self.stride = stride if stride and history_len and stride < history_len else None
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

    def train_item_counts(self) -> np.ndarray:
        """(n_items + 1,) int64: how often each item occurs in the users' training parts (s[:-2]); padding 0."""
        pos = np.arange(len(self.items))
        counts = np.bincount(self.items[pos < self.offsets[self.user_of + 1] - 2], minlength=self.ds.n_items + 1)
        counts[0] = 0
        return counts

    def train_item_first_seen(self) -> np.ndarray:
        """(n_items + 1,) float64: each item's earliest timestamp in the users' training parts; +inf for an item
        that none holds (padding, the cold-item protocol's new items)."""
        pos = np.arange(len(self.items))
        inside = pos < self.offsets[self.user_of + 1] - 2
        first = np.full(self.ds.n_items + 1, np.inf)
        np.minimum.at(first, self.items[inside], self.ds.seq_times[inside].astype(np.float64))
        first[0] = np.inf
        return first

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

    def window_targets(self, ends: np.ndarray, C: int) -> np.ndarray:
        """The training targets each window ending (exclusive) at `ends` holds: at most C, fewer in a user's
        first run."""
        return np.minimum(ends - self.offsets[self.user_of[ends - 1]] - 1, C)

    def windows(self, ends: np.ndarray, C: int) -> dict[str, torch.Tensor]:
        """For each window end e: "window" (B, L + C) the items at [e - C - L, e), left-padded before the
        user's start, and "target" (B, C) the items at [e - C, e) that are training targets (0 elsewhere).
        Both are cut to the batch's needs, which the causal model is invariant to: target columns empty in
        every row go (then C = the most targets a row holds, and the history keeps its L columns before the
        first target), and so do leading history columns that are padding in every row. A batch of short
        users' windows is then a few columns wide, not L + C."""
        u = self.user_of[ends - 1]
        start = self.offsets[u]
        C = int(self.window_targets(ends, C).max()) if len(ends) else 1  # a window unit holds >= 1 target
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
        step = self.stride or self.L
        return _run_ends(end, -(-n // step), step)

    def sequences(self, ends: np.ndarray) -> dict[str, torch.Tensor]:
        """input_seq / target_seq for sequences ending (exclusive) at `ends`: the targets are the (up to) L
        training items before each end, the inputs the item before each target; 0 where there is none."""
        start = self.offsets[self.user_of[ends - 1]]
        L = self._width(ends - start - 1)
        inp = self._window(ends - 1, start, L)
        tgt = self._window(ends, start + 1, L)
        inp = np.where(tgt > 0, inp, 0)
        if self.stride:  # a window with an older one trains only its last `stride` targets; its inputs all stay
            oldest = ends - self.stride <= start + 1
            tgt = np.where(oldest[:, None] | (np.arange(L) >= L - self.stride)[None, :], tgt, 0)
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
    "window" mode too: a batch holds batch_size / (the mean targets a window holds) windows, so that on a
    catalog of short histories (a window of 20 slots holding ~5 targets on Amazon) a batch still trains about
    batch_size targets, not a quarter of them; `chunked`: see Batcher.sequence_units."""
    if mode == "position":
        return b.train_positions, batch_size
    if mode == "window":
        units = b.window_units(window)
        mean = float(b.window_targets(units, window).mean()) if len(units) else float(window)
        return units, max(1, int(round(batch_size / mean)))
    if mode == "sequence":
        return b.sequence_units(chunked), batch_size
    users = np.arange(b.ds.n_users)
    train_len = np.diff(b.offsets) - 2
    return users[train_len >= 1], batch_size


def _unit_lengths(b: Batcher, mode: str, units: np.ndarray, window: int = 0) -> np.ndarray | None:
    """The history length (capped at the model's window) each training unit's batch row needs, which for
    "sequence" units is also its number of targets; for "window" units the columns the window needs (its
    history and targets, at most L + window)."""
    if mode == "window":
        need = units - b.offsets[b.user_of[units - 1]]
        return np.minimum(need, b.L + window) if b.L else need
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


def shard(units: np.ndarray, rank: int, world: int) -> tuple[np.ndarray, bool]:
    """Rank `rank`'s contiguous share of one global batch's units, of `world` shares differing by at most one
    unit: (units, real). A batch smaller than the world leaves some ranks nothing; they get its first unit with
    real=False, to be weighed 0, because every rank must take part in the step's gradient all-reduce."""
    part = np.array_split(units, world)[rank]
    if len(part) == 0:
        return units[:1], False
    return part, True


def iterate_training(b: Batcher, mode: str, batch_size: int, epoch: int, seed: int, skip: int = 0,
                     window: int = 0, chunked: bool = False, length_pool: int | None = None,
                     rank: int = 0, world: int = 1) -> Iterator[dict[str, torch.Tensor]]:
    """One shuffled pass (epoch) over the training data; `skip` batches already done (resume).
    mode "window": windows of `window` targets, batch_size targets a batch. length_pool (a number): batches of
    similar history length (`bucket_by_length`), which cuts padded compute on short-history catalogs.
    world > 1 (data-parallel training): every rank draws the same pass and yields its `shard` of each batch;
    a share that is only a placeholder carries the key "_void"."""
    rng = np.random.default_rng([seed, epoch])
    units, batch_size = _units(b, mode, batch_size, window, chunked)
    perm = units[rng.permutation(len(units))]
    lengths = _unit_lengths(b, mode, perm, window) if length_pool else None
    if lengths is not None:
        perm = bucket_by_length(perm, lengths, batch_size, length_pool, rng)
    for i in range(skip * batch_size, len(perm), batch_size):
        chunk, real = perm[i: i + batch_size], True
        if world > 1:
            chunk, real = shard(chunk, rank, world)
        if mode == "position":
            batch = b.positions(chunk)
        elif mode == "window":
            batch = b.windows(chunk, window)
        elif mode == "sequence":
            batch = b.sequences(chunk)
        else:
            batch = b.user_histories(chunk, cut=2)
        if not real:
            batch["_void"] = torch.ones(())
        yield batch


def batch_targets(batch: dict[str, torch.Tensor]) -> int:
    """The training targets a batch holds, which a model's loss averages over: the non-padding entries of
    target_seq (sequence rows) or target (windows; a position holds one), else one a row; 0 for a placeholder."""
    if "_void" in batch:
        return 0
    for key in ("target_seq", "target"):
        if key in batch:
            return int((batch[key] > 0).sum())
    return int(next(v for k, v in batch.items() if not k.startswith("_")).shape[0])


def targets_per_batch(b: Batcher, mode: str, batch_size: int, window: int = 0, chunked: bool = False) -> float:
    """The mean number of training targets a batch of one pass holds ("sequence" rows hold one per history
    item they read, windows up to `window`), which a length-pooled pass needs to weigh each target once."""
    units = _units(b, mode, batch_size, window, chunked)[0]
    per_unit = b.window_targets(units, window) if mode == "window" else _unit_lengths(b, mode, units)
    return float(per_unit.sum()) / max(n_batches(b, mode, batch_size, window, chunked), 1)


def n_batches(b: Batcher, mode: str, batch_size: int, window: int = 0, chunked: bool = False) -> int:
    units, batch_size = _units(b, mode, batch_size, window, chunked)
    return math.ceil(len(units) / batch_size)


__all__ = ["Batcher", "iterate_training", "shard", "batch_targets", "n_batches", "bucket_by_length",
           "targets_per_batch"]
