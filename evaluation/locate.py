"""What `hrm eval` evaluates: the checkpoint's own tokenizer, and a run's checkpoint, contamination
folder and benchmark folder; the evaluation's record in the run manifest.

Tokenizer (`checkpoint_tokenizer`). An exported checkpoint (`train/final/ema`, ...) carries the
tokenizer it was trained with (`tokenizer.json` + `tokenizer_meta.json`) and its `config.json` records
`data.tokenizer_sha256` (the sha256 of the tokenizer.json bytes). By default that tokenizer is used. An
explicit tokenizer must have the recorded sha256; a checkpoint without the record (written before
checkpoints carried their tokenizer) needs an explicit tokenizer, and its vocabulary size must be the
model's `vocab_size`. Anything else is a TokenizerMismatch: scores of a model read through another
tokenizer are noise, not a result.

Run folders (`locate`). PATH may be
- a run folder (`runs/<name>` with the run manifest `run.json`): the checkpoint is the final EMA export
  of the `train` entry (written by `hrm train`: its `final.ema`, else its folder's `final/ema`);
- a train folder (`final/ema` inside): its `final/ema`;
- a checkpoint folder (`config.json` + `model.safetensors`).
The run folder is PATH or the nearest folder above it with a run manifest, else the run whose pack
folder the checkpoint records (`data.pack_dir` in its config.json). The run's contamination stage (if
it ran) gives the clean-subset scores, and the benchmark folder that stage checked is the default
benchmark folder.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.runs import RUN_MANIFEST, RunError, RunLocked, find_run_dir, resolve_stage, run_lock, update_run

CONFIG_FILE = "config.json"  # model.checkpoint's names
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"  # pipeline.stages.tokenize's names
META_FILE = "tokenizer_meta.json"


class TokenizerMismatch(ValueError):
    """The tokenizer given is not (or cannot be shown to be) the one the checkpoint was trained with."""


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def is_checkpoint(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (p / WEIGHTS_FILE).is_file()


def checkpoint_meta(checkpoint: str | os.PathLike) -> dict:
    """The checkpoint's config.json: {"format_version", "config": model config, "data": {...} (newer)}."""
    p = Path(checkpoint) / CONFIG_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a checkpoint folder (no {CONFIG_FILE}; e.g. RUN/train/final/ema)")
    return json.loads(p.read_text())


def _tokenizer_file(tokenizer: str | os.PathLike) -> Path:
    p = Path(tokenizer)
    f = p / TOKENIZER_FILE if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"tokenizer: {tokenizer} is not a tokenizer folder (no {TOKENIZER_FILE})")
    return f


def _vocab_size(tokenizer: str | os.PathLike) -> int:
    f = _tokenizer_file(tokenizer)
    meta = f.parent / META_FILE
    if meta.is_file():
        return int(json.loads(meta.read_text())["vocab_size"])
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(f)).get_vocab_size(with_added_tokens=True)


