"""Dedup's near step (MinHash signatures as parts, then buckets, verify, clusters) through the Dask
runner (flows/dask_runner.py: each signature part a Prefect task on a LocalCluster worker) with 1 and 2
workers, beside the single-process path (workers=1) and the stage's own process pool (workers=2), on
the same synthetic documents (benchmarks/dedup.py's generator, 5% planted near-duplicates).

    python benchmarks/dask_parts.py --docs 200000

Figures: seconds of the signature step and of the whole near step per path, the 2-vs-1-worker scaling
ratio of the Dask path, and the Dask path's overhead against the non-Dask path at the same worker count
(ratio of signature seconds). Every path's clusters are checked equal. Cluster start-up and the workers'
first import of the stage are not timed; the Prefect API is a prefect_test_harness server."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dedup import generate  # noqa: E402  (benchmarks/dedup.py)
from pipeline.config import DedupConfig  # noqa: E402
from pipeline.stages.dedup import near_duplicates  # noqa: E402


def timed(docs: Path, tmp: Path, name: str, cfg: DedupConfig, map_parts=None) -> tuple[float, float, np.ndarray]:
    work = tmp / name
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    res = near_duplicates(docs, work, cfg, map_parts=map_parts)
    total = time.perf_counter() - t0
    return res.timing["signatures"], total, res.root


def _warm() -> None:
    import pipeline.stages.dedup  # noqa: F401


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=200_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from prefect.testing.utilities import prefect_test_harness

    from flows.dask_runner import map_parts, parts_runner

    tmp = Path(tempfile.mkdtemp(prefix="dask-parts-"))
    try:
        docs = tmp / "docs.arrow"
        generate(docs, args.docs, args.seed, 0.05, 20_000)
        rows = {}
        rows["single process (workers=1)"] = timed(docs, tmp, "w1", DedupConfig(workers=1))
        rows["process pool (workers=2)"] = timed(docs, tmp, "w2", DedupConfig(workers=2))
        with prefect_test_harness(server_startup_timeout=120):
            for n in (1, 2):
                with parts_runner("dask", workers=n):
                    map_parts().runner.client.run(_warm)  # each worker imports the stage once, untimed
                    rows[f"dask LocalCluster ({n} worker{'s' if n > 1 else ''})"] = timed(
                        docs, tmp, f"d{n}", DedupConfig(workers=1), map_parts())
        ref = rows["single process (workers=1)"][2]
        print(f"\nnear dedup of {args.docs:,} docs ({-(-args.docs // 32768)} signature parts), this machine")
        print(f"{'path':36s} {'signatures s':>12s} {'near step s':>12s} {'docs/s (sig)':>13s} same clusters")
        for k, (sig, tot, root) in rows.items():
            print(f"{k:36s} {sig:12.2f} {tot:12.2f} {args.docs / sig:13,.0f} {bool(np.array_equal(root, ref))}")
        d1, d2 = rows["dask LocalCluster (1 worker)"][0], rows["dask LocalCluster (2 workers)"][0]
        print(f"dask scaling 1->2 workers (signature s ratio): {d1 / d2:.2f}x")
        print(f"dask overhead at 1 worker vs single process: {d1 / rows['single process (workers=1)'][0]:.2f}x; "
              f"at 2 workers vs the process pool: {d2 / rows['process pool (workers=2)'][0]:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
