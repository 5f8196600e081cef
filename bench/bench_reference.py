"""recpipe's DiffuRec / DiffuRecSys / DreamRec ports side by side with their reference code (issue #24 §1).

    python bench/bench_reference.py --ref-dir /tmp/ref/DiffuRec --model diffurec --epochs 3 --seeds 0 1

--ref-dir is a checkout of the reference (WHUIR/DiffuRec, shararezr/DiffuRecSys or YangZhengyi98/DreamRec);
nothing of it is copied into recpipe. ml-100k (recpipe's own data stage: 5-core, first of repeated pairs,
leave-one-out by time) is converted once into the reference's input format under --work-dir. For each seed,
one subprocess imports the reference's own modules (its model, diffusion and data loader classes; shims only
for CPU and numpy >= 1.24) and trains them with its trainer's loop, and another trains recpipe's port with
the same hyperparameters (the reference's optimizer, batch size and widths; recpipe's batches). After every
epoch both score the validation users once, and that one score matrix is read two ways:
- "their eval": the reference's own metric code (`hrs_and_ndcgs_k`: top-k over every column, padding
  included, no masking, averaged per batch of its loader);
- "recpipe eval": recpipe's protocol (padding never rankable, pessimistic ties, averaged per user), both
  columns: unmasked and seen-masked.
The loss column is the mean training loss over the epoch's batches (the reference prints only the last one).

Reference faults that move its numbers and are not port faults (shared/REFERENCE.md): for DiffuRec the
attention masks padded queries, not keys (padding keys are attended) and has no causal mask, the padding
embedding is learnable and rankable; for DiffuRecSys its HEAD commit feeds the original input to every block
(only the last counts), its cross-attention is a linear attention normalised over the head axis, and it has
neither the offset noise (toggled off in the last commit) nor the multi-seed ensemble -- so the port is run
with offset_noise=0 and ensemble_seeds=1 here unless --port-defaults is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# ../shared next to the checkout, or $RECPIPE_SHARED (as the tests find it)
DATASET = Path(os.environ.get("RECPIPE_SHARED") or ROOT.parent / "shared") / "datasets" / "ml-100k"

# the reference's own hyperparameters (its argparse defaults / default_params; REFERENCE.md)
REF_HP = {
    "diffurec": {"max_len": 50, "batch_size": 512, "hidden_size": 128, "dropout": 0.1, "emb_dropout": 0.3,
                 "num_blocks": 4, "lr": 1e-3, "weight_decay": 0.0, "decay_step": 100, "gamma": 0.1,
                 "diffusion_steps": 32, "lambda_uncertainty": 0.001, "noise_schedule": "trunc_lin",
                 "schedule_sampler_name": "lossaware"},
    "diffurecsys": {"max_len": 100, "batch_size": 512, "hidden_size": 256, "dropout": 0.1, "emb_dropout": 0.3,
                    "num_blocks": 4, "lr": 1e-3, "weight_decay": 1e-4, "decay_step": 30, "gamma": 0.1,
                    "diffusion_steps": 32, "lambda_uncertainty": 0.001, "noise_schedule": "trunc_lin",
                    "schedule_sampler_name": "lossaware"},
}
# DreamRec: its README's YooChoose command (T 500, lr 1e-3, exp, w 2, adamw, mlp1), argparse defaults for the rest
REF_HP["dreamrec"] = {"seq_size": 10, "batch_size": 256, "hidden_factor": 64, "timesteps": 500, "lr": 1e-3,
                      "beta_sche": "exp", "w": 2.0, "p": 0.1, "dropout_rate": 0.1, "l2_decay": 0.0,
                      "optimizer": "adamw", "diffuser_type": "mlp1", "beta_start": 1e-4, "beta_end": 0.02}
KS = [5, 10, 20]


# ------------------------------------------------------------------------------------------------ data
def load_dataset():
    """ml-100k through recpipe's data stage (the split both sides read)."""
    sys.path.insert(0, str(ROOT))
    from recpipe.config import DataConfig
    from recpipe.pipeline import data as data_stage

    p = data_stage.process(data_stage.load_raw(DATASET), DataConfig(), source=str(DATASET))
    return data_stage.Dataset(p.items, p.users, p.offsets, p.seq_items, p.seq_times)


