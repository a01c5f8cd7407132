"""The whole pipeline as one Prefect flow: the data stages (flows.data_flow), then

    pack -> train -> check (the packed training data against the benchmarks) -> evaluate -> report

Each step is a task that passes manifests (small JSON) and folder paths, so the run graph shows the
data dependencies. Model steps are content-addressed like the data stages:

    <run>/train/<version>/    the DeepSpeed train folder; version = hash of (pack outputs, tokenizer,
                              train settings, training and model code). Killing the flow mid-training and
                              rerunning it resumes from the last checkpoint in the same folder.
    <run>/check/<version>/    contamination check of the packed rows (pipeline.stages.contamination)
                              against the benchmark files given and the held-out demo task
    <run>/eval/<version>/     lm-eval results; version = hash of (checkpoint weights, tasks, few-shot,
                              limit, benchmark files, contamination items, evaluation code)
    <run>/report/             index.html + report.json (pipeline.report), rewritten every run

Training runs the trainer in a child process (`python -m training`, or the `deepspeed` launcher for
several ranks or a hostfile), streams its output into the flow's logs, and publishes a progress
artifact and a loss table. Every task publishes what it did as an artifact whose key is unique to the
run folder.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Literal, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import (create_link_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from pydantic import BaseModel, ConfigDict, Field

from pipeline.checks import require_ok
from pipeline.io import code_hash, content_hash, sha256_file, sha256_json
from pipeline.runs import RUN_MANIFEST, RunError, read_run, run_lock, update_run
from pipeline.spec import load_spec

from .data_flow import (ALL_STAGES, _run, artifact_key, contamination_settings, plan_stages, result_intact,
                        run_label)

REPO = Path(__file__).resolve().parents[1]
MODEL_STAGES = ("train", "check", "evaluate", "report")
PIPELINE_STAGES = (*ALL_STAGES, *MODEL_STAGES)
StageName = Literal["ingest", "normalize", "stratify", "dedup", "tokenizer", "contamination", "mix", "pack",
                    "lineage", "train", "check", "evaluate", "report"]


class TrainSettings(BaseModel):
    """Training of the pipeline (the `hrm train` options; the UI shows them as a form)."""

    model_config = ConfigDict(extra="forbid")
    preset: Literal["debug", "cpu-small", "B", "L", "XL", "XXL"] = "cpu-small"
    arch: Literal["hrm", "transformer"] = "hrm"
    steps: int = Field(60, ge=1, description="optimizer steps")
    warmup_steps: int = Field(10, ge=0)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2.2e-4, gt=0)
    seed: int = 1234
    save_every: int = Field(20, ge=0, description="checkpoint every N steps (0: only at the end)")
    engine: Literal["deepspeed", "torch"] = "deepspeed"
    zero_stage: Literal[0, 1, 2] = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    num_gpus: int = Field(1, ge=1, description="ranks on this machine; more than 1 uses the deepspeed launcher")
    hostfile: Optional[str] = Field(None, description="DeepSpeed hostfile for several machines")
    master_addr: Optional[str] = Field(None, description="rendezvous address: 127.0.0.1 on one machine (default); "
                                                         "with a hostfile an address of its first host")
    master_port: int = Field(29500, ge=1, le=65535)
    node_rank: Optional[int] = Field(None, ge=0, description="with a hostfile: start this host's ranks only, "
                                                             "without ssh (the flow runs on every host)")
    extra_args: list[str] = Field(default_factory=list, description="more `hrm train` flags, e.g. --ema-decay 0.999")

    def identity(self) -> dict:
        """What decides the trained weights (not where or how many processes launch them)."""
        d = self.model_dump(exclude={"hostfile", "master_addr", "master_port", "node_rank"})
        if self.hostfile:  # the global batch counts every rank of the hostfile
            d["world_size"] = self.launch().world_size
        return d

    def launch(self):
        from training.distributed import Launch

        return Launch(num_gpus=self.num_gpus, hostfile=self.hostfile, master_addr=self.master_addr,
                      master_port=self.master_port, node_rank=self.node_rank)

    def train_args(self) -> list[str]:
        a = ["--preset", self.preset, "--arch", self.arch, "--steps", str(self.steps),
             "--warmup-steps", str(self.warmup_steps), "--micro-batch-size", str(self.micro_batch_size),
             "--grad-accum", str(self.grad_accum), "--lr", repr(self.lr), "--seed", str(self.seed),
             "--save-every", str(self.save_every), "--engine", self.engine, "--zero-stage", str(self.zero_stage),
             "--precision", self.precision, "--no-progress"]
        return a + list(self.extra_args)

    def launcher(self) -> list[str]:
        """The command prefix: one process, or DeepSpeed's launcher (local ranks or a hostfile)."""
        return self.launch().command("training")


