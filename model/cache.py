"""Key/value cache for incremental decoding.

One slot per (module call, layer): HRM's 8 module calls each see different inputs, so every call's
layers keep their own keys and values (8 calls x num_layers/2 slots); the Transformer has one call,
so one slot per layer. Alongside the keys the cache keeps each cached position's segment id and
prompt flag, so the mask of new queries against all cached keys follows the same rule as training.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(
        self,
        num_slots: int,
        batch_size: int,
        num_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_slots, batch_size, num_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # (slots, B, H, S, D)
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # (slots, B, H, S, D)
        self.segment_ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)  # (B, S)
        self.is_prompt = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # (B, S)
        self.length = 0  # positions filled so far (same for every row; left padding has segment 0)
        self.max_len = max_len

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def add_positions(self, segment_ids: Tensor, is_prompt: Tensor) -> tuple[int, int]:
        """Record the metadata of T new positions; returns the slice [start, end) they occupy.
        The model calls this once per forward, before its layers write their keys and values."""
        B, T = segment_ids.shape
        assert B == self.batch_size, f"cache holds {self.batch_size} rows, got {B}"
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > max_len {self.max_len}")
        self.segment_ids[:, start:end] = segment_ids
        self.is_prompt[:, start:end] = is_prompt
        return start, end

    def write(self, slot: int, start: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v (B, H, T, D) at [start, start+T) of `slot`; return all keys and values
        of that slot so far, (B, H, start+T, D) each."""
        B, H, T, D = k.shape
        end = start + T
        self.k[slot, :, :, start:end] = k
        self.v[slot, :, :, start:end] = v
        return self.k[slot, :, :, :end], self.v[slot, :, :, :end]

    def commit(self, end: int) -> None:
        """Mark positions up to `end` as filled (after every layer has written them)."""
        self.length = end


class KVSlot:
    """What one attention layer sees of the cache during one forward: its slot and the offset."""

    __slots__ = ("cache", "slot", "start")

    def __init__(self, cache: KVCache, slot: int, start: int) -> None:
        self.cache, self.slot, self.start = cache, slot, start

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.write(self.slot, self.start, k, v)