def diffurec_pickle(work: Path) -> Path:
    """DiffuRec's dataset.pkl: {'train': {u: items[:-2]}, 'val': {u: [items[-2]]}, 'test': {u: [items[-1]]},
    'umap', 'smap'} with items 1..n (0 = padding), users 0..n-1 -- the layout of its shipped pickles."""
    out = work / "ml-100k" / "dataset.pkl"
    if out.exists():
        return out
    ds = load_dataset()
    train, val, test = {}, {}, {}
    for u in range(ds.n_users):
        s = [int(x) for x in ds.sequence(u)]
        train[u], val[u], test[u] = s[:-2], [s[-2]], [s[-1]]
    smap = {i: i for i in range(1, ds.n_items + 1)}
    umap = {u: u for u in range(ds.n_users)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:
        pickle.dump({"train": train, "val": val, "test": test, "umap": umap, "smap": smap}, f)
    return out


def dreamrec_frames(work: Path, seq_size: int) -> Path:
    """DreamRec's data directory: data_statis.df (seq_size, item_num), train_data.df / val_data.df with
    columns seq (the last seq_size items, RIGHT-padded with item_num), len_seq, next; items 0..n-1
    (recpipe id - 1). Training rows: every position of each user's training part with a non-empty history
    (recpipe's training positions); validation rows: each user's training part -> its second-to-last item."""
    import pandas as pd

    out = work / f"ml-100k-dreamrec-{seq_size}"
    if (out / "val_data.df").exists():
        return out
    ds = load_dataset()
    n = ds.n_items

    def row(hist: list[int], nxt: int) -> dict:
        h = hist[-seq_size:]
        return {"seq": h + [n] * (seq_size - len(h)), "len_seq": len(h), "next": nxt}

    train, val = [], []
    for u in range(ds.n_users):
        s = [int(x) - 1 for x in ds.sequence(u)]
        tr = s[:-2]
        train += [row(tr[:i], tr[i]) for i in range(1, len(tr))]
        val.append(row(tr, s[-2]))
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"seq_size": [seq_size], "item_num": [n]}).to_pickle(out / "data_statis.df")
    pd.DataFrame(train).to_pickle(out / "train_data.df")
    pd.DataFrame(val).to_pickle(out / "val_data.df")
    return out


