"""Scale benchmark (issue 13): the data stages on a generated corpus, per stage wall time, rows/s and
peak RSS, the streaming code beside the in-memory code of an earlier commit run on the same files.

    python benchmarks/scale.py --rows 1000000                      # streaming stages only
    python benchmarks/scale.py --rows 1000000 --old /tmp/h6-head   # and the old code, exported with
                                                                   # `git archive <commit> | tar -x -C DIR`
    python benchmarks/scale.py --rows 10000000 --stages dedup      # 10M / 100M: bigger machines
    python benchmarks/scale.py --rows 1000000 --memory-gb 1        # a lower memory budget
    python benchmarks/scale.py --stages dedup,library --repeat 3   # alternated 3 times, best of each
    python benchmarks/scale.py --rows 10000000 --flow              # the whole data flow, stage by stage
    python benchmarks/scale.py --growth 1000000,10000000           # per stage: peak RSS at both sizes, its
                                                                   # growth in B/row, CPU/row ratio (saved runs)

Corpus (not timed): JSONL rows {id, instruction, response, source, domain, condition} with an
instruction of 8-30 and a response of 30-120 words drawn from a 20,000-word vocabulary with Zipf
frequencies; 2% of the rows repeat an earlier row exactly, 3% repeat one with 1-4 words changed
(near duplicates); 8 sources. Written once per (rows, seed) into --work and reused.

Stages, each in a fresh process (`python benchmarks/scale.py --child ...`) started by a small waiter
process that reports `resource.getrusage(RUSAGE_CHILDREN).ru_maxrss` once the stage process (and its
worker processes) are done, so the peak RSS is that of the stage's largest process alone:
  load      the JSONL read into rows (pipeline.rows): RowReader blocks vs load_rows of the old code
  stratify  the rows (Parquet, as normalize writes them) -> stratify folder
  dedup     `hrm stage dedup` on the JSONL file (load, exact, near, write)
  library   the near-dedup kernel alone from texts in memory (dedup.near_duplicates, as
            benchmarks/dedup.py times it): the bar `hrm stage dedup` is held to (<= 1.2x its time)
The new code gets `resources.memory_gb` (--memory-gb, default the spec default) as its budget.

--flow: the whole data flow on the corpus, one stage after the other, each stage in a fresh process
(measured as above) reading the previous stages' folders: ingest (a spec with the JSONL as one local
source, `source` as the subset), normalize, stratify (a cap, an upsample and a catch-all rule), dedup,
tokenizer (BPE trained on a 200k-row sample), contamination (when --benchmarks names a folder of
benchmark test sets: the rows checked against them), mix, pack (1,024-token sequences), lineage. The
stage folders are kept in <work>/flow until the next --flow run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [f"src{i}" for i in range(8)]


# ------------------------------------------------------------------------------------------------
# corpus
# ------------------------------------------------------------------------------------------------
def generate(path: Path, rows: int, seed: int, chunk: int = 200_000) -> None:
    import polars as pl
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = sorted({"".join(rng.choice(letters, int(k))) for k in rng.integers(2, 11, 30_000)})[:20_000]
    words = pa.array(vocab)
    cdf = np.cumsum(1.0 / np.arange(1, len(vocab) + 1))
    cdf /= cdf[-1]

    def texts(lo: int, hi: int, n: int) -> tuple[pa.Array, np.ndarray]:
        lengths = rng.integers(lo, hi + 1, n)
        ids = np.searchsorted(cdf, rng.random(int(lengths.sum())))
        offs = np.concatenate([[0], np.cumsum(lengths)])
        lists = pa.ListArray.from_arrays(pa.array(offs, pa.int32()), words.take(pa.array(ids)))
        return pc.binary_join(lists, " "), ids

    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for c0 in range(0, rows, chunk):
            n = min(chunk, rows - c0)
            ins, _ = texts(8, 30, n)
            resp, _ = texts(30, 120, n)
            ins, resp = ins.to_numpy(zero_copy_only=False), resp.to_numpy(zero_copy_only=False)
            # duplicates of earlier rows of the same chunk: 2% exact, 3% with 1-4 words changed
            kind = rng.random(n)
            src = (rng.random(n) * np.arange(n)).astype(np.int64)
            for i in np.flatnonzero((kind < 0.05) & (np.arange(n) > 0)).tolist():
                ins[i] = ins[src[i]]
                if kind[i] < 0.02:
                    resp[i] = resp[src[i]]
                else:
                    w = resp[src[i]].split(" ")
                    for _ in range(int(rng.integers(1, 5))):
                        w[int(rng.integers(0, len(w)))] = vocab[int(rng.integers(0, len(vocab)))]
                    resp[i] = " ".join(w)
            sources = np.array(SOURCES)[rng.integers(0, len(SOURCES), n)]
            df = pl.DataFrame(
                {
                    "id": [f"r{c0 + i}" for i in range(n)],
                    "instruction": ins,
                    "response": resp,
                    "source": sources,
                    "domain": np.where(np.isin(sources, SOURCES[:2]), "math", "general"),
                    "condition": np.where(rng.random(n) < 0.3, "cot", "direct"),
                    "origin": np.char.add(np.char.add(sources.astype(str), "/part"), (rng.integers(0, 4, n)).astype(str)),
                }
            )
            df.write_ndjson(f)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------
# one stage in this process (the child)
# ------------------------------------------------------------------------------------------------
def _cpu(children: bool = True) -> float:
    """CPU seconds (user + system) of this process and its finished children (dedup's workers, once the
    forkserver is stopped: `_stop_forkserver`): the
    per-row cost that a busy machine changes least (wall time also counts waiting for a core)."""
    import resource

    who = (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) if children else (resource.RUSAGE_SELF,)
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, who))


def _stop_forkserver() -> None:
    """dedup's signature workers are forked by multiprocessing's forkserver, which reaps them: their CPU
    time reaches this process's RUSAGE_CHILDREN only once the forkserver itself is stopped and reaped."""
    import multiprocessing.forkserver as fs

    server = getattr(fs, "_forkserver", None)
    stop = getattr(server, "_stop", None)
    if stop is not None:
        stop()


