"""The dense network's numpy epoch: a ReLU MLP trained on the CPU without autograd (whose dispatch
costs more than the arithmetic at this size), bit for bit what ``torch.optim`` gives.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from fmnist.data import scale_pixels


def one_blas_thread():
    """numpy's BLAS on one thread (parallel workers' idle BLAS threads spin on each other's
    cores); a no-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(1, user_api="blas")


def scaled_one_hot(targets: np.ndarray, n_classes: int, batch_size: int | None = None):
    """One-hot rows of ``targets``, each divided by the size of its batch (None: one batch)."""
    n, one_hot = len(targets), np.eye(n_classes, dtype=np.float32)[targets]
    size = batch_size or max(n, 1)
    sizes = np.full(n, size, np.float32)
    if n % size:
        sizes[n - n % size :] = n % size
    return one_hot / sizes[:, None]


def cross_entropy_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """The summed cross-entropy of logits (any row shift) against integer targets."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_sums = np.log(np.exp(shifted).sum(axis=1, dtype=np.float64))
    return float(log_sums.sum() - shifted[np.arange(len(targets)), targets].sum(dtype=np.float64))


def backpropagate(
    weights: Sequence[np.ndarray], features: np.ndarray, one_hot: np.ndarray, grads: Sequence
) -> np.ndarray:
    """Forward pass and mean cross-entropy gradients into ``grads``; returns the shifted logits."""
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


def plain(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], scheduler: Any) -> bool:
    """Whether the numpy epoch runs this: one group of float32 CPU ``params``, Adam/AdamW without
    amsgrad or plain RMSprop, and no schedule or a ``LambdaLR`` (OneCycleLR moves momentum)."""
    group = optimizer.param_groups[0]
    if len(optimizer.param_groups) != 1 or list(map(id, group["params"])) != list(map(id, params)):
        return False  # not exactly ``params`` in one group
    cpu_float32 = all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    if not cpu_float32 or isinstance(group["lr"], torch.Tensor) or group.get("maximize"):
        return False
    lambda_lr = isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    if scheduler is not None and not (lambda_lr and len(scheduler.lr_lambdas) == 1):
        return False
    if isinstance(optimizer, torch.optim.RMSprop):
        return group["momentum"] == 0 and not group["centered"]
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and not group["amsgrad"]


def numpy_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None):
    """``engine.fit``'s epoch runner for an MLP without dropout, or None (autograd trains it)."""
    params = list(model.parameters())
    shapes = [tuple(p.shape) for p in params]
    pairs = zip(shapes[::2], shapes[1::2], strict=True)  # read only for an even count
    chain = len(shapes) % 2 == 0 and all(len(w) == 2 and b == (w[0],) for w, b in pairs)
    chain = chain and all(a[0] == b[1] for a, b in zip(shapes[::2], shapes[2::2], strict=False))
    if not chain or getattr(model, "dropout", 0) or not plain(optimizer, params, scheduler):
        return None
    return NumpyEpoch(optimizer, scheduler, params)


