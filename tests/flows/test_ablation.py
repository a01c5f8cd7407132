"""The ablation ladder flow end to end on the tiny preset (real Prefect, real training child processes,
real lm-eval), then an unchanged rerun that reuses every rung; plus the budget planner."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.ablation_flow import RUNG_NAMES, ablation, plan_rungs, preset_settings
from pipeline.runs import read_run

sys.path.insert(0, str(Path(__file__).parent))
from tiny_spec import TINY  # noqa: E402


@pytest.fixture(scope="module")
def ladder(tmp_path_factory):
    d = tmp_path_factory.mktemp("ablation")
    spec = d / "tiny.yaml"
    spec.write_text(TINY)
    with prefect_test_harness(server_startup_timeout=120):
        first = ablation(spec=str(spec), output_dir=str(d / "run"), preset="tiny")
        stamps = {p: p.stat().st_mtime_ns for p in (d / "run" / "ablation").rglob("*.safetensors")}
        again = ablation(spec=str(spec), output_dir=str(d / "run"), preset="tiny")
    return d / "run", first, again, stamps


def test_four_rungs_from_real_runs(ladder):
    root, res, _, _ = ladder
    rows = res["rungs"]
    assert [r["name"] for r in rows] == list(RUNG_NAMES)
    assert [(r["arch"], r["loss"], r["mask"]) for r in rows] == [
        ("transformer", "full", "causal"), ("transformer", "answer", "causal"), ("transformer", "answer", "prefix"),
        ("hrm", "answer", "prefix")]
    assert len({r["params"] for r in rows}) == 1  # matched parameter count
    for r in rows:
        cfg = json.loads((Path(r["train_dir"]) / "final" / "raw" / "config.json").read_text())["config"]
        assert (cfg["arch"], cfg["loss"], cfg["mask"]) == (r["arch"], r["loss"], r["mask"])
        assert r["steps"] == 3 and r["train_tokens"] == 3 * 2 * 256  # the token budget, same shards
        assert r["train_flops"] > 0 and math.isfinite(r["final_train_loss"]) and math.isfinite(r["heldout_answer_loss"])
        assert r["scores"]["demo_heldout"]["n"] == 3 and 0 <= r["scores"]["demo_heldout"]["value"] <= 1
        assert len(r["metrics"]) == 3
    full, answer = rows[0], rows[1]
    # the full-LM-loss rung's objective covers prompt tokens too; its answer-token loss is logged beside it
    assert full["final_train_loss"] != full["final_train_answer_loss"]
    assert answer["final_train_loss"] == answer["final_train_answer_loss"]
    # the HRM spends more FLOPs per token, and the report says so
    assert rows[3]["flops_per_token"] > 2 * rows[2]["flops_per_token"]
    assert any("FLOPs per token" in n for n in res["notes"])
    html = (root / "ablation" / "report.html").read_text()
    assert html.count("<svg") >= 4 + 4 + 1 and "+ HRM architecture" in html
    assert json.loads((root / "ablation" / "summary.json").read_text())["rungs"][3]["name"] == "hrm"
    assert read_run(root)["ablation"]["report"] == "ablation/report.html"
    assert read_run(root).get("train") is None  # the rungs do not pose as the run's training


def test_diagnostics_are_proper(ladder):
    _, res, _, _ = ladder
    for r in res["rungs"]:
        lens, ent = r["logit_lens"], r["attention_entropy"]
        if r["arch"] == "hrm":
            assert lens["states"] == ["L0", "L1", "L2", "H0", "L3", "L4", "L5", "H1"]
            assert ent["states"] == [f"{c}.{i}" for c in lens["states"] for i in range(2)]
        else:
            assert lens["states"] == ent["states"] == [f"layer{i}" for i in range(4)]
        assert all(0 <= p <= 1 for p in lens["p_final"]) and all(k >= 0 for k in lens["kl"])
        assert lens["kl"][-1] == pytest.approx(0, abs=1e-5)  # the last state is the model's output
        for part in ("prompt", "answer"):
            assert all(0 <= e <= ent["log_T_max"] + 1e-6 for e in ent[part])


def test_rerun_reuses_every_rung(ladder):
    root, first, again, stamps = ladder
    assert stamps and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    strip = lambda s: [{k: v for k, v in r.items()} for r in s["rungs"]]  # noqa: E731
    assert strip(first) == strip(again)


def test_flop_matched_plan_gives_transformers_more_tokens(ladder):
    root, res, _, _ = ladder
    s, _ = preset_settings("tiny", budget_tokens=10 * 2 * 256, match="flops")
    plan = plan_rungs(res["pack"], s)
    assert plan["hrm"]["tokens"] == 10 * 2 * 256
    for r in ("transformer-full", "transformer-answer", "transformer-prefix"):
        assert plan[r]["tokens"] > 2 * plan["hrm"]["tokens"]
        assert plan[r]["est_flops"] == pytest.approx(plan["hrm"]["est_flops"], rel=0.15)
    by_flops = plan_rungs(res["pack"], preset_settings("tiny", budget_flops=1e11)[0])
    assert all(p["est_flops"] == pytest.approx(1e11, rel=0.1) for p in by_flops.values()), by_flops
