"""Scoring a model: the full-ranking loop that validation (train) and the evaluate stage share, and where it
runs (device, precision).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from recpipe import cpu
from recpipe.errors import ConfigError
from recpipe.models.base import Recommender
from recpipe.models.metrics import RankAccumulator, history_mask, metrics_from_ranks
from recpipe.pipeline.batches import Batcher
from recpipe.progress import counter


def resolve_device(name: str) -> torch.device:
    """The torch device for train.device: auto | cpu | cuda (an explicit cuda without a GPU is an error)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = cuda but torch sees no GPU")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """float32 | bfloat16 | auto (bfloat16 on a CUDA GPU that supports it or a CPU with native bf16)."""
    if name == "auto":
        dev = torch.device(device)
        ok = torch.cuda.is_bf16_supported() if dev.type == "cuda" else cpu.cpuinfo_has_bf16()
        return torch.bfloat16 if ok else torch.float32
    if name not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype must be auto, float32 or bfloat16, not {name!r}")
    return getattr(torch, name)


# Scores of one batch are a (rows, n_items + 1) float32 matrix, and ranking it needs about two more of its
# size: rows are capped so that it stays within this, whatever the catalog (1M items: 67 users a batch)
SCORE_MATRIX_BYTES = 256 * 2**20


def rows_within(batch_size: int, n_items: int, budget: int = SCORE_MATRIX_BYTES) -> int:
    """The users a scoring batch may hold: batch_size, fewer when their score matrix would pass `budget`."""
    return max(1, min(batch_size, budget // (4 * (n_items + 1))))


# History slots (users x width) per scoring batch. A sequence model's cost is about proportional to them, and
# a batch is as wide as its longest history: without a cap, a validation sample of 1,000 amazon-beauty users
# is one batch of 50,000 slots for 6,846 real items (most histories are a few items, a few are 50), and a
# 5-seed DiffuRecSys validation took minutes; with 8,192 it is 3 batches, 15,603 slots. Batches keep 163 users
# at width 50 (ML-1M), large enough for efficient matmuls.
EVAL_SLOTS = 8_192


def batch_bounds(widths: np.ndarray, max_rows: int, slots: int = EVAL_SLOTS) -> list[tuple[int, int]]:
    """[start, end) runs over users sorted by width (ascending): each holds at most max_rows users and, unless
    one user alone is wider, at most `slots` history slots (its count x its widest, the last)."""
    w = np.maximum(np.asarray(widths, dtype=np.int64), 1)
    n, out, s = len(w), [], 0
    while s < n:
        hi = min(s + max_rows, n)
        # k users cost k * w[s + k - 1] slots, non-decreasing in k: the k that fit are a prefix
        fits = np.arange(1, hi - s + 1) * w[s:hi] <= slots
        e = s + max(1, int(fits.sum()))
        out.append((s, e))
        s = e
    return out


@torch.no_grad()
def evaluate_split(
    model: Recommender, b: Batcher, split: str, ks: list[int], batch_size: int = 1024,
    users: np.ndarray | None = None, device: str | torch.device = "cpu", score_kwargs: dict | None = None,
    intent_fn=None, seed: int = 0, progress: str = "", groups: dict[str, np.ndarray] | None = None,
    slots: int | None = None,
) -> dict[str, Any]:
    """Full-ranking metrics (masked and unmasked columns) over every user of a split (or `users`).

    intent_fn(users, targets) -> (B, d) float tensor | None adds an intention to each batch.
    progress: a label shows a progress bar (users scored, rate, time left) under that name; "" shows none.
    groups: name -> user ids: the result's "groups" holds the same metrics over each group's users (from
    the same ranks, so a generative model's draws are the ones the whole figure has); a group with none of
    the scored users is left out.
    slots: history slots per batch (None = EVAL_SLOTS); a batch also holds at most batch_size users.
    """
    was_training = model.training
    model.eval()
    users = np.arange(b.ds.n_users) if users is None else np.asarray(users)
    # Batches of users with similar history lengths: a batch is as wide as its longest history (capped at the
    # model's window), so on short-history catalogs (Amazon: ~7 items) this cuts padded compute several-fold.
    # The metrics are means over users, so the order changes nothing but the noise a generative model draws.
    widths = b.capped(b.eval_lengths(users, split))
    order = np.argsort(widths, kind="stable")
    users, widths = users[order], widths[order]
    acc = RankAccumulator()
    gen = torch.Generator(device=device).manual_seed(seed)
    kwargs = dict(score_kwargs or {})
    if model.generative:
        kwargs["generator"] = gen
    n_items = model.n_items
    bounds = batch_bounds(widths, rows_within(batch_size, n_items), EVAL_SLOTS if slots is None else slots)
    bar = counter(f"[bold]evaluate[/] {progress}", progress, len(users), "users") if progress else None
    try:
        for lo, hi in bounds:
            u = users[lo:hi]
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
    res = acc.result(ks)
    if groups is not None:
        res["groups"] = {}
        masked, unmasked = np.concatenate(acc.masked), np.concatenate(acc.unmasked)
        for name, members in groups.items():
            sel = np.isin(users, members)
            if sel.any():
                res["groups"][name] = {"masked": metrics_from_ranks(masked[sel], ks),
                                       "unmasked": metrics_from_ranks(unmasked[sel], ks), "users": int(sel.sum())}
    return res


__all__ = ["EVAL_SLOTS", "batch_bounds", "evaluate_split", "resolve_device", "resolve_dtype"]
