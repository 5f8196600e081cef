"""Evaluate stage: full-ranking HR@K / NDCG@K on the test split, for any trained model.

Rows (all scored by the same code, `scoring.evaluate_split`, over every test user):
- the model as trained (for generative models: one row per DDIM step count in `evaluate.steps`);
- with `evaluate.intent` = category | llm | all, for models that take an intention, three rows per kind:
  "intention alone" (the intention's TEM vector searched directly against the item TEM vectors, no model),
  "history alone" and "history + intention".
  category: a category-level intention built from the target's metadata (e.g. "a comedy movie" from one of
  its genres, chosen with the run's seed): it cannot name the target, so it cannot leak the answer.
  llm: the describe stage's LLM-written intention for the target item.
Columns: seen-masked (default) and unmasked, side by side. Output `<run_dir>/evaluate/<model>/metrics.json`
and `table.md`.
Under the cold-item protocol (data.cold_items > 0) every row of the test split comes three times: over all
test users, then as "<row> [cold targets]" and "<row> [warm targets]" (the users whose test target is, or is
not, an item no training or validation sequence holds), each with its users' count and its `group`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recpipe.artifacts import StageResult, atomic_path, require_stage, run_stage, write_json
from recpipe.config import Config, to_dict
from recpipe.models.base import Recommender
from recpipe.pipeline import bundle as bundle_mod
from recpipe.pipeline import data as data_stage
from recpipe.pipeline import embed
from recpipe.pipeline.batches import Batcher
from recpipe.pipeline.intents import anchor_intent, category_text, training_intentions
from recpipe.pipeline.scoring import evaluate_split, resolve_device, resolve_dtype


class VectorSearch(Recommender):
    """No model: score every item by the inner product of the batch's "intent" vector with a vector table."""

    def __init__(self, table: np.ndarray):
        super().__init__(table.shape[0] - 1, history_len=1)
        self.register_buffer("table", torch.from_numpy(np.ascontiguousarray(table, dtype=np.float32)))

    @torch.no_grad()
    def score_all(self, batch: dict[str, torch.Tensor], **_: Any) -> torch.Tensor:
        s = batch["intent"].float() @ self.table.T
        s[:, 0] = -torch.inf
        return s


# ------------------------------------------------------------------------------------------- intentions
def category_texts(ds: data_stage.Dataset, targets: np.ndarray, column: str, template: str, seed: int
                   ) -> list[str] | None:
    """One category-level intention per target: the template filled with one of the target's categories."""
    cats = ds.item_categories(column)
    if cats is None:
        return None
    rng = np.random.default_rng([seed, 11])
    out = []
    for t in targets:
        parts = cats[t - 1]
        if not parts:
            return None
        out.append(category_text(template, parts[rng.integers(len(parts))].lower()))
    return out


class Intentions:
    """Per-test-user intention vectors, raw (TEM space) and whitened (model space)."""

    def __init__(self, raw: np.ndarray, whitened: np.ndarray, texts: list[str] | None):
        self.raw, self.whitened, self.texts = raw, whitened, texts

    def fn(self, which: str) -> Callable[[np.ndarray, np.ndarray], torch.Tensor]:
        table = self.raw if which == "raw" else self.whitened
        return lambda users, targets: torch.from_numpy(np.ascontiguousarray(table[users], dtype=np.float32))


