"""Typed configuration of a training run, and the DeepSpeed config generated from it.

`TrainConfig` is the one source of truth; `deepspeed_config()` derives the DeepSpeed JSON from it
(batch sizes, ZeRO stage, bf16). A user JSON (`deepspeed_json`) may replace the generated one; its
batch sizes must then agree with the TrainConfig (checked), since the data loader follows them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from model import PRESETS, ModelConfig

Engine = Literal["deepspeed", "torch"]


@dataclass
class TrainConfig:
    # --- where --------------------------------------------------------------------------------
    shards: str  # a pack stage folder (shard-*.arrow + manifest.json)
    out: str  # train folder: config, logs, checkpoints, exports
    run_dir: str | None = None  # the run folder (run.json) the pack belongs to: its manifest records this training
    restart: bool = False  # out holds an earlier run: start afresh in the next free <out>-N (never resume)
    # --- model --------------------------------------------------------------------------------
    preset: str = "debug"
    arch: Literal["hrm", "transformer"] = "hrm"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields
    vocab_size: int | None = None  # None: the tokenizer's (via the pack manifest), else the preset's
    # --- schedule -----------------------------------------------------------------------------
    steps: int = 100
    micro_batch_size: int = 4  # sequences per rank per micro step
    grad_accum: int = 1
    seed: int = 1234
    # --- optimizer (paper: Adam-atan2, betas 0.9/0.95, wd 0.1, warmup then constant, EMA) -------
    optimizer: Literal["adam_atan2", "adamw"] = "adam_atan2"
    lr: float = 2.2e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int = 2000
    lr_schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1  # cosine only
    ema_decay: float = 0.9999
    grad_clip: float = 0.0  # 0 = none (the paper)
    # --- deep credit assignment warmup (model.bp_schedule) --------------------------------------
    bp_start: int = 2
    bp_end: int = 5
    bp_warmup_frac: float = 0.2
    # --- engine -------------------------------------------------------------------------------
    engine: Engine = "deepspeed"  # "torch": the plain PyTorch loop (reference / benchmark)
    zero_stage: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: Literal["auto", "cpu", "cuda"] = "auto"
    deepspeed_json: str | None = None  # a user DeepSpeed config file (replaces the generated one)
    shm_comm: Literal["auto", "on", "off"] = "auto"  # CPU: auto = build/use only when world size > 1
    # --- checkpoints, logging, safety -----------------------------------------------------------
    save_every: int = 0  # steps; 0 = only at the end
    # a copy of the checkpoints on object storage (s3://bucket/run/checkpoints, gs://, memory://): each saved
    # tag is published (files, then its _files.json), then URL/latest; a train folder without a checkpoint
    # resumes from the tag URL/latest names, fetched and checked (pipeline/storage.py)
    checkpoint_url: str | None = None
    keep_checkpoints: int = 2
    peak_flops: float | None = None  # per device; None: 989e12 on H100, unknown elsewhere (no MFU)
    progress: bool = True
    tensorboard: bool = True  # when the package is installed
    spike_factor: float = 4.0  # stop when loss > factor * median of the last spike_window losses
    spike_window: int = 20
    fail_at_step: int | None = None  # testing: inject a NaN loss at this step

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {sorted(PRESETS)}")
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1)"),
            (self.zero_stage in (0, 1, 2),
             "zero_stage must be 0, 1 or 2 (stage 3 is not wired yet: the EMA and the safetensors export "
             "read whole parameters)"),
            (self.save_every >= 0, "save_every must be >= 0"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
            (self.engine in ("deepspeed", "torch"), "engine must be 'deepspeed' or 'torch'"),
            (self.precision in ("auto", "fp32", "bf16"), "precision must be 'auto', 'fp32' or 'bf16'"),
            (self.optimizer in ("adam_atan2", "adamw"), "optimizer must be 'adam_atan2' or 'adamw'"),
            (self.lr_schedule in ("constant", "cosine"), "lr_schedule must be 'constant' or 'cosine'"),
            (self.spike_factor > 1, "spike_factor must be > 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")
        self.model_config()  # fails early on bad model overrides

    # --- derived ------------------------------------------------------------------------------
    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        over = dict(self.model_overrides)
        over["arch"] = self.arch
        v = vocab_size or self.vocab_size
        if v:
            over["vocab_size"] = v
        return ModelConfig.preset(self.preset, **over)

    def global_batch(self, world_size: int) -> int:
        """Sequences per optimizer step, all ranks together."""
        return self.micro_batch_size * self.grad_accum * world_size

    def resolved_precision(self, device: str) -> str:
        if self.precision == "auto":
            return "bf16" if device == "cuda" else "fp32"
        return self.precision

    def deepspeed_config(self, world_size: int, device: str = "cpu") -> dict[str, Any]:
        if self.deepspeed_json:
            ds = json.loads(Path(self.deepspeed_json).read_text())
            want = {"train_micro_batch_size_per_gpu": self.micro_batch_size, "gradient_accumulation_steps": self.grad_accum}
            for k, v in want.items():
                if k in ds and ds[k] != v:
                    raise ValueError(f"{self.deepspeed_json}: {k}={ds[k]} disagrees with the training config ({v})")
            if ds.get("zero_optimization", {}).get("stage", 0) == 3:
                raise ValueError(f"{self.deepspeed_json}: ZeRO stage 3 is not supported by this trainer yet")
            ds.update(want)
            ds["train_batch_size"] = self.global_batch(world_size)
            return ds
        ds: dict[str, Any] = {
            "train_batch_size": self.global_batch(world_size),
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": {"stage": self.zero_stage},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
            "zero_allow_untested_optimizer": True,
        }
        if self.zero_stage in (1, 2):
            # fp32 reduction of gradients; contiguous buckets keep the all-reduce order fixed
            ds["zero_optimization"].update(reduce_bucket_size=5e8, allgather_bucket_size=5e8, contiguous_gradients=True)
        if self.resolved_precision(device) == "bf16":
            ds["bf16"] = {"enabled": True}
            ds["data_types"] = {"grad_accum_dtype": "fp32"}
        return ds

    # --- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        return TrainConfig.from_dict({**self.to_dict(), **changes})
