"""Configuration loading and the CLI's error contract (one line, exit code 2, no traceback)."""

from __future__ import annotations

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
