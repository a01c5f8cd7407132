"""HRM-Text network and its Transformer baseline (pure PyTorch).

Public API:
  ModelConfig, PRESETS                         typed config + named presets (debug, cpu-small, B, L, XL, XXL)
  HRM, Transformer, build_model, ModelOutput   the networks
  bp_schedule, lm_loss                         truncated-backprop warmup schedule, the loss
  PackedBatch, pack_samples, pad_pairs, random_packed_batch, metadata_from_boundaries, build_labels,
  dense_mask, flex_block_mask, count_allowed_pairs           masks / labels from packing metadata
  KVCache, generate, sample_next               cached generation
  count_flops, FlopCount                       FLOP counter for MFU
  save_checkpoint, load_checkpoint             safetensors + JSON checkpoints
"""

from model.cache import KVCache
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import PRESETS, ModelConfig, swiglu_intermediate
from model.flops import FlopCount, count_flops
from model.generate import generate, sample_next
from model.hrm import HRM, LanguageModel, ModelOutput, Transformer, bp_schedule, build_model, lm_loss
from model.masks import (
    IGNORE_INDEX,
    PackedBatch,
    build_labels,
    count_allowed_pairs,
    dense_mask,
    flex_block_mask,
    metadata_from_boundaries,
    pack_samples,
    pad_pairs,
    random_packed_batch,
)

__all__ = [
    "PRESETS",
    "IGNORE_INDEX",
    "FlopCount",
    "HRM",
    "KVCache",
    "LanguageModel",
    "ModelConfig",
    "ModelOutput",
    "PackedBatch",
    "Transformer",
    "bp_schedule",
    "build_labels",
    "pad_pairs",
    "build_model",
    "count_allowed_pairs",
    "count_flops",
    "dense_mask",
    "flex_block_mask",
    "generate",
    "lm_loss",
    "load_checkpoint",
    "metadata_from_boundaries",
    "pack_samples",
    "random_packed_batch",
    "sample_next",
    "save_checkpoint",
    "swiglu_intermediate",
]
