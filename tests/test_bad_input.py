"""Bad input across the CLI: every case ends in exit code 2 and one `error: ...` line, never a traceback.

The CLI runs in-process (`recpipe.cli.main`), on tiny datasets built in tmp_path. A case is a setup that
builds what it needs (a dataset, a damaged run directory) and returns the command line; the cases that need a
trained model copy one module-level run (SASRec, a few steps) so that nothing is trained twice.
Also here: what bad or degenerate input must do besides failing (evaluate's warnings, recommend's refusal,
`benchmark --reuse` on a partly trained run directory).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

N_USERS, N_ITEMS, PER_USER = 40, 12, 8


# ----------------------------------------------------------------------------------------------- helpers
@dataclass
class Outcome:
    code: int
    out: str
    err: str
    exc: BaseException | None = None  # an exception that escaped main(): a traceback for the user


def run_cli(capsys, *args: str) -> Outcome:
    from recpipe import cli

    capsys.readouterr()
    code, exc = 0, None
    try:
        cli.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception as e:  # noqa: BLE001 - what would print a traceback
        code, exc = 1, e
    out, err = capsys.readouterr()
    return Outcome(code, out, err, exc)


def assert_one_line_error(r: Outcome, match: str) -> None:
    assert r.exc is None, f"traceback: {type(r.exc).__name__}: {r.exc}"
    assert "Traceback" not in r.err
    errors = [ln for ln in r.err.splitlines() if ln.startswith("error:")]
    assert r.code == 2, (r.code, r.err[-500:], r.out[-300:])
    assert len(errors) == 1 and r.err.strip().splitlines()[-1] == errors[0], r.err
    assert match in errors[0], errors[0]


def write_dataset(d: Path, inter: pd.DataFrame | str, items: pd.DataFrame | str | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, t in (("interactions.csv", inter), ("items.csv", items)):
        if isinstance(t, str):
            (d / name).write_text(t)
        elif t is not None:
            t.to_csv(d / name, index=False)
    return d


def toy_frames(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows = [(u, 100 + int(i), 1000 + 10 * j)
            for u in range(N_USERS) for j, i in enumerate(rng.choice(N_ITEMS, PER_USER, replace=False))]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = pd.DataFrame({"item_id": 100 + np.arange(N_ITEMS), "title": [f"item {i}" for i in range(N_ITEMS)],
                          "genres": ["Comedy|Drama", "Horror", "Comedy", "Action"] * (N_ITEMS // 4)})
    return inter, items


SAS = ("--model", "sasrec")  # the model every trained case has
TRAIN_SETS = {"train.model": "sasrec", "train.max_steps": 3, "train.epochs": 1, "train.batch_size": 16,
              "train.warmup_steps": 1, "train.threads": 1, "model.sasrec.history_len": 8}


@dataclass
class Ctx:
    tmp: Path
    data_dir: Path
    cache: Path

    @property
    def run_dir(self) -> Path:
        return self.cache / "toy"

    def args(self, *extra: str) -> list[str]:
        """Common options: the toy dataset, this case's directories."""
        return [*extra, "--dataset", "toy", "--data-dir", str(self.data_dir), "--cache-dir", str(self.cache)]

    def toy(self, inter=None, items=None) -> Path:
        i, it = toy_frames()
        return write_dataset(self.data_dir / "toy", i if inter is None else inter, it if items is None else items)

    def cfg(self):
        from recpipe.config import load_config

        return load_config(None, {"run.dataset": "toy", "run.data_dir": str(self.data_dir),
                                  "run.cache_dir": str(self.cache), **TRAIN_SETS})


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run directory with data, a trained SASRec and its evaluation; cases copy it."""
    from recpipe.pipeline import data, evaluate, train

    root = tmp_path_factory.mktemp("trained")
    ctx = Ctx(root, root / "data", root / "cache")
    ctx.toy()
    cfg = ctx.cfg()
    data.run(cfg, log=lambda m: None)
    train.run(cfg, "sasrec", log=lambda m: None, progress=False)
    evaluate.run(cfg, "sasrec", log=lambda m: None, progress=False)
    return root


def copy_trained(ctx: Ctx, trained: Path) -> None:
    shutil.copytree(trained / "data", ctx.data_dir)
    shutil.copytree(trained / "cache", ctx.cache)


def _csv(lines: list[str]) -> str:
    return "\n".join(lines) + "\n"


def _ts_csv(bad: str) -> str:
    return _csv(["user_id,item_id,timestamp"] + [f"{u},{i},{10 * i}" for u in range(4) for i in range(1, 6)]
                + [f"9,3,{bad}"])


def _set_manifest(path: Path, **changes) -> None:
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


# ------------------------------------------------------------------------------------------------- cases
# Each case: (id, setup(ctx, trained run directory) -> argv, what the error line must contain).
Case = tuple[str, Callable[..., list[str]], str]


def _data(ctx: Ctx, inter, items=None, *extra: str) -> list[str]:
    write_dataset(ctx.data_dir / "toy", inter, items)
    return ctx.args("data", *extra)


CASES: list[Case] = [
    # ---- data: the dataset and its files
    ("data-unknown-dataset", lambda c, t: ["data", "--dataset", "nope", "--data-dir", str(c.data_dir)],
     "dataset 'nope' not found"),
    ("data-dir-without-dataset", lambda c, t: ["data", "--dataset", str(c.tmp)], "no dataset found"),
    ("data-missing-timestamp-column", lambda c, t: _data(c, _csv(["user_id,item_id", "1,2"])),
     "missing column(s) timestamp"),
    ("data-missing-user-column", lambda c, t: _data(c, _csv(["item_id,timestamp", "1,2"])),
     "missing column(s) user_id"),
    ("data-empty-file", lambda c, t: _data(c, ""), "file is empty"),
    ("data-header-only", lambda c, t: _data(c, _csv(["user_id,item_id,timestamp"])), "no interactions left"),
    ("data-word-timestamp", lambda c, t: _data(c, _ts_csv("yesterday")), "non-numeric timestamp 'yesterday'"),
    ("data-inf-timestamp", lambda c, t: _data(c, _ts_csv("inf")), "timestamp 'inf' (data row 21) is not a finite"),
    ("data-minus-inf-timestamp", lambda c, t: _data(c, _ts_csv("-inf")), "is not a finite number"),
    ("data-1e20-timestamp", lambda c, t: _data(c, _ts_csv("1e20")), "timestamp '1e+20' (data row 21) is out of range"),
    ("data-huge-integer-timestamp", lambda c, t: _data(c, _ts_csv("123456789012345678901")), "is out of range"),
    ("data-date-among-numbers", lambda c, t: _data(c, _ts_csv("2020-01-01")), "timestamps mix numbers"),
    ("data-impossible-date", lambda c, t: _data(c, _csv(["user_id,item_id,timestamp", "1,1,2020-01-01",
                                                         "1,2,2020-13-45"])), "non-numeric timestamp '2020-13-45'"),
    ("data-empty-timestamp", lambda c, t: _data(c, _ts_csv("")), "empty timestamp in 1 row(s) (first: data row 21)"),
    ("data-empty-user-id", lambda c, t: _data(c, _csv(["user_id,item_id,timestamp", "1,1,1", ",2,2"])),
     "empty user_id"),
    ("data-undecodable-bytes", lambda c, t: _undecodable(c), "cannot decode"),
    ("data-items-duplicate-id", lambda c, t: _data(c, toy_frames()[0], pd.concat([toy_frames()[1]] * 2)),
     "duplicate item_id '100'"),
    ("data-items-missing-title", lambda c, t: _data(c, toy_frames()[0], toy_frames()[1].drop(columns=["title"])),
     "missing column(s) title"),
    ("data-items-missing-some-items", lambda c, t: _data(c, toy_frames()[0], toy_frames()[1].iloc[2:]),
     "interactions name items missing from items.csv"),
    ("data-corrupt-parquet", lambda c, t: _corrupt_parquet(c), "cannot parse"),
    ("data-kcore-too-high", lambda c, t: [*_data(c, toy_frames()[0]), "--kcore", "50"], "no interactions left"),
    ("data-kcore-zero", lambda c, t: [*_data(c, toy_frames()[0]), "--kcore", "0"], "data.kcore must be >= 1"),
    ("data-ml100k-bad-u-item", lambda c, t: _ml100k(c), "'|'-separated fields"),
    ("data-min-rating-without-ratings", lambda c, t: [*_data(c, toy_frames()[0]), "--set", "data.min_rating=4"],
     "data.min_rating=4 needs ratings"),
    ("data-min-rating-nan", lambda c, t: ["data", "--set", "data.min_rating=nan"], "data.min_rating must be a finite"),
    ("data-empty-dataset-name", lambda c, t: ["data", "--dataset", " "], "run.dataset is empty"),
    ("data-get-unknown-name", lambda c, t: ["data", "get", "ml-3m", "--data-dir", str(c.data_dir)],
     "no download known for 'ml-3m'"),
    # ---- configuration
    ("config-is-a-directory", lambda c, t: ["data", "-c", str(c.tmp)], "is a directory"),
    ("config-missing-file", lambda c, t: ["data", "-c", str(c.tmp / "none.toml")], "config file not found"),
    ("config-invalid-toml", lambda c, t: _toml(c, "[data\n"), "invalid TOML"),
    ("config-not-utf8", lambda c, t: _toml_bytes(c, b"[data]\nkcore = '\xff'\n"), "invalid TOML"),
    ("set-unknown-key", lambda c, t: ["data", "--set", "data.kcor=3"], "unknown key 'kcor' in [data]"),
    ("set-unknown-section", lambda c, t: ["train", "--set", "nope.x=1"], "unknown setting 'nope.x'"),
    ("set-bad-int", lambda c, t: ["data", "--set", "data.kcore=many"], "data.kcore = 'many'"),
    ("set-no-equals", lambda c, t: ["evaluate", "--set", "evaluate.ks"], "expected section.key=value"),
    ("set-nan-weight", lambda c, t: ["recommend", "--user", "1", "--set", "recommend.w=nan"], "must be finite"),
    ("set-bad-model-key", lambda c, t: ["train", "--set", "model.sasrec.widht=3"], "unknown key 'widht'"),
    ("set-bad-template", lambda c, t: ["evaluate", "--set", "evaluate.category_template=a movie"],
     "must contain {category}"),
    # ---- describe, embed, whiten, index: bad settings and missing upstream stages
    ("describe-unknown-llm", lambda c, t: ["describe", "--llm", "gpt9"], "describe.llm must be"),
    ("describe-zero-concurrency", lambda c, t: ["describe", "--concurrency", "0"], "describe.concurrency must be"),
    ("describe-unknown-dataset", lambda c, t: ["describe", "--dataset", "nope", "--data-dir", str(c.data_dir),
                                               "--llm", "metadata"], "dataset 'nope' not found"),
    ("embed-unknown-tem", lambda c, t: ["embed", "--tem", "word2vec"], "embed.tem must be local or openai"),
    ("embed-unknown-source", lambda c, t: ["embed", "--source", "reviews"], "embed.source must be"),
    ("embed-before-data", lambda c, t: c.args("embed"), "stage 'data' has not been run"),
    ("embed-before-describe", lambda c, t: _with_trained(c, t, "embed"), "stage 'describe' has not been run"),
    ("whiten-unknown-method", lambda c, t: ["whiten", "--method", "pca"], "whiten.method must be"),
    ("whiten-before-embed", lambda c, t: c.args("whiten"), "stage 'embed' has not been run"),
    ("index-unknown-kind", lambda c, t: ["index", "--kind", "annoy"], "index.kind must be flat, ivf, ivfpq or hnsw"),
    ("index-before-whiten", lambda c, t: c.args("index"), "stage 'whiten' has not been run"),
    # ---- train
    ("train-unknown-model", lambda c, t: ["train", "--model", "sasrek"], "unknown model 'sasrek'"),
    ("train-before-data", lambda c, t: c.args("train", "--model", "sasrec"), "stage 'data' has not been run"),
    ("train-zero-epochs", lambda c, t: ["train", "--epochs", "0"], "train.epochs and train.batch_size must be"),
    ("train-text-model-before-embed", lambda c, t: _with_trained(c, t, "train", "--model", "idreamrec"),
     "stage 'embed' has not been run"),
    # ---- evaluate
    ("evaluate-never-trained", lambda c, t: _with_trained(c, t, "evaluate", "--model", "diffrec"),
     "stage 'train/diffrec' has not been run"),
    ("evaluate-zero-batch-size", lambda c, t: _with_trained(c, t, "evaluate", *SAS, "--set", "evaluate.batch_size=0"),
     "evaluate.batch_size must be >= 1"),
    ("evaluate-negative-seed", lambda c, t: ["evaluate", "--seed", "-1"], "run.seed must be in 0 .. 2**63-1"),
    ("evaluate-unknown-intent", lambda c, t: ["evaluate", "--intent", "telepathy"], "evaluate.intent must be"),
    ("evaluate-negative-steps", lambda c, t: ["evaluate", "--steps", "-1"], "evaluate.steps must be >= 0"),
    ("evaluate-truncated-model", lambda c, t: _damaged(c, t, "train/sasrec/model.safetensors", "evaluate", *SAS),
     "model.safetensors: changed or corrupt since stage 'train/sasrec' wrote it"),
    ("evaluate-after-data-changed", lambda c, t: _data_changed(c, t, "evaluate", *SAS),
     "made from an earlier 'data' stage"),
    ("evaluate-manifest-outputs-null", lambda c, t: _bad_manifest(c, t, "train/sasrec", outputs=None),
     "not a recpipe manifest ('outputs' is null"),
    ("evaluate-manifest-not-json", lambda c, t: _manifest_text(c, t, "train/sasrec", "{not json"), "corrupt JSON"),
    ("evaluate-manifest-a-list", lambda c, t: _manifest_text(c, t, "train/sasrec", "[1, 2]"),
     "not a recpipe manifest (a JSON list"),
    ("evaluate-corrupt-data-artifact", lambda c, t: _damaged(c, t, "data/users.parquet", "evaluate", *SAS),
     "users.parquet: changed or corrupt"),
    # ---- recommend
    ("recommend-unknown-user", lambda c, t: _with_trained(c, t, "recommend", *SAS, "--user", "nobody"),
     "unknown user 'nobody'"),
    ("recommend-leading-zero-user", lambda c, t: _with_trained(c, t, "recommend", *SAS, "--user", "007"),
     "unknown user '007'"),
    ("recommend-empty-intent", lambda c, t: _with_trained(c, t, "recommend", *SAS, "--user", "1", "--intent", " "),
     "empty intent"),
    ("recommend-intent-for-sasrec",
     lambda c, t: _with_trained(c, t, "recommend", *SAS, "--user", "1", "--intent", "fun"), "takes no intention"),
    ("recommend-k-zero", lambda c, t: _with_trained(c, t, "recommend", *SAS, "--user", "1", "-k", "0"),
     "k must be >= 1"),
    ("recommend-nan-w", lambda c, t: _with_trained(c, t, "recommend", *SAS, "--user", "1", "--w", "nan"),
     "w must be a finite number"),
    ("recommend-before-train", lambda c, t: _with_trained(c, t, "recommend", "--user", "1", "--model", "diffrec"),
     "stage 'train/diffrec' has not been run"),
    ("recommend-truncated-model", lambda c, t: _damaged(c, t, "train/sasrec/model.safetensors", "recommend",
                                                        *SAS, "--user", "1"), "changed or corrupt"),
    ("recommend-after-data-changed", lambda c, t: _data_changed(c, t, "recommend", *SAS, "--user", "1"),
     "made from an earlier 'data' stage"),
    ("recommend-user-saw-everything", lambda c, t: _saw_everything(c), "has already seen all"),
    # ---- benchmark
    ("benchmark-unknown-model", lambda c, t: ["benchmark", "--models", "sasrec,nope"], "unknown model(s) nope"),
    ("benchmark-no-model-named", lambda c, t: ["benchmark", "--models", ","], "--models names no model"),
    ("benchmark-reuse-nothing-there", lambda c, t: c.args("benchmark", "--reuse"),
     "no model is both trained and evaluated"),
    ("benchmark-reuse-untrained-model", lambda c, t: _with_trained(c, t, "benchmark", "--reuse", "--models",
                                                                   "sasrec,dreamrec"),
     "stage 'train/dreamrec' has not been run"),
]


def _undecodable(c: Ctx) -> list[str]:
    (c.data_dir / "toy").mkdir(parents=True)
    (c.data_dir / "toy" / "interactions.csv").write_bytes(b"user_id,item_id,timestamp\n\xff\xfe,1,2\n")
    return c.args("data")


def _corrupt_parquet(c: Ctx) -> list[str]:
    d = c.data_dir / "toy"
    d.mkdir(parents=True)
    (d / "interactions.parquet").write_bytes(b"PAR1" + b"\x00" * 64)
    return c.args("data")


def _ml100k(c: Ctx) -> list[str]:
    d = c.data_dir / "toy"
    d.mkdir(parents=True)
    (d / "u.data").write_text("".join(f"{u}\t{i}\t5\t{100 * i}\n" for u in range(1, 6) for i in range(1, 7)))
    (d / "u.item").write_text("".join(f"{i}|T{i}|01-Jan-1995\n" for i in range(1, 7)))  # no genre flags
    return c.args("data")


def _toml(c: Ctx, text: str) -> list[str]:
    (c.tmp / "bad.toml").write_text(text)
    return ["data", "-c", str(c.tmp / "bad.toml")]


def _toml_bytes(c: Ctx, blob: bytes) -> list[str]:
    (c.tmp / "bad.toml").write_bytes(blob)
    return ["data", "-c", str(c.tmp / "bad.toml")]


def _with_trained(c: Ctx, trained: Path, *args: str) -> list[str]:
    copy_trained(c, trained)
    return c.args(*args)


def _damaged(c: Ctx, trained: Path, rel: str, *args: str) -> list[str]:
    copy_trained(c, trained)
    _truncate(c.run_dir / rel)
    return c.args(*args)


def _bad_manifest(c: Ctx, trained: Path, stage: str, **changes) -> list[str]:
    copy_trained(c, trained)
    _set_manifest(c.run_dir / stage / "manifest.json", **changes)
    return c.args("evaluate", "--model", stage.split("/")[-1])


def _manifest_text(c: Ctx, trained: Path, stage: str, text: str) -> list[str]:
    copy_trained(c, trained)
    (c.run_dir / stage / "manifest.json").write_text(text)
    return c.args("evaluate", "--model", stage.split("/")[-1])


def _data_changed(c: Ctx, trained: Path, *args: str) -> list[str]:
    """`recpipe data` re-ran on other interactions after the model was trained (same catalog size)."""
    from recpipe.pipeline import data

    copy_trained(c, trained)
    inter = pd.read_csv(c.data_dir / "toy" / "interactions.csv")
    inter.iloc[::-1].assign(timestamp=inter["timestamp"].to_numpy()).to_csv(
        c.data_dir / "toy" / "interactions.csv", index=False)  # every user's order reversed
    data.run(c.cfg(), log=lambda m: None)
    return c.args(*args)


def _saw_everything(c: Ctx) -> list[str]:
    """One user who interacted with every item (`--kcore 1`): nothing is left to recommend."""
    from recpipe.pipeline import data, train

    write_dataset(c.data_dir / "toy", _csv(["user_id,item_id,timestamp", "u,1,1", "u,2,2", "u,3,3", "u,4,4"]))
    cfg = c.cfg()
    cfg.data.kcore = 1
    data.run(cfg, log=lambda m: None)
    train.run(cfg, "sasrec", log=lambda m: None, progress=False)
    return c.args("recommend", *SAS, "--user", "u")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_error(tmp_path, capsys, trained, case):
    name, setup, match = case
    ctx = Ctx(tmp_path / "case", tmp_path / "case" / "data", tmp_path / "case" / "cache")
    ctx.tmp.mkdir()
    argv = setup(ctx, trained)
    r = run_cli(capsys, *argv)
    assert_one_line_error(r, match)


def test_at_least_forty_kinds():
    assert len({c[0] for c in CASES}) == len(CASES) >= 40


# ---------------------------------------------------------------------------------------- besides failing
def test_failed_data_keeps_the_finished_stage(tmp_path, capsys, trained):
    ctx = Ctx(tmp_path, tmp_path / "data", tmp_path / "cache")
    copy_trained(ctx, trained)
    before = (ctx.run_dir / "data" / "manifest.json").read_text()
    write_dataset(ctx.data_dir / "toy", _ts_csv("inf"))
    assert_one_line_error(run_cli(capsys, *ctx.args("data")), "not a finite number")
    assert (ctx.run_dir / "data" / "manifest.json").read_text() == before


def test_evaluate_reruns_or_refuses_when_an_input_changed(tmp_path, capsys, trained):
    """`evaluate` once answered "up to date ... skipped" with the old metrics after its model file was cut short,
    and after `recpipe data` re-ran on other data."""
    ctx = Ctx(tmp_path, tmp_path / "data", tmp_path / "cache")
    copy_trained(ctx, trained)
    r = run_cli(capsys, *ctx.args("evaluate", "--model", "sasrec"))
    assert r.code == 0 and "up to date" in r.err, r.err
    model = ctx.run_dir / "train" / "sasrec" / "model.safetensors"
    good = model.read_bytes()
    _truncate(model)
    assert_one_line_error(run_cli(capsys, *ctx.args("evaluate", "--model", "sasrec")), "changed or corrupt")
    model.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))  # same size, one bit
    assert_one_line_error(run_cli(capsys, *ctx.args("evaluate", "--model", "sasrec")), "changed or corrupt")
    model.write_bytes(good)
    assert run_cli(capsys, *ctx.args("evaluate", "--model", "sasrec")).code == 0
    # `recpipe train` (no --force) repairs a damaged model: its stage re-runs instead of being skipped
    _truncate(model)
    from recpipe.pipeline import train

    assert not train.run(ctx.cfg(), "sasrec", log=lambda m: None, progress=False).skipped


def test_model_code_newer_than_its_checkpoint(tmp_path, capsys, trained, monkeypatch):
    """A checkpoint written before the model's code gained a layer (DDSR's chained heads): one line naming what
    is missing and how to retrain, instead of torch's load_state_dict message."""
    from torch import nn

    from recpipe.models.sasrec import SASRec

    ctx = Ctx(tmp_path, tmp_path / "data", tmp_path / "cache")
    copy_trained(ctx, trained)
    init = SASRec.__init__

    def grown(self, *a, **k):
        init(self, *a, **k)
        self.new_head = nn.Linear(2, 2)

    monkeypatch.setattr(SASRec, "__init__", grown)
    r = run_cli(capsys, *ctx.args("evaluate", "--model", "sasrec", "--force"))
    assert_one_line_error(r, "written by another version of sasrec (missing new_head.bias, new_head.weight)")
    assert "recpipe train --model sasrec --force" in r.err


