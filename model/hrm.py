"""HRM-Text ("no carry" HRM) and the Transformer baseline built from the same blocks.

HRM forward pass (default cycles=2, l_steps=3; 8 module calls, named in call order
L0 L1 L2 H0 L3 L4 L5 H1):
    z_H = embed(x) * sqrt(h)                      (embedding init std 1/sqrt(h))
    z_L = z_L_init  broadcast to every position   (fixed random buffer, std 1)
    repeat `cycles` times:
        repeat `l_steps` times:  z_L = N(f_L(z_L + z_H))
        z_H = N(f_H(z_H + z_L))
    logits = lm_head(z_H)
N is the scale-free RMSNorm ("MagicNorm" at the exit of every module call); the exit norm of the
last H call doubles as the final norm before the LM head.

Truncated backprop: only the last H_bp H calls and the last L_bp L calls run with gradient
(H_bp = min(cycles, bp-1), L_bp = bp - H_bp, the reference's split); every other call runs under no_grad. At bp = 5 that is
H0, L3, L4, L5, H1 (the last five calls). At bp = 2 (H1, L5) no gradient reaches the embedding
table, because x enters the graph only through H0's input. We keep that property on purpose: it is
what the reference code does during the first stage of the warmup schedule, and the embedding starts
learning as soon as bp reaches 3 (H0 gets gradient). `bp` is a forward() argument so that the trainer
can follow `bp_schedule`.

The Transformer baseline: the same embedding, num_layers blocks in one stack, a final N, the same
untied LM head: the same parameter count as the HRM of the same config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.cache import KVCache, KVSlot
from model.config import AttnBackend, ModelConfig
from model.layers import Stack, lecun_init_, rms_norm, rope_cos_sin, trunc_normal_
from model.masks import IGNORE_INDEX, AttnMask, allowed_pairs_mask, dense_mask, flex_block_mask

StateHook = Callable[[str, Tensor], None]


def bp_schedule(step: int, total_steps: int, start: int = 2, end: int = 5, warmup_frac: float = 0.2) -> int:
    """Warmup deep credit assignment: bp climbs start, start+1, ..., end in equal stairs over the
    first warmup_frac of training (a floored linear ramp: `end` is reached when warmup ends)."""
    assert total_steps > 0 and start <= end and 0.0 <= warmup_frac <= 1.0
    warmup = warmup_frac * total_steps
    if warmup <= 0 or step >= warmup:
        return end
    return start + int((end - start) * max(step, 0) / warmup)


def lm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cross entropy in fp32, summed over labelled tokens and divided by their count (clamped at 1).
    Returns (loss, loss_sum, num_tokens) so a trainer can also normalise by a global count."""
    B, T, V = logits.shape
    assert labels.shape == (B, T), f"labels {tuple(labels.shape)} vs logits {(B, T)}"
    loss_sum = F.cross_entropy(
        logits.float().reshape(B * T, V), labels.reshape(B * T), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    n = (labels != IGNORE_INDEX).sum()
    return loss_sum / n.clamp_min(1), loss_sum, n


@dataclass
class ModelOutput:
    logits: Tensor  # (B, T, V), or (B, 1, V) with last_logits_only
    loss: Tensor | None = None  # loss_sum / max(num_tokens, 1)
    loss_sum: Tensor | None = None
    num_tokens: Tensor | None = None  # answer (labelled) tokens in this batch


class LanguageModel(nn.Module):
    """What HRM and the Transformer share: embedding, LM head, masks, loss, cache, logit lens."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)  # untied

    def init_weights(self) -> None:
        """Truncated LeCun normal for every projection (std 1/sqrt(fan_in): 1/sqrt(h) for the
        input/output projections, 1/sqrt(intermediate) for FFN-out); embedding std 1/sqrt(h)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                lecun_init_(m)
        trunc_normal_(self.embed.weight, 1.0 / math.sqrt(self.cfg.hidden_size))

    # --- subclasses implement ------------------------------------------------------------------
    def body(
        self, z: Tensor, rope: tuple[Tensor, Tensor], mask: AttnMask, cache: KVCache | None, cache_start: int,
        bp: int, state_hook: StateHook | None,
    ) -> Tensor:
        raise NotImplementedError

    # --- forward --------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        *,
        segment_ids: Tensor | None = None,
        position_ids: Tensor | None = None,
        is_prompt: Tensor | None = None,
        labels: Tensor | None = None,
        bp: int | None = None,
        cache: KVCache | None = None,
        last_logits_only: bool = False,
        state_hook: StateHook | None = None,
        attn_backend: AttnBackend | None = None,
    ) -> ModelOutput:
        """input_ids and the optional packing metadata are (B, T) (see model.masks).
        bp: module calls with gradient (HRM only; default cfg.bp). cache: a KVCache to read from and
        append to (generation). state_hook(name, z) sees every module call's output (HRM) or every
        layer's output (Transformer). attn_backend overrides cfg.attn_backend for this call: FlexAttention
        is compiled once per shape, so callers whose T changes at every call (uncached generation,
        ragged evaluation batches) should pass "sdpa" or pad to fixed lengths."""
        cfg = self.cfg
        assert input_ids.dim() == 2, f"input_ids must be (B, T), got {tuple(input_ids.shape)}"
        B, T = input_ids.shape
        for name, t in (("segment_ids", segment_ids), ("position_ids", position_ids), ("is_prompt", is_prompt)):
            assert t is None or t.shape == (B, T), f"{name} {tuple(t.shape)} != input_ids {(B, T)}"
        bp = cfg.bp if bp is None else bp
        cfg.check_bp(bp)

        if position_ids is None:
            assert cache is None or cache.length == 0, "pass position_ids when decoding with a cache"
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        backend = cfg.attn_backend if attn_backend is None else attn_backend
        mask, cache_start, cache_end = self._attention_mask(input_ids, segment_ids, is_prompt, cache, backend)
        rope = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta)  # (B, T, D/2) x2, fp32

        z = self.embed(input_ids) * math.sqrt(cfg.hidden_size)  # (B, T, C)
        z = self.body(z, rope, mask, cache, cache_start, bp, state_hook)  # (B, T, C), normalised
        if cache is not None:
            cache.commit(cache_end)
        if last_logits_only:
            z = z[:, -1:]  # (B, 1, C)
        logits = self.lm_head(z)  # (B, T, V)
        if labels is None:
            return ModelOutput(logits=logits)
        assert not last_logits_only, "the loss needs every position's logits"
        loss, loss_sum, n = lm_loss(logits, labels)
        return ModelOutput(logits=logits, loss=loss, loss_sum=loss_sum, num_tokens=n)

    def _attention_mask(
        self, input_ids: Tensor, segment_ids: Tensor | None, is_prompt: Tensor | None, cache: KVCache | None,
        backend: AttnBackend,
    ) -> tuple[AttnMask, int, int]:
        B, T = input_ids.shape
        dev = input_ids.device
        prefix = self.cfg.mask == "prefix"
        plain = segment_ids is None and (is_prompt is None or not prefix)
        seg = torch.ones(B, T, dtype=torch.long, device=dev) if segment_ids is None else segment_ids
        prm = torch.zeros(B, T, dtype=torch.bool, device=dev) if is_prompt is None else is_prompt.bool()
        if cache is not None:
            start, end = cache.add_positions(seg, prm)
            q_idx = torch.arange(start, end, device=dev).expand(B, T)
            k_idx = torch.arange(end, device=dev).expand(B, end)
            ok = allowed_pairs_mask(seg, prm, q_idx, cache.segment_ids[:, :end], cache.is_prompt[:, :end], k_idx, prefix)
            return AttnMask(dense=ok[:, None]), start, end  # (B, 1, T, end)
        if plain:
            return AttnMask(causal=True), 0, T
        if backend not in ("auto", "sdpa", "flex"):
            raise ValueError(f"attn_backend must be auto/sdpa/flex, got {backend!r}")
        if backend == "flex" and dev.type != "cuda":
            raise ValueError("attn_backend='flex' needs CUDA (use 'sdpa' or 'auto' on CPU)")
        if backend == "flex" or (backend == "auto" and dev.type == "cuda"):
            return AttnMask(block_mask=flex_block_mask(seg, prm, prefix)), 0, T
        return AttnMask(dense=dense_mask(seg, prm, prefix)), 0, T  # (B, 1, T, T)

    # --- helpers --------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None) -> KVCache:
        cfg = self.cfg
        p = self.lm_head.weight
        return KVCache(
            cfg.num_calls * cfg.layers_per_call, batch_size, cfg.num_heads, max_len, cfg.head_dim,
            dtype=dtype or p.dtype, device=p.device,
        )

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed.weight.numel() + self.lm_head.weight.numel()
        return n

    @torch.no_grad()
    def logit_lens(self, input_ids: Tensor, **kwargs) -> dict[str, Tensor]:
        """Logits (fp32, (B, T, V)) read off every intermediate state through the final norm and the
        LM head, keyed by call name ("L0".."L5", "H0", "H1") for HRM, "layer{i}" for the Transformer."""
        states: dict[str, Tensor] = {}
        self.forward(input_ids, state_hook=lambda name, z: states.__setitem__(name, z), **kwargs)
        eps = self.cfg.norm_eps
        return {name: self.lm_head(rms_norm(z, eps)).float() for name, z in states.items()}


