"""Shared fixtures. Tests that need ../shared/datasets skip (with that reason) when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def shared_datasets_dir() -> Path | None:
    env = os.environ.get("RECPIPE_SHARED")
    for cand in ([Path(env)] if env else []) + [ROOT.parent / "shared"]:
        if (cand / "datasets").is_dir():
            return cand / "datasets"
    return None


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    d = shared_datasets_dir()
    if d is None:
        pytest.skip("needs ../shared/datasets (licensed data is never committed; CI has it)")
    return d


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Every test runs in its own directory so ./cache and ./recpipe.toml never leak between tests."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RECPIPE_DATA", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    yield


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread avoids OpenMP overhead (large on a busy 2-core machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
