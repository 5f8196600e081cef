"""The catalog cross-entropy shared by the CE-trained models: full softmax exactly as before, and the sampled
softmax (uniform negatives shared by the batch) that keeps a step's cost flat as the catalog grows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recpipe.models.losses import catalog_ce


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_full_softmax_is_the_plain_cross_entropy_and_allowed_masks_classes():
    h, table = torch.randn(30, 8, generator=gen(0)), torch.randn(50, 8, generator=gen(1))
    target = torch.randint(1, 51, (30,), generator=gen(2))
    assert torch.equal(catalog_ce(h, target, table), F.cross_entropy(h @ table.T, target - 1))
    assert torch.equal(catalog_ce(h, target, table, temperature=4.0, reduction="sum"),
                       F.cross_entropy(h @ table.T / 4.0, target - 1, reduction="sum"))
    allowed = torch.unique(torch.cat([target, torch.arange(1, 51, 3)]))
    logits = (h @ table.T).masked_fill(~torch.isin(torch.arange(1, 51), allowed), float("-inf"))
    torch.testing.assert_close(catalog_ce(h, target, table, allowed=allowed), F.cross_entropy(logits, target - 1))


def test_sampled_softmax_draws_shared_negatives_masks_hits_and_is_seeded():
    n, M, K = 1000, 64, 32
    h, table = torch.randn(M, 16, generator=gen(0)), torch.randn(n, 16, generator=gen(1))
    target = torch.randint(1, n + 1, (M,), generator=gen(2))
    a = catalog_ce(h, target, table, n_neg=K, generator=gen(5))
    assert torch.equal(a, catalog_ce(h, target, table, n_neg=K, generator=gen(5)))
    assert not torch.equal(a, catalog_ce(h, target, table, n_neg=K, generator=gen(6)))
    # the same value by hand: the draw is one randint(1, n + 1, (K,)) on the generator
    neg = torch.randint(1, n + 1, (K,), generator=gen(5))
    negs = (h @ table[neg - 1].T).masked_fill(neg[None] == target[:, None], float("-inf"))
    logits = torch.cat([(h * table[target - 1]).sum(1, keepdim=True), negs], dim=1)
    torch.testing.assert_close(a, F.cross_entropy(logits, torch.zeros(M, dtype=torch.long)))
    # a target drawn as its own negative is not counted against itself: all-negatives-are-the-target gives 0
    same = torch.full((M,), 7)
    assert catalog_ce(h, same, table, n_neg=K, generator=gen(0), allowed=torch.tensor([7])).item() == 0.0
    # negatives come from `allowed` only: a gradient reaches those rows and the targets' rows, no other
    table.requires_grad_(True)
    allowed = torch.arange(1, n + 1, 10)
    catalog_ce(h, target, table, n_neg=K, generator=gen(3), allowed=allowed).backward()
    touched = set((table.grad.abs().sum(1) > 0).nonzero().squeeze(1).add(1).tolist())
    assert touched - set(target.tolist()) <= set(allowed.tolist()) and touched - set(target.tolist())
    with pytest.raises(ValueError, match="n_neg must be >= 0"):
        catalog_ce(h, target, table, n_neg=-1)


def test_sampled_softmax_learns_what_the_full_one_learns():
    """A next-item rule (item i -> a random permutation of i) learned by free query and item embeddings under
    either loss, 400 items and 32 negatives a step: both rank the right item first for nearly every query."""
    n, d = 400, 24
    results = {}
    for n_neg in (0, 32):
        torch.manual_seed(0)
        nxt = torch.randperm(n, generator=gen(9)) + 1
        Q = torch.nn.Parameter(torch.randn(n, d) * 0.1)
        T = torch.nn.Parameter(torch.randn(n, d) * 0.1)
        opt = torch.optim.Adam([Q, T], lr=0.05)
        g = gen(1)
        for _ in range(250):
            q = torch.randint(1, n + 1, (128,), generator=g)
            loss = catalog_ce(Q[q - 1], nxt[q - 1], T, n_neg=n_neg, generator=g)
            opt.zero_grad()
            loss.backward()
            opt.step()
        top = (Q.detach() @ T.detach().T).argmax(1) + 1
        results[n_neg] = (top == nxt).float().mean().item()
    assert results[0] > 0.9 and results[32] > 0.9, results