def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(args.code)))
    work = Path(args.out)
    new = args.budget is not None
    kw = {"memory_gb": args.budget} if new else {}
    t0, cpu0, self0 = time.perf_counter(), _cpu(), _cpu(children=False)
    if args.stage == "load":
        from pipeline import rows

        if new:
            from pipeline import budget

            r = rows.RowReader(args.input, block_bytes=budget.block_bytes(args.budget))
            n = sum(t.num_rows for t in r)
        else:
            n = rows.load_rows(args.input).table.num_rows
    elif args.stage == "stratify":
        from pipeline.stages import stratify

        man = stratify.run(args.input, work, [], source_order=SOURCES, progress=False, **kw)
        n = man["counts"]["rows_in"]
    elif args.stage == "dedup":
        import pyarrow as pa

        from pipeline.config import DedupConfig
        from pipeline.stages import dedup

        pa.array([0])  # pyarrow imports pandas at its first array (0.2-0.4 s): done before t0, as below
        t0, cpu0, self0 = time.perf_counter(), _cpu(), _cpu(children=False)  # imports excluded, as for the library path
        man = dedup.run(args.input, work, DedupConfig(workers=args.workers), progress=False, **kw)
        n = man["counts"]["rows_in"] + man["counts"]["rejected"]
    elif args.stage == "library":
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.config import DedupConfig
        from pipeline.stages import dedup

        t = pq.read_table(args.input, columns=["instruction", "response"])
        texts = dedup._joined_texts(t, np.arange(t.num_rows))
        pa.array([0])
        t0, cpu0, self0 = time.perf_counter(), _cpu(), _cpu(children=False)  # from texts in memory, as benchmarks/dedup.py
        dedup.write_docs(texts, work / "docs.arrow")
        dedup.near_duplicates(work / "docs.arrow", work, DedupConfig(workers=args.workers))
        n = len(texts)
    elif args.stage.startswith("flow:"):
        n = flow_stage(args.stage[5:], Path(args.input), work, args.budget, args.benchmarks)
    else:
        raise SystemExit(f"unknown stage {args.stage}")
    seconds = time.perf_counter() - t0
    self_s = _cpu(children=False) - self0  # the stage's process alone (not its workers)
    _stop_forkserver()
    res = {"rows": n, "seconds": seconds, "cpu_s": _cpu() - cpu0, "cpu_self_s": self_s}
    if (work / "timing.json").exists():  # a stage's own split of its time
        res["timing"] = {k: round(v, 1) for k, v in json.loads((work / "timing.json").read_text()).items()}
    print(json.dumps(res))


