"""Full-ranking metrics: HR@K and NDCG@K with one relevant item per user.

Protocol (the same for every model in recpipe):
- every item is a candidate (no sampled negatives); padding (column 0) is never rankable;
- "masked": the user's earlier items cannot be recommended (what a user gets; the default column);
  "unmasked": only padding is excluded (what DiffuRec, DreamRec and RecBole's sequential models report);
- ties are counted against the target (pessimistic): a model that gives every item the same score ranks the
  target last, not first;
- metrics are averaged over every evaluated user (never per batch, no dropped last batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def target_ranks(scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each row's target among all rankable items.

    scores:  (B, N+1) float, column 0 = padding
    target:  (B,) long, in 1..N
    exclude: (B, N+1) bool, True = not rankable (seen items); the target itself is never excluded
    returns: (B,) long
    """
    scores = scores.float().clone()
    scores[:, 0] = -torch.inf
    rows = torch.arange(scores.shape[0], device=scores.device)
    t_score = scores[rows, target]
    if exclude is not None:
        exclude = exclude.clone()
        exclude[rows, target] = False
        scores = scores.masked_fill(exclude, -torch.inf)
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    greater = (scores > t_score[:, None]).sum(1)
    ties = (scores == t_score[:, None]).sum(1) - 1  # other items with exactly the target's score
    return greater + ties


def history_mask(histories: Sequence[np.ndarray], n_items: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(B, N+1) bool mask of each user's earlier items (the seen-masked column)."""
    mask = torch.zeros(len(histories), n_items + 1, dtype=torch.bool, device=device)
    if len(histories):
        rows = np.repeat(np.arange(len(histories)), [len(h) for h in histories])
        cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]) if len(rows) else np.zeros(0, int)
        mask[torch.as_tensor(rows, device=device), torch.as_tensor(cols, device=device)] = True
    mask[:, 0] = False
    return mask


def metrics_from_ranks(ranks: np.ndarray | torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """{"HR@K": ..., "NDCG@K": ...} averaged over all rows; NDCG with one relevant item = 1/log2(rank+2)."""
    r = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks, dtype=np.float64)
    out: dict[str, float] = {}
    if r.size == 0:
        raise ValueError("no users to evaluate")
    for k in ks:
        hit = r < k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(r + 2.0), 0.0).mean())
    out["MRR"] = float((1.0 / (r + 1.0)).mean())
    return out


def ndcg_at(rank: int, k: int) -> float:
    """NDCG@k of one user whose target sits at 0-based `rank`."""
    return 1.0 / math.log2(rank + 2) if rank < k else 0.0


class RankAccumulator:
    """Collects per-user ranks for both columns over batches."""

    def __init__(self) -> None:
        self.masked: list[np.ndarray] = []
        self.unmasked: list[np.ndarray] = []

    def add(self, scores: torch.Tensor, target: torch.Tensor, seen: torch.Tensor) -> None:
        self.unmasked.append(target_ranks(scores, target).cpu().numpy())
        self.masked.append(target_ranks(scores, target, seen).cpu().numpy())

    def result(self, ks: Sequence[int]) -> dict[str, dict[str, float]]:
        return {
            "masked": metrics_from_ranks(np.concatenate(self.masked), ks),
            "unmasked": metrics_from_ranks(np.concatenate(self.unmasked), ks),
            "users": int(sum(len(r) for r in self.masked)),
        }
