"""The paper's evaluation protocol (HRM-Text `evaluation/`), as lm-eval task hooks.

The reference scores every benchmark generatively with its own engine: the prompt is stripped and
encoded as [BOQ][condition tags] prompt [EOQ], decoded greedily until [EOA] or until prompt + answer
fill the context (a prompt that does not fit gives an empty answer), and the answer text is scored.
Its settings (config/hrm_benchmarking.yaml): condition `synth,cot` with a 3,072-token context by
default; DROP `direct`; MMLU, ARC and HellaSwag `direct` with a 4,096-token context, MMLU's
high_school_european_history at 3 shots (its 5-shot prompt does not fit). `PAPER` holds them per task.

| task          | shots | condition | context | answer                                   | metric          |
|---------------|-------|-----------|---------|------------------------------------------|-----------------|
| mmlu          | 5     | direct    | 4096    | the choice letter (`extract_choice`)     | exact_match     |
| arc_challenge | 25    | direct    | 4096    | the choice letter                        | exact_match     |
| hellaswag     | 10    | direct    | 4096    | the choice letter                        | exact_match     |
| drop          | 3     | direct    | 3072    | the text                                 | em, f1 (DROP's) |
| gsm8k         | 0     | synth,cot | 3072    | the last \\boxed{} (`last_boxed`)         | exact_match     |
| minerva_math  | 0     | synth,cot | 3072    | the last \\boxed{}                        | exact_match     |

Prompts (the reference's benchmark classes are not public; these are ours, in the common formats).
Few-shot examples are inside the instruction: the harness's few-shot context (examples joined by a
blank line, each `text + " " + answer`, then the item's text), sampled `first_n` (the first k of the
few-shot split, the evaluated item left out when the split is the evaluated one):
- multiple choice (MMLU: "The following are multiple choice questions (with answers) about
  <subject>." first; ARC: "Question: " before the question; HellaSwag: the harness's cleaned
  "activity: context"):

      <question>
      A. <option>
      B. <option>
      ...
      Answer:            (a few-shot example continues " B")

- DROP: "Passage: <passage>\\nQuestion: <question>\\nAnswer:" (examples: the first gold answer's spans,
  comma-separated), scored by the harness's DROP em/F1 (best over the gold answers).
- GSM8K and MATH: the question alone (0-shot; the `cot` condition asks for the worked solution, as
  the training data's solutions end in \\boxed{}); the last \\boxed{...} (or `\\boxed 5`, `\\fbox{}`) of
  the answer is compared with the gold answer (GSM8K: the number after "####"; MATH: the solution's
  last \\boxed{}, see math_gold) by `math_verify` (numbers, fractions, expressions, sets and intervals
  by value). No \\boxed{} in the answer: wrong.

`extract_choice`: the letter the answer starts with ("B", "(B)", "B.", "B) text", "**B**"), else the
last "answer is B" / "Answer: (B)" in it; anything else is no answer (wrong).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

LETTERS = "ABCDEFGHIJ"


@dataclass(frozen=True)
class PaperTask:
    condition: str
    max_context: int
    answer: str  # what is scored, for the tables

    @property
    def generative_cot(self) -> bool:
        return "cot" in self.condition.split(",")


PAPER = {
    "mmlu": PaperTask("direct", 4096, "generated letter"),
    "arc_challenge": PaperTask("direct", 4096, "generated letter"),
    "hellaswag": PaperTask("direct", 4096, "generated letter"),
    "drop": PaperTask("direct", 3072, "generated text (DROP em/f1)"),
    "gsm8k": PaperTask("synth,cot", 3072, "CoT, last \\boxed{} by math_verify"),
    "minerva_math": PaperTask("synth,cot", 3072, "CoT, last \\boxed{} by math_verify"),
}
MMLU_SHOTS = {"high_school_european_history": 3}  # the reference's special_shots (at the default 5)


def resolve_condition(wanted: str, known: set[str] | list[str]) -> tuple[str, list[str]]:
    """(the condition to prompt with, the tags left out): the paper's tags this tokenizer has, in order.
    A tokenizer without `synth` (e.g. the demo's) prompts GSM8K/MATH with `cot` alone; the result
    records what was used. No known tag at all is an error."""
    from pipeline.schema import parse_condition

    tags = parse_condition(wanted)
    kept = [t for t in tags if t in known]
    if not kept:
        raise ValueError(f"evaluation: the paper's condition {wanted!r} has no tag this tokenizer knows "
                         f"(its conditions: {sorted(known)})")
    return ",".join(kept), [t for t in tags if t not in known]


# ------------------------------------------------------------------------------------------------
# answer extraction and scoring
# ------------------------------------------------------------------------------------------------
# a leading letter: alone, or before punctuation, a line break or a capitalised word ("A cat ..." is not)
_LEAD = re.compile(r"^[*_]*\(?([A-J])\)?[*_]*(?=$|[.,:;)!]|\s*\n|\s+[^a-z\s])")
_SAID = re.compile(r"(?i:answer)(?:\s+(?i:is)|\s*:)[\s:]*[*_]*\(?([A-J])\)?(?![A-Za-z])")


def extract_choice(text: str, n_options: int = 4) -> str | None:
    """The choice letter of a generated answer (see the module docstring), or None."""
    valid = LETTERS[:n_options]
    m = _LEAD.match(text.strip())
    if m and m.group(1) in valid:
        return m.group(1)
    said = [g for g in _SAID.findall(text) if g in valid]
    return said[-1] if said else None


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (nested braces kept), `\\boxed 5` or \\fbox{...}; None without one
    (or with an unclosed brace)."""
    starts = [m.start() for m in re.finditer(r"\\(?:boxed|fbox)(?![A-Za-z])", text)]
    if not starts:
        return None
    k = starts[-1]
    rest = text[k:]
    rest = rest[len("\\boxed"):] if rest.startswith("\\boxed") else rest[len("\\fbox"):]
    if rest.lstrip(" ").startswith("{"):
        rest = rest.lstrip(" ")
        depth = 0
        for i, ch in enumerate(rest):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return rest[1:i].strip()
        return None
    m = re.match(r"\s+([^\s$]+)", rest)  # \boxed 5
    return m.group(1).rstrip(".,;") if m else None


def gsm8k_gold(answer: str) -> str:
    """The final number of a GSM8K worked solution (after "####", thousands commas removed)."""
    if "####" not in answer:
        raise ValueError(f"gsm8k: answer without '####': {answer[-80:]!r}")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def math_gold(doc: dict) -> str:
    """A MATH item's gold answer: its solution's last \\boxed{} (the original answer), else its `answer`
    field. The local file's `answer` is a normalised copy that is sometimes wrong ("\\left(" cut to
    "\\le(", "3, 5, 7" to "357", an equation to its right side), so it is only the fallback."""
    g = last_boxed(doc.get("solution") or "")
    if g is not None:
        return g
    if doc.get("answer"):
        return str(doc["answer"])
    raise ValueError(f"math: item without a \\boxed{{}} solution or an answer field: {doc.get('problem', '')[:80]!r}")


_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")


def math_equal(pred: str | None, gold: str) -> bool:
    """math_verify's equivalence of a predicted and a gold answer (LaTeX or plain); None/empty: False.
    Runs with math_verify's timeouts on the main thread, without them elsewhere (Prefect runs tasks in
    worker threads, where its signal-based timeout cannot be used)."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    if pred is None or not pred.strip():
        return False
    pred = pred.strip()
    if _THOUSANDS.match(pred):
        pred = pred.replace(",", "")
    main = threading.current_thread() is threading.main_thread()
    t = 5 if main else None
    cfg = [LatexExtractionConfig(), ExprExtractionConfig()]
    g = parse(f"${gold}$", cfg, parsing_timeout=t)
    p = parse(f"${pred}$", cfg, parsing_timeout=t)
    if not g or not p:  # not parseable: the same text
        return _squash(pred) == _squash(gold)
    return bool(verify(g, p, timeout_seconds=t))


def _squash(s: str) -> str:
    return re.sub(r"\s+", "", s).rstrip(".")


# ------------------------------------------------------------------------------------------------
# lm-eval hooks (named in the task YAMLs that evaluation.tasks writes)
# ------------------------------------------------------------------------------------------------
def _letter_of(i: int) -> str:
    return LETTERS[i]


def paper_mmlu_process_docs(dataset):
    return dataset.map(lambda d: {"paper_question": d["question"].strip(), "paper_options": list(d["choices"]),
                                  "paper_gold": _letter_of(int(d["answer"]))})


def paper_arc_process_docs(dataset):
    def _one(d):
        labels = list(d["choices"]["label"])
        if d["answerKey"] not in labels:
            raise ValueError(f"arc: item {d.get('id')}: answerKey {d['answerKey']!r} not among labels {labels}")
        return {"paper_question": "Question: " + d["question"].strip(), "paper_options": list(d["choices"]["text"]),
                "paper_gold": _letter_of(labels.index(d["answerKey"]))}

    return dataset.map(_one)


def paper_hellaswag_process_docs(dataset):
    from evaluation.tasks import _harness_fn

    clean = _harness_fn("hellaswag", "preprocess")

    def _one(d):
        ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize()
        return {"paper_question": clean(d["activity_label"] + ": " + ctx),
                "paper_options": [clean(e) for e in d["endings"]], "paper_gold": _letter_of(int(d["label"]))}

    return dataset.map(_one)


def paper_mc_text(doc) -> str:
    opts = "\n".join(f"{_letter_of(i)}. {o}" for i, o in enumerate(doc["paper_options"]))
    return f"{doc['paper_question']}\n{opts}\nAnswer:"


def paper_mc_target(doc) -> str:
    return doc["paper_gold"]


def paper_mc_process_results(doc, results) -> dict[str, float]:
    return {"exact_match": float(extract_choice(results[0], len(doc["paper_options"])) == doc["paper_gold"])}


def paper_drop_text(doc) -> str:
    return f"Passage: {doc['passage'].strip()}\nQuestion: {doc['question'].strip()}\nAnswer:"


def paper_drop_target(doc) -> str:
    return ", ".join(doc["answer"])


def paper_drop_process_results(doc, results) -> dict[str, float]:
    from evaluation.tasks import drop_process_results

    return drop_process_results(doc, [results[0].strip()])


def paper_gsm8k_process_docs(dataset):
    return dataset.map(lambda d: {"paper_gold": gsm8k_gold(d["answer"])})


def paper_math_process_docs(dataset):
    return dataset.map(lambda d: {"paper_gold": math_gold(d)})


def paper_gsm8k_text(doc) -> str:
    return doc["question"].strip()


def paper_math_text(doc) -> str:
    return doc["problem"].strip()


def paper_gold_target(doc) -> str:
    return doc["paper_gold"]


def paper_boxed_process_results(doc, results) -> dict[str, float]:
    return {"exact_match": float(math_equal(last_boxed(results[0]), doc["paper_gold"]))}


HOOKS = [n for n in list(globals()) if n.startswith("paper_")]