def checkpoint_tokenizer(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Path:
    """The tokenizer (folder or tokenizer.json) to read CHECKPOINT with; TokenizerMismatch when TOKENIZER
    is not the one it was trained with, or when that cannot be told (see the module docstring)."""
    ck = Path(checkpoint)
    meta = checkpoint_meta(ck)
    recorded = (meta.get("data") or {}).get("tokenizer_sha256")
    model_vocab = int(meta["config"]["vocab_size"])
    if tokenizer is None:
        if not (ck / TOKENIZER_FILE).is_file():
            raise TokenizerMismatch(
                f"{ck} carries no {TOKENIZER_FILE} (written before checkpoints carried their tokenizer): give "
                f"--tokenizer, the tokenizer folder it was trained with (a vocabulary of {model_vocab} tokens)")
        got = sha256_file(ck / TOKENIZER_FILE)
        if recorded and got != recorded:
            raise TokenizerMismatch(f"{ck}/{TOKENIZER_FILE} has sha256 {got}, but {ck}/{CONFIG_FILE} records "
                                    f"{recorded}: the file was replaced after the export")
        path = ck
    else:
        path = Path(tokenizer)
        got = sha256_file(_tokenizer_file(path))
        if recorded and got != recorded:
            raise TokenizerMismatch(
                f"--tokenizer {tokenizer}: its {TOKENIZER_FILE} has sha256 {got}, but {ck} was trained with the "
                f"tokenizer of sha256 {recorded} (recorded in its {CONFIG_FILE}); leave out --tokenizer to use "
                f"the checkpoint's own")
    vocab = _vocab_size(path)
    if vocab != model_vocab:
        raise TokenizerMismatch(f"tokenizer {path} has a vocabulary of {vocab} tokens but the model {ck} has "
                                f"vocab_size {model_vocab}: not the tokenizer it was trained with")
    return path


# ------------------------------------------------------------------------------------------------
# run folders
# ------------------------------------------------------------------------------------------------
@dataclass
class Target:
    checkpoint: Path
    run_dir: Path | None = None  # the run folder whose manifest records the evaluation
    contamination: Path | None = None
    benchmarks: Path | None = None
    notes: tuple[str, ...] = ()  # what was found where, or left out and why (printed by hrm eval)


def _run_manifest(d: Path) -> dict | None:
    """The run manifest in folder D, or None (no run.json, or the training loop's own record)."""
    f = d / RUN_MANIFEST
    if not f.is_file():
        return None
    try:
        m = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(m, dict) or "model_config" in m:  # hrm train's record of a train folder
        return None
    return m


def owning_run(path: str | os.PathLike, levels: int = 4) -> Path | None:
    """PATH or the nearest of its LEVELS parents that holds a run manifest."""
    p = Path(path).resolve()
    for cand in [p, *p.parents][: levels + 1]:
        if _run_manifest(cand) is not None:
            return cand
    return None


def _run_of_checkpoint(checkpoint: Path) -> Path | None:
    """The run whose pack folder the checkpoint was trained on (config.json's data.pack_dir)."""
    pack = (checkpoint_meta(checkpoint).get("data") or {}).get("pack_dir")
    if not pack or not Path(pack).exists():
        return None
    run = find_run_dir(pack)
    return run if run is not None and _run_manifest(run) is not None else None


def final_checkpoint(train_dir: Path) -> Path:
    ck = train_dir / "final" / "ema"
    if is_checkpoint(ck):
        return ck
    exports = sorted(str(p) for p in (train_dir / "export").glob("*/ema") if is_checkpoint(p))
    raise RunError(f"{train_dir} has no final/ema checkpoint (training not finished?)"
                   + (f"; exports so far: {', '.join(exports)} (give one with --checkpoint)" if exports else ""))


def _run_checkpoint(run_dir: Path, run: dict) -> Path:
    """The final EMA checkpoint of the run's training (the manifest's `train` entry, by `hrm train`)."""
    ent = run.get("train")
    if isinstance(ent, dict) and ent.get("dir"):
        final = (ent.get("final") or {}).get("ema")
        if final:
            ck = Path(final) if Path(final).is_absolute() else run_dir / final
            if is_checkpoint(ck):
                return ck
        d = Path(ent["dir"])
        d = d if d.is_absolute() else run_dir / d
        if not d.is_dir():
            raise RunError(f"{run_dir}: the run manifest names {d} for train, but it does not exist")
        if ent.get("status") not in (None, "done") and not is_checkpoint(d / "final" / "ema"):
            raise RunError(f"{run_dir}: training in {d} is not finished ({ent.get('status')}, step "
                           f"{ent.get('step')} of {ent.get('steps')}): rerun `hrm train {run_dir}` to resume it, "
                           f"or give an export with --checkpoint ({d}/export/step-N/ema)")
        return final_checkpoint(d)
    if (run_dir / "train" / "final").is_dir():  # trained before `hrm train` recorded itself in the manifest
        return final_checkpoint(run_dir / "train")
    raise RunError(f"{run_dir}: the run has no trained model (no \"train\" entry in its {RUN_MANIFEST}): run "
                   f"`hrm train {run_dir}` first, or give --checkpoint")


def _contamination(run_dir: Path, run: dict) -> tuple[Path | None, str | None]:
    """The run's contamination stage folder, or (None, why not) when it has none usable."""
    ent = (run.get("stages") or {}).get("contamination")
    try:
        if isinstance(ent, dict):
            return resolve_stage(run_dir, "contamination"), None
        if (run_dir / "contamination" / "manifest.json").is_file():  # the layout before stage versions
            return resolve_stage(run_dir / "contamination", "contamination"), None
    except RunError as e:
        return None, f"contamination left out: {e}"
    return None, None


def _checked_benchmarks(contamination: Path | None) -> Path | None:
    """The local benchmark folder the contamination stage checked (its manifest's inputs.benchmarks)."""
    if contamination is None or not (contamination / "manifest.json").is_file():
        return None
    b = (json.loads((contamination / "manifest.json").read_text()).get("inputs") or {}).get("benchmarks")
    return Path(b) if isinstance(b, str) and Path(b).is_dir() else None


def locate(path: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> Target:
    """The checkpoint, run folder, contamination folder and benchmark folder for PATH (a run folder, a
    train folder or a checkpoint folder; see the module docstring). CHECKPOINT, when given, is used
    instead of the one PATH names (PATH then only gives the run)."""
    p = Path(path)
    if not p.exists():
        raise RunError(f"{path} does not exist")
    notes = []
    if is_checkpoint(p):
        ck, run_dir = Path(checkpoint or p), owning_run(p)
    elif _run_manifest(p) is not None:
        run_dir = p
        ck = Path(checkpoint) if checkpoint is not None else _run_checkpoint(p, _run_manifest(p))
    elif any((p / f).exists() for f in ("train.json", "final", "checkpoints")):  # a train folder
        ck = Path(checkpoint) if checkpoint is not None else final_checkpoint(p)
        run_dir = owning_run(p.parent)
    else:
        hint = f" (its train folder {p / 'train'}?)" if (p / "train" / "final").is_dir() else ""
        raise RunError(f"{path} is neither a run folder (no {RUN_MANIFEST}), a train folder (no final/ema) nor a "
                       f"checkpoint folder (no {CONFIG_FILE} + {WEIGHTS_FILE}){hint}")
    if run_dir is None:
        run_dir = _run_of_checkpoint(ck)
        if run_dir is not None:
            notes.append(f"run folder {run_dir} (the checkpoint's training data came from it)")
    contamination = None
    if run_dir is not None:
        contamination, why = _contamination(run_dir, _run_manifest(run_dir) or {})
        if why:
            notes.append(why)
    return Target(checkpoint=ck, run_dir=run_dir, contamination=contamination,
                  benchmarks=_checked_benchmarks(contamination), notes=tuple(notes))


def _rel(path: str | os.PathLike, run_dir: Path) -> str:
    p = Path(path).resolve()
    try:
        return str(p.relative_to(run_dir.resolve()))
    except ValueError:
        return str(p)


def record_evaluation(run_dir: str | os.PathLike, results: dict, output_dir: str | os.PathLike) -> dict | None:
    """Add the evaluation to the run manifest's "evaluations" (a record with the same output folder is
    replaced: its files were overwritten). Returns the record, or None when the run is locked by a
    writer (the results stay in output_dir; said on stderr)."""
    run_dir = Path(run_dir)
    out = Path(output_dir)
    rec = {
        "checkpoint": _rel(results["checkpoint"], run_dir),
        "checkpoint_sha256": results.get("checkpoint_sha256"),
        "tokenizer_sha256": results.get("tokenizer_sha256"),
        "tasks": list(results["tasks"]),
        "limit": results.get("limit"), "seed": results.get("seed"), "limited": results.get("limited", False),
        "n": {t: e.get("n") for t, e in results["tasks"].items()},
        "online": results.get("online", False), "protocol": results.get("protocol", "harness"),
        "contamination": _rel(results["contamination"], run_dir) if results.get("contamination") else None,
        "output": _rel(out, run_dir), "results": _rel(out / "results.json", run_dir),
        "report": _rel(out / "results.md", run_dir),
        "finished": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    try:
        with run_lock(run_dir, what="hrm eval (recording the evaluation)"):
            run = _run_manifest(run_dir) or {}
            evals = [e for e in run.get("evaluations", []) if isinstance(e, dict) and e.get("output") != rec["output"]]
            update_run(run_dir, evaluations=[*evals, rec])
    except RunLocked as e:
        print(f"hrm eval: not recorded in {run_dir / RUN_MANIFEST}: {e}", file=sys.stderr)
        return None
    return rec
