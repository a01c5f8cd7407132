"""Optimizers and the learning-rate schedule of the paper's training setup (pure PyTorch).

Adam-atan2 (Everett et al. 2024, "Scaling Exponents Across Parameterizations and Optimizers"), as
used by HRM-Text: Adam without epsilon. With g the gradient, t the step (1-based):

    m_t = beta1 * m + (1 - beta1) * g              v_t = beta2 * v + (1 - beta2) * g^2
    m_hat = m_t / (1 - beta1^t)                    v_hat = v_t / (1 - beta2^t)
    p <- p * (1 - lr * weight_decay)                                 (decoupled weight decay)
    p <- p - lr * a * atan2(m_hat, b * sqrt(v_hat))                  (a = 1.27, b = 1)

atan2(x, y) ~ x / y when |x| << y, so this is Adam's m_hat / sqrt(v_hat) without an epsilon: it is
bounded (|atan2| <= pi/2) and scale invariant, and a zero gradient gives a zero update (atan2(0, 0)
= 0) instead of 0/eps. a = 1.27 makes a * atan2 track x/y near the origin (the published default).
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
        a: float = 1.27,
        b: float = 1.0,
    ) -> None:
        if lr < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or weight_decay < 0:
            raise ValueError(f"bad AdamAtan2 settings lr={lr} betas={betas} weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, a=a, b=b))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), wd, a, b = group["lr"], group["betas"], group["weight_decay"], group["a"], group["b"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g: Tensor = p.grad.float()
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
                m_hat = m / (1 - b1**t)
                v_hat = v / (1 - b2**t)
                upd = torch.atan2(m_hat, b * v_hat.sqrt()).mul_(a)
                if p.dtype == torch.float32:
                    p.mul_(1 - lr * wd).add_(upd, alpha=-lr)
                else:  # bf16 params: do the arithmetic in fp32, round once
                    p.copy_(p.float().mul_(1 - lr * wd).add_(upd, alpha=-lr))
        return loss


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (projections, embedding, LM head); none on vectors (none exist in
    this network: norms have no scale, layers no bias, but a user model might)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, name: str, lr: float, betas, weight_decay: float) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "adam_atan2":
        return AdamAtan2(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
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
