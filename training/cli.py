"""`hrm train` (or `python -m training`, the form the deepspeed launcher runs): train or resume one run.

Single process (no launcher; torch.distributed is set up with world size 1):
    hrm train --shards runs/demo/pack --out runs/demo/train --preset debug --steps 200
Several local ranks (DeepSpeed launcher; the same command resumes after a crash):
    deepspeed --num_gpus 8 -m training --shards ... --out ... --preset XL --bf16 --zero-stage 2
    (on CPU: deepspeed --num_accelerators 2 -m training ...; the CPU ranks use gloo + shm_comm)
Several machines (a hostfile lists "hostname slots=N" per line; the same folders on every node):
    deepspeed --hostfile hostfile --master_addr node0 --master_port 29500 -m training --shards ... --out ...
"""

from __future__ import annotations

import argparse
import json
import sys

from training.config import TrainConfig


def build_parser(prog: str = "hrm train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="pack stage folder (shard-*.arrow + manifest.json)")
    p.add_argument("--out", required=True, help="run folder (config, metrics, checkpoints, exports)")
    p.add_argument("--preset", default="debug")
    p.add_argument("--arch", choices=["hrm", "transformer"], default="hrm")
    p.add_argument("--model-set", action="append", default=[], metavar="KEY=VALUE",
                   help="ModelConfig override, JSON value (e.g. mask=\"causal\", num_layers=8)")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--optimizer", choices=["adam_atan2", "adamw"], default="adam_atan2")
    p.add_argument("--lr", type=float, default=2.2e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=2000,
                   help="linear LR warmup steps (default 2000; lower it for short runs)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument("--ema-decay", type=float, default=0.9999)
    p.add_argument("--grad-clip", type=float, default=0.0)
    p.add_argument("--engine", choices=["deepspeed", "torch"], default="deepspeed")
    p.add_argument("--zero-stage", type=int, choices=[0, 1, 2], default=1)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 on GPU, fp32 on CPU (bf16 keeps fp32 gradient accumulation/reduction)")
    p.add_argument("--bf16", action="store_true", help="same as --precision bf16")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--deepspeed-config", help="your own DeepSpeed JSON (replaces the generated one)")
    p.add_argument("--shm-comm", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--peak-flops", type=float, help="peak FLOP/s of one device for MFU (H100 default 989e12)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p


def config_from_args(a: argparse.Namespace) -> TrainConfig:
    over = {}
    for kv in a.model_set:
        if "=" not in kv:
            raise ValueError(f"--model-set needs KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        try:
            over[k] = json.loads(v)
        except json.JSONDecodeError:
            over[k] = v
    return TrainConfig(
        shards=a.shards, out=a.out, preset=a.preset, arch=a.arch, model_overrides=over, vocab_size=a.vocab_size,
        steps=a.steps, micro_batch_size=a.micro_batch_size, grad_accum=a.grad_accum, seed=a.seed,
        optimizer=a.optimizer, lr=a.lr, weight_decay=a.weight_decay, warmup_steps=a.warmup_steps,
        lr_schedule=a.lr_schedule, ema_decay=a.ema_decay, grad_clip=a.grad_clip, engine=a.engine,
        zero_stage=a.zero_stage, precision="bf16" if a.bf16 else a.precision, device=a.device,
        deepspeed_json=a.deepspeed_config, shm_comm=a.shm_comm, save_every=a.save_every,
        keep_checkpoints=a.keep_checkpoints, peak_flops=a.peak_flops, progress=not a.no_progress,
    )


def main(argv: list[str] | None = None, prog: str = "hrm train") -> int:
    p = build_parser(prog)
    a = p.parse_args(argv)
    try:
        cfg = config_from_args(a)
    except (ValueError, TypeError) as e:
        p.error(str(e))
    if cfg.warmup_steps >= cfg.steps:
        print(f"warning: --warmup-steps {cfg.warmup_steps} >= --steps {cfg.steps}: the learning rate never reaches "
              f"{cfg.lr:g} (it ends at {cfg.lr * cfg.steps / max(cfg.warmup_steps, 1):.3g}); pass a smaller "
              "--warmup-steps for a short run", file=sys.stderr)
    from training.train import TrainingDiverged, train
    from training.data import ShardChecksumError

    try:
        summary = train(cfg)
    except (TrainingDiverged, ShardChecksumError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0
