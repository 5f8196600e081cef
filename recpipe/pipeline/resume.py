"""The trainer's resumable state: one safetensors file that a re-run continues from, and the guard that lets
Ctrl-C / SIGTERM stop a run only between steps, so that the state saved on the way out is whole.

The file holds the weights, AdamW moments, EMA and best weights, step counters and every random state
(tensors, with the rest as JSON in its header). Never a pickle: a planted file runs no code.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recpipe.artifacts import atomic_path

STATE_FILE = "state.safetensors"
LEGACY_STATE_FILE = "state.pt"  # a pickle: never loaded, since unpickling a planted file runs its code
STATE_FORMAT = "recpipe-train-state/1"


class UnusableState(Exception):
    """A resume state file that cannot be used (unreadable, foreign or of another run); training starts over."""


def write_resume_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """One safetensors file: the tensors (model, optimizer moments, EMA, best weights, RNG states) and, in its
    header metadata, the JSON of everything else. One file, so one atomic rename keeps both halves in step."""
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share memory (tied weights), and .cpu() of a CPU tensor is itself
    flat = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata={"format": STATE_FORMAT, "state": json.dumps(meta, default=_plain)})


def read_resume_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a state written by write_resume_state; UnusableState (one line) for anything else.
    safetensors and JSON only parse data, so a crafted file cannot run code here."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("format") != STATE_FORMAT:
                raise UnusableState("not a recpipe train state")
            meta = json.loads(md["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
        raise UnusableState(_one_line(e)) from None
    if not isinstance(meta, dict):
        raise UnusableState("its metadata is not a JSON object")
    return tensors, meta


def _plain(o: Any) -> Any:
    """JSON for numpy scalars (validation metrics may be numpy floats)."""
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:120]}" if text else type(e).__name__


def _split(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def _prefixed(prefix: str, d: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in d.items()}


def flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state_dict as (tensors named "<param index>.<key>", JSON: param groups and scalars)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for idx, s in sd["state"].items():
        for k, v in s.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, v in [*tensors.items(), *meta["scalars"].items()]:
        idx, k = name.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_snapshot(device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The global random states training draws from (torch's drives dropout), as tensors and JSON lists."""
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    return tensors, {"numpy": [name, keys.tolist(), pos, has_gauss, gauss],
                     "python": [version, list(py_state), py_gauss]}


def rng_restore(tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    name, keys, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, py_state, py_gauss = meta["python"]
    random.setstate((version, tuple(py_state), py_gauss))


_ST_KEYS = ("step", "epoch", "batch_in_epoch", "best", "best_step", "bad", "done", "train_time", "log")


def pack_state(run_id: str, model: torch.nn.Module, opt: torch.optim.Optimizer, ema: Any | None,
               best_state: dict[str, torch.Tensor] | None, st: dict[str, Any], gen: torch.Generator,
               losses: list[float], device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Everything a resumed run needs to continue exactly as an uninterrupted one would, as (tensors, JSON)."""
    opt_t, opt_meta = flatten_optimizer(opt.state_dict())
    rng_t, rng_meta = rng_snapshot(device)
    tensors = {**_prefixed("model", model.state_dict()), **_prefixed("opt", opt_t), **_prefixed("rng", rng_t),
               "rng.gen": gen.get_state()}
    if ema is not None:
        tensors.update(_prefixed("ema", ema.shadow))
    if best_state is not None:
        tensors.update(_prefixed("best", best_state))
    meta = {"run": run_id, "st": st, "opt": opt_meta, "rng": rng_meta, "has_best": best_state is not None,
            "ema_updates": ema.updates if ema is not None else 0, "losses": losses}
    return tensors, meta


def unpack_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], run_id: str, model: torch.nn.Module,
                 opt: torch.optim.Optimizer, ema: Any | None, gen: torch.Generator, device: torch.device
                 ) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None, list[float]]:
    """Load a packed state into model, optimizer, EMA and generators; returns (st, best_state, losses).
    UnusableState if it belongs to another run or does not fit the model; then nothing is changed."""
    if meta.get("run") != run_id:
        raise UnusableState("written by another run (other settings or inputs)")
    st = meta.get("st")
    if not isinstance(st, dict) or not all(k in st for k in _ST_KEYS):
        raise UnusableState("its step counters are incomplete")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    ema_sd = _split(tensors, "ema") if ema is not None else None
    best = _split(tensors, "best") if meta.get("has_best") else None
    for name, sd in (("model", _split(tensors, "model")), ("EMA", ema_sd), ("best", best)):
        if sd is not None and {k: v.shape for k, v in sd.items()} != shapes:
            raise UnusableState(f"its {name} weights do not fit this model")
    opt_sd = unflatten_optimizer(_split(tensors, "opt"), meta["opt"])
    params = [p for g in opt.param_groups for p in g["params"]]
    for idx, s in opt_sd["state"].items():
        if not 0 <= idx < len(params) or any(torch.is_tensor(v) and v.dim() and v.shape != params[idx].shape
                                             for v in s.values()):
            raise UnusableState("its optimizer state does not fit this model")
    before = ({k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict(), gen.get_state(),
              rng_snapshot(device))
    try:
        model.load_state_dict(_split(tensors, "model"))
        opt.load_state_dict(opt_sd)
        gen.set_state(tensors["rng.gen"])
        rng_restore(_split(tensors, "rng"), meta["rng"], device)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
        model.load_state_dict(before[0])
        opt.load_state_dict(before[1])
        gen.set_state(before[2])
        rng_restore(*before[3], device)
        raise UnusableState(_one_line(e)) from None
    if ema is not None:
        ema.shadow = {k: v.to(device) for k, v in ema_sd.items()}
        ema.updates = int(meta.get("ema_updates", st["step"]))
    best = {k: v.to(device) for k, v in best.items()} if best is not None else None
    return st, best, [float(x) for x in meta.get("losses", [])]

class StopGuard:
    """Holds Ctrl-C / SIGTERM while the training state changes (a step, a save), so that a stop lands between
    steps and the state saved on the way out is one the run really passed through; anywhere else a stop
    raises at once. Only handlers that raise are wrapped (SIGINT's default, the CLI's); with SIG_DFL a
    SIGTERM still ends the process outright, and the last saved state is what a re-run resumes."""

    def __init__(self):
        self.depth = 0
        self.pending: tuple[int, Any] | None = None
        self._old: dict[int, Callable] = {}

    def __enter__(self) -> StopGuard:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                old = signal.getsignal(sig)
                if callable(old):
                    self._old[sig] = old
                    signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.depth:
            self.pending = (signum, frame)
        else:
            self._old[signum](signum, frame)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None:
            (signum, frame), self.pending = self.pending, None
            self._old[signum](signum, frame)


__all__ = ["STATE_FILE", "LEGACY_STATE_FILE", "UnusableState", "write_resume_state", "read_resume_state",
           "pack_state", "unpack_state", "StopGuard"]
