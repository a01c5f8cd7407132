"""Mix stage on real data (GSM8K train, tokenized): caps, persistent permutation, repeats, budget and
ratios, impossible requests, unique vs seen accounting, lineage."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import io
from pipeline.config import MixConfig, StratumRule, TokenizerConfig
from pipeline.stages import mix as M
from pipeline.stages import tokenize as T

GSM8K = Path("/work/shared/data/gsm8k/train.jsonl")
pytestmark = pytest.mark.skipif(not GSM8K.exists(), reason=f"{GSM8K} not available")

# strata: big (4000 rows, capped at 1000 per epoch), small (200 rows, x10), rest (800 rows, default)
STRATA = [("gsm8k/big", "capped", 4000), ("gsm8k/small", "hq", 200), ("gsm8k/rest", "default", 800)]
CAPPED = StratumRule(match="gsm8k/big", name="capped", cap_rows=1000)
HQ = StratumRule(match="gsm8k/small", name="hq", repeat=10)
RULES = [CAPPED, HQ]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mixdata")
    rows = []
    with GSM8K.open() as f:
        lines = [json.loads(x) for _, x in zip(range(sum(n for *_, n in STRATA)), f)]
    i = 0
    for stratum, rule, n in STRATA:
        for _ in range(n):
            r = lines[i]
            rows.append(
                {
                    "id": f"gsm8k/{i}",
                    "instruction": r["question"],
                    "response": r["answer"],
                    "condition": "cot",
                    "source": "gsm8k",
                    "domain": "math",
                    "stratum": stratum,
                    "rule": rule,
                }
            )
            i += 1
    pq.write_table(pa.Table.from_pylist(rows), d / "rows.parquet")
    T.run(
        d / "rows.parquet",
        d / "tok",
        TokenizerConfig(vocab_size=512, sample_rows=1000),
        conditions=["cot"],
        seed=5,
        progress=False,
    )
    return d / "tok"


@pytest.fixture(scope="module")
def meta(tokenized):
    t = pq.read_table(tokenized / "tokenized.parquet", columns=["id", "stratum", "prompt_tokens", "response_tokens"])
    tokens = dict(zip(t["id"].to_pylist(), (t["prompt_tokens"].to_numpy() + t["response_tokens"].to_numpy()).tolist()))
    stratum = dict(zip(t["id"].to_pylist(), t["stratum"].to_pylist()))
    return tokens, stratum


def windows(out: Path, stratum_of: dict, name: str) -> list[Counter]:
    """Per epoch: Counter of the ids of one stratum."""
    t = pq.read_table(out / "mix.parquet")
    res: dict[int, Counter] = {}
    for e, i in zip(t["epoch"].to_pylist(), t["id"].to_pylist()):
        if stratum_of[i] == name:
            res.setdefault(e, Counter())[i] += 1
    return [res.get(e, Counter()) for e in range(max(res) + 1)] if res else []


@pytest.fixture(scope="module")
def three_epochs(tokenized, tmp_path_factory):
    out = tmp_path_factory.mktemp("mix3")
    man = M.run(tokenized, out, MixConfig(epochs=3), rules=RULES, seed=42, progress=False)
    return out, man


def test_caps_and_persistent_permutation(three_epochs, meta, tokenized, tmp_path):
    out, man = three_epochs
    _, stratum_of = meta
    big = windows(out, stratum_of, "gsm8k/big")
    assert len(big) == 3
    for w in big:
        assert len(w) == 1000 and set(w.values()) == {1}  # no duplicates within a window
    assert not (set(big[0]) & set(big[1])) and not (set(big[1]) & set(big[2])) and not (set(big[0]) & set(big[2]))
    assert len(set(big[0]) | set(big[1]) | set(big[2])) == 3000  # union grows with the epochs
    rem = pq.read_table(out / "removals.parquet").to_pylist()
    assert len(rem) == 1000 and {r["reason"] for r in rem} == {"capped"} and {r["stage"] for r in rem} == {"mix"}
    assert {stratum_of[r["id"]] for r in rem} == {"gsm8k/big"}
    assert not set(r["id"] for r in rem) & (set(big[0]) | set(big[1]) | set(big[2]))
    c = man["counts"]
    assert c["rows_in"] == 5000 == c["rows_used"] + c["rows_capped"] and c["rows_capped"] == 1000
    # persistent: 5 epochs start with the same 3 windows, then wrap around (4 x 1000 = 4000 rows)
    M.run(tokenized, tmp_path / "five", MixConfig(epochs=5), rules=RULES, seed=42, progress=False)
    big5 = windows(tmp_path / "five", stratum_of, "gsm8k/big")
    assert [set(w) for w in big5[:3]] == [set(w) for w in big]
    assert len(set().union(*big5[:4])) == 4000 and set(big5[4]) == set(big5[0])
    assert len(pq.read_table(tmp_path / "five" / "removals.parquet")) == 0
    # independent of the other strata's rules
    M.run(
        tokenized,
        tmp_path / "hq3",
        MixConfig(epochs=3),
        rules=[CAPPED, HQ.model_copy(update={"repeat": 3.0})],
        seed=42,
        progress=False,
    )
    assert [set(w) for w in windows(tmp_path / "hq3", stratum_of, "gsm8k/big")] == [set(w) for w in big]


def test_repeat_x10_and_default(three_epochs, meta):
    out, man = three_epochs
    _, stratum_of = meta
    for w in windows(out, stratum_of, "gsm8k/small"):
        assert len(w) == 200 and set(w.values()) == {10}
    for w in windows(out, stratum_of, "gsm8k/rest"):
        assert len(w) == 800 and set(w.values()) == {1}
    rep = io.read_json(out / "mix_report.json")
    small = rep["strata"]["gsm8k/small"]
    assert small["seen_rows"] == 3 * 2000 and small["unique_rows"] == 200
    assert small["effective_repeat"] == pytest.approx(30.0)
    assert rep["strata"]["gsm8k/big"]["effective_repeat"] == pytest.approx(1.0)
    assert man["counts"]["seen_rows_per_epoch"] == [1000 + 2000 + 800] * 3


def test_order_shuffle_and_file(three_epochs, meta):
    out, man = three_epochs
    _, stratum_of = meta
    t = pq.read_table(out / "mix.parquet")
    assert t.schema.equals(M.MIX_SCHEMA)
    ep = t["epoch"].to_numpy()
    order = t["order"].to_numpy()
    assert (np.diff(ep) >= 0).all()
    for e in range(3):
        assert (order[ep == e] == np.arange((ep == e).sum())).all()
    ids = t["id"].to_pylist()
    first = [stratum_of[i] for i in ids[:200]]
    assert len(set(first)) == 3  # strata are interleaved by the global shuffle
    e0 = [i for i, e in zip(ids, ep) if e == 0]
    e2 = [i for i, e in zip(ids, ep) if e == 2]
    rest0 = [i for i in e0 if stratum_of[i] == "gsm8k/rest"]
    rest2 = [i for i in e2 if stratum_of[i] == "gsm8k/rest"]
    assert sorted(rest0) == sorted(rest2) and rest0 != rest2  # same rows, another order
    for name, rec in man["outputs"].items():
        assert io.sha256_file(out / name) == rec["sha256"]


def test_deterministic_and_idempotent(three_epochs, tokenized, tmp_path):
    out, man = three_epochs
    again = M.run(tokenized, tmp_path / "again", MixConfig(epochs=3), rules=RULES, seed=42, progress=False)
    assert again["outputs"]["mix.parquet"]["sha256"] == man["outputs"]["mix.parquet"]["sha256"]
    assert (tmp_path / "again" / "mix.parquet").read_bytes() == (out / "mix.parquet").read_bytes()
    other = M.run(tokenized, tmp_path / "other", MixConfig(epochs=3), rules=RULES, seed=43, progress=False)
    assert other["outputs"]["mix.parquet"]["sha256"] != man["outputs"]["mix.parquet"]["sha256"]
    # the config's own seed wins over the spec seed
    cfg_seed = M.run(tokenized, tmp_path / "cfgseed", MixConfig(epochs=3, seed=42), rules=RULES, seed=7, progress=False)
    assert cfg_seed["outputs"]["mix.parquet"]["sha256"] == man["outputs"]["mix.parquet"]["sha256"]
    mtime = (out / "mix.parquet").stat().st_mtime_ns
    assert M.run(tokenized, out, MixConfig(epochs=3), rules=RULES, seed=42, progress=False) == man
    assert (out / "mix.parquet").stat().st_mtime_ns == mtime


def test_unique_vs_seen_accounting(three_epochs, meta):
    out, man = three_epochs
    tokens, stratum_of = meta
    rep = io.read_json(out / "mix_report.json")
    t = pq.read_table(out / "mix.parquet")
    ids = t["id"].to_pylist()
    seen = sum(tokens[i] for i in ids)
    uniq = set(ids)
    assert rep["totals"]["seen_tokens"] == man["counts"]["seen_tokens"] == seen
    assert rep["totals"]["unique_tokens"] == man["counts"]["unique_tokens"] == sum(tokens[i] for i in uniq)
    assert rep["totals"]["seen_rows"] == len(ids)
    for name, s in rep["strata"].items():
        mine = [i for i in ids if stratum_of[i] == name]
        assert s["seen_rows"] == len(mine) and s["seen_tokens"] == sum(tokens[i] for i in mine)
        assert s["unique_rows"] == len(set(mine)) and s["unique_tokens"] == sum(tokens[i] for i in set(mine))
        assert s["unique_rows"] + s["rows_never_used"] == s["rows_available"]
    assert rep["totals"]["seen_tokens"] > rep["totals"]["unique_tokens"]


def test_fractional_repeat_and_downsampling(tokenized, meta, tmp_path):
    _, stratum_of = meta
    rules = [CAPPED, HQ.model_copy(update={"repeat": 2.5}), StratumRule(match="gsm8k/rest", name="default", repeat=0.5)]
    man = M.run(tokenized, tmp_path / "m", MixConfig(epochs=2), rules=rules, seed=1, progress=False)
    small = windows(tmp_path / "m", stratum_of, "gsm8k/small")
    for w in small:
        assert sum(w.values()) == 500 and set(w.values()) == {2, 3} and len(w) == 200
    assert {i for i, k in small[0].items() if k == 3} != {i for i, k in small[1].items() if k == 3}
    rest = windows(tmp_path / "m", stratum_of, "gsm8k/rest")
    assert [len(w) for w in rest] == [400, 400] and not set(rest[0]) & set(rest[1])  # later epochs go on
    rep = io.read_json(tmp_path / "m" / "mix_report.json")
    assert rep["strata"]["gsm8k/rest"]["rows_never_used"] == 0
    assert man["counts"]["rows_capped"] == 4000 - 2000


def test_token_cap_windows(tokenized, meta, tmp_path):
    tokens, stratum_of = meta
    rule = StratumRule(match="gsm8k/big", name="capped", cap_tokens=50_000)
    M.run(tokenized, tmp_path / "m", MixConfig(epochs=3), rules=[rule, HQ], seed=3, progress=False)
    big = windows(tmp_path / "m", stratum_of, "gsm8k/big")
    for w in big:
        tot = sum(tokens[i] for i in w)
        assert tot <= 50_000 and tot > 50_000 - 1000 and set(w.values()) == {1}
    assert not set(big[0]) & set(big[1])


def test_budget_and_ratio(tokenized, meta, tmp_path):
    tokens, _ = meta
    budget = 3_000_000
    rules = [CAPPED, HQ.model_copy(update={"ratio": 0.25})]
    man = M.run(
        tokenized, tmp_path / "m", MixConfig(epochs=2, token_budget=budget), rules=rules, seed=9, progress=False
    )
    rep = io.read_json(tmp_path / "m" / "mix_report.json")
    assert man["counts"]["seen_tokens"] == pytest.approx(budget, rel=0.02)
    assert rep["rules"]["hq"]["share"] == pytest.approx(0.25, abs=0.01)
    # strata without a ratio share the rest in proportion to their natural size: one common factor
    assert rep["strata"]["gsm8k/big"]["repeat"] == pytest.approx(rep["strata"]["gsm8k/rest"]["repeat"])
    # caps are never raised: big still shows 1000 distinct rows per epoch
    assert rep["strata"]["gsm8k/big"]["unique_rows"] <= 2 * 1000
    # a budget alone scales every stratum
    man2 = M.run(
        tokenized, tmp_path / "b", MixConfig(epochs=1, token_budget=500_000), rules=RULES, seed=9, progress=False
    )
    assert man2["counts"]["seen_tokens"] == pytest.approx(500_000, rel=0.02)
    rep2 = io.read_json(tmp_path / "b" / "mix_report.json")
    assert rep2["strata"]["gsm8k/small"]["repeat"] == pytest.approx(10 * rep2["strata"]["gsm8k/rest"]["repeat"])


def stats(**kw):
    base = {
        "big": M.StratumStats(rows=4000, mean_tokens=300, rule="capped"),
        "small": M.StratumStats(rows=200, mean_tokens=300, rule="hq"),
        "rest": {"rows": 800, "mean_tokens": 300.0},
    }
    base.update(kw)
    return base


def test_plan_impossible_requests():
    hq = HQ.model_copy(update={"ratio": 0.9})
    with pytest.raises(ValueError, match="token_budget is not set"):
        M.plan(stats(), MixConfig(epochs=1), [CAPPED, hq])
    # small has 200 x 300 x 10 = 600k natural tokens; 0.9 x 10M would need repeat 150
    with pytest.raises(ValueError, match=r"stratum 'small' would need repeat 150\.00 > max_repeat 50.*ratio 0\.9"):
        M.plan(stats(), MixConfig(epochs=1, token_budget=10_000_000), [CAPPED, hq])
    p = M.plan(stats(), MixConfig(epochs=1, token_budget=10_000_000), [CAPPED, hq], max_repeat=None)
    assert p.strata["small"].repeat == pytest.approx(150.0)
    # budget beyond what caps x max_repeat allow for the strata without a ratio
    with pytest.raises(ValueError, match=r"stratum 'big' would need repeat .* token_budget 1,000,000,000"):
        M.plan(stats(), MixConfig(epochs=1, token_budget=1_000_000_000), RULES)
    with pytest.raises(ValueError, match="add up to 1.2"):
        M.plan(
            stats(),
            MixConfig(token_budget=10**6),
            [CAPPED.model_copy(update={"ratio": 0.6}), hq.model_copy(update={"ratio": 0.6})],
        )
    with pytest.raises(ValueError, match="nothing of token_budget"):
        M.plan(
            stats(),
            MixConfig(token_budget=10**6),
            [CAPPED.model_copy(update={"ratio": 0.5}), hq.model_copy(update={"ratio": 0.5})],
        )
    every = [
        CAPPED.model_copy(update={"ratio": 0.5}),
        hq.model_copy(update={"ratio": 0.2}),
        StratumRule(match="*", name="default", ratio=0.1),
    ]
    with pytest.raises(ValueError, match="every stratum has a ratio"):
        M.plan(stats(), MixConfig(token_budget=10**6), every)
    with pytest.raises(ValueError, match="no rows use it"):
        M.plan(stats(), MixConfig(token_budget=10**6), RULES + [StratumRule(match="x/", name="ghost", ratio=0.1)])
    with pytest.raises(ValueError, match="stratum 'odd' uses rule 'nope'"):
        M.plan(stats(odd=M.StratumStats(10, 5.0, "nope")), MixConfig(), RULES)
    with pytest.raises(ValueError, match="need keys rows, mean_tokens"):
        M.plan({"x": {"rows": 3}}, MixConfig(), RULES)
    with pytest.raises(ValueError, match="max_repeat"):
        M.plan(stats(), MixConfig(), [CAPPED, HQ.model_copy(update={"repeat": 60})])


def test_run_fails_early_without_outputs(tokenized, tmp_path):
    with pytest.raises(ValueError, match="gsm8k/small.*would need repeat"):
        M.run(
            tokenized,
            tmp_path / "m",
            MixConfig(token_budget=10_000_000),
            rules=[CAPPED, HQ.model_copy(update={"ratio": 0.5})],
            seed=1,
            progress=False,
        )
    with pytest.raises(ValueError, match="uses rule 'hq', which is not among"):
        M.run(tokenized, tmp_path / "m", MixConfig(), rules=[CAPPED], seed=1, progress=False)
    assert not (tmp_path / "m" / "mix.parquet").exists() and not (tmp_path / "m" / "manifest.json").exists()


def test_plan_dry_run_at_scale():
    """The 1B spec's dry run: estimates only, no data; 4 epochs, about 60B seen tokens."""
    st = {f"flan/task{i:03d}": M.StratumStats(50_000, 400.0, "flan") for i in range(300)}
    st.update({f"synth/file{i:03d}": M.StratumStats(100_000, 900.0, "synth") for i in range(200)})
    st["omi2"] = M.StratumStats(14_000_000, 600.0, "omi2")
    st["gsm8k/train"] = M.StratumStats(7_473, 250.0, "hq")
    st["math/train"] = M.StratumStats(7_500, 500.0, "hq")
    rules = [
        StratumRule(match="flan/", name="flan", cap_rows=5_000),
        StratumRule(match="synth/", name="synth", cap_rows=20_000),
        StratumRule(match="omi2", name="omi2", cap_rows=2_000_000),
        StratumRule(match="gsm8k/", name="hq", repeat=10, ratio=0.01),
    ]
    p = M.plan(st, MixConfig(epochs=4, token_budget=60_000_000_000), rules)
    assert p.seen_tokens == pytest.approx(60e9, rel=1e-9)
    assert p.rules["hq"]["share"] == pytest.approx(0.01)
    assert p.unique_tokens < p.seen_tokens
    assert p.strata["flan/task000"].window_rows == 5_000 and p.strata["flan/task000"].unique_rows == 20_000
    assert p.strata["omi2"].unique_rows == 8_000_000
    d = p.to_dict()
    assert json.loads(json.dumps(d))["strata"]["omi2"]["rule"] == "omi2"


