"""Diagnostics of a trained network, read off one forward pass (no training code, no data loading).

* `lens_distributions` / `logit_lens_stats`: the logit lens across the recurrent steps. Every
  intermediate state (HRM: the output of every module call, L0 .. H1; Transformer: every layer) is
  read through the final norm and the LM head (`LanguageModel.logit_lens`) and softmaxed. For each
  state and position: the probability that state gives to the model's FINAL prediction (the argmax of
  the last state's distribution, which is the model's own output) and KL(final || state).
* `attention_entropy`: the entropy (nats) of every attention row, per layer and module call, under
  the model's own mask (causal or PrefixLM). A query that may see n keys has entropy in [0, log n],
  so every value lies in [0, log T].

Both take the model's forward() keyword arguments (input_ids and packing metadata, (B, T)); pass
segment_ids / is_prompt so the PrefixLM mask is the one training used.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from model.hrm import LanguageModel
from model.layers import Attention, apply_rope
from model.masks import AttnMask


@torch.no_grad()
def lens_distributions(model: LanguageModel, input_ids: Tensor, **kwargs: Any) -> dict[str, Tensor]:
    """Softmax of every intermediate state's lens logits, fp32 (B, T, V) per state, in call order."""
    lens = model.logit_lens(input_ids, **kwargs)
    return {name: F.softmax(logits.float(), dim=-1) for name, logits in lens.items()}


@torch.no_grad()
def logit_lens_stats(model: LanguageModel, input_ids: Tensor, **kwargs: Any) -> dict[str, dict[str, Tensor]]:
    """Per state: {"p_final": (B, T) probability of the final prediction, "kl": (B, T) KL(final || state)
    in nats}. The final prediction at a position is the argmax of the last state's distribution."""
    lens = model.logit_lens(input_ids, **kwargs)
    names = list(lens)
    logp = {n: F.log_softmax(v.float(), dim=-1) for n, v in lens.items()}  # (B, T, V) each
    final = logp[names[-1]]  # (B, T, V)
    pred = final.argmax(-1, keepdim=True)  # (B, T, 1)
    p_fin = final.exp()
    out = {}
    for n in names:
        lp = logp[n]
        kl = (p_fin * (final - lp)).sum(-1).clamp_min(0.0)  # (B, T)
        out[n] = {"p_final": lp.gather(-1, pred).squeeze(-1).exp(), "kl": kl}
    return out


def _dense_allowed(mask: AttnMask, B: int, T: int, device: torch.device) -> Tensor:
    """(B, 1, T, T) bool: which keys each query may see."""
    if mask.dense is not None:
        assert mask.dense.shape[-2:] == (T, T), "attention entropy is computed without a KV cache"
        return mask.dense.expand(B, 1, T, T)
    if mask.causal:
        return torch.ones(T, T, dtype=torch.bool, device=device).tril()[None, None].expand(B, 1, T, T)
    raise ValueError("attention_entropy needs a dense or causal mask: call it with attn_backend='sdpa'")


@torch.no_grad()
def attention_entropy(model: LanguageModel, input_ids: Tensor, **kwargs: Any) -> dict[str, Tensor]:
    """Entropy (nats, fp32) of every attention row, (B, H, T) per layer of every module call, keyed
    "<call>.<layer>" for HRM (e.g. "L0.0", "H1.1") and "layer{i}" for the Transformer, in call order.

    The probabilities are recomputed from each Attention module's own input (pre-forward hooks), with
    its projections, RoPE and the forward's mask: softmax(q k^T / sqrt(D)) over the allowed keys."""
    kwargs = {**kwargs, "attn_backend": "sdpa"}
    assert kwargs.get("cache") is None, "attention_entropy runs without a KV cache"
    pending: list[Tensor] = []
    out: dict[str, Tensor] = {}

    def pre_hook(mod: Attention, args: tuple) -> None:
        x, rope, mask = args[0], args[1], args[2]
        B, T, C = x.shape
        H, D = mod.num_heads, mod.head_dim
        q, k, _, _ = mod.qkvg_proj(x).view(B, T, 4, H, D).unbind(dim=2)  # (B, T, H, D) each
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k = q.transpose(1, 2).float(), k.transpose(1, 2).float()  # (B, H, T, D)
        scores = q @ k.transpose(-1, -2) / D**0.5  # (B, H, T, T)
        allowed = _dense_allowed(mask, B, T, x.device)  # (B, 1, T, T)
        scores = scores.masked_fill(~allowed, float("-inf"))
        logp = F.log_softmax(scores, dim=-1)
        p = logp.exp()
        ent = -(p * logp.masked_fill(~allowed, 0.0)).sum(-1)  # (B, H, T)
        pending.append(ent.clamp_min(0.0))

    def state_hook(name: str, z: Tensor) -> None:
        if len(pending) == 1 and not name.startswith(("L", "H")):
            out[name] = pending[0]  # a Transformer layer
        else:
            for i, e in enumerate(pending):
                out[f"{name}.{i}"] = e
        pending.clear()

    handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules() if isinstance(m, Attention)]
    try:
        model(input_ids, state_hook=state_hook, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return out


__all__ = ["attention_entropy", "lens_distributions", "logit_lens_stats"]