class EvalSettings(BaseModel):
    """Evaluation of the pipeline (the `hrm eval` options)."""

    model_config = ConfigDict(extra="forbid")
    tasks: Optional[list[str]] = Field(None, description="default: demo_heldout and the standard tasks whose "
                                                         "benchmark files are given")
    limit: Optional[int] = Field(50, ge=1, description="items per benchmark (seeded sample); empty: all")
    fewshot: dict[str, int] = Field(default_factory=dict, description="few-shot overrides, e.g. {\"mmlu\": 0}")
    batch_size: int = Field(8, ge=1)
    max_gen_toks: int = Field(256, ge=1, description="tokens generated at most per answer (generative tasks; "
                                                       "caps the paper protocol's answers too)")
    protocol: Literal["harness", "paper", "both"] = Field(
        "harness", description="harness: lm-eval's standard tasks; paper: the HRM-Text reference's generative "
                               "protocol (evaluation.paper); both: each task under both")
    checkpoint: Literal["ema", "raw"] = Field(
        "raw", description="which export to score: raw (the last step's weights) or ema (the paper's EMA, decay "
                           "0.9999: meaningful after thousands of steps, near the initial weights after a short run)")


# ------------------------------------------------------------------------------------------------
# cache policy for the model steps: keyed on what they read, by content
# ------------------------------------------------------------------------------------------------
class KeyedOn(CachePolicy):
    """Cache key = the task's own `key` argument (a content hash the flow computes) + the task's code."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> Optional[str]:
        roots = {k: str(v) for k, v in sorted((inputs or {}).items()) if k.endswith("_root")}  # the run folder's
        return sha256_json({"key": inputs.get("key"), "roots": roots, "task": code_hash(task_ctx.task.fn)})


def _opts() -> dict:
    return dict(cache_policy=KeyedOn(), persist_result=True, result_serializer="json")


TRAIN_CODE = ("training.train", "training.data", "training.optim", "training.config", "training.records",
              "model.hrm", "model.layers", "model.masks", "model.config")
EVAL_CODE = ("evaluation.run", "evaluation.lm", "evaluation.tasks", "evaluation.heldout")


def _code(modules: tuple[str, ...]) -> dict[str, str]:
    import importlib

    out = {}
    for m in modules:
        try:
            out[m] = code_hash(importlib.import_module(m))
        except ImportError:
            continue
    return out


def train_key(pack_dir: str, settings: TrainSettings) -> str:
    from training.records import data_record

    data = data_record(pack_dir)
    return sha256_json({"pack": data["pack_manifest_sha256"], "tokenizer": data["tokenizer_sha256"],
                        "settings": settings.identity(), "code": _code(TRAIN_CODE)})


def _read_metrics(path: Path, start: int = 0) -> tuple[list[dict], int]:
    if not path.exists():
        return [], start
    with open(path) as f:
        f.seek(start)
        data = f.read()
    lines = data.split("\n")
    done = "\n".join(lines[:-1])  # the last piece may be a line being written
    recs = []
    for line in lines[:-1]:
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return recs, start + len(done) + (1 if len(lines) > 1 else 0)


def _fmt_metric(r: dict) -> str:
    parts = [f"step {r.get('step')}", f"loss {r.get('loss', float('nan')):.4f}"]
    if r.get("tokens_per_s"):
        parts.append(f"{r['tokens_per_s']:,.0f} tok/s")
    if r.get("mfu"):
        parts.append(f"MFU {100 * r['mfu']:.1f}%")
    return ", ".join(parts)


def _die_with_parent():
    """A preexec_fn (Linux) giving the trainer SIGKILL when the flow's process dies, so a killed flow run
    (kill -9, OOM) leaves no orphan trainer writing the train folder that the rerun resumes from. Bound
    here: the child only calls prctl (no imports or locks between fork and exec)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl, sig = ctypes.CDLL(None, use_errno=True).prctl, int(signal.SIGKILL)
    return lambda: prctl(1, sig)  # PR_SET_PDEATHSIG


