"""Benchmark: train (or reuse) several models on one split, evaluate all with the same code, one table.

Writes `<run_dir>/benchmark/` : table.md, results.json and chart.png (NDCG@10 and HR@10, both columns).
Every model's checkpoint is its own train stage, so re-running the benchmark reuses finished models.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from recpipe.artifacts import atomic_path, write_json
from recpipe.config import Config
from recpipe.errors import ArtifactError, ConfigError
from recpipe.models.base import model_names
from recpipe.pipeline.bundle import train_stage_name

DEFAULT_MODELS = ["sasrec", "dreamrec", "diffurec", "diffrec", "idreamrec"]


def run(cfg: Config, models: list[str] | None, force: bool = False, log=print, reuse: bool = False
        ) -> dict[str, Any]:
    """reuse=True trains nothing: the table collects the models already trained and evaluated in the run
    directory, each as it was trained (its own steps and settings, recorded in the table). models=None: the
    default models, or with reuse every model the run directory holds (the others are named as missing)."""
    from recpipe.pipeline import stages

    known = model_names()
    unknown = [m for m in models or [] if m not in known]
    if unknown:
        raise ConfigError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if models is not None and not models:
        raise ConfigError("--models names no model; give a comma-separated list like sasrec,idreamrec")
    if reuse:
        rows = _reused_rows(cfg, models, log)
    else:
        models = models or DEFAULT_MODELS
        for stage in stages.shared(models):  # once for all models; --force redoes the models, not these
            stage.run(cfg, log=log)
        rows = []
        for name in models:
            t0 = time.perf_counter()
            trm, evm = (stage.run(cfg, name, force=force, log=log).manifest for stage in stages.per_model())
            rows += _rows(name, trm, evm)
            log(f"benchmark: {name} done in {time.perf_counter() - t0:.0f} s")
    out = cfg.run_dir / "benchmark"
    out.mkdir(parents=True, exist_ok=True)
    result = {"dataset": cfg.run.dataset, "split": cfg.evaluate.split, "ks": cfg.evaluate.ks, "rows": rows}
    write_json(out / "results.json", result)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(markdown(result))
    chart(result, out / "chart.png")
    return result


def _reused(cfg: Config, name: str):
    """(train manifest, evaluate manifest) of a model trained and evaluated in the run directory, current with
    its data and with each other; ArtifactError naming what to run otherwise."""
    from recpipe.artifacts import require_stage

    trm = require_stage(cfg.run_dir, train_stage_name(name), hint=f"recpipe train --model {name}", current=True)
    evm = require_stage(cfg.run_dir, f"evaluate/{name}", hint=f"recpipe evaluate --model {name}")
    if evm.inputs.get("train") != trm.fingerprint:
        raise ArtifactError(f"evaluate/{name} scored an earlier train/{name}; run `recpipe evaluate --model {name}`")
    if evm.info.get("split") != cfg.evaluate.split:
        raise ArtifactError(f"evaluate/{name} scored the {evm.info.get('split')} split, not "
                            f"{cfg.evaluate.split}; run `recpipe evaluate --model {name}`")
    return trm, evm


def _reused_rows(cfg: Config, models: list[str] | None, log) -> list[dict[str, Any]]:
    """Named models must all be there (an error names the first that is not); without names, every model
    whose train and evaluate stages are there is tabled and the missing defaults are listed."""
    if models is not None:
        rows = []
        for name in models:
            rows += _rows(name, *_reused(cfg, name))
            log(f"benchmark: {name} reused (trained and evaluated earlier)")
        return rows
    known = model_names()
    order = DEFAULT_MODELS + sorted(m for m in known if m not in DEFAULT_MODELS)
    rows, missing = [], []
    for name in order:
        if not (cfg.run_dir / train_stage_name(name)).exists() and name not in DEFAULT_MODELS:
            continue  # a model nobody asked for and nobody trained: not worth a line
        try:
            trm, evm = _reused(cfg, name)
        except ArtifactError as e:
            missing.append((name, str(e)))
            continue
        rows += _rows(name, trm, evm)
        log(f"benchmark: {name} reused (trained and evaluated earlier)")
    for name, why in missing:
        log(f"benchmark: {name} left out: {why}")
    if not rows:
        raise ArtifactError(f"{cfg.run_dir}: no model is both trained and evaluated there, nothing to table; "
                            f"run `recpipe benchmark` without --reuse, or `recpipe train` and `recpipe evaluate`")
    return rows


def _rows(name: str, trm, evm) -> list[dict[str, Any]]:
    """The benchmark rows of one model: its plain evaluation rows (not the intention rows)."""
    info = trm.info
    return [{**r, "model": name, "parameters": info["parameters"], "train_time_s": info["train_time_s"],
             "steps": info["steps"], "best_step": info["best_step"], "valid": info["valid"]}
            for r in evm.info["rows"] if "intention" not in r["name"] and ":" not in r["name"]]


EXTRA_COLUMNS = ["steps", "train s", "users/s", "params"]  # after the metrics, in table.md and on the console


def extra_values(r: dict[str, Any]) -> list[str]:
    return [f"{r['steps']:,}", f"{r['train_time_s']:,.0f}", f"{r['users_per_s']:,.0f}", f"{r['parameters']:,}"]


def markdown(result: dict[str, Any]) -> str:
    ks = result["ks"]
    cols = [f"{m}@{k}" for m in ("HR", "NDCG") for k in ks]
    lines = [f"Dataset {result['dataset']}, {result['split']} split, full ranking, every user.\n",
             "| model | column | " + " | ".join(cols + EXTRA_COLUMNS) + " |",
             "|---|---|" + "---|" * (len(cols) + len(EXTRA_COLUMNS))]
    for r in result["rows"]:
        for col in ("masked", "unmasked"):
            vals = " | ".join(f"{r[col][c]:.4f}" for c in cols)
            extra = " | ".join(extra_values(r)) if col == "masked" else " | " * (len(EXTRA_COLUMNS) - 1)
            lines.append(f"| {r['name']} | {'seen-masked' if col == 'masked' else 'unmasked'} | {vals} | {extra} |")
    return "\n".join(lines) + "\n"


def print_table(result: dict[str, Any], title: str = "") -> None:
    """The console's view of table.md: the same columns, one table per column kind so it fits a terminal."""
    from recpipe.pipeline.evaluate import print_table as two_tables

    extra = {c: (lambda r, i=i: extra_values(r)[i]) for i, c in enumerate(EXTRA_COLUMNS)}
    two_tables(result["rows"], result["ks"], title=title, first="model", extra=extra)


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = result["rows"]
    names = [r["name"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(6, 1.6 * len(rows) + 2), 4))
    for ax, metric in zip(axes, ("NDCG@10", "HR@10")):
        ax.bar(x - 0.2, [r["masked"][metric] for r in rows], 0.4, label="seen-masked")
        ax.bar(x + 0.2, [r["unmasked"][metric] for r in rows], 0.4, label="unmasked")
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set_title(f"{metric}, {result['dataset']} ({result['split']})")
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
