"""Trust in the describe and embed stages: a cache copied from elsewhere runs nothing, two describe runs on one
cache pay once, no secret of a URL reaches a manifest or a log, the figures say what they measure, each text is
embedded once, and an intention that names its item or reads like a description is not used."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import diskcache
import numpy as np
import pandas as pd
import pytest
from fault_server import FakeOpenAI
from test_describe import SECRET, make_dataset

import recpipe.llm as L
from recpipe.config import load_config
from recpipe.pipeline import data as D
from recpipe.pipeline import describe as DS
from recpipe.pipeline import embed as E

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs `touch <path>`: what a planted cache entry would do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    return SECRET


def _cfg(tmp_path: Path, **overrides):
    make_dataset(tmp_path / "ds")
    cfg = load_config(None, {"run.dataset": str(tmp_path / "ds"), "run.cache_dir": str(tmp_path / "cache"),
                             "data.kcore": 1, "describe.timeout_s": 5, "describe.backoff_s": 0.01, **overrides})
    D.run(cfg, log=lambda m: None)
    return cfg


def _plant(cache_path: Path, key, value) -> None:
    """Write `value` under `key` the way diskcache's own default Disk stores it (pickled)."""
    with diskcache.Cache(str(cache_path)) as c:
        c.set(key, value)


# ------------------------------------------------------------------------------------ 1. planted caches
def test_planted_pickle_in_describe_cache_runs_nothing(tmp_path, key):
    marker = tmp_path / "pwned"
    with FakeOpenAI() as srv:
        cfg = _cfg(tmp_path, **{"describe.llm": "openai", "describe.base_url": srv.base_url,
                                "describe.cache": str(tmp_path / "shared-cache")})
        first = DS.run(cfg, log=lambda m: None).manifest.info["report"]
        with diskcache.Cache(cfg.describe.cache) as c:
            keys = list(c)
        assert len(keys) == first["unique_prompts"] > 0
        for k in keys:  # every entry the next run reads is a payload
            _plant(Path(cfg.describe.cache), k, Payload(marker))
        logs: list[str] = []
        rep = DS.run(cfg, force=True, log=logs.append).manifest.info["report"]
        assert not marker.exists(), "a planted cache entry ran its payload"
        notes = [m for m in logs if "pickled" in m]
        assert len(notes) == 1 and "\n" not in notes[0] and cfg.describe.cache in notes[0]
        assert rep["cache_hits"] == 0 and rep["calls"] == first["unique_prompts"]  # made again, not lost
        desc = pd.read_parquet(cfg.run_dir / "describe" / "descriptions.parquet")
        assert (desc["backend"] == "openai").all()
        logs.clear()
        rep = DS.run(cfg, force=True, log=logs.append).manifest.info["report"]
        assert rep["calls"] == 0 and not any("pickled" in m for m in logs)  # rewritten without pickle
    assert not marker.exists()


def test_old_pickled_describe_cache_is_a_miss_not_a_crash(tmp_path, key):
    """A cache the earlier code wrote (dicts, pickled by diskcache) reads as misses with one line."""
    with FakeOpenAI() as srv:
        cfg = _cfg(tmp_path, **{"describe.llm": "openai", "describe.base_url": srv.base_url,
                                "describe.intents": False})
        DS.run(cfg, log=lambda m: None)
        path = L.cache_dir(cfg)
        with diskcache.Cache(str(path)) as c:  # as the earlier code: the default Disk pickles the dicts
            for k in list(c):
                c.set(k, {"text": "An old answer.", "model": L.DEFAULT_OPENAI_MODEL})
        logs: list[str] = []
        rep = DS.run(cfg, force=True, log=logs.append).manifest.info["report"]
        assert rep["cache_hits"] == 0 and rep["calls"] == rep["unique_prompts"]
        assert sum("pickled" in m for m in logs) == 1


