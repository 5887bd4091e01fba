"""Optimizers, learning-rate schedules, the weight average and bf16 autocast, built by name from
a ``TrainConfig``'s plain values; nothing here knows a model family.
"""

from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, OneCycleLR

from fmnist.errors import ConfigError
from fmnist.train.settings import OPTIMIZERS, SCHEDULES


def make_optimizer(
    name: str, params, lr: float, weight_decay: float, device: torch.device
) -> Optimizer:
    """An optimizer by name; fused kernels cut the per-step overhead of small models."""
    fused, options = device.type in {"cpu", "cuda"}, {"lr": lr, "weight_decay": weight_decay}
    if name in ("adam", "adamw"):
        adam = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return adam(params, **options, fused=fused or None)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, **options, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(params, **options, momentum=0.9, nesterov=True, fused=fused)
    raise ConfigError(f"Unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)}).")


def make_scheduler(
    name: str | None, optimizer: Optimizer, lr: float, epochs: int, steps_per_epoch: int
):
    """Per-step LR schedule, or None."""
    if not name or name == "none":
        return None
    total = epochs * steps_per_epoch
    if name == "onecycle":
        # torch's OneCycleLR divides by zero when the warm-up is exactly one step (4 in all)
        pct = 0.25 if total != 4 else 0.5
        return OneCycleLR(
            optimizer, lr, total, pct_start=pct, div_factor=10.0, final_div_factor=100.0
        )
    if name == "cosine":  # CosineAnnealingLR's values, as a LambdaLR the dense kernel runs too
        return LambdaLR(
            optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / max(total, 1)))
        )
    if name == "triangle":
        warmup = max(1, round(0.2 * total))  # airbench's; momentum stays fixed
        return LambdaLR(optimizer, lambda step: triangle(step, total, warmup))
    raise ConfigError(f"Unknown schedule {name!r} (known: {', '.join(SCHEDULES)}).")


def triangle(step: int, total: int, warmup: int) -> float:
    """The ``triangle`` factor: a linear rise from 0.2 over ``warmup`` steps, a fall to 0."""
    if step < warmup:
        return 0.2 + 0.8 * step / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


class WeightEMA:
    """Exponential moving average of a model's parameters and buffers, for evaluation."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for average, param in zip(self.model.parameters(), model.parameters(), strict=True):
            average.lerp_(param.detach(), 1.0 - self.decay)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_buf.copy_(buf)


def bf16_active(device: torch.device, bf16: bool) -> bool:
    """Whether ``bf16`` autocast runs there: on CUDA and on CPUs with native (fast) bf16."""
    if not bf16 or device.type != "cpu":
        return bf16 and device.type == "cuda"
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_for(device: torch.device, bf16: bool):
    """bf16 autocast where it is active, else a no-op."""
    if bf16_active(device, bf16):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
