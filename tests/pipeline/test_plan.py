"""`hrm plan` describes what a run does: strata per Hub data file (`data_file_field`), checked against
the ingest -> normalize -> stratify -> tokenizer -> mix stages on a local folder laid out like a Hub
dataset (several Parquet shards, loaded through datasets.load_dataset as `kind: hub` does)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import MixConfig, NormalizeConfig, RunSpec, SourceEstimate, SourceSpec, StratumRule
from pipeline.config import StratifyConfig, TokenizerConfig
from pipeline.io import read_json
from pipeline.plan import plan_spec
from pipeline.stages import ingest, mix, normalize, stratify
from pipeline.stages import tokenize as T
from pipeline.stages.ingest import IngestError

FILES = {"data/train-00000-of-00003.parquet": 30, "data/train-00001-of-00003.parquet": 50,
         "data/train-00002-of-00003.parquet": 12}
CAP = 20
EPOCHS = 3


@pytest.fixture(scope="module")
def hub_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("synth_like")
    for k, (name, n) in enumerate(FILES.items()):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        q = [f"file {k} question {i}: what is {i} plus {k}?" for i in range(n)]
        a = [f"{i} plus {k} is {i + k}, because counting {k} on from {i} gives {i + k}." for i in range(n)]
        pq.write_table(pa.table({"query": q, "answer": a, "shard": [name] * n}), d / name)
    return d


def _spec(path, **src) -> RunSpec:
    s = SourceSpec(name="syn", kind="hub", path=str(path), split="train", condition="synth",
                   fields={"instruction": "query", "response": "answer", **src.pop("fields", {})}, **src)
    return RunSpec(name="plan_test", sources=[s], seed=3, mix=MixConfig(epochs=EPOCHS),
                   stratify=StratifyConfig(rules=[StratumRule(match="syn/", cap_rows=CAP)]))


def _run_stages(spec: RunSpec, d) -> dict:
    src = spec.sources
    ingest.run(src, d / "ingest", seed=spec.seed, progress=False)
    normalize.run(d / "ingest", d / "norm", src, spec.normalize, progress=False)
    stratify.run(d / "norm", d / "strat", spec.stratify.rules, source_order=[s.name for s in src], progress=False)
    T.run(d / "strat", d / "tok", TokenizerConfig(vocab_size=300, sample_rows=200),
          conditions=spec.normalize.conditions, seed=1, progress=False)
    mix.run(d / "tok", d / "mix", spec.mix, rules=spec.stratify.rules, seed=spec.seed, progress=False)
    return read_json(d / "mix" / "mix_report.json")


def test_hub_ingest_records_each_rows_data_file(hub_folder, tmp_path):
    spec = _spec(hub_folder, data_file_field="data_file", fields={"subset": "data_file"})
    ingest.run(spec.sources, tmp_path / "i", progress=False)
    t = pq.read_table(tmp_path / "i" / "syn.parquet")
    assert t.column("data_file").to_pylist() == t.column("shard").to_pylist()  # the file each row came from
    normalize.run(tmp_path / "i", tmp_path / "n", spec.sources, NormalizeConfig(), progress=False)
    rows = pq.read_table(tmp_path / "n" / "rows.parquet").to_pylist()
    assert {r["origin"] for r in rows} == {f"syn/{f}" for f in FILES}
    assert rows[0]["id"] == "syn/0"  # ids unchanged: the row index in the split
    clash = _spec(hub_folder, data_file_field="shard")
    with pytest.raises(IngestError, match="already a column"):
        ingest.run(clash.sources, tmp_path / "i2", progress=False)


def test_data_file_field_is_for_hub_sources_only():
    with pytest.raises(ValueError, match="only applies to kind 'hub'"):
        SourceSpec(name="x", kind="local", path="x.jsonl", data_file_field="f")


@pytest.mark.parametrize("per_file", [True, False])
def test_plan_matches_the_stages_on_a_hub_layout(hub_folder, tmp_path, per_file):
    extra = {"data_file_field": "data_file", "fields": {"subset": "data_file"}} if per_file else {}
    spec = _spec(hub_folder, **extra)
    plan = plan_spec(spec)
    report = _run_stages(spec, tmp_path)
    want = {f"syn/{f}": n for f, n in FILES.items()} if per_file else {"syn/train": sum(FILES.values())}
    assert {k: v["rows"] for k, v in plan["strata"].items()} == want
    assert set(report["strata"]) == set(want)
    for name, n in want.items():
        p, r = plan["strata"][name], report["strata"][name]
        assert r["rows_available"] == n
        assert p["window_rows"] == min(n, CAP)
        assert r["unique_rows"] == round(p["unique_rows"]) and r["seen_rows"] == round(p["seen_rows"])
        # tokens: the plan estimates from characters, the run counts the trained tokenizer's tokens;
        # the ratio seen / unique (repeats and windows) is the same
        assert p["seen_tokens"] / p["unique_tokens"] == pytest.approx(r["seen_tokens"] / r["unique_tokens"], rel=0.1)
    assert report["totals"]["seen_rows"] == round(sum(p["seen_rows"] for p in plan["strata"].values()))
    # per file, every file is capped on its own: 20 + 20 + 12 rows per epoch instead of 20 in all
    assert report["totals"]["seen_rows"] == EPOCHS * (sum(min(n, CAP) for n in FILES.values()) if per_file else CAP)


def test_estimated_plan_gives_the_same_strata_shape(hub_folder):
    """Without the data, `estimate.strata` becomes one origin per data file only where a run makes one."""
    est = SourceEstimate(rows=sum(FILES.values()), tokens_per_row=30, strata=len(FILES))
    per_file = plan_spec(_spec("org/not-local", data_file_field="data_file", fields={"subset": "data_file"},
                               estimate=est))
    assert len(per_file["strata"]) == len(FILES) and all(k.endswith(".parquet") for k in per_file["strata"])
    assert all(s["window_rows"] == CAP for s in per_file["strata"].values())
    merged = plan_spec(_spec("org/not-local", estimate=est))
    assert list(merged["strata"]) == ["syn/train"] and merged["merged_sources"] == ["syn"]
    assert merged["strata"]["syn/train"]["window_rows"] == CAP