def test_planted_pickled_key_and_foreign_value_file(tmp_path):
    """A pickled key is never unpickled (listing the cache), keys must be str, and a row whose value file lies
    outside the cache directory is neither read nor deleted when the key is overwritten."""
    marker = tmp_path / "pwned"
    path = tmp_path / "c"
    _plant(path, Payload(marker), "x")
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"not the cache's")
    _plant(path, "describe:abc", b"y" * 10)
    with sqlite3.connect(path / "cache.db") as db:
        db.execute("UPDATE Cache SET mode = 2, filename = ?, value = NULL WHERE key = ?",
                   (os.path.relpath(outside, path), "describe:abc"))
    cache = L.open_cache(path)
    try:
        assert len(list(cache)) == 2 and not marker.exists()
        assert cache.get("describe:abc") is None
        cache.set("describe:abc", {"text": "ok"})
        assert cache.get("describe:abc") == {"text": "ok"} and outside.read_bytes() == b"not the cache's"
        with pytest.raises(TypeError, match="str"):
            cache.set(("describe", 1), {"text": "x"})
        v = np.arange(6, dtype=np.float32).reshape(2, 3)
        cache.set("embed:v", v)
        got = cache.get("embed:v")
        assert got.dtype == np.float32 and np.array_equal(got, v)
    finally:
        cache.close()
    assert not marker.exists()


def test_planted_pickle_in_embed_cache_runs_nothing(tmp_path, key):
    marker = tmp_path / "pwned"
    with FakeOpenAI(embed_dim=8) as srv:
        tem = E.OpenAITEM(base_url=srv.base_url, cache_path=tmp_path / "ec", backoff_s=0.01)
        notes: list[str] = []
        tem.log = notes.append
        _plant(tmp_path / "ec", tem.key("hello"), Payload(marker))
        _plant(tmp_path / "ec", tem.key("old raw"), np.ones(8, np.float32).tobytes())  # the earlier format
        v = tem.encode(["hello", "old raw"])
        assert not marker.exists()
        assert len(notes) == 1 and "pickled" in notes[0] and "\n" not in notes[0]
        assert srv.embed_texts == {"hello": 1}  # the payload is a miss; the earlier raw vector is kept
        np.testing.assert_allclose(v[1], np.ones(8) / np.sqrt(8), atol=1e-6)
        notes.clear()
        E.OpenAITEM(base_url=srv.base_url, cache_path=tmp_path / "ec").encode(["hello"])
        assert srv.embed_texts == {"hello": 1} and notes == []  # stored again, as an array


# ------------------------------------------------------------------------------ 2. one cache, one payer
_DESCRIBE_RUN = ("import sys, json; from recpipe.config import load_config; from recpipe.pipeline import describe; "
                 "describe.run(load_config(None, json.loads(sys.argv[1])), log=lambda m: None)")


def _two_runs_setup(tmp_path: Path, srv: FakeOpenAI) -> tuple[dict, dict]:
    """Two run directories on one dataset sharing one describe cache: (overrides of run A, of run B)."""
    make_dataset(tmp_path / "ds", n_items=30, n_users=20)
    base = {"run.dataset": str(tmp_path / "ds"), "run.cache_dir": str(tmp_path / "cache"), "data.kcore": 1,
            "describe.llm": "openai", "describe.base_url": srv.base_url, "describe.concurrency": 2,
            "describe.timeout_s": 60, "describe.backoff_s": 0.01, "describe.cache": str(tmp_path / "shared")}
    a, b = {**base, "run.run_dir": str(tmp_path / "run-a")}, {**base, "run.run_dir": str(tmp_path / "run-b")}
    for o in (a, b):
        D.run(load_config(None, o), log=lambda m: None)
    return a, b


def _start(overrides: dict, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OPENAI_API_KEY": SECRET, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", _DESCRIBE_RUN, json.dumps(overrides)], cwd=cwd, env=env)


def _wait_delivered(srv: FakeOpenAI, proc: subprocess.Popen, n: int) -> None:
    deadline = time.time() + 120
    while sum(srv.delivered.values()) < n and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the first run ended before the second one started"


def test_second_describe_on_the_same_cache_waits_and_sends_nothing_twice(tmp_path, key):
    with FakeOpenAI(latency=0.1) as srv:
        a, b = _two_runs_setup(tmp_path, srv)
        proc = _start(a, tmp_path)
        try:
            _wait_delivered(srv, proc, 6)
            logs: list[str] = []
            rep = DS.run(load_config(None, b), log=logs.append).manifest.info["report"]
            assert proc.wait(timeout=120) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        waits = [m for m in logs if "waiting" in m]
        assert len(waits) == 1 and f"pid {proc.pid}" in waits[0] and "\n" not in waits[0]
        assert srv.repeats == {} and srv.total_calls == rep["unique_prompts"] == 60  # each prompt sent once
        assert rep["calls"] == 0 and rep["cache_hits"] == 60


