"""Typed intents on a trained iDreamRec run: the share of the top 10 in the requested genre, with the intent
anchored to the training intentions (recommend.intent_anchor, the default) and with the typed text's own
whitened vector (intent_anchor=none, the paper's direct use).

    make demo   # or any run with a `genres` item column and a trained idreamrec
    python bench/bench_intent_anchor.py [--dataset ml-100k] [--cache-dir cache] [--users 60]

Prints one line per setting and per request, and the mean over the requests.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: genre (as in the items' `genres` column) -> a request a person might type for it
REQUESTS = {"Comedy": "a funny comedy", "Horror": "a scary horror film", "Romance": "a romantic movie for date night",
            "Sci-Fi": "space adventure with aliens", "Documentary": "a documentary about real events",
            "Animation": "a cartoon for the kids", "War": "a war film", "Thriller": "a tense thriller"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="ml-100k")
    ap.add_argument("--cache-dir", default=str(ROOT / "cache"))
    ap.add_argument("--users", type=int, default=60, help="the first N users of the run")
    ap.add_argument("-k", type=int, default=10)
    a = ap.parse_args()

    from recpipe.config import load_config
    from recpipe.errors import RecpipeError
    from recpipe.pipeline.recommend import RecommendService

    share: dict[int, list[float]] = {}
    for anchor in (8, None):
        cfg = load_config(None, {"run.dataset": a.dataset, "run.cache_dir": a.cache_dir, "train.model": "idreamrec",
                                 "recommend.intent_anchor": str(anchor)})  # "None": off
        try:
            svc = RecommendService(cfg)
        except RecpipeError as e:
            print(f"skip: {e}")
            return
        if "genres" not in svc.ds.items:
            print(f"skip: {a.dataset} has no genres column")
            return
        genres = [set(str(g).split("|")) for g in svc.ds.items["genres"].fillna("")]
        users = svc.ds.users["user_id"].astype(str).tolist()[: a.users]
        for genre, request in REQUESTS.items():
            if not any(genre in g for g in genres):
                continue
            hits = sum(genre in genres[r.item - 1] for u in users for r in svc.recommend(u, request, a.k))
            share.setdefault(anchor, []).append(hits / (a.k * len(users)))
            prior = np.mean([genre in g for g in genres])
            print(f"intent_anchor={anchor}: {request!r:36} {genre:12} top-{a.k} share {share[anchor][-1]:.2f} "
                  f"(catalog {prior:.2f})")
    for anchor, s in share.items():
        print(f"intent_anchor={anchor}: mean share in the requested genre {np.mean(s):.3f} over {len(s)} requests, "
              f"{a.users} users")


if __name__ == "__main__":
    main()
