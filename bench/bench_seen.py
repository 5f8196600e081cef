"""Where the gap between the seen-masked and unmasked columns comes from: the share of a trained model's
unmasked top-K (test split, every user) that are items the user has already seen, split into those inside the
model's history window (which the model reads, so it could learn not to rank them) and older ones (which it
never sees). With no repeats in a dataset (ML-1M), every such slot is a miss that masking removes.

    python bench/bench_seen.py [--run-dir cache/ml-1m] [--model idreamrec] [--k 10] [--w 1]

Measured on ML-1M (README): the 8-epoch width-256 iDreamRec (residual + CE, history 20) at w = 1 fills 20.8%
of its unmasked top-10 with items of its own 20-item window and 16.6% with older seen items.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import numpy as np
import torch


def seen_share(model, b, split: str, k: int, score_kwargs: dict, seed: int = 0, batch: int = 1024
               ) -> tuple[float, float]:
    """(share of top-k slots holding a seen item inside the model's window, share holding an older one)."""
    window = getattr(model, "history_len", None)
    gen = torch.Generator().manual_seed(seed)
    kw = dict(score_kwargs, **({"generator": gen} if getattr(model, "generative", False) else {}))
    inside = older = slots = 0
    for i in range(0, b.ds.n_users, batch):
        users = np.arange(i, min(i + batch, b.ds.n_users))
        inputs, seen = b.eval_batch(users, split)
        with torch.no_grad():
            scores = model.score_all(inputs, **kw)
        scores[:, 0] = -float("inf")  # padding is never rankable
        top = torch.topk(scores, k, dim=1).indices.numpy()
        for row, hist in zip(top, seen):
            cut = max(len(hist) - window, 0) if window else 0  # hist[cut:] is what the model reads
            recent, old = set(hist[cut:].tolist()), set(hist[:cut].tolist())
            inside += sum(int(x) in recent for x in row)
            older += sum(int(x) in old for x in row)
            slots += len(row)
    return inside / max(slots, 1), older / max(slots, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run-dir", default=str(Path(__file__).resolve().parents[1] / "cache" / "ml-1m"))
    ap.add_argument("--model", default="idreamrec")
    ap.add_argument("--split", default="test", choices=["valid", "test"])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--w", type=float, default=None, help="history guidance (models with a w); default: trained")
    a = ap.parse_args()
    run = Path(a.run_dir)
    if not (run / "train" / a.model).exists():
        print(f"skip: no trained {a.model} in {run}")
        return

    from recpipe.pipeline import batches, bundle, data

    model, _, _ = bundle.load_model(run, a.model)
    b = batches.Batcher(data.load(run / "data"), getattr(model, "history_len", None))
    kw = {}
    if a.w is not None:
        if "w" not in inspect.signature(model.score_all).parameters:
            ap.error(f"--w: model {a.model} has no history guidance weight")
        kw["w"] = a.w
    inside, older = seen_share(model, b, a.split, a.k, kw)
    window = getattr(model, "history_len", None) or "all"
    print(f"{a.model} on {run.name} ({a.split}, {b.ds.n_users:,} users{', w=' + str(a.w) if a.w is not None else ''}): "
          f"of the unmasked top-{a.k}, {inside:.1%} are seen items inside the model's window ({window}), "
          f"{older:.1%} older seen items")


if __name__ == "__main__":
    main()
