"""The dense grid's numpy kernel: one or more MLPs trained on the same batches, an epoch a call.

A dense grid step at batch 32 is a few dozen small numpy calls, and the call overhead, not the
arithmetic, is most of its cost. So the points that train on the same batches are laid out to
share calls: activations are feature-major (features x batch), the points of one architecture
keep their deeper layers as stacks (``(points, out, in)``), so each of those layers is one batched
matmul for all of them, and the ReLUs, the softmax and the masks are one call over every point.
Each point's first layer stays its own GEMM and each of its parameters its own tensor in the
optimizer call: BLAS and the fused Adam kernel then see the same shapes whatever group the point
trains in, so a point ends bit for bit where it ends alone (``tests/test_lockstep.py``), and a
search's results do not depend on how its workers happened to group the points. The weights and
the optimizer state are copied in at the start of the epoch and written back at its end (also
when it is interrupted), so ``state_dict``, checkpoints and resuming see ordinary tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, Protocol

import numpy as np
import torch

from fmnist.data import scale_pixels
from fmnist.models.dense_update import (
    advance_schedule,
    flat_updater,
    scheduled_lrs,
    update_signature,
)

STOP_CHECK_STEPS = 256  # how often (in steps) an epoch looks for an interruption


class Point(Protocol):
    """What the kernel needs of a point (``dense_step.ExplicitStep`` is one)."""

    optimizer: torch.optim.Optimizer
    scheduler: Any  # None, or a per-step ``LambdaLR`` (``dense_update.schedulable``)
    params: list[torch.Tensor]
    rmsprop: bool

    @property
    def group(self) -> dict[str, Any]: ...

    def state_keys(self) -> tuple[str, ...]: ...

    def state(self, key: str) -> list[torch.Tensor]: ...


def one_blas_thread():
    """Limit numpy's BLAS to one thread (a no-op context where threadpoolctl is missing).

    At the dense grid's sizes a second BLAS thread only waits, and when search workers run in
    parallel their idle BLAS threads spin on each other's cores (measured: batch-64 trials 8x
    slower). Imported here, not at the top: the GPU bench scripts run without scikit-learn.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(1, user_api="blas")


def scaled_one_hot(targets: np.ndarray, n_classes: int, batch_size: int | None = None):
    """One-hot rows of ``targets``, each divided by the size of the batch it falls in.

    Batches are ``batch_size`` consecutive rows, the last one shorter; None: one batch.
    """
    n = len(targets)
    one_hot = np.zeros((n, n_classes), np.float32)
    one_hot[np.arange(n), targets] = 1.0
    size = batch_size or max(n, 1)
    sizes = np.full(n, size, np.float32)
    if n % size:
        sizes[n - n % size :] = n % size
    one_hot /= sizes[:, None]
    return one_hot


