"""Cached vs uncached generation: 256 new tokens after a 512-token prompt (greedy, batch 1).

    .venv/bin/python benchmarks/model_generation.py [--preset cpu-small] [--arch hrm] [--repeats 3]

Both paths produce the same tokens (checked); the figure is the median wall time of each and
their ratio. Expected: cached at least 5x faster on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model import ModelConfig, build_model, generate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--arch", default="hrm", choices=["hrm", "transformer"])
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each path (median reported)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset, arch=args.arch)
    model = build_model(cfg).to(args.device).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]

    def run(use_cache: bool) -> tuple[float, list[list[int]]]:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = generate(model, prompts, args.new_tokens, use_cache=use_cache)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t, out

    generate(model, prompts, 4)  # warm-up
    cached = [run(True) for _ in range(args.repeats)]
    uncached = [run(False) for _ in range(args.repeats)]
    same = all(o == cached[0][1] for _, o in cached + uncached)
    tc = statistics.median(t for t, _ in cached)
    tu = statistics.median(t for t, _ in uncached)
    n = args.new_tokens * args.batch
    print(f"model: {args.arch} preset={args.preset} params={model.num_parameters() / 1e6:.2f}M "
          f"device={args.device} threads={torch.get_num_threads()}")
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, batch {args.batch}, "
          f"{args.repeats} runs each (median)")
    print(f"uncached (baseline): {tu:8.3f} s  {n / tu:8.1f} tok/s   runs: {[round(t, 3) for t, _ in uncached]}")
    print(f"cached   (KV cache): {tc:8.3f} s  {n / tc:8.1f} tok/s   runs: {[round(t, 3) for t, _ in cached]}")
    print(f"speed-up cached/uncached: {tu / tc:.1f}x   identical tokens: {same}")


if __name__ == "__main__":
    main()
