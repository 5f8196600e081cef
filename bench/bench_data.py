"""Data stage wall time and peak memory on ml-1m (target: < 10 s and < 1 GB on 2 cores).

    python bench/bench_data.py [--data-dir ../shared/datasets] [--dataset ml-1m]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    ap.add_argument("--dataset", default="ml-1m")
    a = ap.parse_args()
    if not (Path(a.data_dir) / a.dataset).is_dir():
        print(f"skip: {a.data_dir}/{a.dataset} not found")
        return
    from recpipe.config import load_config
    from recpipe.pipeline import data

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, {"run.dataset": a.dataset, "run.data_dir": a.data_dir, "run.cache_dir": tmp})
        t0 = time.perf_counter()
        res = data.run(cfg, force=True, log=lambda m: None)
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        data.run(cfg, log=lambda m: None)
        skip = time.perf_counter() - t1
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    s = res.manifest.info["summary"]
    print(f"data stage on {a.dataset}: {s['users']} users, {s['items']} items, {s['interactions']} interactions")
    print(f"wall time (load+filter+split+write): {wall:.2f} s   (target < 10 s)")
    print(f"skip-if-unchanged re-run:            {skip:.2f} s")
    print(f"peak RSS of the process:             {peak_mb:.0f} MB (target < 1024 MB)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
