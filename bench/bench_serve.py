"""`recpipe serve` under load on loopback: throughput, latency percentiles and errors, by request kind and by the
number of concurrent clients.

    recpipe train -d ml-100k ...   # any trained idreamrec run
    python bench/bench_serve.py --run-dir cache/ml-100k [--duration 5] [--clients 1,8,32,128]
    python bench/bench_serve.py --run-dir cache/ml-1m --duration 60   # the issue's protocol

Starts `recpipe serve` on a free port of 127.0.0.1, then drives it with closed-loop async clients (asyncio streams),
each sending its next request when the last is answered, for --duration seconds per cell:
- `history`: a known user, no intent;
- `distinct`: a user and an intent never sent before (the TEM runs for every request);
- `repeated`: a user and one of 8 intents (answered from the intent cache after the first).
Before that, the in-process p50 of the same kinds of request (RecommendService, one at a time), the figure a
lone request to the service should not fall behind. Prints one row per cell: requests, requests/s, p50/p95/p99
latency, errors, the CPU (cores) of the server and of the load generator, and the server's mean batch size;
and the machine.
Everything stays on 127.0.0.1; each cell stops by itself after --duration seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REPEATED = ("a funny comedy", "a scary horror film", "a romantic movie for date night", "space adventure with aliens",
            "a documentary about real events", "a cartoon for the kids", "a war film", "a tense thriller")
ADJ = ("quiet", "loud", "old", "new", "strange", "gentle", "dark", "bright", "slow", "fast", "odd", "warm")
NOUN = ("comedy", "drama", "thriller", "western", "musical", "romance", "mystery", "adventure", "documentary")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Requests:
    """Request bodies of one kind; distinct intents never repeat within a bench run."""

    def __init__(self, users: list[str], seed: int):
        self.users = users
        self.rng = random.Random(seed)
        self.n = 0

    def body(self, kind: str) -> dict:
        b = {"user": self.rng.choice(self.users)}
        if kind == "distinct":
            self.n += 1
            b["intent"] = f"a {self.rng.choice(ADJ)} {self.rng.choice(NOUN)} number {self.n}"
        elif kind == "repeated":
            b["intent"] = self.rng.choice(REPEATED)
        return b


class Conn:
    """One keep-alive HTTP/1.1 connection on asyncio streams: a load generator light enough that, on the same
    2 cores, the server and not the client is what is measured (httpx's pool costs more CPU per request than
    the service does)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (path.encode(), self.host.encode(), len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        data = await self.reader.readexactly(length)
        if b"connection: close" in head.lower():
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def drive(port: int, kind: str, clients: int, duration: float, reqs: Requests) -> dict:
    lat: list[float] = []
    errors = {"n": 0, "first": ""}
    stop = time.perf_counter() + duration

    async def one_client():
        c = Conn("127.0.0.1", port)
        try:
            while time.perf_counter() < stop:
                body = json.dumps(reqs.body(kind)).encode()
                t0 = time.perf_counter()
                try:
                    status, data = await asyncio.wait_for(c.post("/recommend", body), 60)
                    ok = status == 200 and b'"items":[{' in data
                    if not ok:
                        errors["first"] = errors["first"] or f"{status} {data[:120]!r}"
                except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError) as e:
                    ok = False
                    errors["first"] = errors["first"] or f"{type(e).__name__}: {e}"
                    c.close()
                if ok:
                    lat.append(time.perf_counter() - t0)
                else:
                    errors["n"] += 1
        finally:
            c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    return {"lat": lat, "errors": errors["n"], "first_error": errors["first"], "wall": time.perf_counter() - t0}


def metric_sum(url: str, name: str) -> float:
    import httpx

    text = httpx.get(url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " "))


