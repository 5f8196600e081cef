"""Configuration loading and the CLI's error contract (one line, exit code 2, no traceback)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recpipe.config import load_config, parse_set_options
from recpipe.errors import ConfigError


def test_defaults_toml_and_overrides(tmp_path):
    (tmp_path / "recpipe.toml").write_text('[run]\ndataset = "toy"\n[data]\nkcore = 3\n[train]\nlr = 3e-4\n')
    cfg = load_config()  # ./recpipe.toml is picked up
    assert cfg.run.dataset == "toy" and cfg.data.kcore == 3 and cfg.train.lr == 3e-4
    cfg = load_config(None, parse_set_options(["data.kcore=7", "evaluate.ks=1,5", "embed.normalize=false"]))
    assert cfg.data.kcore == 7 and cfg.evaluate.ks == [1, 5] and cfg.embed.normalize is False
    assert cfg.run_dir == Path("cache") / "toy"


@pytest.mark.parametrize(
    "toml, match",
    [
        ("[data]\nkcor = 3\n", "unknown key 'kcor' in \\[data\\]"),
        ("[nope]\nx = 1\n", "unknown setting 'nope.x'"),
        ("[data]\nkcore = 'many'\n", "data.kcore = 'many'"),
        ("[data\n", "invalid TOML"),
        ("[data]\nkcore = 0\n", "data.kcore must be >= 1"),
        ("[recommend]\nsteps = 0\n", "recommend.steps must be >= 1"),
        ("[recommend]\nw = nan\n", "recommend.w and rho must be finite"),
        ("[evaluate]\ncategory_template = 'a {genre} movie'\n", "category_template 'a {genre} movie': KeyError"),
        ("[evaluate]\ncategory_template = 'a {category movie'\n", "category_template 'a {category movie'"),
        ("[evaluate]\ncategory_template = 'a {0} movie'\n", "category_template 'a \\{0\\} movie': IndexError"),
        ("[evaluate]\ncategory_template = 'a movie'\n", "'a movie' must contain {category}"),
    ],
)
def test_bad_config_is_an_error(tmp_path, toml, match):
    p = tmp_path / "c.toml"
    p.write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load_config(p)


def _recpipe(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recpipe.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def test_good_category_templates_load():
    for t in ["a {category} movie", "{category}", "a {category} game {{for fans}}", "{category} or {category}"]:
        assert load_config(None, {"evaluate.category_template": t}).evaluate.category_template == t


def test_cli_errors_are_one_line_exit_2(tmp_path):
    r = _recpipe("data", "--dataset", "missing-set", "--data-dir", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: dataset 'missing-set' not found")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _recpipe("data", "--set", "data.kcore=x", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "data.kcore" in r.stderr
    r = _recpipe("evaluate", "--set", "evaluate.category_template=a {genre} movie", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: evaluate.category_template 'a {genre} movie': KeyError 'genre'; use {category} and double any other "
        "brace"]


def test_cli_data_bad_file_keeps_previous_result(tmp_path):
    d = tmp_path / "data" / "toy"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = [(u, int(i), t) for u in range(20) for t, i in enumerate(rng.choice(10, 6, replace=False))]
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(d / "interactions.csv", index=False)
    r = _recpipe("data", "--dataset", "toy", "--data-dir", str(tmp_path / "data"), "--kcore", "2", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "20" in r.stdout  # the summary table
    manifest = (tmp_path / "cache" / "toy" / "data" / "manifest.json").read_text()
    (d / "interactions.csv").write_text("user_id,item_id\n1,2\n")
    r = _recpipe("data", "--dataset", "toy", "--data-dir", str(tmp_path / "data"), "--kcore", "2", cwd=tmp_path)
    assert r.returncode == 2 and "missing column(s) timestamp" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "cache" / "toy" / "data" / "manifest.json").read_text() == manifest


@pytest.mark.parametrize("model,setting,match", [
    ("idreamrec", {"layout": "bogus"}, r"\[model.idreamrec\]: layout must be"),
    ("idreamrec", {"window": 0}, r"\[model.idreamrec\]: window must be >= 1"),
    ("idreamrec", {"loss": "bpr"}, r"\[model.idreamrec\]: loss must be"),
])
def test_bad_model_config_is_a_config_error(model, setting, match):
    """A model config's own checks (ValueError in __post_init__) surface as one-line ConfigErrors; a value
    outside a Literal's choices (layout, loss) already when the setting is read."""
    with pytest.raises(ConfigError, match=match):
        load_config(None, {f"model.{model}.{k}": str(v) for k, v in setting.items()}).model_config(model)


