"""Attention masks, labels and positions, all derived from one set of packing metadata.

Batch format (every tensor (B, T), one row = several packed samples followed by padding):
  input_ids    int64  token ids
  segment_ids  int64  which packed sample a token belongs to: 1, 2, ... ; 0 = padding.
                      Each sample is one contiguous run of one id.
  position_ids int64  0, 1, 2, ... restarting at every sample (0 on padding)
  is_prompt    bool   True on the instruction ("prompt") tokens of a sample
  labels       int64  next token to predict, -100 where there is no loss

The PrefixLM mask and the answer-only labels are both read off the same `is_prompt` flags, which
come from ONE prompt length per sample (`metadata_from_boundaries`), so they cannot disagree.

Mask rule, for query q and key k in the same row:
  allowed = same sample and not padding and (k <= q  or  (prefix and q, k both prompt tokens))
            or q == k                                  (padding sees itself only: no empty rows)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------
# Packing metadata
# ----------------------------------------------------------------------------------------------
@dataclass
class PackedBatch:
    input_ids: Tensor  # (B, T) int64
    segment_ids: Tensor  # (B, T) int64, 0 = padding
    position_ids: Tensor  # (B, T) int64
    is_prompt: Tensor  # (B, T) bool
    labels: Tensor  # (B, T) int64, -100 = no loss

    def as_kwargs(self) -> dict[str, Tensor]:
        """Keyword arguments for `model(...)` (input_ids and labels included)."""
        return dict(
            input_ids=self.input_ids,
            segment_ids=self.segment_ids,
            position_ids=self.position_ids,
            is_prompt=self.is_prompt,
            labels=self.labels,
        )

    def to(self, device: torch.device | str) -> "PackedBatch":
        return PackedBatch(**{k: v.to(device) for k, v in self.as_kwargs().items()})


def metadata_from_boundaries(
    boundaries: Sequence[Sequence[tuple[int, int, int]]], seq_len: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-position metadata from the packer's per-sample boundaries.

    boundaries[b] lists the samples of row b as (start, prompt_len, length): the sample occupies
    [start, start + length) and its first prompt_len tokens are the instruction.
    Returns segment_ids (B, T), position_ids (B, T), is_prompt (B, T).
    """
    B = len(boundaries)
    segment_ids = torch.zeros(B, seq_len, dtype=torch.long)
    position_ids = torch.zeros(B, seq_len, dtype=torch.long)
    is_prompt = torch.zeros(B, seq_len, dtype=torch.bool)
    for b, row in enumerate(boundaries):
        end_prev = 0
        for i, (start, prompt_len, length) in enumerate(row):
            if start < end_prev or start + length > seq_len or length < 1:
                raise ValueError(f"row {b} sample {i}: bad span start={start} length={length} (T={seq_len})")
            if not 0 <= prompt_len <= length:
                raise ValueError(f"row {b} sample {i}: prompt_len {prompt_len} outside [0, {length}]")
            segment_ids[b, start : start + length] = i + 1
            position_ids[b, start : start + length] = torch.arange(length)
            is_prompt[b, start : start + prompt_len] = True
            end_prev = start + length
    return segment_ids, position_ids, is_prompt


def build_labels(
    input_ids: Tensor, segment_ids: Tensor, is_prompt: Tensor, loss: Literal["answer", "full"] = "answer"
) -> Tensor:
    """labels[t] = input_ids[t+1] when t+1 is in the same sample (and, for the answer-only loss,
    t+1 is a response token: so the last prompt token predicts the first response token);
    -100 elsewhere (prompt, across sample boundaries, padding, last column)."""
    assert input_ids.shape == segment_ids.shape == is_prompt.shape, "metadata shapes differ"
    B, T = input_ids.shape
    labels = torch.full_like(input_ids, IGNORE_INDEX)  # (B, T)
    nxt_tok = input_ids[:, 1:]  # (B, T-1)
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)  # (B, T-1)
    if loss == "answer":
        same &= ~is_prompt[:, 1:]
    elif loss != "full":
        raise ValueError(f"loss must be 'answer' or 'full', got {loss!r}")
    labels[:, :-1] = torch.where(same, nxt_tok, torch.full_like(nxt_tok, IGNORE_INDEX))
    return labels


