"""Dedup and pack through the cluster engine (issue 14's closing figures): each stage's parts on a Dask
LocalCluster (flows/dask_runner.py: every part a Prefect task run on a worker) with 1 and 2 workers,
beside the same parts without the engine at the same worker count: in this process (1) and on a plain
`concurrent.futures` process pool (2; for dedup, the stage's own pool, DedupConfig(workers=2)).

    python benchmarks/dask_scaling.py --docs 262144 --rows 1000000

dedup: the near step (MinHash signature parts, then buckets, verify, clusters) on --docs synthetic
documents (benchmarks/dedup.py's generator, 5% planted near-duplicates), 32,768 docs per signature part.
pack: the pack stage on --rows generated tokenized rows (benchmarks/pack_mix_memory.py's generator, 8
sources, prompts 8-24 and responses 10-40 tokens) mixed over 2 epochs, seq_len 512, shard_tokens 2^22:
the plan is made in the driver, each shard (tokens gathered, Arrow file, record) is a part.

Figures: per path the parts' seconds (signatures; pack: the time spent writing shards, inside the
mapper for the parts paths) and the stage's seconds, the 1->2-worker scaling ratio through the engine
(ratio of seconds) and the engine's overhead at each worker count (engine seconds / seconds without the
engine; at 1 worker also against the in-process path with Arrow's CPU pool at one thread, as a Dask
worker has it: the nanny sets OMP_NUM_THREADS=1); the same parts as plain Dask futures on the same cluster (no Prefect task runs) split that
overhead into Dask's and Prefect's. Every path's outputs are checked equal (clusters; shard sha256). Cluster start-up, the
workers' first import and their first Prefect task are not timed; the Prefect API is a prefect_test_harness server. The load average
is printed beside the figures: this machine has 2 cores, shared."""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dedup import generate as generate_docs  # noqa: E402  (benchmarks/dedup.py)
from pack_mix_memory import generate as generate_rows  # noqa: E402  (benchmarks/pack_mix_memory.py)
from pipeline.config import DedupConfig, MixConfig, PackConfig  # noqa: E402
from pipeline.stages import pack as P  # noqa: E402
from pipeline.stages.dedup import near_duplicates  # noqa: E402


def _warm() -> None:
    import pipeline.stages.dedup  # noqa: F401
    import pipeline.stages.pack  # noqa: F401


def _nap(s: float) -> int:
    time.sleep(s)
    return os.getpid()


class Timed:
    """A `map_parts` that adds the seconds spent in it to `self.s`."""

    def __init__(self, inner):
        self.inner, self.s = inner, 0.0

    def __call__(self, fn, args):
        t = time.perf_counter()
        try:
            return self.inner(fn, args)
        finally:
            self.s += time.perf_counter() - t


def raw_dask_parts(client):
    """The parts as plain Dask futures on the same cluster (no Prefect task run): the engine's cost split
    into Dask's and Prefect's."""
    return lambda fn, args: client.gather([client.submit(fn, *a, pure=False) for a in args])


def pool_parts(pool: cf.ProcessPoolExecutor):
    """The parts on a plain process pool, results in the order of the arguments."""
    return lambda fn, args: list(pool.map(fn, *zip(*args))) if args else []


def run_dedup(docs: Path, tmp: Path, name: str, cfg: DedupConfig, map_parts=None) -> tuple[float, float, np.ndarray]:
    work = tmp / name
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    res = near_duplicates(docs, work, cfg, map_parts=map_parts)
    total = time.perf_counter() - t0
    shutil.rmtree(work, ignore_errors=True)
    return res.timing["signatures"], total, res.root


pk_shards = [0]  # shards of the last pack run
ONE_THREAD = "  in process, 1 Arrow thread"


