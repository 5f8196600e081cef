"""Softmax cross-entropy over the item catalog, full or sampled: the loss SASRec, iDreamRec's `loss="ce"` and
the other CE-trained models share.

The full softmax builds a (targets x items) logit matrix every step, so its cost grows with the catalog; at
millions of items it is what breaks first (docs/scaling.md). The sampled softmax (Jean et al., ACL 2015;
the usual in-batch / uniform-negative training of retrieval towers) scores each target against its own item
and `n_neg` negatives drawn uniformly from the catalog, shared by the whole batch (one (targets x n_neg) product):
its cost is independent of the item count. Uniform proposals give every negative the same log Q, which the
softmax cancels, so no correction term is needed; a negative that is the target itself (an accidental hit)
is masked out of that target's row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def catalog_ce(
    h: Tensor,
    target: Tensor,
    table: Tensor,
    *,
    n_neg: int = 0,
    generator: torch.Generator | None = None,
    allowed: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of the scores h · table[item]ᵀ / temperature for the target item.

    h: (M, d) one row per target; target: (M,) item ids 1..n; table: (n, d), row i-1 = item i (no padding row).
    n_neg = 0: the full softmax over every item (or over `allowed` items). n_neg > 0: the sampled softmax over
    the target and n_neg uniform draws (with replacement) from the items, or from `allowed` ((k,) ids 1..n,
    the only items that may be classes: e.g. the items with training data). Draws use `generator`.
    reduction: "mean" or "sum" over the M targets.
    """
    if n_neg < 0:
        raise ValueError(f"n_neg must be >= 0, got {n_neg}")
    if n_neg == 0:
        logits = (h @ table.T) / temperature  # (M, n)
        if allowed is not None:
            keep = torch.zeros(table.shape[0], dtype=torch.bool, device=logits.device)
            keep[allowed.to(logits.device) - 1] = True
            logits = logits.masked_fill(~keep, float("-inf"))
        return F.cross_entropy(logits, target - 1, reduction=reduction)
    on = generator.device if generator is not None else h.device
    if allowed is None:
        neg = torch.randint(1, table.shape[0] + 1, (n_neg,), generator=generator, device=on).to(h.device)
    else:
        pick = torch.randint(0, len(allowed), (n_neg,), generator=generator, device=on)
        neg = allowed.to(on)[pick].to(h.device)
    pos = (h * table[target - 1]).sum(dim=-1, keepdim=True) / temperature  # (M, 1)
    negs = (h @ table[neg - 1].T) / temperature  # (M, n_neg)
    negs = negs.masked_fill(neg[None, :] == target[:, None], float("-inf"))  # accidental hits
    logits = torch.cat([pos, negs], dim=1)
    return F.cross_entropy(logits, torch.zeros_like(target), reduction=reduction)


__all__ = ["catalog_ce"]