def build_intentions(cfg: Config, kind: str, ds: data_stage.Dataset, targets: np.ndarray, log,
                     bundle: bundle_mod.Bundle | None = None) -> Intentions | None:
    """The test users' intentions of one kind (category | llm), or None (logged) when the run has none.
    `bundle`: the trained run already loaded (its whitening and TEM), else they are read here."""
    from recpipe.pipeline import whiten

    run_dir = cfg.run_dir
    text = bundle.text if bundle is not None else whiten.load(run_dir)
    if kind == "category":
        texts = category_texts(ds, targets, cfg.evaluate.category_column, cfg.evaluate.category_template,
                               cfg.run.seed)
        if texts is None:
            log(f"evaluate: no usable '{cfg.evaluate.category_column}' column; category intentions skipped")
            return None
        tem = bundle.tem() if bundle is not None else _tem(cfg)
        uniq, inv = np.unique(np.array(texts, dtype=object), return_inverse=True)
        raw_u = tem.encode(list(uniq))
        raw = raw_u[inv]
        return Intentions(raw, text.whitening.transform(raw).astype(np.float32), texts)
    # llm: the describe stage's intention of the target item
    require_stage(run_dir, "embed", hint="recpipe embed")
    wh = text.intent_vectors()
    raw_all = embed.load_vectors(run_dir, "intents") if wh is not None else None
    if raw_all is None:
        log("evaluate: no LLM intentions (describe.intents off?); llm rows skipped")
        return None
    return Intentions(raw_all[targets], wh[targets], None)


def _tem(cfg: Config):
    from recpipe.pipeline.embed import load_tem

    return load_tem(require_stage(cfg.run_dir, "embed", hint="recpipe embed").info)


# ---------------------------------------------------------------------------------------------- stage
def run(cfg: Config, model_name: str | None = None, force: bool = False, log=print, progress: bool = True
        ) -> StageResult:
    model_name = model_name or cfg.train.model
    # current: a model trained on an earlier data stage (or whitening) is refused, not scored against today's
    # split; the fingerprint covers the weights' content (require_stage re-hashes them)
    tm = require_stage(cfg.run_dir, f"train/{model_name}", hint=f"recpipe train --model {model_name}", current=True)
    inputs = {"train": tm.fingerprint}
    ec = cfg.evaluate
    if ec.intent != "none":
        inputs["embed"] = require_stage(cfg.run_dir, "embed", hint="recpipe embed").fingerprint
    config = {"evaluate": to_dict(ec), "model": model_name, "seed": cfg.run.seed}
    if not ec.intent_anchor:
        config["evaluate"].pop("intent_anchor")  # off, the default: evaluations made before it stay current
    else:
        config["anchor_temperature"] = cfg.recommend.anchor_temperature

    def build(out_dir: Path) -> dict[str, Any]:
        result = evaluate_model(cfg, model_name, log=log, progress=progress)
        write_json(out_dir / "metrics.json", result)
        with atomic_path(out_dir / "table.md") as tmp:
            tmp.write_text(markdown_table(result["rows"], ec.ks))
        return {"rows": result["rows"], "split": result["split"], "users": result["users"],
                "warnings": result["warnings"]}

    return run_stage(cfg.run_dir, f"evaluate/{model_name}", config, inputs, build, force=force, log=log)


