"""Run folders: content-addressed stage versions, the run manifest, the run lock and garbage collection.

Layout of a run folder written by the data flow:

    runs/<name>/
      run.json                 the run manifest: the spec, and for every stage the version it used
      <stage>/<version>/       one folder per version of a stage's outputs; <version> is the first 16 hex
                               digits of the stage's fingerprint (its code, parameters and the content of
                               its inputs), so a folder's name says what made it
      .lock                    held (flock) while a flow writes into the run; names the holder
      .prefect/results         Prefect's persisted task results (cache records)

A stage version is written once: into a temporary folder beside it, renamed into place when complete
(its `manifest.json`, written last, carries the full fingerprint). Reverting a parameter to a value
computed before finds the old version and recomputes nothing; a folder written by other settings has
another name and is never taken for it. `hrm gc RUN` removes the versions that the run manifest does
not reference.

Consumers (`hrm train`, `hrm eval`, `hrm run --only`) find stage outputs with `resolve_stage`: a stage
version folder itself, or a run folder / stage root through the run manifest.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import json
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .io import MANIFEST, read_json, write_json

RUN_MANIFEST = "run.json"
LOCK = ".lock"
VERSION_LEN = 16
VERSION_RE = re.compile(r"^[0-9a-f]{16}$")
DATA_STAGES = ("ingest", "normalize", "stratify", "dedup", "tokenizer", "contamination", "mix", "pack", "lineage")


class RunError(ValueError):
    """A run folder, stage folder or lock problem a user can fix; the message says how."""


class RunLocked(RunError):
    pass


def version_of(fp: str) -> str:
    return fp[:VERSION_LEN]


# ------------------------------------------------------------------------------------------------
# the run manifest
# ------------------------------------------------------------------------------------------------
def read_run(run_dir: str | os.PathLike) -> dict:
    """The run manifest of RUN_DIR; a RunError naming the folder when there is none."""
    p = Path(run_dir) / RUN_MANIFEST
    if not p.exists():
        raise RunError(f"{run_dir} is not a run folder (no {RUN_MANIFEST}): run `hrm run SPEC -o {run_dir}` first")
    try:
        return read_json(p)
    except json.JSONDecodeError as e:
        raise RunError(f"{p}: not valid JSON ({e})") from None


def write_run(run_dir: str | os.PathLike, run: dict) -> None:
    write_json(run, Path(run_dir) / RUN_MANIFEST)


def update_run(run_dir: str | os.PathLike, **entries: Any) -> dict:
    """Merge top-level entries (e.g. train=..., evaluations=...) into the run manifest (created if
    missing) and return it."""
    p = Path(run_dir) / RUN_MANIFEST
    run = read_json(p) if p.exists() else {"format": 1}
    run.update(entries)
    write_run(run_dir, run)
    return run


def stage_entry(run_dir: Path, stage: str, manifest: dict, inputs: dict[str, str]) -> dict:
    """The run manifest's record of one stage: its version folder (relative to the run folder), its
    fingerprint and the versions of the stage folders it read."""
    path = Path(manifest["path"]).resolve()
    try:
        rel = str(path.relative_to(Path(run_dir).resolve()))
    except ValueError:
        rel = str(path)
    return {"dir": rel, "version": path.name, "fingerprint": manifest.get("fingerprint"), "inputs": inputs}


def stage_dir(run_dir: str | os.PathLike, stage: str, check: bool = True) -> Path:
    """The folder of STAGE's version used by the last run in RUN_DIR (per the run manifest)."""
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    ent = run.get("stages", {}).get(stage)
    if not isinstance(ent, dict) or "dir" not in ent:
        done = ", ".join(run.get("stages", {})) or "none"
        raise RunError(f"{run_dir}: the run has no {stage} output (stages done: {done}); run "
                       f"`hrm run SPEC -o {run_dir}` (or `--from {stage}`) first")
    d = Path(ent["dir"])
    d = d if d.is_absolute() else run_dir / d
    if not (d / MANIFEST).exists():
        from .storage import fetch_version  # a mirror of a run on object storage: fetched on first use

        fetch_version(d)
    if check and not (d / MANIFEST).exists():
        raise RunError(f"{run_dir}: the run manifest names {d} for {stage}, but it has no {MANIFEST} (removed by "
                       f"`hrm gc`, or by hand?): rerun `hrm run SPEC -o {run_dir}` to recompute it")
    if check and ent.get("stale"):
        raise RunError(f"{run_dir}: the {stage} output is stale: {ent['stale']}; run `hrm run SPEC -o {run_dir} "
                       f"--from {stage}` to bring it up to date")
    return d


def resolve_stage(path: str | os.PathLike, stage: str) -> Path:
    """A folder holding STAGE's outputs, from any of: the stage version folder itself (or any folder
    with the stage's manifest), a run folder, or a run's stage root (`runs/demo/pack`); any of them may
    be a URL on object storage (`s3://bucket/runs/demo`), fetched and checked first (pipeline/storage.py)."""
    from .storage import is_remote, localize

    if is_remote(path):
        path = localize(str(path))
    p = Path(path)
    if not p.exists():
        raise RunError(f"{path} does not exist")
    m = p / MANIFEST
    if m.is_file():
        try:
            got = read_json(m).get("stage")
        except (json.JSONDecodeError, OSError):
            got = None
        if got not in (None, stage):
            raise RunError(f"{path} holds the outputs of stage {got!r}, not {stage!r}")
        return p
    if (p / RUN_MANIFEST).is_file():
        return stage_dir(p, stage)
    if p.name == stage and (p.parent / RUN_MANIFEST).is_file():
        return stage_dir(p.parent, stage)
    raise RunError(f"{path} is neither a {stage} stage folder (no {MANIFEST}) nor a run folder (no {RUN_MANIFEST})")


