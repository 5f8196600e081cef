"""A fake OpenAI-compatible server on 127.0.0.1 for tests and benchmarks (stdlib only).

`/v1/chat/completions` answers each prompt (identified by the hash of its last user message) according to a
fault plan: the k-th call for a prompt may get a 429, a 500, a hang past the client's timeout, garbage JSON,
an empty answer, a looping answer or an answer cut off by the token limit; otherwise a valid description.
The server counts calls per prompt and, separately, successful answers delivered: a prompt answered
successfully twice is a *repeat*, which the describe stage must never cause.

`/v1/embeddings` returns deterministic unit vectors (a hash of model + text) and records every batch size.
Every request is bounded (hangs last `hang_s`, at most `max_requests` are served) and the server only binds
127.0.0.1. Run `python tests/fault_server.py --port P --latency 0.3` to serve from a separate process.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

FAULTS = ("429", "500", "hang", "garbage", "empty", "loop", "cut")


def prompt_id(messages: list[dict]) -> str:
    user = [m.get("content", "") for m in messages if m.get("role") == "user"]
    return hashlib.sha1((user[-1] if user else "").encode("utf-8")).hexdigest()[:12]


def default_plan(fault_rate: float, max_faults: int, kinds=FAULTS):
    """Deterministic: the first `max_faults` calls of a prompt fault with probability `fault_rate` (a hash of
    prompt and call number decides); later calls succeed. kinds rotate with the hash."""

    def plan(pid: str, k: int) -> str | None:
        if k > max_faults:
            return None
        h = int(hashlib.sha1(f"{pid}:{k}".encode()).hexdigest()[:8], 16)
        if (h % 1000) / 1000 >= fault_rate:
            return None
        return kinds[(h // 1000) % len(kinds)]

    return plan


class FakeOpenAI:
    def __init__(self, plan=None, latency: float = 0.0, hang_s: float = 2.0, embed_dim: int = 16,
                 max_requests: int = 100_000, die_after: int | None = None, port: int = 0):
        self.plan = plan or (lambda pid, k: None)
        self.latency = latency
        self.hang_s = hang_s
        self.embed_dim = embed_dim
        self.max_requests = max_requests
        self.die_after = die_after  # after this many successful answers every call gets 503
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()  # prompt -> calls received
        self.delivered: Counter[str] = Counter()  # prompt -> successful answers sent
        self.faults: Counter[str] = Counter()  # fault kind -> count
        self.embed_batches: list[int] = []
        self.embed_texts: Counter[str] = Counter()
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                if self.path.split("?")[0].rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                n = int(self.headers.get("content-length") or 0)
                try:
                    body = json.loads(self.rfile.read(n) or b"{}")
                except json.JSONDecodeError:
                    return self._send(400, {"error": {"message": "bad json"}})
                with server.lock:
                    server.requests += 1
                    over = server.requests > server.max_requests
                if over:
                    return self._send(503, {"error": {"message": "request budget exhausted"}})
                route = self.path.split("?")[0]  # a query (an endpoint's api-key) does not change the route
                if route.endswith("/chat/completions"):
                    return server._chat(self, body)
                if route.endswith("/embeddings"):
                    return server._embeddings(self, body)
                self._send(404, {"error": {"message": f"no route {self.path}"}})

            def _send(self, status, obj=None, raw: bytes | None = None, headers=None):
                data = raw if raw is not None else json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # ------------------------------------------------------------------------------------------ routes
    def _chat(self, h, body):
        pid = prompt_id(body.get("messages") or [])
        with self.lock:
            self.calls[pid] += 1
            k = self.calls[pid]
            dead = self.die_after is not None and sum(self.delivered.values()) >= self.die_after
        if self.latency:
            time.sleep(self.latency)
        if dead:
            return h._send(503, {"error": {"message": "service unavailable"}})
        kind = self.plan(pid, k)
        if kind is not None:
            with self.lock:
                self.faults[kind] += 1
        if kind == "429":
            return h._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                           headers={"retry-after": "0"})
        if kind == "500":
            return h._send(500, {"error": {"message": "internal error"}})
        if kind == "hang":
            time.sleep(self.hang_s)
            return h._send(500, {"error": {"message": "too late"}})
        if kind == "garbage":
            return h._send(200, raw=b'{"id": "x", "choices": [{"message": <<<garbage')
        user = [m.get("content", "") for m in body.get("messages") or [] if m.get("role") == "user"]
        if user and "request" in user[-1]:  # an intention prompt: answer as a user's request
            content = f"I want a fine item, answer {pid}. Something for people who enjoy a good story with heart."
        else:
            content = f"A fine item, answer {pid}. It suits people who enjoy a good story with heart."
        finish = "stop"
        if kind == "empty":
            content = ""
        elif kind == "loop":
            content = "great fun " * 40
        elif kind == "cut":
            content, finish = "This item is a wonderful and", "length"
        resp = {
            "id": f"chatcmpl-{pid}-{k}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 20, "total_tokens": 70},
        }
        if kind is None:
            with self.lock:
                self.delivered[pid] += 1
        h._send(200, resp)

    def _embeddings(self, h, body):
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or any(not isinstance(t, str) or not t for t in inputs):
            return h._send(400, {"error": {"message": "input must be a non-empty list of non-empty strings"}})
        if len(inputs) > 2048:
            return h._send(400, {"error": {"message": "at most 2048 inputs"}})
        model = body.get("model", "")
        with self.lock:
            self.embed_batches.append(len(inputs))
            self.embed_texts.update(inputs)
        if self.latency:
            time.sleep(self.latency)
        data = [{"object": "embedding", "index": i, "embedding": fake_embedding(model, t, self.embed_dim).tolist()}
                for i, t in enumerate(inputs)]
        data.reverse()  # the API does not promise order: clients must sort by index
        h._send(200, {"object": "list", "data": data, "model": model,
                      "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}})

    # ---------------------------------------------------------------------------------------- control
    @property
    def repeats(self) -> dict[str, int]:
        """Prompts that got more than one successful answer."""
        with self.lock:
            return {p: c for p, c in self.delivered.items() if c > 1}

    @property
    def total_calls(self) -> int:
        with self.lock:
            return sum(self.calls.values())

    def reset_counts(self) -> None:
        with self.lock:
            self.calls.clear()
            self.delivered.clear()
            self.faults.clear()
            self.embed_batches.clear()
            self.embed_texts.clear()

    def start(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def fake_embedding(model: str, text: str, dim: int) -> np.ndarray:
    seed = int(hashlib.sha256(f"{model}\x00{text}".encode()).hexdigest()[:16], 16)
    v = np.random.default_rng(seed).standard_normal(dim)
    return (v / np.linalg.norm(v)).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--fault-rate", type=float, default=0.0)
    ap.add_argument("--seconds", type=float, default=600.0, help="stop after this long (bounded)")
    a = ap.parse_args()
    srv = FakeOpenAI(plan=default_plan(a.fault_rate, 3), latency=a.latency, port=a.port).start()
    print(srv.base_url, flush=True)
    try:
        time.sleep(a.seconds)
    finally:
        srv.stop()


if __name__ == "__main__":
    main()
