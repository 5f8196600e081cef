"""Data-parallel training under torchrun (gloo, 2 processes on the CPU): every sample once a pass, the same
loss trajectory and weights as one process with the same global batch and seed, and a rank that dies leaves
one clear line on the others and a resume state the same command continues from. Data is built by the test."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from toy_data import build_toy

from recpipe.config import load_config
from recpipe.pipeline import data as D
from recpipe.pipeline.batches import Batcher, batch_targets, iterate_training, shard

STEPS, EVAL_EVERY = 12, 3


# ----------------------------------------------------------------------------------------- the shares of a pass
@pytest.mark.parametrize("n, world", [(10, 2), (7, 3), (2, 3), (1, 2)])
def test_shards_cover_a_batch_once_contiguously_in_near_equal_shares(n, world):
    units = np.arange(100, 100 + n)
    parts = [shard(units, r, world) for r in range(world)]
    real = [p for p, ok in parts if ok]
    assert np.array_equal(np.concatenate(real), units)  # each unit once, in order
    assert max(map(len, real)) - min(map(len, real)) <= 1
    for p, ok in parts:
        if not ok:  # a rank with nothing: a placeholder row, weighed 0
            assert len(p) == 1 and p[0] == units[0]
    assert sum(ok for _, ok in parts) == min(n, world)


@pytest.mark.parametrize("mode", ["sequence", "position", "window"])
def test_two_ranks_together_see_exactly_the_single_process_batches(tmp_path, mode):
    build_toy(tmp_path, n_users=60, length=9, items=False)
    cfg = load_config(None, {"run.dataset": "toy", "run.data_dir": str(tmp_path / "data"),
                             "run.cache_dir": str(tmp_path / "cache"), "data.kcore": 2})
    D.run(cfg, log=lambda m: None)
    b = Batcher(D.load_run(cfg.run_dir), history_len=8)
    kw = dict(b=b, mode=mode, batch_size=16, epoch=1, seed=5, window=4)
    single = list(iterate_training(**kw))
    ranks = [list(iterate_training(**kw, rank=r, world=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)  # every rank takes part in every step
    key = "target_seq" if mode == "sequence" else "target"

    def as_wide_as(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        # a rank's window batch drops the leading target columns none of its rows fill (the model is invariant
        # to them), so it can be narrower than the single process's: pad them back, empty, on the left
        return x if x.dim() == 1 else torch.nn.functional.pad(x, (ref.shape[1] - x.shape[1], 0))

    for one, r0, r1 in zip(single, *ranks):
        # a share that is only a placeholder ("_void", a last batch smaller than the world) holds no targets
        both = torch.cat([as_wide_as(r[key], one[key]) for r in (r0, r1) if "_void" not in r])
        assert torch.equal(both, one[key])
        assert batch_targets(r0) + batch_targets(r1) == batch_targets(one) > 0


# ------------------------------------------------------------------------ 2 processes against 1, and a lost rank
def _settings(tmp_path: Path, cache: str, **over) -> dict:
    # deterministic apart from summation order (no dropout, no EMA), so the runs can be compared step by step
    base = {"run.dataset": "toy", "run.data_dir": str(tmp_path / "data"), "run.cache_dir": str(tmp_path / cache),
            "run.seed": 2024, "data.kcore": 2, "train.model": "sasrec", "train.epochs": 10,
            "train.max_steps": STEPS, "train.eval_every": EVAL_EVERY, "train.batch_size": 32,
            "train.warmup_steps": 2, "train.patience": 1000, "train.ema": 0, "train.save_every_s": 0,
            "train.threads": 1, "model.sasrec.history_len": 12, "model.sasrec.dropout": 0.0}
    base.update(over)
    return base


def _train(tmp_path: Path, cache: str, nproc: int | None = None, env: dict | None = None, **over
           ) -> subprocess.CompletedProcess:
    settings = _settings(tmp_path, cache, **over)
    D.run(load_config(None, settings), log=lambda m: None)
    args = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    if nproc:
        args += ["--nproc", str(nproc)]
    return subprocess.run([sys.executable, "-m", "recpipe", "train", *args], cwd=tmp_path, text=True,
                          capture_output=True, timeout=600, env={**os.environ, **(env or {})})


def _result(tmp_path: Path, cache: str) -> tuple[list[float], dict[str, torch.Tensor], int]:
    from safetensors.torch import load_file

    stage = tmp_path / cache / "toy" / "train" / "sasrec"
    log = [json.loads(x) for x in (stage / "log.jsonl").read_text().splitlines()]
    manifest = json.loads((stage / "manifest.json").read_text())
    return [e["loss"] for e in log], load_file(str(stage / "model.safetensors")), manifest["info"]["steps"]


def _gap(a: tuple, b: tuple) -> float:
    """The larger of two runs' largest relative loss difference and their weights' relative distance, taken
    over the whole model: a key bias has a gradient that is zero but for rounding, which Adam scales up to full
    steps, so that parameter alone differs wholly between any two summation orders."""
    la, wa, _ = a
    lb, wb, _ = b
    assert len(la) == len(lb) and wa.keys() == wb.keys()
    loss = max(abs(x - y) / abs(x) for x, y in zip(la, lb))
    diff = sum(float((wa[k].double() - wb[k].double()).norm() ** 2) for k in wa) ** 0.5
    norm = sum(float(wa[k].double().norm() ** 2) for k in wa) ** 0.5
    return max(loss, diff / norm)


# where a CPU's kernels give 1 and 2 threads the same summation order (no thread gap to measure), the floor
# stands in: 2,000 float32 epsilons (2.4e-4), a reordering's rounding grown over 12 Adam steps (this Xeon: the
# DDP gap is 4.9e-5 against a thread gap of 3.0e-5); a wrong per-rank weighting gives 5.8e-3, another seed 1.2
FLOOR = 2000 * torch.finfo(torch.float32).eps


def _tolerance(out: dict) -> float:
    return max(20 * _gap(out["one"][0], out["one_2threads"][0]), FLOOR)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (twice: 1 and 2 torch threads, whose gap is this machine's own float32 reordering noise),
    another seed, and 2 processes under `recpipe train --nproc 2`."""
    tmp = tmp_path_factory.mktemp("ddp")
    build_toy(tmp, n_users=120, length=12, items=False)
    out = {}
    for name, kw in {"one": {}, "one_2threads": {"train.threads": 2}, "other_seed": {"run.seed": 7},
                     "ddp": {"nproc": 2}}.items():
        p = _train(tmp, name, **kw)
        assert p.returncode == 0, p.stderr[-3000:]
        out[name] = (_result(tmp, name), p.stderr)
    return tmp, out