def test_bench_idreamrec_variants_are_valid_settings():
    """Every named variant of bench/bench_idreamrec.py loads as a config (a misspelt key or value is an error)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "bench_idreamrec.py"
    spec = importlib.util.spec_from_file_location("bench_idreamrec", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert {"paper", "residual", "ce", "copy", "mixed"} <= set(bench.VARIANTS)
    for name, settings in bench.VARIANTS.items():
        cfg = load_config(None, dict(settings))
        mc = cfg.model_config("idreamrec")
        for key, value in settings.items():
            section, _, field = key.rpartition(".")
            obj = mc if section == "model.idreamrec" else getattr(cfg, section)
            assert str(getattr(obj, field)).lower() == value, (name, key)
    with pytest.raises(ConfigError):
        load_config(None, {"model.idreamrec.cpy": "true"})


def test_every_command_an_error_hint_names_exists():
    """Error hints say "re-run `recpipe X ...`": X must be a command (the whiten hint once named none)."""
    import re

    from recpipe import cli

    commands = {c.name or c.callback.__name__ for c in cli.app.registered_commands}
    commands |= {g.name for g in cli.app.registered_groups}
    src = Path(cli.__file__).parent
    hinted = {m for p in src.rglob("*.py") for m in re.findall(r"`recpipe ([a-z_]+)", p.read_text())}
    assert {"whiten", "train", "embed", "data"} <= hinted, hinted
    assert hinted <= commands, f"hints name missing commands: {hinted - commands}"


def test_cli_whiten_force_repairs_a_damaged_whitening(tmp_path):
    from test_whiten import cfg_for, lowrank_noise, make_embed_stage, table

    from recpipe.errors import ArtifactError
    from recpipe.pipeline.whiten import load_whitening

    cfg = cfg_for(tmp_path)
    make_embed_stage(cfg.run_dir, table(lowrank_noise(300, 16)))
    args = ["--run-dir", str(cfg.run_dir), "--cache-dir", str(tmp_path / "c")]
    r = _recpipe("whiten", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    w, items, _ = load_whitening(cfg.run_dir)
    (Path(cfg.run_dir) / "whiten" / "whitening.npz").write_bytes(b"\x00" * 10)
    with pytest.raises(ArtifactError, match="whiten --force"):
        load_whitening(cfg.run_dir)
    r = _recpipe("whiten", *args, "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    w2, items2, _ = load_whitening(cfg.run_dir)
    np.testing.assert_array_equal(items, items2)
    # `recpipe index` saves the index that recommend then loads (named by the index hints too)
    r = _recpipe("index", *args, "--kind", "hnsw", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    from recpipe.artifacts import load_manifest
    from recpipe.pipeline import index as index_stage

    assert load_manifest(Path(cfg.run_dir) / "index").info["kind"] == "hnsw"
    cfg.index.kind = "hnsw"
    logs: list[str] = []
    idx = index_stage.get_index(cfg, log=logs.append)
    assert idx.kind == "hnsw" and idx.n == 300 and not logs
    ids = idx.search(items[1:4], 1)[1][:, 0]
    assert ids.tolist() == [1, 2, 3], "each vector's nearest item is itself"


# ---------------------------------------------------------------------------------- choices and sentinels
def _literal_keys() -> list[tuple[str, tuple]]:
    """Every key with a fixed set of values: "section.key" (or "model.<name>.key") and its choices."""
    import dataclasses
    import typing

    from recpipe.config import SECTIONS
    from recpipe.models.base import get_model_config_cls, model_names

    classes = [(s, c) for s, c in SECTIONS.items()] + [(f"model.{n}", get_model_config_cls(n)) for n in model_names()]
    out = []
    for prefix, cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if typing.get_origin(hints[f.name]) is typing.Literal:
                out.append((f"{prefix}.{f.name}", typing.get_args(hints[f.name])))
    return out


LITERAL_KEYS = _literal_keys()


def test_choice_keys_are_literals():
    """The keys with a fixed set of values are typed as such (a plain str would accept any typo)."""
    keys = {k for k, _ in LITERAL_KEYS}
    assert {"data.dedup", "describe.llm", "describe.local_quant", "embed.tem", "embed.source", "whiten.method",
            "index.kind", "index.device", "train.intent_source", "evaluate.intent", "evaluate.split",
            "evaluate.dtype", "recommend.dtype", "model.idreamrec.layout", "model.idreamrec.loss",
            "model.idreamrec.schedule", "model.sasrec.activation", "model.dreamrec.sampler"} <= keys


@pytest.mark.parametrize("key, choices", LITERAL_KEYS, ids=[k for k, _ in LITERAL_KEYS])
def test_a_mistyped_choice_lists_the_valid_ones(key, choices):
    with pytest.raises(ConfigError) as e:
        load_config(None, parse_set_options([f"{key}={choices[0]}x"]))
    listed = ", ".join(choices[:-1]) + " or " + choices[-1] if len(choices) > 1 else choices[0]
    assert f"must be {listed}, not '{choices[0]}x'" in str(e.value)
    for choice in choices:  # and every valid one loads
        cfg = load_config(None, parse_set_options([f"{key}={choice}"]))
        section, _, field = key.rpartition(".")
        got = cfg.model[section.split(".")[1]][field] if section.startswith("model.") else getattr(
            getattr(cfg, section), field)
        assert got == choice


def test_a_mistyped_choice_is_one_line_on_the_cli_and_names_the_file_in_toml(tmp_path):
    r = _recpipe("index", "--set", "index.kind=hnws", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: command line: index.kind must be flat, ivf, ivfpq or hnsw, not 'hnws'"]
    p = tmp_path / "c.toml"
    p.write_text("[model.idreamrec]\nlayout = 'causall'\n")
    with pytest.raises(ConfigError, match=r"c.toml: \[model.idreamrec\]: layout must be causal or full, not 'causall'"):
        load_config(p)


def test_a_choice_set_in_python_is_checked_too():
    from recpipe.config import literal_violation
    from recpipe.models.base import build_model

    cfg = load_config(None)
    assert literal_violation(cfg.index) is None
    cfg.index.kind = "annoy"
    assert literal_violation(cfg.index, "index.") == "index.kind must be flat, ivf, ivfpq or hnsw, not 'annoy'"
    with pytest.raises(ValueError, match="activation must be relu or gelu, not 'tanh'"):
        build_model("sasrec", {"activation": "tanh"}, n_items=5)  # a model config built from a dict


# key -> (the value None stands for, in words the error gives; the number a stage's fingerprint records)
NONE_KEYS = {
    "describe.limit": ("describes every item", 0),
    "describe.threads": ("uses every core", 0),
    "embed.processes": ("uses one a GPU, else one", 0),
    "index.nlist": ("picks 4*sqrt(n_items)", 0),
    "train.eval_every": ("validates once per epoch", 0),
    "train.eval_users": ("validates on every user", 0),
    "train.threads": ("uses every core", 0),
    "train.length_pool": ("turns length pooling off", 0),
    "evaluate.intent_anchor": ("adds no such row", 0),
    "recommend.intent_anchor": ("typed text's own whitened vector", None),
}


@pytest.mark.parametrize("key", NONE_KEYS)
def test_none_is_the_automatic_setting_and_zero_is_an_error(key):
    """One meaning per sentinel: None (unset, or `none`) is "all / automatic / off"; 0 is no count of anything
    here, so it is refused with what to write instead; a stage fingerprints None as the number it records."""
    from recpipe.config import to_dict

    section, field = key.split(".")
    words, recorded = NONE_KEYS[key]
    default = getattr(load_config(None), section)
    assert getattr(getattr(load_config(None, {key: "none"}), section), field) is None
    if key != "recommend.intent_anchor":  # anchoring to 8 intentions is the default there
        assert getattr(default, field) is None
    with pytest.raises(ConfigError, match=f"{key} must be >= 1, not 0; none.*{re.escape(words)}"):
        load_config(None, {key: "0"})
    assert getattr(getattr(load_config(None, {key: "3"}), section), field) == 3
    if recorded is not None:
        assert to_dict(getattr(load_config(None, {key: "none"}), section))[field] == recorded


def test_recommend_guidance_none_is_the_trained_models_and_negative_is_an_error():
    rc = load_config(None).recommend
    assert rc.w is None and rc.rho is None  # the checkpoint's w (a guidance sweep's choice) and rho
    assert load_config(None, {"recommend.w": "0", "recommend.rho": "2.5"}).recommend.rho == 2.5  # 0: unguided
    for key in ("w", "rho"):
        with pytest.raises(ConfigError, match=f"recommend.{key} must be >= 0 \\(none, the default, uses the trained"):
            load_config(None, {f"recommend.{key}": "-1"})


def test_grad_clip_none_is_off_and_zero_is_an_error():
    from recpipe.config import to_dict

    assert load_config(None).train.grad_clip == 1.0
    tc = load_config(None, {"train.grad_clip": "none"}).train
    assert tc.grad_clip is None and to_dict(tc)["grad_clip"] == 0.0  # fingerprinted as "0 = off" was
    with pytest.raises(ConfigError, match="train.grad_clip must be > 0, not 0.0; none turns clipping off"):
        load_config(None, {"train.grad_clip": "0"})


def test_describe_limit_zero_on_the_cli_is_a_one_line_error(tmp_path):
    r = _recpipe("describe", "--limit", "0", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: describe.limit must be >= 1, not 0; none (the default) describes every item"]


def test_index_nlist_none_picks_the_automatic_cell_count():
    from recpipe.pipeline.index import build_index, resolve_nlist

    V = np.random.default_rng(0).standard_normal((3001, 8)).astype(np.float32)
    auto = build_index(V, load_config(None, {"index.kind": "ivf"}).index, seed=0)
    assert auto.nlist == resolve_nlist(3000) == 3000 // 39
    assert build_index(V, load_config(None, {"index.kind": "ivf", "index.nlist": "20"}).index, seed=0).nlist == 20


def _toy_run(tmp_path: Path, **over):
    """A small SASRec training run on a toy catalog: (its validation log entries, the stage result)."""
    import json

    from recpipe.pipeline import data as D
    from recpipe.pipeline import train as T

    d = tmp_path / "data" / "toy"
    if not d.exists():
        d.mkdir(parents=True)
        rng = np.random.default_rng(0)
        rows = [(u, int(i), t) for u in range(60) for t, i in enumerate(rng.choice(30, 10, replace=False))]
        pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(d / "interactions.csv", index=False)
    sets = {"run.dataset": "toy", "run.data_dir": str(tmp_path / "data"), "run.cache_dir": str(tmp_path / "cache"),
            "data.kcore": 2, "train.model": "sasrec", "train.epochs": 2, "train.batch_size": 16,
            "train.warmup_steps": 1, "train.patience": 10, "train.ema": 0, "model.sasrec.history_len": 6,
            "run.run_dir": str(tmp_path / "runs" / "-".join(f"{k}={v}" for k, v in over.items())), **over}
    cfg = load_config(None, sets)
    D.run(cfg, log=lambda m: None)
    res = T.run(cfg, log=lambda m: None, progress=False)
    return [json.loads(line) for line in (res.stage_dir / "log.jsonl").read_text().splitlines()], res


def test_train_sentinels_mean_what_they_say(tmp_path):
    """eval_every None: once per epoch; eval_users None: every user; grad_clip None: no clipping at all (the
    weights of a clip no gradient reaches), where a tight clip changes them."""
    import torch
    from safetensors.torch import load_file

    log, res = _toy_run(tmp_path)
    per_epoch = res.manifest.info["steps_per_epoch"]
    assert per_epoch > 2 and [e["step"] for e in log] == [per_epoch, 2 * per_epoch]
    assert {e["valid"]["users"] for e in log} == {60}
    log, _ = _toy_run(tmp_path, **{"train.eval_every": "2", "train.eval_users": "7"})
    assert [e["step"] for e in log][:2] == [2, 4] and {e["valid"]["users"] for e in log} == {7}

    def weights(**over):
        _, r = _toy_run(tmp_path, **{"train.max_steps": "4", **over})
        return load_file(str(r.stage_dir / "model.safetensors"))

    off, huge, tight = weights(**{"train.grad_clip": "none"}), weights(**{"train.grad_clip": "1e9"}), weights(
        **{"train.grad_clip": "1e-4"})
    assert all(torch.equal(off[k], huge[k]) for k in off)
    assert not all(torch.equal(off[k], tight[k]) for k in off)
