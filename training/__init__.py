"""Training stage: the HRM-Text model (or the Transformer baseline) on the pack stage's shards,
through a DeepSpeed engine (or a plain PyTorch loop for reference).

Public API:
  TrainConfig                      typed run config (+ the DeepSpeed config derived from it)
  train(cfg) -> dict               train or resume a run; summary with final loss, steps, paths
  PackedShards, Loader, Batch      memory-mapped, checksum-verified, resumable rank-sharded loader
  ShardChecksumError, TrainingDiverged
  ResumeRefused                    a train folder made from another pack, tokenizer or config (training.records)
  AdamAtan2, EMA, build_optimizer, lr_lambda
CLI: python -m training RUN_DIR --preset debug --steps N ...  (or --shards DIR --out DIR; training.cli.main)
"""

from training.config import TrainConfig
from training.data import Batch, Loader, PackedShards, ShardChecksumError
from training.optim import EMA, AdamAtan2, build_optimizer, lr_lambda
from training.records import ResumeRefused
from training.train import TrainingDiverged, train

__all__ = [
    "AdamAtan2", "Batch", "EMA", "Loader", "PackedShards", "ResumeRefused", "ShardChecksumError", "TrainConfig",
    "TrainingDiverged", "build_optimizer", "lr_lambda", "train",
]
