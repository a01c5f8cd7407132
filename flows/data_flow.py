"""The data flow: ingest -> normalize -> stratify -> dedup -> tokenizer -> [contamination] -> mix -> pack
-> lineage, one task each.

The contamination check runs when the spec has a `contamination:` section with benchmarks (a local
`benchmarks_dir`, or `hub: true`), or when the flow is given `benchmarks=DIR`; otherwise it is skipped
with a log line saying how to turn it on. With `decontaminate: true`, mix and pack read the
contamination folder (the training rows minus those that make a benchmark item dirty), and the lineage
counts the dropped rows under `contamination:benchmark_contamination`.

Tasks are thin: they call `pipeline.stages.*`, pass folder paths and return the stage manifests (small
JSON), never the data. Caching (`flows.cache.StageCache`) is keyed on the content of the input folders,
the stage parameters and the code, with results persisted under `<run dir>/.prefect/results`, so an
unchanged rerun hits the cache for every task and a changed dedup threshold reruns dedup and what follows.
A stage folder that was deleted or damaged since is recomputed (the cache is refreshed for it).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from pipeline.config import (ContaminationConfig, ContaminationSpec, DedupConfig, MixConfig, NormalizeConfig,
                             PackConfig, RunSpec, SourceSpec, StratumRule, TokenizerConfig)
from pipeline.io import MANIFEST, content_hash, read_json, sha256_file, write_json
from pipeline.spec import load_spec
from pipeline.stages.ingest import local_files

from .cache import StageCache

STAGES = ("ingest", "normalize", "stratify", "dedup", "tokenizer", "contamination", "mix", "pack")
OPTIONAL = ("contamination",)  # stages that run only when the spec asks for them


def _opts(path_params: tuple[str, ...], *modules: str) -> dict:
    return dict(cache_policy=StageCache(path_params=path_params, modules=modules), persist_result=True,
                result_serializer="json")


@task(name="ingest", retries=2, retry_delay_seconds=10, **_opts((), "pipeline.stages.ingest", "pipeline.generators"))
def ingest_task(sources: list[SourceSpec], output_dir: str, seed: int, local_file_hashes: dict[str, str],
                progress: bool = True) -> dict:
    from pipeline.stages import ingest

    return ingest.run(sources, output_dir, seed=seed, progress=progress)


@task(name="normalize", **_opts(("ingest_dir",), "pipeline.stages.normalize", "pipeline.rows"))
def normalize_task(ingest_dir: str, output_dir: str, sources: list[SourceSpec], cfg: NormalizeConfig,
                   progress: bool = True) -> dict:
    from pipeline.stages import normalize

    return normalize.run(ingest_dir, output_dir, sources, cfg, progress=progress)


@task(name="stratify", **_opts(("input_dir",), "pipeline.stages.stratify", "pipeline.rows"))
def stratify_task(input_dir: str, output_dir: str, rules: list[StratumRule], source_order: list[str],
                  progress: bool = True) -> dict:
    from pipeline.stages import stratify

    return stratify.run(input_dir, output_dir, rules, source_order=source_order, progress=progress)


@task(name="dedup", **_opts(("input_dir",), "pipeline.stages.dedup", "pipeline.minhash", "pipeline.rows"))
def dedup_task(input_dir: str, output_dir: str, cfg: DedupConfig, progress: bool = True) -> dict:
    from pipeline.stages import dedup

    return dedup.run(input_dir, output_dir, cfg, progress=progress)


@task(name="tokenizer", **_opts(("input_dir",), "pipeline.stages.tokenize", "pipeline.rows"))
def tokenizer_task(input_dir: str, output_dir: str, cfg: TokenizerConfig, conditions: list[str], seed: int,
                   progress: bool = True) -> dict:
    from pipeline.stages import tokenize

    return tokenize.run(input_dir, output_dir, cfg, conditions=conditions, seed=seed, progress=progress)


@task(name="contamination", **_opts(("input_dir", "benchmarks"), "pipeline.stages.contamination"))
def contamination_task(input_dir: str, benchmarks: str | list[str], output_dir: str, cfg: ContaminationConfig,
                       progress: bool = True) -> dict:
    """`benchmarks`: a local benchmark folder (hashed by content for the cache) or Hub names."""
    from pipeline.stages import contamination

    return contamination.run(input_dir, benchmarks, output_dir, cfg, progress=progress)


@task(name="mix", **_opts(("input_dir",), "pipeline.stages.mix"))
def mix_task(input_dir: str, output_dir: str, cfg: MixConfig, rules: list[StratumRule], seed: int,
             progress: bool = True) -> dict:
    from pipeline.stages import mix

    return mix.run(input_dir, output_dir, cfg, rules=rules, seed=seed, progress=progress)


@task(name="pack", **_opts(("tokenized_dir", "mix_dir"), "pipeline.stages.pack"))
def pack_task(tokenized_dir: str, mix_dir: str, output_dir: str, cfg: PackConfig, progress: bool = True) -> dict:
    from pipeline.stages import pack

    return pack.run(tokenized_dir, mix_dir, output_dir, cfg, progress=progress)


@task(name="lineage", **_opts((), "pipeline.lineage"))
def lineage_task(run_dir: str, output_dir: str, stage_hashes: dict[str, str], progress: bool = True) -> dict:
    """`stage_hashes`: content hashes of the stage folders it reads (its cache key)."""
    from pipeline import lineage

    man = lineage.run(run_dir, output_dir, progress=progress)
    if not man["counts"]["balanced"]:  # the report is written first, so the rows at fault can be read
        raise lineage.LineageError(f"lineage does not balance: some rows are unaccounted for, removed twice or both "
                                   f"removed and packed; see {Path(output_dir) / 'lineage.json'}")
    return man


def stage_intact(out: Path) -> bool:
    """The folder holds a manifest whose every output file exists with its recorded size and hash."""
    m = out / MANIFEST
    if not m.exists():
        return False
    try:
        outputs = read_json(m).get("outputs", {})
    except Exception:
        return False
    for name, rec in outputs.items():
        f = out / name
        if not f.exists() or f.stat().st_size != rec.get("bytes") or sha256_file(f) != rec.get("sha256"):
            return False
    return True


def _local_hashes(spec: RunSpec) -> dict[str, str]:
    """Local source files by content, so a changed file invalidates the ingest cache."""
    return {s.name: json.dumps({str(f): sha256_file(f) for f in local_files(s.path)}, sort_keys=True)
            for s in spec.sources if s.kind == "local"}


def _key(name: str) -> str:
    """An artifact key from a spec name (lowercase letters, digits and dashes)."""
    return name.lower().replace("_", "-").replace(".", "-")


def _summary_markdown(spec: RunSpec, manifests: dict[str, dict]) -> str:
    lines = [f"# Data run `{spec.name}`", "", "| stage | counts |", "|---|---|"]
    for st in STAGES:
        if st in manifests:
            c = {k: v for k, v in manifests[st].get("counts", {}).items() if not isinstance(v, dict)}
            lines.append(f"| {st} | " + ", ".join(f"{k}={v}" for k, v in c.items()) + " |")
    if "contamination" in manifests:
        dirty = manifests["contamination"].get("counts", {}).get("dirty", {})
        lines += ["", "Dirty benchmark items (13-gram coverage >= 80%): "
                  + ", ".join(f"{k}={v}" for k, v in dirty.items())]
    if "lineage" in manifests:
        c = manifests["lineage"].get("counts", {})
        lines += ["", f"Lineage: {c.get('rows_stratified')} rows stratified = {c.get('rows_packed')} packed + "
                  f"{c.get('rows_removed')} removed; balanced: {c.get('balanced')} (lineage/lineage.json)"]
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


@flow(name="hrm-data", log_prints=True)
def data_flow(spec: str = "demo", output_dir: str | None = None, stop_after: str = "pack",
              benchmarks: str | None = None, decontaminate: bool | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Run the data stages of SPEC (a path or a bundled spec name) into OUTPUT_DIR (default runs/<name>).

    `stop_after` ends the flow after that stage (one of ingest ... pack). `benchmarks` (a local
    benchmark folder) and `decontaminate` override the spec's contamination section."""
    if stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {STAGES}, got {stop_after!r}")
    s = load_spec(spec)
    contam = contamination_settings(s, benchmarks, decontaminate)
    if contam is not None and contam.benchmarks_dir is not None and not Path(contam.benchmarks_dir).is_dir():
        raise FileNotFoundError(f"contamination.benchmarks_dir: {contam.benchmarks_dir} is not a folder")
    root = Path(output_dir or Path("runs") / s.name).resolve()
    root.mkdir(parents=True, exist_ok=True)
    results = root / ".prefect" / "results"
    logger = get_run_logger()
    t0 = time.time()
    d = {st: str(root / st) for st in STAGES}

    def call(t, **kw):
        refresh = not stage_intact(Path(kw["output_dir"]))
        return t.with_options(result_storage=results, refresh_cache=refresh)(progress=progress, **kw)

    # the rows mix and pack read: the tokenizer's, or the decontaminated ones
    train_dir = d["contamination"] if contam is not None and contam.decontaminate else d["tokenizer"]

    def contamination_step() -> dict | None:
        if contam is None:
            logger.info("contamination: skipped (no benchmarks: set contamination.benchmarks_dir or hub: true "
                        "in the spec, or pass --benchmarks DIR)")
            return None
        cfg = ContaminationConfig(**contam.model_dump(exclude={"benchmarks_dir", "hub"}))
        bench: str | list[str]
        if contam.benchmarks_dir is not None:
            bench = str(Path(contam.benchmarks_dir).resolve())
        else:
            from pipeline.stages.contamination import HUB

            bench = list(cfg.benchmarks or HUB)
        return call(contamination_task, input_dir=d["tokenizer"], benchmarks=bench, output_dir=d["contamination"],
                    cfg=cfg)

    man: dict[str, dict] = {}
    last = STAGES.index(stop_after)
    steps = [
        ("ingest", lambda: call(ingest_task, sources=s.sources, output_dir=d["ingest"], seed=s.seed,
                                local_file_hashes=_local_hashes(s))),
        ("normalize", lambda: call(normalize_task, ingest_dir=d["ingest"], output_dir=d["normalize"],
                                   sources=s.sources, cfg=s.normalize)),
        ("stratify", lambda: call(stratify_task, input_dir=d["normalize"], output_dir=d["stratify"],
                                  rules=s.stratify.rules, source_order=[x.name for x in s.sources])),
        ("dedup", lambda: call(dedup_task, input_dir=d["stratify"], output_dir=d["dedup"], cfg=s.dedup)),
        ("tokenizer", lambda: call(tokenizer_task, input_dir=d["dedup"], output_dir=d["tokenizer"], cfg=s.tokenizer,
                                   conditions=list(s.normalize.conditions), seed=s.seed)),
        ("contamination", contamination_step),
        ("mix", lambda: call(mix_task, input_dir=train_dir, output_dir=d["mix"], cfg=s.mix,
                             rules=s.stratify.rules, seed=s.mix_seed)),
        ("pack", lambda: call(pack_task, tokenized_dir=train_dir, mix_dir=d["mix"], output_dir=d["pack"],
                              cfg=s.pack)),
    ]
    for name, step in steps[: last + 1]:
        m = step()
        if m is None:
            continue
        man[name] = m
        logger.info("%s: %s", name, {k: v for k, v in m.get("counts", {}).items() if not isinstance(v, dict)})
    if stop_after == "pack":
        hashes = {st: content_hash(root / st) for st in STAGES if st != "ingest" and st in man}
        man["lineage"] = call(lineage_task, run_dir=str(root), output_dir=str(root / "lineage"), stage_hashes=hashes)
        create_markdown_artifact((root / "lineage" / "lineage.md").read_text(), key=f"lineage-{_key(s.name)}",
                                 description=f"lineage of {s.name}: where every row came from, why every dropped "
                                             "row was dropped")
    write_json({"spec": s.model_dump(mode="json"), "stages": {k: v.get("fingerprint") for k, v in man.items()},
                "contamination": contam.model_dump(mode="json") if contam is not None else None,
                "output_dir": str(root)}, root / "run.json")
    create_markdown_artifact(_summary_markdown(s, man), key=f"data-run-{_key(s.name)}",
                             description=f"data stages of {s.name}")
    logger.info("data flow done in %.1f s: %s", time.time() - t0, root)
    return {"output_dir": str(root), "manifests": man}