FLOW = ("ingest", "normalize", "stratify", "dedup", "tokenizer", "contamination", "mix", "pack", "lineage")


def flow_spec(jsonl: Path, rows: int) -> str:
    """The spec of --flow: the corpus as one local source, its `source` column the subset (8 strata)."""
    return f"""name: scale
seed: 1234
sources:
  - name: corpus
    kind: local
    path: {jsonl}
    fields: {{instruction: instruction, response: response, id: id, condition: condition, domain: domain,
             subset: source}}
stratify:
  rules:
    - {{match: corpus/src0, cap_rows: {max(rows // 40, 1)}}}
    - {{match: corpus/src1, repeat: 2}}
    - {{match: "*", name: everything_else}}
tokenizer: {{vocab_size: 8192, sample_rows: 200000}}
pack: {{seq_len: 1024}}
"""


def flow_stage(stage: str, flow: Path, work: Path, budget: float, benchmarks: str | None) -> int:
    """One stage of --flow, reading the earlier stages' folders under FLOW, writing WORK; rows it read."""
    from pipeline.io import read_json
    from pipeline.spec import load_spec

    s = load_spec(str(flow / "spec.yaml"))
    kw = {"progress": False}
    if stage == "ingest":
        from pipeline.stages import ingest

        man = ingest.run(s.sources, work, seed=s.seed, memory_gb=budget, **kw)
    elif stage == "normalize":
        from pipeline.stages import normalize

        man = normalize.run(flow / "ingest", work, s.sources, s.normalize, memory_gb=budget, **kw)
    elif stage == "stratify":
        from pipeline.stages import stratify

        man = stratify.run(flow / "normalize", work, s.stratify.rules, source_order=[x.name for x in s.sources],
                           memory_gb=budget, **kw)
    elif stage == "dedup":
        from pipeline.stages import dedup

        man = dedup.run(flow / "stratify", work, s.dedup, memory_gb=budget, **kw)
    elif stage == "tokenizer":
        from pipeline.stages import tokenize

        man = tokenize.run(flow / "dedup", work, s.tokenizer, conditions=list(s.normalize.conditions), seed=s.seed,
                           memory_gb=budget, **kw)
    elif stage == "contamination":
        from pipeline.config import ContaminationConfig
        from pipeline.stages import contamination

        man = contamination.run(flow / "tokenizer", benchmarks, work, ContaminationConfig(), memory_gb=budget, **kw)
    elif stage == "mix":
        from pipeline.stages import mix

        man = mix.run(flow / "tokenizer", work, s.mix, rules=s.stratify.rules, seed=s.seed, memory_gb=budget, **kw)
    elif stage == "pack":
        from pipeline.stages import pack

        man = pack.run(flow / "tokenizer", flow / "mix", work, s.pack, memory_gb=budget, **kw)
    elif stage == "lineage":
        from pipeline import lineage

        dirs = {st: flow / st for st in ("normalize", "stratify", "dedup", "tokenizer", "mix", "pack")}
        man = lineage.run(dirs, work, title="scale", memory_gb=budget, **kw)
    else:
        raise SystemExit(f"unknown flow stage {stage}")
    # the rows the stage read (ingest: the rows it wrote; pack: the mix's rows; lineage: all rows)
    c = man.get("counts") or read_json(work / "manifest.json").get("counts", {})
    for k in ("rows_in", "train_rows", "total_rows", "rows_stratified"):
        if isinstance(c.get(k), int):
            return c[k]
    return next((v for v in c.values() if isinstance(v, int)), 0)


