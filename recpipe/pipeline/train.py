"""Train stage: any registered model on the data stage's split, with model selection on validation only.

- Prerequisites: the data stage; for text models the whiten stage, which this stage runs itself (it is
  skipped when current).
- Batches follow the model's `train_mode` (recpipe.pipeline.batches).
- AdamW, linear warm-up then cosine decay, gradient clipping, EMA weights (used for validation and saved).
- Validation every `eval_every` steps (default once per epoch) on the validation split, seen items masked,
  early stopping on NDCG@10 (masked, or unmasked with `train.select`). The test split is never read here.
- Resumable: the full training state (recpipe.pipeline.resume) is saved to
  `<run_dir>/work/train-<model>-<fingerprint>/state.safetensors` at every validation, every
  `train.save_every_s` seconds and when Ctrl-C / SIGTERM stops the run; a re-run with the same config resumes
  from it mid-epoch and ends with the weights an unbroken run gets.
- Output `<run_dir>/train/<model>/`: model.safetensors + config.json (recpipe.pipeline.bundle writes and reads
  them), log.jsonl (losses and validation metrics), valid.json (the best validation metrics).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recpipe.artifacts import (
    StageResult,
    atomic_path,
    fingerprint_obj,
    require_stage,
    run_stage,
    write_json,
)
from recpipe.config import Config, TrainConfig, check_model_name, to_dict
from recpipe.errors import ArtifactError, ConfigError, Stopped
from recpipe.models.base import Recommender, config_key
from recpipe.pipeline import data as data_stage
from recpipe.pipeline import distributed, whiten
from recpipe.pipeline.batches import Batcher, batch_targets, iterate_training, n_batches, targets_per_batch
from recpipe.pipeline.bundle import WHITEN_HINT, make_model, needs_text, reads_text, save_checkpoint
from recpipe.pipeline.intents import CategoryIntents, IntentSampler, category_intents
from recpipe.pipeline.resume import (
    LEGACY_STATE_FILE,
    STATE_FILE,
    StopGuard,
    UnusableState,
    pack_state,
    read_resume_state,
    unpack_state,
    write_resume_state,
)
from recpipe.pipeline.scoring import evaluate_split, resolve_device, resolve_dtype
from recpipe.progress import progress_bar


# ---------------------------------------------------------------------------------------------- helpers
class EMA:
    """Exponential moving average of the trained parameters, swapped in for evaluation. Buffers and frozen
    parameters (iDreamRec's item table: (items + 1) x 384 floats) are not averaged or copied: the shadow
    holds the live tensors, which at 430k items saved two thirds of a step and a second copy of the table."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.trained = {k for k, p in model.named_parameters() if p.requires_grad}
        self.shadow = {k: v.detach().clone() if k in self.trained else v
                       for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        # warm-up of the decay ((1 + n) / (10 + n), as in TF's ExponentialMovingAverage with num_updates):
        # early on the average follows the weights closely instead of staying near the initialisation
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if k in self.trained:
                self.shadow[k].lerp_(v, 1.0 - decay)
            else:
                self.shadow[k] = v  # the live buffer (a resumed shadow's stale copy is replaced here)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    prog = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))  # cosine to 10% of lr


# ---------------------------------------------------------------------------------------------- training
@dataclasses.dataclass
class TrainInputs:
    ds: data_stage.Dataset
    item_vectors: np.ndarray | None
    intent_vectors: np.ndarray | None
    fingerprints: dict[str, str]
    text_info: dict[str, Any]
    categories: CategoryIntents | None = None  # train.intent_source = category | mixed


def gather_inputs(cfg: Config, model_name: str) -> TrainInputs:
    run_dir = cfg.run_dir
    dm = require_stage(run_dir, "data", hint="recpipe data")
    ds = data_stage.load_run(run_dir)
    fps = {"data": dm.fingerprint}
    iv = itv = cats = None
    info: dict[str, Any] = {}
    if reads_text(model_name, cfg.model_config(model_name)):
        text = whiten.load(run_dir, hint=WHITEN_HINT)
        iv, info = text.items, text.info
        fps["whiten"] = text.fingerprint
        if iv.shape[0] != ds.n_items + 1:
            raise ArtifactError(
                f"the whiten stage: vectors for {iv.shape[0] - 1} items but the data stage has {ds.n_items}; "
                "re-run `recpipe embed` and `recpipe train`"
            )
    if needs_text(model_name):
        itv = text.intent_vectors()
        if cfg.train.intent_source == "mixed" and itv is None:  # before loading the TEM for the categories
            raise ConfigError("train.intent_source=mixed needs the describe stage's intentions "
                              "(describe.intents=true); use train.intent_source=category")
        if cfg.train.intent_source != "llm" and cfg.train.intent_prob > 0:
            cats = category_intents(cfg, ds, text.whitening)
            fps["embed"] = require_stage(run_dir, "embed", hint="recpipe embed").fingerprint  # the TEM embeds them
    return TrainInputs(ds, iv, itv, fps, info, cats)


def trajectory_key(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a train config that decides the weights at every step: all of it but the stop rules and
    the guidance sweep that follows training (a finished run given a guidance grid resumes and only sweeps)."""
    tc = {k: v for k, v in config["train"].items()
          if k not in ("max_minutes", "patience", "guidance_grid", "new_bias_grid")}
    return {**config, "train": tc}


def finished(st: dict[str, Any], tc: TrainConfig) -> bool:
    """Whether a saved state has met this config's stop rules (a resumed run may have been given more)."""
    return (st["bad"] >= tc.patience or st["epoch"] >= tc.epochs
            or bool(tc.max_steps) and st["step"] >= tc.max_steps
            or tc.max_minutes is not None and st["train_time"] >= 60.0 * tc.max_minutes)


def train_config_dict(cfg: Config, model_name: str) -> dict[str, Any]:
    mcfg = cfg.model_config(model_name)
    tc = to_dict(cfg.train)
    tc.pop("threads")
    tc.pop("device")  # where it runs does not change what it computes (within float tolerance)
    tc.pop("save_every_s")  # nor does how often its resume state is saved
    out = {"model": model_name, "model_config": config_key(mcfg), "train": tc, "seed": cfg.run.seed}
    # an option left at its default is left out, so adding an option never re-runs the runs that do not use it
    if not tc["guidance_grid"]:
        tc.pop("guidance_grid")
    if not tc["new_bias_grid"]:
        tc.pop("new_bias_grid")
    if not tc["length_pool"]:
        tc.pop("length_pool")
    if tc["max_minutes"] is None:
        tc.pop("max_minutes")
    if tc["precision"] == "float32":
        tc.pop("precision")
    if tc["select"] == "masked":
        tc.pop("select")
    if tc["intent_source"] == "llm":
        tc.pop("intent_source")
    elif needs_text(model_name):
        out["intent_categories"] = {"column": cfg.evaluate.category_column,
                                    "template": cfg.evaluate.category_template}
    return out


def run(cfg: Config, model_name: str | None = None, force: bool = False, log=print, progress: bool = True
        ) -> StageResult | None:
    """Train (or skip, when current) one model. Under torchrun (recpipe.pipeline.distributed) every process
    calls this; rank 0 writes the stage and returns its result, the other ranks train silently and get None."""
    model_name = model_name or cfg.train.model
    check_model_name(model_name)
    dist = distributed.setup(resolve_device(cfg.train.device))
    if dist is not None and not dist.main:
        log, progress = (lambda m: None), False
    if reads_text(model_name, cfg.model_config(model_name)):  # the whitened item table it is built on
        if dist is None or dist.main:
            whiten.run(cfg, log=log)
        if dist is not None:
            dist.barrier()  # the other ranks read what rank 0 wrote
    inputs = gather_inputs(cfg, model_name)
    config = train_config_dict(cfg, model_name)

    def build(out_dir: Path) -> dict[str, Any]:
        if dist is not None:
            dist.broadcast_int(1)  # rank 0 trains: so do the others
        return _train(cfg, model_name, inputs, config, out_dir, log=log, progress=progress, dist=dist)

    if dist is not None and not dist.main:
        if dist.broadcast_int(0):  # rank 0's decision: 0 = its stage is up to date, nothing to train
            _train(cfg, model_name, inputs, config, None, log=log, progress=False, dist=dist)
        return None
    res = run_stage(cfg.run_dir, f"train/{model_name}", config, inputs.fingerprints, build, force=force, log=log)
    if dist is not None and res.skipped:
        dist.broadcast_int(0)
    return res


class _Loss(torch.nn.Module):
    """The model's training loss as a forward(), which is what DistributedDataParallel wraps."""

    def __init__(self, model: Recommender):
        super().__init__()
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        # a step may leave parameters out (no intention, a dropped history); their zero-weighted first entries
        # put every parameter in the graph, so DDP's reducer needs no search for unused ones each step
        loss = self.model.loss(batch, generator=generator)
        return loss + sum(p.view(-1)[0] for p in self.trainable) * 0.0


def _rank_seed(seed: int, rank: int, step: int) -> int:
    """The random stream of rank > 0 (rank 0 keeps the run's own): its noise and dropout draws differ from the
    other ranks', and after a resume it restarts from where the run is."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _train(cfg: Config, model_name: str, inp: TrainInputs, config: dict, out_dir: Path | None, log,
           progress: bool, dist: distributed.Dist | None = None) -> dict[str, Any]:
    """out_dir None: a rank > 0 of a distributed run, which writes nothing."""
    tc = cfg.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    if dist is not None:
        device = dist.device_of()
    seed = cfg.run.seed
    torch.manual_seed(seed)
    mcfg = cfg.model_config(model_name)
    model = make_model(model_name, mcfg, inp.ds.n_items, inp.item_vectors).to(device)
    if tc.guidance_grid:
        check_guidance(model, mcfg, model_name)  # before any training, not after it
    if tc.new_bias_grid:
        check_new_bias(mcfg, model_name)
    b = Batcher(inp.ds, model.history_len, stride=getattr(model, "stride", None))
    model.observe_training(torch.from_numpy(b.train_item_counts()).to(device),
                           torch.from_numpy(b.train_item_first_seen()).to(device))
    mode = model.train_mode
    intents = None  # IntentSampler: an intention for a share (intent_prob) of the training targets
    if model.uses_intent and tc.intent_prob > 0:
        if tc.intent_source == "llm" and inp.intent_vectors is not None:
            intents = IntentSampler("llm", inp.intent_vectors, None, device)
        elif tc.intent_source != "llm" and inp.categories is not None:
            intents = IntentSampler(tc.intent_source, inp.intent_vectors, inp.categories, device)
            log(f"train/{model_name}: {tc.intent_source} intentions, {len(inp.categories.texts)} categories "
                f"(e.g. {inp.categories.texts[0]!r})")

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr)
    ema = EMA(model, tc.ema) if tc.ema > 0 else None
    window = model.window or 0
    chunked = model.chunked
    per_epoch = n_batches(b, mode, tc.batch_size, window, chunked)
    total = tc.epochs * per_epoch if not tc.max_steps else min(tc.max_steps, tc.epochs * per_epoch)
    eval_every = tc.eval_every or per_epoch
    rng = np.random.default_rng([seed, 7])
    val_users = np.arange(inp.ds.n_users)
    if tc.eval_users and tc.eval_users < len(val_users):
        val_users = np.sort(rng.choice(val_users, tc.eval_users, replace=False))

    # The wall-clock budget and the patience only decide where a run stops, not the path it takes (the
    # learning-rate schedule follows epochs and max_steps): a run given more of either resumes its own state.
    run_id = fingerprint_obj([trajectory_key(config), inp.fingerprints])
    work = cfg.run_dir / "work" / f"train-{model_name}-{run_id}"
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / STATE_FILE
    st = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best": -1.0, "best_step": -1, "bad": 0, "done": False,
          "train_time": 0.0, "log": []}
    best_state: dict[str, torch.Tensor] | None = None
    losses: list[float] = []
    gen = torch.Generator(device=device).manual_seed(seed)
    if state_path.exists():
        try:
            st, best_state, losses = unpack_state(*read_resume_state(state_path), run_id, model, opt, ema, gen,
                                                  device)
            log(f"train/{model_name}: resuming at step {st['step']} (epoch {st['epoch'] + 1}) from {state_path}")
            if st["done"] and not finished(st, tc):
                st["done"] = False
                log(f"train/{model_name}: the run had stopped ({st['train_time'] / 60:.1f} min trained, "
                    f"{st['bad']} validations without a better NDCG@10); a larger budget or patience continues it")
        except UnusableState as e:  # the state is only a shortcut: without it, training starts over
            log(f"train/{model_name}: ignoring resume state {state_path} ({e}); starting from step 0")
    elif (work / LEGACY_STATE_FILE).exists():
        log(f"train/{model_name}: ignoring {work / LEGACY_STATE_FILE} (a pickle, which recpipe never loads: "
            "unpickling can run code); starting from step 0")

    ddp = None
    if dist is not None:
        # every process resumes from rank 0's state: a run directory that some node does not share would give
        # its processes other optimiser moments and other batches, silently
        step0 = dist.broadcast_int(st["step"])
        off = int(dist.all_reduce_sum(torch.tensor([float(step0 != st["step"])], dtype=torch.float64))[0])
        if off:
            raise ConfigError(f"train/{model_name}: {off} of {dist.world} processes found another resume state "
                              f"than process 0 (step {step0}) in {work}: every node must see the same run "
                              "directory (a shared filesystem for --run-dir)")
        if not dist.main:
            gen.manual_seed(_rank_seed(seed, dist.rank, st["step"]))
            torch.manual_seed(_rank_seed(seed, dist.rank, st["step"]) + 1)
        # buffers (the frozen item table) are the same on every rank by construction: not re-sent every step
        ddp = torch.nn.parallel.DistributedDataParallel(
            _Loss(model), device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False)
    checked_at = st["log"][-1]["step"] if st["log"] else -1

    guard = StopGuard()
    last_save = time.monotonic()

    def save_state() -> None:
        nonlocal last_save
        if dist is not None and not dist.main:
            return  # rank 0 alone keeps the state
        keep = max(eval_every, 50)  # the losses a validation entry and the progress line average over
        with guard.hold():
            write_resume_state(state_path, *pack_state(run_id, model, opt, ema, best_state, st, gen, losses[-keep:],
                                                       device))
            (work / LEGACY_STATE_FILE).unlink(missing_ok=True)  # superseded; it would only be warned about again
        last_save = time.monotonic()

    def valid_metrics(m: Recommender, score_kwargs: dict | None = None, label: str = "") -> dict[str, Any]:
        """Model selection's metrics: the validation users (all, or train.eval_users of them), @10 and @20."""
        return evaluate_split(m, b, "valid", [10, 20], batch_size=cfg.evaluate.batch_size, users=val_users,
                              device=device, score_kwargs=score_kwargs, seed=seed, progress=label)

    def validate() -> dict[str, Any]:
        # forked: validation draws nothing from the random stream training continues with (building the EMA
        # model initialises weights), so a run resumed after a validation draws what an unbroken one draws
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            eval_model = model
            if ema is not None:
                eval_model = make_model(model_name, mcfg, inp.ds.n_items, inp.item_vectors).to(device)
                eval_model.load_state_dict(ema.shadow)
            return valid_metrics(eval_model)

    def check(final: bool) -> None:
        """Validate, keep the best EMA weights, decide on early stopping, save the resumable state. A stop
        during validation saves the state with `check_due` set: the resumed run validates this step first.
        Distributed: rank 0 does all of it, the others take its stop decision."""
        nonlocal checked_at
        checked_at = st["step"]
        if dist is not None and not dist.main:
            st["done"] = bool(dist.broadcast_int(0))
            return
        st["check_due"] = final
        res = validate()
        with guard.hold():
            record(res, final)
            st["check_due"] = None
            save_state()
        if dist is not None:
            dist.broadcast_int(int(st["done"]))

    def record(res: dict[str, Any], final: bool) -> None:
        nonlocal best_state
        ndcg = res[tc.select]["NDCG@10"]
        recent = losses[-eval_every:] or [float("nan")]
        entry = {"step": st["step"], "epoch": st["epoch"] + st["batch_in_epoch"] / per_epoch,
                 "loss": float(np.mean(recent)), "valid": res, "train_time_s": round(st["train_time"], 2)}
        st["log"].append(entry)
        log(f"step {st['step']}: loss {entry['loss']:.4f}  valid NDCG@10 {res['masked']['NDCG@10']:.4f} "
            f"(unmasked {res['unmasked']['NDCG@10']:.4f})  HR@10 {res['masked']['HR@10']:.4f}")
        if ndcg > st["best"]:
            st["best"], st["best_step"], st["bad"] = ndcg, st["step"], 0
            src = ema.shadow if ema is not None else model.state_dict()
            best_state = {k: v.detach().clone() for k, v in src.items()}
        else:
            st["bad"] += 1
            if st["bad"] >= tc.patience:
                log(f"early stop: no better validation NDCG@10 ({tc.select}) for {tc.patience} validations")
                st["done"] = True
        if final:
            st["done"] = True

    # Sequence and window batches hold a variable number of targets and a model's loss is their mean. A plain
    # shuffle mixes lengths, so each batch has about the same count; length-pooled batches do not (128 short
    # rows hold ~5 targets each, 128 long ones ~L), which would weigh the targets of short histories up.
    # Scaling each batch's loss by its targets / the pass's mean per batch restores one weight per target.
    per_batch_targets = 0.0
    if tc.length_pool and mode in ("sequence", "window"):
        per_batch_targets = targets_per_batch(b, mode, tc.batch_size, window, chunked)

    def non_finite(value: float) -> ArtifactError:
        return ArtifactError(f"train/{model_name}: loss became {value} at step {st['step']}; "
                             "lower train.lr or check the input vectors")

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bfloat16")

    def train_step(batch: dict[str, torch.Tensor], over_budget: bool = False) -> bool:
        """One optimiser step; returns the distributed run's shared stop flag (rank 0's over_budget)."""
        distributed.maybe_fault(dist, st["step"])
        n_local = batch_targets(batch) if dist is not None else 0
        if intents is not None:
            tgt = batch["target"].to(device)
            batch["intent"], ok = intents(tgt, gen)
            batch["intent_mask"] = (torch.rand(tuple(tgt.shape), generator=gen, device=device)
                                    < tc.intent_prob) & ok
        batch = {k: v.to(device) for k, v in batch.items() if not k.startswith("_")}
        for g in opt.param_groups:
            g["lr"] = lr_at(st["step"], total, tc)
        stop = False
        opt.zero_grad(set_to_none=True)
        if dist is None:
            with autocast():
                loss = model.loss(batch, generator=gen)
            if not torch.isfinite(loss):
                raise non_finite(loss.item())
            if per_batch_targets:
                (loss * batch_targets(batch) / per_batch_targets).backward()
            else:
                loss.backward()
            loss_value = loss.item()
        else:
            # DDP averages the ranks' gradients of loss x own targets; rescaled by world / all targets, that is
            # the gradient of the mean over the global batch's targets, as one process computes it
            with autocast():
                loss = ddp(batch, gen)
            distributed.guarded(dist, lambda: (loss * n_local).backward())
            stats = dist.all_reduce_sum(torch.tensor([loss.item() * n_local, n_local, float(over_budget)],
                                                     dtype=torch.float64))
            n_all = max(float(stats[1]), 1.0)
            loss_value = float(stats[0]) / n_all
            if not math.isfinite(loss_value):
                raise non_finite(loss_value)
            scale = dist.world / (per_batch_targets or n_all)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(scale)
            stop = bool(stats[2] > 0)
        if tc.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model)
        st["step"] += 1
        st["batch_in_epoch"] += 1
        losses.append(loss_value)
        return stop

    def status() -> str:
        loss = f"{np.mean(losses[-50:]):.4f}" if losses else "-"
        return f"loss {loss} best {max(st['best'], 0):.4f}"

    def spent(t_epoch: float) -> bool:
        """The wall-clock budget is used up (training time only: t_epoch is when the current stretch began)."""
        return tc.max_minutes is not None and (
            st["train_time"] + time.perf_counter() - t_epoch >= 60.0 * tc.max_minutes)

    n_params = model.num_parameters()
    log(f"train/{model_name}: {n_params:,} parameters, {mode} batches, {per_epoch} steps/epoch, up to {total} "
        f"steps on {device}")
    if tc.precision == "bfloat16":
        native = resolve_dtype("auto", device) == torch.bfloat16
        log(f"train/{model_name}: bfloat16 autocast" + ("" if native else
            " (this device has no native bf16: expect slower steps than float32)"))
    if dist is not None:
        log(f"train/{model_name}: {dist.world} processes ({dist.backend}); effective batch {tc.batch_size} "
            f"(about {tc.batch_size / dist.world:g} a process), every sample once a pass")
    model.train()
    with guard, progress_bar("[bold]train[/] {task.description}", "{task.fields[info]}", disable=not progress) as bar:
        task = bar.add_task(model_name, total=total, completed=st["step"], info=status())
        try:
            if st.get("check_due") is not None:  # the validation a stopped run did not finish
                check(st["check_due"])
            while not st["done"] and st["epoch"] < tc.epochs:
                t_epoch = time.perf_counter()
                for batch in iterate_training(b, mode, tc.batch_size, st["epoch"], seed, skip=st["batch_in_epoch"],
                                              window=window, chunked=chunked, length_pool=tc.length_pool,
                                              rank=dist.rank if dist else 0, world=dist.world if dist else 1):
                    with guard.hold():
                        # distributed: rank 0's clock, read before the step, decides for every rank
                        shared_stop = train_step(batch, dist is not None and dist.main and spent(t_epoch))
                        bar.update(task, advance=1, info=status())
                    stop_now = (bool(tc.max_steps) and st["step"] >= tc.max_steps) or (
                        shared_stop if dist is not None else spent(t_epoch))
                    if st["step"] % eval_every == 0 or stop_now:
                        st["train_time"] += time.perf_counter() - t_epoch  # training time excludes validation
                        check(stop_now)
                        bar.update(task, info=status())  # the best just validated, not the one before it
                        t_epoch = time.perf_counter()
                        if st["done"]:
                            break
                    elif time.monotonic() - last_save >= tc.save_every_s:  # a kill loses at most this much
                        st["train_time"] += time.perf_counter() - t_epoch
                        save_state()
                        t_epoch = time.perf_counter()
                else:
                    with guard.hold():
                        st["epoch"] += 1
                        st["batch_in_epoch"] = 0
                        st["train_time"] += time.perf_counter() - t_epoch
                    last_epoch = st["epoch"] >= tc.epochs
                    if last_epoch and checked_at != st["step"]:
                        check(True)  # the steps after the last periodic validation must be validated too
                        bar.update(task, info=status())
                    else:
                        save_state()
        except (KeyboardInterrupt, Stopped):
            save_state()  # every change to the state is made under guard.hold, so this one is whole
            log(f"train/{model_name}: stopped at step {st['step']}; saved its state in {state_path}, from which "
                "the same command resumes")
            raise

    if dist is not None and not dist.main:
        return {}
    if best_state is None:
        raise ArtifactError(f"train/{model_name}: no validation was run (0 training batches?)")
    best = next(e for e in st["log"] if e["step"] == st["best_step"])
    guidance = None
    if tc.guidance_grid:
        model.load_state_dict(best_state)
        grid = list(dict.fromkeys(float(w) for w in tc.guidance_grid))

        def sweep(w: float) -> dict[str, Any]:  # each w scores every validation user: show its progress
            label = f"guidance w={w:g} ({grid.index(w) + 1}/{len(grid)})" if progress else ""
            return valid_metrics(model, {"w": w}, label)

        mcfg, guidance, best = select_guidance(model, mcfg, tc.guidance_grid, best, sweep, model_name, log,
                                               column=tc.select)
    new_bias = None
    if tc.new_bias_grid:
        model.load_state_dict(best_state)
        model.config = mcfg  # the chosen w
        biases = [0.0] + [float(v) for v in tc.new_bias_grid]
        biases = list(dict.fromkeys(biases))

        def bias_sweep(v: float) -> dict[str, Any]:
            label = f"new-item offset {v:g} ({biases.index(v) + 1}/{len(biases)})" if progress else ""
            return valid_metrics(model, {"new_bias": v, "pseudo_new": True}, label)

        mcfg, new_bias, best = select_new_bias(mcfg, biases, best, bias_sweep, model_name, log, column=tc.select)
    dim = None if inp.item_vectors is None else int(inp.item_vectors.shape[1])
    save_checkpoint(out_dir, model_name, mcfg, inp.ds.n_items, dim, best_state, inp.fingerprints, inp.text_info,
                    config)
    with atomic_path(out_dir / "log.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(e) + "\n" for e in st["log"]))
    write_json(out_dir / "valid.json", best)
    samples = len(b.train_positions) if mode in ("position", "window") or chunked else None
    info = {
        "model": model_name, "parameters": n_params, "steps": st["step"], "best_step": st["best_step"],
        "valid": best["valid"], "train_time_s": round(st["train_time"], 2), "steps_per_epoch": per_epoch,
        "train_samples_per_epoch": samples, "device": str(device), "batch_size": tc.batch_size,
        "processes": dist.world if dist is not None else 1,  # of the sitting that finished the run
    }
    if guidance is not None:
        info["guidance"] = guidance
    if new_bias is not None:
        info["new_bias"] = new_bias
    return info


def check_new_bias(mcfg: Any, model_name: str) -> None:
    if not hasattr(mcfg, "new_bias"):
        raise ConfigError(f"train.new_bias_grid: model {model_name} has no new-item offset; leave it empty")
    if not getattr(mcfg, "new_items", 0):
        raise ConfigError(f"train.new_bias_grid needs model.{model_name}.new_items > 0: the training's newest "
                          "items are what the offset is chosen on")


def select_new_bias(mcfg: Any, biases: list[float], best: dict[str, Any],
                    validate: Callable[[float], dict[str, Any]], model_name: str, log=print,
                    column: str = "masked") -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Pick the new-item offset from `biases` by validation NDCG@10 in `column`, each scored with the
    training's held-out newest items (new_holdout), else its newest items, in the new items' part
    (validate(v)); a tie goes to the smaller offset. Returns
    (mcfg with it, a record of the sweep, the best log entry with its validation replaced by the chosen
    offset's). The figure at offset 0 differs from training's validation: the newest items are scored in their
    new form there."""
    results = {v: validate(v) for v in biases}
    by_v = {v: r[column]["NDCG@10"] for v, r in results.items()}
    chosen = max(by_v, key=lambda v: (by_v[v], -abs(v)))
    stand_in = ("held-out newest items as new" if getattr(mcfg, "new_holdout", 0) > 0
                else "newest training items as new")
    log(f"train/{model_name}: new-item offset on validation ({column} NDCG@10, {stand_in}): "
        + ", ".join(f"{v:g}: {x:.4f}" for v, x in by_v.items()) + f" -> new_bias = {chosen:g}")
    record = {"grid": biases, "new_bias": chosen, "column": column,
              "valid_ndcg10_masked": {f"{v:g}": r["masked"]["NDCG@10"] for v, r in results.items()},
              "valid_ndcg10_unmasked": {f"{v:g}": r["unmasked"]["NDCG@10"] for v, r in results.items()}}
    return dataclasses.replace(mcfg, new_bias=chosen), record, {**best, "valid": results[chosen],
                                                                "new_bias": chosen}


def check_guidance(model: Recommender, mcfg: Any, model_name: str) -> None:
    if not hasattr(mcfg, "w") or "w" not in model.sampler_params:
        raise ConfigError(f"train.guidance_grid: model {model_name} has no guidance weight w; leave it empty")


def select_guidance(model: Recommender, mcfg: Any, grid: list[float], best: dict[str, Any],
                    validate: Callable[[float], dict[str, Any]], model_name: str, log=print,
                    column: str = "masked") -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Pick the history-guidance weight w from `grid` by validation NDCG@10 in `column` (masked or unmasked:
    train.select), the checkpoint's weights fixed; a tie keeps the trained w, else goes to the earlier grid
    value. Returns (mcfg with that w, a record
    of the sweep, the best log entry with its validation replaced by the chosen w's). validate(w) ->
    evaluate_split's result. The model config's own w competes too, so the sweep never picks a worse w than
    training validated with."""
    check_guidance(model, mcfg, model_name)
    trained_w = float(mcfg.w)
    results = {trained_w: best["valid"]}
    for w in grid:
        if float(w) not in results:
            results[float(w)] = validate(float(w))
    by_w = {w: r[column]["NDCG@10"] for w, r in results.items()}
    chosen = max(by_w, key=lambda w: (by_w[w], w == trained_w))  # a tie keeps the trained w
    log(f"train/{model_name}: guidance w on validation ({column} NDCG@10): "
        + ", ".join(f"{w:g}: {v:.4f}" for w, v in by_w.items()) + f" -> w = {chosen:g}")
    record = {"grid": [float(w) for w in grid], "trained_w": trained_w, "w": chosen, "column": column,
              "valid_ndcg10_masked": {f"{w:g}": r["masked"]["NDCG@10"] for w, r in results.items()},
              "valid_ndcg10_unmasked": {f"{w:g}": r["unmasked"]["NDCG@10"] for w, r in results.items()}}
    return dataclasses.replace(mcfg, w=chosen), record, {**best, "valid": results[chosen], "w": chosen}


__all__ = ["run", "gather_inputs", "train_config_dict", "EMA", "lr_at", "select_guidance",
           "check_guidance", "select_new_bias", "check_new_bias"]