def test_killed_describe_leaves_no_stale_lock(tmp_path, key):
    with FakeOpenAI(latency=0.1) as srv:
        a, b = _two_runs_setup(tmp_path, srv)
        proc = _start(a, tmp_path)
        try:
            _wait_delivered(srv, proc, 6)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
        cache = L.open_cache(Path(b["describe.cache"]))
        try:  # the fake server writes its prompt id into every answer
            cached = {cache[k]["text"].split("answer ")[1][:12] for k in cache}
        finally:
            cache.close()
        srv.reset_counts()
        logs: list[str] = []
        rep = DS.run(load_config(None, b), log=logs.append).manifest.info["report"]
        assert not any("waiting" in m for m in logs)  # the killed holder's lock went with it
        assert cached and not cached & set(srv.calls) and rep["cache_hits"] == len(cached)


# ----------------------------------------------------------------------------------- 3. secrets in URLs
QSECRET = "qs-Secret-9f8e7d6c5b4a"


def test_display_url_strips_userinfo_and_masks_query_values():
    url = f"https://bob:{QSECRET}@example.com:8443/v1?api-key={QSECRET}&deployment=x&{QSECRET}#{QSECRET}"
    assert L.display_url(url) == "https://example.com:8443/v1?api-key=***&deployment=***&***"
    assert L.display_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert QSECRET not in L.display_url(f"http://[::1/v1?key={QSECRET}")  # not parseable: cut before '?'
    assert QSECRET not in L.redact(f"failed: POST http://h/v1/chat?api-key={QSECRET} (refused)")