def measure(stage: str, code: Path, inp: Path, out: Path, budget: float | None, workers: int,
            benchmarks: str | None = None) -> dict:
    """Run one stage in a fresh process under a waiter that reports RUSAGE_CHILDREN maxrss."""
    cmd = [sys.executable, __file__, "--child", stage, "--code", str(code), "--input", str(inp), "--out", str(out),
           "--workers", str(workers)]
    if benchmarks:
        cmd += ["--benchmarks", benchmarks]
    if budget is not None:
        cmd += ["--budget", str(budget)]
    waiter = (
        "import resource, subprocess, sys, json\n"
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "if p.returncode: sys.stderr.write(p.stderr); sys.exit(p.returncode)\n"
        "r = json.loads(p.stdout.strip().splitlines()[-1])\n"
        "r['maxrss_mb'] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024\n"
        "print(json.dumps(r))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(code)}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", waiter, *cmd], capture_output=True, text=True, env=env, cwd=code)
    wall = time.perf_counter() - t0
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:100], "wall": wall}
    return {**json.loads(p.stdout.strip().splitlines()[-1]), "wall": wall}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="1M; 10M and 100M for bigger machines")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "scale-bench")
    ap.add_argument("--old", type=Path, default=None, help="a folder with the old code (git archive export)")
    ap.add_argument("--stages", default="load,stratify,dedup,library")
    ap.add_argument("--memory-gb", type=float, default=None, help="the new code's budget (default: the spec's)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="dedup signature processes")
    ap.add_argument("--repeat", type=int, default=1, help="run the stages this many times, alternating (on a "
                    "shared machine: each stage's best time is the one least slowed by others' work)")
    ap.add_argument("--growth", default=None, metavar="N1,N2", help="print, from the saved --flow results of two "
                    "corpus sizes (flow-results*.json under <work>/<rows>-<seed>), each stage's peak RSS at both, its "
                    "growth in bytes a row between them and its CPU a row at N2 over N1; runs nothing")
    ap.add_argument("--flow", action="store_true", help="the whole data flow, stage by stage (see above)")
    ap.add_argument("--flow-stages", default=None, help="--flow: only these stages (comma list), on the "
                    "folders a previous --flow run left for the stages before them")
    ap.add_argument("--benchmarks", default=None, help="--flow: a folder of benchmark test sets "
                    "(<name>/<split>.jsonl) for the contamination stage; without it that stage is skipped")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--code", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--input", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.__class__(**{**vars(args), "stage": args.child}))
        return
    if args.growth:
        growth(args.work, [int(x) for x in args.growth.split(",")], args.seed)
        return
    sys.path.insert(0, str(ROOT))
    from pipeline.config import ResourcesConfig

    budget = args.memory_gb if args.memory_gb is not None else ResourcesConfig().memory_gb
    work = args.work / f"{args.rows}-{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    jsonl = work / "rows.jsonl"
    if not jsonl.exists():
        print(f"generating {args.rows:,} rows ...", flush=True)
        g0 = time.perf_counter()
        generate(jsonl, args.rows, args.seed)
        print(f"  {time.perf_counter() - g0:.0f}s, {jsonl.stat().st_size / 2**20:,.0f} MB", flush=True)
    parquet = work / "rows.parquet"
    if not parquet.exists():
        import polars as pl

        pl.scan_ndjson(jsonl).sink_parquet(parquet, compression="zstd")
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; budget {budget:g} GB")
    if args.flow:
        run_flow(args, work, jsonl, budget)
        return
    codes = [("new", ROOT, budget)] + ([("old", args.old.resolve(), None)] if args.old else [])
    results = []
    for stage in [st for _ in range(max(1, args.repeat)) for st in args.stages.split(",")]:
        for name, code, b in codes:
            if stage == "library" and name == "old":
                continue  # the same kernel
            inp = jsonl if stage in ("load", "dedup") else parquet
            out = work / f"out-{name}-{stage}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            print(f"{stage} ({name}) ...", flush=True)
            r = measure(stage, code, inp, out, b, args.workers)
            results.append((stage, name, r))
            print(f"  {r}", flush=True)
            subprocess.run(["rm", "-rf", str(out)], check=True)
    print()
    print(f"{args.rows:,} rows; seconds = the stage's own time in its process (imports excluded); "
          "peak RSS = getrusage(RUSAGE_CHILDREN) maxrss of the stage's process tree's largest process")
    print("CPU s = user + system of the stage's process and its workers; own CPU s = of the stage's process")
    hdr = f"{'stage':<10}{'code':<6}{'seconds':>9}{'rows/s':>11}{'CPU s':>8}{'own CPU s':>11}{'peak RSS MB':>13}"
    print(hdr)
    print("-" * len(hdr))
    for stage, name, r in results:
        if "error" in r:
            print(f"{stage:<10}{name:<6}  failed: {r['error']}")
            continue
        print(f"{stage:<10}{name:<6}{r['seconds']:>9.1f}{r['rows'] / r['seconds']:>11,.0f}{r.get('cpu_s', 0):>8.1f}"
              f"{r.get('cpu_self_s', 0):>11.1f}{r['maxrss_mb']:>13,.0f}")
    for stage, name, r in results:
        if r.get("timing"):
            print(f"{stage} ({name}) steps, seconds: {r['timing']}")
    sec: dict = {}  # (stage, code) -> its best time over the repeats
    for s, n, r in results:
        if r.get("seconds"):
            sec[(s, n)] = min(sec.get((s, n), r["seconds"]), r["seconds"])
    if args.repeat > 1:
        print(f"best of {args.repeat}, seconds: " + ", ".join(f"{s} ({n}) {v:.1f}" for (s, n), v in sec.items()))
    if sec.get(("dedup", "new")) and sec.get(("library", "new")):
        ratio = sec[("dedup", "new")] / sec[("library", "new")]
        print(f"hrm stage dedup / library path time: {ratio:.2f}x, best of each (target <= 1.2x)")
        # each dedup run over the library run next to it in time: the machine's drift cancels in a pair
        d = [r["seconds"] for s, n, r in results if s == "dedup" and n == "new" and r.get("seconds")]
        lib = [r["seconds"] for s, n, r in results if s == "library" and n == "new" and r.get("seconds")]
        pairs = sorted(a / b for a, b in zip(d, lib))
        if len(pairs) > 1:
            print(f"  per pair of runs: median {float(np.median(pairs)):.2f}x, range {pairs[0]:.2f}-{pairs[-1]:.2f}x "
                  f"({len(pairs)} pairs)")
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def run_flow(args: argparse.Namespace, work: Path, jsonl: Path, budget: float) -> None:
    flow = work / "flow"
    todo = args.flow_stages.split(",") if args.flow_stages else list(FLOW)
    bad = [x for x in todo if x not in FLOW]
    if bad:
        raise SystemExit(f"--flow-stages: unknown stage(s) {bad}; stages are {','.join(FLOW)}")
    if todo == list(FLOW) or not (flow / "spec.yaml").exists():
        subprocess.run(["rm", "-rf", str(flow)], check=True)
        flow.mkdir(parents=True)
        (flow / "spec.yaml").write_text(flow_spec(jsonl.resolve(), args.rows))
    bench = str(Path(args.benchmarks).resolve()) if args.benchmarks else None
    results = []
    for stage in todo:
        if stage == "contamination" and not bench:
            print("contamination: skipped (no --benchmarks)", flush=True)
            continue
        print(f"{stage} ...", flush=True)
        subprocess.run(["rm", "-rf", str(flow / stage)], check=True)
        r = measure(f"flow:{stage}", ROOT, flow, flow / stage, budget, args.workers, bench)
        results.append((stage, r))
        print(f"  {r}", flush=True)
        if "error" in r:
            break
    print()
    print(f"{args.rows:,} rows, the whole data flow; seconds = the stage's own time in its process (imports "
          f"excluded); rows = rows the stage read; peak RSS = the stage process tree's largest process; budget "
          f"{budget:g} GB")
    hdr = f"{'stage':<14}{'rows':>12}{'seconds':>9}{'rows/s':>11}{'us/row':>8}{'CPU us/row':>11}{'peak RSS MB':>13}"
    print(hdr)
    print("-" * len(hdr))
    tot = cpu = 0.0
    for stage, r in results:
        if "error" in r:
            print(f"{stage:<14}  failed: {r['error']}")
            continue
        tot += r["seconds"]
        cpu += r.get("cpu_s", 0.0)
        rate = r["rows"] / r["seconds"] if r["seconds"] else 0
        print(f"{stage:<14}{r['rows']:>12,}{r['seconds']:>9.1f}{rate:>11,.0f}{1e6 / max(rate, 1e-9):>8.1f}"
              f"{1e6 * r.get('cpu_s', 0.0) / max(r['rows'], 1):>11.1f}{r['maxrss_mb']:>13,.0f}")
    peak = max((r.get("maxrss_mb", 0) for _, r in results), default=0)
    print(f"{'total':<14}{'':>12}{tot:>9.1f}{'':>11}{1e6 * tot / args.rows:>8.1f}{1e6 * cpu / args.rows:>11.1f}"
          f"{peak:>13,.0f}")
    (work / f"flow-results{'-' + args.flow_stages if args.flow_stages else ''}.json").write_text(json.dumps({"rows": args.rows, "budget_gb": budget,
                                                        "stages": dict(results)}, indent=1))
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


