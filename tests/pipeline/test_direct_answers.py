"""Direct answers (a source's `emit: cot | direct | both`, data_io's cot/direct pairs): final-answer
extraction ("####" as GSM8K, \\boxed{} as MATH), direct conditions, and the normalize stage on real
GSM8K rows and on MATH-style rows whose answer cannot be found (counted, never dropped)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipeline.config import NormalizeConfig, RunSpec, SourceSpec
from pipeline.lineage import report_markdown
from pipeline.stages import ingest, normalize
from pipeline.stages.normalize import direct_condition, extract_answer, extract_boxed_answer, extract_hash_answer


def test_hash_answer():
    assert extract_hash_answer("3 + 4 = 7\n#### 7") == ("7", "")
    assert extract_hash_answer("a #### 1\n#### 1,200 ") == ("1,200", "")  # the last marker
    assert extract_hash_answer("no marker")[0] is None
    assert extract_hash_answer("#### ") == (None, "nothing after the last '####'")


@pytest.mark.parametrize("text, want", [
    (r"So $x = \boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),  # nested braces
    (r"$\boxed{\sqrt{2^{3}}}$", r"\sqrt{2^{3}}"),
    (r"First \boxed{1}, then \boxed{2}; finally $\boxed{\{3, 4\}}$", r"\{3, 4\}"),  # several: the last
    (r"hence $\boxed{\left\{ x \right.}$", r"\left\{ x \right."),  # escaped braces are text
    (r"The answer is $\boxed 5$.", "5"),  # \boxed without braces: up to '$'
    ("so \\boxed 12\nDone", "12"),  # ... or the end of the line
    (r"\fbox{B}", "B"),
    (r"\boxed{ 7 } and \fbox{8}", "8"),  # \fbox after \boxed: the last of either
])
def test_boxed_answer(text, want):
    assert extract_boxed_answer(text) == (want, "")
    assert extract_answer(text, "auto") == (want, "")


@pytest.mark.parametrize("text, why", [
    ("The answer is 5.", "no \\boxed{...}"),
    (r"$\boxed{\frac{1}{2}$", "unbalanced braces"),
    (r"$\boxed{}$", "empty \\boxed{}"),
    (r"\boxed{1} then \boxed{", "unbalanced"),  # the last one decides, as the reference
    (r"\boxedx", "neither"),
])
def test_boxed_answer_failures(text, why):
    ans, msg = extract_boxed_answer(text)
    assert ans is None and why in msg


def test_answer_formats():
    both = r"We get \boxed{3}. #### 4"
    assert extract_answer(both, "auto") == ("4", "")  # auto: '####' first
    assert extract_answer(both, "boxed") == ("3", "")
    assert extract_answer(r"\boxed{3}", "hash")[0] is None


def test_direct_condition():
    assert direct_condition("cot") == "direct"
    assert direct_condition("synth,cot") == "synth,direct"
    assert direct_condition("synth,noisy,cot") == "synth,noisy,direct"
    assert direct_condition("synth") == "synth,direct"
    assert direct_condition("noisy,direct") == "noisy,direct"


def test_spec_checks_tags_and_emit():
    src = {"name": "m", "kind": "local", "path": "x.jsonl", "condition": "synth,cot", "emit": "both"}
    RunSpec(name="s", sources=[src])
    with pytest.raises(ValidationError, match=r"unknown tag\(s\) \['synthetic'\]"):
        RunSpec(name="s", sources=[{**src, "condition": "synthetic,cot"}])
    with pytest.raises(ValidationError, match="needs the tag 'direct'"):
        RunSpec(name="s", sources=[{**src, "condition": "cot"}], normalize={"conditions": ["cot"]})
    with pytest.raises(ValidationError, match="single tags"):
        RunSpec(name="s", sources=[src], normalize={"conditions": ["cot", "synth,cot"]})
    with pytest.raises(ValidationError, match="emit"):
        SourceSpec(name="m", kind="local", path="x", emit="answers")


def _gsm(path, **kw) -> SourceSpec:
    return SourceSpec(name="gsm8k", kind="local", path=str(path), domain="math",
                      fields={"instruction": "question", "response": "answer"}, **kw)


def test_gsm8k_emit_direct_and_both(tmp_path, gsm8k_train):
    raw = [json.loads(x) for x in gsm8k_train.read_text().splitlines()]
    src = _gsm(gsm8k_train, condition="synth,cot")
    ingest.run([src], tmp_path / "ingest", progress=False)
    cfg = NormalizeConfig()

    # both: every row and its direct copy, the copy's answer the text after '####'
    both = src.model_copy(update={"emit": "both"})
    man = normalize.run(tmp_path / "ingest", tmp_path / "both", [both], cfg, progress=False)
    c = man["counts"]["per_source"]["gsm8k"]
    assert c == {"in": 7473, "kept": 2 * 7473, "rejected": 0, "reasons": {}, "emit": "both", "direct_copies": 7473}
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "both" / "rows.parquet").to_pylist()}
    cot, direct = rows["gsm8k/1"], rows["gsm8k/1#direct"]
    assert cot["response"].endswith("#### 72") and cot["condition"] == "synth,cot"
    assert direct == {**cot, "id": "gsm8k/1#direct", "response": "72", "condition": "synth,direct"}
    for i, r in enumerate(raw, start=1):  # every answer: the text after GSM8K's '#### '
        assert rows[f"gsm8k/{i}#direct"]["response"] == r["answer"].split("#### ")[1].strip()

    # direct: the row itself (same id) with the final answer only, as data_io's gsm8k_train
    only = src.model_copy(update={"emit": "direct", "condition": "cot"})
    man = normalize.run(tmp_path / "ingest", tmp_path / "direct", [only], cfg, progress=False)
    assert man["counts"]["kept"] == 7473 and man["counts"]["per_source"]["gsm8k"]["direct_copies"] == 0
    t = pq.read_table(tmp_path / "direct" / "rows.parquet").to_pylist()
    assert t[0]["id"] == "gsm8k/1" and t[0]["response"] == "72" and {r["condition"] for r in t} == {"direct"}

    # the default (cot) is today's output: the per-source counts carry no emit fields
    man = normalize.run(tmp_path / "ingest", tmp_path / "cot", [src], cfg, progress=False)
    assert man["counts"]["per_source"]["gsm8k"] == {"in": 7473, "kept": 7473, "rejected": 0, "reasons": {}}


def test_math_rows_without_an_answer_are_counted(tmp_path):
    rows = [{"problem": "Half of 1?", "solution": r"It is $\boxed{\frac{1}{2}}$."},
            {"problem": "Say hi.", "solution": "Hi there, no box here."},
            {"problem": "Set?", "solution": r"$\boxed{\{1,2\}}$ and $\boxed{\{1"},
            {"problem": "Five?", "solution": r"$\boxed 5$"}]
    f = tmp_path / "math.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = SourceSpec(name="math", kind="local", path=str(f), condition="cot", emit="both",
                     answer_format="boxed", fields={"instruction": "problem", "response": "solution"})
    ingest.run([src], tmp_path / "ingest", progress=False)
    man = normalize.run(tmp_path / "ingest", tmp_path / "norm", [src], NormalizeConfig(), progress=False)
    c = man["counts"]["per_source"]["math"]
    assert (c["in"], c["direct_copies"], c["kept"], c["rejected"]) == (4, 4, 6, 2)
    assert c["in"] + c["direct_copies"] == c["kept"] + c["rejected"]
    assert c["reasons"] == {"no_final_answer": 2}
    kept = {r["id"]: r["response"] for r in pq.read_table(tmp_path / "norm" / "rows.parquet").to_pylist()}
    assert kept["math/1#direct"] == r"\frac{1}{2}" and kept["math/4#direct"] == "5"
    assert "math/2" in kept and "math/2#direct" not in kept  # the cot row stays
    rej = {r["id"]: r for r in pq.read_table(tmp_path / "norm" / "rejects.parquet").to_pylist()}
    assert set(rej) == {"math/2#direct", "math/3#direct"}
    assert rej["math/2#direct"]["detail"].startswith("math.jsonl:2: direct copy of math/2: no \\boxed{...}")
    assert "unbalanced braces" in rej["math/3#direct"]["detail"]
    # emit direct: the row itself is rejected when its answer is missing
    only = src.model_copy(update={"emit": "direct"})
    man = normalize.run(tmp_path / "ingest", tmp_path / "only", [only], NormalizeConfig(), progress=False)
    assert man["counts"]["kept"] == 2 and man["counts"]["reasons"] == {"no_final_answer": 2}
    rej = pq.read_table(tmp_path / "only" / "rejects.parquet").column("id").to_pylist()
    assert rej == ["math/2", "math/3"]


def test_lineage_report_shows_direct_copies():
    summary = {"rows_stratified": 3, "rows_packed": 3, "rows_removed": 0, "balanced": True, "per_stratum": {},
               "per_source": {"math": {"ingested": 2, "direct_copies": 2, "rejected_at_normalize":
                                       {"no_final_answer": 1}, "stratified": 3, "packed": 3, "removed": 0}}}
    md = report_markdown(summary)
    assert "| math | 2 (+2 direct copies) | 1 (no_final_answer 1) | 3 | 3 |" in md
