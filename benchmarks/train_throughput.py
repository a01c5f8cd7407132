"""Training-step throughput: the DeepSpeed engine (ZeRO-1 by default) vs the plain PyTorch loop.

    .venv/bin/python benchmarks/train_throughput.py                      # CPU, cpu-small, fp32
    python benchmarks/train_throughput.py --device cuda --preset XL --seq-len 4096 --batch 4 --bf16

Same model init, same packed PrefixLM batch, same optimizer (Adam-atan2), same bp; a whole optimizer
step (forward, backward, optimizer, scheduler) is timed, DeepSpeed and PyTorch rounds interleaved so
machine noise hits both. Printed: median step time, tokens/s, achieved FLOP/s (model.count_flops of
the batch's real mask and bp), MFU when a peak is known (989e12 on H100, or --peak-flops), and the
DeepSpeed / PyTorch step-time ratio (the engine's overhead; expected <= 1.1).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import ModelConfig, build_model, count_flops, random_packed_batch  # noqa: E402
from training.distributed import init_distributed  # noqa: E402
from training.optim import build_optimizer, lr_lambda  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu-small")
    ap.add_argument("--arch", choices=["hrm", "transformer"], default="hrm")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--bp", type=int, default=5)
    ap.add_argument("--zero-stage", type=int, default=1)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per engine")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--set-to-none", action="store_true",
                    help="PyTorch loop frees its gradients after each step (default: zeroes them in place, as DeepSpeed)")
    ap.add_argument("--peak-flops", type=float, help="peak FLOP/s of the device (H100 default 989e12)")
    a = ap.parse_args(argv)

    import deepspeed

    init_distributed(a.device)
    dev = torch.device(a.device)
    cfg = ModelConfig.preset(a.preset, arch=a.arch, max_seq_len=max(a.seq_len, 256))
    if a.device == "cuda":
        cfg = cfg.replace(attn_backend="flex")
    batch = random_packed_batch(cfg.vocab_size, a.batch, a.seq_len, low_id=8).to(dev)
    bp = a.bp if a.arch == "hrm" else None
    flops = count_flops(cfg, segment_ids=batch.segment_ids, is_prompt=batch.is_prompt, bp=bp).total
    n_ans = int((batch.labels != -100).sum())
    peak = a.peak_flops or (989e12 if a.device == "cuda" and "H100" in torch.cuda.get_device_name() else None)

    torch.manual_seed(0)
    base = build_model(cfg)
    dtype = torch.bfloat16 if a.bf16 else torch.float32

    # plain PyTorch
    pt_model = copy.deepcopy(base).to(dev, dtype)
    pt_opt = build_optimizer(pt_model, "adam_atan2", 1e-4, (0.9, 0.95), 0.1)
    pt_sched = torch.optim.lr_scheduler.LambdaLR(pt_opt, lr_lambda(10, 1000, "constant"))

    def pt_step():
        out = pt_model(**batch.as_kwargs(), bp=bp)
        (out.loss_sum / n_ans).backward()
        pt_opt.step()
        pt_sched.step()
        pt_opt.zero_grad(set_to_none=a.set_to_none)

    # DeepSpeed
    ds_model = copy.deepcopy(base).to(dev)
    ds_opt = build_optimizer(ds_model, "adam_atan2", 1e-4, (0.9, 0.95), 0.1, skip_zero_grad=True)  # as training.train
    ds_sched = torch.optim.lr_scheduler.LambdaLR(ds_opt, lr_lambda(10, 1000, "constant"))
    ds_cfg = {"train_batch_size": a.batch, "train_micro_batch_size_per_gpu": a.batch,
              "gradient_accumulation_steps": 1, "zero_optimization": {"stage": a.zero_stage},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    if a.bf16:
        ds_cfg["bf16"] = {"enabled": True}
    engine, _, _, _ = deepspeed.initialize(model=ds_model, optimizer=ds_opt, lr_scheduler=ds_sched, config=ds_cfg)

    def ds_step():
        out = engine(**batch.as_kwargs(), bp=bp)
        engine.backward(out.loss_sum / n_ans)
        engine.step()

    def timed(fn) -> float:
        if a.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if a.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for _ in range(a.warmup):
        pt_step()
        ds_step()
    times = {"pytorch": [], "deepspeed": []}
    for _ in range(a.steps):  # interleaved
        times["pytorch"].append(timed(pt_step))
        times["deepspeed"].append(timed(ds_step))

    tokens = a.batch * a.seq_len
    print(f"{a.preset} {a.arch} on {a.device} ({'bf16' if a.bf16 else 'fp32'}), batch {a.batch} x {a.seq_len}, bp {bp}, "
          f"ZeRO-{a.zero_stage}, {cfg.num_layers} layers, hidden {cfg.hidden_size}; "
          f"{flops / tokens / 1e6:.1f} MFLOP/token; median of {a.steps} steps after {a.warmup} warmup")
    print(f"{'engine':<10} {'step ms':>9} {'min ms':>9} {'tokens/s':>10} {'TFLOP/s':>9} {'MFU':>7}")
    med = {}
    for k, v in times.items():
        m = med[k] = statistics.median(v)
        mfu = f"{flops / m / peak:7.1%}" if peak else "    n/a"
        print(f"{k:<10} {m * 1e3:9.1f} {min(v) * 1e3:9.1f} {tokens / m:10.0f} {flops / m / 1e12:9.4f} {mfu}")
    print(f"deepspeed / pytorch step time: median {med['deepspeed'] / med['pytorch']:.3f}, "
          f"min {min(times['deepspeed']) / min(times['pytorch']):.3f} (torch threads: {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
