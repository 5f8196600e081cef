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


def run(cfg: Config, models: list[str], force: bool = False, log=print, reuse: bool = False) -> dict[str, Any]:
    """reuse=True trains nothing: the table collects the models already trained and evaluated in the run
    directory, each as it was trained (its own steps and settings, recorded in the table)."""
    from recpipe.artifacts import require_stage
    from recpipe.pipeline import data, describe, embed, evaluate, train, whiten

    known = model_names()
    unknown = [m for m in models if m not in known]
    if unknown:
        raise ConfigError(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if not reuse:
        data.run(cfg, log=log)
        if any(train.needs_text(m) for m in models):
            describe.run(cfg, log=log)
            embed.run(cfg, log=log)
            whiten.run(cfg, log=log)
    rows = []
    for name in models:
        t0 = time.perf_counter()
        if reuse:
            trm = require_stage(cfg.run_dir, f"train/{name}", hint=f"recpipe train --model {name}")
            evm = require_stage(cfg.run_dir, f"evaluate/{name}", hint=f"recpipe evaluate --model {name}")
            if evm.inputs.get("train") != trm.fingerprint:
                raise ArtifactError(f"evaluate/{name} scored an earlier train/{name}; "
                                    f"run `recpipe evaluate --model {name}`")
            if evm.info.get("split") != cfg.evaluate.split:
                raise ArtifactError(f"evaluate/{name} scored the {evm.info.get('split')} split, not "
                                    f"{cfg.evaluate.split}; run `recpipe evaluate --model {name}`")
        else:
            trm = train.run(cfg, name, force=force, log=log).manifest
            evm = evaluate.run(cfg, name, force=force, log=log).manifest
        info = trm.info
        for r in evm.info["rows"]:
            if "intention" in r["name"] or ":" in r["name"]:
                continue
            rows.append({**r, "model": name, "parameters": info["parameters"],
                         "train_time_s": info["train_time_s"], "steps": info["steps"],
                         "best_step": info["best_step"], "valid": info["valid"]})
        log(f"benchmark: {name} done in {time.perf_counter() - t0:.0f} s")
    out = cfg.run_dir / "benchmark"
    out.mkdir(parents=True, exist_ok=True)
    result = {"dataset": cfg.run.dataset, "split": cfg.evaluate.split, "ks": cfg.evaluate.ks, "rows": rows}
    write_json(out / "results.json", result)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(markdown(result))
    chart(result, out / "chart.png")
    return result


def markdown(result: dict[str, Any]) -> str:
    ks = result["ks"]
    cols = [f"{m}@{k}" for m in ("HR", "NDCG") for k in ks]
    lines = [f"Dataset {result['dataset']}, {result['split']} split, full ranking, every user.\n",
             "| model | column | " + " | ".join(cols) + " | steps | train s | users/s | params |",
             "|---|---|" + "---|" * (len(cols) + 4)]
    for r in result["rows"]:
        for col in ("masked", "unmasked"):
            vals = " | ".join(f"{r[col][c]:.4f}" for c in cols)
            extra = (f"{r['steps']:,} | {r['train_time_s']:,.0f} | {r['users_per_s']:,.0f} | {r['parameters']:,}"
                     if col == "masked" else " | | | ")
            lines.append(f"| {r['name']} | {'seen-masked' if col == 'masked' else 'unmasked'} | {vals} | {extra} |")
    return "\n".join(lines) + "\n"


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
