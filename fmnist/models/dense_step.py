"""The dense network's numpy training loop: a whole epoch without autograd or ``Optimizer.step``.

For a network as small as the study's MLP, a torch operator's dispatch costs more than its
arithmetic and autograd's bookkeeping twice that, while a numpy call costs about a microsecond:
the dense grid is a million such steps. ``ExplicitStep`` is the engine's epoch runner for a plain
MLP and optimizer: a network with a hidden layer trains in ``dense_stacked``'s kernel as a group
of one (what it computes alone it computes in a lockstep group); one without trains here
(``backpropagate``) on a flat working copy of the weights and the optimizer's state, with the
optimizer's own arithmetic (the fused Adam kernel; RMSprop's formula in numpy). Both write the
copy back after the epoch, so ``state_dict``, checkpoints and resuming are unchanged
(``tests/test_dense.py`` compares it with autograd and with ``torch.optim`` step by step). The
engine reaches it through ``MLP.epoch_runner``: it never imports a model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.optim.optimizer import _get_scalar_dtype

from fmnist.data import scale_pixels
from fmnist.models.dense_stacked import (
    cross_entropy_sum,
    one_blas_thread,
    run_stacked_epoch,
    scaled_one_hot,
    stackable,
)
from fmnist.models.dense_update import (
    advance_schedule,
    flat_updater,
    schedulable,
    scheduled_lrs,
)


def backpropagate(
    weights: Sequence[np.ndarray], features: np.ndarray, one_hot: np.ndarray, grads: Sequence
) -> np.ndarray:
    """One MLP's forward pass and mean cross-entropy gradients, written out in numpy.

    ``weights`` and ``grads`` are ``[w0, b0, w1, b1, ...]`` (``MLP.parameters()`` order);
    ``one_hot`` holds the targets one-hot divided by the batch size (``scaled_one_hot``). The
    gradients are written into ``grads`` in place; returns the logits less their row maximum
    (the same softmax, loss and argmax).
    """
    activations = [features]
    n_layers = len(weights) // 2
    for index in range(n_layers - 1):
        hidden = activations[-1] @ weights[2 * index].T
        hidden += weights[2 * index + 1]
        activations.append(np.maximum(hidden, 0.0, out=hidden))
    logits = activations[-1] @ weights[-2].T
    logits += weights[-1]
    logits -= logits.max(axis=1, keepdims=True)  # exp cannot overflow
    delta = np.exp(logits)
    sums = delta.sum(axis=1, keepdims=True)
    sums *= np.float32(len(features))
    delta /= sums
    delta -= one_hot  # d mean loss / d logits = (softmax - one_hot) / n
    for index in range(n_layers - 1, -1, -1):
        inputs = activations[index]
        np.matmul(delta.T, inputs, out=grads[2 * index])
        delta.sum(axis=0, out=grads[2 * index + 1])
        if index:
            delta = delta @ weights[2 * index]
            delta *= inputs > 0
    return logits


class ExplicitStep:
    """The MLP's epoch runner for Adam, AdamW or RMSprop in their plain forms, on the CPU, with
    a per-step ``LambdaLR`` schedule or none.

    At batch 32 a step costs about 80 us against about 200 us for the same step in torch
    operators written out by hand: the dense grid's whole cost.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, scheduler: Any = None) -> None:
        self.optimizer, self.scheduler = optimizer, scheduler
        self.params = list(optimizer.param_groups[0]["params"])
        self.rmsprop = isinstance(optimizer, torch.optim.RMSprop)

    @property
    def group(self) -> dict[str, Any]:
        # read anew: resuming loads the optimizer's state dict, which replaces its param groups
        return self.optimizer.param_groups[0]

    @staticmethod
    def supports(
        params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, scheduler: Any = None
    ) -> bool:
        """True when ``optimizer`` trains exactly ``params`` (in order) in a plain CPU setting,
        on a schedule the loops can run (``dense_update.schedulable``)."""
        if len(optimizer.param_groups) != 1 or not schedulable(scheduler):
            return False
        group = optimizer.param_groups[0]
        if isinstance(group["lr"], torch.Tensor):  # the loops hand the kernel a float rate
            return False
        if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in group["params"]):
            return False
        params, own = list(group["params"]), list(params)
        if len(params) != len(own) or any(p is not q for p, q in zip(params, own, strict=True)):
            return False  # it writes gradients for exactly the model's parameters, in order
        if group.get("maximize") or group.get("differentiable") or group.get("capturable"):
            return False
        if isinstance(optimizer, torch.optim.RMSprop):
            return group["momentum"] == 0 and not group["centered"]
        if isinstance(optimizer, torch.optim.Adam):  # AdamW too
            return bool(group.get("fused")) and not group["amsgrad"]
        return False

    def run_epoch(
        self, inputs: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, batch_size: int
    ) -> tuple[float, int]:
        """Train on ``inputs[order]`` in batches; returns the summed loss and the correct count.

        A network with a hidden layer trains in ``dense_stacked``'s kernel as a group of one
        (so alone it computes what it computes in lockstep). Without one, the weights, gradients
        and optimizer state live in one flat working copy for the epoch (written back at its
        end, also when it is interrupted), so that each step's update is a single kernel over
        all parameters instead of one per parameter.
        """
        if stackable(self):
            return run_stacked_epoch([self], inputs, labels, order, batch_size)[0]
        features, order_ = inputs.numpy(), order.numpy()
        targets = labels.numpy()[order_]
        flat = FlatParameters(self.params, self.state_keys(), self.state)
        lrs = scheduled_lrs(self.scheduler, -(-len(order_) // batch_size))
        cell = None if lrs is None else np.zeros((), np.float64)
        update = self.updater(flat, cell)
        weights, grads = flat.views(flat.params), flat.views(flat.grads)
        # Targets, and the logits for the epoch's loss and accuracy, are handled for the whole
        # epoch at once: per batch they would cost more calls than the step's arithmetic.
        one_hot = scaled_one_hot(targets, weights[-1].shape[0], batch_size)
        logits = np.empty(one_hot.shape, np.float32)
        first_step, steps = float(flat.step), 0
        try:
            with torch.no_grad(), one_blas_thread():
                for start in range(0, len(order_), batch_size):
                    stop = start + batch_size
                    batch = scale_pixels(features[order_[start:stop]])
                    logits[start:stop] = backpropagate(weights, batch, one_hot[start:stop], grads)
                    if cell is not None:
                        cell[...] = lrs[steps]
                    update()
                    steps += 1
        finally:
            flat.write_back()
            # the optimizer's own count says how far it went
            advance_schedule(self.scheduler, int(float(flat.step) - first_step))
        correct = int(np.count_nonzero(logits.argmax(axis=1) == targets))
        return cross_entropy_sum(logits, targets), correct

    def state_keys(self) -> tuple[str, ...]:
        return ("square_avg",) if self.rmsprop else ("exp_avg", "exp_avg_sq")

    def updater(self, flat: FlatParameters, lr: np.ndarray | None) -> Callable[[], None]:
        """The optimizer's update with its settings and the flat state bound: one call a step
        (``lr``: the cell a schedule's rate is read from, or None)."""
        states = [flat.states[key] for key in self.state_keys()]
        if self.rmsprop:
            states.append(torch.zeros_like(flat.params))  # the kernel's unused first moment
        step = flat.step.numpy()
        return flat_updater(self.optimizer, flat.params, flat.grads, states, step, lr)

    def state(self, key: str) -> list[torch.Tensor]:
        """Per-parameter state ``key``, created as the optimizer would on its first step."""
        fused = not self.rmsprop  # Adam runs its fused kernel, RMSprop the foreach formula
        states = []
        for param in self.params:
            state = self.optimizer.state[param]
            if not state:
                state["step"] = torch.zeros(
                    (), dtype=_get_scalar_dtype(is_fused=fused), device=param.device
                )
                for name in self.state_keys():
                    state[name] = torch.zeros_like(param, memory_format=torch.preserve_format)
            states.append(state[key])
        return states


class FlatParameters:
    """One flat copy of a list of parameters, of their optimizer state and a gradient buffer.

    ``write_back`` copies the weights and the state into the original tensors, which therefore
    stay ordinary separate tensors (for ``state_dict``, export and checkpoints).
    """

    def __init__(self, params: list[torch.Tensor], keys, state_of) -> None:
        self.originals = params
        self.params = torch.cat([p.detach().reshape(-1) for p in params])
        self.grads = torch.zeros_like(self.params)
        self.state_lists = {key: state_of(key) for key in keys}
        self.states = {
            key: torch.cat([t.reshape(-1) for t in ts]) for key, ts in self.state_lists.items()
        }
        self.step_list = state_of("step")
        # every parameter was stepped as often as the others: one counter stands for all
        self.step = self.step_list[0].clone()

    def views(self, flat: torch.Tensor) -> list[np.ndarray]:
        """numpy views of ``flat`` shaped like each parameter."""
        array, views, offset = flat.numpy(), [], 0
        for param in self.originals:
            views.append(array[offset : offset + param.numel()].reshape(param.shape))
            offset += param.numel()
        return views

    def write_back(self) -> None:
        with torch.no_grad():
            for flat, originals in [
                (self.params, self.originals),
                *[(self.states[key], ts) for key, ts in self.state_lists.items()],
            ]:
                torch._foreach_copy_(
                    originals,
                    [v.view_as(o) for v, o in zip(self.split(flat), originals, strict=True)],
                )
            torch._foreach_copy_(self.step_list, [self.step] * len(self.step_list))

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return list(flat.split([p.numel() for p in self.originals]))