# ------------------------------------------------------------------------------------------- metrics
def their_metrics(score_batches, label_batches, ref_metric) -> dict[str, float]:
    """The reference's evaluation: its metric function per loader batch, then the mean of batch means."""
    acc: dict[str, list[float]] = {}
    for s, y in zip(score_batches, label_batches):
        for k, v in ref_metric(s, y.view(-1, 1), KS).items():
            acc.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def dreamrec_their_metrics(scores, labels, calculate_hit, batch: int = 100) -> dict[str, float]:
    """DreamRec's `evaluate`: batches of 100 (the last partial one dropped), top-100 by torch.topk over every
    column (its padding row included), its `calculate_hit`; NDCG = 1 / log2(rank + 1) with rank from 1."""
    hit, ndcg, total = [0.0] * len(KS), [0.0] * len(KS), 0
    for i in range(len(labels) // batch):
        s, y = scores[i * batch: (i + 1) * batch], labels[i * batch: (i + 1) * batch]
        top = np.flip(s.topk(100, dim=1, largest=True, sorted=True)[1].numpy(), axis=1)
        calculate_hit(top, KS, list(y.numpy()), hit, ndcg)
        total += batch
    out = {}
    for i, k in enumerate(KS):
        out[f"HR@{k}"] = hit[i] / total
        out[f"NDCG@{k}"] = float(np.asarray(ndcg[i]).reshape(-1)[0]) / total
    return out


def dreamrec_calculate_hit(sorted_list, topk, true_items, hit_purchase, ndcg_purchase):
    """DreamRec's utility.calculate_hit, restated so recpipe's side never imports reference code."""
    for i in range(len(topk)):
        rec_list = sorted_list[:, -topk[i]:]
        for j in range(len(true_items)):
            if true_items[j] in rec_list[j]:
                rank = topk[i] - np.argwhere(rec_list[j] == true_items[j])
                hit_purchase[i] += 1.0
                ndcg_purchase[i] += 1.0 / np.log2(rank + 1)


def recpipe_metrics(score_batches, label_batches, seen_batches) -> dict[str, dict[str, float]]:
    """recpipe's protocol: padding never rankable, per-user mean, unmasked and seen-masked; "se@K" is the
    standard error of NDCG@K over users (the noise a difference has to clear)."""
    from recpipe.models.metrics import RankAccumulator, history_mask

    acc = RankAccumulator()
    for s, y, seen in zip(score_batches, label_batches, seen_batches):
        s = s.clone().float()
        s[:, 0] = -float("inf")
        acc.add(s, y.view(-1).long(), history_mask(seen, s.shape[1] - 1))
    r = acc.result(KS)
    for col, ranks in (("unmasked", acc.unmasked), ("masked", acc.masked)):
        rk = np.concatenate(ranks).astype(np.float64)
        for k in KS:
            nd = np.where(rk < k, 1.0 / np.log2(rk + 2.0), 0.0)
            r[col][f"se@{k}"] = float(nd.std(ddof=1) / np.sqrt(len(nd)))
    return {"unmasked": r["unmasked"], "masked": r["masked"]}


# ------------------------------------------------------------------------------------------- workers
def ref_namespace(model: str, hp: dict, n_items: int, seed: int, device: str = "cpu"):
    return argparse.Namespace(
        dataset="ml-100k", random_seed=seed, device=device, num_gpu=1, hidden_act="gelu", metric_ks=KS,
        optimizer="Adam", momentum=None, loss_lambda=0.001, rescale_timesteps=True, item_num=n_items, **hp)


def worker_ref(a) -> dict:
    """Train the reference with its own classes and its trainer's loop; score validation after every epoch."""
    import random

    import torch

    np.int = int  # numpy >= 1.24 removed np.int, which DiffuRec's LossSecondMomentResampler uses
    src = Path(a.ref_dir) / ("src" if (Path(a.ref_dir) / "src" / "model.py").exists() else "")
    sys.path.insert(0, str(src))
    import model as ref_model  # noqa: PLC0415 -- the reference's own modules
    data_mod = __import__("utils" if (src / "utils.py").exists() else "tools")
    train_mod = __import__("trainer" if (src / "trainer.py").exists() else "training")

    with open(a.data, "rb") as f:
        raw = pickle.load(f)
    hp = json.loads(a.hp)
    args = ref_namespace(a.model, hp, len(raw["smap"]), a.seed)
    # main.fix_random_seed_as
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    np.random.seed(a.seed)
    tra = data_mod.Data_Train(raw["train"], args).get_pytorch_dataloaders()
    val = data_mod.Data_Val(raw["train"], raw["val"], args).get_pytorch_dataloaders()
    seen = [raw["train"][u] for u in sorted(raw["train"])]
    model = ref_model.Att_Diffuse_model(ref_model.create_model_diffu(args), args)
    opt = train_mod.optimizers(model, args)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.decay_step, gamma=args.gamma)
    rows = []
    for epoch in range(a.epochs):
        t0 = time.time()
        model.train()
        losses = []
        for bi, batch in enumerate(tra):  # trainer.model_train's loop
            if a.max_batches and bi >= a.max_batches:
                break
            opt.zero_grad()
            _, diffu_rep, _, _, _, _ = model(batch[0], batch[1], train_flag=True)
            loss = model.loss_diffu_ce(diffu_rep, batch[1])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        t_train = time.time() - t0
        model.eval()
        scores, labels = [], []
        with torch.no_grad():
            for batch in val:  # trainer.model_train's validation
                _, rep, _, _, _, _ = model(batch[0], batch[1], train_flag=False)
                scores.append(model.diffu_rep_pre(rep))
                labels.append(batch[1].view(-1))
        seen_b, i = [], 0
        for y in labels:
            seen_b.append([np.asarray(s) for s in seen[i: i + len(y)]])
            i += len(y)
        rows.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "last_loss": losses[-1],
                     "theirs": their_metrics(scores, labels, train_mod.hrs_and_ndcgs_k),
                     "recpipe": recpipe_metrics(scores, labels, seen_b),
                     "train_s": t_train, "eval_s": time.time() - t0 - t_train})
        print(json.dumps({"progress": rows[-1]}), file=sys.stderr, flush=True)
    return {"rows": rows}


