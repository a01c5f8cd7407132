"""The data flow: ingest -> normalize -> stratify -> dedup -> tokenizer -> [contamination] -> mix -> pack
-> lineage, one task each.

Outputs are content-addressed: each stage writes `<run>/<stage>/<version>/`, where the version is the
first 16 hex digits of the stage's fingerprint (its code, its parameters and the content of its inputs;
see `pipeline.io.open_stage`), and the run manifest `<run>/run.json` names the version every stage of
the last run used (`pipeline.runs`). A folder is never reused unless its name and manifest carry the
fingerprint the run asks for: reverting a parameter finds the version computed before and recomputes
nothing; a folder written with other settings is never taken for it.

Caching (`flows.cache.StageCache`) is keyed on the content of the input folders, the stage parameters
and the code, with results persisted under `<run>/.prefect/results`. A cached result (a stage manifest)
is used only when the version folder it names is still there with the same fingerprint; otherwise the
task runs again.

Reruns: `overrides` (`["dedup.threshold=0.7"]`) change spec settings, typed and validated like the
spec; `from_stage` starts at a stage and `only` runs one stage, both reading the outputs of the stages
before it from the run manifest; `refresh` recomputes the named stages even when cached. A run holds the
run folder's lock (`pipeline.runs.run_lock`): a second concurrent run on the same folder fails at once.

The contamination check runs when the spec has a `contamination:` section with benchmarks (a local
`benchmarks_dir`, or `hub: true`), or when the flow is given `benchmarks=DIR`; otherwise it is skipped
with a log line saying how to turn it on. With `decontaminate: true`, mix and pack read the
contamination folder (the training rows minus those that make a benchmark item dirty), and the lineage
counts the dropped rows under `contamination:benchmark_contamination`.

Retries are for network reads only (the ingest of Hub sources); a deterministic error (a bad setting,
a missing file) fails the task at once with its one-line message.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline.config import (ContaminationConfig, ContaminationSpec, DedupConfig, MixConfig, NormalizeConfig,
                             PackConfig, RunSpec, SourceSpec, StratumRule, TokenizerConfig)
from pipeline.io import completed_manifest, sha256_file, sha256_json
from pipeline.runs import RunError, read_run, run_lock, stage_dir, stage_entry, write_run, RUN_MANIFEST
from pipeline.checks import require_ok
from pipeline import storage
from pipeline.spec import load_spec
from pipeline.stages.ingest import local_files

from .cache import StageCache
from .dask_runner import map_parts, parts_runner
from .errors import retry_on_network_errors

STAGES = ("ingest", "normalize", "stratify", "dedup", "tokenizer", "contamination", "mix", "pack")
OPTIONAL = ("contamination",)  # stages that run only when the spec asks for them
ALL_STAGES = (*STAGES, "lineage")


def _opts(path_params: tuple[str, ...], *modules: str) -> dict:
    return dict(cache_policy=StageCache(path_params=path_params, modules=modules), persist_result=True,
                result_serializer="json")


@task(name="ingest", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_on_network_errors,
      **_opts((), "pipeline.stages.ingest", "pipeline.generators"))
def ingest_task(sources: list[SourceSpec], output_dir: str, seed: int, local_file_hashes: dict[str, str],
                progress: bool = True, versioned: bool = True, force: bool = False,
                memory_gb: float | None = None) -> dict:
    from pipeline.stages import ingest

    return ingest.run(sources, output_dir, seed=seed, progress=progress, versioned=versioned, force=force,
                      memory_gb=memory_gb, map_parts=map_parts())


@task(name="normalize", **_opts(("ingest_dir",), "pipeline.stages.normalize", "pipeline.rows"))
def normalize_task(ingest_dir: str, output_dir: str, sources: list[SourceSpec], cfg: NormalizeConfig,
                   progress: bool = True, versioned: bool = True, force: bool = False,
                   memory_gb: float | None = None) -> dict:
    from pipeline.stages import normalize

    return normalize.run(ingest_dir, output_dir, sources, cfg, progress=progress, versioned=versioned, force=force,
                         memory_gb=memory_gb, map_parts=map_parts())


@task(name="stratify", **_opts(("input_dir",), "pipeline.stages.stratify", "pipeline.rows"))
def stratify_task(input_dir: str, output_dir: str, rules: list[StratumRule], source_order: list[str],
                  progress: bool = True, versioned: bool = True, force: bool = False,
                  memory_gb: float | None = None) -> dict:
    from pipeline.stages import stratify

    return stratify.run(input_dir, output_dir, rules, source_order=source_order, progress=progress,
                        versioned=versioned, force=force, memory_gb=memory_gb)


@task(name="dedup", **_opts(("input_dir",), "pipeline.stages.dedup", "pipeline.minhash", "pipeline.rows"))
def dedup_task(input_dir: str, output_dir: str, cfg: DedupConfig, progress: bool = True, versioned: bool = True,
               force: bool = False, memory_gb: float | None = None) -> dict:
    from pipeline.stages import dedup

    return dedup.run(input_dir, output_dir, cfg, progress=progress, versioned=versioned, force=force,
                     memory_gb=memory_gb, map_parts=map_parts())


@task(name="tokenizer", **_opts(("input_dir",), "pipeline.stages.tokenize", "pipeline.rows"))
def tokenizer_task(input_dir: str, output_dir: str, cfg: TokenizerConfig, conditions: list[str], seed: int,
                   progress: bool = True, versioned: bool = True, force: bool = False,
                   memory_gb: float | None = None) -> dict:
    from pipeline.stages import tokenize

    return tokenize.run(input_dir, output_dir, cfg, conditions=conditions, seed=seed, progress=progress,
                        versioned=versioned, force=force, memory_gb=memory_gb)


@task(name="contamination", **_opts(("input_dir", "benchmarks"), "pipeline.stages.contamination"))
def contamination_task(input_dir: str, benchmarks: str | list[str], output_dir: str, cfg: ContaminationConfig,
                       progress: bool = True, versioned: bool = True, force: bool = False,
                       memory_gb: float | None = None) -> dict:
    """`benchmarks`: a local benchmark folder (hashed by content for the cache) or Hub names."""
    from pipeline.stages import contamination

    return contamination.run(input_dir, benchmarks, output_dir, cfg, progress=progress, versioned=versioned,
                             force=force, map_parts=map_parts(), memory_gb=memory_gb)


@task(name="mix", **_opts(("input_dir",), "pipeline.stages.mix"))
def mix_task(input_dir: str, output_dir: str, cfg: MixConfig, rules: list[StratumRule], seed: int,
             progress: bool = True, versioned: bool = True, force: bool = False,
             memory_gb: float | None = None) -> dict:
    from pipeline.stages import mix

    return mix.run(input_dir, output_dir, cfg, rules=rules, seed=seed, progress=progress, versioned=versioned,
                   force=force, memory_gb=memory_gb)


@task(name="pack", **_opts(("tokenized_dir", "mix_dir"), "pipeline.stages.pack"))
def pack_task(tokenized_dir: str, mix_dir: str, output_dir: str, cfg: PackConfig, progress: bool = True,
              versioned: bool = True, force: bool = False, memory_gb: float | None = None) -> dict:
    from pipeline.stages import pack

    return pack.run(tokenized_dir, mix_dir, output_dir, cfg, progress=progress, versioned=versioned, force=force,
                    memory_gb=memory_gb, map_parts=map_parts())


@task(name="lineage", **_opts(("stage_dirs",), "pipeline.lineage"))
def lineage_task(stage_dirs: dict[str, str], output_dir: str, title: str, progress: bool = True,
                 versioned: bool = True, force: bool = False, memory_gb: float | None = None) -> dict:
    """`stage_dirs`: {stage: version folder} of the stages it reads (hashed by content for the cache)."""
    from pipeline import lineage

    man = lineage.run(stage_dirs, output_dir, progress=progress, title=title, versioned=versioned, force=force,
                      memory_gb=memory_gb)
    if not man["counts"]["balanced"]:  # the report is written first, so the rows at fault can be read
        raise lineage.LineageError(f"lineage does not balance: some rows are unaccounted for, removed twice or both "
                                   f"removed and packed; see {Path(man['path']) / 'lineage.json'}")
    return man


def result_intact(m: Any) -> bool:
    """A (possibly cached) stage result may be used: it names a version folder that still holds a
    finished run of the same fingerprint, with every output file present at its recorded size."""
    if not isinstance(m, dict) or not m.get("path") or not m.get("fingerprint"):
        return False
    return completed_manifest(m["path"], m["fingerprint"], verify=False) is not None


def _local_hashes(spec: RunSpec) -> dict[str, str]:
    """Local source files by content, so a changed file invalidates the ingest cache."""
    return {s.name: json.dumps({str(f): sha256_file(f) for f in local_files(s.path)}, sort_keys=True)
            for s in spec.sources if s.kind == "local"}


def artifact_key(*parts: str) -> str:
    """An artifact key (lowercase letters, digits and dashes)."""
    import re

    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def _summary_markdown(spec: RunSpec, root: Path, manifests: dict[str, dict], ran: list[str]) -> str:
    lines = [f"# Data run `{spec.name}`", "", f"Run folder: `{root}`", "",
             "| stage | version | counts |", "|---|---|---|"]
    for st in ALL_STAGES:
        if st in manifests:
            c = {k: v for k, v in manifests[st].get("counts", {}).items() if not isinstance(v, dict)}
            how = "" if st in ran else " (from the run manifest)"
            lines.append(f"| {st} | `{Path(manifests[st]['path']).name}`{how} | "
                         + ", ".join(f"{k}={v}" for k, v in c.items()) + " |")
    if "contamination" in manifests:
        dirty = manifests["contamination"].get("counts", {}).get("dirty", {})
        lines += ["", "Dirty benchmark items (13-gram coverage >= 80%): "
                  + ", ".join(f"{k}={v}" for k, v in dirty.items())]
    if "lineage" in manifests:
        c = manifests["lineage"].get("counts", {})
        lines += ["", f"Lineage: {c.get('rows_stratified')} rows stratified = {c.get('rows_packed')} packed + "
                  f"{c.get('rows_removed')} removed; balanced: {c.get('balanced')} "
                  f"({Path(manifests['lineage']['path']) / 'lineage.json'})"]
    return "\n".join(lines)


def contamination_settings(s: RunSpec, benchmarks: str | None, decontaminate: bool | None) -> ContaminationSpec | None:
    """The spec's contamination section with the flow's overrides applied; None when it is off."""
    if benchmarks is None and decontaminate is None:
        c = s.contamination
    else:
        data = s.contamination.model_dump() if s.contamination is not None else {}
        if benchmarks is not None:
            data["benchmarks_dir"] = str(benchmarks)
        if decontaminate is not None:
            data["decontaminate"] = bool(decontaminate)
        c = ContaminationSpec.model_validate(data)
    if c is not None and c.decontaminate and not c.enabled:
        raise ValueError("decontaminate needs benchmarks: set contamination.benchmarks_dir (or hub: true) in the "
                         "spec, or pass --benchmarks DIR")
    return c if c is not None and c.enabled else None


def plan_stages(stop_after: str, from_stage: str | None, only: str | None, contam_on: bool) -> list[str]:
    """The stages this run executes, in order."""
    for name, val in (("stop_after", stop_after), ("from_stage", from_stage), ("only", only)):
        if val is not None and val not in ALL_STAGES:
            raise ValueError(f"{name} must be one of {', '.join(ALL_STAGES)}, got {val!r}")
    if from_stage and only:
        raise ValueError("give either from_stage (--from) or only (--only), not both")
    if only:
        if only == "contamination" and not contam_on:
            raise ValueError("only=contamination needs benchmarks: set contamination.benchmarks_dir (or hub: true) "
                             "in the spec, or pass --benchmarks DIR")
        return [only]
    last = ALL_STAGES.index("lineage" if stop_after == "pack" else stop_after)
    first = ALL_STAGES.index(from_stage) if from_stage else 0
    if first > last:
        raise ValueError(f"from_stage {from_stage!r} comes after stop_after {stop_after!r}")
    return [st for st in ALL_STAGES[first:last + 1] if st != "contamination" or contam_on]


def _mark_stale(stages: dict[str, dict]) -> None:
    """Flag run-manifest entries made from another version of a stage than the one the run now has."""
    for st in ALL_STAGES:  # in flow order, so staleness carries down the chain
        ent = stages.get(st)
        if ent is None:
            continue
        ent.pop("stale", None)
        for up, ver in (ent.get("inputs") or {}).items():
            cur = stages.get(up, {})
            if cur.get("version") is not None and cur["version"] != ver:
                ent["stale"] = f"made from {up} version {ver}, the run now has {up} version {cur['version']}"
                break
            if cur.get("stale"):
                ent["stale"] = f"made from {up}, which is stale"
                break


@flow(name="hrm-data", log_prints=True)
def data_flow(spec: str = "demo", output_dir: str | None = None, stop_after: str = "pack",
              benchmarks: str | None = None, decontaminate: bool | None = None,
              overrides: list[str] | None = None, from_stage: str | None = None, only: str | None = None,
              refresh: list[str] | None = None, progress: bool = True, runner: str | None = None,
              address: str | None = None, workers: int | None = None) -> dict[str, Any]:
    """Run the data stages of SPEC (a path or a bundled spec name) into OUTPUT_DIR (default runs/<name>).

    `stop_after` ends the flow after that stage (ingest ... pack; pack is followed by lineage).
    `overrides`: spec settings as KEY=VALUE (`dedup.threshold=0.7`), validated like the spec.
    `from_stage` starts at that stage, `only` runs that stage alone: both read the outputs of the stages
    before it from the run manifest. `refresh` recomputes the named stages even if cached.
    `benchmarks` (a local benchmark folder) and `decontaminate` override the spec's contamination section.
    `runner` ("local" or "dask"), `address` and `workers` override the spec's resources.runner, .address and
    .workers: with dask, the stages' parts run as tasks on a Dask cluster (flows/dask_runner.py), same outputs."""
    refresh = list(refresh or [])
    bad = [r for r in refresh if r not in ALL_STAGES]
    if bad:
        raise ValueError(f"refresh: unknown stage(s) {bad}; stages are {', '.join(ALL_STAGES)}")
    s = load_spec(spec, overrides)
    if only is None and from_stage is None or (from_stage or only) == "ingest":
        require_ok(s, str(spec))  # local files exist, generator parameters are accepted: before any work
    contam = contamination_settings(s, benchmarks, decontaminate)
    if contam is not None and contam.benchmarks_dir is not None and not Path(contam.benchmarks_dir).is_dir():
        raise FileNotFoundError(f"contamination.benchmarks_dir: {contam.benchmarks_dir} is not a folder")
    todo = plan_stages(stop_after, from_stage, only, contam is not None)
    remote = str(output_dir).rstrip("/") if storage.is_remote(output_dir) else None
    if remote:  # computed in a local mirror; each finished stage version is published (pipeline/storage.py)
        root = storage.mirror_dir(remote)
    else:
        root = Path(storage.local_path(output_dir) if output_dir else Path("runs") / s.name).resolve()
    logger = get_run_logger()
    with run_lock(root, what=f"hrm run {spec}") as lock:
        if lock.get("taken_over"):
            h = lock["taken_over"]
            logger.warning("took over the lock of %s left by PID %s (%s, started %s), which is no longer running",
                           root, h.get("pid"), h.get("what"), h.get("started"))
        if not remote:
            return _run(s, spec, root, todo, contam, refresh, overrides, progress, logger, runner=runner,
                        address=address, workers=workers)
        with storage.mirror(root, remote):
            if storage.pull_file(storage.join(remote, RUN_MANIFEST), root / RUN_MANIFEST):
                logger.info("remote run %s: run manifest fetched into the local mirror %s", remote, root)
            res = _run(s, spec, root, todo, contam, refresh, overrides, progress, logger, runner=runner,
                       address=address, workers=workers)
        logger.info("remote run %s: every stage version published (files, then _files.json), then run.json", remote)
        return {**res, "output_dir": remote, "mirror": str(root)}