@task(name="train", **_opts())
def train_task(pack_dir: str, train_root: str, settings: TrainSettings, key: str, run_label: str) -> dict:
    """Train (or resume) on the pack in <train_root>/<version>/; returns the train record."""
    logger = get_run_logger()
    out = Path(train_root) / key[:16]
    final = out / "final" / "ema"
    record_file = out / "train.json"
    if (final / "model.safetensors").exists() and record_file.exists():
        rec = json.loads(record_file.read_text())
        if rec.get("status") == "done" or (out / "final" / "raw" / "model.safetensors").exists():
            logger.info("train: %s already holds the finished run", out)
            return _train_result(out, key, settings)
    cmd = [*settings.launcher(), "--shards", pack_dir, "--out", str(out), *settings.train_args()]
    logger.info("train: %s", " ".join(cmd))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "PYTHONUNBUFFERED": "1"}
    progress_id = create_progress_artifact(0.0, key=artifact_key("train-progress", run_label),
                                           description=f"training progress ({out})")
    metrics = out / "metrics.jsonl"
    last_lines: list[str] = []
    stop = threading.Event()
    seen = {"pos": 0, "last": None}

    def watch() -> None:
        every = max(1, settings.steps // 20)
        while not stop.wait(2.0):
            recs, seen["pos"] = _read_metrics(metrics, seen["pos"])
            for r in recs:
                seen["last"] = r
                if r.get("step") and (r["step"] % every == 0 or r["step"] == settings.steps):
                    logger.info("train: %s", _fmt_metric(r))
            if seen["last"] is not None:
                update_progress_artifact(progress_id, 100.0 * seen["last"]["step"] / settings.steps)

    proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, preexec_fn=_die_with_parent())
    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip()
            if not line:
                continue
            last_lines = (last_lines + [line])[-20:]
            if line.startswith(("{", "next:")):
                continue  # the trainer's JSON summary and its hint for CLI users
            logger.info("train | %s", line[:500])
        rc = proc.wait()
    finally:
        stop.set()
        th.join(timeout=5)
        if proc.poll() is None:
            proc.kill()
    if rc != 0:
        tail = "\n".join(last_lines[-8:])
        raise RuntimeError(f"training failed (exit {rc}) in {out}:\n{tail}")
    update_progress_artifact(progress_id, 100.0)
    res = _train_result(out, key, settings)
    rows = [{"step": r["step"], "loss": round(r["loss"], 4), "lr": r.get("lr"),
             "tokens_per_s": round(r.get("tokens_per_s") or 0), "mfu": r.get("mfu")}
            for r in _loss_table(metrics, 25)]
    create_table_artifact(rows, key=artifact_key("train-loss", run_label),
                          description=f"loss curve of {out} ({settings.preset}, {settings.arch}, {settings.steps} steps)")
    return res


