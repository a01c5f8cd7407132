"""What a train folder was made from, and the check that refuses to resume it on anything else.

A train folder records, in `train.json` and in every checkpoint (`checkpoints/step-N/train_record.json`,
plain JSON, read before anything is unpickled):

  data.pack_dir, data.pack_version      the pack stage folder and its version (fingerprint[:16])
  data.pack_manifest_sha256             sha256 of the pack manifest's `outputs` record in canonical JSON
                                        (every output file's name, sha256, rows and bytes): the identity of
                                        the shards themselves. Not the manifest file's bytes: those also hold
                                        the input folders' paths and the pack code's fingerprint, so moving a
                                        run folder or editing pack.py would refuse a resume over identical
                                        shards.
  data.tokenizer_dir, data.tokenizer_sha256
                                        the tokenizer folder named by the pack manifest (`inputs.tokenized`)
                                        and the sha256 of its tokenizer.json bytes
  config_sha256 (+ identity)            the settings that define the run (`run_identity`)

Resuming (`checkpoints/latest` exists, or an earlier run's train.json) with a different pack, tokenizer
or config raises ResumeRefused, one line naming the recorded and the given hashes; `--restart` starts a
fresh run in the next free folder `<out>-2`, `<out>-3`, ... and never deletes the old one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.io import sha256_json
from training.data import sha256_file

TRAIN_RECORD = "train.json"
CHECKPOINT_RECORD = "train_record.json"
LEGACY_RECORD = "run.json"  # train folders written before train.json (a name the run manifest now uses)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_meta.json")
SHORT = 16  # hex digits of a hash shown in messages (the length of a stage version's name)

# TrainConfig fields that may change when a run is resumed: where things are, how long (--steps:
# extending a run stays possible; the bp warmup and a cosine LR are functions of --steps and follow
# the new value from the resume step on), checkpoint cadence and retention, logging, the spike guard,
# the device choice (the resolved precision is hashed instead) and DeepSpeed's shm_comm op.
NOT_IDENTITY = frozenset({
    "shards", "out", "run_dir", "restart", "steps", "save_every", "keep_checkpoints", "peak_flops", "progress",
    "tensorboard", "spike_factor", "spike_window", "fail_at_step", "device", "shm_comm", "checkpoint_url",
})


class ResumeRefused(RuntimeError):
    """The train folder holds a run made from other data or settings; the message says what to do."""


# ----------------------------------------------------------------------------------------------
# what the data is
# ----------------------------------------------------------------------------------------------
def pack_manifest_sha256(manifest: dict) -> str:
    """sha256 of the canonical JSON of a pack manifest's `outputs` record (see the module docstring)."""
    outputs = manifest.get("outputs")
    if not isinstance(outputs, dict) or not outputs:
        raise ValueError("the pack manifest has no `outputs` record")
    return sha256_json(outputs)


def tokenizer_dir_of(manifest: dict, pack_dir: str | os.PathLike | None = None) -> Path | None:
    """The tokenizer folder the pack was made with (its manifest's `inputs.tokenized`), if it names one.
    When that path is not on this machine (a run computed elsewhere and fetched from object storage), the
    same stage version of the pack's own run folder (`<run>/<stage>/<version>`), fetched if published."""
    tok = manifest.get("inputs", {}).get("tokenized")
    if not tok:
        return None
    p = Path(tok).resolve()
    if not p.exists() and pack_dir is not None:
        alt = Path(pack_dir).resolve().parent.parent / p.parent.name / p.name
        if not alt.exists():
            from pipeline.storage import fetch_version

            fetch_version(alt)
        if alt.exists():
            return alt
    return p


def data_record(pack_dir: str | os.PathLike) -> dict[str, Any]:
    """The data identity of a pack folder: its version and hash, and its tokenizer's folder and hash
    (tokenizer_sha256 None when the folder the manifest names has no tokenizer.json)."""
    pack = Path(pack_dir).resolve()
    manifest = json.loads((pack / "manifest.json").read_text())
    tok = tokenizer_dir_of(manifest, pack)
    tok_json = tok / TOKENIZER_FILES[0] if tok else None
    fp = manifest.get("fingerprint")
    return {
        "pack_dir": str(pack),
        "pack_version": fp[:SHORT] if isinstance(fp, str) else pack.name,
        "pack_manifest_sha256": pack_manifest_sha256(manifest),
        "tokenizer_dir": str(tok) if tok else None,
        "tokenizer_sha256": sha256_file(tok_json) if tok_json and tok_json.is_file() else None,
    }


def export_data_record(data: dict[str, Any]) -> dict[str, Any]:
    """The `data` record of an export's config.json."""
    return {k: data[k] for k in ("tokenizer_sha256", "pack_manifest_sha256", "pack_dir", "tokenizer_dir")}