def run_label(s: RunSpec, root: Path) -> str:
    """What artifact keys start with: the spec name and a short hash of the run folder, so two runs of
    one spec in different folders never overwrite each other's artifacts."""
    return f"{s.name}-{sha256_json(str(root))[:8]}"


def _counts_artifact(st: str, m: dict, label: str) -> None:
    """A table of what the stage did (its flat counts), with the absolute folder it wrote."""
    rows = [{"count": k, "value": v} for k, v in m.get("counts", {}).items() if not isinstance(v, (dict, list))]
    rows.append({"count": "folder", "value": m["path"]})
    create_table_artifact(rows, key=artifact_key(st, label), description=f"{st}: {m['path']}")


def _run(s: RunSpec, spec_arg: str, root: Path, todo: list[str], contam: ContaminationSpec | None,
         refresh: list[str], overrides: list[str] | None, progress: bool, logger,
         label: str | None = None, check_later: bool = False, runner: str | None = None,
         address: str | None = None, workers: int | None = None) -> dict[str, Any]:
    """The stages of TODO, their parts on the runner given (else the spec's resources.runner)."""
    r = s.resources
    runner = runner or (address and "dask") or r.runner
    address = address or (r.address if runner == "dask" else None)
    if runner != "local":
        logger.info("runner: %s (%s)", runner, address or f"LocalCluster of {workers or r.workers} workers on 127.0.0.1")
    with parts_runner(runner, address, workers or r.workers):
        return _run_stages(s, spec_arg, root, todo, contam, refresh, overrides, progress, logger, label, check_later)


