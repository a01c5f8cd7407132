"""Optimizers and the learning-rate schedule of the paper's training setup (pure PyTorch).

Adam-atan2 (Everett et al. 2024, "Scaling Exponents Across Parameterizations and Optimizers"), as
HRM-Text's reference implements it: Adam without epsilon. With g the gradient, t the step (1-based),
bc1 = 1 - beta1^t, bc2 = 1 - beta2^t:

    p <- p * (1 - lr * weight_decay)                  (decoupled weight decay, before the moments)
    m = beta1 * m + (1 - beta1) * g                   v = beta2 * v + (1 - beta2) * g^2
    p <- p - (lr / bc1) * atan2(m, sqrt(v) / sqrt(bc2))

The second-moment correction is inside atan2 and the first-moment one outside it (a step of
lr/bc1 times a bounded direction), exactly as the reference: this is not atan2(m_hat, sqrt(v_hat)).
There is no a/b scaling (a = b = 1). atan2(x, y) ~ x / y when |x| << y, so the direction is Adam's
without an epsilon: bounded (|atan2| <= pi/2), scale invariant, and a zero gradient on fresh state
gives a zero direction (atan2(0, 0) = 0).

Parameters without a gradient are skipped (no decay, no moment update, the step count stays), as in
the reference. `skip_zero_grad=True` also skips a tensor whose gradient is exactly all zero: DeepSpeed
ZeRO hands the optimizer flat fp32 partitions whose gradient is zeros (never None) where no gradient
reached, so this is how the rule survives there (see param_groups: the embedding has its own group).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor


class AdamAtan2(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        skip_zero_grad: bool = False,
    ) -> None:
        if lr < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"bad AdamAtan2 settings lr={lr} betas={betas} weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))
        self.skip_zero_grad = skip_zero_grad

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g: Tensor = p.grad.float()
                if self.skip_zero_grad and not bool(g.any()):
                    continue  # no gradient reached this tensor (ZeRO's flat buffers hold zeros, not None)
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                st["step"] += 1
                t = float(st["step"])
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                step_size = lr / (1 - b1**t)
                denom = v.sqrt().div_(math.sqrt(1 - b2**t))
                upd = torch.atan2(m, denom)
                if p.dtype == torch.float32:
                    p.mul_(1 - lr * wd).add_(upd, alpha=-step_size)
                else:  # bf16 params: do the arithmetic in fp32, round once
                    p.copy_(p.float().mul_(1 - lr * wd).add_(upd, alpha=-step_size))
        return loss


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (projections, embedding, LM head); none on vectors (none exist in
    this network: norms have no scale, layers no bias, but a user model might).

    The embedding table ("embed.*") gets a group of its own: under DeepSpeed ZeRO 1/2 each group is
    one flat buffer, so at bp = 2 (no gradient reaches the embedding) that group's gradient
    partition is exactly all zeros and AdamAtan2(skip_zero_grad=True) leaves it alone, as the
    reference leaves a parameter whose .grad is None."""
    decay, embed, no_decay = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("embed."):
            embed.append(p)
        else:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if embed:
        groups.append({"params": embed, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    model: torch.nn.Module, name: str, lr: float, betas, weight_decay: float, skip_zero_grad: bool = False
) -> torch.optim.Optimizer:
    """skip_zero_grad (Adam-atan2 only): skip tensors whose gradient is exactly all zero; the DeepSpeed
    engine sets it, since ZeRO's flat fp32 partitions never have a None gradient."""
    groups = param_groups(model, weight_decay)
    if name == "adam_atan2":
        return AdamAtan2(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, skip_zero_grad=skip_zero_grad)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=False)
    raise ValueError(f"optimizer must be 'adam_atan2' or 'adamw', got {name!r}")


def lr_lambda(warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float = 0.0):
    """Multiplier of the peak LR at step s (0-based): linear warmup over warmup_steps (from
    1/warmup), then constant (the paper) or cosine down to min_lr_ratio at total_steps."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr schedule must be 'constant' or 'cosine', got {schedule!r}")

    def f(s: int) -> float:
        if warmup_steps > 0 and s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(total_steps - warmup_steps, 1)
        frac = min(max(s - warmup_steps, 0) / span, 1.0)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac))

    return f


class EMA:
    """Exponential moving average of the weights (fp32 copies), kept for evaluation."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.lerp_(v.float(), 1 - self.decay)
            else:
                s.copy_(v)

    def state_dict(self) -> dict[str, Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state keys differ from the model's: {sorted(missing)[:5]}")
        for k, v in state.items():
            self.shadow[k].copy_(v)