def in_process(run_dir: str, model: str | None, users: list[str], n: int, seed: int) -> dict[str, float]:
    """p50 (ms) of RecommendService.recommend, one request at a time, per request kind."""
    from recpipe.config import load_config
    from recpipe.pipeline.recommend import RecommendService

    svc = RecommendService(load_config(None, {"run.run_dir": run_dir}), model, log=lambda m: None)
    reqs = Requests(users, seed + 1)
    out = {}
    for kind in ("history", "distinct", "repeated"):
        if kind != "history" and not svc.model.uses_intent:
            continue
        for _ in range(3):  # warm-up: TEM and first-call costs
            b = reqs.body(kind)
            svc.recommend(b["user"], intent=b.get("intent"))
        times = []
        for _ in range(n):
            b = reqs.body(kind)
            t0 = time.perf_counter()
            svc.recommend(b["user"], intent=b.get("intent"))
            times.append(time.perf_counter() - t0)
        out[kind] = statistics.median(times) * 1000
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="a run directory with a trained model")
    ap.add_argument("--model", default=None, help="default: the run's train.model")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per cell (the issue's protocol: 60)")
    ap.add_argument("--clients", default="1,8,32,128")
    ap.add_argument("--kinds", default="history,distinct,repeated")
    ap.add_argument("--batch-window-ms", type=float, default=2.0)
    ap.add_argument("--in-process", type=int, default=200, help="requests for the in-process p50 (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if not 0 < a.duration <= 600:
        sys.exit("--duration must be in (0, 600] seconds")
    clients = [int(c) for c in a.clients.split(",")]
    kinds = a.kinds.split(",")

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "recpipe", "serve", "--run-dir", a.run_dir, "--port", str(port),
           "--batch-window-ms", str(a.batch_window_ms)] + (["--model", a.model] if a.model else [])
    env = {k: v for k, v in os.environ.items() if k != "RECPIPE_API_KEY"}
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_serve_{port}.log", "w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        import httpx

        for _ in range(1200):  # bounded: at most 10 minutes to load a run
            if server.poll() is not None:
                sys.exit(f"recpipe serve exited with {server.returncode}; see {log.name}")
            try:
                if httpx.get(url + "/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        else:
            sys.exit("recpipe serve did not become ready in 10 minutes")
        ready = httpx.get(url + "/readyz").json()
        users = httpx.get(url + "/users", params={"limit": 1000}).json()["users"]
        if not ready.get("takes_intent"):
            kinds = [k for k in kinds if k == "history"]
        print(f"recpipe serve: {ready['model']} on {ready['run_dir']}: {ready['items']:,} items, "
              f"index {ready['index']}, device {ready['device']}, TEM {ready['tem']}")
        print(f"machine: {cpu_model()}, {os.cpu_count()} cores visible, python {platform.python_version()}; "
              f"server and load generator share them")
        if a.in_process:
            base = in_process(a.run_dir, a.model, users, a.in_process, a.seed)
            print("in-process p50 (RecommendService, one request at a time): " +
                  ", ".join(f"{k} {v:.1f} ms" for k, v in base.items()))
        reqs = Requests(users, a.seed)
        print(f"{'kind':9} {'clients':>7} {'requests':>8} {'req/s':>8} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} "
              f"{'errors':>6} {'srv cpu':>7} {'gen cpu':>7} {'batch':>5}")
        total_errors = 0
        for kind in kinds:
            for n in clients:
                b0, c0 = metric_sum(url, "recpipe_batch_size_sum"), metric_sum(url, "recpipe_batch_size_count")
                cpu0 = proc_cpu_s(server.pid)
                me0 = time.process_time()
                res = asyncio.run(drive(port, kind, n, a.duration, reqs))
                cpu = (proc_cpu_s(server.pid) - cpu0) / res["wall"]
                me = (time.process_time() - me0) / res["wall"]
                nb = metric_sum(url, "recpipe_batch_size_count") - c0
                mean_batch = (metric_sum(url, "recpipe_batch_size_sum") - b0) / nb if nb else float("nan")
                lat = np.array(res["lat"]) * 1000
                p = np.percentile(lat, [50, 95, 99]) if len(lat) else [float("nan")] * 3
                total_errors += res["errors"]
                print(f"{kind:9} {n:7d} {len(lat):8d} {len(lat) / res['wall']:8.1f} {p[0]:7.1f} {p[1]:7.1f} "
                      f"{p[2]:7.1f} {res['errors']:6d} {cpu:7.2f} {me:7.2f} {mean_batch:5.1f}"
                      + (f"  first error: {res['first_error']}" if res["errors"] else ""), flush=True)
        print(f"errors in total: {total_errors}")
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


if __name__ == "__main__":
    main()