class NumpyEpoch:
    """Epochs of one MLP on flat numpy copies of its weights and its optimizer's state."""

    def __init__(self, optimizer, scheduler, params: list[torch.Tensor]) -> None:
        self.optimizer, self.scheduler, self.params = optimizer, scheduler, params
        self.rmsprop, group = isinstance(optimizer, torch.optim.RMSprop), optimizer.param_groups[0]
        self.keys = ("square_avg",) if self.rmsprop else ("exp_avg", "exp_avg_sq")
        self.sizes = [p.numel() for p in params]
        self.decay, self.eps = group["weight_decay"], group["eps"]
        adamw = isinstance(optimizer, torch.optim.AdamW)
        self.decoupled = adamw or bool(group.get("decoupled_weight_decay"))
        self.betas = (0.0, group["alpha"]) if self.rmsprop else tuple(group["betas"])

    def state(self) -> list[dict[str, torch.Tensor]]:
        """Each parameter's optimizer state, created as the optimizer would."""
        for param in self.params:
            state = self.optimizer.state[param]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                for key in self.keys:
                    state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return [self.optimizer.state[param] for param in self.params]

    def flat(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        return np.concatenate([t.detach().numpy().reshape(-1) for t in tensors])

    def views(self, flat: np.ndarray) -> list[np.ndarray]:
        parts = np.split(flat, np.cumsum(self.sizes)[:-1])  # views into ``flat``
        return [part.reshape(p.shape) for part, p in zip(parts, self.params, strict=True)]

    def run_epoch(
        self, inputs: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, batch_size: int
    ) -> tuple[float, int]:
        """Train on ``inputs[order]`` in batches; the summed loss and the correct count."""
        states, weights = self.state(), self.flat(self.params)
        moments = [self.flat([s[key] for s in states]) for key in self.keys]
        step = float(states[0]["step"])
        features, order_ = inputs.numpy(), order.numpy()
        targets = labels.numpy()[order_]
        grads, scratch = np.zeros_like(weights), np.empty_like(weights)
        views, grad_views = self.views(weights), self.views(grads)
        one_hot = scaled_one_hot(targets, self.params[-1].shape[0], batch_size)
        logits = np.empty(one_hot.shape, np.float32)
        rates = self.rates(-(-len(order_) // batch_size))
        steps = 0
        try:
            with torch.no_grad(), one_blas_thread():
                for start in range(0, len(order_), batch_size):
                    rows = slice(start, start + batch_size)
                    batch = scale_pixels(features[order_[rows]])
                    logits[rows] = backpropagate(views, batch, one_hot[rows], grad_views)
                    self.update(weights, grads, moments, scratch, step + steps + 1, rates[steps])
                    steps += 1
        finally:
            self.write_back(weights, moments, states, step + steps)
            with warnings.catch_warnings():  # torch counts only ``optimizer.step()`` calls
                warnings.filterwarnings("ignore", "Detected call of")
                for _ in range(steps if self.scheduler is not None else 0):
                    self.scheduler.step()
        correct = int(np.count_nonzero(logits.argmax(axis=1) == targets))
        return cross_entropy_sum(logits, targets), correct

    def rates(self, steps: int) -> list[float]:
        """Each step's learning rate, as ``LambdaLR`` sets them (``base * factor(step)``)."""
        if self.scheduler is None:
            return [self.optimizer.param_groups[0]["lr"]] * steps
        factor, base = self.scheduler.lr_lambdas[0], self.scheduler.base_lrs[0]
        return [base * factor(self.scheduler.last_epoch + n) for n in range(steps)]

    def write_back(self, weights, moments, states, step: float) -> None:
        with torch.no_grad():
            for param, view in zip(self.params, self.views(weights), strict=True):
                param.copy_(torch.from_numpy(view))
            for key, flat in zip(self.keys, moments, strict=True):
                for state, view in zip(states, self.views(flat), strict=True):
                    state[key].copy_(torch.from_numpy(view))
            for state in states:
                state["step"].fill_(step)

    def update(self, weights, grads, moments, scratch, step: float, lr: float) -> None:
        """The optimizer's step on the flat buffers: Adam's, AdamW's or RMSprop's, as torch's."""
        beta1, beta2 = self.betas
        if self.decay and self.decoupled:
            weights *= np.float32(1.0 - lr * self.decay)
        elif self.decay:
            grads += np.float32(self.decay) * weights
        average, square = moments[0], moments[-1]  # RMSprop has no average
        if not self.rmsprop:
            np.subtract(grads, average, out=scratch)  # a lerp towards the gradient, as torch's
            scratch *= np.float32(1.0 - beta1)
            average += scratch
        square *= np.float32(beta2)
        np.multiply(grads, grads, out=scratch)
        scratch *= np.float32(1.0 - beta2)
        square += scratch
        np.sqrt(square, out=scratch)
        if not self.rmsprop:
            scratch *= np.float32(1.0 / (1.0 - beta2**step) ** 0.5)
        scratch += np.float32(self.eps)
        np.divide(grads if self.rmsprop else average, scratch, out=scratch)
        scratch *= np.float32(-lr / (1.0 - beta1**step))  # RMSprop: beta1 0, so -lr exactly
        weights += scratch