def test_bad_input_named(tmp_path):
    pq.write_table(
        pa.table({"id": ["a"], "stratum": ["s"], "prompt_tokens": [3], "response_tokens": [2]}),
        tmp_path / "tokenized.parquet",
    )
    with pytest.raises(ValueError, match=r"missing column\(s\) \['source', 'rule'\]"):
        M.run(tmp_path, tmp_path / "m", MixConfig(), rules=[], seed=1, progress=False)
    with pytest.raises(FileNotFoundError, match="tokenizer stage folder"):
        M.run(tmp_path / "nowhere", tmp_path / "m", MixConfig(), rules=[], seed=1, progress=False)


@pytest.mark.parametrize("run_rows,batch", [(None, None), (4, 2), (8, 3), (16, 5), (41, 7)])
def test_repeated_id_named(tmp_path, monkeypatch, run_rows, batch):
    """Ids are checked for repeats in id order as the sorted runs are merged (no hash table of all
    ids): a repeat is found inside a run, across runs, and across merge chunks, in different strata
    too, and named with both rows."""
    from pipeline import budget

    if run_rows is not None:  # runs of run_rows rows, spilled in batches of `batch` rows
        monkeypatch.setattr(budget, "MIN_ROWS", run_rows)
        monkeypatch.setattr(M, "_RUN_ROW_BYTES", 1 << 40)
        monkeypatch.setattr(M, "_MIN_MERGE_BATCH", batch)
    n = 50
    ids = [f"r{i:03d}" for i in range(n)]
    ids[41] = ids[7]  # "r007" twice, far apart in the file, next to each other in id order
    pq.write_table(
        pa.table({"id": ids, "source": ["s"] * n, "stratum": [f"st{i % 2}" for i in range(n)], "rule": ["default"] * n,
                  "prompt_tokens": [3] * n, "response_tokens": [2] * n}),
        tmp_path / "tokenized.parquet", row_group_size=8,
    )
    with pytest.raises(ValueError, match=r"ids are not unique: rows 7 and 41 both have id 'r007'"):
        M.run(tmp_path, tmp_path / "m", MixConfig(), rules=[], seed=1, progress=False, memory_gb=0.001)
    assert not (tmp_path / "m" / "mix.parquet").exists()
    ids[41] = "r041"  # without the repeat: fine, and no spill file is left
    pq.write_table(pa.table({"id": ids, "source": ["s"] * n, "stratum": ["a"] * n, "rule": ["default"] * n,
                             "prompt_tokens": [3] * n, "response_tokens": [2] * n}), tmp_path / "tokenized.parquet")
    man = M.run(tmp_path, tmp_path / "ok", MixConfig(), rules=[], seed=1, progress=False, memory_gb=0.001)
    assert man["counts"]["seen_rows"] == n
    assert sorted(p.name for p in (tmp_path / "ok").rglob(".*")) == []
