"""Full-ranking metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recpipe.models.metrics import RankAccumulator, history_mask, metrics_from_ranks, target_ranks


def test_ranks_padding_and_masking():
    # items 1..5; padding column 0 has the highest score but is never rankable
    scores = torch.tensor([[9.0, 0.1, 0.5, 0.9, 0.3, 0.2]])
    target = torch.tensor([2])
    assert target_ranks(scores, target).item() == 1  # only item 3 beats it
    seen = history_mask([np.array([3])], 5)
    assert target_ranks(scores, target, seen).item() == 0
    # the target is never masked even if it appears in the history
    seen = history_mask([np.array([2, 3])], 5)
    assert target_ranks(scores, target, seen).item() == 0


def test_ties_count_against_the_target():
    scores = torch.zeros(2, 11)
    ranks = target_ranks(scores, torch.tensor([1, 10]))
    assert ranks.tolist() == [9, 9]  # constant scores: the target is last among 10 items
    m = metrics_from_ranks(ranks, [10])
    assert m["HR@10"] == 1.0 and m["NDCG@10"] == pytest.approx(1 / math.log2(11))
    assert metrics_from_ranks(ranks, [5])["HR@5"] == 0.0


def test_metric_values():
    ranks = np.array([0, 1, 4, 9, 30])
    m = metrics_from_ranks(ranks, [5, 10])
    assert m["HR@5"] == pytest.approx(3 / 5)
    assert m["HR@10"] == pytest.approx(4 / 5)
    exp = (1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11)) / 5
    assert m["NDCG@10"] == pytest.approx(exp)
    with pytest.raises(ValueError):
        metrics_from_ranks(np.array([]), [5])


def test_accumulator_averages_over_users_not_batches():
    acc = RankAccumulator()
    # batch 1: one user, hit at rank 0; batch 2: three users, all misses
    acc.add(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([1]), history_mask([np.array([2])], 2))
    s = torch.tensor([[0.0, 0.0, 1.0]] * 3)
    acc.add(s, torch.tensor([1, 1, 1]), history_mask([np.array([], dtype=int)] * 3, 2))
    r = acc.result([1])
    assert r["users"] == 4
    assert r["unmasked"]["HR@1"] == pytest.approx(0.25)  # per-batch averaging would give 0.5


def test_nan_scores_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        target_ranks(torch.tensor([[0.0, float("nan"), 1.0]]), torch.tensor([2]))


def _brute_rank(scores: np.ndarray, target: int, exclude: set[int]) -> int:
    t = scores[target]
    return sum(1 for i in range(1, len(scores)) if i != target and i not in exclude and scores[i] >= t)


def test_ranks_match_brute_force_with_ties_repeats_and_padding():
    rng = np.random.default_rng(7)
    B, n = 64, 40
    scores = torch.from_numpy(rng.integers(0, 6, (B, n + 1)).astype(np.float32))  # many ties
    scores[::3, 0] = 100.0  # a padding score that would win if it were rankable
    scores[1::5, 0] = float("nan")  # padding's own score is never read
    target = torch.from_numpy(rng.integers(1, n + 1, B))
    hists = [rng.choice(np.arange(1, n + 1), rng.integers(0, 12), replace=False) for _ in range(B)]
    hists[0] = np.append(hists[0], target[0].item())  # a repeat: the target is in the history
    seen = history_mask(hists, n)
    acc = RankAccumulator()
    acc.add(scores, target, seen)
    for b in range(B):
        s, t = scores[b].numpy(), int(target[b])
        assert acc.unmasked[0][b] == _brute_rank(s, t, set())
        assert acc.masked[0][b] == _brute_rank(s, t, set(hists[b].tolist()) - {t})
        assert target_ranks(scores[b:b + 1], target[b:b + 1], seen[b:b + 1]).item() == acc.masked[0][b]


def test_row_counts_in_column_blocks_equal_a_plain_sum():
    from recpipe.models.metrics import row_counts

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(5, 103, generator=g) > 0.6
    for block in (1, 7, 5 * 103, 10**6):  # one column a block, ragged blocks, exactly one block, no blocks
        assert torch.equal(row_counts(mask, block=block), mask.sum(1))


def test_scoring_batches_are_capped_by_their_score_matrix():
    from recpipe.pipeline.scoring import SCORE_MATRIX_BYTES, rows_within

    assert rows_within(1024, 3_416) == 1024  # ML-1M: the configured batch
    assert rows_within(1024, 1_000_000) == SCORE_MATRIX_BYTES // (4 * 1_000_001)  # 1M items: 67 users
    assert rows_within(1024, 10**10) == 1  # never an empty batch


def test_scoring_batches_are_capped_by_their_history_slots():
    """Users sorted by width are cut into runs of at most max_rows users and `slots` history slots (count x
    the run's widest), each run as long as those allow; a user wider than `slots` still gets a run."""
    from recpipe.pipeline.scoring import batch_bounds

    rng = np.random.default_rng(0)
    widths = np.sort(np.minimum(rng.geometric(0.12, size=3_000), 50))  # short-history catalog, capped at 50
    for max_rows, slots in [(1024, 16_384), (1024, 2_000), (64, 10**9), (7, 1)]:
        bounds = batch_bounds(widths, max_rows, slots)
        assert bounds[0][0] == 0 and bounds[-1][1] == len(widths)
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # every user once, in order
        for s, e in bounds:
            n = e - s
            assert n <= max_rows and (n == 1 or n * widths[e - 1] <= slots)
            if e < len(widths):  # maximal: one more user would break a limit
                assert n + 1 > max_rows or (n + 1) * widths[e] > slots
    # a 1,000-user validation sample of such a catalog is no longer one batch as wide as its widest user
    bounds = batch_bounds(widths[:: 3], 1024, 16_384)
    assert sum((e - s) * widths[::3][e - 1] for s, e in bounds) < 0.5 * len(widths[::3]) * widths[::3][-1]
