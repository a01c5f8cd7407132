"""Condition tag lists ("synth,cot"): parsing, the tokenizer's ids (one token per tag, in the given
order, as the reference tokenizer), and the tokenizer stage's prompts and rejections."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from pipeline.config import TokenizerConfig
from pipeline.schema import check_condition, parse_condition
from pipeline.stages import tokenize as T

CONDITIONS = ["direct", "cot", "noisy", "synth"]


def test_parse_and_check_condition():
    assert parse_condition("cot") == ("cot",)
    assert parse_condition("synth,noisy,cot") == ("synth", "noisy", "cot")
    assert parse_condition(" synth , cot ") == ("synth", "cot")  # spaces around tags dropped
    assert parse_condition("cot,synth") == ("cot", "synth")  # the given order is kept (the reference's)
    for bad, msg in (("", "empty tag"), ("cot,", "empty tag"), (",cot", "empty tag"), ("cot,cot", "repeats")):
        with pytest.raises(ValueError, match=msg):
            parse_condition(bad)
    assert check_condition("synth, cot", CONDITIONS) == "synth,cot"
    with pytest.raises(ValueError, match=r"unknown tag\(s\) \['synthetic'\]"):
        check_condition("synthetic,cot", CONDITIONS)


def test_condition_tokens_refuse_separator():
    with pytest.raises(ValueError, match="invalid condition name"):
        T.special_tokens(["direct", "synth,cot"])


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cond")
    words = "the cat sat on a mat and then ran to 12 big red dogs who ate 345 apples".split()
    conds = ["cot", "direct", "synth,cot", "synth,direct", "noisy,direct", "synth,noisy,cot", " synth , cot"]
    rows = [{"id": f"r/{i}", "instruction": " ".join(words[i % 7:i % 7 + 6]), "response": words[i % 11],
             "condition": conds[i % len(conds)], "source": "r", "domain": "d"} for i in range(70)]
    rows += [{"id": "r/bad1", "instruction": "x", "response": "y", "condition": "synth,,cot", "source": "r",
              "domain": "d"},
             {"id": "r/bad2", "instruction": "x", "response": "y", "condition": "synth,maths", "source": "r",
              "domain": "d"}]
    src = d / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    man = T.run(src, d / "tok", TokenizerConfig(vocab_size=300, sample_rows=100), conditions=CONDITIONS, seed=3,
                progress=False)
    return d, rows, man


def test_condition_ids(tok_dir):
    d, _, _ = tok_dir
    _, meta = T.load_tokenizer(d / "tok")
    ids = T.Specials is T.SpecialIds and T.special_ids(meta)
    assert ids.conditions == {"direct": 4, "cot": 5, "noisy": 6, "synth": 7}
    assert ids.condition_ids("cot") == [5] == [ids.condition("cot")]
    assert ids.condition_ids("synth,cot") == [7, 5]
    assert ids.condition_ids("synth,noisy,cot") == [7, 6, 5]
    assert ids.condition_ids("cot,synth") == [5, 7]
    with pytest.raises(KeyError, match=r"tag\(s\) \['maths', 'proof'\]"):
        ids.condition_ids("synth,maths,proof")
    with pytest.raises(ValueError, match="repeats"):
        ids.condition_ids("cot,cot")


def test_stage_prompts_one_token_per_tag(tok_dir):
    d, rows, man = tok_dir
    tok, meta = T.load_tokenizer(d / "tok")
    ids = T.special_ids(meta)
    by_id = {r["id"]: r for r in rows}
    t = pq.read_table(d / "tok" / "tokenized.parquet").to_pylist()
    assert len(t) == 70
    seen = set()
    for rec in t:
        src = by_id[rec["id"]]
        tags = [x.strip() for x in src["condition"].split(",")]
        assert rec["condition"] == ",".join(tags)  # stored without spaces
        n = len(tags)
        p = rec["prompt_ids"]
        assert p[0] == ids.boq and p[1:1 + n] == [ids.conditions[x] for x in tags] and p[-1] == ids.eoq
        assert tok.decode(p[1 + n:-1], skip_special_tokens=False) == src["instruction"]
        seen.add(rec["condition"])
    assert {"synth,noisy,cot", "synth,cot", "cot"} <= seen
    c = man["counts"]
    assert c["removed_by_reason"] == {"bad_condition": 1, "unknown_condition": 1}
    rem = {r["id"]: r for r in pq.read_table(d / "tok" / "removals.parquet").to_pylist()}
    assert "empty tag" in rem["r/bad1"]["detail"] and "['maths']" in rem["r/bad2"]["detail"]


def test_pack_keeps_every_tag_in_the_prompt(tok_dir):
    from pipeline.config import MixConfig, PackConfig
    from pipeline.stages import mix, pack

    d, _, _ = tok_dir
    mix.run(d / "tok", d / "mix", MixConfig(), rules=[], seed=1, progress=False)
    man = pack.run(d / "tok", d / "mix", d / "pack", PackConfig(seq_len=64, shard_tokens=1024), progress=False)
    assert man["counts"]["rows_packed"] == 70
    prompts = {r["id"]: r["prompt_ids"] for r in pq.read_table(d / "tok" / "tokenized.parquet").to_pylist()}
    seen = 0
    for f in sorted((d / "pack").glob("shard-*.arrow")):
        for row in pack.read_shard(f).to_pylist():
            for s, p, sid in zip(row["sample_starts"], row["prompt_lengths"], row["sample_ids"]):
                assert p == len(prompts[sid]) and row["input_ids"][s:s + p] == prompts[sid]
                seen += 1
    assert seen == 70
