"""The optimizers' arithmetic on flat buffers, shared by the dense network's numpy loops.

``adam_update`` is ``torch.optim.Adam(fused=True).step()``'s kernel on whole buffers;
``rmsprop_updater`` runs RMSprop (no momentum, not centered) through the same kernel;
``flat_updater`` binds either to its buffers; ``update_signature`` says which points can share
one call; ``scheduled_lrs`` and ``advance_schedule`` run a per-step ``LambdaLR`` schedule (the
kernel reads each step's rate from a cell the loop writes). No autograd, no ``Optimizer.step``:
the dense grid makes a million steps, and each call's overhead counts.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch


def update_signature(point: Any, lrs: np.ndarray | None = None) -> tuple:
    """What points must share to be updated by one call: the optimizer's formula and settings,
    the learning rate of every step (``lrs``, scheduled) or the fixed one, and the step count
    (one counter stands for the whole call)."""
    group = point.group
    counters = [point.optimizer.state[p].get("step") for p in point.params]
    count = int(counters[0]) if counters[0] is not None else 0
    lr = group["lr"] if lrs is None else lrs.tobytes()
    if point.rmsprop:
        return ("rmsprop", lr, group["alpha"], group["eps"], group["weight_decay"], count)
    decoupled = is_decoupled(point.optimizer)
    betas = tuple(group["betas"])
    return ("adam", decoupled, lr, betas, group["eps"], group["weight_decay"], count)


def schedulable(scheduler: Any) -> bool:
    """Whether the numpy loops can run ``scheduler``: none, or a one-group ``LambdaLR`` (a
    per-step factor of the base rate; ``OneCycleLR`` also moves the momentum, which they don't)."""
    if scheduler is None:
        return True
    lambda_lr = isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    return lambda_lr and len(scheduler.lr_lambdas) == 1


def scheduled_lrs(scheduler: Any, steps: int) -> np.ndarray | None:
    """The learning rate of each of the next ``steps`` steps, as ``LambdaLR`` would set them
    (``base * factor(step)``, the same float arithmetic); None without a scheduler."""
    if scheduler is None:
        return None
    factor, base, first = scheduler.lr_lambdas[0], scheduler.base_lrs[0], scheduler.last_epoch
    return np.array([base * factor(first + n) for n in range(steps)], np.float64)


def advance_schedule(scheduler: Any, steps: int) -> None:
    """Leave ``scheduler`` and its optimizer's rate where ``steps`` calls of ``step()`` would
    (without calling it a thousand times an epoch), so checkpoints and resuming see no
    difference."""
    if scheduler is None or not steps:
        return
    scheduler.last_epoch += steps
    scheduler._step_count += steps
    lr = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch)
    scheduler.optimizer.param_groups[0]["lr"] = lr
    scheduler._last_lr = [lr]


def is_decoupled(optimizer: torch.optim.Optimizer) -> bool:
    """Whether an Adam-family optimizer decays its weights as AdamW does."""
    group = optimizer.param_groups[0]
    return bool(group.get("decoupled_weight_decay") or isinstance(optimizer, torch.optim.AdamW))


def flat_updater(optimizer, params, grads, states, counter, lr=None) -> Callable[[], None]:
    """One step of ``optimizer``'s rule over flat buffers (tensors), one kernel call: Adam or
    AdamW through its fused kernel, RMSprop through the same kernel (``rmsprop_updater``).
    ``states`` are Adam's two moments, or RMSprop's square average and a scratch buffer;
    ``counter`` is a numpy scalar that counts the steps (the kernel reads it as a tensor);
    ``lr``, when given, a float64 numpy cell the kernel reads the rate from at each step (a
    schedule; the same numbers as the rate passed as a float)."""
    group = optimizer.param_groups[0]
    lr = group["lr"] if lr is None else torch.from_numpy(lr)
    if isinstance(optimizer, torch.optim.RMSprop):
        return rmsprop_updater(params, grads, states[0], states[1], counter, group, lr)
    return partial(
        adam_update,
        torch._fused_adamw_ if is_decoupled(optimizer) else torch._fused_adam_,
        [params],
        [grads],
        [states[0]],
        [states[1]],
        counter,
        [torch.from_numpy(counter)],
        lr=lr,
        beta1=group["betas"][0],
        beta2=group["betas"][1],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
    )


def adam_update(kernel, params, grads, exp_avgs, exp_avg_sqs, counter, steps, **settings):
    """``torch.optim.Adam(fused=True).step()``'s arithmetic (AdamW's with the AdamW kernel);
    ``steps`` is the tensor that shares ``counter``'s memory."""
    counter += 1
    kernel(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        [],
        steps,
        amsgrad=False,
        maximize=False,
        grad_scale=None,
        found_inf=None,
        **settings,
    )


# A step count so large that 1 - beta2**step is exactly 1 (see ``rmsprop_updater``).
NO_BIAS_CORRECTION = torch.tensor(float(2**24))


def rmsprop_updater(params, grads, square_avg, scratch, counter, group, lr) -> Callable[[], None]:
    """``torch.optim.RMSprop.step()`` without momentum or centering, as one fused Adam call.

    RMSprop is Adam without a first moment and without bias correction: the fused Adam kernel
    with beta1 = 0, beta2 = alpha and a step count for which ``1 - beta2**step`` is 1 computes
    ``v = alpha v + (1 - alpha) g^2; p -= lr g / (sqrt(v) + eps)`` (L2 weight decay added to g
    first, as RMSprop does). One call instead of ten numpy passes over the buffer (measured: a
    batch-32 step of two points 37 us -> 9 us). ``scratch`` holds the unused first moment;
    ``counter`` (numpy) counts the real steps.
    """
    return partial(
        adam_update,
        torch._fused_adam_,
        [params],
        [grads],
        [scratch],
        [square_avg],
        counter,
        [NO_BIAS_CORRECTION],
        lr=lr,
        beta1=0.0,
        beta2=group["alpha"],
        weight_decay=group["weight_decay"],
        eps=group["eps"],
    )