def run_pack(data: Path, tmp: Path, name: str, cfg: PackConfig, map_parts=None) -> tuple[float, float, str]:
    """(seconds writing shards, stage seconds, sha256 over the shards and removals)."""
    out = tmp / name
    shutil.rmtree(out, ignore_errors=True)
    timed = Timed(map_parts) if map_parts is not None else None
    write_s = 0.0
    inner = P.write_shard
    if map_parts is None:  # the single-process path writes each shard as its plan fills: time those calls

        def write_shard(*a):
            nonlocal write_s
            t = time.perf_counter()
            try:
                return inner(*a)
            finally:
                write_s += time.perf_counter() - t

        P.write_shard = write_shard
    try:
        t0 = time.perf_counter()
        man = P.run(data / "tok", data / "mix", out, cfg, progress=False, map_parts=timed)
        total = time.perf_counter() - t0
    finally:
        P.write_shard = inner
    pk_shards[:] = [len(man["shards"])]
    h = hashlib.sha256()
    for f in [*man["shards"], "removals.parquet"]:
        h.update(man["outputs"][f]["sha256"].encode())
    shutil.rmtree(out, ignore_errors=True)
    return (timed.s if timed is not None else write_s), total, h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=262_144)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")  # parts outside a flow run
    from prefect.testing.utilities import prefect_test_harness

    from flows.dask_runner import map_parts, parts_runner
    from pipeline.stages import mix as M

    tmp = Path(tempfile.mkdtemp(prefix="dask-scaling-", dir=Path(__file__).resolve().parents[1] / ".cache"))
    try:
        docs = tmp / "docs.arrow"
        generate_docs(docs, args.docs, args.seed, 0.05, 20_000)
        data = tmp / "packdata"
        generate_rows(data / "tok", args.rows, args.seed)
        M.run(data / "tok", data / "mix", MixConfig(epochs=2), rules=[], seed=1, progress=False)
        pcfg = PackConfig(seq_len=512, min_response_tokens=1)
        dcfg1 = DedupConfig(workers=1)
        ded: dict[str, tuple] = {}
        pk: dict[str, tuple] = {}
        load = [os.getloadavg()]
        ded["in process (1)"] = run_dedup(docs, tmp, "d-1", dcfg1)
        pk["in process (1)"] = run_pack(data, tmp, "p-1", pcfg)
        # what a Dask worker gets: its nanny sets OMP_NUM_THREADS=1 (threads_per_worker=1), which sizes
        # Arrow's CPU pool to one thread; the driver's pool has every core
        import pyarrow as pa

        n_arrow = pa.cpu_count()
        pa.set_cpu_count(1)
        try:
            ded[ONE_THREAD] = run_dedup(docs, tmp, "d-1t", dcfg1)
            pk[ONE_THREAD] = run_pack(data, tmp, "p-1t", pcfg)
        finally:
            pa.set_cpu_count(n_arrow)
        ded["process pool (2)"] = run_dedup(docs, tmp, "d-2", DedupConfig(workers=2))
        with cf.ProcessPoolExecutor(2) as pool:
            list(pool.map(_warm_one, range(2)))
            pk["process pool (2)"] = run_pack(data, tmp, "p-2", pcfg, pool_parts(pool))
        with prefect_test_harness(server_startup_timeout=120):
            for n in (1, 2):
                with parts_runner("dask", workers=n):
                    map_parts().runner.client.run(_warm)  # each worker imports the stages once, untimed
                    # and runs a first Prefect task (its task engine and API client start), untimed
                    pids = map_parts()(_nap, [(0.5,)] * (2 * n))
                    assert len(set(pids)) == n, pids
                    key = f"dask LocalCluster ({n})"
                    ded[key] = run_dedup(docs, tmp, f"dd-{n}", dcfg1, map_parts())
                    pk[key] = run_pack(data, tmp, f"pd-{n}", pcfg, map_parts())
                    raw = raw_dask_parts(map_parts().runner.client)
                    ded[f"  plain dask futures ({n})"] = run_dedup(docs, tmp, f"dr-{n}", dcfg1, raw)
                    pk[f"  plain dask futures ({n})"] = run_pack(data, tmp, f"pr-{n}", pcfg, raw)
        load.append(os.getloadavg())
        ref_root, ref_pack = ded["in process (1)"][2], pk["in process (1)"][2]
        print(f"\nthis machine: {os.cpu_count()} cores (shared); load average (1, 5, 15 min) "
              f"before {tuple(round(x, 2) for x in load[0])}, after {tuple(round(x, 2) for x in load[1])}")
        print(f"\ndedup near step, {args.docs:,} docs ({-(-args.docs // 32768)} signature parts)")
        print(f"{'path (workers)':26s} {'signatures s':>12s} {'near step s':>12s} {'docs/s (sig)':>13s} same")
        for k, (sig, tot, root) in ded.items():
            print(f"{k:26s} {sig:12.2f} {tot:12.2f} {args.docs / sig:13,.0f} {bool(np.array_equal(root, ref_root))}")
        samples = int(P.pq.ParquetFile(data / "mix" / "mix.parquet").metadata.num_rows)
        print(f"\npack, {args.rows:,} rows, {samples:,} samples, seq_len 512, shard_tokens 2^22 ({pk_shards[0]} shards)")
        print(f"{'path (workers)':26s} {'shards s':>12s} {'stage s':>12s} {'samples/s':>13s} same")
        for k, (w, tot, h) in pk.items():
            print(f"{k:26s} {w:12.2f} {tot:12.2f} {samples / tot:13,.0f} {h == ref_pack}")
        for what, rows, i in (("dedup signatures", ded, 0), ("dedup near step", ded, 1), ("pack shards", pk, 0),
                              ("pack stage", pk, 1)):
            d1, d2 = rows["dask LocalCluster (1)"][i], rows["dask LocalCluster (2)"][i]
            r1, r2 = rows["  plain dask futures (1)"][i], rows["  plain dask futures (2)"][i]
            print(f"{what:17s}: dask 1->2 workers {d1 / d2:.2f}x faster; engine overhead at 1 worker "
                  f"{d1 / rows['in process (1)'][i]:.2f}x (vs in process; "
                  f"{d1 / rows[ONE_THREAD][i]:.2f}x vs in process with 1 Arrow thread), at 2 workers "
                  f"{d2 / rows['process pool (2)'][i]:.2f}x (vs process pool); plain Dask futures "
                  f"{r1 / rows['in process (1)'][i]:.2f}x and {r2 / rows['process pool (2)'][i]:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _warm_one(_: int) -> int:
    _warm()
    return os.getpid()


if __name__ == "__main__":
    main()
