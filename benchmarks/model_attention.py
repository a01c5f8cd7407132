"""PrefixLM + packed-document attention vs plain causal attention of the same shape.

    .venv/bin/python benchmarks/model_attention.py            # CPU: SDPA + explicit mask vs is_causal
    python3 benchmarks/model_attention.py --device cuda       # GPU: FlexAttention block mask vs causal SDPA (flash)

The packed batch holds instruction-response samples of random prompt / response lengths, packed
greedily into rows of --seq-len tokens; the mask (or block mask) is built once, outside the timed
region, as the model does (one mask per forward, shared by all module calls and layers); its build
time is printed separately. Reported: median forward and forward+backward times and the ratio
PrefixLM-packed / causal (expected on GPU: flex within 1.2x of causal flash).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model import count_allowed_pairs, dense_mask, flex_block_mask, metadata_from_boundaries, pack_samples
from model.layers import attend
from model.masks import AttnMask


def packed_metadata(rows: int, seq_len: int, scale: float = 1.0, seed: int = 0):
    """Rows of packed samples; prompt and response lengths uniform in [T/64, T/4) * scale."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    lo = max(2, int(seq_len // 64 * scale))
    hi = max(lo + 2, min(int(seq_len // 4 * scale), seq_len // 2))
    while True:
        p, r = torch.randint(lo, hi, (2,), generator=g).tolist()
        samples.append(([1] * p, [2] * r))
        b = pack_samples(samples, seq_len)
        if b.input_ids.shape[0] > rows:
            return b.segment_ids[:rows], b.is_prompt[:rows]


def bench(fn, device: str, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--sample-scale", type=float, default=1.0,
                    help="scale of the sample lengths (larger: fewer, longer samples per row: denser mask)")
    ap.add_argument("--one-sample", type=float, default=None, metavar="PROMPT_FRAC",
                    help="no packing: each row is one T-token sample whose first PROMPT_FRAC*T tokens are prompt")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    dev = "cuda" if cuda else "cpu"
    # defaults: the paper's XL attention shape on GPU, the cpu-small shape on CPU
    B = args.batch or (8 if cuda else 4)
    T = args.seq_len or (4096 if cuda else 1024)
    H = args.heads or (12 if cuda else 4)
    D = args.head_dim or (128 if cuda else 64)
    iters = args.iters or (20 if cuda else 5)
    dtype = torch.bfloat16 if cuda else torch.float32

    if args.one_sample is not None:
        seg, _, prm = metadata_from_boundaries([[(0, int(args.one_sample * T), T)]] * B, T)
    else:
        seg, prm = packed_metadata(B, T, args.sample_scale)
    seg, prm = seg.to(dev), prm.to(dev)
    pairs = count_allowed_pairs(seg, prm, prefix=True)
    q, k, v = (torch.randn(B, H, T, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))

    t = time.perf_counter()
    if cuda:
        flex_block_mask(seg, prm, True)  # compile once
        torch.cuda.synchronize()
        t = time.perf_counter()
        mask = AttnMask(block_mask=flex_block_mask(seg, prm, True))
        torch.cuda.synchronize()
        name = "PrefixLM+packing, FlexAttention block mask"
    else:
        mask = AttnMask(dense=dense_mask(seg, prm, True))
        name = "PrefixLM+packing, SDPA + explicit bool mask"
    build = time.perf_counter() - t
    causal = AttnMask(causal=True)

    def fwd(m):
        return lambda: attend(q, k, v, m)

    def fwd_bwd(m):
        def run():
            attend(q, k, v, m).sum().backward()
        return run

    warm = 3 if cuda else 1
    rows = []
    for label, m in (("causal SDPA (is_causal" + (", flash)" if cuda else ")"), causal), (name, mask)):
        with torch.no_grad():
            f = bench(fwd(m), dev, warm, iters)
        fb = bench(fwd_bwd(m), dev, warm, iters)
        rows.append((label, f, fb))
    if cuda:  # also the dense-mask SDPA fallback, for reference
        dm = AttnMask(dense=dense_mask(seg, prm, True))
        with torch.no_grad():
            f = bench(fwd(dm), dev, warm, iters)
        fb = bench(fwd_bwd(dm), dev, warm, iters)
        rows.append(("PrefixLM+packing, SDPA + explicit bool mask", f, fb))

    print(f"device={dev} {torch.cuda.get_device_name() if cuda else f'threads={torch.get_num_threads()}'} "
          f"dtype={dtype} B={B} T={T} H={H} D={D}, median of {iters}")
    print(f"PrefixLM mask density {pairs / (B * T * T):.3f} (causal: {(T + 1) / (2 * T):.3f}); "
          f"mask build {build * 1e3:.2f} ms (once per forward, shared by every call and layer)")
    base_f, base_fb = rows[0][1], rows[0][2]
    for label, f, fb in rows:
        print(f"{label:48s} fwd {f * 1e3:9.3f} ms ({f / base_f:5.2f}x)   fwd+bwd {fb * 1e3:9.3f} ms ({fb / base_fb:5.2f}x)")


if __name__ == "__main__":
    main()
