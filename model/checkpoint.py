"""Checkpoints as safetensors (weights and buffers) + JSON (config). Loading never unpickles.

A checkpoint folder: `model.safetensors`, `config.json` ({"format_version", "config"}, and from training
a "data" record: tokenizer_sha256, pack_manifest_sha256, pack_dir, tokenizer_dir), plus any files saved
with it (training adds `tokenizer.json` and `tokenizer_meta.json`). `config.json` is written last.
Folders without "data" or the tokenizer files (older exports) load the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.hrm import LanguageModel, build_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


def save_checkpoint(
    model: LanguageModel, directory: str | os.PathLike, *, data: dict[str, Any] | None = None,
    files: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write <dir>/model.safetensors and <dir>/config.json (each to a temp name, then renamed).
    `data` is stored as config.json["data"]; `files` are copied into the folder under their names."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for f in map(Path, files):
        tmp = d / (f.name + ".tmp")
        shutil.copyfile(f, tmp)
        os.replace(tmp, d / f.name)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = d / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format_version": str(FORMAT_VERSION), "arch": model.cfg.arch})
    os.replace(tmp, d / WEIGHTS_FILE)
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "config": model.cfg.to_dict()}
    if data is not None:
        meta["data"] = data
    tmp = d / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, d / CONFIG_FILE)
    return d


def load_config(directory: str | os.PathLike) -> ModelConfig:
    meta = json.loads((Path(directory) / CONFIG_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported checkpoint format {meta.get('format_version')!r}")
    return ModelConfig.from_dict(meta["config"])


def load_data_record(directory: str | os.PathLike) -> dict[str, Any] | None:
    """config.json["data"] (what the weights were trained on), None for exports without it."""
    return json.loads((Path(directory) / CONFIG_FILE).read_text()).get("data")


def load_checkpoint(
    directory: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LanguageModel:
    """Rebuild the model from config.json and fill it from model.safetensors (strict)."""
    cfg = load_config(directory)
    with torch.device("meta"):
        model = build_model(cfg)
    state = load_file(str(Path(directory) / WEIGHTS_FILE), device=str(device))
    model.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    return model