def _saved_flow(work: Path, rows: int, seed: int) -> dict:
    """stage -> the latest saved --flow result of a corpus size (every flow-results*.json, oldest first)."""
    folder = work / f"{rows}-{seed}"
    files = sorted(folder.glob("flow-results*.json"), key=lambda f: f.stat().st_mtime)
    if not files:
        raise SystemExit(f"--growth: no saved --flow results in {folder} (run --flow --rows {rows} first)")
    out: dict = {}
    for f in files:
        out.update(json.loads(f.read_text())["stages"])
    return out


def growth(work: Path, sizes: list[int], seed: int) -> None:
    """Peak RSS and CPU a row of each stage at two corpus sizes, from saved --flow results: what a stage
    holds per row shows as bytes a row of growth (0 when its memory is flat in the row count)."""
    if len(sizes) != 2:
        raise SystemExit("--growth takes two sizes, e.g. --growth 1000000,10000000")
    (n1, n2) = sizes
    a, b = _saved_flow(work, n1, seed), _saved_flow(work, n2, seed)
    def short(n: int) -> str:
        return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"

    k1, k2 = short(n1), short(n2)
    hdr = (f"{'stage':<14}{f'peak MB {k1}':>14}{f'peak MB {k2}':>14}{'growth B/row':>14}"
           f"{f'CPU us/row {k1}':>17}{f'CPU us/row {k2}':>17}{f'{k2}/{k1}':>9}")
    print(hdr)
    print("-" * len(hdr))
    for stage in FLOW:
        if stage not in a or stage not in b or "error" in a[stage] or "error" in b[stage]:
            continue
        ra, rb = a[stage], b[stage]
        grow = (rb["maxrss_mb"] - ra["maxrss_mb"]) * 2**20 / max(1, rb["rows"] - ra["rows"])
        ca = 1e6 * ra.get("cpu_s", 0.0) / max(ra["rows"], 1)
        cb = 1e6 * rb.get("cpu_s", 0.0) / max(rb["rows"], 1)
        print(f"{stage:<14}{ra['maxrss_mb']:>14,.0f}{rb['maxrss_mb']:>14,.0f}{grow:>14.1f}{ca:>17.1f}{cb:>17.1f}"
              f"{cb / ca if ca else float('nan'):>8.2f}x")


if __name__ == "__main__":
    main()
