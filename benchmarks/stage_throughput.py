"""Per-stage throughput of the data stages on one worker, for the scaling plan (docs/scaling.md).

    python benchmarks/stage_throughput.py --rows 50000               # 1 worker (one process per stage)
    python benchmarks/stage_throughput.py --rows 50000 --dedup-workers 2

Corpus (written once into --work, not timed): JSONL rows {instruction, response, source} of about the
paper mixture's mean length (an instruction of 20-120 and a response of 100-600 words from a
20,000-word vocabulary with Zipf frequencies; ~470 words, ~2.6 KB a row), 8 sources, 3% of rows copies
of an earlier one with a few words changed. Each stage runs as `hrm stage NAME --spec` (a local source: that file) in a
fresh process on the previous stage's folder, timed wall clock from start to exit (interpreter start and imports
included, ~3 s). The baseline printed beside them, measured in the same run on the same file, is the
floor any stage pays: reading the JSONL into Arrow (pyarrow.json) and writing it back as Parquet.

Printed per stage: wall seconds, CPU seconds of the stage's processes (user + system, from
getrusage(RUSAGE_CHILDREN): on a shared machine the honest per-worker cost), and per CPU second: rows,
MB of the input JSONL, tokens (of the packed rows, from the pack manifest). The baseline is timed in
this process (CPU seconds; pyarrow may use several threads, so its wall time can be lower).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["ingest", "normalize", "stratify", "dedup", "tokenizer", "mix", "pack"]
SPEC = """name: throughput
seed: 0
sources:
  - name: corpus
    kind: local
    path: {path}
    fields: {{instruction: instruction, response: response, subset: source}}
    domain: synthetic
    license: CC0 (generated)
"""


def generate(path: Path, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = sorted({"".join(rng.choice(letters, int(k))) for k in rng.integers(2, 11, 30_000)})[:20_000]
    vocab = np.array(vocab, dtype=object)
    cdf = np.cumsum(1.0 / np.arange(1, len(vocab) + 1))
    cdf /= cdf[-1]

    def text(n: int) -> str:
        w = vocab[np.searchsorted(cdf, rng.random(n))]
        return " ".join(w)

    kept: list[dict] = []
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for i in range(rows):
            if kept and rng.random() < 0.03:  # a near copy of an earlier row
                src = kept[int(rng.integers(len(kept)))]
                words = src["response"].split(" ")
                for _ in range(int(rng.integers(1, 5))):
                    words[int(rng.integers(len(words)))] = str(vocab[int(rng.integers(len(vocab)))])
                row = {**src, "response": " ".join(words)}
            else:
                row = {"instruction": text(int(rng.integers(20, 121))) + "?",
                       "response": text(int(rng.integers(100, 601))) + ".", "source": f"src{i % 8}"}
                if len(kept) < 10_000:
                    kept.append(row)
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def baseline(path: Path, work: Path) -> float:
    import pyarrow.json as pj
    import pyarrow.parquet as pq

    ru = resource.getrusage(resource.RUSAGE_SELF)
    pq.write_table(pj.read_json(path), work / "baseline.parquet")
    ru2 = resource.getrusage(resource.RUSAGE_SELF)
    return (ru2.ru_utime - ru.ru_utime) + (ru2.ru_stime - ru.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dedup-workers", type=int, default=1, help="dedup signature processes (DedupConfig.workers)")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "stage-throughput")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    corpus = a.work / f"rows-{a.rows}-{a.seed}.jsonl"
    if not corpus.exists():
        t = time.perf_counter()
        generate(corpus, a.rows, a.seed)
        print(f"corpus: {corpus} written in {time.perf_counter() - t:.1f} s (not timed)", file=sys.stderr)
    mb = corpus.stat().st_size / 1e6
    run = a.work / f"run-{a.rows}-{a.seed}-w{a.dedup_workers}"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    hrm = [sys.executable, "-m", "pipeline.cli"] if not (Path(sys.executable).parent / "hrm").exists() \
        else [str(Path(sys.executable).parent / "hrm")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "POLARS_MAX_THREADS": "1"}
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}
    load0 = os.getloadavg()[0]
    spec = a.work / "throughput.yaml"
    spec.write_text(SPEC.format(path=corpus))
    prev = str(corpus)
    for stage in STAGES:
        cmd = [*hrm, "stage", stage, "--input", prev if stage != "pack" else str(run / "tokenizer"),
               "--output", str(run / stage), "--spec", str(spec), "--no-progress"]
        if stage == "dedup":
            cmd += ["--set", f"workers={a.dedup_workers}"]
        if stage == "pack":
            cmd += ["--mix", str(run / "mix")]
        t, ru = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        times[stage] = time.perf_counter() - t
        ru2 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu[stage] = (ru2.ru_utime - ru.ru_utime) + (ru2.ru_stime - ru.ru_stime)
        if r.returncode != 0:
            print(r.stdout[-2000:] + r.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"stage {stage} failed")
        if stage != "mix":
            prev = str(run / stage)
    base = baseline(corpus, a.work)
    pack = json.loads((run / "pack" / "manifest.json").read_text())["counts"]
    dedup = json.loads((run / "dedup" / "manifest.json").read_text()).get("counts", {})
    tokens = pack["non_pad_tokens"]
    print(f"{a.rows:,} rows, {mb:.0f} MB JSONL, {tokens:,} tokens packed ({tokens / a.rows:.0f} per row), "
          f"dedup workers {a.dedup_workers}, OMP/polars/tokenizers threads 1, {os.cpu_count()} CPUs on the machine")
    print(f"dedup counts: {json.dumps(dedup)[:300]}")
    print(f"load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (other jobs share the CPUs: "
          "wall times are inflated by them; CPU seconds are the stage's own processes)")
    print(f"{'stage':<24}{'wall s':>8}{'CPU s':>8}{'rows/CPU-s':>12}{'MB/CPU-s':>10}{'tokens/CPU-s':>14}")
    cpu["baseline (read+write)"] = base
    times["baseline (read+write)"] = base
    for name in times:
        c = cpu[name]
        print(f"{name:<24}{times[name]:>8.1f}{c:>8.1f}{a.rows / c:>12,.0f}{mb / c:>10.1f}{tokens / c:>14,.0f}")
    total = sum(v for k, v in cpu.items() if k in STAGES)
    print(f"{'all seven stages':<24}{sum(times[k] for k in STAGES):>8.1f}{total:>8.1f}{a.rows / total:>12,.0f}"
          f"{mb / total:>10.1f}{tokens / total:>14,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