def worker_ref_dreamrec(a) -> dict:
    """DreamRec's own Tenc / diffusion classes and its training loop (DreamRec.py's __main__), validation
    after every epoch with its `predict` (in train mode: it never calls model.eval())."""
    import pandas as pd
    import torch

    hp = json.loads(a.hp)
    argv = ["DreamRec.py", "--random_seed", str(a.seed)]
    for k in ("batch_size", "hidden_factor", "timesteps", "lr", "beta_sche", "w", "p", "dropout_rate",
              "l2_decay", "optimizer", "diffuser_type", "beta_start", "beta_end"):
        argv += [f"--{k}", str(hp[k])]
    sys.argv = argv  # DreamRec.py parses its arguments (and seeds) when imported
    sys.path.insert(0, str(a.ref_dir))
    import DreamRec as R  # noqa: N813 -- the reference's own module
    import utility

    device = torch.device("cpu")
    R.device = device  # a global of its __main__ block that `diffusion.sample` reads
    data = Path(a.data)
    statis = pd.read_pickle(data / "data_statis.df")
    seq_size, item_num = int(statis["seq_size"][0]), int(statis["item_num"][0])
    args = R.args
    model = R.Tenc(args.hidden_factor, item_num, seq_size, args.dropout_rate, args.diffuser_type, device)
    diff = R.diffusion(args.timesteps, args.beta_start, args.beta_end, args.w)
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[args.optimizer]
    optimizer = opt_cls(model.parameters(), lr=args.lr, eps=1e-8, weight_decay=args.l2_decay)
    train_data = pd.read_pickle(data / "train_data.df")
    val = pd.read_pickle(data / "val_data.df")
    vseq, vlen, vnext = list(val["seq"].values), list(val["len_seq"].values), list(val["next"].values)
    ds = load_dataset()  # the seen-masked column masks each user's whole training part (recpipe ids)
    seen = [ds.sequence(u)[:-2] for u in range(ds.n_users)]
    num_batches = int(train_data.shape[0] / args.batch_size)
    rows = []
    for epoch in range(a.epochs):
        t0 = time.time()
        losses = []
        for j in range(num_batches):
            if a.max_batches and j >= a.max_batches:
                break
            batch = train_data.sample(n=args.batch_size).to_dict()
            seq = torch.LongTensor(list(batch["seq"].values()))
            len_seq = torch.LongTensor(list(batch["len_seq"].values()))
            target = torch.LongTensor(list(batch["next"].values()))
            optimizer.zero_grad()
            x_start = model.cacu_x(target)
            h = model.cacu_h(seq, len_seq, args.p)
            n = torch.randint(0, args.timesteps, (args.batch_size,), device=device).long()
            loss, _ = diff.p_losses(model, x_start, h, n, loss_type="l2")
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        t_train = time.time() - t0
        scores = []
        with torch.no_grad():
            for i in range(0, len(vseq), 100):
                states = torch.LongTensor(np.array(vseq[i: i + 100]))
                scores.append(model.predict(states, np.array(vlen[i: i + 100]), diff))
        sc = torch.cat(scores)
        y = torch.as_tensor(vnext)
        theirs = dreamrec_their_metrics(sc, y, utility.calculate_hit)
        # recpipe's layout: column 0 = padding (their row item_num), items 1..n
        sc_r = torch.cat([sc[:, item_num:], sc[:, :item_num]], dim=1)
        mine = recpipe_metrics([sc_r], [y + 1], [seen])
        rows.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "last_loss": losses[-1],
                     "theirs": theirs, "recpipe": mine, "train_s": t_train, "eval_s": time.time() - t0 - t_train})
        print(json.dumps({"progress": rows[-1]}), file=sys.stderr, flush=True)
    return {"rows": rows}


