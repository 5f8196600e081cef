"""Training that can be trusted: no code runs from a planted resume file, a killed run resumes where it was
and ends with the weights an uninterrupted run gets, stale temporary stage directories go, a stop says what
was kept, and bad train settings are one-line errors. Data is built by the test (no ../shared needed)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recpipe.config import load_config
from recpipe.pipeline import data as D
from recpipe.pipeline import train as T

N_ITEMS = 40


def _build(tmp_path: Path, n_users: int = 120, length: int = 12, seed: int = 0) -> Path:
    """A catalog with a learnable rule (the next item is the last one + 7, 90% of the time)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        i = int(rng.integers(N_ITEMS))
        for j in range(length):
            rows.append((u, 100 + i, 1000 + j))
            i = (i + 7) % N_ITEMS if rng.random() < 0.9 else int(rng.integers(N_ITEMS))
    d = tmp_path / "data" / "toy"
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).drop_duplicates(["user_id", "item_id"]).to_csv(
        d / "interactions.csv", index=False)
    return tmp_path / "data"


def _settings(tmp_path: Path, cache: str = "cache", **over) -> dict:
    base = {"run.dataset": "toy", "run.data_dir": str(tmp_path / "data"), "run.cache_dir": str(tmp_path / cache),
            "data.kcore": 2, "train.model": "sasrec", "train.epochs": 3, "train.batch_size": 16,
            "train.warmup_steps": 5, "train.patience": 30, "train.threads": 1, "model.sasrec.history_len": 12}
    base.update(over)
    return base


def _cfg(tmp_path: Path, cache: str = "cache", **over):
    cfg = load_config(None, _settings(tmp_path, cache, **over))
    if not (cfg.run_dir / "data" / "manifest.json").exists():
        D.run(cfg, log=lambda m: None)
    return cfg


def _work(cfg) -> Path:
    config = T.train_config_dict(cfg, cfg.train.model)
    inputs = T.gather_inputs(cfg, cfg.train.model)
    return cfg.run_dir / "work" / f"train-{cfg.train.model}-{T.fingerprint_obj([config, inputs.fingerprints])}"


class _Payload:
    """Unpickling this runs os.system: what a crafted resume file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------------------ 1. no code from a planted file
@pytest.mark.parametrize("name", ["state.pt", "state.safetensors"])
def test_planted_pickle_resume_state_runs_nothing(tmp_path, name):
    _build(tmp_path)
    cfg = _cfg(tmp_path, **{"train.max_steps": 3})
    marker = tmp_path / "pwned"
    work = _work(cfg)
    work.mkdir(parents=True)
    (work / name).write_bytes(pickle.dumps({"st": _Payload(marker)}))
    logs: list[str] = []
    res = T.run(cfg, log=logs.append, progress=False)
    assert not marker.exists(), "the planted file's code ran"
    warn = [m for m in logs if "ignoring" in m]
    assert len(warn) == 1 and "\n" not in warn[0], logs
    assert str(work / name) in warn[0] and "starting from step 0" in warn[0], warn
    assert res.manifest.info["steps"] == 3
    assert (work / "state.safetensors").exists() and not (work / "state.pt").exists()
