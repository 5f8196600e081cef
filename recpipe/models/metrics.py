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
    unmasked, masked = target_ranks_both(scores, target, exclude)
    return unmasked if masked is None else masked


def row_counts(mask: torch.Tensor, block: int = 1 << 22) -> torch.Tensor:
    """(B,) int64 count of True per row of a (B, N) bool matrix. A bool matrix's sum() (and count_nonzero)
    first copies it into int64, 8x its size (a 1M-item catalog: GBs a batch); column blocks of about `block`
    elements bound that copy."""
    cols = max(1, block // max(1, mask.shape[0]))
    if mask.shape[1] <= cols:
        return mask.sum(1)
    out = torch.zeros(mask.shape[0], dtype=torch.int64, device=mask.device)
    for j in range(0, mask.shape[1], cols):
        out += mask[:, j: j + cols].sum(1)
    return out


def target_ranks_both(scores: torch.Tensor, target: torch.Tensor, exclude: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(unmasked ranks, masked ranks or None) from ONE comparison pass over the score matrix.

    An item counts against the target when its score is >= the target's (ties are pessimistic); the target
    itself and padding never count, and in the masked column neither do excluded items.
    """
    if scores.dtype != torch.float32 and scores.dtype != torch.float64:
        scores = scores.float()  # compare in float32 (the ties bf16/fp16 scores already have remain)
    if bool(torch.isnan(scores[:, 1:]).any()):  # padding's own score is never read
        raise ValueError("scores contain NaN")
    rows = torch.arange(scores.shape[0], device=scores.device)
    t_score = scores[rows, target]
    ge = scores >= t_score[:, None]  # (B, N+1), True at the target itself
    unmasked = row_counts(ge) - 1 - ge[:, 0].long()  # minus the target and padding
    if exclude is None:
        return unmasked, None
    ge &= exclude  # in place: no second matrix
    hidden = row_counts(ge) - exclude[rows, target].long() - ge[:, 0].long()
    return unmasked, unmasked - hidden


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


class RankAccumulator:
    """Collects per-user ranks for both columns over batches."""

    def __init__(self) -> None:
        self.masked: list[np.ndarray] = []
        self.unmasked: list[np.ndarray] = []

    def add(self, scores: torch.Tensor, target: torch.Tensor, seen: torch.Tensor) -> None:
        unmasked, masked = target_ranks_both(scores, target, seen)
        self.unmasked.append(unmasked.cpu().numpy())
        self.masked.append(masked.cpu().numpy())

    def result(self, ks: Sequence[int]) -> dict[str, dict[str, float]]:
        return {
            "masked": metrics_from_ranks(np.concatenate(self.masked), ks),
            "unmasked": metrics_from_ranks(np.concatenate(self.unmasked), ks),
            "users": int(sum(len(r) for r in self.masked)),
        }
