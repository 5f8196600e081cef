"""iDreamRec on a real dataset: quality (test, both columns), intention guidance, DDIM steps, speed.

    python bench/bench_idreamrec.py --dataset ml-1m --data-dir ../shared/datasets \
        [--llm metadata] [--epochs 3] [--variants paper,residual,ce,copy,mixed] [--set model.idreamrec.width=128 ...]

Prints, and writes to <cache>/bench-<dataset>/report.md:
1. HR/NDCG@5/10/20 on the test split (seen-masked and unmasked) for the paper's setting (frozen text vectors),
   with the per-item residual, with the residual and the cross-entropy term (loss=ce), and trained on mixed
   (category + LLM) intentions (VARIANTS names their settings); one-step and 20/100-step
   DDIM, with users/s;
2. intention guidance with category-level and describe-stage intentions: intention alone / history alone /
   history + intention (and, for category texts, anchored to the training intentions), and a sweep over
   rho and w on the VALIDATION split (the test split is read once), for every variant;
3. speed: training samples/s and time per epoch, batch scoring users/s, `recommend` cold wall time and warm
   per-request p50/p95 inside one process (intent embedding included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


#: --variants: name -> the settings it adds to the paper's (frozen text vectors, x0-MSE, LLM intentions)
VARIANTS: dict[str, dict[str, str]] = {
    "paper": {},
    "residual": {"model.idreamrec.item_residual": "true"},
    "ce": {"model.idreamrec.item_residual": "true", "model.idreamrec.loss": "ce"},  # lam 0.1
    "copy": {"model.idreamrec.loss": "ce", "model.idreamrec.copy": "true"},
    "mixed": {"train.intent_source": "mixed"},
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="ml-1m")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "datasets"))
    ap.add_argument("--cache-dir", default=str(ROOT / "cache"))
    ap.add_argument("--llm", default="metadata", help="describe backend (metadata: fast, no LLM)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--variants", default="paper,residual")
    ap.add_argument("--steps", default="1,20,100")
    ap.add_argument("--eval-users", type=int, default=2000, help="validation users for model selection/sweeps")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--speed-only", action="store_true", help="only the speed section, on an existing run")
    a = ap.parse_args()
    unknown = sorted(set(a.variants.split(",")) - set(VARIANTS))
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if not (Path(a.data_dir) / a.dataset).exists():
        print(f"skip: {a.data_dir}/{a.dataset} not found")
        return

    from recpipe.config import load_config, parse_set_options
    from recpipe.pipeline import data, describe, embed, evaluate, train, whiten

    bench_root = Path(a.cache_dir) / f"bench-{a.dataset}"
    report: list[str] = [f"# iDreamRec on {a.dataset}\n"]
    if a.speed_only:
        variant = a.variants.split(",")[0]
        cfg = load_config(None, {"run.dataset": a.dataset, "run.data_dir": a.data_dir, "run.cache_dir": a.cache_dir,
                                 "run.run_dir": str(bench_root / variant), "train.model": "idreamrec"})
        print(speed(cfg))
        return
    base_over = {
        "run.dataset": a.dataset, "run.data_dir": a.data_dir, "run.cache_dir": a.cache_dir,
        "describe.llm": a.llm, "train.model": "idreamrec", "train.epochs": a.epochs,
        "train.eval_users": a.eval_users, "evaluate.steps": a.steps, "evaluate.intent": "all",
        "evaluate.intent_anchor": 8,  # adds the category row anchored as `recommend` anchors a typed intent
    }
    base_over.update(parse_set_options(a.sets))
    results = {}
    first_dir = None
    for variant in a.variants.split(","):
        over = dict(base_over, **VARIANTS[variant], **{"run.run_dir": str(bench_root / variant)})
        cfg = load_config(None, over)
        if first_dir is not None:  # share the upstream stages: same data, descriptions, vectors
            for st in ("data", "describe", "embed", "whiten"):
                if not (cfg.run_dir / st).exists() and (first_dir / st).exists():
                    shutil.copytree(first_dir / st, cfg.run_dir / st)
        t0 = time.perf_counter()
        data.run(cfg, log=log)
        describe.run(cfg, log=log)
        embed.run(cfg, log=log)
        whiten.run(cfg, log=log)
        log(f"[{variant}] upstream stages: {time.perf_counter() - t0:.1f} s")
        tr = train.run(cfg, log=log)
        ev = evaluate.run(cfg, log=log)
        results[variant] = (cfg, tr, ev)
        first_dir = first_dir or cfg.run_dir

    # ---------------------------------------------------------------------------------- 1. quality
    ks = [5, 10, 20]
    report.append("## Test split, no intention\n")
    rows = []
    for variant, (_, _, ev) in results.items():
        for r in ev.manifest.info["rows"]:
            if ":" in r["name"] or "intention" in r["name"]:
                continue
            rows.append(dict(r, name=f"{variant}: {r['name']}"))
    report.append(evaluate.markdown_table(rows, ks))
    for variant, (_, tr, _) in results.items():
        i = tr.manifest.info
        rate = i["train_samples_per_epoch"] * i["steps"] / i["steps_per_epoch"] / max(i["train_time_s"], 1e-9)
        report.append(f"- {variant}: {i['parameters']:,} parameters, {i['steps']} steps "
                      f"(best at {i['best_step']}), training {i['train_time_s']:.0f} s, "
                      f"{i['train_samples_per_epoch']:,} samples/epoch, "
                      f"{rate:,.0f} samples/s\n")

    # ----------------------------------------------------------------------------- 2. intention
    for variant, (vcfg, _, ev) in results.items():
        irows = [r for r in ev.manifest.info["rows"] if "intention" in r["name"] or ":" in r["name"]]
        report.append(f"\n## Intention guidance ({variant}, test split)\n")
        report.append(evaluate.markdown_table(irows, ks))
        for kind in ("category", "llm"):
            by = {r["name"]: r["masked"]["NDCG@10"] for r in irows if r["name"].startswith(kind)}
            if len(by) >= 3:
                alone, hist = by[f"{kind} intention alone"], by[f"{kind}: history alone"]
                for name in (f"{kind}: history + intention", f"{kind}: history + intention (anchored)"):
                    if name in by:
                        report.append(f"- {name} vs best single row: "
                                      f"{by[name] / max(alone, hist, 1e-9) - 1:+.0%} NDCG@10 (masked; goal +30%)\n")
        report.append(sweep(vcfg, a.eval_users).replace("## Sweep", f"## {variant}: sweep"))
    cfg = results[next(iter(results))][0]

    # --------------------------------------------------------------------------------- 3. speed
    if not a.skip_speed:
        report.append(speed(cfg))
    text = "\n".join(report)
    bench_root.mkdir(parents=True, exist_ok=True)
    (bench_root / "report.md").write_text(text)
    (bench_root / "results.json").write_text(json.dumps(
        {v: {"train": tr.manifest.info, "evaluate": ev.manifest.info} for v, (_, tr, ev) in results.items()},
        indent=1, default=str))
    print(text)


def sweep(cfg, eval_users: int) -> str:
    """NDCG@10 (masked) over w x rho on the validation split with category-level intentions."""
    from recpipe.pipeline import batches, bundle, data, evaluate, scoring

    model, conf, _ = bundle.load_model(cfg.run_dir, "idreamrec")
    ds = data.load(cfg.run_dir / "data")
    b = batches.Batcher(ds, model.history_len)
    rng = np.random.default_rng(0)
    users = np.sort(rng.choice(ds.n_users, min(eval_users, ds.n_users), replace=False))
    _, targets = ds.split("valid")
    it = evaluate.build_intentions(cfg, "category", ds, targets, log)
    if it is None:
        return "\n(no category column: sweep skipped)\n"
    ws, rhos = [0.0, 1.0, 2.0, 3.0, 5.0], [0.0, 0.5, 1.0, 2.0, 4.0]
    lines = ["\n## Sweep on the validation split (category intention, NDCG@10 masked)\n",
             "| w \\ rho | " + " | ".join(f"{r:g}" for r in rhos) + " |", "|---" * (len(rhos) + 1) + "|"]
    for w in ws:
        vals = []
        for rho in rhos:
            res = scoring.evaluate_split(model, b, "valid", [10], users=users, score_kwargs={"w": w, "rho": rho},
                                         intent_fn=it.fn("whitened"), seed=cfg.run.seed)
            vals.append(res["masked"]["NDCG@10"])
        lines.append(f"| {w:g} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
        log(lines[-1])
    return "\n".join(lines) + "\n"


def speed(cfg) -> str:
    import torch

    from recpipe.pipeline import batches, bundle, data
    from recpipe.pipeline.recommend import RecommendService
    from recpipe.pipeline.scoring import evaluate_split

    # batch scoring: every test user, one step, history guidance (w), full ranking + metrics, as evaluate does
    model, _, _ = bundle.load_model(cfg.run_dir, "idreamrec")
    ds = data.load(cfg.run_dir / "data")
    b = batches.Batcher(ds, model.history_len)
    scoring, quality = {}, {}
    for name, dt in (("float32", None), ("bfloat16", torch.bfloat16)):  # evaluate.dtype
        evaluate_split(model, b, "test", [10], users=np.arange(min(1024, ds.n_users)),
                       score_kwargs={"dtype": dt})  # warm-up: each precision has its own kernels
        t0 = time.perf_counter()
        res = evaluate_split(model, b, "test", [10], batch_size=cfg.evaluate.batch_size,
                             score_kwargs={"dtype": dt}, seed=cfg.run.seed)
        scoring[name] = ds.n_users / (time.perf_counter() - t0)
        quality[name] = (res["masked"]["NDCG@10"], res["unmasked"]["NDCG@10"])

    t0 = time.perf_counter()
    svc = RecommendService(cfg)
    load_s = time.perf_counter() - t0
    ds_users = svc.ds.users["user_id"].to_numpy()
    intents = ["a cozy mystery", "funny animated film for kids", "dark psychological thriller",
               "romantic comedy set in New York", "epic space adventure"]
    svc.recommend(str(ds_users[0]), intent=intents[0])  # load the TEM
    times = []
    for i in range(200):
        t = time.perf_counter()
        svc.recommend(str(ds_users[i % len(ds_users)]), intent=intents[i % len(intents)] + f" {i}")
        times.append((time.perf_counter() - t) * 1000)
    times_h = []
    for i in range(200):
        t = time.perf_counter()
        svc.recommend(str(ds_users[i % len(ds_users)]))
        times_h.append((time.perf_counter() - t) * 1000)
    cmd = [sys.executable, "-m", "recpipe.cli", "recommend", "--user", str(ds_users[0]), "--intent",
           "cozy mystery novel", "--dataset", cfg.run.dataset, "--run-dir", str(cfg.run_dir),
           "--data-dir", cfg.run.data_dir]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    cold = time.perf_counter() - t
    q = lambda xs, p: float(np.percentile(xs, p))
    return (
        "\n## Speed (2 CPU cores)\n"
        + "".join(
            f"- batch scoring, 1 step, every test user, full ranking + metrics, {torch.get_num_threads()} torch "
            f"threads, denoiser in {name} (evaluate.dtype): {scoring[name]:,.0f} users/s (target >= 5,000); "
            f"NDCG@10 {quality[name][0]:.4f} masked / {quality[name][1]:.4f} unmasked\n" for name in scoring)
        + f"- recommend, warm, with intent (TEM encode in {svc.dtype} + 1-step + FAISS), distinct intents: p50 "
        f"{q(times, 50):.1f} ms, p95 {q(times, 95):.1f} ms (target p50 <= 15 ms)\n"
        f"- recommend, warm, history only: p50 {q(times_h, 50):.1f} ms, p95 {q(times_h, 95):.1f} ms\n"
        f"- service load (artifacts, model, index): {load_s:.2f} s\n"
        f"- `recpipe recommend` cold command wall time: {cold:.2f} s (exit {r.returncode})\n"
        f"- mean {statistics.mean(times):.1f} ms over {len(times)} requests\n"
    )


if __name__ == "__main__":
    main()