def worker_ours_dreamrec(a) -> dict:
    """recpipe's DreamRec with the reference's settings on recpipe's batches; validation in eval mode."""
    import torch

    sys.path.insert(0, str(ROOT))
    from recpipe.models.base import build_model, get_model_config_cls
    from recpipe.pipeline.batches import Batcher, iterate_training

    hp = json.loads(a.hp)
    ds = load_dataset()
    torch.manual_seed(a.seed)
    cfg = get_model_config_cls("dreamrec")(
        history_len=hp["seq_size"], hidden=hp["hidden_factor"], dropout=hp["dropout_rate"], T=hp["timesteps"],
        schedule=hp["beta_sche"], beta_start=hp["beta_start"], beta_end=hp["beta_end"], p_uncond=hp["p"],
        w=hp["w"])
    model = build_model("dreamrec", cfg, ds.n_items)
    b = Batcher(ds, model.history_len)
    opt_cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[hp["optimizer"]]
    opt = opt_cls(model.parameters(), lr=hp["lr"], eps=1e-8, weight_decay=hp["l2_decay"])
    gen = torch.Generator().manual_seed(a.seed)
    users = np.arange(ds.n_users)
    rows = []
    for epoch in range(a.epochs):
        t0 = time.time()
        model.train()
        losses = []
        for bi, batch in enumerate(iterate_training(b, model.train_mode, hp["batch_size"], epoch, a.seed)):
            if a.max_batches and bi >= a.max_batches:
                break
            batch.pop("_pos", None)
            opt.zero_grad()
            loss = model.loss(batch, generator=gen)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        t_train = time.time() - t0
        model.eval()
        eg = torch.Generator().manual_seed(a.seed * 1000 + epoch)
        batch, seen = b.eval_batch(users, "valid")
        with torch.no_grad():
            sc = model.score_all(batch, generator=eg)
        y = batch["target"]
        # their metric on their layout: items 0..n-1, padding last (here never rankable)
        theirs = dreamrec_their_metrics(torch.cat([sc[:, 1:], sc[:, :1]], dim=1), y - 1, dreamrec_calculate_hit)
        rows.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "last_loss": losses[-1],
                     "theirs": theirs, "recpipe": recpipe_metrics([sc], [y], [seen]),
                     "train_s": t_train, "eval_s": time.time() - t0 - t_train})
        print(json.dumps({"progress": rows[-1]}), file=sys.stderr, flush=True)
    return {"rows": rows}


def port_config(model: str, hp: dict, port_defaults: bool):
    from recpipe.models.base import get_model_config_cls

    cfg = get_model_config_cls(model)(
        history_len=hp["max_len"], hidden=hp["hidden_size"], n_blocks=hp["num_blocks"], dropout=hp["dropout"],
        emb_dropout=hp["emb_dropout"], T=hp["diffusion_steps"], schedule=hp["noise_schedule"],
        lambda_uncertainty=hp["lambda_uncertainty"])
    if model == "diffurecsys" and not port_defaults:  # what the reference's HEAD runs (see the module doc)
        cfg.offset_noise, cfg.ensemble_seeds = 0.0, 1
    return cfg


def worker_ours(a) -> dict:
    """Train recpipe's port with the reference's hyperparameters on recpipe's batches; same validation."""
    import torch

    sys.path.insert(0, str(ROOT))
    from recpipe.models.base import build_model
    from recpipe.pipeline.batches import Batcher, iterate_training

    with open(a.data, "rb") as f:
        raw = pickle.load(f)
    hp = json.loads(a.hp)
    ds = load_dataset()
    torch.manual_seed(a.seed)
    model = build_model(a.model, port_config(a.model, hp, a.port_defaults), ds.n_items)
    b = Batcher(ds, model.history_len)
    opt = torch.optim.Adam(model.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=hp["decay_step"], gamma=hp["gamma"])
    gen = torch.Generator().manual_seed(a.seed)
    users = np.arange(ds.n_users)
    bs = hp["batch_size"]
    # the reference's validation: each user's training part, cut to max_len, in user order
    assert all(int(ds.sequence(u)[-2]) == raw["val"][u][0] for u in range(ds.n_users))
    rows = []
    for epoch in range(a.epochs):
        t0 = time.time()
        model.train()
        losses = []
        for bi, batch in enumerate(iterate_training(b, model.train_mode, bs, epoch, a.seed)):
            if a.max_batches and bi >= a.max_batches:
                break
            batch.pop("_pos", None)
            opt.zero_grad()
            loss = model.loss(batch, generator=gen)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        sched.step()
        t_train = time.time() - t0
        model.eval()
        scores, labels, seen_b = [], [], []
        eg = torch.Generator().manual_seed(a.seed * 1000 + epoch)
        with torch.no_grad():
            for i in range(0, ds.n_users, bs):
                batch, seen = b.eval_batch(users[i: i + bs], "valid")
                scores.append(model.score_all(batch, generator=eg))
                labels.append(batch["target"])
                seen_b.append(seen)
        rows.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "last_loss": losses[-1],
                     "theirs": their_metrics(scores, labels, ref_hrs_ndcgs),
                     "recpipe": recpipe_metrics(scores, labels, seen_b),
                     "train_s": t_train, "eval_s": time.time() - t0 - t_train})
        print(json.dumps({"progress": rows[-1]}), file=sys.stderr, flush=True)
    return {"rows": rows}


