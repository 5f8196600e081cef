"""Benchmark: train (or reuse) several models on one split, evaluate all with the same code, one table.

Writes `<run_dir>/benchmark/` : table.md, results.json, chart.png (NDCG@10 and HR@10, both columns) and
curve.png (each model's validation NDCG@10 against its training wall-clock, from its log.jsonl).
Every model's checkpoint is its own train stage, so re-running the benchmark reuses finished models.

train.max_minutes (`recpipe benchmark --minutes M`) gives every model the same training wall-clock: the table
names that budget and the CPU (model, AVX2 / AVX512 / BF16 / AMX, threads), without which a wall-clock
comparison says nothing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from recpipe import cpu
from recpipe.artifacts import atomic_path, write_json
from recpipe.config import Config
from recpipe.errors import ArtifactError, ConfigError
from recpipe.models.base import model_names
from recpipe.pipeline.bundle import train_stage_name

DEFAULT_MODELS = ["sasrec", "dreamrec", "diffurec", "diffrec", "idreamrec"]


def run(cfg: Config, models: list[str] | None, force: bool = False, log=print, reuse: bool = False
        ) -> dict[str, Any]:
    """reuse=True trains nothing: the table collects the models already trained and evaluated in the run
    directory, each as it was trained (its own steps, settings and budget, recorded in the table).
    models=None: the default models, or with reuse every model the run directory holds (the others are named
    as missing). cfg.train.max_minutes, when set, is every trained model's training budget."""
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
        if cfg.train.max_minutes is not None:
            log(f"benchmark: {cfg.train.max_minutes:g} min of training per model (validation not counted)")
        for stage in stages.shared(models, cfg):  # once for all models; --force redoes the models, not these
            stage.run(cfg, log=log)
        rows = []
        for name in models:
            rows += train_and_evaluate(cfg, name, force=force, log=log)
    result = table_result(cfg, rows)
    write(result, cfg.run_dir / "benchmark")
    return result


def train_and_evaluate(cfg: Config, name: str, force: bool = False, log=print) -> list[dict[str, Any]]:
    """Train (or reuse, when current) and evaluate one model; its benchmark rows. The shared stages (data,
    and for text models describe and embed) must have run."""
    from recpipe.pipeline import stages

    t0 = time.perf_counter()
    trm, evm = (stage.run(cfg, name, force=force, log=log).manifest for stage in stages.per_model())
    rows = _rows(name, trm, evm, cfg.run_dir)
    log(f"benchmark: {name} done in {time.perf_counter() - t0:.0f} s")
    return rows


