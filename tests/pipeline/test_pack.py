"""Pack stage on real data (GSM8K train -> tokenizer -> mix -> pack): layout and packing invariants,
drops and truncation, lineage through the three stages, checksums, determinism."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import io
from pipeline.config import MixConfig, PackConfig, StratumRule, TokenizerConfig
from pipeline.stages import mix as M
from pipeline.stages import pack as P
from pipeline.stages import tokenize as T

GSM8K = Path("/work/shared/data/gsm8k/train.jsonl")
pytestmark = pytest.mark.skipif(not GSM8K.exists(), reason=f"{GSM8K} not available")

N = 1200
SEQ = 512
CFG = PackConfig(seq_len=SEQ, min_response_tokens=2, shard_tokens=64 * SEQ)
RULES = [StratumRule(match="gsm8k/b", name="capped", cap_rows=150)]


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    """GSM8K rows (even: worked answer 'cot'; odd: final answer only 'direct', many of them one token),
    plus a few edge rows: a prompt too long for seq_len, responses long enough to be truncated, one
    malformed row. Two strata: gsm8k/a (default) and gsm8k/b (capped at 150 of 300 rows)."""
    d = tmp_path_factory.mktemp("packdata")
    with GSM8K.open() as f:
        src = [json.loads(x) for _, x in zip(range(N), f)]
    rows = []
    for i, r in enumerate(src):
        cot = i % 2 == 0
        rows.append(
            {
                "id": f"gsm8k/{i}",
                "instruction": r["question"],
                "response": r["answer"] if cot else r["answer"].split("####")[-1].strip(),
                "condition": "cot" if cot else "direct",
                "source": "gsm8k",
                "domain": "math",
                "stratum": "gsm8k/b" if i >= N - 300 else "gsm8k/a",
                "rule": "capped" if i >= N - 300 else "default",
            }
        )
    edge = dict(rows[0], source="edge", stratum="edge", rule="default")
    rows.append(dict(edge, id="edge/long_prompt", instruction=" ".join(r["question"] for r in src[:12])))
    for k in range(3):
        rows.append(dict(edge, id=f"edge/long_answer{k}", response="\n".join(r["answer"] for r in src[k : k + 6])))
    rows.append(dict(edge, id="edge/empty", response="   "))  # rejected by the tokenizer stage
    with (d / "rows.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    tok = T.run(
        d / "rows.jsonl",
        d / "tok",
        TokenizerConfig(vocab_size=512, sample_rows=1000),
        conditions=["direct", "cot"],
        seed=3,
        progress=False,
    )
    mix = M.run(d / "tok", d / "mix", MixConfig(epochs=2), rules=RULES, seed=4, progress=False)
    pack = P.run(d / "tok", d / "mix", d / "pack", CFG, progress=False)
    return d, tok, mix, pack


def load_tokenized(d: Path) -> dict[str, dict]:
    t = pq.read_table(d / "tok" / "tokenized.parquet").to_pylist()
    return {r["id"]: r for r in t}


def shards(out: Path) -> list[pa.Table]:
    return [P.read_shard(p) for p in sorted(out.glob("shard-*.arrow"))]


def test_layout_and_packing_invariants(pipeline_dirs):
    d, _, _, man = pipeline_dirs
    tokd = load_tokenized(d)
    meta = io.read_json(d / "tok" / "tokenizer_meta.json")
    ids = T.special_ids(meta)
    n_trunc = 0
    for t in shards(d / "pack"):
        assert t.schema.equals(P.pack_schema(SEQ, ids.pad), check_metadata=True)
        for row in t.to_pylist():
            x = np.asarray(row["input_ids"])
            assert x.shape == (SEQ,)
            starts, lens, plens = row["sample_starts"], row["sample_lengths"], row["prompt_lengths"]
            assert len(starts) == len(lens) == len(plens) == len(row["sample_ids"]) >= 1
            assert starts[0] == 0 and all(starts[k + 1] == starts[k] + lens[k] for k in range(len(starts) - 1))
            end = starts[-1] + lens[-1]
            assert end <= SEQ  # samples fit, none split
            assert (x[end:] == ids.pad).all() and (x[:end] != ids.pad).all()  # pad only at the tail
            for s, n, p, sid in zip(starts, lens, plens, row["sample_ids"]):
                src = tokd[sid]
                assert 0 < p < n
                assert x[s : s + p].tolist() == src["prompt_ids"]  # prompt kept whole
                assert x[s] == ids.boq and x[s + p - 1] == ids.eoq
                resp = x[s + p : s + n].tolist()
                assert resp == src["response_ids"][: n - p]
                if n - p < len(src["response_ids"]):
                    n_trunc += 1
                    assert n == SEQ and resp[-1] != ids.eoa  # truncated in the response only
                else:
                    assert resp[-1] == ids.eoa
    c = man["counts"]
    assert n_trunc == c["samples_truncated"] > 0
    assert c["tokens_truncated"] > 0
    assert c["packing_efficiency"] > 0.85


def test_every_sample_once_in_mix_order(pipeline_dirs):
    d, _, _, man = pipeline_dirs
    mix = pq.read_table(d / "mix" / "mix.parquet").to_pylist()
    dropped = {r["id"] for r in pq.read_table(d / "pack" / "removals.parquet").to_pylist()}
    pos = {(r["epoch"], r["id"]): r["order"] for r in mix}
    assert len(pos) == len(mix)  # ids are unique within an epoch in this mix
    want = Counter((r["epoch"], r["id"]) for r in mix if r["id"] not in dropped)
    got: Counter = Counter()
    last_epoch = -1
    for t in shards(d / "pack"):
        for row in t.to_pylist():
            e = row["epoch"]
            assert e >= last_epoch  # sequences hold one epoch each, epochs in order
            last_epoch = e
            orders = [pos[(e, sid)] for sid in row["sample_ids"]]  # KeyError: sample of another epoch
            assert orders == sorted(orders)  # mix order inside a sequence
            got.update((e, sid) for sid in row["sample_ids"])
    assert got == want  # every kept sample exactly once
    assert man["counts"]["samples_packed"] == sum(want.values())


def test_drops_and_lineage(pipeline_dirs):
    d, tok, mix, pack = pipeline_dirs
    tokd = load_tokenized(d)
    rem = {r["id"]: r for r in pq.read_table(d / "pack" / "removals.parquet").to_pylist()}
    short = {i for i, r in tokd.items() if len(r["response_ids"]) - 1 < CFG.min_response_tokens}
    used = set(pq.read_table(d / "mix" / "mix.parquet")["id"].to_pylist())
    assert len(short & used) > 10  # one-token final answers are real in GSM8K
    assert {i for i, r in rem.items() if r["reason"] == "short_response"} == short & used
    assert rem["edge/long_prompt"]["reason"] == "prompt_too_long"
    assert set(rem) == (short & used) | {"edge/long_prompt"}
    assert all(r["stage"] == "pack" and "occurrence" in r["detail"] for r in rem.values())
    # lineage through the stages
    ct, cm, cp = tok["counts"], mix["counts"], pack["counts"]
    assert ct["rows_in"] == N + 5 == ct["rows_tokenized"] + ct["rows_removed"]
    assert ct["removed_by_reason"] == {"empty_field": 1}
    assert cm["rows_in"] == ct["rows_tokenized"] == cm["rows_used"] + cm["rows_capped"]
    assert cm["rows_capped"] == 300 - 2 * 150
    assert cp["rows_in"] == cm["rows_used"] == cp["rows_packed"] + sum(cp["removed_by_reason"].values())
    assert cp["removed_by_reason"] == dict(Counter(r["reason"] for r in rem.values()))
    assert cp["samples_in"] == cm["seen_rows"] == cp["samples_packed"] + sum(cp["samples_removed_by_reason"].values())
    assert cp["samples_removed_by_reason"]["prompt_too_long"] == 2  # once per epoch
    assert sum(cp["sources"].values()) == cp["samples_packed"] and set(cp["sources"]) == {"gsm8k", "edge"}
    all_removed = set(rem) | set(pq.read_table(d / "mix" / "removals.parquet")["id"].to_pylist())
    packed = {sid for t in shards(d / "pack") for ids in t["sample_ids"].to_pylist() for sid in ids}
    assert packed | all_removed == set(tokd) and not packed & all_removed


def test_manifest_checksums_and_shard_stats(pipeline_dirs):
    d, _, _, man = pipeline_dirs
    out = d / "pack"
    names = sorted(p.name for p in out.glob("shard-*"))
    assert sorted(n for n in man["outputs"] if n.startswith("shard-")) == names
    assert man["shards"] == sorted(p.name for p in out.glob("shard-*.arrow"))
    per_shard = CFG.shard_tokens // SEQ
    total = 0
    for k, name in enumerate(man["shards"]):
        rec = man["outputs"][name]
        assert io.sha256_file(out / name) == rec["sha256"] and (out / name).stat().st_size == rec["bytes"]
        js = io.read_json(out / name.replace(".arrow", ".json"))
        assert js["sha256"] == rec["sha256"] and js["rows"] == rec["rows"]
        assert (
            io.sha256_file(out / name.replace(".arrow", ".json"))
            == man["outputs"][name.replace(".arrow", ".json")]["sha256"]
        )
        t = P.read_shard(out / name)
        x = np.asarray(t["input_ids"].combine_chunks().values)
        assert t.num_rows == rec["rows"] and rec["tokens"] == t.num_rows * SEQ == x.size
        assert rec["non_pad_tokens"] == int((x != man["pad_id"]).sum())
        assert rec["samples"] == sum(len(s) for s in t["sample_ids"].to_pylist()) == sum(rec["sources"].values())
        if k < len(man["shards"]) - 1:
            assert rec["rows"] == per_shard
        total += rec["rows"]
    assert total == man["counts"]["sequences"] and len(man["shards"]) > 3
    assert io.sha256_file(out / "removals.parquet") == man["outputs"]["removals.parquet"]["sha256"]


def test_deterministic_idempotent_and_stale_shards(pipeline_dirs, tmp_path):
    d, _, _, man = pipeline_dirs
    again = P.run(d / "tok", d / "mix", tmp_path / "again", CFG, progress=False)
    assert again["outputs"] == man["outputs"]
    for name in man["shards"]:
        assert (tmp_path / "again" / name).read_bytes() == (d / "pack" / name).read_bytes()
    mtime = (tmp_path / "again" / man["shards"][0]).stat().st_mtime_ns
    assert P.run(d / "tok", d / "mix", tmp_path / "again", CFG, progress=False) == again
    assert (tmp_path / "again" / man["shards"][0]).stat().st_mtime_ns == mtime
    bigger = P.run(
        d / "tok", d / "mix", tmp_path / "again", CFG.model_copy(update={"shard_tokens": 1 << 20}), progress=False
    )
    assert bigger["shards"] == ["shard-00000.arrow"]
    assert sorted(p.name for p in (tmp_path / "again").glob("shard-*")) == ["shard-00000.arrow", "shard-00000.json"]
    assert bigger["counts"]["samples_packed"] == man["counts"]["samples_packed"]
    # next-fit (one open sequence) needs at least as many sequences as first-fit
    nf = P.run(d / "tok", d / "mix", tmp_path / "nf", CFG.model_copy(update={"open_bins": 1}), progress=False)
    assert nf["counts"]["sequences"] >= man["counts"]["sequences"]
    assert nf["counts"]["non_pad_tokens"] == man["counts"]["non_pad_tokens"]


def reversed_parts(calls: list):
    """A `map_parts` (pipeline.parts) that pickles each part and computes them last first, as another
    process would; it records the part calls."""
    import pickle

    def run(fn, args):
        calls.append((fn.__name__, len(args)))
        jobs = [pickle.loads(pickle.dumps((fn, tuple(a)))) for a in args]
        got = {i: f(*a) for i, (f, a) in reversed(list(enumerate(jobs)))}
        return [got[i] for i in range(len(args))]

    return run


def test_shards_as_parts_equal_the_single_process_run(pipeline_dirs, tmp_path):
    """Each shard written as a part (the Dask runner's path), computed last first: the same shard files,
    shard records and manifest outputs as the single-process run; no plan file left behind."""
    d, _, _, man = pipeline_dirs
    calls: list = []
    got = P.run(d / "tok", d / "mix", tmp_path / "parts", CFG, progress=False, map_parts=reversed_parts(calls))
    assert calls == [("write_shard_part", len(man["shards"]))] and len(man["shards"]) > 2
    assert got["outputs"] == man["outputs"] and got["counts"] == man["counts"]
    for name in man["outputs"]:
        assert (tmp_path / "parts" / name).read_bytes() == (d / "pack" / name).read_bytes(), name
    assert not list((tmp_path / "parts").glob(".pack-*"))


def test_repeated_samples_and_bad_inputs(pipeline_dirs, tmp_path):
    d, _, _, _ = pipeline_dirs
    rules = RULES + [StratumRule(match="*", name="default", repeat=2.0)]
    M.run(d / "tok", tmp_path / "mix", MixConfig(epochs=1), rules=rules, seed=4, progress=False)
    man = P.run(d / "tok", tmp_path / "mix", tmp_path / "pack", CFG, progress=False)
    mix_ids = pq.read_table(tmp_path / "mix" / "mix.parquet")["id"].to_pylist()
    dropped = set(pq.read_table(tmp_path / "pack" / "removals.parquet")["id"].to_pylist())
    got = Counter(sid for t in shards(tmp_path / "pack") for ids in t["sample_ids"].to_pylist() for sid in ids)
    assert got == Counter(i for i in mix_ids if i not in dropped) and max(got.values()) == 2
    assert man["counts"]["samples_removed_by_reason"]["prompt_too_long"] == 2
    # a mix naming ids the tokenizer folder does not have
    (tmp_path / "badmix").mkdir()
    pq.write_table(
        pa.table(
            {"epoch": pa.array([0, 0], pa.int32()), "order": pa.array([0, 1], pa.int64()), "id": ["gsm8k/0", "nope/1"]}
        ),
        tmp_path / "badmix" / "mix.parquet",
    )
    with pytest.raises(ValueError, match=r"not in .*tokenized.parquet.*nope/1"):
        P.run(d / "tok", tmp_path / "badmix", tmp_path / "p2", CFG, progress=False)
    with pytest.raises(FileNotFoundError, match="mix.parquet"):
        P.run(d / "tok", tmp_path / "nomix", tmp_path / "p3", CFG, progress=False)
    assert not (tmp_path / "p2" / "manifest.json").exists()


def test_one_token_responses_kept_by_default(pipeline_dirs, tmp_path):
    """As the reference: one content token plus EOA is a sample (min_response_tokens 1 by default);
    a single-digit GSM8K answer is packed, and its one content token is a label."""
    d, _, _, _ = pipeline_dirs
    cfg = PackConfig(seq_len=SEQ, shard_tokens=64 * SEQ)
    assert cfg.min_response_tokens == 1
    man = P.run(d / "tok", d / "mix", tmp_path / "pack", cfg, progress=False)
    tokd = load_tokenized(d)
    one = {i for i, r in tokd.items() if len(r["response_ids"]) == 2}  # one content token + EOA
    used = set(pq.read_table(d / "mix" / "mix.parquet")["id"].to_pylist())
    assert len(one & used) > 10
    assert "short_response" not in man["counts"]["removed_by_reason"]
    rem = pq.read_table(tmp_path / "pack" / "removals.parquet").to_pylist()
    assert {r["id"] for r in rem} == {"edge/long_prompt"}
    eoa = T.special_ids(io.read_json(d / "tok" / "tokenizer_meta.json")).eoa
    seen = set()
    for t in shards(tmp_path / "pack"):
        for row in t.to_pylist():
            x = row["input_ids"]
            for s, n, p, sid in zip(row["sample_starts"], row["sample_lengths"], row["prompt_lengths"], row["sample_ids"]):
                if sid in one:
                    assert n == p + 2 and x[s + p : s + n] == tokd[sid]["response_ids"] and x[s + n - 1] == eoa
                    seen.add(sid)
    assert seen == one & used
    assert man["counts"]["rows_packed"] == man["counts"]["rows_in"] - 1