def _loss_table(metrics: Path, n: int) -> list[dict]:
    recs, _ = _read_metrics(metrics)
    if not recs:
        return []
    stride = max(1, len(recs) // n)
    picked = recs[::stride]
    if picked[-1] is not recs[-1]:
        picked.append(recs[-1])
    return picked


def _train_result(out: Path, key: str, settings: TrainSettings) -> dict:
    recs, _ = _read_metrics(out / "metrics.jsonl")
    final = out / "final"
    return {"path": str(out.resolve()), "key": key, "version": key[:16], "steps": settings.steps,
            "final_loss": recs[-1]["loss"] if recs else None,
            "final": {"raw": str((final / "raw").resolve()), "ema": str((final / "ema").resolve())},
            # top-level copies: Prefect links a task input to the task result it came from one level deep
            "checkpoint_raw": str((final / "raw").resolve()), "checkpoint_ema": str((final / "ema").resolve()),
            "metrics": str(out / "metrics.jsonl")}


@task(name="check", **_opts())
def check_task(pack_dir: str, benchmarks: str, check_root: str, key: str, run_label: str,
               settings: Optional[dict] = None) -> dict:
    """The contamination check of the packed training rows against the benchmarks, with the spec's
    contamination settings (`settings`: a ContaminationConfig as a dict; the defaults when None)."""
    from pipeline.config import ContaminationConfig
    from pipeline.stages import contamination

    cfg = ContaminationConfig.model_validate(settings or {})
    m = contamination.run(pack_dir, benchmarks, check_root, cfg, progress=False, versioned=True)
    rep = json.loads((Path(m["path"]) / "report.json").read_text())
    n = str(rep.get("primary_n"))
    rows = []
    for b, e in rep.get("benchmarks", {}).items():
        counts = (e.get("by_n", {}).get(n) or {}).get("counts", {})
        rows.append({"benchmark": b, "checked": e.get("checked"), **counts,
                     "rows_responsible": len({r["id"] for d in e.get("dirty_items", []) for r in d.get("responsible", [])})})
    create_table_artifact(rows, key=artifact_key("check", run_label),
                          description=f"contamination of the packed training data ({m['path']})")
    return m


def check_settings(s) -> dict:
    """The check step's contamination settings: the spec's `contamination` section (method, n-gram sizes,
    buckets, ...) without its data-flow fields (benchmarks folder, hub, decontaminate)."""
    from pipeline.config import ContaminationConfig

    if s is None or s.contamination is None:
        return ContaminationConfig().model_dump(mode="json")
    data = {k: v for k, v in s.contamination.model_dump(mode="json").items() if k in ContaminationConfig.model_fields}
    data["decontaminate"] = False
    return ContaminationConfig.model_validate(data).model_dump(mode="json")


def eval_key(checkpoint: str, benchmarks: str | None, contamination: str | None, settings: EvalSettings) -> str:
    return sha256_json({"checkpoint": sha256_file(Path(checkpoint) / "model.safetensors"),
                        "benchmarks": content_hash(benchmarks) if benchmarks else None,
                        "contamination": content_hash(contamination) if contamination else None,
                        "settings": settings.model_dump(exclude={"batch_size"}), "code": _code(EVAL_CODE)})


# log_prints off: datasets fingerprints lm-eval's process_docs functions with dill, which reads their
# globals from `dis.dis` output captured on stdout; Prefect's print-to-log patch sent that disassembly
# (100+ lines per task) into the run's logs instead. Progress and scores are logged explicitly.
@task(name="evaluate", log_prints=False, **_opts())
def evaluate_task(checkpoint: str, benchmarks: Optional[str], contamination: Optional[str], eval_root: str,
                  settings: EvalSettings, key: str, run_label: str) -> dict:
    """lm-evaluation-harness on the checkpoint; full and clean-subset scores."""
    from evaluation.run import run as run_eval, table

    out = Path(eval_root) / key[:16]
    done = out / "results.json"
    if done.exists():
        res = json.loads(done.read_text())
    else:
        tmp = Path(eval_root) / f".tmp-{key[:16]}"
        shutil.rmtree(tmp, ignore_errors=True)
        res = run_eval(checkpoint, None, benchmarks, tmp, tasks=settings.tasks, limit=settings.limit,
                       contamination_items=contamination, num_fewshot=settings.fewshot or None,
                       batch_size=settings.batch_size, max_gen_toks=settings.max_gen_toks, protocol=settings.protocol)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    create_markdown_artifact(table(res), key=artifact_key("scores", run_label),
                             description=f"scores of {checkpoint}, full vs clean, protocol {settings.protocol} ({out})")
    return {"path": str(out.resolve()), "key": key, "version": key[:16], "results": str(done.resolve()),
            "tasks": list(res.get("tasks", {})), "limit": res.get("limit"), "limited": res.get("limited", False),
            "n": {t: e.get("n") for t, e in res.get("tasks", {}).items()}}


@task(name="report")
def report_task(run_dir: str, run_label: str, after: list[Any] | None = None) -> dict:
    """The run's HTML lineage report (runs/<name>/report/index.html) and JSON, as a link artifact."""
    from pipeline.report import write_report

    r = write_report(run_dir)
    html = Path(r["html"]).resolve()
    create_link_artifact(html.as_uri(), link_text=f"run report: {html}", key=artifact_key("report", run_label),
                         description=f"self-contained HTML report of {run_dir} (open the file in a browser)")
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()}