def table_result(cfg: Config, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """results.json's content: the rows with the dataset, split, cut-offs and the CPU this process runs on
    (the threads are train.threads, else torch's)."""
    return {"dataset": cfg.run.dataset, "split": cfg.evaluate.split, "ks": cfg.evaluate.ks,
            "cpu": cpu.describe(cfg.train.threads or None), "rows": rows}


def write(result: dict[str, Any], out: Path) -> None:
    """table.md, results.json, chart.png and curve.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", result)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(markdown(result))
    chart(result, out / "chart.png")
    curve(result, out / "curve.png")


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
            rows += _rows(name, *_reused(cfg, name), cfg.run_dir)
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
        rows += _rows(name, trm, evm, cfg.run_dir)
        log(f"benchmark: {name} reused (trained and evaluated earlier)")
    for name, why in missing:
        log(f"benchmark: {name} left out: {why}")
    if not rows:
        raise ArtifactError(f"{cfg.run_dir}: no model is both trained and evaluated there, nothing to table; "
                            f"run `recpipe benchmark` without --reuse, or `recpipe train` and `recpipe evaluate`")
    return rows


def _rows(name: str, trm, evm, run_dir: Path) -> list[dict[str, Any]]:
    """The benchmark rows of one model: its plain evaluation rows (not the intention rows), with its training
    figures, its budget (None = none) and its validation curve."""
    info = trm.info
    per_epoch = info.get("steps_per_epoch")
    common = {"model": name, "parameters": info["parameters"], "train_time_s": info["train_time_s"],
              "steps": info["steps"], "best_step": info["best_step"], "valid": info["valid"],
              "epochs": round(info["steps"] / per_epoch, 2) if per_epoch else None,
              "budget_minutes": trm.config.get("train", {}).get("max_minutes"),
              "curve": valid_curve(run_dir / train_stage_name(name) / "log.jsonl")}
    return [{**r, **common} for r in evm.info["rows"] if "intention" not in r["name"] and ":" not in r["name"]]


def valid_curve(log_path: Path) -> list[dict[str, float]]:
    """A train stage's validations from its log.jsonl: train_time_s, epoch, step and NDCG@10 of both columns;
    [] when the log is missing (a stage written before the log existed)."""
    if not log_path.exists():
        return []
    out = []
    for line in log_path.read_text().splitlines():
        if not line.strip():
            continue
        e = read_json_line(line, log_path)
        out.append({"train_time_s": e["train_time_s"], "epoch": round(e["epoch"], 3), "step": e["step"],
                    "masked": e["valid"]["masked"]["NDCG@10"], "unmasked": e["valid"]["unmasked"]["NDCG@10"]})
    return out


def read_json_line(line: str, path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise ArtifactError(f"{path}: a line is not JSON; re-run its train stage with --force") from None


EXTRA_COLUMNS = ["epochs", "steps", "train s", "users/s", "params"]  # after the metrics, in table.md and console


def extra_values(r: dict[str, Any]) -> list[str]:
    epochs = "-" if r.get("epochs") is None else f"{r['epochs']:,.2f}"
    return [epochs, f"{r['steps']:,}", f"{r['train_time_s']:,.0f}", f"{r['users_per_s']:,.0f}",
            f"{r['parameters']:,}"]


def budget_line(result: dict[str, Any]) -> str:
    """The training budget the rows had: one for all, or each model's when they differ (reused rows)."""
    budgets = {r["model"]: r.get("budget_minutes") for r in result["rows"]}
    if len(set(budgets.values())) == 1:
        b = next(iter(budgets.values()))
        if b is None:
            return "Training budget: none (each model stops on its epochs, steps or early stopping)."
        return f"Training budget: {b:g} min of training per model (validation not counted), then validate and stop."
    each = ", ".join(f"{m} {'none' if b is None else f'{b:g} min'}" for m, b in budgets.items())
    return f"Training budgets differ: {each} (validation not counted)."


def cpu_line(result: dict[str, Any]) -> str:
    c = result.get("cpu")
    return f"CPU: {c['text']}." if c else "CPU: not recorded."


def markdown(result: dict[str, Any]) -> str:
    ks = result["ks"]
    cols = [f"{m}@{k}" for m in ("HR", "NDCG") for k in ks]
    lines = [f"Dataset {result['dataset']}, {result['split']} split, full ranking, every user.\n",
             budget_line(result) + "\n", cpu_line(result) + "\n",
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
    head = "\n".join(x for x in (title, budget_line(result), cpu_line(result)) if x)
    two_tables(result["rows"], result["ks"], title=head, first="model", extra=extra)


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


def curve(result: dict[str, Any], path: Path) -> None:
    """Validation NDCG@10 (seen-masked solid, unmasked dashed) against training wall-clock, one colour a model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, r in enumerate(result["rows"]):
        pts = r.get("curve") or []
        if not pts:
            continue
        t = [p["train_time_s"] / 60 for p in pts]
        color = f"C{i % 10}"
        ax.plot(t, [p["masked"] for p in pts], "-o", ms=3, color=color, label=f"{r['name']} seen-masked")
        ax.plot(t, [p["unmasked"] for p in pts], "--", color=color, alpha=0.6, label=f"{r['name']} unmasked")
    ax.set_xlabel("training wall-clock (min, validation not counted)")
    ax.set_ylabel("validation NDCG@10")
    c = result.get("cpu")
    ax.set_title(f"{result['dataset']}: validation NDCG@10" + (f"\n{c['text']}" if c else ""), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