class HRM(LanguageModel):
    def __init__(self, cfg: ModelConfig) -> None:
        assert cfg.arch == "hrm", f"HRM needs arch='hrm', got {cfg.arch!r}"
        super().__init__(cfg)
        self.h_module = Stack(cfg, cfg.h_layers)
        self.l_module = Stack(cfg, cfg.l_layers)
        self.register_buffer("z_l_init", torch.zeros(cfg.hidden_size), persistent=True)  # (C,)
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        trunc_normal_(self.z_l_init, 1.0)

    def body(self, z, rope, mask, cache, cache_start, bp, state_hook):
        cfg = self.cfg
        B, T, C = z.shape
        grad_calls = set(cfg.grad_calls(bp)) if torch.is_grad_enabled() else set()
        z_h = z  # (B, T, C)
        z_l = self.z_l_init.to(z.dtype).expand(B, T, C)  # (B, T, C)
        for ci, name in enumerate(cfg.call_names):
            with torch.set_grad_enabled(name in grad_calls):
                if name[0] == "L":
                    z_l = rms_norm(self.l_module(z_l + z_h, rope, mask, cache, ci, cache_start), cfg.norm_eps)
                    out = z_l
                else:
                    z_h = rms_norm(self.h_module(z_h + z_l, rope, mask, cache, ci, cache_start), cfg.norm_eps)
                    out = z_h
            if state_hook is not None:
                state_hook(name, out)
        return z_h


class Transformer(LanguageModel):
    """The ablation baseline: one stack of num_layers blocks and a final norm."""

    def __init__(self, cfg: ModelConfig) -> None:
        assert cfg.arch == "transformer", f"Transformer needs arch='transformer', got {cfg.arch!r}"
        super().__init__(cfg)
        self.stack = Stack(cfg, cfg.num_layers)
        self.init_weights()

    def body(self, z, rope, mask, cache, cache_start, bp, state_hook):
        for i, layer in enumerate(self.stack.layers):
            z = layer(z, rope, mask, None if cache is None else KVSlot(cache, i, cache_start))
            if state_hook is not None:
                state_hook(f"layer{i}", z)
        return rms_norm(z, self.cfg.norm_eps)


def build_model(cfg: ModelConfig) -> LanguageModel:
    """The network named by cfg.arch, freshly initialised (on the default device, fp32)."""
    return HRM(cfg) if cfg.arch == "hrm" else Transformer(cfg)
