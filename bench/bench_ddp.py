"""Training throughput with 1 and N data-parallel processes (DDP under torchrun), same global batch.

    python bench/bench_ddp.py --dataset ml-100k --data-dir ../shared/datasets --rows 1x1,1x2,2x1 --steps 300

A row `PxT` runs `recpipe train` with P processes (`--nproc P`; P = 1 is a plain process) of T torch threads
each, for --steps optimiser steps of the same global batch, with validation only at the end (its time is not
counted: the manifest's train_time_s is training time). Printed: steps/s and training sequences (or positions)
per second, the speed-up over the first row, and the CPU. On a GPU node the same command with
`--device cuda --rows 1x1,8x1` runs one process per GPU (NCCL); `--print-gpu-command` shows the torchrun line.
Every row trains in its own run directory from one data stage, with the same seed, so the rows differ only in
how the work is split.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_rows(text: str) -> list[tuple[int, int]]:
    rows = []
    for part in text.split(","):
        p, _, t = part.strip().partition("x")
        try:
            rows.append((int(p), int(t or 1)))
        except ValueError:
            raise SystemExit(f"error: --rows takes PROCESSESxTHREADS items such as 1x2,2x1, not {part!r}") from None
        if rows[-1][0] < 1 or rows[-1][1] < 1:
            raise SystemExit(f"error: --rows: processes and threads must be >= 1, not {part!r}")
    return rows


def as_args(s: dict) -> list[str]:
    return [x for k, v in s.items() for x in ("--set", f"{k}={v}")]


def run_row(a, procs: int, threads: int) -> dict:
    cache = Path(a.out) / f"p{procs}t{threads}"
    run = {"run.dataset": a.dataset, "run.cache_dir": str(cache), "run.seed": a.seed}
    if a.data_dir:
        run["run.data_dir"] = a.data_dir
    train = {"train.model": a.model, "train.max_steps": a.steps, "train.eval_every": a.steps, "train.epochs": 10_000,
             "train.batch_size": a.batch_size, "train.threads": threads, "train.device": a.device,
             "train.eval_users": 200, "train.save_every_s": 3600}
    recpipe = [sys.executable, "-m", "recpipe"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run([*recpipe, "data", *as_args(run)], check=True, env=env, stdout=subprocess.DEVNULL)
    cmd = [*recpipe, "train", *as_args(run | train), *[x for kv in a.set for x in ("--set", kv)], "--force"]
    cmd += ["--nproc", str(procs)] if procs > 1 else []
    print("$ recpipe " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, env=env, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise SystemExit(f"error: row {procs}x{threads} failed:\n{p.stderr[-2000:]}")
    man = json.loads((cache / a.dataset / "train" / a.model / "manifest.json").read_text())["info"]
    t = man["train_time_s"]
    return {"processes": procs, "threads": threads, "steps": man["steps"], "train_time_s": t,
            "steps_per_s": man["steps"] / t, "samples_per_s": man["steps"] * a.batch_size / t}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", "-d", default="ml-100k")
    ap.add_argument("--data-dir", default=None, help="where the dataset name resolves (run.data_dir)")
    ap.add_argument("--model", default="sasrec")
    ap.add_argument("--rows", default="1x1,1x2,2x1", help="PROCESSESxTHREADS, comma-separated")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=128, help="the global batch, whatever the processes")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda for one GPU a process (NCCL)")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any recpipe setting")
    ap.add_argument("--out", default="cache/bench_ddp")
    ap.add_argument("--print-gpu-command", action="store_true", help="print the GPU-node command and stop")
    a = ap.parse_args(argv)
    if a.print_gpu_command:
        print(f"python bench/bench_ddp.py --dataset {a.dataset} --device cuda --rows 1x1,8x1 --steps {a.steps} "
              f"--batch-size {a.batch_size * 8}")
        return
    rows = parse_rows(a.rows)
    from recpipe.cpu import describe

    results = [run_row(a, p, t) for p, t in rows]
    base = results[0]["samples_per_s"]
    cpu = describe(os.cpu_count())["text"].rsplit(",", 1)[0]  # the threads are the rows'
    lines = [f"CPU: {cpu}; {a.model} on {a.dataset}, "
             f"global batch {a.batch_size}, {a.steps} steps, seed {a.seed}", "",
             "| processes x threads | steps/s | samples/s | vs first row |", "|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['processes']} x {r['threads']} | {r['steps_per_s']:.2f} | {r['samples_per_s']:.0f} | "
                     f"{r['samples_per_s'] / base:.2f}x |")
    print("\n".join(lines))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
