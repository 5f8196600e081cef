"""Training that can be trusted: no code runs from a planted resume file, a killed run resumes where it was
and ends with the weights an uninterrupted run gets, stale temporary stage directories go, a stop says what
was kept, and bad train settings are one-line errors. Data is built by the test (no ../shared needed)."""

from __future__ import annotations

import json
import os
import pickle
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from toy_data import build_toy

from recpipe import progress
from recpipe.config import load_config
from recpipe.pipeline import data as D
from recpipe.pipeline import train as T


def _build(tmp_path: Path, n_users: int = 120, length: int = 12, seed: int = 0) -> Path:
    """The toy catalog without items.csv (training reads no titles)."""
    return build_toy(tmp_path, n_users, length, seed, items=False)


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
    key = T.fingerprint_obj([T.trajectory_key(config), inputs.fingerprints])
    return cfg.run_dir / "work" / f"train-{cfg.train.model}-{key}"


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



@pytest.mark.parametrize("case", ["another run's", "truncated"])
def test_foreign_or_damaged_resume_state_is_one_warning_and_a_fresh_start(tmp_path, case):
    _build(tmp_path)
    other = _cfg(tmp_path, "other", **{"train.max_steps": 4, "train.lr": 2e-3, "train.save_every_s": 0})
    T.run(other, log=lambda m: None, progress=False)
    state = (_work(other) / "state.safetensors").read_bytes()
    cfg = _cfg(tmp_path, **{"train.max_steps": 3})
    work = _work(cfg)
    work.mkdir(parents=True)
    (work / "state.safetensors").write_bytes(state if case == "another run's" else state[: len(state) // 2])
    logs: list[str] = []
    res = T.run(cfg, log=logs.append, progress=False)
    warn = [m for m in logs if "ignoring" in m]
    assert len(warn) == 1 and "\n" not in warn[0] and warn[0].endswith("starting from step 0"), logs
    assert ("written by another run" in warn[0]) == (case == "another run's"), warn
    from safetensors.torch import load_file

    ref, again = (load_file(str(T.run(_cfg(tmp_path, name, **{"train.max_steps": 3}), log=lambda m: None,
                                      progress=False).stage_dir / "model.safetensors")) for name in ("f1", "f2"))
    got = load_file(str(res.stage_dir / "model.safetensors"))
    assert _max_diff(ref, got) <= _max_diff(ref, again), "the ignored state left nothing behind"


# ------------------------------------------------------------------------ 2. a killed run resumes exactly
def _trained(cfg, log=lambda m: None) -> tuple[dict, list[dict]]:
    from safetensors.torch import load_file

    res = T.run(cfg, log=log, progress=False)
    lines = (res.stage_dir / "log.jsonl").read_text().splitlines()
    return load_file(str(res.stage_dir / "model.safetensors")), [json.loads(x) for x in lines]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# sasrec draws dropout from torch's global generator; dreamrec also draws diffusion noise from the trainer's own
MODELS = {
    "sasrec": {"train.batch_size": 16},  # 8 steps an epoch
    "dreamrec": {"train.batch_size": 64, "model.dreamrec.history_len": 12, "model.dreamrec.T": 50,
                 "model.dreamrec.sampler": "ddim", "model.dreamrec.ddim_steps": 5},
}


def _run_interrupted(cfg, monkeypatch, how: str) -> int:
    """Train until it is interrupted; returns the step the re-run should resume at.
    killed: an error at step 13, no stop request, so nothing is saved on the way out (as with SIGKILL): the
    re-run resumes from the state saved by time (train.save_every_s = 0: after every step).
    stopped: Ctrl-C in the middle of the validation at step 10: the state is saved with that validation due."""
    if how == "killed":
        lr_at = T.lr_at

        def dies(step, total, tc):
            if step == 13:
                raise RuntimeError("killed")
            return lr_at(step, total, tc)

        monkeypatch.setattr(T, "lr_at", dies)
        with pytest.raises(RuntimeError, match="killed"):
            T.run(cfg, log=lambda m: None, progress=False)
        monkeypatch.setattr(T, "lr_at", lr_at)
        return 13
    evaluate_split, calls = T.evaluate_split, []

    def stopped(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the validation at step 10
            raise KeyboardInterrupt
        return evaluate_split(*a, **k)

    monkeypatch.setattr(T, "evaluate_split", stopped)
    with pytest.raises(KeyboardInterrupt):
        T.run(cfg, log=lambda m: None, progress=False)
    monkeypatch.setattr(T, "evaluate_split", evaluate_split)
    return 10


@pytest.mark.parametrize("how", ["killed", "stopped"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_interrupted_run_resumes_with_the_uninterrupted_weights(tmp_path, monkeypatch, model, how):
    _build(tmp_path)
    over = {"train.model": model, "train.eval_every": 5, "train.save_every_s": 0, **MODELS[model]}
    ref, ref_log = _trained(_cfg(tmp_path, "a", **over))
    again, again_log = _trained(_cfg(tmp_path, "a2", **over))
    tol = _max_diff(ref, again)  # what this machine gives for the same run twice (0 where it is deterministic)
    cfg = _cfg(tmp_path, "b", **{**over, "train.save_every_s": 300 if how == "stopped" else 0})
    at = _run_interrupted(cfg, monkeypatch, how)
    assert at < ref_log[-1]["step"]
    logs: list[str] = []
    resumed, resumed_log = _trained(cfg, logs.append)
    assert [m for m in logs if "resuming" in m] and f"resuming at step {at} " in logs[0], logs
    assert _max_diff(ref, resumed) <= tol, (tol, _max_diff(ref, resumed))
    if tol == 0:
        assert [e["loss"] for e in resumed_log] == [e["loss"] for e in ref_log]
        assert [e["valid"] for e in resumed_log] == [e["valid"] for e in ref_log]


# ----------------------------------------------------------------- 3. stale temporary stage directories go
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("stage", ["train/sasrec", "data"])
def test_stage_runner_removes_temporary_dirs_of_dead_runs_only(tmp_path, stage):
    from recpipe.artifacts import run_stage

    stage_dir = tmp_path / "run" / stage
    stage_dir.parent.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        dead = stage_dir.parent / f".{stage_dir.name}.tmp-{_dead_pid()}"  # what a killed run leaves
        alive = stage_dir.parent / f".{stage_dir.name}.tmp-{live.pid}"  # another run still at work
        other = stage_dir.parent / f".other.tmp-{_dead_pid()}"  # another stage's: its runner cleans it
        for d in (dead, alive, other):
            d.mkdir()
        run_stage(tmp_path / "run", stage, {"a": 1}, {}, lambda out: (out / "x.json").write_text("{}") and None)
        assert not dead.exists() and alive.exists() and other.exists()
        dead.mkdir()  # left again: an up-to-date re-run, which builds nothing, removes it as well
        assert run_stage(tmp_path / "run", stage, {"a": 1}, {}, lambda out: None).skipped
        assert not dead.exists() and alive.exists()
    finally:
        live.kill()
        live.wait()


# ------------------------------------------------------------------- 4. a stop says what it kept, and resumes
class _Cli:
    """`recpipe train` in a subprocess, its stderr read line by line as it comes."""

    def __init__(self, settings: dict, cwd: Path):
        args = [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
        self.argv = ["train", *args]
        self.proc = subprocess.Popen([sys.executable, "-m", "recpipe.cli", *self.argv], cwd=cwd, text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str) -> re.Match:
        while True:
            line = self._queue.get(timeout=600)  # only a guard against a hung run
            assert line is not None, f"ended without {pattern!r}: {self.lines}"
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=600)
        while (line := self._queue.get(timeout=600)) is not None:
            self.lines.append(line)
        return rc


def test_sigterm_or_ctrl_c_stops_train_with_one_line_and_the_command_that_resumes(tmp_path):
    _build(tmp_path)
    settings = _settings(tmp_path, **{"train.epochs": 10_000, "train.patience": 10_000, "train.eval_every": 5})
    _cfg(tmp_path, **{"train.epochs": 10_000, "train.patience": 10_000, "train.eval_every": 5})  # the data stage
    run = _Cli(settings, tmp_path)
    run.wait_for(r"^step \d+: loss")  # training is under way, past its first validation
    assert run.stop() == 143, run.lines
    assert not [x for x in run.lines if "Traceback" in x], run.lines
    stopped = r"train/sasrec: stopped at step (\d+); saved its state in (\S+), from which the same command resumes$"
    saved = [int(m.group(1)) for x in run.lines if (m := re.match(stopped, x))]
    assert len(saved) == 1 and saved[0] >= 5, run.lines
    last = run.lines[-1]
    assert last.startswith("stopped by SIGTERM: finished work is kept"), run.lines
    assert "`recpipe train --set" in last and last.endswith("continues from there"), last

    again = _Cli(settings, tmp_path)
    assert int(again.wait_for(r"resuming at step (\d+)").group(1)) == saved[0]
    assert again.stop(signal.SIGINT) == 130, again.lines  # Ctrl-C: the same, with the shell's code for SIGINT
    assert again.lines[-1].startswith("stopped by SIGINT: finished work is kept"), again.lines


# ------------------------------------------------------------------------------------ 5. progress that is true
def test_progress_after_the_last_validation_shows_its_best_and_the_guidance_sweep_shows_progress(
        tmp_path, capsys, monkeypatch):
    _build(tmp_path)
    cfg = _cfg(tmp_path, **{"train.epochs": 1, "train.guidance_grid": "1,3", **MODELS["dreamrec"],
                            "train.model": "dreamrec"})  # one validation, after the last step; then the sweep
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # off a terminal: a plain line at every update
    capsys.readouterr()
    res = T.run(cfg, log=lambda m: None, progress=True)
    out = capsys.readouterr().out
    best = res.manifest.info["valid"]["masked"]["NDCG@10"]
    assert best > 0
    shown = re.findall(r"^train dreamrec: \d+/\d+ loss \S+ best (\S+)", out, flags=re.M)
    trained = json.loads((res.stage_dir / "log.jsonl").read_text().splitlines()[-1])["valid"]["masked"]["NDCG@10"]
    assert shown and shown[-1] == f"{trained:.4f}", shown[-3:]
    for i, w in enumerate(["1", "3"], start=1):
        assert re.search(rf"^evaluate guidance w={w} \({i}/2\): [\d,]+/\d+ users", out, flags=re.M), out[-1500:]


# ------------------------------------------------------------------------------ 5b. a wall-clock budget
def test_minutes_budget_stops_training_validates_and_keeps_the_default_fingerprint(tmp_path, monkeypatch):
    """train.max_minutes counts training time only: a fake clock that moves 1 s per reading and a 0.1-minute
    budget stop the run after a few steps, with the last step validated and saved."""
    import types

    clock = {"t": 0.0}

    def tick() -> float:
        clock["t"] += 1.0
        return clock["t"]

    monkeypatch.setattr(T, "time", types.SimpleNamespace(perf_counter=tick, monotonic=tick))
    full = 3 * 8  # 3 epochs of 8 steps
    _build(tmp_path)
    cfg = _cfg(tmp_path, **{"train.max_minutes": 0.1, "train.save_every_s": 1e9})
    _, log = _trained(cfg)
    last = log[-1]
    assert 1 <= last["step"] < full, log
    assert 6.0 <= last["train_time_s"] < 6.0 + 3 * full, last  # stopped on the first step past 6 s
    assert "max_minutes" in T.train_config_dict(cfg, "sasrec")["train"]
    assert "max_minutes" not in T.train_config_dict(_cfg(tmp_path), "sasrec")["train"], \
        "an unbudgeted run keeps the fingerprint it had before the option existed"


def test_a_larger_budget_or_patience_continues_the_stopped_run(tmp_path, monkeypatch):
    """A run stopped by its budget, given a larger one, resumes from its own state (same work directory) and
    keeps its validations; a run stopped by its patience continues the same way under a larger patience."""
    import types

    clock = {"t": 0.0}

    def tick() -> float:
        clock["t"] += 1.0
        return clock["t"]

    monkeypatch.setattr(T, "time", types.SimpleNamespace(perf_counter=tick, monotonic=tick))
    _build(tmp_path)
    short = _cfg(tmp_path, **{"train.max_minutes": 0.1, "train.save_every_s": 1e9, "train.eval_every": 2})
    _, first = _trained(short)
    longer = _cfg(tmp_path, **{"train.max_minutes": 0.3, "train.save_every_s": 1e9, "train.eval_every": 2})
    assert _work(short) == _work(longer)
    said: list[str] = []
    _, second = _trained(longer, log=said.append)
    assert any(f"resuming at step {first[-1]['step']}" in m for m in said), said
    assert any("a larger budget or patience continues it" in m for m in said), said
    assert second[:len(first)] == first, "the first sitting's validations are kept as they were"
    assert second[-1]["step"] > first[-1]["step"] and second[-1]["train_time_s"] >= 18.0, second[-1]
    # the same budget again: the stage is current, nothing trains
    said.clear()
    _, again = _trained(longer, log=said.append)
    assert again == second and not any("resuming" in m for m in said), said
    # patience: 1 validation without a better NDCG@10 stops it; a patience of 30 continues the same state
    stall = {"train.patience": 1, "train.eval_every": 1, "train.save_every_s": 1e9, "train.lr": 1e-9}
    _, p1 = _trained(_cfg(tmp_path, **stall))
    assert p1[-1]["step"] < 3 * 8, "an lr of 1e-9 never improves: patience 1 stops it early"
    said.clear()
    _, p30 = _trained(_cfg(tmp_path, **{**stall, "train.patience": 30}), log=said.append)
    assert p30[:len(p1)] == p1 and p30[-1]["step"] == 3 * 8, p30[-1]
    assert any(f"resuming at step {p1[-1]['step']}" in m for m in said), said


def test_bfloat16_precision_autocasts_the_training_forward_only(tmp_path, monkeypatch):
    """train.precision = bfloat16: the training forward's matrix products run in bf16, the weights stay float32,
    validation runs in float32; float32 (the default) stays out of the fingerprint."""
    import torch

    from recpipe.models.sasrec import SASRec

    _build(tmp_path)
    dtypes: dict[str, set] = {"loss": set(), "score_all": set()}

    def spying(name):
        real = getattr(SASRec, name)

        def spy(self, *a, **kw):
            lin = next(m for m in self.modules() if isinstance(m, torch.nn.Linear))
            hook = lin.register_forward_hook(lambda m, i, o: dtypes[name].add(o.dtype))
            try:
                return real(self, *a, **kw)
            finally:
                hook.remove()
        return spy

    for name in dtypes:
        monkeypatch.setattr(SASRec, name, spying(name))
    cfg = _cfg(tmp_path, **{"train.precision": "bfloat16", "train.epochs": 1})
    said: list[str] = []
    weights, log = _trained(cfg, log=said.append)
    assert dtypes == {"loss": {torch.bfloat16}, "score_all": {torch.float32}}, dtypes
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert any("bfloat16 autocast" in m for m in said), said
    assert log[-1]["valid"]["masked"]["NDCG@10"] > 0
    assert T.train_config_dict(cfg, "sasrec")["train"]["precision"] == "bfloat16"
    assert "precision" not in T.train_config_dict(_cfg(tmp_path), "sasrec")["train"]


# ------------------------------------------------------------------------------ 6. bad train settings, one line
@pytest.mark.parametrize("args, message", [
    (["--lr", "nan"], "error: train.lr must be a number > 0, not nan"),
    (["--lr", "-1"], "error: train.lr must be a number > 0, not -1.0"),
    (["--max-steps", "-5"], "error: train.max_steps must be >= 0 (0 = no limit), not -5"),
    (["--set", "train.ema=1"], "error: train.ema must be >= 0 (0 = off) and < 1, not 1.0"),
    (["--set", "train.patience=0"], "error: train.patience must be >= 1, not 0"),
    (["--minutes", "0"], "error: train.max_minutes must be > 0, not 0.0"),
    (["--set", "train.save_every_s=-1"], "error: train.save_every_s must be >= 0 seconds"),
])
def test_bad_train_settings_are_one_line_errors(tmp_path, args, message):
    r = subprocess.run([sys.executable, "-m", "recpipe.cli", "train", "--dataset", "toy", *args], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith(message) and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "cache").exists(), "nothing ran"


def test_ema_averages_trained_parameters_and_holds_buffers_live():
    """The EMA shadow averages what the optimiser trains; buffers and frozen parameters (a frozen item table) are
    the model's own tensors, neither averaged nor copied, so a change to them shows at once."""
    import torch

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(3))
            self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)
            self.register_buffer("table", torch.ones(4, 2))

    m = M()
    ema = T.EMA(m, decay=0.5)
    def live(k):
        return ema.shadow[k].data_ptr() == getattr(m, k).data_ptr()

    assert live("table") and live("frozen") and not live("w")
    with torch.no_grad():
        m.w.fill_(1.0)
        m.table.mul_(3.0)
    ema.update(m)  # decay min(0.5, 2/11): the shadow moves 9/11 of the way
    torch.testing.assert_close(ema.shadow["w"], torch.full((3,), 9 / 11))
    assert torch.equal(ema.shadow["table"], torch.full((4, 2), 3.0))
    ema.shadow["table"] = ema.shadow["table"].clone()  # as after a resume: a stale copy
    with torch.no_grad():
        m.table.add_(1.0)
    ema.update(m)
    assert live("table") and torch.equal(ema.shadow["table"], torch.full((4, 2), 4.0))
