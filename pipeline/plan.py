"""`hrm plan SPEC`: a dry run that prints the mixture plan without downloading anything.

Hub sources are planned from their `estimate` block (rows, tokens per row, number of strata); a Hub
source without one is listed as unplanned. The estimate's strata become origins the way a run makes
them: one per subset value when `fields.subset` is set (one per data file when that field is the
source's `data_file_field`), else a single "<source>/<split>" origin whatever `strata` says, since a Hub
load merges the files of a split. Generator and local sources, and Hub sources whose `path` is a local
dataset folder, are cheap to read, so they are ingested (through the same code as a run), normalized
and stratified into a temporary folder and planned from their real strata, with tokens estimated from
characters (CHARS_PER_TOKEN) since no tokenizer exists before the run.
The plan itself is `pipeline.stages.mix.plan`: the same code that the mix stage runs.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import polars as pl

from .config import RunSpec
from .stages import ingest, normalize, stratify
from .stages.mix import StratumStats, plan as mix_plan

CHARS_PER_TOKEN = 4.0
SPECIAL_TOKENS_PER_ROW = 4  # BOQ, condition, EOQ, EOA


def _read_locally(s) -> bool:
    """Planned from real rows: generator and local sources, and Hub sources at a local dataset folder."""
    return s.kind != "hub" or Path(s.path).expanduser().exists()


def _estimate_origins(s) -> list[str]:
    """The origins a Hub run gives this source's estimated strata (see the module docstring)."""
    k = s.estimate.strata
    if s.fields.subset is None or k == 1:
        return [f"{s.name}/{s.split}"]
    ext = ".parquet" if s.fields.subset == s.data_file_field else ""
    return [f"{s.name}/part-{i:05d}{ext}" for i in range(k)]


def _estimated_strata(spec: RunSpec) -> dict[str, StratumStats]:
    rows = []
    for s in spec.sources:
        if s.kind != "hub" or s.estimate is None or _read_locally(s):
            continue
        e = s.estimate
        origins = _estimate_origins(s)
        k = len(origins)
        for i, origin in enumerate(origins):
            n = e.rows // k + (1 if i < e.rows % k else 0)
            rows.append({"origin": origin, "source": s.name, "domain": s.domain, "rows": n,
                         "mean_tokens": float(e.tokens_per_row)})
    if not rows:
        return {}
    df = stratify.assign(pl.DataFrame(rows), spec.stratify.rules)
    g = df.group_by("stratum").agg(rows=pl.col("rows").sum(), rule=pl.col("rule").first(),
                                   tok=(pl.col("rows") * pl.col("mean_tokens")).sum())
    return {r["stratum"]: StratumStats(int(r["rows"]), r["tok"] / max(r["rows"], 1), r["rule"])
            for r in g.to_dicts()}


def _local_strata(spec: RunSpec) -> dict[str, StratumStats]:
    srcs = [s for s in spec.sources if _read_locally(s)]
    if not srcs:
        return {}
    with tempfile.TemporaryDirectory(prefix="hrm-plan-") as d:
        d = Path(d)
        ingest.run(srcs, d / "ingest", seed=spec.seed, progress=False)
        normalize.run(d / "ingest", d / "norm", srcs, spec.normalize, progress=False)
        stratify.run(d / "norm", d / "strat", spec.stratify.rules, source_order=[s.name for s in srcs],
                     progress=False)
        df = pl.read_parquet(d / "strat" / "rows.parquet")
    df = df.with_columns(tok=(pl.col("instruction").str.len_chars() + pl.col("response").str.len_chars())
                         / CHARS_PER_TOKEN + SPECIAL_TOKENS_PER_ROW)
    g = df.group_by("stratum").agg(rows=pl.len(), rule=pl.col("rule").first(), mean=pl.col("tok").mean())
    return {r["stratum"]: StratumStats(int(r["rows"]), float(r["mean"]), r["rule"]) for r in g.to_dicts()}


def plan_spec(spec: RunSpec) -> dict:
    stats = {**_estimated_strata(spec), **_local_strata(spec)}
    unplanned = [s.name for s in spec.sources if s.kind == "hub" and s.estimate is None and not _read_locally(s)]
    merged = [s.name for s in spec.sources if s.kind == "hub" and s.estimate is not None and not _read_locally(s)
              and s.estimate.strata > 1 and s.fields.subset is None]
    p = mix_plan(stats, spec.mix, spec.stratify.rules, max_repeat=spec.mix.max_repeat)
    out = p.to_dict()
    out["spec"] = spec.name
    out["unplanned_sources"] = unplanned
    # estimate.strata > 1 without fields.subset: a Hub run makes one origin of the split, so one stratum
    out["merged_sources"] = merged
    out["token_estimate"] = {"hub": "from each source's estimate block",
                             "local_and_generator": f"characters / {CHARS_PER_TOKEN} + {SPECIAL_TOKENS_PER_ROW}"}
    return out


def _fmt(x: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def format_plan(p: dict, max_rows: int = 40) -> str:
    lines = [f"plan for spec {p['spec']!r}: {p['epochs']} epoch(s)"
             + (f", token budget {_fmt(p['token_budget'])}" if p.get("token_budget") else "")]
    by_rule: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    for s in p["strata"].values():
        r = by_rule[s["rule"]]
        r["strata"] += 1
        for k in ("rows", "unique_tokens", "seen_tokens", "unique_rows", "seen_rows"):
            r[k] += s[k]
        r["repeat"] = s["repeat"]
    head = f"{'rule':<24} {'strata':>7} {'rows':>10} {'unique rows':>12} {'unique tok':>11} {'seen tok':>10} {'repeat':>7}"
    lines += ["", head, "-" * len(head)]
    for rule, r in sorted(by_rule.items(), key=lambda kv: -kv[1]["seen_tokens"]):
        lines.append(f"{rule:<24} {int(r['strata']):>7} {_fmt(r['rows']):>10} {_fmt(r['unique_rows']):>12} "
                     f"{_fmt(r['unique_tokens']):>11} {_fmt(r['seen_tokens']):>10} {r['repeat']:>7.2f}")
    lines.append("-" * len(head))
    lines.append(f"{'total':<24} {len(p['strata']):>7} {'':>10} {'':>12} {_fmt(p['unique_tokens']):>11} "
                 f"{_fmt(p['seen_tokens']):>10}")
    strata = sorted(p["strata"].items(), key=lambda kv: -kv[1]["seen_tokens"])
    lines += ["", f"largest strata (of {len(strata)}):"]
    for name, s in strata[:max_rows]:
        lines.append(f"  {name:<40} rows={_fmt(s['rows']):>8} window={_fmt(s['window_rows']):>8} "
                     f"repeat={s['repeat']:.2f} unique={_fmt(s['unique_tokens'])} seen={_fmt(s['seen_tokens'])}")
    if p["unplanned_sources"]:
        lines += ["", "not planned (Hub sources without an `estimate`): " + ", ".join(p["unplanned_sources"])]
    if p.get("merged_sources"):
        lines += ["", "one stratum each (estimate.strata > 1 but no fields.subset, and a Hub load merges a "
                      "split's files): " + ", ".join(p["merged_sources"])]
    lines += ["", f"tokens estimated: hub {p['token_estimate']['hub']}; local/generator "
                  f"{p['token_estimate']['local_and_generator']}"]
    return "\n".join(lines)
