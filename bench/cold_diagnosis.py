"""Where a trained model puts the cold items, for the users whose test target is one (issue #22 §3).

    python bench/cold_diagnosis.py -d amazon-beauty --data-dir ../shared/datasets --run-dir cache/beauty-cold \
        -m idreamrec --set model.idreamrec.item_residual=true ...

The run must be a cold-item split (`data.cold_items` > 0); pass the settings the model was trained with, as for
`recpipe evaluate`. Each cold-target user's test history is scored once (`score_all`; unmasked ranks from
recpipe's own `target_ranks`, ties counted against the target) and the figures printed are:
- the target's rank among every item and among the cold items alone (is the text part right?);
- the cold items' share of the top-10 slots (are cold items placed against warm ones as often as they are due?);
- HR@10 when every cold item's score is raised by beta standard deviations of the user's scores. beta is read
  off the test users here, so this is a bound on what a calibration of cold against warm items could buy, not a
  method. The method is iDreamRec's `new_bias`, chosen on validation by `train.new_bias_grid` (the training's
  newest items play the cold items' part there); a model trained with it scores with its offset already in, and
  the bound then says what is left.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BETAS = (0.5, 1.0, 1.5, 2.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-d", "--dataset", required=True)
    ap.add_argument("--data-dir", type=Path)
    ap.add_argument("--run-dir", type=Path, required=True)
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="settings the model was trained with")
    ap.add_argument("--batch-users", type=int, default=256)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--new-bias", type=float, nargs="*", default=[], metavar="V",
                    help="also score every test user at each of these new-item offsets (idreamrec new_bias, in "
                         "oracle norms) and print NDCG@10 of all, cold and warm targets: read off the test "
                         "users, a bound for every offset but the one the model chose on validation")
    ap.add_argument("--untrained-only", action="store_true",
                    help="with new_holdout: give the offset to the items with no training data alone, not the "
                         "held-out ones")
    a = ap.parse_args()

    sys.path.insert(0, str(ROOT))
    import torch

    from recpipe.config import load_config, parse_set_options
    from recpipe.errors import RecpipeError
    from recpipe.models.metrics import target_ranks
    from recpipe.pipeline import bundle as bundle_mod
    from recpipe.pipeline.batches import Batcher

    over = {"run.dataset": a.dataset, "run.run_dir": str(a.run_dir), "run.seed": a.seed}
    if a.data_dir:
        over["run.data_dir"] = str(a.data_dir)
    try:
        over.update(parse_set_options(a.set))
        cfg = load_config(None, over)
        run = bundle_mod.load(cfg, a.model, "cpu", log=lambda m: None)
    except (RecpipeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    model, ds = run.model, run.ds
    if ds.cold_items is None or ds.cold_users is None or not len(ds.cold_users):
        sys.exit(f"error: {a.run_dir}: not a cold-item split with cold-target users (data.cold_items > 0)")
    if a.untrained_only:  # what the offset buys without lifting the held-out items (new_holdout) with it
        if getattr(model.config, "new_holdout", 0) <= 0:
            sys.exit("error: --untrained-only needs a model trained with model.idreamrec.new_holdout > 0")
        model.heldout.zero_()  # they stay in the new form (they are among the newest); only the offset moves
    chosen = getattr(model.config, "new_bias", None)
    if a.new_bias and chosen is None:  # before any scoring
        sys.exit(f"error: --new-bias: model {a.model} has no new-item offset")
    model.eval()
    b = Batcher(ds, model.history_len)
    n = model.n_items
    is_cold = np.zeros(n + 1, dtype=bool)
    is_cold[ds.cold_items] = True
    cold = torch.from_numpy(is_cold)
    gen = torch.Generator().manual_seed(a.seed)
    rank_all, rank_cold, share = [], [], []
    boosted: dict[float, list[torch.Tensor]] = {beta: [] for beta in BETAS}
    users = np.asarray(ds.cold_users)
    for lo in range(0, len(users), a.batch_users):
        batch, _ = b.eval_batch(users[lo:lo + a.batch_users], "test")
        with torch.no_grad():
            s = model.score_all(batch, **({"generator": gen} if model.generative else {})).float()  # (B, N+1)
        t = batch["target"]
        rank_all.append(target_ranks(s, t))
        rank_cold.append(target_ranks(s, t, ~cold.expand(len(s), -1)))  # warm items excluded: among cold only
        top = s.clone()
        top[:, 0] = -torch.inf  # padding is never recommended
        share.append(cold[top.topk(10, dim=1).indices].float().mean(1))
        sd = s[:, 1:].std(1, keepdim=True)
        for beta in BETAS:
            boosted[beta].append(target_ranks(s + beta * sd * cold, t))
    ra, rc, sh = (torch.cat(x).numpy() for x in (rank_all, rank_cold, share))
    n_cold = int(is_cold.sum())
    print(f"{a.model} on {a.dataset} ({a.run_dir}): {len(users):,} cold-target users, {n_cold:,} cold items of {n:,}")
    print(f"target in the top 10 of all items      {np.mean(ra < 10):.4f}   median rank {np.median(ra):,.0f}")
    print(f"target in the top 10 of cold items     {np.mean(rc < 10):.4f}   median rank {np.median(rc):,.0f}"
          f"   (random {min(1.0, 10 / n_cold):.4f}, {(n_cold - 1) / 2:,.0f})")
    print(f"cold items' share of the top-10 slots  {sh.mean():.3f}   (catalog share {n_cold / n:.3f})")
    for beta in BETAS:
        print(f"cold items raised by {beta} sd: HR@10 {np.mean(torch.cat(boosted[beta]).numpy() < 10):.4f}"
              "   (beta read off these users: a bound)")
    if a.new_bias:
        from recpipe.pipeline.scoring import evaluate_split

        print(f"\nnew-item offset (the model's, chosen on validation: {chosen:g}); test NDCG@10 masked / unmasked")
        print("| new_bias | all users | cold targets | warm targets |")
        print("|---|---|---|---|")
        for v in sorted(set(a.new_bias) | {float(chosen)}):
            r = evaluate_split(model, b, "test", [10], score_kwargs={"new_bias": v}, seed=a.seed,
                               groups=ds.test_groups())
            cells = [r] + [r["groups"][g] for g in ("cold", "warm")]
            print(f"| {v:g}{' (chosen)' if v == chosen else ''} | " + " | ".join(
                f"{c['masked']['NDCG@10']:.4f} / {c['unmasked']['NDCG@10']:.4f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