def ref_hrs_ndcgs(scores, labels, ks):
    """DiffuRec's trainer.hrs_and_ndcgs_k, restated so recpipe's side never imports reference code: top-k by
    torch.topk over every column, HR = hits / batch, NDCG = DCG of the hit over DCG of rank 0, batch means."""
    import torch

    _, top = torch.topk(scores, k=max(ks), dim=-1)
    hit = (labels == top).int()
    out = {}
    for k in ks:
        disc = torch.log2(torch.arange(1, k + 1) + 1).unsqueeze(0)
        out[f"HR@{k}"] = hit[:, :k].sum().item() / labels.size()[0]
        out[f"NDCG@{k}"] = ((hit[:, :k] / disc).sum(-1) / (1.0 / disc[0, 0])).mean().item()
    return out


# ---------------------------------------------------------------------------------------------- main
def run_worker(kind: str, a, hp: dict, data: Path, seed: int) -> dict:
    cmd = [sys.executable, __file__, "--_worker", kind, "--ref-dir", str(a.ref_dir), "--model", a.model,
           "--epochs", str(a.epochs), "--data", str(data), "--hp", json.dumps(hp), "--seed", str(seed),
           "--max-batches", str(a.max_batches)]
    if a.port_defaults:
        cmd.append("--port-defaults")
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads),
               CUDA_VISIBLE_DEVICES="")
    t0 = time.time()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"error: {kind} worker (seed {seed}) failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    out["wall_s"] = time.time() - t0
    return out


def rel(ours: float, ref: float) -> str:
    return "  n/a" if ref == 0 else f"{100 * (ours - ref) / ref:+5.0f}%"


def _cols(row: dict, nd: str) -> tuple[float, float, float]:
    return row["theirs"][nd], row["recpipe"]["unmasked"][nd], row["recpipe"]["masked"][nd]


def _se(row: dict, k: int) -> tuple[float, float]:
    """(unmasked, masked) standard errors of NDCG@k over users; nan for rows written without them."""
    return tuple(row["recpipe"][c].get(f"se@{k}", float("nan")) for c in ("unmasked", "masked"))


def print_table(title: str, ref_rows: list[dict], our_rows: list[dict], k: int) -> list[tuple[float, float]]:
    """One table; returns per epoch and eval (relative difference, difference in combined standard errors)."""
    nd = f"NDCG@{k}"
    print(f"\n{title}  (valid {nd}; loss = mean over the epoch's batches; se = standard error over users)")
    print(f"{'ep':>3} | {'loss ref':>8} {'ours':>8} | {'their eval ref':>14} {'ours':>7} {'d':>6} | "
          f"{'recpipe unmasked ref':>20} {'ours':>7} {'d':>6} | {'masked ref':>10} {'ours':>7} {'d':>6} | "
          f"{'se ref':>6} {'ours':>6}")
    out = []
    for r, o in zip(ref_rows, our_rows):
        rc, oc = _cols(r, nd), _cols(o, nd)
        rs, os_ = _se(r, k), _se(o, k)
        print(f"{r['epoch']:>3} | {r['loss']:8.4f} {o['loss']:8.4f} | {rc[0]:14.4f} {oc[0]:7.4f} {rel(oc[0], rc[0])} | "
              f"{rc[1]:20.4f} {oc[1]:7.4f} {rel(oc[1], rc[1])} | {rc[2]:10.4f} {oc[2]:7.4f} {rel(oc[2], rc[2])} | "
              f"{rs[0]:6.4f} {os_[0]:6.4f}")
        for i, (a_, b_) in enumerate(zip(rc, oc)):
            j = (0, 0, 1)[i]  # their eval (unmasked) is judged with the unmasked column's error
            se = math.hypot(rs[j], os_[j])
            out.append(((b_ - a_) / a_ if a_ else 0.0, (b_ - a_) / se if se > 0 else float("nan")))
    return out


def mean_rows(runs: list[list[dict]], k: int) -> list[dict]:
    """Per epoch, the mean over seeds of every shown figure (standard errors combined as of a mean)."""
    nd, se = f"NDCG@{k}", f"se@{k}"
    rows = []
    for ep in zip(*runs):
        n = len(ep)
        def mean(f, ep=ep) -> float:
            return float(np.mean([f(r) for r in ep]))

        rows.append({
            "epoch": ep[0]["epoch"], "loss": mean(lambda r: r["loss"]),
            "theirs": {nd: mean(lambda r: r["theirs"][nd])},
            "recpipe": {c: {nd: mean(lambda r, c=c: r["recpipe"][c][nd]),
                            se: math.sqrt(sum(r["recpipe"][c].get(se, float("nan")) ** 2 for r in ep)) / n}
                        for c in ("unmasked", "masked")}})
    return rows


