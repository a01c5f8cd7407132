"""Batched generation with a per-(module call, layer) KV cache.

Prompts of different lengths are left-padded into one (B, P) batch: padding has segment id 0 (no one
attends to it), positions start at 0 on each row's first real token, and every prompt token is
flagged `is_prompt`. The prompt is encoded once (bidirectionally under the PrefixLM mask), filling
every (call, layer) slot of the cache; each new token then runs the model's full recurrence (all 8
HRM module calls) for that one position, attending to the cached keys/values of the same
(call, layer). `use_cache=False` recomputes the whole sequence at every step instead (the reference
the cached path is tested and benchmarked against).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from model.hrm import LanguageModel

StopFn = Callable[[int, list[int]], bool]


def sample_next(
    logits: Tensor,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token of each row from logits (B, V): greedy when temperature <= 0, else
    sampling from the temperature-scaled distribution restricted to top-k and/or the top-p nucleus."""
    B, V = logits.shape
    logits = logits.float()
    if temperature <= 0.0:
        return logits.argmax(dim=-1)  # (B,)
    logits = logits / temperature
    if top_k is not None and 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of strictly better tokens
        drop = mass_before > top_p  # never drops the best token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[Tensor, ...]:
    B = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    if B == 0 or int(lengths.min()) < 1:
        raise ValueError("generate needs at least one prompt, each with at least one token")
    P = int(lengths.max())
    ids = torch.full((B, P), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, P - len(p) :] = torch.tensor(list(p), dtype=torch.long)
    real = torch.arange(P)[None, :] >= (P - lengths)[:, None]  # (B, P) bool
    pos = (torch.cumsum(real.long(), dim=1) - 1).clamp_min(0)  # (B, P)
    seg = real.long()  # one sample per row; 0 = padding
    return ids.to(device), seg.to(device), pos.to(device), real.to(device), lengths.to(device)


def _match_stop(tokens: list[int], stops: list[list[int]]) -> int:
    """Length of the stop sequence that `tokens` ends with (0 if none)."""
    for s in stops:
        if len(tokens) >= len(s) and tokens[len(tokens) - len(s) :] == s:
            return len(s)
    return 0


@torch.no_grad()
def generate(
    model: LanguageModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token_ids: Sequence[int | Sequence[int]] | None = None,
    stop_fn: StopFn | None = None,
    use_cache: bool = True,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """Continue each prompt by up to max_new_tokens tokens; returns the new tokens of each row.

    stop_token_ids: token ids or token-id sequences (e.g. EOA, or the tokenisation of a stop
      string); a row stops when its output ends with one, which is removed from the result.
    stop_fn(row, tokens_so_far) -> bool: called after every token (decode and check stop strings
      there); a row stops when it returns True, its tokens kept as they are.
    """
    assert max_new_tokens >= 0
    device = model.lm_head.weight.device
    stops = [[s] if isinstance(s, int) else list(s) for s in (stop_token_ids or [])]
    assert all(len(s) > 0 for s in stops), "empty stop sequence"
    ids, seg, pos, prm, lengths = _left_pad(prompts, pad_id, device)
    B, P = ids.shape
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    if max_new_tokens == 0:
        return out

    cache = model.new_cache(B, P + max_new_tokens) if use_cache else None
    logits = model(
        ids, segment_ids=seg, position_ids=pos, is_prompt=prm, cache=cache, last_logits_only=True
    ).logits[:, -1]  # (B, V)
    next_pos = lengths.clone()  # (B,) position id of the next token
    ones = torch.ones(B, 1, dtype=torch.long, device=device)
    no_prompt = torch.zeros(B, 1, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        tok = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)  # (B,)
        for b, t in enumerate(tok.tolist()):
            if done[b]:
                continue
            out[b].append(t)
            n_stop = _match_stop(out[b], stops)
            if n_stop:
                del out[b][len(out[b]) - n_stop :]
                done[b] = True
            elif stop_fn is not None and stop_fn(b, out[b]):
                done[b] = True
        if all(done) or step == max_new_tokens - 1:
            break
        new = tok[:, None]  # (B, 1)
        new_pos = next_pos[:, None]  # (B, 1)
        if use_cache:
            logits = model(
                new, segment_ids=ones, position_ids=new_pos, is_prompt=no_prompt, cache=cache, last_logits_only=True
            ).logits[:, -1]
        else:
            ids = torch.cat([ids, new], dim=1)
            seg = torch.cat([seg, ones], dim=1)
            pos = torch.cat([pos, new_pos], dim=1)
            prm = torch.cat([prm, no_prompt], dim=1)
            logits = model(
                ids, segment_ids=seg, position_ids=pos, is_prompt=prm, last_logits_only=True, attn_backend="sdpa"
            ).logits[:, -1]  # T grows every step: no per-shape compiled flex kernels
        next_pos = next_pos + 1
    return out
