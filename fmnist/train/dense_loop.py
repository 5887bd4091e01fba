"""The dense network's epoch without autograd (whose dispatch costs more than the arithmetic at
this size): a ReLU MLP trained on the CPU as ``torch.optim`` trains it, by dense_kernel.c, which
each process builds with the machine's C compiler; where that fails, autograd trains it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmnist.data import scale_pixels

KERNEL = "FMNIST_DENSE_KERNEL"  # 0: autograd trains the dense network even where the kernel builds


def c_compiler() -> str | None:
    """The C compiler's path: ``$CC``, else ``cc``, if found."""
    return shutil.which(os.environ.get("CC") or "cc")


@functools.cache
def load_kernel():
    """dense_kernel.c's ``dense_epoch``, built once a process for this CPU (about 0.7 s), or
    None: no C compiler, a failed build, or ``FMNIST_DENSE_KERNEL=0``."""
    compiler = c_compiler()
    if compiler is None or os.environ.get(KERNEL, "1") == "0":
        return None
    source = Path(__file__).with_name("dense_kernel.c")
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        library = Path(tmp, "dense_kernel.so")
        flags = ["-O3", "-march=native", "-fno-math-errno", "-shared", "-fPIC", "-o", library]
        if subprocess.run([compiler, *flags, source, "-lm"], capture_output=True).returncode:
            return None
        function = ctypes.CDLL(str(library)).dense_epoch  # loaded: the file may go
    array = functools.partial(np.ctypeslib.ndpointer, flags="C_CONTIGUOUS")
    floats, longs, doubles = array(np.float32), array(np.int64), array(np.float64)
    number, integer = ctypes.c_double, ctypes.c_int
    function.argtypes = [integer, array(np.intc), *[floats] * 4, longs, longs, integer, integer]
    function.argtypes += [doubles, *[number] * 5, integer, integer, doubles]
    function.restype = integer
    return function


def plain(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], scheduler: Any) -> bool:
    """Whether the kernel runs this: one group of float32 CPU ``params``, Adam/AdamW without
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


def kernel_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None):
    """``engine.fit``'s epoch runner for an MLP without dropout, or None (autograd trains it)."""
    params = list(model.parameters())
    shapes = [tuple(p.shape) for p in params]
    pairs = zip(shapes[::2], shapes[1::2], strict=True)  # read only for an even count
    chain = len(shapes) % 2 == 0 and all(len(w) == 2 and b == (w[0],) for w, b in pairs)
    chain = chain and all(a[0] == b[1] for a, b in zip(shapes[::2], shapes[2::2], strict=False))
    if not chain or getattr(model, "dropout", 0) or not plain(optimizer, params, scheduler):
        return None
    kernel = load_kernel()
    return None if kernel is None else KernelEpoch(kernel, optimizer, scheduler, params)


class KernelEpoch:
    """Epochs of one MLP by the kernel, on flat copies of its weights and its optimizer's state."""

    def __init__(self, kernel, optimizer, scheduler, params: list[torch.Tensor]) -> None:
        self.kernel, self.optimizer, self.scheduler = kernel, optimizer, scheduler
        self.params = params
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
        """Train on ``inputs[order]`` in batches, in one call (a Ctrl-C lands after it); the
        summed loss and the count of rows whose logits' first maximum is their label."""
        states, weights = self.state(), self.flat(self.params)
        moments = [self.flat([s[key] for s in states]) for key in self.keys]
        step, rates = float(states[0]["step"]), self.rates(-(-len(order) // batch_size))
        features = np.ascontiguousarray(scale_pixels(inputs.numpy()), np.float32)
        dims = np.array([features.shape[1], *(p.shape[0] for p in self.params[::2])], np.intc)
        arrays = [dims, weights, moments[0], moments[-1], features]  # RMSprop: one moment
        arrays += [t.numpy().astype(np.int64, copy=False) for t in (order, labels)]
        options = (*self.betas, self.eps, self.decay, self.decoupled, self.rmsprop)
        counts, result = (len(order), batch_size), np.zeros(2)
        if self.kernel(len(dims) - 1, *arrays, *counts, rates, step, *options, result):
            raise MemoryError("dense_kernel.c ran out of memory")
        self.write_back(weights, moments, states, step + len(rates))
        with warnings.catch_warnings():  # torch counts only ``optimizer.step()`` calls
            warnings.filterwarnings("ignore", "Detected call of")
            for _ in range(len(rates) if self.scheduler is not None else 0):
                self.scheduler.step()
        return float(result[0]), int(result[1])

    def rates(self, steps: int) -> np.ndarray:
        """Each step's learning rate, as ``LambdaLR`` sets them (``base * factor(step)``)."""
        if self.scheduler is None:
            return np.full(steps, self.optimizer.param_groups[0]["lr"], np.float64)
        factor, base = self.scheduler.lr_lambdas[0], self.scheduler.base_lrs[0]
        return np.array([base * factor(self.scheduler.last_epoch + n) for n in range(steps)])

    def write_back(self, weights, moments, states, step: float) -> None:
        with torch.no_grad():
            for param, view in zip(self.params, self.views(weights), strict=True):
                param.copy_(torch.from_numpy(view))
            for key, flat in zip(self.keys, moments, strict=True):
                for state, view in zip(states, self.views(flat), strict=True):
                    state[key].copy_(torch.from_numpy(view))
            for state in states:
                state["step"].fill_(step)