def test_manifest_of_wrong_shape_is_rebuilt_by_its_stage(tmp_path, capsys, trained):
    ctx = Ctx(tmp_path, tmp_path / "data", tmp_path / "cache")
    copy_trained(ctx, trained)
    _set_manifest(ctx.run_dir / "data" / "manifest.json", outputs=None)
    r = run_cli(capsys, *ctx.args("data"))
    assert r.code == 0 and "rebuilding" in r.err, r.err
    assert json.loads((ctx.run_dir / "data" / "manifest.json").read_text())["outputs"]


def test_tiny_kcore_1_data_warns_what_the_figures_mean(tmp_path, capsys):
    """A user whose history holds all items but the target: masked NDCG@10 is 1 by construction, and evaluate
    says so (it once printed 1.0000 without a word)."""
    ctx = Ctx(tmp_path, tmp_path / "data", tmp_path / "cache")
    write_dataset(ctx.data_dir / "toy", _csv(["user_id,item_id,timestamp", "u,1,1", "u,2,2", "u,3,3", "u,4,4",
                                              "v,1,1", "v,2,2", "v,3,3"]))
    cfg = ctx.cfg()
    from recpipe.pipeline import data, train

    cfg.data.kcore = 1
    data.run(cfg, log=lambda m: None)
    train.run(cfg, "sasrec", log=lambda m: None, progress=False)
    r = run_cli(capsys, *ctx.args("evaluate", "--model", "sasrec"))
    assert r.code == 0, r.err
    assert "NDCG@10" in r.out
    warn = " ".join(r.err.split())  # one string: rich wraps long lines
    assert "warning: the catalog has 4 items, at most K=20" in warn, r.err
    assert "2 of 2 users have at most 20 unseen items (fewest: 1)" in warn, r.err
    assert "for 1 the target is the only unseen item (masked NDCG = 1)" in warn, r.err
    assert "only 2 test user(s)" in warn, r.err
    r2 = run_cli(capsys, *ctx.args("evaluate", "--model", "sasrec"))
    assert "up to date" in r2.err and "2 of 2 users have at most 20" in " ".join(r2.err.split()), "kept with it"
    # recommend: fewer unseen items than asked for is said, not an unexplained short table
    r3 = run_cli(capsys, *ctx.args("recommend", *SAS, "--user", "v", "-k", "5"))
    assert r3.code == 0 and "has only 1 unseen item(s) in a catalog of 4: showing 1 of the 5" in " ".join(
        r3.err.split()), r3.err