def copy_tokenizer(src: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Copy tokenizer.json and tokenizer_meta.json from SRC into DEST (each to a temp name, then renamed);
    returns the copies."""
    src, dest = Path(src), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            tmp = dest / (name + ".tmp")
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, dest / name)
            out.append(dest / name)
    return out


# ----------------------------------------------------------------------------------------------
# what the run is
# ----------------------------------------------------------------------------------------------
def run_identity(cfg, model_config: dict[str, Any], world_size: int, device: str) -> dict[str, Any]:
    """The settings that define a run (hashed into config_sha256): the TrainConfig without NOT_IDENTITY,
    with the resolved precision and the content hash of a user DeepSpeed JSON, the model config (with
    its vocabulary) and the world size (the data order and ZeRO partitions depend on it)."""
    train = {k: v for k, v in cfg.to_dict().items() if k not in NOT_IDENTITY}
    train["precision"] = cfg.resolved_precision(device)
    if cfg.deepspeed_json:
        train["deepspeed_json"] = sha256_file(cfg.deepspeed_json)
    return {"train": train, "model": model_config, "world_size": world_size}


def config_sha256(identity: dict[str, Any]) -> str:
    return sha256_json(identity)


def record(data: dict[str, Any], identity: dict[str, Any]) -> dict[str, Any]:
    """What a train folder and each of its checkpoints record (compared on resume)."""
    return {"data": data, "identity": identity, "config_sha256": config_sha256(identity)}


# ----------------------------------------------------------------------------------------------
# the resume check
# ----------------------------------------------------------------------------------------------
def has_run(out: str | os.PathLike) -> bool:
    """Whether OUT holds (the start of) an earlier run."""
    out = Path(out)
    return any((out / p).exists() for p in (TRAIN_RECORD, LEGACY_RECORD, "checkpoints/latest", "metrics.jsonl"))


def recorded(out: str | os.PathLike) -> dict[str, Any] | None:
    """The record of the run in OUT: its latest checkpoint's (what a resume continues), else train.json.
    None when OUT holds no run. ResumeRefused for a run from before records (nothing to compare)."""
    out = Path(out)
    latest = out / "checkpoints" / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        p = out / "checkpoints" / tag / CHECKPOINT_RECORD
        if p.is_file():
            return json.loads(p.read_text())
    if (out / TRAIN_RECORD).is_file():
        return json.loads((out / TRAIN_RECORD).read_text())
    if has_run(out):
        raise ResumeRefused(
            f"{out} holds a run from before data records (no {TRAIN_RECORD}): its pack, tokenizer and config "
            "cannot be checked, so it is not resumed; pass --restart to start a fresh run in a new folder "
            "(the old one is kept)")
    return None


def _short(h: str | None) -> str:
    return h[:SHORT] if h else "none"


def _changed(rec: dict, given: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(rec) | set(given)):
        a, b = rec.get(k), given.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k} {json.dumps(a)} -> {json.dumps(b)}")
    return out


def check_resume(out: str | os.PathLike, rec: dict[str, Any], given: dict[str, Any]) -> None:
    """ResumeRefused unless the recorded pack, tokenizer and config hashes equal the given ones."""
    diffs = []
    for key, what in (("pack_manifest_sha256", "pack"), ("tokenizer_sha256", "tokenizer")):
        a, b = rec["data"].get(key), given["data"].get(key)
        if a != b:
            where = "pack_dir" if what == "pack" else "tokenizer_dir"
            diffs.append(f"{key} recorded {_short(a)} ({rec['data'].get(where)}) but given {_short(b)} "
                         f"({given['data'].get(where)})")
    if rec.get("config_sha256") != given["config_sha256"]:
        changed = _changed(rec.get("identity", {}), given["identity"])
        more = f" ... (+{len(changed) - 4})" if len(changed) > 4 else ""
        diffs.append(f"config_sha256 recorded {_short(rec.get('config_sha256'))} but given "
                     f"{_short(given['config_sha256'])} (changed: {', '.join(changed[:4])}{more})")
    if not diffs:
        return
    hint = ""
    old = rec["data"].get("pack_dir")
    if rec["data"].get("pack_manifest_sha256") != given["data"].get("pack_manifest_sha256") and old:
        try:
            same = data_record(old)["pack_manifest_sha256"] == rec["data"]["pack_manifest_sha256"]
        except (OSError, ValueError):
            same = False
        if same:
            hint = f", or --shards {old} to continue on the recorded pack"
    raise ResumeRefused(
        f"{out} holds a run made from other data or settings: {'; '.join(diffs)}. Not resuming it: pass "
        f"--restart to start a fresh run in a new folder (the old one is kept){hint}")


_NUMBERED = re.compile(r"^(.+)-(\d+)$")


def next_free(out: str | os.PathLike) -> Path:
    """Create and return the first free folder `<out>-2`, `<out>-3`, ... (`runs/x/train-2` -> `train-3`)."""
    out = Path(out)
    m = _NUMBERED.match(out.name)
    base, n = (out.parent / m.group(1), int(m.group(2)) + 1) if m and (out.parent / m.group(1)).exists() else (out, 2)
    while True:
        cand = base.parent / f"{base.name}-{n}"
        try:
            cand.mkdir(parents=True)
            return cand
        except FileExistsError:
            n += 1
