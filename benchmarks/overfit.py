"""Speed of the overfit check (tests/model/test_overfit.py): HRM beside the Transformer baseline.

    .venv/bin/python benchmarks/overfit.py [--preset debug] [--steps 100] [--repeats 3] [--threads 2]
    python3 benchmarks/overfit.py --device cuda --preset cpu-small

The test's task: 8 random instruction-response pairs packed into 3 rows of 33 tokens, answer-only
PrefixLM loss, Adam 3e-3, the bp schedule over the steps. For each architecture, `--repeats` fresh runs
(same seed); each step (forward, backward, optimizer step) is timed. Printed per architecture: the
median step time and steps/s over all steps of all runs (the first --warmup steps of each run left
out), the first step at which the loss fell below 0.01 (median over runs) and the final loss; then
HRM's step time as a multiple of the Transformer's. The test keeps only the loss assertion.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from model import ModelConfig, bp_schedule, build_model, pack_samples


def pairs() -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(10, 500, (5,), generator=g).tolist(), torch.randint(10, 500, (6,), generator=g).tolist())
            for _ in range(8)]


def run(arch: str, preset: str, steps: int, device: str) -> tuple[list[float], int | None, float]:
    """(step times in s, first step with loss < 0.01 or None, final loss) of one overfit run."""
    torch.manual_seed(0)
    batch = pack_samples(pairs(), seq_len=33).to(device)
    model = build_model(ModelConfig.preset(preset, arch=arch)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    cuda = device.startswith("cuda")
    times, reached, loss = [], None, float("nan")
    for step in range(steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = model(**batch.as_kwargs(), bp=bp_schedule(step, steps))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        loss = out.loss.item()
        if reached is None and loss < 0.01:
            reached = step + 1
    return times, reached, loss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="debug")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3, help="steps of each run left out of the timing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    print(f"overfit: preset {a.preset}, {a.steps} steps x {a.repeats} runs, device {a.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'arch':<12} {'median step ms':>15} {'steps/s':>9} {'steps to <0.01':>15} {'final loss':>11}")
    med = {}
    for arch in ("transformer", "hrm"):
        all_times, reached, finals = [], [], []
        for _ in range(a.repeats):
            times, r, loss = run(arch, a.preset, a.steps, a.device)
            all_times += times[a.warmup:]
            reached.append(r if r is not None else float("inf"))
            finals.append(loss)
        med[arch] = statistics.median(all_times)
        print(f"{arch:<12} {med[arch] * 1e3:>15.2f} {1 / med[arch]:>9.1f} {statistics.median(reached):>15} "
              f"{statistics.median(finals):>11.2e}")
    print(f"HRM step time = {med['hrm'] / med['transformer']:.2f} x the Transformer's (baseline, same run)")


if __name__ == "__main__":
    main()