def evaluate_model(cfg: Config, model_name: str, log=print, progress: bool = False) -> dict[str, Any]:
    ec = cfg.evaluate
    device = resolve_device(cfg.train.device)
    run = bundle_mod.load(cfg, model_name, device, log=log)
    model, ds = run.model, run.ds
    b = Batcher(ds, model.history_len)
    split = ec.split
    rows: list[dict[str, Any]] = []
    warnings = degenerate_warnings(ds, split, ec.ks)
    for w in warnings:
        log(f"evaluate: warning: {w}")
    # the cold and warm users are told apart by their test target; validation targets are all warm
    groups = ds.test_groups() if split == "test" else None

    def row(name: str, m: Recommender, score_kwargs: dict | None = None, intent_fn=None) -> dict[str, Any]:
        t0 = time.perf_counter()
        res = evaluate_split(m, b, split, ec.ks, batch_size=ec.batch_size, device=device,
                             score_kwargs=score_kwargs, intent_fn=intent_fn, seed=cfg.run.seed,
                             progress=name if progress else "", groups=groups)
        dt = time.perf_counter() - t0
        r = {"name": name, "masked": res["masked"], "unmasked": res["unmasked"], "users": res["users"],
             "users_per_s": round(res["users"] / dt, 1)}
        log(f"evaluate {model_name} [{name}]: NDCG@10 {r['masked']['NDCG@10']:.4f} masked, "
            f"{r['unmasked']['NDCG@10']:.4f} unmasked ({r['users_per_s']:.0f} users/s)")
        rows.append(r)
        if groups is not None:
            r["group"] = "all"
            for g in groups:
                part = res["groups"].get(g)
                if part is None:
                    log(f"evaluate {model_name} [{name}]: no {g}-target test users; no {g} row")
                    continue
                rows.append({"name": f"{name} [{g} targets]", "group": g, **part, "users_per_s": r["users_per_s"]})
                log(f"evaluate {model_name} [{name}] {g} targets ({part['users']:,} users): NDCG@10 "
                    f"{part['masked']['NDCG@10']:.4f} masked, {part['unmasked']['NDCG@10']:.4f} unmasked")
        return r

    low = {}  # the denoiser's precision (models whose score_all takes a dtype; scores stay float32)
    if ec.dtype != "float32":
        if "dtype" in _score_params(model):
            low = {"dtype": resolve_dtype(ec.dtype, device)}
        else:
            log(f"evaluate: {model_name} scores in float32 "
                f"(evaluate.dtype={ec.dtype} applies to idreamrec, diffurec and diffurecsys)")
    steps_kw = lambda s: {**low, "steps": s} if s else dict(low)  # 0: the model's own sampler (iDreamRec: 1)
    if model.generative and "steps" in _score_params(model):
        for s in ec.steps:
            row(f"{model_name} ({s}-step)" if s else model_name, model, steps_kw(s))
    else:
        row(model_name, model, dict(low))

    kinds = {"none": [], "category": ["category"], "llm": ["llm"], "all": ["category", "llm"]}[ec.intent]
    if kinds and not model.uses_intent:
        log(f"evaluate: {model_name} takes no intention; intention rows skipped")
        kinds = []
    if kinds:
        _, targets = ds.split(split)
        emb_raw = embed.load_vectors(cfg.run_dir, "items")
        search = VectorSearch(emb_raw).to(device)
        for kind in kinds:
            it = build_intentions(cfg, kind, ds, targets, log, bundle=run)
            if it is None:
                continue
            row(f"{kind} intention alone", search, intent_fn=it.fn("raw"))
            row(f"{kind}: history alone", model, steps_kw(ec.steps[0]))
            row(f"{kind}: history + intention", model, steps_kw(ec.steps[0]), intent_fn=it.fn("whitened"))
            if kind == "category" and ec.intent_anchor is not None:
                anchored = anchored_intentions(cfg, run.conf, ds, it, ec.intent_anchor, bundle=run)
                if anchored is not None:
                    row(f"{kind}: history + intention (anchored)", model, steps_kw(ec.steps[0]),
                        intent_fn=anchored.fn("whitened"))
    return {"model": model_name, "split": split, "users": rows[0]["users"], "rows": rows, "ks": ec.ks,
            "warnings": warnings}


# Fewer test users than this: a figure is the mean of so few ranks that one user moves it visibly
FEW_USERS = 30


