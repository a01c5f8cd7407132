"""Forward+backward throughput of HRM vs the Transformer baseline at equal parameters.

    .venv/bin/python benchmarks/model_throughput.py [--preset cpu-small] [--batch 4] [--seq-len 512] [--bp 5]
    python3 benchmarks/model_throughput.py --device cuda --preset B --batch 8 --seq-len 4096

Same config, same packed PrefixLM batch, same answer-only loss; one fwd+bwd step timed (median).
Printed beside each other: tokens/s, the FLOP counter's FLOPs per token, and achieved FLOP/s. If the
tokens/s gap is explained by FLOPs (not overhead), the two achieved FLOP/s figures are close.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model import ModelConfig, build_model, count_flops, random_packed_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bp", type=int, default=5)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")

    results = []
    for arch in ("transformer", "hrm"):
        torch.manual_seed(0)
        cfg = ModelConfig.preset(args.preset, arch=arch)
        model = build_model(cfg).to(args.device)
        batch = random_packed_batch(cfg.vocab_size, args.batch, args.seq_len).to(args.device)
        flops = count_flops(cfg, segment_ids=batch.segment_ids, is_prompt=batch.is_prompt, bp=args.bp)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and cuda):
                out = model(**batch.as_kwargs(), bp=args.bp)
            out.loss.backward()
            model.zero_grad(set_to_none=True)

        for _ in range(args.warmup):
            step()
        times = []
        for _ in range(args.iters):
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        sec = statistics.median(times)
        results.append((arch, model.num_parameters(), flops, sec))

    B, T = args.batch, args.seq_len
    print(f"preset={args.preset} device={args.device} threads={torch.get_num_threads()} B={B} T={T} "
          f"bp={args.bp} (HRM) bf16={args.bf16}, fwd+bwd median of {args.iters}")
    for arch, n, f, sec in results:
        print(f"{arch:12s} params {n / 1e6:7.2f}M  {B * T / sec:10.1f} tok/s  step {sec * 1e3:9.1f} ms  "
              f"FLOP/token {f.per_token / 1e6:9.2f}M (fwd {f.forward_per_token / 1e6:.2f}M)  "
              f"achieved {f.total / sec / 1e9:8.2f} GFLOP/s")
    (_, _, ft, st), (_, _, fh, sh) = results
    print(f"HRM/Transformer: time per step {sh / st:.2f}x, FLOP per token {fh.per_token / ft.per_token:.2f}x, "
          f"achieved FLOP/s {(fh.total / sh) / (ft.total / st):.2f}x")


if __name__ == "__main__":
    main()
