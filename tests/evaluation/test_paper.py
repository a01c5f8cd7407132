"""The paper's protocol (evaluation.paper): answer extraction and scoring on real GSM8K, MATH, ARC-C and
MMLU items with known answers, and the adapter's paper prompts (condition tags after BOQ, stripped
prompt, context budget, overlong prompts answered "")."""

from __future__ import annotations

import json

import datasets
import pytest
from lm_eval.api.instance import Instance

from evaluation import paper as P


def _rows(shared, name: str, split: str, n: int | None = None) -> list[dict]:
    lines = (shared / "data" / "benchmarks" / name / f"{split}.jsonl").read_text().split("\n")
    rows = [json.loads(x) for x in lines if x.strip()]
    return rows if n is None else rows[:n]


def _docs(hook, rows: list[dict]) -> list[dict]:
    """Real items through the task's process_docs hook (as lm-eval runs it)."""
    return list(hook(datasets.Dataset.from_list(rows)))


def test_gsm8k_boxed_answers_checked_by_math_verify(shared):
    docs = _docs(P.paper_gsm8k_process_docs, _rows(shared, "gsm8k", "test", 3))
    assert [d["paper_gold"] for d in docs] == ["18", "3", "70000"]  # Janet's ducks, robe bolts, house flip
    janet, _, house = docs

    def score(doc, text):
        return P.paper_boxed_process_results(doc, [text])["exact_match"]

    correct = ["She sells 16 - 3 - 4 = 9 eggs for 9 * 2 = 18 dollars.\n\\boxed{18}", "\\boxed{18.0}",
               "The answer is $\\boxed{\\$18}$.", "so \\boxed 18", "\\boxed{ 18 }",
               "first \\boxed{16}, corrected: \\boxed{18}",  # several: the last one
               "\\fbox{18}"]
    wrong = ["\\boxed{17}", "The answer is 18.",  # no \boxed{}: no answer
             "\\boxed{18} at first, but really \\boxed{16}", "\\boxed{18", "", "\\boxed{}"]
    assert [score(janet, t) for t in correct] == [1.0] * len(correct)
    assert [score(janet, t) for t in wrong] == [0.0] * len(wrong)
    assert score(house, "Profit: \\boxed{70,000}") == 1.0 and score(house, "\\boxed{70000}") == 1.0
    assert score(house, "\\boxed{7000}") == 0.0


def test_math_boxed_answers_with_nested_braces(shared):
    rows = _rows(shared, "math", "test", 12)
    docs = _docs(P.paper_math_process_docs, rows)
    polar, frac = docs[0], docs[2]  # (3, pi/2) and 14/3
    # the gold is the solution's last \boxed{}: the file's `answer` field is a damaged copy here
    assert rows[0]["answer"] == "\\le(3,\\frac{\\pi}{2}\\right)"
    assert polar["paper_gold"] == "\\left( 3, \\frac{\\pi}{2} \\right)" and frac["paper_gold"] == "\\frac{14}{3}"

    def score(doc, text):
        return P.paper_boxed_process_results(doc, [text])["exact_match"]

    assert score(polar, "So the point is $\\boxed{\\left(3,\\frac{\\pi}{2}\\right)}$.") == 1.0
    assert score(polar, "\\boxed{(3, \\frac{\\pi}{2})}") == 1.0
    assert score(polar, "\\boxed{(3, \\pi)}") == 0.0 and score(polar, "\\boxed{(3,\\frac{\\pi}{2}") == 0.0
    assert score(frac, "\\boxed{\\frac{14}{3}}") == 1.0 and score(frac, "\\boxed{\\dfrac{14}{3}}") == 1.0
    assert score(frac, "\\boxed{14/3}") == 1.0 and score(frac, "\\boxed{4.6}") == 0.0
    assert score(frac, "\\frac{14}{3}") == 0.0  # not boxed
    # every gold of these items is equal to itself through the same path (extraction + math_verify)
    assert all(score(d, f"\\boxed{{{d['paper_gold']}}}") == 1.0 for d in docs)


def test_last_boxed_forms():
    assert P.last_boxed("\\boxed{\\frac{1}{\\sqrt{2}}}") == "\\frac{1}{\\sqrt{2}}"
    assert P.last_boxed("x = \\boxed 5.") == "5" and P.last_boxed("\\boxed {12}") == "12"
    assert P.last_boxed("\\boxed{3} and \\boxed{4}") == "4"
    assert P.last_boxed("\\boxed{3} and \\boxed{4") is None and P.last_boxed("no box") is None
    assert P.last_boxed("\\boxedx{3}") is None