def report(model: str, results: dict, k: int) -> None:
    for seed, res in results.items():
        print_table(f"{model}  seed {seed}", res["ref"]["rows"], res["ours"]["rows"], k)
        print(f"    time: ref {res['ref']['wall_s']:.0f} s, ours {res['ours']['wall_s']:.0f} s "
              f"(train + eval, {len(res['ref']['rows'])} epochs, other jobs running)")
    runs = list(results.values())
    diffs = print_table(f"{model}  mean over seeds {', '.join(map(str, results))}",
                        mean_rows([r["ref"]["rows"] for r in runs], k), mean_rows([r["ours"]["rows"] for r in runs], k),
                        k)
    worst = min(d for d, _ in diffs)
    zs = [z for _, z in diffs if not math.isnan(z)]
    print(f"\nmean over seeds, every epoch and eval: worst relative NDCG@{k} of ours vs ref {100 * worst:+.1f}% "
          f"({'within' if worst >= -0.10 else 'outside'} 10%); largest shortfall "
          f"{-min(zs) if zs else float('nan'):.1f} standard errors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref-dir", type=Path, help="a checkout of the reference repository")
    ap.add_argument("--model", choices=["diffurec", "diffurecsys", "dreamrec"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/recpipe-bench-reference"))
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="override a reference hyperparameter on both sides (e.g. hidden_size=128 max_len=50)")
    ap.add_argument("--port-defaults", action="store_true",
                    help="run the port with recpipe's own config (DiffuRecSys: offset noise, 5-seed ensemble)")
    ap.add_argument("--max-batches", type=int, default=0, help="train at most N batches an epoch (smoke runs)")
    ap.add_argument("--k", type=int, default=10, help="the cut-off shown in the table")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--from-json", type=Path, help="reprint the tables of a --json file (no training)")
    # internal: one side of one seed, in its own process (the references' module names collide)
    ap.add_argument("--_worker", choices=["ref", "ours"], help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--hp", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a._worker:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        if a.model == "dreamrec":
            out = (worker_ref_dreamrec if a._worker == "ref" else worker_ours_dreamrec)(a)
        else:
            out = (worker_ref if a._worker == "ref" else worker_ours)(a)
        print(json.dumps(out))
        return

    if a.from_json:  # reprint the tables of an earlier run
        saved = json.loads(a.from_json.read_text())
        print(f"{saved['model']}: {json.dumps(saved['hp'])}")
        report(saved["model"], saved["results"], a.k)
        return
    if not a.model:
        sys.exit("error: --model is required (diffurec, diffurecsys or dreamrec)")
    if not a.ref_dir or not a.ref_dir.is_dir():
        sys.exit(f"error: --ref-dir {a.ref_dir}: not a directory (a checkout of the reference)")
    if not DATASET.is_dir():
        sys.exit(f"error: {DATASET}: ml-100k is not there (set RECPIPE_SHARED to the folder holding datasets/)")
    hp = dict(REF_HP[a.model])
    for kv in a.set:
        key, _, val = kv.partition("=")
        if key not in hp:
            sys.exit(f"error: --set {kv}: unknown key (known: {', '.join(hp)})")
        hp[key] = type(hp[key])(val)
    data = dreamrec_frames(a.work_dir, hp["seq_size"]) if a.model == "dreamrec" else diffurec_pickle(a.work_dir)
    print(f"{a.model}: {json.dumps(hp)}; ml-100k -> {data}; threads {a.threads}", flush=True)
    results = {}
    for seed in a.seeds:
        results[seed] = {"ref": run_worker("ref", a, hp, data, seed), "ours": run_worker("ours", a, hp, data, seed)}
        print_table(f"{a.model}  seed {seed}", results[seed]["ref"]["rows"], results[seed]["ours"]["rows"], a.k)
        sys.stdout.flush()
        if a.json:  # after every seed: a run stopped later keeps the seeds it finished (--from-json reads them)
            a.json.write_text(json.dumps({"model": a.model, "hp": hp, "results": results}, indent=1))
    report(a.model, results, a.k)


if __name__ == "__main__":
    main()