def test_recommend_never_serves_a_changed_model(tmp_path, trained):
    from recpipe.errors import ArtifactError
    from recpipe.pipeline.recommend import RecommendService

    ctx = Ctx(tmp_path, tmp_path / "data", tmp_path / "cache")
    copy_trained(ctx, trained)
    assert len(RecommendService(ctx.cfg()).recommend("1", k=3)) == 3
    _truncate(ctx.run_dir / "train" / "sasrec" / "model.safetensors")
    with pytest.raises(ArtifactError, match="changed or corrupt"):
        RecommendService(ctx.cfg())


# -------------------------------------------------------------------------------------- benchmark --reuse
def test_benchmark_reuse_without_models_tables_what_is_there(tmp_path, capsys, trained, monkeypatch):
    """The run directory holds a trained and evaluated SASRec only: --reuse tables it and names the others
    (it once stopped at the first default model never trained)."""
    monkeypatch.setenv("COLUMNS", "250")  # the whole table on one line per row
    ctx = Ctx(tmp_path, tmp_path / "data", tmp_path / "cache")
    copy_trained(ctx, trained)
    r = run_cli(capsys, *ctx.args("benchmark", "--reuse"))
    assert r.code == 0, r.err
    result = json.loads((ctx.run_dir / "benchmark" / "results.json").read_text())
    assert [row["model"] for row in result["rows"]] == ["sasrec"]
    for name in ("dreamrec", "diffurec", "diffrec", "idreamrec"):
        assert f"benchmark: {name} left out: " in r.err and f"train/{name}' has not been run" in r.err, r.err
    assert "done in" not in r.err, "nothing ran"
    # the console shows the columns of table.md
    table_md = (ctx.run_dir / "benchmark" / "table.md").read_text()
    header = next(ln for ln in table_md.splitlines() if ln.startswith("| model"))
    for col in ("steps", "train s", "users/s", "params"):
        assert f"| {col} |" in header
        assert col in r.out, r.out
    steps = result["rows"][0]["steps"]
    lines = [ln for ln in r.out.splitlines() if re.match(r"\W*sasrec\b", ln)]
    assert steps == 3 and len(lines) == 2 and all(re.search(rf"\W{steps}\W", ln) for ln in lines), r.out
