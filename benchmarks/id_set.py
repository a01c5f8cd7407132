"""The duplicate-id set alone (pipeline.rows._IdSet, issue 13): N string ids checked and added in
batches of 245,760 (normalize's batch at the 4 GB budget), 2% of them repeats of earlier ids, held in
memory (the baseline: no spill folder, as before) and spilling past `budget.id_set_bytes` (as
normalize and the tokenizer now run it). Each in a fresh process; prints the peak RSS above the
process's RSS after its first batch, that growth per id, and CPU us per id; the repeats found must be
the same.

    python benchmarks/id_set.py --ids 1000000,4000000
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 245_760


def child(n: int, spill: str | None) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import pyarrow as pa

    from pipeline import budget
    from pipeline.rows import _IdSet

    def rss() -> float:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) / 1024 for x in f if x.startswith("VmRSS"))

    ids = _IdSet(budget.id_set_bytes(None), spill) if spill else _IdSet()
    rng = np.random.default_rng(0)
    dups, base, cpu = 0, None, 0.0
    for s in range(0, n, BATCH):
        k = min(BATCH, n - s)
        idx = np.arange(s, s + k)
        rep = rng.random(k) < 0.02
        idx[rep] = rng.integers(0, s + 1, int(rep.sum()))
        batch = pa.array([f"src/{i}" for i in idx.tolist()])
        c0 = time.process_time()
        dups += int(ids.add_new(batch).sum())
        cpu += time.process_time() - c0
        if base is None:
            base = rss()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ids.close()
    return {"dups": dups, "growth_mb": peak - base, "cpu_us": 1e6 * cpu / n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ids", default="1000000,4000000")
    ap.add_argument("--child", nargs=2, default=None)
    args = ap.parse_args()
    if args.child:
        n, spill = int(args.child[0]), args.child[1]
        print(json.dumps(child(n, None if spill == "-" else spill)))
        return
    print(f"{'ids':>12} {'set':<10} {'peak growth MB':>15} {'B/id':>6} {'CPU us/id':>10} {'repeats':>9}")
    with tempfile.TemporaryDirectory(dir=ROOT / ".cache") as d:
        for n in (int(x) for x in args.ids.split(",")):
            got = {}
            for mode, spill in (("in memory", "-"), ("spilling", d)):
                p = subprocess.run([sys.executable, __file__, "--child", str(n), spill], capture_output=True, text=True)
                if p.returncode:
                    raise SystemExit(p.stderr[-3000:])
                r = got[mode] = json.loads(p.stdout.strip().splitlines()[-1])
                print(f"{n:>12,} {mode:<10} {r['growth_mb']:>15.1f} {2**20 * r['growth_mb'] / n:>6.1f} "
                      f"{r['cpu_us']:>10.2f} {r['dups']:>9,}", flush=True)
            assert got["in memory"]["dups"] == got["spilling"]["dups"], got


if __name__ == "__main__":
    main()