def cross_entropy_sum(logits: np.ndarray, targets: np.ndarray) -> float:
    """The summed cross-entropy of float logits (any row shift) against integer targets."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_sums = np.log(np.exp(shifted).sum(axis=1, dtype=np.float64))
    return float(log_sums.sum() - shifted[np.arange(len(targets)), targets].sum(dtype=np.float64))


def stackable(point: Point) -> bool:
    """A point this kernel trains: at least one hidden layer (a first layer apart from the
    output). ``dense_step.backpropagate`` trains the others."""
    return len(point.params) >= 4


def architecture(point: Point) -> tuple:
    return tuple(tuple(p.shape) for p in point.params)


PAD = 64  # flat buffers are padded to a multiple of this many floats (see ``Block``)


class Block:
    """The points that share an update signature: their weights, gradients and optimizer state
    in flat buffers, so that a step's update is one call for all of them.

    Layout: the points' first-layer weights as one ``(sum of widths, inputs)`` matrix (each
    point's rows contiguous), their first-layer biases, then each point's later layers. The
    buffers are padded to a multiple of ``PAD`` floats so that a vectorised update kernel never
    takes its scalar tail, which rounds differently: each element is then updated by the same
    instructions whatever the group, and a point computes the same numbers alone or stacked.
    """

    def __init__(
        self, points: Sequence[Point], indices: Sequence[int], lrs: np.ndarray | None = None
    ) -> None:
        self.points, self.indices = list(points), list(indices)
        # a schedule's rate for each step of the epoch, and the cell the update kernel reads
        self.lrs, self.lr = lrs, (None if lrs is None else np.zeros((), np.float64))
        shapes = [architecture(point) for point in self.points]
        widths = [shape[0][0] for shape in shapes]
        hidden, n_inputs = sum(widths), shapes[0][0][1]
        self.hidden, self.n_inputs = hidden, n_inputs
        later = [sum(math.prod(s) for s in shape[2:]) for shape in shapes]
        size = hidden * (n_inputs + 1) + sum(later)
        self.params = np.zeros(-(-size // PAD) * PAD, np.float32)
        self.grads = np.zeros_like(self.params)
        self.states = (np.zeros_like(self.params), np.zeros_like(self.params))
        self.counter = np.zeros((), np.float32)  # the points' step count (they share it)
        self.layout = self.make_layout(shapes, widths, n_inputs, hidden)

    @staticmethod
    def make_layout(shapes, widths, n_inputs: int, hidden: int) -> list[list[tuple]]:
        """Per point, per parameter: (offset, shape) in the buffers."""
        layout, row, offset = [], 0, hidden * (n_inputs + 1)
        for shape, width in zip(shapes, widths, strict=True):
            entries = [
                (row * n_inputs, (width, n_inputs)),
                (hidden * n_inputs + row, (width,)),
            ]
            for param in shape[2:]:
                entries.append((offset, param))
                offset += math.prod(param)
            layout.append(entries)
            row += width
        return layout

    def views(self, buffer: np.ndarray) -> list[list[np.ndarray]]:
        """Per point, its parameters' views of ``buffer`` in ``params`` order."""
        return [
            [buffer[at : at + math.prod(shape)].reshape(shape) for at, shape in entries]
            for entries in self.layout
        ]

    def first_layer(self, buffer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The block's stacked first-layer weights and biases (as a column) in ``buffer``."""
        rows, n_inputs = self.hidden, self.n_inputs
        weights = buffer[: rows * n_inputs].reshape(rows, n_inputs)
        return weights, buffer[rows * n_inputs : rows * (n_inputs + 1)].reshape(rows, 1)

    def load(self) -> None:
        """Copy each point's weights, optimizer state and step count in."""
        buffers = [self.params, *self.states]
        for point, *views in zip(self.points, *[self.views(b) for b in buffers], strict=True):
            sources = [point.params] + [point.state(key) for key in point.state_keys()]
            for targets, tensors in zip(views, sources, strict=False):
                for view, tensor in zip(targets, tensors, strict=True):
                    view[...] = tensor.detach().numpy()
            self.counter[...] = float(point.state("step")[0])

    def write_back(self) -> None:
        """Copy the weights, the optimizer state and the step count back into each point."""
        buffers = [self.params, *self.states]
        with torch.no_grad():
            for point, *views in zip(self.points, *[self.views(b) for b in buffers], strict=True):
                targets = [list(point.params)] + [point.state(k) for k in point.state_keys()]
                for sources, tensors in zip(views, targets, strict=False):
                    for view, tensor in zip(sources, tensors, strict=True):
                        tensor.copy_(torch.from_numpy(view))
                for step in point.state("step"):
                    step.fill_(float(self.counter))

    def updater(self) -> Callable[[], None]:
        """The block's optimizer step: one call over its flat buffers (for RMSprop, states[1]
        is the kernel's scratch first moment)."""
        params, grads, *states = [
            torch.from_numpy(b) for b in (self.params, self.grads, *self.states)
        ]
        optimizer = self.points[0].optimizer
        return flat_updater(optimizer, params, grads, states, self.counter, self.lr)


def make_blocks(points: Sequence[Point], steps: int) -> list[Block]:
    """Points grouped by update signature (a schedule's rates for the epoch's ``steps`` steps
    included), in the order given."""
    groups: dict[tuple, list[int]] = {}
    lrs = [scheduled_lrs(point.scheduler, steps) for point in points]
    for index, point in enumerate(points):
        groups.setdefault(update_signature(point, lrs[index]), []).append(index)
    return [
        Block([points[i] for i in indices], indices, lrs[indices[0]])
        for indices in groups.values()
    ]


class Plan:
    """A step's work arrays at one batch size and the views each call takes, made once.

    Activations are feature-major (features x batch): the hidden layer of every point is one
    array (one bias add per block, one ReLU and one mask for all), rows in block order.
    """

    def __init__(self, blocks: Sequence[Block], batch: int, n_classes: int) -> None:
        self.hidden = np.empty((sum(block.hidden for block in blocks), batch), np.float32)
        self.hidden_delta = np.empty_like(self.hidden)
        n_points = sum(len(block.points) for block in blocks)
        self.logits = np.empty((n_points, n_classes, batch), np.float32)
        self.delta = np.empty_like(self.logits)
        self.firsts, self.points, row = [], [], 0
        for block in blocks:
            weights, biases = block.first_layer(block.params)
            grads, bias_grads = block.first_layer(block.grads)
            rows = slice(row, row + len(weights))
            self.firsts.append((self.hidden[rows], biases, self.hidden_delta[rows], bias_grads))
            for index, params, grad_views in zip(
                block.indices, block.views(block.params), block.views(block.grads), strict=True
            ):
                width = len(params[0])
                point_rows = slice(row, row + width)
                self.points.append(self.point_plan(index, point_rows, params, grad_views, batch))
                row += width
        self.points.sort(key=lambda plan: plan[0])

    def point_plan(self, index, rows, params, grads, batch) -> tuple:
        """(index, first-layer weights, their gradient, hidden rows, hidden-delta rows, later
        layers: (weights, weights transposed, bias column, gradients, input, input transposed,
        output, input's gradient))."""
        inputs, input_delta = self.hidden[rows], self.hidden_delta[rows]
        layers = []
        pairs = list(zip(params[2::2], params[3::2], grads[2::2], grads[3::2], strict=True))
        for n, (weight, bias, weight_grad, bias_grad) in enumerate(pairs):
            last = n == len(pairs) - 1
            shape = (len(weight), batch)
            output = self.logits[index] if last else np.empty(shape, np.float32)
            layers.append(
                (
                    weight,
                    weight.T,
                    bias[:, None],
                    weight_grad,
                    bias_grad,
                    inputs,
                    inputs.T,
                    output,
                    input_delta,
                )
            )
            inputs, input_delta = output, np.empty(shape, np.float32)
        return (index, params[0], grads[0], self.hidden[rows], self.hidden_delta[rows], layers)


def forward(plan: Plan, batch: np.ndarray) -> None:
    """Every point's logits for ``batch`` (rows are samples) into ``plan.logits``."""
    for _, weights, _, hidden, _, _ in plan.points:  # one GEMM per point, the same BLAS call
        np.matmul(weights, batch.T, out=hidden)  # alone or stacked
    for hidden, biases, _, _ in plan.firsts:
        hidden += biases
    np.maximum(plan.hidden, 0.0, out=plan.hidden)
    for *_, layers in plan.points:
        for n, (weight, _, bias, _, _, inputs, _, output, _) in enumerate(layers):
            np.matmul(weight, inputs, out=output)
            output += bias
            if n < len(layers) - 1:
                np.maximum(output, 0.0, out=output)


def softmax_delta(plan: Plan, one_hot: np.ndarray) -> np.ndarray:
    """(softmax - one_hot) / batch for every point, from ``plan.logits`` (shifted in place by
    their maximum, so that ``exp`` cannot overflow); ``one_hot`` is (classes, batch), scaled."""
    logits = plan.logits
    logits -= logits.max(axis=1, keepdims=True)
    delta = np.exp(logits, out=plan.delta)
    sums = delta.sum(axis=1, keepdims=True)
    sums *= np.float32(logits.shape[2])
    delta /= sums
    delta -= one_hot
    return delta


def backward(plan: Plan, batch: np.ndarray, delta: np.ndarray) -> None:
    """Every point's gradients from ``delta`` (d mean loss / d logits)."""
    for index, *_, layers in plan.points:
        upstream = delta[index]
        for n in range(len(layers) - 1, -1, -1):
            _, weight_t, _, weight_grad, bias_grad, inputs, inputs_t, _, input_delta = layers[n]
            np.matmul(upstream, inputs_t, out=weight_grad)
            upstream.sum(axis=1, out=bias_grad)
            np.matmul(weight_t, upstream, out=input_delta)
            if n:
                input_delta *= inputs > 0
            upstream = input_delta
    plan.hidden_delta *= plan.hidden > 0
    for _, _, grads, _, hidden_delta, _ in plan.points:
        np.matmul(hidden_delta, batch, out=grads)
    for _, _, hidden_delta, bias_grads in plan.firsts:
        hidden_delta.sum(axis=1, keepdims=True, out=bias_grads)


def run_stacked_epoch(
    points: Sequence[Point],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    should_stop: Callable[[], bool] | None = None,
) -> list[tuple[float, int]]:
    """Train every point on ``inputs[order]`` in batches; each point's summed loss and correct
    count. ``should_stop`` is asked every few hundred steps; True raises ``KeyboardInterrupt``
    (the weights trained so far are kept)."""
    features, order_ = inputs.numpy(), order.numpy()
    targets = labels.numpy()[order_]
    n_classes = int(points[0].params[-1].shape[0])
    one_hot = np.ascontiguousarray(scaled_one_hot(targets, n_classes, batch_size).T)
    blocks = make_blocks(points, -(-len(order_) // batch_size))
    for block in blocks:
        block.load()
    updates = [block.updater() for block in blocks]
    schedules = [(block.lr, block.lrs) for block in blocks if block.lrs is not None]
    plans: dict[int, Plan] = {}
    first_step = float(blocks[0].counter)  # the optimizer's own count says how far it went
    # each step's shifted logits, for the epoch's loss and accuracy (computed once at the end)
    logits = np.empty((len(order_), len(points), n_classes), np.float32)
    try:
        with torch.no_grad(), one_blas_thread():
            for number, start in enumerate(range(0, len(order_), batch_size)):
                if should_stop is not None and number % STOP_CHECK_STEPS == 0 and should_stop():
                    raise KeyboardInterrupt("the lockstep group was interrupted")
                stop = min(start + batch_size, len(order_))
                if stop - start not in plans:
                    plans[stop - start] = Plan(blocks, stop - start, n_classes)
                plan = plans[stop - start]
                batch = scale_pixels(features[order_[start:stop]])
                forward(plan, batch)
                delta = softmax_delta(plan, one_hot[:, start:stop])
                logits[start:stop] = plan.logits.transpose(2, 0, 1)
                backward(plan, batch, delta)
                for cell, lrs in schedules:
                    cell[...] = lrs[number]
                for update in updates:
                    update()
    finally:
        for block in blocks:
            block.write_back()
        for point in points:
            advance_schedule(point.scheduler, int(blocks[0].counter - first_step))
    results = []
    for column in range(len(points)):
        point = logits[:, column]
        correct = int(np.count_nonzero(point.argmax(axis=1) == targets))
        results.append((cross_entropy_sum(point, targets), correct))
    return results
