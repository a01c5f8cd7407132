"""Stage 3, stratify: give every row a stratum, a rule and a domain by ordered first-match rules.

As the paper's `prefix_config`: a rule matches when its `match` is a prefix of the row's origin
("<source>/<file or subset>"), or is '*'. The first matching rule wins. Its `stratum` setting decides the
granularity (each origin, each source, or the whole rule is one stratum), its `domain` overrides the
row's domain, and its cap / repeat / ratio are applied later by `mix`. Rows matching no rule keep their
origin as stratum under the rule "default" (no cap, repeat 1): nothing is dropped here.

The row's `priority` is its source's position in the spec (0 = highest); dedup keeps the copy with the
highest priority. Outputs: rows.parquet (`STRATIFIED_SCHEMA`), strata.json (per-stratum statistics)
and manifest.json.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow as pa

from ..config import StratumRule
from tqdm import tqdm

from .. import budget
from ..io import ROW_GROUP, RowGroupWriter, open_stage, code_closure, file_record, finish_stage, fingerprint
from ..io import write_json, write_parquet
from ..rows import ROWS_FILE, RowReader, resolve_rows_path
from ..schema import NORMALIZED_FIELDS, REMOVAL_SCHEMA, STRATIFIED_SCHEMA

STAGE = "stratify"
DEFAULT_RULE = "default"
STRATA_FILE = "strata.json"
REJECTS_FILE = "rejects.parquet"


def assign(df: pl.DataFrame, rules: list[StratumRule]) -> pl.DataFrame:
    """Add stratum/rule columns (and override domain) by first-match rules. `df` needs origin, source, domain."""
    for r in rules:
        if r.label == DEFAULT_RULE:
            raise ValueError(f"stratify.rules: the rule name {DEFAULT_RULE!r} is reserved for rows no rule matches")
    rule_col = pl.lit(None, dtype=pl.String)
    stratum_col = pl.lit(None, dtype=pl.String)
    domain_col = pl.lit(None, dtype=pl.String)
    # build a when/then chain in reverse so the first rule has the last word (first match wins)
    for r in reversed(rules):
        cond = pl.lit(True) if r.match == "*" else pl.col("origin").str.starts_with(r.match)
        stratum = {"origin": pl.col("origin"), "source": pl.col("source"), "rule": pl.lit(r.label)}[r.stratum]
        rule_col = pl.when(cond).then(pl.lit(r.label)).otherwise(rule_col)
        stratum_col = pl.when(cond).then(stratum).otherwise(stratum_col)
        domain_col = pl.when(cond).then(pl.lit(r.domain) if r.domain else pl.col("domain")).otherwise(domain_col)
    return df.with_columns(
        rule=rule_col.fill_null(DEFAULT_RULE),
        stratum=stratum_col.fill_null(pl.col("origin")),
        domain=domain_col.fill_null(pl.col("domain")),
    )


def strata_stats(df: pl.DataFrame) -> dict:
    g = (
        df.group_by("stratum")
        .agg(
            rows=pl.len(),
            rule=pl.col("rule").first(),
            domains=pl.col("domain").unique().sort(),
            sources=pl.col("source").unique().sort(),
            instruction_chars=pl.col("instruction").str.len_chars().sum(),
            response_chars=pl.col("response").str.len_chars().sum(),
        )
        .sort("stratum")
    )
    return {r["stratum"]: {k: v for k, v in r.items() if k != "stratum"} for r in g.to_dicts()}


def run(input_path: str | os.PathLike, output_dir: str | os.PathLike, rules: list[StratumRule], *,
        source_order: list[str] | None = None, progress: bool = True, versioned: bool = False, force: bool = False,
        memory_gb: float | None = None) -> dict:
    """`input_path`: the normalize folder, or a JSONL/Parquet file in the normalized schema (an
    `origin` column is optional: it defaults to the source). `source_order`: source names by priority
    (the spec's order); sources not listed come after, in order of first appearance.

    Streams: the rows are read, assigned and written a batch at a time (`memory_gb` sizes the batches;
    never part of the fingerprint), the strata statistics summed over the batches."""
    out = Path(output_dir)
    src_file = resolve_rows_path(input_path)
    params = {"rules": [r.model_dump() for r in rules], "source_order": source_order}
    fp = fingerprint(STAGE, code_closure(sys.modules[__name__]), params, {"rows": str(src_file)})
    out, done = open_stage(output_dir, fp, versioned=versioned, force=force)
    if done is not None:
        return done
    t0 = time.time()
    # batches of whole row groups where the budget allows one: the writer flushes each batch as it comes (a
    # batch that is not would leave a varying remainder buffered in the writer: a peak that varies batch to
    # batch, so that more batches meet a higher one)
    rows = budget.batch_rows(memory_gb, 2048)
    reader = RowReader(src_file, NORMALIZED_FIELDS, stage=STAGE, block_bytes=budget.block_bytes(memory_gb),
                       batch_rows=rows // ROW_GROUP * ROW_GROUP or rows)
    order = list(source_order or [])
    stats = _StrataStats()
    by_rule: dict[str, int] = {}
    bar = None  # opened at the first batch: an input that fails before any row shows no bar
    pool = pa.default_memory_pool()
    with RowGroupWriter(out / ROWS_FILE, STRATIFIED_SCHEMA) as w:
        for batch in reader:
            if bar is None:
                bar = tqdm(total=reader.total_rows if progress else None, desc="stratify", unit="row",
                           unit_scale=True, disable=not progress)  # (a JSONL total is a read of the file)
            df = pl.from_arrow(reader.conform(batch))
            if "origin" not in df.columns:
                df = df.with_columns(origin=pl.col("source"))
            for src in df.get_column("source").unique(maintain_order=True).to_list():
                if src not in order:  # a source's priority is fixed where it is first seen
                    order.append(src)
            prio = pl.DataFrame({"source": order, "priority": list(range(len(order)))},
                                schema={"source": pl.String, "priority": pl.Int32})
            df = assign(df, rules).join(prio, on="source", how="left", maintain_order="left")
            df = df.select([f.name for f in STRATIFIED_SCHEMA])
            w.write(df.to_arrow().cast(STRATIFIED_SCHEMA))
            stats.add(df)
            for r in df.group_by("rule").len().to_dicts():
                by_rule[r["rule"]] = by_rule.get(r["rule"], 0) + r["len"]
            bar.update(batch.num_rows)
            del df, batch
            pool.release_unused()  # the batch's Arrow buffers back to the system (mimalloc keeps them)
    if bar is not None:
        bar.close()
    kept = w.record["rows"]
    strata = stats.result()
    write_json(strata, out / STRATA_FILE)
    outputs = {
        ROWS_FILE: w.record,
        REJECTS_FILE: write_parquet(pa.Table.from_pylist(reader.rejects, schema=REMOVAL_SCHEMA), out / REJECTS_FILE),
        STRATA_FILE: file_record(out / STRATA_FILE),
    }
    counts = {"rows_in": kept + len(reader.rejects), "kept": kept,
              "rejected": len(reader.rejects), "strata": len(strata),
              "rows_per_rule": {k: by_rule[k] for k in sorted(by_rule)}}
    manifest = {"stage": STAGE, "fingerprint": fp, "params": params, "outputs": outputs, "counts": counts}
    return finish_stage(out, manifest, {"total_s": round(time.time() - t0, 3)})


class _StrataStats:
    """`strata_stats` summed over batches: the same result as over all the rows at once."""

    def __init__(self) -> None:
        self.acc: dict[str, dict] = {}

    def add(self, df: pl.DataFrame) -> None:
        for stratum, r in strata_stats(df).items():
            a = self.acc.get(stratum)
            if a is None:  # the first batch with the stratum gives its rule (the first row's)
                self.acc[stratum] = {**r, "domains": set(r["domains"]), "sources": set(r["sources"])}
                continue
            a["rows"] += r["rows"]
            a["domains"].update(r["domains"])
            a["sources"].update(r["sources"])
            a["instruction_chars"] += r["instruction_chars"]
            a["response_chars"] += r["response_chars"]

    def result(self) -> dict:
        return {k: {**a, "domains": sorted(a["domains"]), "sources": sorted(a["sources"])}
                for k, a in sorted(self.acc.items())}