# ------------------------------------------------------------------------------------------------
# the flow
# ------------------------------------------------------------------------------------------------
def plan_pipeline(stop_after: str, from_stage: str | None, only: str | None, contam_on: bool,
                  check_on: bool) -> tuple[list[str], list[str]]:
    """(data stages, model steps) this run executes, in order."""
    for name, val in (("stop_after", stop_after), ("from_stage", from_stage), ("only", only)):
        if val is not None and val not in PIPELINE_STAGES:
            raise ValueError(f"{name} must be one of {', '.join(PIPELINE_STAGES)}, got {val!r}")
    if from_stage and only:
        raise ValueError("give either from_stage (--from) or only (--only), not both")
    if only == "check" and not check_on:
        raise ValueError("only=check needs benchmarks (pass benchmarks=DIR)")
    if only in MODEL_STAGES:
        return [], [only]
    if only:
        return plan_stages("pack", None, only, contam_on), []
    data_stop = stop_after if stop_after in ALL_STAGES else "pack"
    data_from = from_stage if from_stage in ALL_STAGES else None
    data = [] if from_stage in MODEL_STAGES else plan_stages(data_stop, data_from, None, contam_on)
    if stop_after in ALL_STAGES:
        return data, []
    first = MODEL_STAGES.index(from_stage) if from_stage in MODEL_STAGES else 0
    last = MODEL_STAGES.index(stop_after)
    model = [st for st in MODEL_STAGES[first:last + 1] if st != "check" or check_on]
    return data, model


