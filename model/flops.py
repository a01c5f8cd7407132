"""Matmul FLOPs of what a training (or inference) step really runs, for MFU.

Counted (multiply-add = 2 FLOPs; norms, RoPE, activations, gates and softmax are left out, as in
the usual 6N accounting):
  * every module call's forward: HRM runs num_calls (8) calls of num_layers/2 blocks each, i.e.
    4x the block forwards of a Transformer with the same parameters;
  * the backward (2x the forward: input and weight gradients) only for the calls that carry
    gradient (the last `bp`; the Transformer: all of its layers);
  * attention by the batch's real mask: 4 * hidden FLOPs per allowed (query, key) pair and layer
    (QK^T and AV), where the allowed pairs are counted from segment ids / prompt flags;
  * the LM head forward (2*h*V per token) and backward (2x).
Linear layers run on every position, padding included (it is computed, then ignored).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from model.config import ModelConfig
from model.masks import count_allowed_pairs


@dataclass
class FlopCount:
    forward: float  # whole batch
    backward: float  # whole batch
    tokens: int  # positions in the batch (B * T)
    breakdown: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.forward + self.backward

    @property
    def per_token(self) -> float:
        return self.total / max(self.tokens, 1)

    @property
    def forward_per_token(self) -> float:
        return self.forward / max(self.tokens, 1)


def block_linear_flops_per_token(cfg: ModelConfig) -> int:
    """Forward matmul FLOPs of one block's projections for one token."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return 2 * (h * 4 * h + h * h + h * 2 * i + i * h)  # qkvg, out, gate_up, down


def count_flops(
    cfg: ModelConfig,
    batch_size: int | None = None,
    seq_len: int | None = None,
    *,
    segment_ids: Tensor | None = None,
    is_prompt: Tensor | None = None,
    bp: int | None = None,
    training: bool = True,
) -> FlopCount:
    """FLOPs of one step on a (B, T) batch. Give segment_ids / is_prompt (B, T) of the real batch
    to count attention by its mask; without them each row is one causal sample of T tokens."""
    if segment_ids is not None:
        B, T = segment_ids.shape
        if is_prompt is None:
            is_prompt = torch.zeros_like(segment_ids, dtype=torch.bool)
        pairs = count_allowed_pairs(segment_ids, is_prompt, prefix=cfg.mask == "prefix")
    else:
        assert batch_size is not None and seq_len is not None, "need (batch_size, seq_len) or segment_ids"
        B, T = batch_size, seq_len
        pairs = B * T * (T + 1) // 2
    N = B * T
    bp = cfg.bp if bp is None else bp

    layer_fwd = block_linear_flops_per_token(cfg) * N + 4 * cfg.hidden_size * pairs  # one block, whole batch
    call_fwd = cfg.layers_per_call * layer_fwd  # one module call
    n_grad = len(cfg.grad_calls(bp)) if training else 0
    head_fwd = 2 * cfg.hidden_size * cfg.vocab_size * N

    body_fwd = cfg.num_calls * call_fwd
    body_bwd = 2 * n_grad * call_fwd
    head_bwd = 2 * head_fwd if training else 0
    return FlopCount(
        forward=float(body_fwd + head_fwd),
        backward=float(body_bwd + head_bwd),
        tokens=N,
        breakdown={
            "body_forward": float(body_fwd),
            "body_backward": float(body_bwd),
            "head_forward": float(head_fwd),
            "head_backward": float(head_bwd),
            "attention_pairs": float(pairs),
            "attention_density": pairs / float(B * T * T),
            "calls_with_grad": float(n_grad),
        },
    )
