"""Checkpoints as safetensors (weights and buffers) + JSON (config). Loading never unpickles."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig
from model.hrm import LanguageModel, build_model

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1


def save_checkpoint(model: LanguageModel, directory: str | os.PathLike) -> Path:
    """Write <dir>/model.safetensors and <dir>/config.json (each to a temp name, then renamed)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = d / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format_version": str(FORMAT_VERSION), "arch": model.cfg.arch})
    os.replace(tmp, d / WEIGHTS_FILE)
    meta = {"format_version": FORMAT_VERSION, "config": model.cfg.to_dict()}
    tmp = d / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, d / CONFIG_FILE)
    return d


def load_config(directory: str | os.PathLike) -> ModelConfig:
    meta = json.loads((Path(directory) / CONFIG_FILE).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"unsupported checkpoint format {meta.get('format_version')!r}")
    return ModelConfig.from_dict(meta["config"])


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