def pad_pairs(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad: int) -> dict[str, Tensor]:
    """A batch of (prompt ids, response ids) pairs, one sample per row, right-padded with `pad`:
    input_ids, segment_ids (1 on the sample, 0 on padding), position_ids and is_prompt, each (B, T)."""
    B, T = len(pairs), max(len(p) + len(r) for p, r in pairs)
    ids = torch.full((B, T), pad, dtype=torch.long)
    seg = torch.zeros(B, T, dtype=torch.long)
    prm = torch.zeros(B, T, dtype=torch.bool)
    pos = torch.zeros(B, T, dtype=torch.long)
    for b, (p, r) in enumerate(pairs):
        L = len(p) + len(r)
        ids[b, :L] = torch.tensor(list(p) + list(r))
        seg[b, :L] = 1
        prm[b, : len(p)] = True
        pos[b, :L] = torch.arange(L)
    return dict(input_ids=ids, segment_ids=seg, position_ids=pos, is_prompt=prm)


def pack_samples(
    samples: Sequence[tuple[Sequence[int], Sequence[int]]],
    seq_len: int,
    *,
    pad_id: int = 0,
    loss: Literal["answer", "full"] = "answer",
) -> PackedBatch:
    """Greedy in-order packing of (prompt_ids, response_ids) pairs into rows of seq_len tokens.

    A small reference packer for tests and demos (the data pipeline has its own); each sample
    must fit in one row.
    """
    rows: list[list[int]] = [[]]
    bounds: list[list[tuple[int, int, int]]] = [[]]
    for prompt, response in samples:
        n = len(prompt) + len(response)
        if n > seq_len:
            raise ValueError(f"sample of {n} tokens does not fit seq_len={seq_len}")
        if len(rows[-1]) + n > seq_len:
            rows.append([])
            bounds.append([])
        bounds[-1].append((len(rows[-1]), len(prompt), n))
        rows[-1].extend(list(prompt) + list(response))
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
    segment_ids, position_ids, is_prompt = metadata_from_boundaries(bounds, seq_len)
    labels = build_labels(input_ids, segment_ids, is_prompt, loss)
    return PackedBatch(input_ids, segment_ids, position_ids, is_prompt, labels)