@flow(name="hrm-pipeline", log_prints=True)
def pipeline(spec: str = "demo", output_dir: Optional[str] = None, overrides: list[str] = [],  # noqa: B006
             from_stage: Optional[StageName] = None, only: Optional[StageName] = None,
             refresh: list[StageName] = [], stop_after: StageName = "report",  # noqa: B006
             benchmarks: Optional[str] = None, decontaminate: bool = False,
             train: TrainSettings = TrainSettings(), evaluation: EvalSettings = EvalSettings(),
             progress: bool = False) -> dict[str, Any]:
    """Raw data to scores: the data stages of SPEC, training, the contamination check of the packed data,
    evaluation and the run report, in OUTPUT_DIR (default runs/<spec name>).

    `overrides`: spec settings as KEY=VALUE. `from_stage` / `only` / `refresh` / `stop_after` name any
    step (data stages, train, check, evaluate, report). `benchmarks`: a folder of benchmark files (the
    six standard tasks); the held-out demo task is always evaluated. `decontaminate`: also drop, before
    mixing, the training rows that make a benchmark item dirty."""
    logger = get_run_logger()
    s = load_spec(spec, overrides)
    if (from_stage or only) in (None, "ingest"):
        require_ok(s, str(spec))
    if benchmarks is not None and not Path(benchmarks).is_dir():
        raise FileNotFoundError(f"benchmarks: {benchmarks} is not a folder")
    contam = contamination_settings(s, benchmarks if decontaminate else None, True if decontaminate else None)
    bench = str(Path(benchmarks).resolve()) if benchmarks else None
    data_todo, model_todo = plan_pipeline(stop_after, from_stage, only, contam is not None, True)
    bad = [r for r in refresh if r not in PIPELINE_STAGES]
    if bad:
        raise ValueError(f"refresh: unknown stage(s) {bad}")
    from pipeline.storage import is_remote

    if is_remote(output_dir):
        raise ValueError(f"hrm pipeline writes a local run folder, not {output_dir}: run the data stages with "
                         f"`hrm run SPEC -o {output_dir}`, then `hrm train {output_dir} --out DIR --checkpoint-url URL`")
    root = Path(output_dir or Path("runs") / s.name).resolve()
    label = run_label(s, root)  # artifact keys unique per run folder
    with run_lock(root, what=f"hrm pipeline {spec}"):
        res: dict[str, Any] = {"output_dir": str(root), "manifests": {}, "ran": [], "stale": {}}
        if data_todo:
            res = _run(s, spec, root, data_todo, contam, [r for r in refresh if r in ALL_STAGES], overrides,
                       progress, logger, label=label, check_later="check" in model_todo)
        steps: dict[str, dict] = {}
        for st in model_todo:
            steps[st] = _model_step(st, root, res, steps, train, evaluation, bench, refresh, label, logger,
                                        check_settings(s))
            res["ran"].append(st)
        res["model"] = steps
    logger.info("pipeline done: %s (report: %s)", root, root / "report" / "index.html")
    return res


def check_benchmarks(root: Path, bench: str | None) -> str:
    """The benchmark folder the check reads: the user's benchmark folders (if any) plus the held-out demo
    task, copied once into `<run>/check/benchmarks-<content hash>/` (the evaluation scores them all, so
    the check covers them all)."""
    from evaluation.heldout import HELDOUT_DIR

    parts = {d.name: d for d in sorted(Path(HELDOUT_DIR).iterdir()) if d.is_dir()}
    if bench:
        parts.update({d.name: d for d in sorted(Path(bench).iterdir()) if d.is_dir()})
    key = sha256_json({name: content_hash(d) for name, d in sorted(parts.items())})[:16]
    dest = root / "check" / f"benchmarks-{key}"
    if not dest.exists():
        tmp = root / "check" / f".tmp-benchmarks-{key}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, d in parts.items():
            shutil.copytree(d, tmp / name)
        os.replace(tmp, dest)
    return str(dest)


def _upstream_pack(root: Path, res: dict) -> str:
    if "pack" in res["manifests"]:
        return res["manifests"]["pack"]["path"]
    from pipeline.runs import stage_dir

    return str(stage_dir(root, "pack"))