def degenerate_warnings(ds: data_stage.Dataset, split: str, ks: list[int]) -> list[str]:
    """What the figures mean where the split makes them trivial: a user whose unseen items number at most K
    has masked HR@K = 1 whatever the model does (one unseen item: NDCG@K = 1 too); a catalog of at most K
    items puts every target in the top K of both columns."""
    out = []
    k = max(ks)
    cut = {"test": 1, "valid": 2}[split]
    counts = np.diff(ds.offsets)
    user_of = np.repeat(np.arange(ds.n_users), counts)
    before = np.arange(len(ds.seq_items)) - ds.offsets[user_of] < (counts - cut)[user_of]  # the masked history
    pairs = np.unique(user_of[before] * (ds.n_items + 1) + ds.seq_items[before])  # distinct (user, item)
    seen = np.bincount(pairs // (ds.n_items + 1), minlength=ds.n_users)
    unseen = ds.n_items - seen  # the target is among them
    if ds.n_items <= k:
        out.append(f"the catalog has {ds.n_items} items, at most K={k}: HR@{k} is 1 in both columns for any model")
    trivial = int((unseen <= k).sum())
    if trivial:
        only = int((unseen <= 1).sum())
        out.append(f"{trivial} of {ds.n_users} users have at most {k} unseen items (fewest: {int(unseen.min())}): "
                   f"their masked HR@{k} is 1 by construction"
                   + (f", and for {only} the target is the only unseen item (masked NDCG = 1)" if only else "")
                   + "; the masked column says little here")
    if ds.n_users < FEW_USERS:
        out.append(f"only {ds.n_users} {split} user(s): each figure is a mean of {ds.n_users} rank(s)")
    return out


def anchored_intentions(cfg: Config, conf: dict, ds: data_stage.Dataset, it: Intentions, k: int,
                        bundle: bundle_mod.Bundle | None = None) -> Intentions | None:
    """`it` (category texts) with each text's whitened vector replaced by its anchor over the model's training
    intentions (recommend.anchor_intent), or None when the model trained with none. `bundle`: the trained
    run already loaded (its intention bank is built once), else the bank is built here."""

    if bundle is not None:
        R, Wt, _ = bundle.intention_bank()
    else:
        R, Wt, _ = training_intentions(cfg, conf, ds, lambda t: _tem(cfg).encode(t), it.whitened.shape[1])
    if not len(R):
        return None
    _, first, inv = np.unique(np.array(it.texts, dtype=object), return_index=True, return_inverse=True)
    q = it.raw[first] / np.maximum(np.linalg.norm(it.raw[first], axis=1, keepdims=True), 1e-12)
    vecs = np.stack([anchor_intent(v, R, Wt, k, cfg.recommend.anchor_temperature)[0] for v in q])
    return Intentions(it.raw, vecs[inv.reshape(-1)], it.texts)


def _score_params(model: Recommender) -> set[str]:
    return set(model.sampler_params)


def markdown_table(rows: list[dict[str, Any]], ks: list[int]) -> str:
    cols = [f"{m}@{k}" for m in ("HR", "NDCG") for k in ks]
    grouped = any("group" in r for r in rows)  # cold-item protocol: rows differ in their users
    head = "| row | " + " | ".join(f"{c} masked" for c in cols) + " | " + " | ".join(
        f"{c} unmasked" for c in cols) + (" | users" if grouped else "") + " | users/s |"
    sep = "|" + "---|" * (2 + 2 * len(cols) + grouped)
    lines = [head, sep]
    for r in rows:
        vals = [f"{r['masked'][c]:.4f}" for c in cols] + [f"{r['unmasked'][c]:.4f}" for c in cols]
        vals += [f"{r['users']:,}"] if grouped else []
        lines.append(f"| {r['name']} | " + " | ".join(vals) + f" | {r['users_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def print_table(rows: list[dict[str, Any]], ks: list[int], title: str = "", first: str = "row",
                extra: dict[str, Any] | None = None) -> None:
    """Two tables (seen-masked, unmasked) with the same rows, so they fit a terminal. `extra`: column name ->
    row -> its text, after the metrics (default: users/s)."""
    from rich.console import Console
    from rich.table import Table

    if extra is None:
        extra = {"users/s": lambda r: f"{r['users_per_s']:,.0f}"}
        if any("group" in r for r in rows):  # cold-item protocol: rows differ in their users
            extra = {"users": lambda r: f"{r['users']:,}", **extra}
    console = Console()
    if title:
        console.print(title, highlight=False)
    for col in ("masked", "unmasked"):
        label = "seen items masked (default)" if col == "masked" else "unmasked (published protocol)"
        t = Table(title=label, title_justify="left")
        t.add_column(first)
        for m in ("HR", "NDCG"):
            for k in ks:
                t.add_column(f"{m}@{k}", justify="right")
        for c in extra:
            t.add_column(c, justify="right")
        for r in rows:
            vals = [f"{r[col][f'{m}@{k}']:.4f}" for m in ("HR", "NDCG") for k in ks]
            t.add_row(r["name"], *vals, *[fmt(r) for fmt in extra.values()])
        console.print(t)
