"""End to end on CPU: a debug checkpoint trained a few steps on GSM8K (conftest.trained), evaluated
through lm-eval on small slices of the real local benchmarks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.stages import contamination as C


def test_adapter_loglikelihood_matches_direct_computation(trained):
    from lm_eval.api.instance import Instance

    from evaluation.lm import HRMLM

    lm = HRMLM(str(trained / "ckpt"), tokenizer=str(trained / "tok"), batch_size=3)
    reqs = [Instance("loglikelihood", {}, ("Question: 2+3?\nAnswer:", c), i) for i, c in enumerate([" 5", " 7 apples", " x"])]
    got = lm.loglikelihood(reqs)
    ids = lm.ids
    for (ctx, cont), (lp, _) in zip([r.args for r in reqs], got):
        p = [ids.boq, ids.condition("direct"), *lm.tok.encode(ctx, add_special_tokens=False).ids, ids.eoq]
        r = lm.tok.encode(cont[1:], add_special_tokens=False).ids
        x = torch.tensor([p + r])
        prm = torch.zeros_like(x, dtype=torch.bool)
        prm[0, : len(p)] = True
        with torch.no_grad():
            logp = F.log_softmax(lm.model(x, is_prompt=prm, attn_backend="sdpa").logits.float(), -1)[0]
        want = sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(r))
        assert lp == pytest.approx(want, abs=1e-4)
    # batching does not change scores; rolling loglikelihood is a finite negative number
    lm.batch_size = 1
    assert [x[0] for x in lm.loglikelihood(reqs)] == pytest.approx([x[0] for x in got], abs=1e-4)
    # one prefill per shared prompt (contexts of different lengths, 1-4 choices of 1-6 tokens, interleaved)
    # gives the scores and greedy flags of scoring every request on its own
    ctxs = ["Q: 1+1?\nA:", "Question: Natalia sold 48 clips in April and half as many in May. How many?\nAnswer:",
            "Which is larger, 7 or 9?"]
    conts = [[" 2"], [" 72", " 24 clips in May", " 48", " 96 and then some more"], [" 9", " seven"]]
    mixed = [Instance("loglikelihood", {}, (ctxs[c], conts[c][k]), n)
             for n, (c, k) in enumerate((c, k) for k in range(4) for c in range(3) if k < len(conts[c]))]
    lm.batch_size = 2
    shared_scores = lm.loglikelihood(mixed)
    lm.share_prompts = False
    alone = lm.loglikelihood(mixed)
    lm.share_prompts = True
    assert [x[0] for x in shared_scores] == pytest.approx([x[0] for x in alone], abs=1e-4)
    assert [x[1] for x in shared_scores] == [x[1] for x in alone]
    roll = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("Natalia sold clips.",), 0)])
    assert roll[0] < 0
    # generate_until honours until and max_gen_toks, cached and uncached agree (greedy)
    g = [Instance("generate_until", {}, ("Question: How many clips?\nAnswer:", {"until": ["\n\n"], "max_gen_toks": 12}), i)
         for i in range(3)]
    a = lm.generate_until(g)
    lm.use_cache = False
    assert lm.generate_until(g) == a and all("\n\n" not in x for x in a)


def test_end_to_end_both_protocols_with_clean_subset(trained, shared, tmp_path, capsys):
    """`hrm eval --protocol both` on a debug checkpoint: each task under lm-eval's standard protocol and the
    paper's, full and clean-subset scores for both, tables naming protocol, shots, condition and n."""
    import json

    from evaluation.run import main

    bench = shared / "data" / "benchmarks"
    # contamination items for the clean-subset scores (training rows: GSM8K train)
    C.run(trained / "tok", bench, tmp_path / "contam", C.ContaminationConfig(benchmarks=("gsm8k", "arc_challenge", "hellaswag", "drop")),
          progress=False)
    assert main(["--checkpoint", str(trained / "ckpt"), "--tokenizer", str(trained / "tok"), "--benchmarks", str(bench),
                 "--output", str(tmp_path / "eval"), "--tasks", "arc_challenge,gsm8k,hellaswag,drop", "--limit", "6",
                 "--contamination", str(tmp_path / "contam"), "--fewshot", "arc_challenge=2", "--fewshot", "hellaswag=1",
                 "--fewshot", "drop=1", "--max-gen-toks", "16", "--protocol", "both"]) == 0
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert res["protocol"] == "both"
    assert list(res["tasks"]) == ["arc_challenge", "gsm8k", "hellaswag", "drop",
                                  "arc_challenge_paper", "gsm8k_paper", "hellaswag_paper", "drop_paper"]
    arc, gsm = res["tasks"]["arc_challenge"], res["tasks"]["gsm8k"]
    assert 0.0 <= arc["full"]["acc,none"] <= 1.0 and 0.0 <= arc["full"]["acc_norm,none"] <= 1.0
    assert 0.0 <= gsm["full"]["exact_match,strict-match"] <= 1.0
    assert 0.0 <= res["tasks"]["hellaswag"]["full"]["acc_norm,none"] <= 1.0
    assert 0.0 <= res["tasks"]["drop"]["full"]["f1,none"] <= 1.0
    for key, e in res["tasks"].items():
        sub = next(iter(e["subtasks"].values()))
        assert sub["unmatched_docs"] == 0 and sub["n_clean"] == 6, key  # every doc mapped back; all clean
        assert e["n"] == 6 and e["limited"] and e["n_total"] > 6, key  # --limit: items per benchmark
        assert e["clean"] == e["full"], key
        assert e["protocol"] == ("paper" if key.endswith("_paper") else "harness")
    assert arc["full"]["acc,none"] == pytest.approx(arc["harness_results"]["acc,none"])
    # the paper's entries: generative metrics, its conditions (the tokenizer has synth), its shot counts
    p = {t: res["tasks"][f"{t}_paper"] for t in ("arc_challenge", "gsm8k", "hellaswag", "drop")}
    assert set(p["arc_challenge"]["full"]) == {"exact_match,none"} and set(p["drop"]["full"]) == {"em,none", "f1,none"}
    assert p["gsm8k"]["condition"] == "synth,cot" and not p["gsm8k"]["condition_missing_tags"]
    assert p["arc_challenge"]["condition"] == "direct" and p["arc_challenge"]["num_fewshot"] == 2
    assert p["gsm8k"]["num_fewshot"] == 0 and p["gsm8k"]["context"] == 512  # the debug model's max_seq_len
    samples = [json.loads(x) for x in (tmp_path / "eval" / "samples_gsm8k_paper.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(s["arguments"][0][1]["condition"] == "synth,cot" for s in samples)
    assert all(s["arguments"][0][0] == s["doc"]["question"].strip() for s in samples)  # 0-shot: the question
    arc_p = [json.loads(x) for x in (tmp_path / "eval" / "samples_arc_challenge_paper.jsonl").read_text().splitlines()]
    prompt = arc_p[0]["arguments"][0][0]
    assert prompt.count("\nAnswer:") == 3 and prompt.startswith("Question: ")  # 2 shots inside the instruction
    empty = sum(1 for s in arc_p if s["resps"][0][0] == "")
    assert p["arc_challenge"]["n_overlong"] <= empty
    for f in ("results.json", "results.md", "lm_eval_arc_challenge.json", "samples_gsm8k.jsonl",
              "lm_eval_gsm8k_paper.json"):
        assert (tmp_path / "eval" / f).exists()
    md = (tmp_path / "eval" / "results.md").read_text()
    assert md.startswith("# LIMITED") and "| arc_challenge | harness | 2 | direct | 6 of 1172 | acc,none |" in md
    assert "| gsm8k | paper | 0 | synth,cot | 6 of 1319 | exact_match,none |" in md
    assert "| drop | paper | 1 | direct | 6 of 1000 | f1,none |" in md
    assert md in capsys.readouterr().out  # the CLI prints the same table