def _run_stages(s: RunSpec, spec_arg: str, root: Path, todo: list[str], contam: ContaminationSpec | None,
                refresh: list[str], overrides: list[str] | None, progress: bool, logger,
                label: str | None = None, check_later: bool = False) -> dict[str, Any]:
    label = label or run_label(s, root)
    results = root / ".prefect" / "results"
    t0 = time.time()
    prev = read_run(root) if (root / RUN_MANIFEST).exists() else {}
    entries: dict[str, dict] = dict(prev.get("stages") or {})
    man: dict[str, dict] = {}
    paths: dict[str, str] = {}
    ran: list[str] = []

    def record(st: str, m: dict, inputs: dict[str, str]) -> None:
        man[st] = m
        paths[st] = m["path"]
        entries[st] = stage_entry(root, st, m, {k: Path(v).name for k, v in inputs.items()})
        _mark_stale(entries)
        cur = read_run(root) if (root / RUN_MANIFEST).exists() else prev  # keeps what other commands wrote since
        run = _run_manifest(s, spec_arg, root, entries, contam, overrides, cur)
        remote = storage.remote_for(root)
        if remote:
            run["remote"] = remote
        write_run(root, run)
        if remote:  # the version (its files, then its _files.json), then the run manifest naming it
            storage.publish_version(m["path"])
            storage.write_bytes(storage.join(remote, RUN_MANIFEST), (root / RUN_MANIFEST).read_bytes())

    def upstream(st: str) -> str:
        """The folder of an earlier stage: from this run, else from the run manifest."""
        if st not in paths:
            d = stage_dir(root, st) if (root / RUN_MANIFEST).exists() else None
            if d is None:
                raise RunError(f"{root}: no {st} output to start from (no run manifest): run the whole flow first")
            m = completed_manifest(d, json.loads((d / "manifest.json").read_text()).get("fingerprint", ""),
                                   verify=False)
            if m is None:
                raise RunError(f"{root}: the {st} output {d} is incomplete: rerun `hrm run` from {st}")
            man[st] = {**m, "path": str(d.resolve())}
            paths[st] = str(d.resolve())
        return paths[st]

    def call(t, st: str, inputs: dict[str, Any], ups: list[str], **kw) -> dict:
        """Run (or take from the cache) stage ST's task; INPUTS are its folder arguments, UPS the stages
        they come from (recorded with their versions in the run manifest)."""
        force = st in refresh
        common = dict(progress=progress, versioned=True, output_dir=str(root / st), **inputs, **kw)
        m = t.with_options(result_storage=results, refresh_cache=force)(force=force, **common)
        if not result_intact(m):
            logger.warning("%s: the cached result names %s, which is gone or changed since: recomputing", st,
                           m.get("path") if isinstance(m, dict) else m)
            m = t.with_options(result_storage=results, refresh_cache=True)(force=False, **common)
        ran.append(st)
        record(st, m, {u: paths[u] for u in ups})
        if st != "lineage":
            _counts_artifact(st, m, label)
        return m

    decon = contam is not None and contam.decontaminate

    def train_rows() -> tuple[str, str]:
        """(stage, folder) of the rows mix and pack read: the tokenizer's, or the decontaminated ones."""
        st = "contamination" if decon else "tokenizer"
        return st, upstream(st)

    def step(st: str) -> dict | None:
        if st == "ingest":
            return call(ingest_task, st, {}, [], sources=s.sources, seed=s.seed, local_file_hashes=_local_hashes(s),
                        memory_gb=s.resources.memory_gb)
        if st == "normalize":
            return call(normalize_task, st, {"ingest_dir": upstream("ingest")}, ["ingest"], sources=s.sources, cfg=s.normalize,
                        memory_gb=s.resources.memory_gb)
        if st == "stratify":
            return call(stratify_task, st, {"input_dir": upstream("normalize")}, ["normalize"], rules=s.stratify.rules,
                        source_order=[x.name for x in s.sources], memory_gb=s.resources.memory_gb)
        if st == "dedup":
            return call(dedup_task, st, {"input_dir": upstream("stratify")}, ["stratify"], cfg=s.dedup,
                        memory_gb=s.resources.memory_gb)
        if st == "tokenizer":
            return call(tokenizer_task, st, {"input_dir": upstream("dedup")}, ["dedup"], cfg=s.tokenizer,
                        conditions=list(s.normalize.conditions), seed=s.seed, memory_gb=s.resources.memory_gb)
        if st == "contamination":
            assert contam is not None
            cfg = ContaminationConfig(**contam.model_dump(exclude={"benchmarks_dir", "hub"}))
            bench: str | list[str]
            if contam.benchmarks_dir is not None:
                bench = str(Path(contam.benchmarks_dir).resolve())
            else:
                from pipeline.stages.contamination import HUB

                bench = list(cfg.benchmarks or HUB)
            return call(contamination_task, st, {"input_dir": upstream("tokenizer")}, ["tokenizer"], benchmarks=bench, cfg=cfg,
                        memory_gb=s.resources.memory_gb)
        if st == "mix":
            src, rows = train_rows()
            return call(mix_task, st, {"input_dir": rows}, [src], cfg=s.mix, rules=s.stratify.rules, seed=s.mix_seed,
                        memory_gb=s.resources.memory_gb)
        if st == "pack":
            src, rows = train_rows()
            return call(pack_task, st, {"tokenized_dir": rows, "mix_dir": upstream("mix")}, [src, "mix"], cfg=s.pack,
                        memory_gb=s.resources.memory_gb)
        if st == "lineage":
            dirs = {x: upstream(x) for x in ("normalize", "stratify", "dedup", "tokenizer", "mix", "pack")}
            if decon:
                dirs["contamination"] = upstream("contamination")
            m = call(lineage_task, st, {"stage_dirs": dirs}, list(dirs), title=f"{s.name} ({root})",
                     memory_gb=s.resources.memory_gb)
            create_markdown_artifact((Path(m["path"]) / "lineage.md").read_text(),
                                     key=artifact_key("lineage", label),
                                     description=f"lineage of {s.name} in {root}: where every row came from, why "
                                                 "every dropped row was dropped")
            return m
        raise AssertionError(st)

    if contam is None and "contamination" not in todo and todo[-1] in ("mix", "pack", "lineage"):
        if check_later:
            logger.info("contamination: no decontamination before mixing (the pipeline's check step runs on the "
                        "packed data; --decontaminate with --benchmarks drops dirty-making rows before mixing)")
        else:
            logger.info("contamination: skipped (no benchmarks: set contamination.benchmarks_dir or hub: true "
                        "in the spec, or pass --benchmarks DIR)")
    for st in todo:
        m = step(st)
        if m is None:
            continue
        logger.info("%s: %s -> %s", st, {k: v for k, v in m.get("counts", {}).items() if not isinstance(v, dict)},
                    m["path"])
    create_markdown_artifact(_summary_markdown(s, root, man, ran), key=artifact_key("data-run", label),
                             description=f"data stages of {s.name} in {root}")
    logger.info("data flow done in %.1f s: %s", time.time() - t0, root)
    stale = {k: v["stale"] for k, v in entries.items() if v.get("stale")}
    if stale:
        logger.warning("stages of %s not rerun and now stale: %s (rerun with --from the first of them)", root,
                       ", ".join(stale))
    return {"output_dir": str(root), "manifests": man, "ran": ran, "stale": stale}


def _run_manifest(s: RunSpec, spec_arg: str, root: Path, entries: dict[str, dict], contam, overrides,
                  prev: dict) -> dict:
    run = {k: v for k, v in prev.items() if k not in ("stages",)}  # keeps train/eval records of other commands
    run.update({
        "format": 1,
        "name": s.name,
        "spec_arg": str(spec_arg),
        "overrides": list(overrides or []),
        "spec": s.model_dump(mode="json"),
        "contamination": contam.model_dump(mode="json") if contam is not None else None,
        "output_dir": str(root),
        "updated": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "stages": {st: entries[st] for st in ALL_STAGES if st in entries},
    })
    return run


__all__ = ["data_flow", "STAGES", "OPTIONAL", "ALL_STAGES", "plan_stages", "result_intact", "artifact_key"]