def _model_step(st: str, root: Path, res: dict, steps: dict[str, dict], train: TrainSettings,
                evaluation: EvalSettings, bench: str | None, refresh: list[str], label: str, logger,
                cset: dict | None = None) -> dict:
    force = st in refresh
    run = read_run(root) if (root / RUN_MANIFEST).exists() else {}
    results = root / ".prefect" / "results"  # cache records live with the run folder, like the data stages'
    train_t, eval_t = train_task.with_options(result_storage=results), evaluate_task.with_options(result_storage=results)
    if st == "train":
        pack = _upstream_pack(root, res)
        key = train_key(pack, train)
        out = train_t.with_options(refresh_cache=force)(pack_dir=pack, train_root=str(root / "train"),
                                                          settings=train, key=key, run_label=label)
        if not (Path(out["final"]["ema"]) / "model.safetensors").exists():
            logger.warning("train: the cached result names %s, which is gone: training again", out["path"])
            out = train_t.with_options(refresh_cache=True)(pack_dir=pack, train_root=str(root / "train"),
                                                              settings=train, key=key, run_label=label)
        ent = dict(read_run(root).get("train") or {})  # as the trainer left it (hashes, step), not as before training
        if ent.get("dir") != os.path.relpath(out["path"], root):
            ent = {}
        ent.update({"dir": os.path.relpath(out["path"], root), "version": out["version"], "status": "done",
                    "steps": out["steps"], "step": out["steps"],
                    "settings": train.model_dump(), "final_loss": out["final_loss"],
                    "pack_version": Path(pack).name,
                    "final": {k: os.path.relpath(v, root) for k, v in out["final"].items()}})
        update_run(root, train=ent)
        return out
    if st == "check":
        pack = _upstream_pack(root, res)
        cb = check_benchmarks(root, bench)
        cset = cset or check_settings(None)
        key = sha256_json({"pack": content_hash(pack), "bench": Path(cb).name, "settings": cset})
        check = check_task.with_options(result_storage=results)
        m = check.with_options(refresh_cache=force)(pack_dir=pack, benchmarks=cb, check_root=str(root / "check"),
                                                   key=key, run_label=label, settings=cset)
        if not result_intact(m):
            logger.warning("check: the cached result names %s, which is gone or changed: checking again", m.get("path"))
            m = check.with_options(refresh_cache=True)(pack_dir=pack, benchmarks=cb, check_root=str(root / "check"),
                                                       key=key, run_label=label, settings=cset)
        update_run(root, check={"dir": os.path.relpath(m["path"], root), "version": Path(m["path"]).name,
                                "benchmarks": bench, "checked": os.path.relpath(cb, root),
                                "pack_version": Path(pack).name})
        return m
    if st == "evaluate":
        tr = steps.get("train")
        if tr is None:
            ent = run.get("train") or {}
            if not ent.get("final"):
                raise RunError(f"{root}: no trained checkpoint to evaluate: run the pipeline with the train step first")
            ckpt = str(root / ent["final"][evaluation.checkpoint])
        else:
            ckpt = tr[f"checkpoint_{evaluation.checkpoint}"]
        chk = steps.get("check")
        if chk is None and (run.get("check") or {}).get("dir"):
            chk = {"path": str(root / run["check"]["dir"])}
        contam_dir = chk["path"] if chk else None
        key = eval_key(ckpt, bench, contam_dir, evaluation)
        out = eval_t.with_options(refresh_cache=force)(checkpoint=ckpt, benchmarks=bench, contamination=contam_dir,
                                                             eval_root=str(root / "eval"), settings=evaluation, key=key,
                                                             run_label=label, wait_for=[tr] if tr else None)
        if not Path(out["results"]).exists():
            out = eval_t.with_options(refresh_cache=True)(checkpoint=ckpt, benchmarks=bench,
                                                                 contamination=contam_dir, eval_root=str(root / "eval"),
                                                                 settings=evaluation, key=key, run_label=label)
        rec = {"checkpoint": os.path.relpath(ckpt, root), "output": os.path.relpath(out["path"], root),
               "results": os.path.relpath(out["results"], root),
               "report": os.path.relpath(str(Path(out["path"]) / "results.md"), root),
               "tasks": out["tasks"], "limit": out["limit"], "limited": out["limited"], "n": out["n"],
               "contamination": os.path.relpath(contam_dir, root) if contam_dir else None}
        evals = [e for e in (read_run(root).get("evaluations") or []) if e.get("output") != rec["output"]]
        update_run(root, evaluations=[*evals, rec])
        return out
    if st == "report":
        return report_task(run_dir=str(root), run_label=label, after=list(steps.values()) or None)
    raise AssertionError(st)


__all__ = ["pipeline", "TrainSettings", "EvalSettings", "PIPELINE_STAGES", "plan_pipeline"]
