from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipeline.config import StratumRule
from pipeline.io import read_json
from pipeline.stages import stratify


def rows_file(tmp_path, rows):
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def row(i, source, origin=None, domain="d"):
    r = {"id": f"{source}/{i}", "instruction": f"q{i}", "response": f"a{i}", "condition": "direct",
         "source": source, "domain": domain}
    if origin:
        r["origin"] = origin
    return r


def test_first_match_rules_granularity_domain_and_priority(tmp_path):
    rows = [row(0, "flan", "flan/taskA"), row(1, "flan", "flan/taskB"), row(2, "flan", "flan/taskA"),
            row(3, "synth", "synth/f1"), row(4, "synth", "synth/f2"), row(5, "gsm8k", "gsm8k/train"),
            row(6, "other", "other/x")]
    rules = [StratumRule(match="flan/", cap_rows=5000),
             StratumRule(match="synth/", stratum="source", domain="synthetic"),
             StratumRule(match="gsm8k/", name="small_hq", stratum="rule", repeat=10),
             StratumRule(match="flan/taskA", name="never")]  # shadowed by the first rule
    man = stratify.run(rows_file(tmp_path, rows), tmp_path / "out", rules,
                       source_order=["gsm8k", "flan", "synth"], progress=False)
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "rows.parquet").to_pylist()}
    assert out["flan/0"]["stratum"] == "flan/taskA" and out["flan/0"]["rule"] == "flan/"
    assert out["flan/1"]["stratum"] == "flan/taskB"
    assert out["synth/3"]["stratum"] == "synth" and out["synth/4"]["domain"] == "synthetic"
    assert out["gsm8k/5"]["stratum"] == "small_hq" and out["gsm8k/5"]["rule"] == "small_hq"
    assert out["other/6"]["rule"] == "default" and out["other/6"]["stratum"] == "other/x"
    assert [out[k]["priority"] for k in ("gsm8k/5", "flan/0", "synth/3", "other/6")] == [0, 1, 2, 3]
    assert man["counts"]["rows_in"] == 7 and man["counts"]["kept"] == 7
    stats = read_json(tmp_path / "out" / "strata.json")
    assert stats["flan/taskA"]["rows"] == 2 and stats["synth"]["domains"] == ["synthetic"]


def test_standalone_without_origin_and_bad_rows(tmp_path):
    rows = [row(0, "a"), row(1, "b"), {"id": "b/2", "instruction": "", "response": "x", "condition": "direct",
                                       "source": "b", "domain": "d"}]
    f = rows_file(tmp_path, rows)
    with open(f, "a") as fh:
        fh.write("{oops\n")
    man = stratify.run(f, tmp_path / "out", [], progress=False)
    assert man["counts"] == {"rows_in": 4, "kept": 2, "rejected": 2, "strata": 2, "rows_per_rule": {"default": 2}}
    rej = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert sorted(r["reason"] for r in rej) == ["bad_json", "empty_field"]


def test_reserved_rule_name(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        stratify.run(rows_file(tmp_path, [row(0, "a")]), tmp_path / "o", [StratumRule(match="*", name="default")],
                     progress=False)


def test_batches_of_whole_row_groups_same_bytes(tmp_path, monkeypatch):
    """Stratify reads its input in batches of whole Parquet row groups (so the writer flushes each batch
    and holds no remainder): under a tiny budget and 128-row groups for the batch sizing (batches of 512 rows),
    rows.parquet, strata.json and rejects.parquet are byte-identical to the default run (one batch)."""
    import pyarrow as pa

    from pipeline import budget

    rows = [row(i, f"s{i % 3}", f"s{i % 3}/f{i % 5}") for i in range(3000)]
    rows[7]["response"] = " "  # a rejected row
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src, row_group_size=500)
    rules = [StratumRule(match="s0/", stratum="source"), StratumRule(match="s1/f1", name="one", stratum="rule")]
    a = stratify.run(src, tmp_path / "a", rules, source_order=["s2"], progress=False)
    monkeypatch.setattr(budget, "MIN_ROWS", 1)
    monkeypatch.setattr(stratify, "ROW_GROUP", 128)
    batches = []
    add = stratify._StrataStats.add
    monkeypatch.setattr(stratify._StrataStats, "add", lambda self, df: (batches.append(df.height), add(self, df)))
    b = stratify.run(src, tmp_path / "b", rules, source_order=["s2"], progress=False, memory_gb=0.001)
    assert budget.batch_rows(0.001, 2048, multiple=128) == 512
    assert batches == [511, 512, 512, 512, 512, 440]  # (the first batch's rejected row dropped)
    for name in ("rows.parquet", "strata.json", "rejects.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert a["outputs"] == b["outputs"] and a["counts"]["rejected"] == 1