def test_multiple_choice_letters_on_arc_and_mmlu(shared):
    arc = _docs(P.paper_arc_process_docs, _rows(shared, "arc_challenge", "test", 4))
    assert [d["paper_gold"] for d in arc] == [r["answerKey"] for r in _rows(shared, "arc_challenge", "test", 4)]
    d = arc[0]  # gold C
    assert d["paper_gold"] == "C"
    text = P.paper_mc_text(d)
    assert text.startswith("Question: An astronomer observes") and text.endswith("\nD. Planetary gravity will "
                                                                                  "become stronger.\nAnswer:")

    def score(doc, out):
        return P.paper_mc_process_results(doc, [out])["exact_match"]

    for out in ("C", " C", "(C)", "C.", "C) Planetary days will become shorter.", "The answer is C.",
                "Answer: (C)", "**C**", "C\nbecause days are shorter"):
        assert score(d, out) == 1.0, out
    for out in ("B", "(B)", "The answer is B.", "", "Planetary days will become shorter.", "E", "c",
                "A cat", "I think the answer is B, not C"):
        assert score(d, out) == 0.0, out
    # numeric ARC labels (1-4) become letters by position
    numeric = [r for r in _rows(shared, "arc_challenge", "validation") if r["choices"]["label"][0] == "1"][0]
    nd = _docs(P.paper_arc_process_docs, [numeric])[0]
    assert nd["paper_gold"] == "ABCD"[numeric["choices"]["label"].index(numeric["answerKey"])]
    assert "\nA. " in P.paper_mc_text(nd) and "\n1. " not in P.paper_mc_text(nd)
    # MMLU: `answer` is the index
    mm = _docs(P.paper_mmlu_process_docs, _rows(shared, "mmlu", "test", 1))[0]
    assert mm["paper_gold"] == "B" and score(mm, "B") == 1.0 and score(mm, "(A)") == 0.0


def test_condition_of_the_paper_for_a_tokenizer_without_a_tag():
    assert P.resolve_condition("synth,cot", {"direct", "cot", "synth"}) == ("synth,cot", [])
    assert P.resolve_condition("synth,cot", {"direct", "cot"}) == ("cot", ["synth"])
    with pytest.raises(ValueError, match="no tag this tokenizer knows"):
        P.resolve_condition("synth", {"direct", "cot"})


def test_adapter_paper_prompts(trained):
    from evaluation.lm import HRMLM

    lm = HRMLM(str(trained / "ckpt"), tokenizer=str(trained / "tok"), batch_size=4, progress=False)
    ids = lm.ids
    q = "  Janet has 3 ducks and buys 4 more. How many ducks?\n\n"
    kw = {"until": [], "condition": "synth,cot", "max_context": 3072, "strip": True, "overlong": "empty",
          "max_gen_toks": 6}
    want_prompt = [ids.boq, ids.condition("synth"), ids.condition("cot"), *lm.encode(q.strip()), ids.eoq]
    assert lm.prompt_ids(q.strip(), condition="synth,cot") == want_prompt
    got = lm.generate_until([Instance("generate_until", {}, (q, kw), 0)])
    assert got == lm.generate_batch([want_prompt], [], 6)
    # the context budget: prompt + answer within min(max_context, the model's 512); no cap -> up to it
    tight = {**kw, "max_context": len(want_prompt) + 3, "max_gen_toks": None}
    assert lm.generate_until([Instance("generate_until", {}, (q, tight), 0)]) == lm.generate_batch([want_prompt], [], 3)
    # a prompt that does not fit is answered "" and counted (the reference), beside one that fits
    lm.overlong = 0
    long_q = "How many ducks? " * 400
    out = lm.generate_until([Instance("generate_until", {}, (long_q, kw), 0),
                             Instance("generate_until", {}, (q, kw), 1)])
    assert out == ["", got[0]] and lm.overlong == 1
    with pytest.raises(KeyError, match="noisy"):
        lm.generate_until([Instance("generate_until", {}, (q, {**kw, "condition": "noisy,cot"}), 0)])


def test_cli_protocol_choices(tmp_path, capsys):
    from evaluation.run import main, protocols_of

    assert protocols_of("both") == ["harness", "paper"] and protocols_of("paper") == ["paper"]
    with pytest.raises(ValueError, match="harness, paper or both"):
        protocols_of("reference")
    for argv, msg in ((["--online", "--protocol", "paper"], "reads local benchmark files"),
                      (["--protocol", "nope"], "invalid choice"), (["--max-gen-toks", "0"], "must be >= 1")):
        with pytest.raises(SystemExit):
            main(["--checkpoint", str(tmp_path), "--output", str(tmp_path / "o"), *argv])
        assert msg in capsys.readouterr().err
