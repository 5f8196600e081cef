"""SASRec and iDreamRec (and RecBole's SASRec, when installed) at equal training wall-clock, one table.

    python bench/bench_budget.py --dataset ml-100k --data-dir ../shared/datasets --minutes 3 --threads 1 \\
        [--preset best|onestep|paper] [--recbole-python /tmp/recbole-venv/bin/python]

Each model trains for --minutes of training (validation not counted; train.max_minutes), one after the other on
this machine with the same threads; early stopping on validation still applies. recpipe's models run through
recpipe's own stages (`recpipe.pipeline.benchmark.train_and_evaluate`) in one run directory, so data, describe
(`--llm metadata` unless --set says otherwise) and embed run once and both models read them. Each is evaluated
on the test split (full ranking, every user, seen-masked and unmasked). Printed: one table (HR@10 and NDCG@10
of both columns, epochs reached, best epoch, training seconds, the CPU); written under
<run-dir>/bench_budget/: table.md, results.json, chart.png and curve.png (validation NDCG@10 against training
wall-clock, from each model's log.jsonl).

Presets: iDreamRec `best` is the recipe of docs/results.md#r-idreamrec-w256-e8 (item residual, CE with
lam 0.1, width 256, 8 heads, history guidance w = 1), `onestep` the same trained only at the timestep its
one-step sampler uses (`train_t=sampler`) under bf16 autocast with length-pooled window batches, `paper` the
model's defaults. SASRec takes the ML-1M recipe of docs/results.md#r-sasrec-ml1m (batch 128, lr 2e-3, 50
warm-up steps) with history 50 (RecBole's max length).

RecBole (issue #22 §5): with --recbole-python (an interpreter with recbole 1.2.1, e.g. a venv of its own;
default: this interpreter when it imports recbole, else no RecBole row) a subprocess trains RecBole's SASRec on
the same split: recpipe's data stage is written as RecBole atomic files whose timestamps are each user's
positions, so RecBole's leave-one-out by time (LS valid_and_test, TO) cuts exactly recpipe's split. It uses
RecBole's Config, create_dataset, data_preparation (each training prefix its own sample), SASRec and Trainer's
_train_epoch (Adam), never recbole.quick_start (which imports ray). After every epoch (and when the budget
ends mid-epoch) its model is scored outside RecBole with recpipe's metric code on the validation users, seen
items masked and unmasked; the epoch with the best masked NDCG@10 (recpipe's selection rule) is scored on test.
Architecture: max length 50, hidden 64, 2 blocks, 1 head, FFN 64, dropout 0.1, GELU, post-LN, CE, Adam lr 1e-3,
batch 256 (--recbole-set changes any of it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

PRESETS: dict[str, dict[str, str]] = {
    "best": {"model.idreamrec.item_residual": "true", "model.idreamrec.loss": "ce", "model.idreamrec.lam": "0.1",
             "model.idreamrec.width": "256", "model.idreamrec.heads": "8", "model.idreamrec.w": "1"},
    "paper": {},
}
# `best` trained for the one-step sampler it is scored with (t = T-1 only) under bf16 autocast (AMX / AVX512-BF16;
# slower where the CPU has no native bf16): docs/results.md#r-onestep-ml1m-60; its window batches length-pooled,
# which on short-history catalogs (Amazon) trains ~3.4x the targets a second (docs/results.md#r-window-pool)
PRESETS["onestep"] = {**PRESETS["best"], "model.idreamrec.train_t": "sampler", "train.precision": "bfloat16",
                      "train.length_pool": "50"}
SASREC_SETTINGS = {"train.batch_size": "128", "train.lr": "0.002", "train.warmup_steps": "50",
                   "model.sasrec.history_len": "50"}
RECBOLE_HP: dict[str, Any] = {
    "MAX_ITEM_LIST_LENGTH": 50, "hidden_size": 64, "n_layers": 2, "n_heads": 1, "inner_size": 64,
    "hidden_dropout_prob": 0.1, "attn_dropout_prob": 0.1, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
    "initializer_range": 0.02, "loss_type": "CE", "learning_rate": 1e-3, "train_batch_size": 256,
    "weight_decay": 0.0,
}
RECBOLE_NAME = "recbole-sasrec"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ recpipe
def recpipe_config(a, model: str):
    from recpipe.config import load_config, parse_set_options

    over: dict[str, Any] = {"run.dataset": a.dataset, "run.run_dir": str(a.run_dir), "run.seed": a.seed,
                            "train.max_minutes": a.minutes, "train.threads": a.threads, "train.epochs": a.epochs,
                            "train.patience": a.patience, "describe.llm": "metadata"}
    if a.data_dir:
        over["run.data_dir"] = str(a.data_dir)
    if model == "sasrec":
        over.update(SASREC_SETTINGS)
    if model == "idreamrec":
        over.update(PRESETS[a.preset])
    over.update(parse_set_options(a.set))
    return load_config(None, over)


def run_recpipe(a, models: list[str]) -> list[dict[str, Any]]:
    from recpipe.pipeline import benchmark, stages

    if not models:
        return []
    # the shared stages once, under the settings of a text model when there is one (describe, embed)
    first = next((m for m in models if m == "idreamrec"), models[0])
    for stage in stages.shared(models):
        stage.run(recpipe_config(a, first), log=log)
    rows = []
    for m in models:
        for r in benchmark.train_and_evaluate(recpipe_config(a, m), m, force=a.force, log=log):
            if m == "idreamrec":
                r["name"] = r["name"].replace("idreamrec", f"idreamrec ({a.preset})", 1)  # keeps "[cold targets]"
            rows.append(r)
    return rows


# ------------------------------------------------------------------------------------------------ RecBole
def write_atomic(ds, out_dir: Path, name: str) -> Path:
    """recpipe's split as RecBole atomic files: `name.inter` with recpipe's dense user and item ids and each
    user's position as the timestamp, so that RecBole's time order is recpipe's order exactly (raw timestamps
    tie within a user, and RecBole would then be free to reorder them)."""
    import pandas as pd

    d = out_dir / name
    d.mkdir(parents=True, exist_ok=True)
    lengths = np.diff(ds.offsets)
    user = np.repeat(np.arange(ds.n_users), lengths)
    pos = np.arange(len(ds.seq_items)) - np.repeat(ds.offsets[:-1], lengths)
    pd.DataFrame({"user_id:token": user, "item_id:token": ds.seq_items, "timestamp:float": pos}).to_csv(
        d / f"{name}.inter", sep="\t", index=False)
    np.savez(d / "sequences.npz", offsets=ds.offsets, items=ds.seq_items)
    return d


def recbole_python(a) -> str | None:
    """The interpreter that runs RecBole: --recbole-python, else this one when it imports recbole, else None."""
    if a.recbole_python:
        return str(a.recbole_python)
    import importlib.util

    return sys.executable if importlib.util.find_spec("recbole") is not None else None


def run_recbole(a, py: str, ks: list[int]) -> dict[str, Any]:
    from recpipe.config import parse_set_options
    from recpipe.pipeline import data as data_stage

    ds = data_stage.load_run(a.run_dir)
    work = a.run_dir / "bench_budget" / "recbole"
    name = "recpipe_split"
    write_atomic(ds, work, name)
    hp = dict(RECBOLE_HP)
    for k, v in parse_set_options(a.recbole_set).items():
        try:
            hp[k] = json.loads(v)  # numbers, true / false, lists
        except json.JSONDecodeError:
            hp[k] = v  # a word: gelu, CE
    spec = {"data_path": str(work), "dataset": name, "hp": hp, "minutes": a.minutes, "patience": a.patience,
            "epochs": a.epochs, "seed": a.seed, "threads": a.threads, "ks": ks, "root": str(ROOT)}
    (work / "spec.json").write_text(json.dumps(spec, indent=1))
    out = work / "result.json"
    out.unlink(missing_ok=True)
    cmd = [py, __file__, "--_worker", "recbole", "--spec", str(work / "spec.json"), "--out", str(out)]
    log(f"recbole: {' '.join(cmd)}")
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    p = subprocess.run(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
    if p.returncode != 0 or not out.exists():
        raise SystemExit(f"error: the RecBole subprocess failed (exit {p.returncode}); its output is above")
    res = json.loads(out.read_text())
    curve = [{"train_time_s": e["train_time_s"], "epoch": e["epoch"], "step": e["step"],
              "masked": e["valid"]["masked"]["NDCG@10"], "unmasked": e["valid"]["unmasked"]["NDCG@10"]}
             for e in res["log"]]
    return {"name": RECBOLE_NAME, "model": RECBOLE_NAME, "masked": res["test"]["masked"],
            "unmasked": res["test"]["unmasked"], "users": res["test"]["users"], "users_per_s": res["users_per_s"],
            "parameters": res["parameters"], "train_time_s": res["train_time_s"], "steps": res["steps"],
            "best_step": res["best_step"], "valid": res["best_valid"], "epochs": res["epochs"],
            "budget_minutes": a.minutes, "curve": curve, "recbole": {"version": res["version"], "hp": hp}}


class _BudgetSpent(Exception):
    pass


def worker_recbole(spec_path: Path, out_path: Path) -> None:
    """Runs under RecBole's interpreter: trains its SASRec under the budget, validates every epoch with
    recpipe's metric code (both columns), tests the best epoch; writes the figures as JSON."""
    spec = json.loads(spec_path.read_text())
    sys.path.insert(0, spec["root"])
    # RecBole 1.2.1's Config aliases numpy names that NumPy 2 removed (np.float_ ...); give them back so that it
    # runs on the numpy its own dependencies pull in
    for old, new in (("float_", "float64"), ("complex_", "complex128"), ("unicode_", "str_")):
        if not hasattr(np, old):
            setattr(np, old, getattr(np, new))
    import recbole
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    from recpipe.models.metrics import RankAccumulator, history_mask

    torch.set_num_threads(spec["threads"])
    name = spec["dataset"]
    config = Config(model="SASRec", dataset=name, config_dict={
        **spec["hp"], "data_path": spec["data_path"], "seed": spec["seed"], "reproducibility": True,
        "use_gpu": False, "device": "cpu", "show_progress": False, "state": "WARNING", "epochs": spec["epochs"],
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "train_neg_sample_args": None,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": "full"},
        "checkpoint_dir": str(Path(spec["data_path"]) / "saved"), "worker": 0})
    init_seed(config["seed"], config["reproducibility"])
    t0 = time.perf_counter()
    dataset = create_dataset(config)
    train_data, _, _ = data_preparation(config, dataset)
    print(f"recbole: data ready in {time.perf_counter() - t0:.0f} s: {len(train_data.dataset)} training samples, "
          f"{len(train_data)} batches an epoch", file=sys.stderr, flush=True)
    init_seed(config["seed"], config["reproducibility"])
    model = SASRec(config, train_data.dataset).to("cpu")
    trainer = Trainer(config, model)
    torch.set_num_threads(spec["threads"])

    # recpipe's ids -> RecBole's: RecBole re-indexes the tokens (recpipe's dense ids as strings)
    tokens = dataset.field2id_token["item_id"]
    with np.load(Path(spec["data_path"]) / name / "sequences.npz") as z:
        offsets, items = z["offsets"], z["items"]
    n_items = int(items.max())
    rb_of = np.zeros(n_items + 1, dtype=np.int64)
    for rb, tok in enumerate(tokens):
        if rb:
            rb_of[int(tok)] = rb
    if (rb_of[1:] == 0).any():
        raise SystemExit("error: RecBole dropped items of recpipe's split; the tables would differ")
    L = config["MAX_ITEM_LIST_LENGTH"]
    seqs = [items[offsets[u]: offsets[u + 1]] for u in range(len(offsets) - 1)]

    @torch.no_grad()
    def score(split: str) -> tuple[dict[str, Any], float]:
        from recbole.data.interaction import Interaction

        cut = {"valid": 2, "test": 1}[split]
        model.eval()
        acc = RankAccumulator()
        t = time.perf_counter()
        for i in range(0, len(seqs), 256):
            hist = [s[: len(s) - cut] for s in seqs[i: i + 256]]
            tgt = torch.as_tensor([int(s[len(s) - cut]) for s in seqs[i: i + 256]])
            seq = torch.zeros(len(hist), L, dtype=torch.long)  # RecBole's layout: left-aligned, zeros after
            lens = torch.zeros(len(hist), dtype=torch.long)
            for j, h in enumerate(hist):
                h = rb_of[h[-L:]]
                seq[j, : len(h)] = torch.as_tensor(h)
                lens[j] = len(h)
            s_rb = model.full_sort_predict(Interaction({"item_id_list": seq, "item_length": lens}))
            scores = s_rb[:, torch.as_tensor(rb_of)]  # recpipe's columns; column 0 (padding) is never ranked
            acc.add(scores, tgt, history_mask(hist, n_items))
        model.train()
        res = acc.result(spec["ks"])
        return res, len(seqs) / (time.perf_counter() - t)

    budget = 60.0 * spec["minutes"] if spec["minutes"] else float("inf")
    per_epoch = len(train_data)
    st = {"train_time": 0.0, "step": 0, "batch": 0, "t_epoch": 0.0, "losses": []}

    def loss_func(interaction):  # RecBole's loss, stopped where the budget ends (before the step, not after)
        if st["train_time"] + time.perf_counter() - st["t_epoch"] >= budget:
            raise _BudgetSpent
        loss = model.calculate_loss(interaction)
        st["step"] += 1
        st["batch"] += 1
        st["losses"].append(float(loss.detach()))
        return loss

    log_entries, best, best_state, bad = [], -1.0, None, 0
    for epoch in range(spec["epochs"]):
        st["batch"], st["losses"], st["t_epoch"] = 0, [], time.perf_counter()
        spent = False
        try:
            trainer._train_epoch(train_data, epoch, loss_func=loss_func)
        except _BudgetSpent:
            spent = True
        st["train_time"] += time.perf_counter() - st["t_epoch"]
        if st["batch"] == 0 and spent:
            break  # the budget ended exactly at an epoch's end: that epoch is validated already
        res, _ = score("valid")
        entry = {"epoch": round(epoch + st["batch"] / per_epoch, 3), "step": st["step"],
                 "loss": float(np.mean(st["losses"])) if st["losses"] else None, "valid": res,
                 "train_time_s": round(st["train_time"], 2)}
        log_entries.append(entry)
        ndcg = res["masked"]["NDCG@10"]
        loss = "-" if entry["loss"] is None else f"{entry['loss']:.4f}"
        print(f"recbole: epoch {entry['epoch']:.2f} step {st['step']} loss {loss} train "
              f"{st['train_time']:.0f} s  valid NDCG@10 {ndcg:.4f} (unmasked {res['unmasked']['NDCG@10']:.4f})",
              file=sys.stderr, flush=True)
        if ndcg > best:
            best, bad = ndcg, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_entry = entry
        else:
            bad += 1
        if spent or bad >= spec["patience"]:
            break
    model.load_state_dict(best_state)
    test, users_per_s = score("test")
    out = {"version": recbole.__version__, "log": log_entries, "test": {**test, "users": len(seqs)},
           "users_per_s": users_per_s, "parameters": sum(p.numel() for p in model.parameters()),
           "train_time_s": round(st["train_time"], 2), "steps": st["step"], "best_step": best_entry["step"],
           "best_valid": best_entry["valid"], "epochs": round(log_entries[-1]["epoch"], 2)}
    out_path.write_text(json.dumps(out, indent=1))


