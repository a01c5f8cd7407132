"""The `hrm` command.

  hrm run SPEC [--output DIR] [--stop-after STAGE] [--benchmarks DIR [--decontaminate]]
               [--set KEY=VALUE ...] [--from STAGE | --only STAGE] [--refresh STAGE ...]
                                                     the Prefect data flow (ephemeral Prefect unless
                                                     PREFECT_API_URL points at a server)
  hrm gc RUN [--apply]                               remove stage versions no run manifest names
  hrm report RUN [--output DIR]                      the run's HTML report (RUN/report/index.html + report.json)
  hrm lineage trace RUN ID [--json]                  one row's path: origin, every stage, shards, checkpoints
  hrm lineage why RUN ID                             the short answer: where it was packed, or why removed
  hrm validate SPEC                                  load and check a spec, print its summary
  hrm plan SPEC                                      dry run: strata, expected unique and seen tokens
  hrm stage NAME --input PATH --output DIR [--spec SPEC] [--set key=value ...]
                                                     one stage alone, on your files
  hrm stage contamination --input TOKENIZER_DIR --benchmarks DIR --output DIR
                                                     n-gram contamination check against benchmarks
  hrm pipeline SPEC [-o DIR] [--benchmarks DIR] ...  the whole DAG: data, train, check, evaluate, report
  hrm ablation SPEC [--budget TOKENS] [--preset cpu|gpu|tiny] [--match tokens|flops] [--flops F] [-o DIR]
                                                     the paper's ablation ladder (Transformer full LM loss ->
                                                     answer-only -> PrefixLM -> HRM): table, plots, report
  hrm serve | hrm server [--port N]                  Prefect deployments for the UI | a local Prefect server
  hrm train RUN_DIR ... (or --shards PACK --out DIR) train on packed shards (DeepSpeed); see hrm train -h
  hrm eval ...                                       lm-evaluation-harness on a checkpoint; see hrm eval -h
  hrm generators                                     the built-in data generators

SPEC is a YAML path or the name of a bundled spec (demo, hrm_text_1b).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml


def _die(msg: str, code: int = 2) -> None:
    print(f"hrm: error: {msg}", file=sys.stderr)
    raise SystemExit(code)


def _overrides(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in pairs or []:
        if "=" not in p:
            _die(f"--set expects key=value, got {p!r}")
        k, v = p.split("=", 1)
        out[k.strip()] = yaml.safe_load(v)
    return out


def _stage_cfg(model, section: Any, overrides: dict[str, Any], what: str):
    from pydantic import ValidationError

    data = section.model_dump() if section is not None else {}
    data.update(overrides)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        errs = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors(include_url=False))
        _die(f"{what}: invalid setting: {errs}")


def cmd_validate(args) -> int:
    from .checks import require_ok
    from .spec import load_spec, resolve_spec_path

    s = load_spec(args.spec)
    require_ok(s, str(resolve_spec_path(args.spec)))  # paths that match no file, unknown generator params
    print(f"spec {s.name!r}: OK ({len(s.sources)} sources, {len(s.stratify.rules)} stratify rules)")
    for i, src in enumerate(s.sources):
        where = src.path or src.generator
        print(f"  [{i}] {src.name:<28} {src.kind:<9} {where}  domain={src.domain} condition={src.condition}")
    return 0


def cmd_plan(args) -> int:
    from .plan import plan_spec, format_plan

    from .spec import load_spec

    s = load_spec(args.spec)
    p = plan_spec(s)
    if args.json:
        print(json.dumps(p, indent=2, sort_keys=True))
    else:
        print(format_plan(p))
    return 0


def _check_before_prefect(args) -> None:
    """What `hrm run` and `hrm pipeline` check before Prefect starts: the spec with its --set overrides,
    its local paths and generator parameters (when ingest will run), and the benchmark folder."""
    from .checks import require_ok
    from .spec import load_spec

    spec = load_spec(args.spec, args.set)
    if not (args.only or args.from_stage) or "ingest" in (args.only, args.from_stage):
        require_ok(spec, str(args.spec))
    if args.benchmarks is not None and not Path(args.benchmarks).is_dir():
        _die(f"--benchmarks: {args.benchmarks} is not a folder")


def cmd_run(args) -> int:
    _check_before_prefect(args)
    from flows.data_flow import data_flow, plan_stages
    from flows.errors import quiet_user_errors_on_console

    plan_stages(args.stop_after, args.from_stage, args.only, True)  # bad stage choices: before Prefect starts
    quiet_user_errors_on_console()
    res = data_flow(spec=str(args.spec), output_dir=args.output, stop_after=args.stop_after,
                    benchmarks=args.benchmarks, decontaminate=True if args.decontaminate else None,
                    overrides=args.set or None, from_stage=args.from_stage, only=args.only,
                    refresh=args.refresh or None, progress=not args.no_progress, runner=args.runner,
                    address=args.address, workers=args.workers)
    print(json.dumps({"output_dir": res["output_dir"], "ran": res["ran"],
                      "stages": {k: {"dir": v["path"],
                                     "counts": {a: b for a, b in v.get("counts", {}).items() if not isinstance(b, dict)}}
                                 for k, v in res["manifests"].items()},
                      **({"stale": res["stale"]} if res["stale"] else {})}, indent=2))
    out = res["output_dir"]
    if "pack" in res["manifests"] and res.get("mirror"):  # a run folder on object storage
        print(f"\nnext: hrm train {out} --out runs/{Path(res['mirror']).name}-train --checkpoint-url "
              f"{out}/train/checkpoints --preset cpu-small --steps 200 --warmup-steps 20", file=sys.stderr)
    elif "pack" in res["manifests"]:
        print(f"\nnext: hrm train {out} --preset cpu-small --steps 200 --warmup-steps 20", file=sys.stderr)
    return 0


def cmd_pipeline(args) -> int:
    """The whole DAG: data stages -> train -> check -> evaluate -> report."""
    _check_before_prefect(args)
    from flows.errors import quiet_user_errors_on_console
    from flows.pipeline_flow import EvalSettings, TrainSettings, pipeline, plan_pipeline

    plan_pipeline(args.stop_after, args.from_stage, args.only, True, True)
    train = TrainSettings(preset=args.preset, arch=args.arch, steps=args.steps, warmup_steps=args.warmup_steps,
                          micro_batch_size=args.micro_batch_size, save_every=args.save_every, num_gpus=args.num_gpus,
                          hostfile=args.hostfile, master_addr=args.master_addr, master_port=args.master_port,
                          node_rank=args.node_rank, extra_args=args.train_arg)
    evaluation = EvalSettings(tasks=args.tasks.split(",") if args.tasks else None, limit=args.limit or None,
                              checkpoint=args.checkpoint, max_gen_toks=args.max_gen_toks, protocol=args.protocol)
    quiet_user_errors_on_console()
    res = pipeline(spec=str(args.spec), output_dir=args.output, overrides=args.set, from_stage=args.from_stage,
                   only=args.only, refresh=args.refresh, stop_after=args.stop_after, benchmarks=args.benchmarks,
                   decontaminate=args.decontaminate, train=train, evaluation=evaluation, progress=not args.no_progress)
    out = Path(res["output_dir"])
    summary = {"output_dir": str(out), "ran": res["ran"],
               "data": {k: v["path"] for k, v in res["manifests"].items()},
               "model": {k: v.get("path") or v.get("html") for k, v in res.get("model", {}).items()}}
    if res.get("stale"):
        summary["stale"] = res["stale"]
    print(json.dumps(summary, indent=2))
    ev = res.get("model", {}).get("evaluate")
    if ev:
        print(f"\nscores: {Path(ev['path']) / 'results.md'}", file=sys.stderr)
    if (out / "report" / "index.html").exists():
        print(f"report: {out / 'report' / 'index.html'}", file=sys.stderr)
    return 0


def cmd_ablation(args) -> int:
    """The ablation ladder on SPEC's data (flows.ablation_flow)."""
    from .checks import require_ok
    from .spec import load_spec

    spec = load_spec(args.spec, args.set)
    require_ok(spec, str(args.spec))
    if args.benchmarks is not None and not Path(args.benchmarks).is_dir():
        _die(f"--benchmarks: {args.benchmarks} is not a folder")
    from flows.ablation_flow import ablation, preset_settings
    from flows.errors import quiet_user_errors_on_console

    over: dict[str, Any] = {"match": args.match}
    for name in ("budget", "flops", "model_preset", "micro_batch_size", "grad_accum", "lr", "warmup_steps", "engine",
                 "num_gpus", "diag_prompts"):
        v = getattr(args, name)
        if v is not None:
            over[{"budget": "budget_tokens", "flops": "budget_flops", "model_preset": "preset"}.get(name, name)] = v
    if args.rungs:
        over["rungs"] = args.rungs.split(",")
    if args.train_arg:
        over["extra_args"] = args.train_arg
    settings, evaluation = preset_settings(args.preset, **over)
    ev = {}
    if args.limit is not None:
        ev["limit"] = args.limit or None
    if args.tasks:
        ev["tasks"] = args.tasks.split(",")
    if args.max_gen_toks is not None:
        ev["max_gen_toks"] = args.max_gen_toks
    if ev:
        evaluation = evaluation.model_copy(update=ev)
    quiet_user_errors_on_console()
    res = ablation(spec=str(args.spec), output_dir=args.output, overrides=args.set, preset=args.preset,
                   settings=settings, evaluation=evaluation, benchmarks=args.benchmarks, progress=not args.no_progress)
    from .ablation_report import markdown_table

    print(markdown_table(res))
    for n in res["notes"]:
        print(f"- {n}")
    print(f"\nwall time: {res['seconds']:.0f} s\nsummary: {res['summary']}\nreport: {res['html']}", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from flows.serve import serve_all

    print("serving the deployments hrm-pipeline/pipeline, hrm-pipeline/ablation, hrm-stage/stage, "
          "hrm-evaluate/evaluate, hrm-lineage/lineage (Ctrl-C stops)", file=sys.stderr)
    serve_all(limit=args.limit)
    return 0


def cmd_server(args) -> int:
    import os

    from flows.serve import start_server

    proc = start_server(port=args.port)
    print(f"Prefect server on http://127.0.0.1:{args.port} (database under {os.environ['PREFECT_HOME']}); the "
          f"zombie-run automation is installed.\nIn another shell: PREFECT_API_URL=http://127.0.0.1:{args.port}/api "
          "hrm serve", file=sys.stderr)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


def cmd_gc(args) -> int:
    from .runs import gc

    res = gc(args.run, apply=args.apply)
    for path, size in res["remove"]:
        print(f"{'removed' if args.apply else 'would remove'} {path} ({_mb(size)})")
    verb = "freed" if args.apply else "would free"
    print(f"{verb} {_mb(res['bytes'])} in {len(res['remove'])} folders; kept {len(res['keep'])} versions named by "
          f"{Path(args.run) / 'run.json'} ({_mb(res['kept_bytes'])})"
          + ("" if args.apply or not res["remove"] else "; run with --apply to remove them"))
    return 0


def cmd_lineage(args) -> int:
    from .runs import RunError
    from .trace import TraceError, format_trace, trace

    try:
        d = trace(args.run, args.id)
    except (TraceError, RunError) as e:  # an unknown id (with similar ids) or an unreadable run: one line, exit 1
        _die(str(e), 1)
    if args.what == "why":
        print("\n".join(d["why"]))
    else:
        print(json.dumps(d, indent=2, default=str) if args.json else format_trace(d))
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    res = write_report(args.run, args.output)
    if res["not_run"]:
        print(f"not run yet (noted in the report): {', '.join(res['not_run'])}", file=sys.stderr)
    print(f"report: {res['html']}\nnumbers: {res['json']}")
    return 0


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def cmd_generators(args) -> int:
    from .generators import GENERATORS

    for name, fn in sorted(GENERATORS.items()):
        doc = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        print(f"{name:<16} {doc}")
    return 0


def _row_defaults(spec):
    """Defaults for the columns a user's rows file leaves out: the spec's default condition (the first
    of its normalize.conditions), else NormalizeConfig's."""
    from .config import NormalizeConfig
    from .rows import RowDefaults

    return RowDefaults(condition=(spec.normalize if spec else NormalizeConfig()).conditions[0])


def cmd_stage(args) -> int:
    from .rows import row_defaults
    from .spec import load_spec

    spec = load_spec(args.spec) if args.spec else None
    if args.name in ("ingest", "normalize") and spec is None:
        _die(f"stage {args.name} needs --spec (its sources)")
    from .storage import is_remote

    if is_remote(args.output):
        _die(f"hrm stage writes a local folder, not {args.output}: use `hrm run SPEC -o {args.output}` to publish "
             "stage outputs to object storage (--input may be a URL)")
    with row_defaults(_row_defaults(spec)):
        man = _run_stage(args, spec)
    print(json.dumps({"stage": args.name, "output": str(Path(args.output).resolve()), "counts": man.get("counts")},
                     indent=2, default=str))
    return 0


def _run_stage(args, spec) -> dict:
    from . import config as C
    from .runs import UPSTREAM, resolve_input

    if args.input:
        args.input = resolve_input(args.input, UPSTREAM.get(args.name, args.name))
    if getattr(args, "mix", None):
        args.mix = resolve_input(args.mix, "mix")

    ov = _overrides(args.set)
    name = args.name
    progress = not args.no_progress
    if name == "ingest":
        from .stages import ingest

        try:
            man = ingest.run(spec.sources, args.output, seed=spec.seed, progress=progress,
                             memory_gb=spec.resources.memory_gb)
        except ingest.SourceFetchError as e:  # a network read: worth running again, not a traceback
            _die(f"{e} (a network error: run the command again to retry)", 1)
    elif name == "normalize":
        from .stages import normalize

        if not args.input:
            _die("stage normalize needs --input (an ingest folder)")
        cfg = _stage_cfg(C.NormalizeConfig, spec.normalize, ov, "normalize")
        man = normalize.run(args.input, args.output, spec.sources, cfg, progress=progress,
                            memory_gb=spec.resources.memory_gb)
    elif name == "stratify":
        from .stages import stratify

        rules = spec.stratify.rules if spec else []
        order = [x.name for x in spec.sources] if spec else None
        man = stratify.run(args.input, args.output, rules, source_order=order, progress=progress,
                           memory_gb=spec.resources.memory_gb if spec else None)
    elif name == "dedup":
        from .stages import dedup

        cfg = _stage_cfg(C.DedupConfig, spec.dedup if spec else None, ov, "dedup")
        man = dedup.run(args.input, args.output, cfg, progress=progress,
                        memory_gb=spec.resources.memory_gb if spec else None)
    elif name == "tokenizer":
        from .stages import tokenize

        cfg = _stage_cfg(C.TokenizerConfig, spec.tokenizer if spec else None, ov, "tokenizer")
        conds = list(spec.normalize.conditions if spec else C.NormalizeConfig().conditions)
        man = tokenize.run(args.input, args.output, cfg, conditions=conds, seed=spec.seed if spec else 1234,
                           progress=progress, memory_gb=spec.resources.memory_gb if spec else None)
    elif name == "mix":
        from .stages import mix

        cfg = _stage_cfg(C.MixConfig, spec.mix if spec else None, ov, "mix")
        rules = spec.stratify.rules if spec else []
        seed = spec.mix_seed if spec else (cfg.seed if cfg.seed is not None else 1234)
        man = mix.run(args.input, args.output, cfg, rules=rules, seed=seed, progress=progress,
                      memory_gb=spec.resources.memory_gb if spec else None)
    elif name == "pack":
        from .stages import pack

        if not args.mix:
            _die("stage pack needs --mix (a mix folder) besides --input (a tokenizer folder)")
        cfg = _stage_cfg(C.PackConfig, spec.pack if spec else None, ov, "pack")
        man = pack.run(args.input, args.mix, args.output, cfg, progress=progress,
                       memory_gb=spec.resources.memory_gb if spec else None)
    else:  # argparse restricts choices
        raise AssertionError(name)
    return man


# Commands with their own argument parsers: everything after the command name is passed on.
PASSTHROUGH = {
    "train": ("training.cli", "train the model on packed shards with DeepSpeed"),
    "eval": ("evaluation.run", "evaluate a checkpoint with lm-evaluation-harness"),
}
STAGE_PASSTHROUGH = {"contamination": "pipeline.stages.contamination"}


def _reporting_errors(fn, *args) -> int:
    """Run a command; a bad spec, path or setting ends it with one `hrm: error:` line, not a traceback
    (HRM_DEBUG=1 shows the traceback)."""
    import os

    from .spec import SpecError

    try:
        return int(fn(*args) or 0)
    except SpecError as e:
        _die(str(e))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        if os.environ.get("HRM_DEBUG"):
            raise
        _die(f"{type(e).__name__}: {e} (set HRM_DEBUG=1 for the traceback)", 1)
    return 1


def _passthrough(module: str, argv: list[str]) -> int:
    import importlib

    return _reporting_errors(importlib.import_module(module).main, argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hrm", description="HRM-Text pretraining pipeline",
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the data flow of a spec under Prefect")
    r.add_argument("spec")
    r.add_argument("--output", "-o", default=None, help="run folder (default runs/<spec name>); a URL (s3://bucket/"
                   "runs/demo, gs://, memory://) computes in a local mirror and publishes every stage version there")
    r.add_argument("--stop-after", default="pack",
                   choices=["ingest", "normalize", "stratify", "dedup", "tokenizer", "contamination", "mix", "pack"])
    r.add_argument("--benchmarks", default=None, metavar="DIR",
                   help="check the training data against the benchmarks in DIR (<name>/<split>.jsonl); "
                        "overrides contamination.benchmarks_dir of the spec")
    r.add_argument("--decontaminate", action="store_true",
                   help="drop the training rows that make a benchmark item dirty before mixing (needs benchmarks)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec setting, e.g. --set dedup.threshold=0.7 --set mix.epochs=2 (repeatable; "
                        "validated like the spec)")
    stage_names = ["ingest", "normalize", "stratify", "dedup", "tokenizer", "contamination", "mix", "pack", "lineage"]
    r.add_argument("--from", dest="from_stage", choices=stage_names, default=None,
                   help="start at this stage; the stages before it are read from the run manifest")
    r.add_argument("--only", choices=stage_names, default=None,
                   help="run this stage alone on the latest outputs of the stages before it (from the run manifest)")
    r.add_argument("--refresh", action="append", default=[], choices=stage_names, metavar="STAGE",
                   help="recompute this stage even if a cached result exists (repeatable)")
    r.add_argument("--runner", choices=["local", "dask"], default=None,
                   help="where the stages' parts run: local (this process) or dask (Prefect tasks on a Dask cluster; "
                        "same outputs); default: the spec's resources.runner (local)")
    r.add_argument("--address", default=None, metavar="tcp://HOST:PORT",
                   help="the Dask scheduler to use (implies --runner dask); default: a LocalCluster on 127.0.0.1")
    r.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes of the LocalCluster (default: the spec's resources.workers, 2)")
    r.add_argument("--no-progress", action="store_true")
    r.set_defaults(fn=cmd_run)

    pp = sub.add_parser("pipeline", help="the whole DAG: data stages, training, contamination check, evaluation, "
                                         "report")
    pp.add_argument("spec")
    pp.add_argument("--output", "-o", default=None, help="run folder (default runs/<spec name>)")
    steps_all = [*stage_names, "train", "check", "evaluate", "report"]
    pp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec setting")
    pp.add_argument("--from", dest="from_stage", choices=steps_all, default=None)
    pp.add_argument("--only", choices=steps_all, default=None)
    pp.add_argument("--refresh", action="append", default=[], choices=steps_all, metavar="STEP")
    pp.add_argument("--stop-after", choices=steps_all, default="report")
    pp.add_argument("--benchmarks", default=None, metavar="DIR",
                    help="benchmark files (<name>/<split>.jsonl): checked against the packed data and evaluated "
                         "beside the held-out demo task")
    pp.add_argument("--decontaminate", action="store_true",
                    help="also drop, before mixing, the rows that make a benchmark item dirty (needs --benchmarks)")
    pp.add_argument("--preset", default="cpu-small", choices=["debug", "cpu-small", "B", "L", "XL", "XXL"])
    pp.add_argument("--arch", default="hrm", choices=["hrm", "transformer"])
    pp.add_argument("--steps", type=int, default=60)
    pp.add_argument("--warmup-steps", type=int, default=10)
    pp.add_argument("--micro-batch-size", type=int, default=8)
    pp.add_argument("--save-every", type=int, default=20)
    pp.add_argument("--num-gpus", type=int, default=1, help="ranks on this machine (>1: the deepspeed launcher)")
    pp.add_argument("--hostfile", default=None, help="DeepSpeed hostfile for several machines")
    pp.add_argument("--master-addr", default=None, help="training rendezvous address (default 127.0.0.1 on one "
                                                        "machine; with --hostfile an address of its first host)")
    pp.add_argument("--master-port", type=int, default=29500, help="training rendezvous port")
    pp.add_argument("--node-rank", type=int, default=None,
                    help="with --hostfile: start this host's ranks only, without ssh")
    pp.add_argument("--train-arg", action="append", default=[], metavar="FLAG",
                    help="another `hrm train` flag, passed on (repeatable), e.g. --train-arg=--ema-decay=0.999")
    pp.add_argument("--limit", type=int, default=50, help="items per benchmark (0: all)")
    pp.add_argument("--tasks", default=None, help="comma-separated eval tasks (default: demo_heldout + given files)")
    pp.add_argument("--checkpoint", choices=["raw", "ema"], default="raw", help="export to evaluate")
    pp.add_argument("--max-gen-toks", type=int, default=256)
    pp.add_argument("--protocol", choices=["harness", "paper", "both"], default="harness",
                    help="evaluation protocol: lm-eval's standard tasks (default), the HRM-Text paper's generative "
                         "one, or both side by side (see hrm eval -h)")
    pp.add_argument("--no-progress", action="store_true")
    pp.set_defaults(fn=cmd_pipeline)

    ab = sub.add_parser("ablation", help="the paper's ablation ladder (Transformer full LM loss -> answer-only loss "
                                         "-> PrefixLM -> HRM) on a spec's data: train, evaluate, diagnose, report")
    ab.add_argument("spec")
    ab.add_argument("--output", "-o", default=None, help="run folder (default runs/<spec name>); the ladder goes "
                                                         "in <run>/ablation")
    ab.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a spec setting")
    ab.add_argument("--preset", default="cpu", choices=["cpu", "gpu", "tiny"],
                    help="cpu: the 2-core default (cpu-small model, 131,072 tokens a rung); gpu: a real run "
                         "(model B, 2e9 tokens); tiny: the tests'")
    ab.add_argument("--budget", type=int, default=None, metavar="TOKENS",
                    help="training tokens of each rung (the HRM's with --match flops)")
    ab.add_argument("--flops", type=float, default=None, help="instead: training FLOPs of each rung")
    ab.add_argument("--match", choices=["tokens", "flops"], default="tokens",
                    help="tokens: same tokens for every rung (the HRM spends ~3x the FLOPs); flops: the "
                         "Transformers get more tokens, to the HRM's FLOPs")
    ab.add_argument("--model-preset", default=None, choices=["debug", "cpu-small", "B", "L", "XL", "XXL"])
    ab.add_argument("--rungs", default=None, help="comma-separated subset of transformer-full,transformer-answer,"
                                                  "transformer-prefix,hrm")
    ab.add_argument("--micro-batch-size", type=int, default=None)
    ab.add_argument("--grad-accum", type=int, default=None)
    ab.add_argument("--lr", type=float, default=None)
    ab.add_argument("--warmup-steps", type=int, default=None)
    ab.add_argument("--engine", choices=["deepspeed", "torch"], default=None)
    ab.add_argument("--num-gpus", type=int, default=None)
    ab.add_argument("--train-arg", action="append", default=[], metavar="FLAG", help="another `hrm train` flag")
    ab.add_argument("--benchmarks", default=None, metavar="DIR", help="benchmark files, evaluated beside demo_heldout")
    ab.add_argument("--tasks", default=None, help="comma-separated eval tasks")
    ab.add_argument("--limit", type=int, default=None, help="items per benchmark (0: all)")
    ab.add_argument("--max-gen-toks", type=int, default=None)
    ab.add_argument("--diag-prompts", type=int, default=None, help="held-out prompts for the logit lens / entropy")
    ab.add_argument("--no-progress", action="store_true")
    ab.set_defaults(fn=cmd_ablation)

    sv = sub.add_parser("serve", help="serve the pipeline's deployments to the Prefect UI (Run buttons)")
    sv.add_argument("--limit", type=int, default=None, help="flow runs at a time")
    sv.set_defaults(fn=cmd_serve)
    srv = sub.add_parser("server", help="start a local Prefect server (UI + API) bound to 127.0.0.1")
    srv.add_argument("--port", type=int, default=4200)
    srv.set_defaults(fn=cmd_server)

    gcp = sub.add_parser("gc", help="remove stage versions that the run manifest does not reference")
    gcp.add_argument("run", help="run folder (runs/<name>)")
    gcp.add_argument("--apply", action="store_true", help="remove them (default: only print what would be freed)")
    gcp.set_defaults(fn=cmd_gc)

    rp = sub.add_parser("report", help="write a run's self-contained HTML report (and its JSON)")
    rp.add_argument("run", help="run folder (runs/<name>)")
    rp.add_argument("--output", "-o", default=None, help="folder for index.html and report.json (default RUN/report)")
    rp.set_defaults(fn=cmd_report)

    ln = sub.add_parser("lineage", help="trace one row of a run: hrm lineage {trace,why} RUN ID")
    lsub = ln.add_subparsers(dest="what", required=True)
    lt = lsub.add_parser("trace", help="the row's origin and what every stage did with it (shards, checkpoints)")
    lw = lsub.add_parser("why", help="one or two lines: where the row was packed, or where and why it was removed")
    for q in (lt, lw):
        q.add_argument("run", help="run folder (runs/<name>)")
        q.add_argument("id", help="row id as normalize gives it: <source>/<row id>, e.g. wp/17")
    lt.add_argument("--json", action="store_true", help="the whole trace as JSON")
    ln.set_defaults(fn=cmd_lineage)

    v = sub.add_parser("validate", help="load and check a spec")
    v.add_argument("spec")
    v.set_defaults(fn=cmd_validate)

    pl = sub.add_parser("plan", help="dry run: print strata and expected unique/seen tokens, no downloads")
    pl.add_argument("spec")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=cmd_plan)

    st = sub.add_parser("stage", help="run one stage alone on your files")
    st.add_argument("name", choices=["ingest", "normalize", "stratify", "dedup", "tokenizer", "mix", "pack",
                                     "contamination"])
    st.add_argument("--input", "-i", help="input: a stage folder, or a .jsonl/.parquet file of rows")
    st.add_argument("--output", "-o", required=True, help="output folder")
    st.add_argument("--spec", help="spec to take the stage's settings from (defaults otherwise)")
    st.add_argument("--mix", help="pack only: the mix folder")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting of the stage, e.g. --set threshold=0.7 (repeatable)")
    st.add_argument("--no-progress", action="store_true")
    st.set_defaults(fn=cmd_stage)

    for name, (_, helptext) in PASSTHROUGH.items():
        sub.add_parser(name, help=helptext + f" (hrm {name} -h)", add_help=False)
    g = sub.add_parser("generators", help="list the built-in generators")
    g.set_defaults(fn=cmd_generators)
    return p


# Quiet, offline-friendly Prefect defaults (a user's own settings win).
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


# Caches stay in the project's .cache/ unless the user points them elsewhere; the folders are created
# here, since Prefect's ephemeral server cannot start on a PREFECT_HOME that does not exist.
CACHE_DIRS = {"PREFECT_HOME": "prefect", "HF_HOME": "hf", "TORCH_EXTENSIONS_DIR": "torch_extensions"}


def ensure_cache_dirs() -> None:
    import os

    root = Path(__file__).resolve().parents[1] / ".cache"
    for var, sub in CACHE_DIRS.items():
        os.environ.setdefault(var, str(root / sub))
        Path(os.environ[var]).expanduser().mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    import os

    for k, v in PREFECT_DEFAULTS.items():
        os.environ.setdefault(k, v)
    ensure_cache_dirs()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in PASSTHROUGH:
        return _passthrough(PASSTHROUGH[argv[0]][0], argv[1:])
    if len(argv) > 1 and argv[0] == "stage" and argv[1] in STAGE_PASSTHROUGH:
        return _passthrough(STAGE_PASSTHROUGH[argv[1]], argv[2:])
    args = build_parser().parse_args(argv)
    if args.cmd == "stage" and args.name not in ("ingest",) and not args.input:
        _die(f"stage {args.name} needs --input")
    return _reporting_errors(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
