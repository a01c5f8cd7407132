"""Building blocks shared by HRM and the Transformer baseline.

PreNorm block: x = x + Attn(N(x)); x = x + SwiGLU(N(x)), with N a scale-free RMSNorm (eps 1e-6,
no learnable weight), RoPE (theta 1e4, computed in fp32), no biases anywhere, and a gated attention
output: one input projection gives [q | k | v | gate], and out_proj(sigmoid(gate) * attn).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.cache import KVCache, KVSlot
from model.config import ModelConfig
from model.masks import AttnMask

# std of a unit normal truncated to [-2, 2]; dividing by it makes the truncated draw have the target std
_TRUNC_STD = 0.87962566103423978


def trunc_normal_(t: Tensor, std: float) -> Tensor:
    """Truncated (at +-2 sigma) normal init whose actual std is `std` (JAX's convention)."""
    s = std / _TRUNC_STD
    with torch.no_grad():
        return nn.init.trunc_normal_(t, mean=0.0, std=s, a=-2 * s, b=2 * s)


def lecun_init_(linear: nn.Linear) -> None:
    """Truncated LeCun normal: std = 1/sqrt(fan_in)."""
    trunc_normal_(linear.weight, 1.0 / math.sqrt(linear.in_features))


def rms_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Scale-free RMSNorm over the last dim, computed in fp32 and cast back."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_cos_sin(position_ids: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin of the rotary angles, fp32, each (B, T, head_dim/2)."""
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    )  # (D/2,)
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, D/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x (B, T, H, D) by the angles (B, T, D/2), rotate-half layout, in fp32."""
    B, T, H, D = x.shape
    xf = x.float()
    x1, x2 = xf[..., : D // 2], xf[..., D // 2 :]  # (B, T, H, D/2) each
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # (B, T, 1, D/2)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


_compiled_flex = None


def _flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask: object) -> Tensor:
    """FlexAttention through torch.compile (one fused kernel per shape; CUDA only)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    assert q.is_cuda, "the FlexAttention path runs on CUDA only"
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask) -> Tensor:
    """Scaled dot-product attention of q (B, H, Tq, D) over k, v (B, H, Tk, D) -> (B, H, Tq, D)."""
    if mask.block_mask is not None:
        return _flex_attention(q, k, v, mask.block_mask)
    if mask.causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert mask.dense is not None and mask.dense.shape[-2:] == (q.shape[2], k.shape[2]), "mask shape"
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        h = cfg.hidden_size
        self.qkvg_proj = nn.Linear(h, 4 * h, bias=False)  # [q | k | v | gate]
        self.out_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: AttnMask, kv: KVSlot | None = None) -> Tensor:
        B, T, C = x.shape
        H, D = self.num_heads, self.head_dim
        qkvg = self.qkvg_proj(x).view(B, T, 4, H, D)  # (B, T, 4, H, D)
        q, k, v, gate = qkvg.unbind(dim=2)  # (B, T, H, D) each
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if kv is not None:
            k, v = kv.update(k, v)  # (B, H, S, D): cached keys/values plus these
        y = attend(q, k, v, mask)  # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        y = torch.sigmoid(gate.reshape(B, T, C)) * y  # elementwise output gate
        return self.out_proj(y)  # (B, T, C)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_up_proj = nn.Linear(h, 2 * i, bias=False)  # [gate | up]
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (B, T, I) each
        return self.down_proj(F.silu(gate) * up)  # (B, T, C)


class Block(nn.Module):
    """PreNorm transformer block."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.attn = Attention(cfg)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: AttnMask, kv: KVSlot | None = None) -> Tensor:
        x = x + self.attn(rms_norm(x, self.eps), rope, mask, kv)
        return x + self.mlp(rms_norm(x, self.eps))


class Stack(nn.Module):
    """A stack of blocks; one HRM module (H or L) or the whole Transformer."""

    def __init__(self, cfg: ModelConfig, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(cfg) for _ in range(num_layers))

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: AttnMask,
        cache: KVCache | None = None,
        call_index: int = 0,
        cache_start: int = 0,
    ) -> Tensor:
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else KVSlot(cache, call_index * n + i, cache_start)
            x = layer(x, rope, mask, kv)
        return x
