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


def test_end_to_end_with_clean_subset(trained, shared, tmp_path):
    import evaluation

    bench = shared / "data" / "benchmarks"
    # contamination items for the clean-subset scores (training rows: GSM8K train)
    C.run(trained / "tok", bench, tmp_path / "contam", C.ContaminationConfig(benchmarks=("gsm8k", "arc_challenge", "hellaswag", "drop")),
          progress=False)
    res = evaluation.run(trained / "ckpt", trained / "tok", bench, tmp_path / "eval", tasks=["arc_challenge", "gsm8k", "hellaswag", "drop"],
                         limit=6, contamination_items=tmp_path / "contam",
                         num_fewshot={"arc_challenge": 2, "hellaswag": 1, "drop": 1},
                         max_gen_toks=24)
    arc, gsm = res["tasks"]["arc_challenge"], res["tasks"]["gsm8k"]
    assert 0.0 <= arc["full"]["acc,none"] <= 1.0 and 0.0 <= arc["full"]["acc_norm,none"] <= 1.0
    assert 0.0 <= gsm["full"]["exact_match,strict-match"] <= 1.0
    assert 0.0 <= res["tasks"]["hellaswag"]["full"]["acc_norm,none"] <= 1.0
    assert 0.0 <= res["tasks"]["drop"]["full"]["f1,none"] <= 1.0
    for e in res["tasks"].values():
        sub = next(iter(e["subtasks"].values()))
        assert sub["unmatched_docs"] == 0 and sub["n_clean"] == 6  # every doc mapped back; all clean
        assert e["n"] == 6 and e["limited"] and e["n_total"] > 6  # --limit: items per benchmark
        assert e["clean"] == e["full"]
    assert arc["full"]["acc,none"] == pytest.approx(arc["harness_results"]["acc,none"])
    for f in ("results.json", "results.md", "lm_eval_arc_challenge.json", "samples_gsm8k.jsonl"):
        assert (tmp_path / "eval" / f).exists()
    md = (tmp_path / "eval" / "results.md").read_text()
    assert md.startswith("# LIMITED") and "| arc_challenge | 2 | 6 of 1172 | acc,none |" in md