def random_packed_batch(vocab_size: int, rows: int, seq_len: int, *, seed: int = 0, low_id: int = 0) -> PackedBatch:
    """`rows` packed sequences of random samples (prompt and response lengths uniform in
    [seq_len/32, seq_len/4), token ids in [low_id, vocab_size)): synthetic input for benchmarks."""
    g = torch.Generator().manual_seed(seed)
    samples: list[tuple[list[int], list[int]]] = []
    lo, hi = max(2, seq_len // 32), max(4, seq_len // 4)
    while True:
        p, r = torch.randint(lo, hi, (2,), generator=g).tolist()
        samples.append((torch.randint(low_id, vocab_size, (p,), generator=g).tolist(),
                        torch.randint(low_id, vocab_size, (r,), generator=g).tolist()))
        b = pack_samples(samples, seq_len)
        if b.input_ids.shape[0] > rows:
            t = (b.input_ids, b.segment_ids, b.position_ids, b.is_prompt, b.labels)
            return PackedBatch(*(x[:rows] for x in t))


def default_metadata(input_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One sample per row, no prompt: plain causal LM metadata."""
    B, T = input_ids.shape
    seg = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
    pos = torch.arange(T, device=input_ids.device).expand(B, T)
    prm = torch.zeros(B, T, dtype=torch.bool, device=input_ids.device)
    return seg, pos, prm


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------
def allowed_pairs_mask(
    q_seg: Tensor, q_prompt: Tensor, q_idx: Tensor, k_seg: Tensor, k_prompt: Tensor, k_idx: Tensor, prefix: bool
) -> Tensor:
    """(B, Tq, Tk) bool: may query q attend to key k. q_* are (B, Tq), k_* (B, Tk); *_idx are
    slot indices in the row (for a KV cache: positions in the cache)."""
    qs, ks = q_seg[:, :, None], k_seg[:, None, :]  # (B, Tq, 1), (B, 1, Tk)
    qi, ki = q_idx[:, :, None], k_idx[:, None, :]
    ok = ki <= qi  # (B, Tq, Tk)
    if prefix:
        ok = ok | (q_prompt[:, :, None] & k_prompt[:, None, :])
    ok = ok & (qs == ks) & (qs != 0)
    return ok | (qi == ki)


def dense_mask(segment_ids: Tensor, is_prompt: Tensor, prefix: bool) -> Tensor:
    """(B, 1, T, T) bool mask for SDPA (True = may attend) of a packed batch."""
    B, T = segment_ids.shape
    idx = torch.arange(T, device=segment_ids.device).expand(B, T)
    return allowed_pairs_mask(segment_ids, is_prompt, idx, segment_ids, is_prompt, idx, prefix)[:, None]


_compiled_create_block_mask = None


def flex_block_mask(segment_ids: Tensor, is_prompt: Tensor, prefix: bool, block_size: int = 128):
    """FlexAttention BlockMask of the same rule as `dense_mask` (built on segment_ids' device,
    through a compiled create_block_mask so the (T, T) mask is never materialised)."""
    global _compiled_create_block_mask
    from torch.nn.attention.flex_attention import create_block_mask

    if _compiled_create_block_mask is None:
        _compiled_create_block_mask = torch.compile(create_block_mask)
    B, T = segment_ids.shape
    seg, prm = segment_ids, is_prompt

    def mask_mod(b, h, q, k):
        qs = seg[b, q]
        ok = k <= q
        if prefix:
            ok = ok | (prm[b, q] & prm[b, k])
        return (ok & (qs == seg[b, k]) & (qs != 0)) | (q == k)

    return _compiled_create_block_mask(mask_mod, B, None, T, T, segment_ids.device, block_size)


def count_allowed_pairs(segment_ids: Tensor, is_prompt: Tensor, prefix: bool) -> int:
    """Number of allowed (query, key) pairs of the batch's mask (what attention really has to do),
    computed per sample without materialising the (T, T) mask."""
    total = 0
    seg_cpu, prm_cpu = segment_ids.cpu(), is_prompt.cpu()
    for b in range(seg_cpu.shape[0]):
        ids, counts = torch.unique_consecutive(seg_cpu[b], return_counts=True)
        start = 0
        for sid, n in zip(ids.tolist(), counts.tolist()):
            if sid == 0:
                total += n  # padding attends to itself
            else:
                total += n * (n + 1) // 2  # causal part (k <= q)
                if prefix:
                    p = prm_cpu[b, start : start + n].long()
                    later_prompt = p.sum() - torch.cumsum(p, 0)  # prompt keys after each position
                    total += int((p * later_prompt).sum())
            start += n
    return total


@dataclass
class AttnMask:
    """The attention pattern of one forward pass, built once and shared by every layer of every
    module call. Exactly one representation is used:
      causal=True  plain causal, one sample per row, no cache: SDPA's is_causal fast path
      dense        (B, 1, Tq, Tk) bool, True = may attend: SDPA with an explicit mask (CPU, decode)
      block_mask   FlexAttention BlockMask (CUDA fast path for PrefixLM + packing)
    """

    causal: bool = False
    dense: Tensor | None = None
    block_mask: object | None = None

    def __post_init__(self) -> None:
        n = int(self.causal) + int(self.dense is not None) + int(self.block_mask is not None)
        assert n == 1, "AttnMask needs exactly one of causal / dense / block_mask"