UPSTREAM = {"normalize": "ingest", "stratify": "normalize", "dedup": "stratify", "tokenizer": "dedup",
            "contamination": "tokenizer", "mix": "tokenizer", "pack": "tokenizer"}


def resolve_input(path: str | os.PathLike, wanted: str) -> str:
    """An input folder given to `hrm stage`: a run folder becomes the version of stage WANTED that its
    run manifest names, a run's stage root (`runs/demo/tokenizer`) that stage's version; files and
    plain stage folders are returned as given; a URL on object storage is fetched first."""
    from .storage import is_remote, localize

    if is_remote(path):
        path = localize(str(path))
    p = Path(path)
    if not p.is_dir() or (p / MANIFEST).exists():
        return str(path)
    if (p / RUN_MANIFEST).is_file():
        return str(stage_dir(p, wanted))
    if (p.parent / RUN_MANIFEST).is_file() and p.name in DATA_STAGES:
        return str(stage_dir(p.parent, p.name))
    return str(path)


def find_run_dir(path: str | os.PathLike) -> Path | None:
    """The run folder that PATH (a run folder, a stage root or a stage version) belongs to, if any."""
    p = Path(path).resolve()
    for cand in (p, p.parent, p.parent.parent):
        if (cand / RUN_MANIFEST).is_file():
            return cand
    return None


# ------------------------------------------------------------------------------------------------
# the lock
# ------------------------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(run_dir: str | os.PathLike, what: str = "hrm run") -> Iterator[dict]:
    """Hold the run folder's lock for the block. A second holder fails at once with a RunLocked that
    names the first (PID, host, start time, command). The lock is an flock on `<run>/.lock`: it dies with
    its process, so a lock left by a killed run is taken over (and said so in the returned info)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            os.close(fd)
            raise
        try:
            holder = json.loads(Path(path).read_text() or "{}")
        except (OSError, json.JSONDecodeError):
            holder = {}
        os.close(fd)
        raise RunLocked(f"{run_dir} is in use by another run: PID {holder.get('pid', '?')} on "
                        f"{holder.get('host', '?')}, started {holder.get('started', '?')} ({holder.get('what', '?')}); "
                        "wait for it to finish, or use another --output folder") from None
    info: dict[str, Any] = {}
    try:
        prev = json.loads(Path(path).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        prev = {}
    if prev.get("pid") and prev.get("pid") != os.getpid():
        info["taken_over"] = prev  # the previous holder died without releasing (flock is gone with it)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
          "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    try:
        yield info
    finally:
        try:
            os.ftruncate(fd, 0)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


# ------------------------------------------------------------------------------------------------
# garbage collection
# ------------------------------------------------------------------------------------------------
def _size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and not f.is_symlink())


MODEL_ROOTS = ("train", "check", "eval")  # content-addressed folders of the pipeline's model steps


def referenced_dirs(run_dir: Path) -> set[Path]:
    """Every folder the run manifest names: stage versions, the train folder, the check and the folder
    of benchmarks it read, the evaluations' output folders."""
    run = read_run(run_dir)
    names: list[str] = [ent["dir"] for ent in run.get("stages", {}).values() if isinstance(ent, dict) and "dir" in ent]
    for key in ("train", "check"):
        ent = run.get(key)
        if isinstance(ent, dict):
            names += [ent[k] for k in ("dir", "checked") if isinstance(ent.get(k), str)]
    for ev in run.get("evaluations") or []:
        if isinstance(ev, dict) and isinstance(ev.get("output"), str):
            names.append(ev["output"])
    return {(Path(n) if Path(n).is_absolute() else run_dir / n).resolve() for n in names}


def gc(run_dir: str | os.PathLike, apply: bool = False) -> dict:
    """Stage versions (and unfinished temporary folders) of RUN_DIR that its run manifest does not
    reference. With apply, they are removed. Returns {"remove": [(path, bytes)], "keep": [...], "bytes": N}."""
    run_dir = Path(run_dir)
    keep_dirs = referenced_dirs(run_dir)
    remove, keep = [], []
    for stage in (*DATA_STAGES, *MODEL_ROOTS):
        root = run_dir / stage
        if not root.is_dir():
            continue
        for child in sorted(root.iterdir()):
            if not child.is_dir():
                continue
            if child.resolve() in keep_dirs:
                keep.append((str(child), _size(child)))
            elif VERSION_RE.match(child.name) or child.name.startswith(".tmp-") or (
                    stage == "check" and re.match(r"^benchmarks-[0-9a-f]{16}$", child.name)):
                remove.append((str(child), _size(child)))
    if apply:
        for path, _ in remove:
            shutil.rmtree(path, ignore_errors=True)
    return {"remove": remove, "keep": keep, "bytes": sum(b for _, b in remove),
            "kept_bytes": sum(b for _, b in keep), "applied": apply}
