"""`recpipe serve` against a real uvicorn server on 127.0.0.1 (a free port), with a real HTTP client, on a
small idreamrec run this module trains (metadata intentions, the local MiniLM TEM, one epoch).

What is checked: the answers are the numbers `RecommendService` (what `recpipe recommend` calls) gives for the
same request, alone and in batches; bad input is a 4xx with a one-line reason and the server keeps serving;
faults (a client that disconnects, a slow client, a 10 MB body, 1,000 mixed requests, a reload under load);
the API key; metrics; readiness; and the CLI's start-up line and its error for a bad run directory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the serve tests need httpx (the dev extra)")
pytest.importorskip("uvicorn", reason="recpipe serve needs uvicorn")

from recpipe.config import load_config  # noqa: E402
from recpipe.serve.engine import ANCHOR_CHARS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
INTENTS = ("a funny comedy", "an action-packed thriller", "something sad and dramatic")


# --------------------------------------------------------------------------------------------- fixtures
def train_run(root: Path):
    """A small idreamrec run: 60 items, 40 users, metadata intentions, the local MiniLM TEM, one epoch."""
    from test_describe import make_dataset

    from recpipe.pipeline import data, describe, embed, train, whiten

    make_dataset(root / "ds", n_items=60, n_users=40, seed=3)
    cfg = load_config(None, {"run.dataset": str(root / "ds"), "run.cache_dir": str(root / "cache"),
                             "data.kcore": 1, "describe.llm": "metadata", "train.model": "idreamrec",
                             "train.epochs": 1, "train.threads": 2, "model.idreamrec.width": 32,
                             "model.idreamrec.history_len": 5, "recommend.dtype": "float32"})
    for stage in (data, describe, embed, whiten):
        stage.run(cfg, log=lambda m: None)
    train.run(cfg, log=lambda m: None, progress=False)
    return cfg


@pytest.fixture(scope="module")
def run_cfg(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("serve-run"))


@pytest.fixture(scope="module")
def reference(run_cfg):
    """What `recpipe recommend` computes: its RecommendService on the same run."""
    from recpipe.pipeline.recommend import RecommendService

    return RecommendService(run_cfg, log=lambda m: None)


class Server:
    """create_app on uvicorn in a thread, on a socket bound to 127.0.0.1:0; stopped by `close`."""

    def __init__(self, settings, wait_ready: bool = True):
        import uvicorn

        from recpipe.serve.app import create_app

        self.logs: list[str] = []
        self.app = create_app(settings, log=self.logs.append)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        self.client = httpx.Client(base_url=self.url, timeout=60)
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, tries: int = 600) -> None:
        for _ in range(tries):  # bounded: the run loads in a few seconds
            try:
                if self.client.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the server never became ready: {self.logs}")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def close(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)


def settings(cfg, **kw):
    from recpipe.serve.app import ServeSettings

    return ServeSettings(cfg, **kw)


@pytest.fixture(scope="module")
def server(run_cfg):
    s = Server(settings(run_cfg))
    yield s
    s.close()


def expected(ref, user, intent=None, k=10, **kw):
    recs = ref.recommend(user, intent=intent, k=k, **kw)
    return [(r.item_id, r.title, r.score) for r in recs]


def got(resp):
    assert resp.status_code == 200, resp.text
    return [(it["id"], it["title"], it["score"]) for it in resp.json()["items"]]


def close_to(g, want) -> bool:
    """The same items, scores within float32 batching drift: for answers that may share a batch with others."""
    return [x[:2] for x in g] == [x[:2] for x in want] and bool(
        np.allclose([x[2] for x in g], [x[2] for x in want], rtol=1e-4, atol=1e-5))


def users(ref, n=6):
    ids = ref.ds.users["user_id"].tolist()
    return [u for u in ids if u != "u0"][:n]  # u0 has seen every item


# ------------------------------------------------------------------------------------------ same numbers
def test_answers_are_recommends_numbers(server, reference):
    """One request at a time: the same items, titles and scores (bit for bit) as RecommendService; an intent
    also says which training intentions it was anchored to, with the weights recommend shows."""
    c = server.client
    for u in users(reference):
        assert got(c.post("/recommend", json={"user": u})) == expected(reference, u)
        for intent in INTENTS:
            r = c.post("/recommend", json={"user": u, "intent": intent, "k": 7})
            assert got(r) == expected(reference, u, intent, k=7)
            near = reference.anchored_to(intent)
            assert [(a["intention"], a["weight"]) for a in r.json()["anchored"]] == \
                   [(t[:ANCHOR_CHARS], wt) for t, wt in near] and near
        r = c.post("/recommend", json={"user": u, "intent": INTENTS[0], "w": 2.0, "rho": 0.5, "k": 5})
        assert got(r) == expected(reference, u, INTENTS[0], k=5, w=2.0, rho=0.5)
    # a visitor whose history is a known user's: that user's answer
    u = users(reference)[0]
    hist = [reference.item_ids[i - 1] for i in reference.ds.sequence(reference.ds.user_index(u))]
    assert got(c.post("/recommend", json={"history": hist, "intent": INTENTS[1]})) == expected(reference, u, INTENTS[1])
    # exclude / exclude_seen
    first = got(c.post("/recommend", json={"user": u}))
    again = got(c.post("/recommend", json={"user": u, "exclude": [first[0][0]]}))
    assert again[0] == first[1] and first[0][0] not in [i for i, _, _ in again]
    unseen = got(c.post("/recommend", json={"user": u, "exclude_seen": False, "k": 60}))
    assert set(hist) <= {i for i, _, _ in unseen}  # seen items may come back


def _tolerance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def test_a_batch_gives_each_request_its_own_answer(run_cfg, reference):
    """Engine.run_batch on many requests (mixed users, intents, k, guidance) gives each the items of its own
    request made alone; scores agree to within what this machine's batched matmuls differ by (measured here
    on the denoiser itself), and the ranking agrees wherever two scores are further apart than that."""
    import torch

    from recpipe.serve.engine import Engine

    eng = Engine(run_cfg, log=lambda m: None)
    us = users(reference)
    reqs = [(u, INTENTS[i % 4] if i % 4 < 3 else None, 5 + i % 3, None if i % 5 else 2.0)
            for i, u in enumerate(us * 3)]
    qs = [eng.parse(u, None, it, k, w, None, None, True) for u, it, k, w in reqs]
    batched = eng.run_batch(qs)
    alone = [eng.run_batch([eng.parse(u, None, it, k, w, None, None, True)])[0] for u, it, k, w in reqs]
    # the machine's own batched-vs-alone drift of the denoiser's output, scaled to item scores
    hist = torch.randint(1, eng.ds.n_items + 1, (len(qs), 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = torch.randn((1, eng.model.dim), generator=torch.Generator().manual_seed(1))
        many = eng.model.generate({"history": hist}, steps=1, x_T=x.expand(len(qs), -1).contiguous())
        one = torch.cat([eng.model.generate({"history": hist[i:i + 1]}, steps=1, x_T=x) for i in range(len(qs))])
    drift = _tolerance(many.numpy(), one.numpy())
    table = eng.model.item_table().detach().numpy()
    tol = 4 * drift * float(np.abs(table).sum(axis=1).max()) + 1e-6 * float(np.abs(table).max())
    for (u, it, k, w), b, a in zip(reqs, batched, alone):
        assert [x["id"] for x in a.items] == [x["id"] for x in expected_items(reference, u, it, k, w)]
        sb = np.array([x["score"] for x in b.items])
        sa = np.array([x["score"] for x in a.items])
        assert len(sb) == len(sa) == k and np.abs(sb - sa).max() <= tol, (np.abs(sb - sa).max(), tol)
        gaps = np.diff(sa) < -2 * tol  # clear gaps: the order there must be the same
        assert [x["id"] for x, g in zip(b.items, np.r_[gaps, True]) if g] == \
               [x["id"] for x, g in zip(a.items, np.r_[gaps, True]) if g]


def expected_items(ref, u, intent, k, w):
    return [{"id": r.item_id} for r in ref.recommend(u, intent=intent, k=k, w=w)]


def test_concurrent_requests_are_batched_and_each_answered_as_alone(server, reference):
    """32 clients at once: every answer holds its own request's items (scores to the batch tolerance above,
    here 1e-4 relative, far above float32 batching drift), and the batcher did put requests together."""
    us = users(reference)
    reqs = [{"user": us[i % len(us)], "intent": INTENTS[i % 3] if i % 2 else None, "k": 6} for i in range(96)]
    want = {i: expected(reference, r["user"], r["intent"], k=6) for i, r in enumerate(reqs)}

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     limits=httpx.Limits(max_connections=32)) as c:
            return await asyncio.gather(*(c.post("/recommend", json={k: v for k, v in r.items() if v is not None})
                                          for r in reqs))

    before = _metric(server, "recpipe_batch_size_count")
    resps = asyncio.run(go())
    for i, r in enumerate(resps):
        g = got(r)
        assert [x[0] for x in g] == [x[0] for x in want[i]] or _same_up_to_ties(g, want[i]), (i, g, want[i])
        np.testing.assert_allclose([x[2] for x in g], [x[2] for x in want[i]], rtol=1e-4, atol=1e-5)
    batches = _metric(server, "recpipe_batch_size_count") - before
    assert batches < len(reqs), "96 concurrent requests each went alone: nothing was batched"


def _same_up_to_ties(a, b, tol=1e-4):
    """Two rankings that differ only where neighbouring scores are within tol."""
    if {x[0] for x in a} != {x[0] for x in b}:
        return False
    sa = dict((x[0], x[2]) for x in a)
    return all(abs(sa[x[0]] - x[2]) <= tol for x in b)


def _metric(server, name: str, labels: str = "") -> float:
    text = server.client.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + ("{" if labels else "")) and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


# -------------------------------------------------------------------------------------------- bad input
BAD = [  # (body or raw bytes, status, words the reason must contain)
    ({"user": "nobody"}, 404, "unknown user"),
    ({"history": ["i000", "no-such-item"]}, 404, "unknown item"),
    ({"history": []}, 422, "history is empty"),
    ({"user": "u1", "intent": "   "}, 422, "intent is empty"),
    ({"user": "u1", "intent": "x" * 501}, 422, "at most 500"),
    ({"user": "u1", "k": 0}, 422, "k must be between"),
    ({"user": "u1", "k": 10**6}, 422, "k must be between"),
    ({"user": "u1", "k": "ten"}, 422, "k"),
    ({"user": "u1", "history": ["i000"]}, 422, "either"),
    ({}, 422, "either"),
    ({"user": "u1", "exclude": ["nope"]}, 404, "unknown item"),
    ({"user": "u1", "colour": "red"}, 422, "colour"),
    ({"user": "u0"}, 422, "nothing left to recommend"),
    (b'{"user": "u1", "w": NaN}', 422, "finite"),
    (b'{"user": "u1", "rho": Infinity}', 422, "finite"),
    (b'{"user": "u1", ', 400, "malformed JSON"),
    (b'[1, 2, 3]', 422, "body"),
    (b'\xff\xfe', 400, "malformed JSON"),
]


def _post(c, body):
    if isinstance(body, bytes):
        return c.post("/recommend", content=body, headers={"content-type": "application/json"})
    return c.post("/recommend", json=body)


@pytest.mark.parametrize("body,status,words", BAD, ids=[str(b)[:40] for b, _, _ in BAD])
def test_bad_input_is_a_4xx_with_one_line(server, body, status, words):
    r = _post(server.client, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err and "\n" not in err and "Traceback" not in r.text, err
    assert server.client.get("/readyz").status_code == 200  # still serving


def test_other_routes(server, reference):
    c = server.client
    one = reference.item_ids[5]
    assert c.get(f"/items/{one}").json()["title"] == reference.titles[5]
    r = c.get("/items/does-not-exist")
    assert r.status_code == 404 and "unknown item" in r.json()["error"]
    hits = c.get("/items", params={"q": "NUMBER 12", "limit": 3}).json()["items"]
    assert hits[0]["title"] == "Film number 12 (1992)" and all("12" in h["title"] for h in hits)
    assert len(c.get("/items", params={"q": "film", "limit": 3}).json()["items"]) == 3
    assert c.get("/items", params={"q": "film", "limit": 0}).status_code == 422
    assert c.get("/items", params={"q": "zzz-no-such-title"}).json()["items"] == []
    assert c.get("/nowhere").status_code == 404 and "error" in c.get("/nowhere").json()
    assert c.get("/recommend").status_code == 405
    assert "u1" in c.get("/users").json()["users"]
    assert c.get("/healthz").json() == {"ok": True}
    ready = c.get("/readyz").json()
    assert ready["model"] == "idreamrec" and ready["items"] == reference.ds.n_items
    assert ready["index"].startswith("flat")
    assert "/recommend" in c.get("/openapi.json").json()["paths"]
    assert c.get("/docs").status_code == 200
    page = c.get("/")
    assert page.status_code == 200 and "<title>recpipe</title>" in page.text


def test_metrics(server, reference):
    c = server.client
    c.post("/recommend", json={"user": users(reference)[0], "intent": "a brand new request for metrics"})
    c.post("/recommend", json={"user": users(reference)[1], "intent": "a brand new request for metrics"})
    c.post("/recommend", json={"user": "nobody"})
    text = c.get("/metrics").text
    assert 'recpipe_requests_total{route="/recommend",status="200"}' in text
    assert 'recpipe_requests_total{route="/recommend",status="404"}' in text
    assert "recpipe_request_seconds_bucket" in text and "recpipe_batch_size_bucket" in text
    assert _metric(server, "recpipe_intent_cache_total", 'outcome="hit"') >= 1
    assert _metric(server, "recpipe_intent_cache_total", 'outcome="miss"') >= 1


def test_first_log_line_says_what_was_loaded(server, reference):
    first = server.logs[0]
    assert first.startswith("recpipe serve: idreamrec from ")
    for part in (f"{reference.ds.n_items:,} items", "index flat", "device cpu", "TEM local", "http://127.0.0.1"):
        assert part in first, first


# ----------------------------------------------------------------------------------------------- faults
def test_1000_requests_bad_interleaved_with_good(server, reference):
    """1,000 requests from 8 clients, every third one bad: every good one gets its own correct answer."""
    us = users(reference)
    good = [{"user": us[i % len(us)], "intent": INTENTS[i % 3], "k": 5} for i in range(len(us) * 3)]
    want = [expected(reference, g["user"], g["intent"], k=5) for g in good]
    bad = [b for b, _, _ in BAD]

    def one(i):
        if i % 3 == 2:
            b = bad[i % len(bad)]
            return i, None, _post(client, b).status_code
        j = i % len(good)
        return i, j, got(client.post("/recommend", json=good[j]))

    with httpx.Client(base_url=server.url, timeout=60) as client, ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(1000)))
    for _i, j, out in results:
        if j is None:
            assert 400 <= out < 500, out
        else:
            assert [x[0] for x in out] == [x[0] for x in want[j]]
            np.testing.assert_allclose([x[2] for x in out], [x[2] for x in want[j]], rtol=1e-4, atol=1e-5)


def _raw(port: int, data: bytes, read: bool = True, timeout: float = 30) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        if not read:
            return b""
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
        return out


def test_clients_that_disconnect_and_a_slow_client(server, reference):
    u = users(reference)[0]
    body = b'{"user": "%s", "intent": "a funny comedy"}' % u.encode()
    head = (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    for _ in range(20):
        _raw(server.port, head + body[:10], read=False)  # gone mid-body
        _raw(server.port, head + body, read=False)  # gone before its answer
    # a slow client: the body a few bytes at a time; meanwhile the others are answered
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
        s.sendall(head)
        for i in range(0, len(body), 5):
            s.sendall(body[i:i + 5])
            if i + 5 < len(body):  # still sending: the server answers others meanwhile
                # (the abandoned requests above may still share its batch: batching drift, not equality)
                assert close_to(got(server.client.post("/recommend", json={"user": u})), expected(reference, u))
                time.sleep(0.02)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    assert out.startswith(b"HTTP/1.1 200"), out[:200]
    assert expected(reference, u, "a funny comedy")[0][0].encode() in out
    assert close_to(got(server.client.post("/recommend", json={"user": u})), expected(reference, u))


def test_a_10_mb_body_is_refused_and_the_server_goes_on(server, reference):
    big = b'{"user": "u1", "history": [' + b'"i001", ' * (10 * 1024 * 1024 // 8) + b'"i002"]}'
    head = (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n" % len(big))
    out = _raw(server.port, head + big)
    assert out.startswith(b"HTTP/1.1 413") or out == b"", out[:200]  # refused before the body is read
    # chunked, no length: refused once the cap is passed
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 65536]), big[i:i + 65536])
                       for i in range(0, len(big), 65536)) + b"0\r\n\r\n"
    head2 = (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n")
    out = _raw(server.port, head2 + chunked)
    assert out.startswith(b"HTTP/1.1 413") or out == b"", out[:200]
    r = server.client.post("/recommend", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over" in r.json()["error"]
    u = users(reference)[0]
    assert close_to(got(server.client.post("/recommend", json={"user": u})), expected(reference, u))


def test_reload_under_load_drops_nothing(run_cfg, reference, tmp_path):
    """A copy of the run reloaded while 8 clients keep asking: 0 errors, every answer right, and the service
    then serves the new directory; a reload of a missing run fails in one line and the old run goes on."""
    copy = tmp_path / "run-b"
    shutil.copytree(run_cfg.run_dir, copy)
    srv = Server(settings(run_cfg))
    us = users(reference)
    want = {u: expected(reference, u, INTENTS[0], k=5) for u in us}
    stop = threading.Event()
    errors, answered = [], [0]

    def client_loop(n):
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            i = 0
            while not stop.is_set() and i < 2000:  # bounded
                u = us[(n + i) % len(us)]
                r = c.post("/recommend", json={"user": u, "intent": INTENTS[0], "k": 5})
                if r.status_code != 200 or [x[0] for x in got(r)] != [x[0] for x in want[u]]:
                    errors.append((r.status_code, r.text[:200]))
                answered[0] += 1
                i += 1

    try:
        threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        while answered[0] < 50:
            time.sleep(0.01)
        r = srv.client.post("/admin/reload", json={"run_dir": str(copy)})
        assert r.status_code == 200, r.text
        n_at_reload = answered[0]
        while answered[0] < n_at_reload + 100:
            time.sleep(0.01)
        bad = srv.client.post("/admin/reload", json={"run_dir": str(tmp_path / "missing")})
        assert bad.status_code == 422 and "still serving the previous run" in bad.json()["error"]
        stop.set()
        for t in threads:
            t.join(60)
        assert errors == [] and answered[0] > n_at_reload
        assert srv.client.get("/readyz").json()["run_dir"] == str(copy)
        assert any(line.startswith("reloaded: ") for line in srv.logs)
    finally:
        stop.set()
        srv.close()


def test_api_key(run_cfg, reference, monkeypatch):
    key = "s3cret-key-for-the-test"
    monkeypatch.setenv("RECPIPE_API_KEY", key)
    srv = Server(settings(run_cfg))
    try:
        c, u = srv.client, users(reference)[0]
        assert c.post("/recommend", json={"user": u}).status_code == 401
        assert c.post("/recommend", json={"user": u}, headers={"X-API-Key": key[:-1]}).status_code == 401
        assert c.get("/metrics").status_code == 401 and c.get("/items", params={"q": "film"}).status_code == 401
        assert c.post("/admin/reload").status_code == 401
        assert got(c.post("/recommend", json={"user": u}, headers={"X-API-Key": key})) == expected(reference, u)
        assert c.post("/recommend", json={"user": u}, headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        assert "required" in srv.logs[0] and not any(key in line for line in srv.logs)
        # no CORS unless configured
        r = c.options("/recommend", headers={"Origin": "http://elsewhere.example",
                                             "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers
    finally:
        srv.close()


def test_not_ready_while_loading(run_cfg, monkeypatch):
    from recpipe.serve import app as serve_app

    gate = threading.Event()
    real = serve_app.State.load

    def slow_load(self, cfg, model):
        gate.wait(60)
        return real(self, cfg, model)

    monkeypatch.setattr(serve_app.State, "load", slow_load)
    srv = Server(settings(run_cfg), wait_ready=False)
    try:
        for _ in range(100):
            try:
                if srv.client.get("/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        r = srv.client.get("/readyz")
        assert r.status_code == 503 and r.json()["reason"] == "loading"
        r = srv.client.post("/recommend", json={"user": "u1"})
        assert r.status_code == 503 and "not ready" in r.json()["error"]
        gate.set()
        srv.wait_ready()
        assert srv.client.post("/recommend", json={"user": "u1"}).status_code == 200
    finally:
        gate.set()
        srv.close()


# ------------------------------------------------------------------------------------------------- CLI
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_starts_answers_and_stops(run_cfg, reference):
    """`recpipe serve` as a user runs it: the first line says what it loaded, a request is answered, SIGTERM
    stops it with exit 0; a run directory without a trained model is `error: ...` and exit 2."""
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RECPIPE_API_KEY", None)
    cmd = [sys.executable, "-m", "recpipe", "serve", "--run-dir", str(run_cfg.run_dir), "--port", str(port),
           "--set", "recommend.dtype=float32"]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        first = p.stderr.readline()
        assert first.startswith("recpipe serve: idreamrec from "), first
        u = users(reference)[0]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
            assert got(c.post("/recommend", json={"user": u, "intent": INTENTS[0]})) == \
                   expected(reference, u, INTENTS[0])
        p.send_signal(signal.SIGTERM)
        rest = p.communicate(timeout=60)[1]
        assert p.returncode == 0, rest
        assert "Traceback" not in rest
    finally:
        if p.poll() is None:
            p.kill()
    bad = subprocess.run([sys.executable, "-m", "recpipe", "serve", "--run-dir", str(run_cfg.run_dir) + "-none",
                          "--port", str(_free_port())], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2, bad.stderr
    lines = [x for x in bad.stderr.splitlines() if x.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in bad.stderr, bad.stderr