def _files_hold(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_url_secrets_never_reach_manifests_or_logs(tmp_path, key, monkeypatch):
    with FakeOpenAI(embed_dim=8) as srv:
        url = srv.base_url.replace("//", f"//user:{QSECRET}@") + f"?api-key={QSECRET}"
        cfg = _cfg(tmp_path, **{"describe.llm": "openai", "describe.base_url": url, "embed.tem": "openai",
                                "embed.base_url": url, "embed.backoff_s": 0.01})
        logs: list[str] = []
        res = DS.run(cfg, log=logs.append)
        assert res.manifest.info["report"]["calls"] > 0 and srv.total_calls > 0
        assert res.manifest.info["report"]["endpoint"] == srv.base_url + "?api-key=***"
        emb = E.run(cfg, log=logs.append)
        assert emb.manifest.info["base_url"] == srv.base_url + "?api-key=***"
        assert emb.manifest.config["embed"]["base_url"] == srv.base_url + "?api-key=***"
        assert _files_hold(tmp_path, QSECRET) == [] and not any(QSECRET in m for m in logs)
        # queries are embedded through the same endpoint: the full URL comes from the environment
        with pytest.raises(E.BackendError, match="OPENAI_BASE_URL") as e:
            E.load_tem(emb.manifest.info)
        assert QSECRET not in str(e.value) and "\n" not in str(e.value)
        monkeypatch.setenv("OPENAI_BASE_URL", url)
        X = np.load(emb.stage_dir / "item_embeddings.npy")
        text = pd.read_parquet(cfg.run_dir / "describe" / "descriptions.parquet")["text"][0]
        np.testing.assert_allclose(E.load_tem(emb.manifest.info).encode([text])[0], X[1], atol=1e-6)
    # a dead endpoint's error names it without the secret
    dead = f"http://127.0.0.1:9/v1?api-key={QSECRET}"
    cfg.describe.base_url, cfg.describe.max_retries, cfg.describe.cache = dead, 2, str(tmp_path / "empty-cache")
    with pytest.raises(DS.BackendError) as e:
        DS.run(cfg, force=True, log=logs.append)
    assert "127.0.0.1:9/v1?api-key=***" in str(e.value) and QSECRET not in str(e.value)
    tem = E.OpenAITEM(base_url=dead, max_retries=2, backoff_s=0.01, timeout_s=1)
    with pytest.raises(DS.BackendError) as e:
        tem.encode(["hello"])
    assert "127.0.0.1:9" in str(e.value) and QSECRET not in str(e.value)


# ------------------------------------------------------------------------------ 4. figures that say what
def test_llm_pace_is_reported_apart_from_items_that_needed_no_call(tmp_path, key):
    """With describe.limit most items take their metadata text: the closing figures give every item's pace over
    the whole stage and, apart, the LLM's own (its calls and the items it answered, over its own time)."""
    with FakeOpenAI(latency=0.05) as srv:
        cfg = _cfg(tmp_path, **{"describe.llm": "openai", "describe.base_url": srv.base_url, "describe.limit": 3,
                                "describe.concurrency": 1})
        logs: list[str] = []
        rep = DS.run(cfg, log=logs.append).manifest.info["report"]
        n = D.load(cfg.run_dir / "data").n_items
        assert rep["items"] == n and rep["llm_items"] == rep["called_items"] == 3 and rep["calls"] == 6
        assert 0 < rep["llm_s"] <= rep["elapsed_s"]
        assert rep["items_per_s"] == pytest.approx(n / rep["elapsed_s"], rel=0.02)
        assert rep["llm_calls_per_s"] == pytest.approx(6 / rep["llm_s"], rel=0.02)
        assert rep["llm_items_per_s"] == pytest.approx(3 / rep["llm_s"], rel=0.02)
        line = next(m for m in logs if m.startswith("describe: ") and "items/s" in m)
        assert f"({n - 3} from metadata)" in line and f"{rep['llm_items_per_s']:.2f} items/s" in line
        assert f"{rep['llm_calls_per_s']:.2f} calls/s" in line and "\n" not in line
        logs.clear()
        rep = DS.run(cfg, force=True, log=logs.append).manifest.info["report"]  # all cached: no LLM pace
        assert rep["calls"] == rep["called_items"] == 0 and rep["llm_s"] == 0 and rep["llm_items_per_s"] == 0
        assert not any("LLM:" in m for m in logs)


# ----------------------------------------------------------------------------- 5. each text embedded once
def _titles_only(tmp_path: Path) -> None:
    """The test dataset with its genres column dropped: a catalog of titles only."""
    make_dataset(tmp_path / "ds")
    items = pd.read_csv(tmp_path / "ds" / "items.csv")
    items.drop(columns=["genres"]).to_csv(tmp_path / "ds" / "items.csv", index=False)


def _metadata_described(tmp_path: Path):
    cfg = load_config(None, {"run.dataset": str(tmp_path / "ds"), "run.cache_dir": str(tmp_path / "cache"),
                             "data.kcore": 1, "describe.llm": "metadata"})
    D.run(cfg, log=lambda m: None)
    DS.run(cfg, log=lambda m: None)
    return cfg


def test_identical_intentions_are_embedded_once_and_reported(tmp_path, monkeypatch):
    """A titles-only catalog described from metadata gives every item the same intention: embed encodes each
    distinct text once, says in one line that the intentions are all alike, and times the whole stage."""
    _titles_only(tmp_path)
    cfg = _metadata_described(tmp_path)
    n = D.load(cfg.run_dir / "data").n_items
    intents = pd.read_parquet(cfg.run_dir / "describe" / "intents.parquet")["text"]
    assert intents.nunique() == 1 and n >= 10
    encoded: list[str] = []
    orig = E.LocalTEM.encode

    def recording(self, texts, *a, **kw):
        encoded.extend(texts)
        return orig(self, texts, *a, **kw)

    monkeypatch.setattr(E.LocalTEM, "encode", recording)
    logs: list[str] = []
    res = E.run(cfg, log=logs.append)
    assert sorted(encoded) == sorted(set(encoded)) and len(encoded) == n + 1  # n descriptions, 1 intention
    Q = np.load(res.stage_dir / "intent_embeddings.npy")
    X = np.load(res.stage_dir / "item_embeddings.npy")
    assert Q.shape == X.shape and np.array_equal(Q[1:], np.repeat(Q[1:2], n, axis=0)) and not Q[0].any()
    tem = E.load_tem(res.manifest.info)
    np.testing.assert_allclose(tem.encode([intents[0]])[0], Q[1], atol=1e-5)
    np.testing.assert_allclose(tem.encode([pd.read_parquet(cfg.run_dir / "describe" / "descriptions.parquet")
                                           ["text"][2]])[0], X[3], atol=1e-5)
    warns = [m for m in logs if "intentions are the same text" in m]
    assert len(warns) == 1 and f"{n} of {n}" in warns[0] and "\n" not in warns[0]
    rep = res.manifest.info["report"]
    assert rep["distinct_intents"] == 1 and rep["distinct_texts"] == n + 1 and rep["texts"] == 2 * n
    assert 0 < rep["encode_s"] <= rep["elapsed_s"]
    closing = next(m for m in logs if m.startswith("embed: ") and "vectors" in m)
    assert f"stage {rep['elapsed_s']:.1f} s" in closing and f"{n + 1} distinct texts of {2 * n}" in closing


def test_varied_intentions_give_no_warning(tmp_path):
    make_dataset(tmp_path / "ds")  # a genres column: the metadata intentions differ by genre
    cfg = _metadata_described(tmp_path)
    logs: list[str] = []
    res = E.run(cfg, log=logs.append)
    assert not any("same text" in m for m in logs) and res.manifest.info["report"]["distinct_intents"] >= 2
    assert E.alike_note(["a"] * 9 + ["b"]) is not None and E.alike_note(["a"] * 8 + ["b", "c"]) is None


# ------------------------------------------------------------------- 6. intentions that are really requests
# (intention, the item's title, why it cannot be used), as the bundled SmolLM2 wrote them for ml-100k films with
# intent_v1: the first on an AVX2-only CPU (issue 19), the rest on an AMX CPU (bf16)
NAMES, NOT_A_REQUEST = DS.INTENT_NAMES_ITEM, DS.INTENT_NOT_A_REQUEST
REAL_INTENTS = [
    ("Ref, The: A comedy-drama.", "Ref, The (1994)", NAMES),
    ("Angels and Insects (1995) I want to read a novel set in the world of angels and insects.",
     "Angels and Insects (1995)", NAMES),
    ("I want to see a scene from the movie Taxi Driver. I'm looking for something in particular, but I don't know "
     "what genre or mood it is.", "Taxi Driver (1976)", NAMES),
    ("I'm looking for something to eat. I've heard the birdcage is a great place to eat, but I don't know what "
     "it's called yet.", "Birdcage, The (1996)", NAMES),
    ("The (1995) is a murder mystery set in the 20th century. I want it to be a crime novel, not a thriller.",
     "Usual Suspects, The (1995)", NAMES),
    ("The (1991) Suspense of the Lambs, The (1991)", "Silence of the Lambs, The (1991)", NAMES),
    ("The user requests a movie with a dark, gritty tone and a strong female lead.", "Carlito's Way (1993)",
     NOT_A_REQUEST),
    ("The user wants to know about the latest superhero action movie.", "Stargate (1994)", NOT_A_REQUEST),
]
GOOD_INTENTS = [
    ("I'm looking for a movie with a strong female lead, something that's both intense and atmospheric. I'd love "
     "to hear about it!", "Twelve Monkeys (1995)"),
    ("I want a new story set in the 1970s. I'm looking for something that combines elements of horror and "
     "romance, with a dark underbelly.", "Seven (Se7en) (1995)"),
    ("I'm looking for a romantic comedy with a dark, atmospheric tone. I'd love to hear about it!",
     "While You Were Sleeping (1995)"),
    ("I want a comedy about a hockey referee stuck with a bickering couple.", "Ref, The (1994)"),
    ("Something light for a rainy Sunday, with talking animals.", "Babe (1995)"),
]


@pytest.mark.parametrize("text,title,why", REAL_INTENTS)
def test_real_bad_intentions_are_rejected(text, title, why):
    assert DS.intent_problem(text, title) == why
    with pytest.raises(L.Unusable, match=why):
        DS.check_output(text, "stop", forbid=title, intent=True)


@pytest.mark.parametrize("text,title", GOOD_INTENTS)
def test_real_good_intentions_pass(text, title):
    assert DS.intent_problem(text, title) is None
    assert DS.check_output(text, "stop", forbid=title, intent=True)[0] == text


def test_title_forms_move_the_article_back():
    assert DS.title_forms("Ref, The (1994)") == ([["ref", "the"], ["the", "ref"]], ["ref"])
    assert DS.title_forms("Cité des enfants perdus, La (1995)")[1] == ["cite", "des", "enfants", "perdus"]
    assert DS.title_forms("The Matrix (1999)") == ([["the", "matrix"]], ["matrix"])
    assert DS.names_item("I want to watch the Ref tonight.", "Ref, The (1994)")
    assert not DS.names_item("I want a film about a referee.", "Ref, The (1994)")  # a short core: words only
    assert DS.names_item("I want LA CITE DES ENFANTS PERDUS", "Cité des enfants perdus, La (1995)")


def _answer(h, content: str) -> None:
    h._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": "fake",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                               "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}})


