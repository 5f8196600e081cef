"""A toy catalog the tests build themselves: 40 items, each user's next item is the last one + 7 (one cycle
through every item, no repeats within a sequence) 90% of the time, else a random one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

N_ITEMS = 40


def next_item(i: int) -> int:
    return (i + 7) % N_ITEMS


def build_toy(tmp_path: Path, n_users: int = 200, length: int = 12, seed: int = 0, items: bool = True) -> Path:
    """`<tmp_path>/data/toy/interactions.csv` (+ items.csv with titles and genres); returns the data directory."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        i = int(rng.integers(N_ITEMS))
        for j in range(length):
            rows.append((u, 100 + i, 1000 + j))
            i = next_item(i) if rng.random() < 0.9 else int(rng.integers(N_ITEMS))
    d = tmp_path / "data" / "toy"
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).drop_duplicates(["user_id", "item_id"]).to_csv(
        d / "interactions.csv", index=False)
    if items:
        pd.DataFrame({"item_id": 100 + np.arange(N_ITEMS), "title": [f"item {i}" for i in range(N_ITEMS)],
                      "genres": ["Comedy|Drama", "Horror", "Comedy", "Action"] * (N_ITEMS // 4)}).to_csv(
            d / "items.csv", index=False)
    return tmp_path / "data"