def test_two_processes_match_one_with_the_same_global_batch_and_seed(runs):
    _, out = runs
    one, ddp = out["one"][0], out["ddp"][0]
    assert one[2] == ddp[2] == STEPS and len(one[0]) == STEPS // EVAL_EVERY
    # this machine's own float32 noise: the same run with another thread count sums in another order; DDP
    # sums a batch's two halves apart
    tol = _tolerance(out)
    assert _gap(one, ddp) <= tol, (_gap(one, ddp), tol)
    assert _gap(one, out["other_seed"][0]) > 100 * tol  # the comparison can tell runs apart
    err = out["ddp"][1]
    assert "2 processes (gloo); effective batch 32 (about 16 a process), every sample once a pass" in err, err
    assert "Traceback" not in err


def test_a_rank_that_dies_stops_the_others_with_one_line_and_the_run_resumes_under_another_count(runs):
    tmp, out = runs
    # rank 1 ends abruptly (os._exit) when 9 steps are done; rank 0 saved its state after every step
    p = _train(tmp, "fault", nproc=2, env={"RECPIPE_FAULT_EXIT": "1:9"})
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    lost = [x for x in p.stderr.splitlines() if "a peer process stopped during training" in x]
    assert len(lost) == 1, p.stderr[-3000:]
    assert lost[0].startswith("error: process 0 of 2: ") and lost[0].endswith(
        "the last saved state is intact and the same command resumes from it"), lost
    assert re.search(r"^error: train --nproc 2: .*process 1 \(exit 17\).* failed", p.stderr, re.M), p.stderr[-3000:]
    assert not (tmp / "fault" / "toy" / "train" / "sasrec" / "manifest.json").exists()

    again = _train(tmp, "fault")  # a state saved under 2 processes resumes under 1
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"resuming at step 9\b", again.stderr), again.stderr[-3000:]
    resumed = _result(tmp, "fault")
    assert resumed[2] == STEPS
    tol = _tolerance(out)
    assert _gap(out["ddp"][0], resumed) <= tol  # the interruption changed nothing