# ------------------------------------------------------------------------------------------------ table
def one_table(result: dict[str, Any]) -> str:
    """The printed table: @10 of both columns, epochs reached, best epoch, training seconds."""
    from recpipe.pipeline import benchmark

    def best_epoch(r: dict[str, Any]) -> str:
        hit = [p["epoch"] for p in r.get("curve") or [] if p["step"] == r["best_step"]]
        return f"{hit[0]:.2f}" if hit else "-"

    head = ["model", "HR@10 masked", "NDCG@10 masked", "HR@10 unmasked", "NDCG@10 unmasked", "epochs",
            "best epoch", "train s", "params"]
    lines = [f"{result['dataset']}, {result['split']} split, full ranking, every user.",
             benchmark.budget_line(result), benchmark.cpu_line(result), "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        epochs = "-" if r.get("epochs") is None else f"{r['epochs']:.2f}"
        lines.append(f"| {r['name']} | {r['masked']['HR@10']:.4f} | {r['masked']['NDCG@10']:.4f} | "
                     f"{r['unmasked']['HR@10']:.4f} | {r['unmasked']['NDCG@10']:.4f} | {epochs} | {best_epoch(r)} | "
                     f"{r['train_time_s']:,.0f} | {r['parameters']:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", "-d", default="ml-100k")
    ap.add_argument("--minutes", type=float, help="training wall-clock per model (validation not counted)")
    ap.add_argument("--data-dir", type=Path, help="where the dataset name resolves (recpipe's run.data_dir)")
    ap.add_argument("--run-dir", type=Path, help="recpipe's run directory [default: cache/budget-<dataset>]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every model")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--models", default="sasrec,idreamrec", help="recpipe models, comma-separated ('' = none)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="best", help="iDreamRec's settings")
    ap.add_argument("--epochs", type=int, default=200, help="upper bound on epochs; the budget ends runs first")
    ap.add_argument("--patience", type=int, default=10, help="validations without a better NDCG@10 before a stop")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recpipe setting, every model")
    ap.add_argument("--recbole-python", type=Path, help="interpreter with recbole 1.2.1 [default: this one if it "
                                                        "imports recbole, else no RecBole row]")
    ap.add_argument("--no-recbole", action="store_true", help="leave RecBole out even when it is installed")
    ap.add_argument("--recbole-set", action="append", default=[], metavar="KEY=VALUE",
                    help="RecBole config value (e.g. inner_size=256)")
    ap.add_argument("--force", action="store_true", help="retrain recpipe's models even when current")
    ap.add_argument("--_worker", choices=["recbole"], help=argparse.SUPPRESS)
    ap.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._worker == "recbole":
        worker_recbole(a.spec, a.out)
        return
    sys.path.insert(0, str(ROOT))
    if a.minutes is None or not a.minutes > 0:
        ap.error("--minutes M (> 0) is required: the training budget of each model")
    a.run_dir = (a.run_dir or Path("cache") / f"budget-{a.dataset}").resolve()
    import torch

    from recpipe import cpu
    from recpipe.errors import RecpipeError
    from recpipe.pipeline import benchmark

    torch.set_num_threads(a.threads)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    try:
        py = None if a.no_recbole else recbole_python(a)
        if py is None and not a.no_recbole:
            log("recbole: not installed here and no --recbole-python given; no RecBole row")
        rows = run_recpipe(a, models)
        cfg = recpipe_config(a, models[0] if models else "sasrec")
        if not models:
            from recpipe.pipeline import data as data_stage

            data_stage.run(cfg, log=log)
        if py is not None:
            rows.append(run_recbole(a, py, cfg.evaluate.ks))
    except RecpipeError as e:
        raise SystemExit(f"error: {e}") from None
    if not rows:
        raise SystemExit("error: no model to table: give --models or a RecBole interpreter")
    result = benchmark.table_result(cfg, rows)
    result["cpu"] = cpu.describe(a.threads)
    out = a.run_dir / "bench_budget"
    benchmark.write(result, out)  # table.md: every cut-off; summary.md: the table printed here
    table = one_table(result)
    (out / "summary.md").write_text(table)
    print(table)
    print(f"written: {out} (summary.md, table.md, results.json, chart.png, curve.png)")


if __name__ == "__main__":
    main()
