"""The paper's ablation ladder as one Prefect flow (`hrm ablation SPEC`, deployment hrm-pipeline/ablation).

    Transformer, full causal LM loss -> + answer-only loss -> + PrefixLM mask -> + HRM architecture

Given a data spec (its data flow runs, or its run folder's cached stages are reused) and a compute
budget, the four rungs train on the same pack with the same parameter count (the Transformer stacks
the HRM's num_layers blocks in one stack: same embedding, blocks and head), the same optimizer, seed and
data order, and are evaluated with the same tasks and protocol (demo_heldout by default; the benchmark
files given). The HRM runs 8 module calls per token (4x the block forwards of the Transformer) and
backpropagates through 5 of them, so at matched tokens it spends about 3x the FLOPs: the table says so,
and `match="flops"` gives the Transformers as many tokens as make their FLOPs equal the HRM's.

Per rung, under <run>/ablation/:
    train/<rung>/<version>/   the train folder (flows.pipeline_flow.train_task: `python -m training` in a
                              child process, content-addressed, cached, resumed)
    eval/<version>/           lm-eval scores (flows.pipeline_flow.evaluate_task)
    diag/<version>/           diagnostics.json: held-out answer-token loss (teacher forced), the logit lens
                              across the recurrent steps and the attention entropy per layer / module call
    summary.json, report.html the table like the paper's and the plots (inline SVG)

Reruns reuse every cached rung (train, eval and diagnostics are keyed by content hashes).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Literal, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field

from pipeline.checks import require_ok
from pipeline.io import code_hash, sha256_file, sha256_json
from pipeline.runs import RUN_MANIFEST, read_run, run_lock, update_run
from pipeline.spec import load_spec

from .data_flow import _run, artifact_key, contamination_settings, plan_stages, run_label
from .pipeline_flow import (EvalSettings, KeyedOn, TrainSettings, _read_metrics, _upstream_pack, eval_key,
                            evaluate_task, train_key, train_task)

# (name, short label, title, arch, loss, mask): the paper's ladder, in order
RUNGS: tuple[tuple[str, str, str, str, str, str], ...] = (
    ("transformer-full", "T full LM", "Transformer, full causal LM loss", "transformer", "full", "causal"),
    ("transformer-answer", "T answer", "+ answer-only loss", "transformer", "answer", "causal"),
    ("transformer-prefix", "T PrefixLM", "+ PrefixLM mask", "transformer", "answer", "prefix"),
    ("hrm", "HRM", "+ HRM architecture", "hrm", "answer", "prefix"),
)
RUNG_NAMES = tuple(r[0] for r in RUNGS)
DIAG_CODE = ("model.diagnostics", "model.hrm", "model.layers")


class AblationSettings(BaseModel):
    """How each rung trains (the same for all four) and what the budget is."""

    model_config = ConfigDict(extra="forbid")
    preset: Literal["debug", "cpu-small", "B", "L", "XL", "XXL"] = "cpu-small"
    budget_tokens: int = Field(131_072, ge=1, description="training tokens (packed positions) of each rung "
                                                           "(the HRM's when match=flops)")
    budget_flops: Optional[float] = Field(None, gt=0, description="instead: training FLOPs of each rung "
                                                                   "(each trains as many steps as fit)")
    match: Literal["tokens", "flops"] = Field("tokens", description="tokens: every rung sees the same tokens "
                                              "(the HRM spends ~3x the FLOPs); flops: the Transformers get more "
                                              "tokens, to the HRM's FLOPs")
    micro_batch_size: int = Field(4, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(12, ge=0)
    seed: int = 1234
    engine: Literal["deepspeed", "torch"] = "deepspeed"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    num_gpus: int = Field(1, ge=1)
    save_every: int = Field(0, ge=0)
    extra_args: list[str] = Field(default_factory=list, description="more `hrm train` flags for every rung")
    rungs: list[Literal["transformer-full", "transformer-answer", "transformer-prefix", "hrm"]] = Field(
        default_factory=lambda: list(RUNG_NAMES), description="the rungs to run (default: all four)")
    diag_prompts: int = Field(40, ge=1, description="held-out prompts for the logit lens and attention entropy")
    diag_batch_size: int = Field(4, ge=1)


# Named presets: the CPU default (this 2-core machine, < 20 min on the demo), a GPU run, and the
# tests' tiny one.
ABLATION_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(settings=dict(preset="cpu-small", budget_tokens=131_072, micro_batch_size=4, lr=1e-3,
                              warmup_steps=12),
                evaluation=dict(limit=100, max_gen_toks=96, batch_size=16, checkpoint="raw")),
    "gpu": dict(settings=dict(preset="B", budget_tokens=2_000_000_000, micro_batch_size=16, grad_accum=8,
                              lr=2.2e-4, warmup_steps=2000, precision="bf16", save_every=1000, diag_prompts=200,
                              diag_batch_size=16),
                evaluation=dict(limit=None, max_gen_toks=512, batch_size=32, checkpoint="ema")),
    "tiny": dict(settings=dict(preset="debug", budget_tokens=3 * 2 * 256, micro_batch_size=2, lr=1e-3,
                               warmup_steps=1, diag_prompts=4, engine="torch"),
                 evaluation=dict(limit=3, max_gen_toks=8, batch_size=8, checkpoint="raw")),
}


def preset_settings(name: str, **overrides: Any) -> tuple[AblationSettings, EvalSettings]:
    if name not in ABLATION_PRESETS:
        raise ValueError(f"unknown ablation preset {name!r}; choose one of {sorted(ABLATION_PRESETS)}")
    p = ABLATION_PRESETS[name]
    return AblationSettings(**{**p["settings"], **overrides}), EvalSettings(**p["evaluation"])


# ------------------------------------------------------------------------------------------------
# the plan: steps per rung from the budget, and the FLOPs they cost
# ------------------------------------------------------------------------------------------------
def rung_train_settings(rung: str, s: AblationSettings, steps: int) -> TrainSettings:
    _, _, _, arch, loss, mask = RUNGS[RUNG_NAMES.index(rung)]
    return TrainSettings(preset=s.preset, arch=arch, steps=steps, warmup_steps=min(s.warmup_steps, max(steps - 1, 0)),
                         micro_batch_size=s.micro_batch_size, grad_accum=s.grad_accum, lr=s.lr, seed=s.seed,
                         save_every=s.save_every, engine=s.engine, precision=s.precision, num_gpus=s.num_gpus,
                         extra_args=["--model-set", f"loss={loss}", "--model-set", f"mask={mask}", *s.extra_args])


def _model_cfg(rung: str, s: AblationSettings, vocab: int | None, seq_len: int):
    from model import ModelConfig

    _, _, _, arch, loss, mask = RUNGS[RUNG_NAMES.index(rung)]
    over: dict[str, Any] = dict(arch=arch, loss=loss, mask=mask)
    if vocab:
        over["vocab_size"] = vocab
    cfg = ModelConfig.preset(s.preset, **over)
    return cfg.replace(max_seq_len=seq_len) if seq_len > cfg.max_seq_len else cfg


def flops_per_step(cfg, s: AblationSettings, seq_len: int, steps: int) -> float:
    """Estimated training FLOPs of one optimizer step (causal attention pairs; the HRM averaged over its
    bp warmup schedule of `steps` steps). The trainer counts the real ones (metrics.jsonl)."""
    from model import bp_schedule, count_flops

    B = s.micro_batch_size * s.grad_accum * s.num_gpus
    if cfg.arch != "hrm":
        return count_flops(cfg, B, seq_len).total
    n = max(steps, 1)
    probe = range(0, n, max(1, n // 50))
    return sum(count_flops(cfg, B, seq_len, bp=bp_schedule(i, n)).total for i in probe) / len(probe)


def plan_rungs(pack_dir: str, s: AblationSettings) -> dict[str, dict]:
    """rung -> {steps, tokens, est_flops, params}: the steps that spend the budget as `match` says."""
    from model import build_model
    from training.data import PackedShards
    from training.records import data_record
    from training.train import tokenizer_vocab

    seq_len = PackedShards(pack_dir, verify=False).seq_len
    vocab = tokenizer_vocab(data_record(pack_dir)["tokenizer_dir"])
    tokens_per_step = s.micro_batch_size * s.grad_accum * s.num_gpus * seq_len
    cfgs = {r: _model_cfg(r, s, vocab, seq_len) for r in s.rungs}
    base_steps = max(1, s.budget_tokens // tokens_per_step)
    steps: dict[str, int] = {}
    if s.budget_flops:
        for r, c in cfgs.items():
            n = max(1, int(s.budget_flops // flops_per_step(c, s, seq_len, base_steps)))
            # the HRM's FLOPs per step follow its bp warmup over the run's own length: refine once
            steps[r] = max(1, int(s.budget_flops // flops_per_step(c, s, seq_len, n)))
    elif s.match == "flops":
        hrm = _model_cfg("hrm", s, vocab, seq_len)
        target = base_steps * flops_per_step(hrm, s, seq_len, base_steps)
        for r, c in cfgs.items():
            steps[r] = base_steps if c.arch == "hrm" else max(1, round(target / flops_per_step(c, s, seq_len, base_steps)))
    else:
        steps = {r: base_steps for r in cfgs}
    import torch

    out = {}
    for r, c in cfgs.items():
        with torch.device("meta"):
            params = build_model(c).num_parameters()
        out[r] = {"steps": steps[r], "tokens": steps[r] * tokens_per_step, "seq_len": seq_len, "vocab": vocab,
                  "est_flops": steps[r] * flops_per_step(c, s, seq_len, steps[r]), "params": params,
                  "tokens_per_step": tokens_per_step}
    return out


# ------------------------------------------------------------------------------------------------
# diagnostics of one trained rung
# ------------------------------------------------------------------------------------------------
def heldout_items(path: Path | None = None) -> list[dict]:
    from evaluation.heldout import HELDOUT_DIR, NAME

    p = path or Path(HELDOUT_DIR) / NAME / "test.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def diag_prompts(items: list[dict], n: int) -> list[dict]:
    """n items, taken round-robin over the held-out subtasks (the first of each, then the second, ...)."""
    by: dict[str, list[dict]] = {}
    for it in items:
        by.setdefault(it["task"], []).append(it)
    out: list[dict] = []
    k = 0
    while len(out) < n and any(k < len(v) for v in by.values()):
        for v in by.values():
            if k < len(v) and len(out) < n:
                out.append(v[k])
        k += 1
    return out


def _pack_pairs(pairs: list[tuple[list[int], list[int]]], pad: int):
    """(kwargs for forward, answer labels) of (prompt, response) pairs, one per row, right-padded."""
    from model import build_labels, pad_pairs

    kw = pad_pairs(pairs, pad)
    labels = build_labels(kw["input_ids"], kw["segment_ids"], kw["is_prompt"], "answer")
    return kw, labels


def run_diagnostics(checkpoint: str, n_prompts: int, batch_size: int = 4, items: list[dict] | None = None) -> dict:
    """Held-out answer-token loss (all items), and on `n_prompts` of them the logit lens (mean over answer
    positions of the probability of the final prediction and of KL(final || state), per state) and the
    attention entropy (mean over heads and prompt / answer query positions, per layer and module call)."""
    import torch
    import torch.nn.functional as F

    from evaluation.lm import HRMLM
    from model.diagnostics import attention_entropy, logit_lens_stats

    lm = HRMLM(checkpoint, progress=False)
    model = lm.model.eval()
    items = items if items is not None else heldout_items()
    pairs = [(lm.prompt_ids(it["question"], condition=it.get("condition")), lm.encode(it["response"]) + [lm.ids.eoa])
             for it in items]
    max_len = model.cfg.max_seq_len
    pairs = [(p, r[: max(max_len - len(p), 1)]) for p, r in pairs]
    nll, n_tok = 0.0, 0
    per_task: dict[str, list[float]] = {}
    with torch.no_grad():
        for i in range(0, len(pairs), 16):
            kw, labels = _pack_pairs(pairs[i:i + 16], lm.ids.pad)
            logits = model(**kw, attn_backend="sdpa").logits.float()  # (B, T, V)
            ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (B, T)
            for b, it in enumerate(items[i:i + 16]):
                m = labels[b] != -100
                s = per_task.setdefault(it["task"], [0.0, 0])
                s[0] += float(ce[b][m].sum())
                s[1] += int(m.sum())
            nll += float(ce[labels != -100].sum())
            n_tok += int((labels != -100).sum())

    chosen = diag_prompts(items, n_prompts)
    cpairs = [pairs[items.index(it)] for it in chosen]
    lens_sum: dict[str, list[float]] = {}
    ent_sum: dict[str, list[float]] = {}
    n_ans, n_prm = 0, 0
    for i in range(0, len(cpairs), batch_size):
        kw, labels = _pack_pairs(cpairs[i:i + batch_size], lm.ids.pad)
        ans = labels != -100  # (B, T) positions that predict an answer token
        prm = kw["is_prompt"]
        n_ans += int(ans.sum())
        n_prm += int(prm.sum())
        for name, st in logit_lens_stats(model, **kw, attn_backend="sdpa").items():
            acc = lens_sum.setdefault(name, [0.0, 0.0])
            acc[0] += float(st["p_final"][ans].sum())
            acc[1] += float(st["kl"][ans].sum())
        for name, e in attention_entropy(model, **kw).items():  # (B, H, T)
            em = e.mean(1)  # (B, T)
            acc = ent_sum.setdefault(name, [0.0, 0.0])
            acc[0] += float(em[prm].sum())
            acc[1] += float(em[ans].sum())
    return {
        "checkpoint": checkpoint, "items": len(items), "answer_tokens": n_tok,
        "heldout_answer_loss": nll / max(n_tok, 1),
        "heldout_answer_loss_by_task": {t: s / max(n, 1) for t, (s, n) in per_task.items()},
        "prompts": [it["id"] for it in chosen], "lens_positions": n_ans,
        "logit_lens": {"states": list(lens_sum), "p_final": [v[0] / max(n_ans, 1) for v in lens_sum.values()],
                       "kl": [v[1] / max(n_ans, 1) for v in lens_sum.values()]},
        "attention_entropy": {"states": list(ent_sum), "prompt": [v[0] / max(n_prm, 1) for v in ent_sum.values()],
                              "answer": [v[1] / max(n_ans, 1) for v in ent_sum.values()],
                              "log_T_max": math.log(max(len(p) + len(r) for p, r in cpairs))},
    }


@task(name="diagnose", cache_policy=KeyedOn(), persist_result=True, result_serializer="json")
def diagnose_task(checkpoint: str, diag_root: str, n_prompts: int, batch_size: int, key: str, run_label: str) -> dict:
    """Logit lens, attention entropy and the held-out answer loss of one rung (diag/<version>/)."""
    out = Path(diag_root) / key[:16]
    done = out / "diagnostics.json"
    if not done.exists():
        res = run_diagnostics(checkpoint, n_prompts, batch_size)
        tmp = Path(diag_root) / f".tmp-{key[:16]}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / "diagnostics.json").write_text(json.dumps(res, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    return {"path": str(out.resolve()), "diagnostics": str(done.resolve())}


def diag_key(checkpoint: str, n_prompts: int) -> str:
    import importlib

    code = {m: code_hash(importlib.import_module(m)) for m in DIAG_CODE}
    code["flow"] = code_hash(run_diagnostics)
    return sha256_json({"checkpoint": sha256_file(Path(checkpoint) / "model.safetensors"), "n": n_prompts,
                        "items": sha256_json(heldout_items()), "code": code})


# ------------------------------------------------------------------------------------------------
# the summary
# ------------------------------------------------------------------------------------------------
def _scores(results: dict) -> dict[str, dict]:
    out = {}
    for t, e in results.get("tasks", {}).items():
        full = e.get("full") or {}
        if not full:
            continue
        metric = next(iter(full))
        out[t] = {"value": float(full[metric]), "metric": metric, "n": e.get("n")}
    return out


def rung_summary(rung: str, plan: dict, tr: dict, ev: dict | None, dg: dict | None) -> dict:
    _, short, title, arch, loss, mask = RUNGS[RUNG_NAMES.index(rung)]
    metrics, _ = _read_metrics(Path(tr["metrics"]))
    tps = plan["tokens_per_step"]
    for m in metrics:
        m["tokens_seen"] = m["step"] * tps
        m.setdefault("answer_loss", m["loss"])  # answer-only runs: the objective is the answer loss
    flops = sum(m.get("flops") or 0.0 for m in metrics)
    tail = metrics[-max(1, len(metrics) // 10):]
    diag = json.loads(Path(dg["diagnostics"]).read_text()) if dg else {}
    res = json.loads(Path(ev["results"]).read_text()) if ev else {}
    return {"name": rung, "short": short, "title": title, "arch": arch, "loss": loss, "mask": mask,
            "params": plan["params"], "steps": len(metrics), "train_tokens": len(metrics) * tps,
            "train_flops": flops, "flops_per_token": flops / max(len(metrics) * tps, 1),
            "final_train_loss": sum(m["loss"] for m in tail) / len(tail) if tail else None,
            "final_train_answer_loss": sum(m["answer_loss"] for m in tail) / len(tail) if tail else None,
            "heldout_answer_loss": diag.get("heldout_answer_loss"),
            "heldout_answer_loss_by_task": diag.get("heldout_answer_loss_by_task"),
            "scores": _scores(res), "logit_lens": diag.get("logit_lens"),
            "attention_entropy": diag.get("attention_entropy"), "train_dir": tr["path"],
            "eval_dir": ev["path"] if ev else None, "diag_dir": dg["path"] if dg else None,
            "metrics": [{k: m.get(k) for k in ("step", "tokens_seen", "loss", "answer_loss")} for m in metrics]}


def notes(summary: dict) -> list[str]:
    rungs = {r["name"]: r for r in summary["rungs"]}
    out = []
    if "hrm" in rungs and len(rungs) > 1:
        t = [r for r in summary["rungs"] if r["arch"] == "transformer"]
        if t:
            ratio = rungs["hrm"]["flops_per_token"] / max(t[-1]["flops_per_token"], 1.0)
            out.append(f"The HRM spends {ratio:.2f}x the training FLOPs per token of the Transformer with the same "
                       f"parameters (8 module calls forward, gradient through 5 of them). Match: {summary['match']}"
                       + (" (every rung sees the same tokens, so the HRM gets more compute)." if summary["match"] == "tokens"
                          else " (the Transformers see more tokens, for the HRM's FLOPs)."))
    out.append("Training loss curves of the full-LM-loss rung cover every next token; compare rungs on the "
               "answer-token loss (curves, and the held-out answer loss: teacher forced on the held-out items).")
    return out


# ------------------------------------------------------------------------------------------------
# the flow
# ------------------------------------------------------------------------------------------------
@flow(name="hrm-pipeline", flow_run_name="ablation-{spec}", log_prints=True)
def ablation(spec: str = "demo", output_dir: Optional[str] = None, overrides: list[str] = [],  # noqa: B006
             preset: Literal["cpu", "gpu", "tiny"] = "cpu", settings: Optional[AblationSettings] = None,
             evaluation: Optional[EvalSettings] = None, benchmarks: Optional[str] = None,
             progress: bool = False) -> dict[str, Any]:
    """The paper's ablation ladder (Transformer full LM loss -> answer-only loss -> PrefixLM -> HRM) on
    SPEC's data, in OUTPUT_DIR/ablation (default runs/<spec name>): train, evaluate and diagnose each rung
    on the same pack, then publish the table, the plots and ablation/report.html. `preset` fills the
    settings and evaluation left empty (cpu: the 2-core default; gpu: a real run; tiny: tests)."""
    logger = get_run_logger()
    t0 = time.time()
    ps, pe = preset_settings(preset)
    s = settings or ps
    ev_set = evaluation or pe
    sp = load_spec(spec, overrides)
    require_ok(sp, str(spec))
    if benchmarks is not None and not Path(benchmarks).is_dir():
        raise FileNotFoundError(f"benchmarks: {benchmarks} is not a folder")
    bench = str(Path(benchmarks).resolve()) if benchmarks else None
    root = Path(output_dir or Path("runs") / sp.name).resolve()
    label = run_label(sp, root)
    with run_lock(root, what=f"hrm ablation {spec}"):
        contam = contamination_settings(sp, None, None)
        res = _run(sp, spec, root, plan_stages("pack", None, None, contam is not None), contam, [], overrides,
                   progress, logger, label=label)
        pack = _upstream_pack(root, res)
        plan = plan_rungs(pack, s)
        for r, p in plan.items():
            logger.info("ablation: %s: %d steps, %d tokens, ~%.3e FLOPs, %d parameters", r, p["steps"], p["tokens"],
                        p["est_flops"], p["params"])
        results = root / ".prefect" / "results"
        train_t, eval_t = train_task.with_options(result_storage=results), evaluate_task.with_options(result_storage=results)
        diag_t = diagnose_task.with_options(result_storage=results)
        abl = root / "ablation"
        rungs = []
        for r in s.rungs:
            ts = rung_train_settings(r, s, plan[r]["steps"])
            key = train_key(pack, ts)
            before = (read_run(root) if (root / RUN_MANIFEST).exists() else {}).get("train")
            tr = train_t(pack_dir=pack, train_root=str(abl / "train" / r), settings=ts, key=key,
                         run_label=f"{label}-ablation-{r}")
            if not (Path(tr["final"]["raw"]) / "model.safetensors").exists():
                logger.warning("ablation: the cached result names %s, which is gone: training again", tr["path"])
                tr = train_t.with_options(refresh_cache=True)(pack_dir=pack, train_root=str(abl / "train" / r),
                                                              settings=ts, key=key, run_label=f"{label}-ablation-{r}")
            update_run(root, train=before)  # the trainer recorded itself as the run's training: undo
            ckpt = tr[f"checkpoint_{ev_set.checkpoint}"]
            ek = eval_key(ckpt, bench, None, ev_set)
            ev = eval_t(checkpoint=ckpt, benchmarks=bench, contamination=None, eval_root=str(abl / "eval"),
                        settings=ev_set, key=ek, run_label=f"{label}-ablation-{r}")
            if not Path(ev["results"]).exists():
                ev = eval_t.with_options(refresh_cache=True)(checkpoint=ckpt, benchmarks=bench, contamination=None,
                                                             eval_root=str(abl / "eval"), settings=ev_set, key=ek,
                                                             run_label=f"{label}-ablation-{r}")
            dk = diag_key(ckpt, s.diag_prompts)
            dg = diag_t(checkpoint=ckpt, diag_root=str(abl / "diag"), n_prompts=s.diag_prompts,
                        batch_size=s.diag_batch_size, key=dk, run_label=label)
            if not Path(dg["diagnostics"]).exists():
                dg = diag_t.with_options(refresh_cache=True)(checkpoint=ckpt, diag_root=str(abl / "diag"),
                                                             n_prompts=s.diag_prompts, batch_size=s.diag_batch_size,
                                                             key=dk, run_label=label)
            rungs.append(rung_summary(r, plan[r], tr, ev, dg))
        summary = {"spec": sp.name, "run_dir": str(root), "pack": pack, "match": "flops" if s.budget_flops else s.match,
                   "preset": preset, "settings": s.model_dump(exclude={"extra_args"}),
                   "evaluation": ev_set.model_dump(), "benchmarks": bench, "rungs": rungs,
                   "seconds": round(time.time() - t0, 1)}
        summary["notes"] = notes(summary)
        out = publish(summary, abl, label)
        update_run(root, ablation={"summary": os.path.relpath(out["summary"], root),
                                   "report": os.path.relpath(out["html"], root),
                                   "rungs": {r["name"]: os.path.relpath(r["train_dir"], root) for r in rungs}})
    logger.info("ablation done in %.0f s: %s", time.time() - t0, out["html"])
    return {**summary, **out}


def publish(summary: dict, abl: Path, label: str) -> dict:
    """summary.json, report.html and the Prefect artifacts (table, markdown with the plots, report link)."""
    import base64

    from pipeline.ablation_report import markdown_table, plots, render_html, table_rows

    abl.mkdir(parents=True, exist_ok=True)
    sj, hp = abl / "summary.json", abl / "report.html"
    sj.write_text(json.dumps(summary, indent=1))
    hp.write_text(render_html(summary))
    create_table_artifact(table_rows(summary), key=artifact_key("ablation", label),
                          description=f"the ablation ladder on {summary['spec']} ({summary['match']}-matched)")
    imgs = "\n\n".join(f"![{name}](data:image/svg+xml;base64,{base64.b64encode(svg.encode()).decode()})"
                       for name, svg in plots(summary).items())
    body = (f"# Ablation ladder on `{summary['spec']}`\n\n{markdown_table(summary)}\n\n"
            + "\n".join(f"- {n}" for n in summary["notes"]) + f"\n\nReport: `{hp.resolve()}`\n\n{imgs}\n")
    create_markdown_artifact(body, key=artifact_key("ablation-plots", label),
                             description=f"ablation table and plots ({abl})")
    create_link_artifact(hp.resolve().as_uri(), link_text=f"ablation report: {hp.resolve()}",
                         key=artifact_key("ablation-report", label), description="self-contained HTML ablation report")
    return {"summary": str(sj.resolve()), "html": str(hp.resolve())}


__all__ = ["ablation", "AblationSettings", "ABLATION_PRESETS", "RUNGS", "plan_rungs", "preset_settings",
           "run_diagnostics", "publish"]