def test_intentions_naming_their_item_fall_back_to_metadata_and_are_counted(tmp_path, key):
    """An endpoint that keeps writing intentions which name their item (item 1) or read like a description
    (item 3): after the retries both take their metadata intention, counted by reason in the report and the
    log; a cached intention the checks now reject is asked again, not used."""
    with FakeOpenAI() as srv:
        cfg = _cfg(tmp_path, **{"describe.llm": "openai", "describe.base_url": srv.base_url,
                                "describe.max_retries": 2})
        items = D.load(cfg.run_dir / "data").items
        t1, t3 = L.clean_text(items.loc[0, "title"]), L.clean_text(items.loc[2, "title"])
        assert t1 and t3
        orig = srv._chat

        def chat(h, body):
            user = body["messages"][-1]["content"]
            if "request" in user and f"Title: {t1}" in user:
                return _answer(h, f"{t1.split(' (')[0]}: a tense action thriller.")
            if "request" in user and f"Title: {t3}" in user:
                return _answer(h, "A warm comedy about a family reunion that goes wrong.")
            return orig(h, body)

        srv._chat = chat
        logs: list[str] = []
        res = DS.run(cfg, log=logs.append)
        rep = res.manifest.info["report"]
        intents = pd.read_parquet(res.stage_dir / "intents.parquet")
        assert intents.loc[0, "backend"] == intents.loc[2, "backend"] == "metadata"
        assert intents.loc[0, "text"] == DS.metadata_intent(items.iloc[0])
        assert (intents.drop(index=[0, 2])["backend"] == "openai").all()
        assert rep["fallback_items"] == {"intent": [1, 3]} and rep["failures"] == 2
        assert rep["fallback_reasons"] == {"intent": {DS.INTENT_NAMES_ITEM: 1, DS.INTENT_NOT_A_REQUEST: 1}}
        line = next(m for m in logs if "stayed unusable" in m)
        assert DS.INTENT_NAMES_ITEM in line and DS.INTENT_NOT_A_REQUEST in line and "\n" not in line

        # a cached intention (written before these checks) that names its item is not used
        srv._chat = orig
        tmpl = L.load_template("intent_v1")
        meta = DS.metadata_text(items.iloc[4], cfg.describe.max_input_chars)
        k = L.cache_key("openai", L.DEFAULT_OPENAI_MODEL, tmpl.hash, meta, cfg.describe.max_tokens,
                         cfg.describe.temperature)
        cache = L.open_cache(L.cache_dir(cfg))
        try:
            assert cache.get(k) is not None
            bad = f"I want {L.clean_text(items.loc[4, 'title']).split(' (')[0]} again."
            cache.set(k, {**cache.get(k), "text": bad})
        finally:
            cache.close()
        rep = DS.run(cfg, force=True, log=lambda m: None).manifest.info["report"]
        assert rep["rejected_cached"] == 1 and rep["calls"] == 3  # item 5 again; 1 and 3 (never cached) too
        intents = pd.read_parquet(res.stage_dir / "intents.parquet")
        assert intents.loc[4, "backend"] == "openai" and intents.loc[4, "text"].startswith("I want a fine item")
