"""Dense MLPs trained in lockstep: several grid points' epochs over one shuffled order at once.

The study's grid points that share a batch size and a seed see the same batches in the same
order, so one pass over the data can step all of them: their first layers become one matrix
(one GEMM forward and one backward per block instead of one each), their softmax and
cross-entropy gradient are computed on one stacked array, and the points that share an
optimizer setting (Adam with the same rate, say) are updated by one call over one flat buffer.
Every point keeps its own weights, optimizer state and results; each number is computed by the
same formula on the same values as in ``ExplicitStep`` (``tests/test_dense.py`` checks that a
point trained in lockstep equals the point trained alone). ``Lockstep`` is the meeting point of
the points' trainings: each calls its member's ``run_epoch`` from its own thread (its own
``engine.fit``, MLflow run and Optuna trial), the last to arrive trains everyone's epoch, and a
point that stops (pruned, released, failed) leaves without holding up the others.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from fmnist.data import scale_pixels
from fmnist.models.dense_step import (
    ExplicitStep,
    FlatParameters,
    adam_update,
    cross_entropy_sum,
    one_blas_thread,
    scaled_one_hot,
)

STOP_CHECK_STEPS = 256  # how often (in steps) a stacked epoch looks for an interruption


def update_signature(step: ExplicitStep) -> tuple:
    """What two points must share to be updated by one call: the optimizer's formula and
    settings, and the step count (one counter stands for a whole flat buffer)."""
    group = step.group
    counters = [step.optimizer.state[p].get("step") for p in step.params]
    count = int(counters[0]) if counters[0] is not None else 0
    if step.rmsprop:
        return ("rmsprop", group["lr"], group["alpha"], group["eps"], group["weight_decay"], count)
    decoupled = bool(
        group.get("decoupled_weight_decay") or isinstance(step.optimizer, torch.optim.AdamW)
    )
    return (
        "adam",
        decoupled,
        group["lr"],
        tuple(group["betas"]),
        group["eps"],
        group["weight_decay"],
        count,
    )


class Block:
    """Points updated by one call: one flat working copy of their weights, gradients and
    optimizer state for the epoch (each point's parameters in a row, as ``ExplicitStep`` lays
    out one point), written back at its end. Their hidden layers' outputs share one array, so
    the ReLU and its gradient mask are one call for all."""

    def __init__(self, steps: Sequence[ExplicitStep], columns: Sequence[int]) -> None:
        self.steps = list(steps)
        self.columns = list(columns)  # each point's column in the stacked logits
        keys = self.steps[0].state_keys()

        def state_of(key: str) -> list[torch.Tensor]:
            return [t for s in self.steps for t in s.state(key)]

        self.flat = FlatParameters([p for s in self.steps for p in s.params], keys, state_of)
        weights, gradients = self.flat.views(self.flat.params), self.flat.views(self.flat.grads)
        self.layers, self.layer_grads, self.segments, at, offset = [], [], [], 0, 0
        for s in self.steps:
            count, size = len(s.params), sum(p.numel() for p in s.params)
            self.layers.append(weights[at : at + count])
            self.layer_grads.append(gradients[at : at + count])
            self.segments.append(slice(offset, offset + size))
            at, offset = at + count, offset + size
        widths = [int(s.params[0].shape[0]) for s in self.steps]
        offsets = np.cumsum([0, *widths]).tolist()
        self.spans = list(zip(offsets[:-1], offsets[1:], strict=True))
        self.update = self.updater()
        self.hidden: np.ndarray | None = None
        self.activations: list[list[np.ndarray]] = []

    def updater(self) -> Callable[[], None]:
        """One update call for the block. RMSprop's numpy formula runs over the whole buffer;
        Adam's fused kernel gets one tensor per point, so that each element meets the kernel's
        vector lanes exactly as when its point trains alone (its scalar tail rounds otherwise)."""
        first, flat = self.steps[0], self.flat
        if first.rmsprop:
            return first.updater(flat)
        group = first.group
        decoupled = group.get("decoupled_weight_decay") or isinstance(
            first.optimizer, torch.optim.AdamW
        )
        self.counters = [flat.step.clone() for _ in self.steps]
        return partial(
            adam_update,
            torch._fused_adamw_ if decoupled else torch._fused_adam_,
            [flat.params[s] for s in self.segments],
            [flat.grads[s] for s in self.segments],
            [flat.states["exp_avg"][s] for s in self.segments],
            [flat.states["exp_avg_sq"][s] for s in self.segments],
            self.counters,
            lr=group["lr"],
            beta1=group["betas"][0],
            beta2=group["betas"][1],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
        )

    def write_back(self) -> None:
        if not self.steps[0].rmsprop:
            self.flat.step.copy_(self.counters[0])  # every point stepped as often
        self.flat.write_back()

    def forward(self, batch: np.ndarray, logits: np.ndarray) -> None:
        """Every point's forward pass; each point's logits go to its column of ``logits``."""
        hidden = np.empty((len(batch), self.spans[-1][1]), np.float32)
        for (start, stop), layers in zip(self.spans, self.layers, strict=True):
            # one GEMM per point, not one over stacked weights: BLAS would pick another kernel
            # for the wider matrix and round differently from the point trained alone
            out = hidden[:, start:stop]
            np.matmul(batch, layers[0].T, out=out)
            out += layers[1]
        np.maximum(hidden, 0.0, out=hidden)
        self.hidden, self.activations = hidden, []
        for index, layers in enumerate(self.layers):
            start, stop = self.spans[index]
            activations = [hidden[:, start:stop]]
            for layer in range(1, len(layers) // 2 - 1):
                inner = activations[-1] @ layers[2 * layer].T
                inner += layers[2 * layer + 1]
                activations.append(np.maximum(inner, 0.0, out=inner))
            out = logits[:, self.columns[index]]
            np.matmul(activations[-1], layers[-2].T, out=out)
            out += layers[-1]
            self.activations.append(activations)

    def backward(self, batch: np.ndarray, delta: np.ndarray) -> None:
        """Every point's gradients from its column of ``delta`` (d mean loss / d logits)."""
        hidden = self.hidden
        hidden_delta = np.empty_like(hidden)
        for index, (layers, grads) in enumerate(zip(self.layers, self.layer_grads, strict=True)):
            activations = self.activations[index]
            point_delta = delta[:, self.columns[index]]
            for layer in range(len(layers) // 2 - 1, 0, -1):
                inputs = activations[layer - 1]
                np.matmul(point_delta.T, inputs, out=grads[2 * layer])
                point_delta.sum(axis=0, out=grads[2 * layer + 1])
                if layer > 1:
                    point_delta = point_delta @ layers[2 * layer]
                    point_delta *= inputs > 0
            start, stop = self.spans[index]
            np.matmul(point_delta, layers[2], out=hidden_delta[:, start:stop])
        hidden_delta *= hidden > 0
        for (start, stop), grads in zip(self.spans, self.layer_grads, strict=True):
            point_delta = hidden_delta[:, start:stop]
            np.matmul(point_delta.T, batch, out=grads[0])
            point_delta.sum(axis=0, out=grads[1])


def stackable(step: ExplicitStep) -> bool:
    """A point the stacked epoch can train: at least one hidden layer (a first layer to stack)."""
    return len(step.params) >= 4


def make_blocks(steps: Sequence[ExplicitStep]) -> list[Block]:
    """Points grouped by ``update_signature``, in the order given (columns follow it)."""
    groups: dict[tuple, list[int]] = {}
    for index, step in enumerate(steps):
        shape = tuple(step.params[0].shape[1:])
        groups.setdefault((update_signature(step), shape), []).append(index)
    return [Block([steps[i] for i in indices], indices) for indices in groups.values()]


def run_stacked_epoch(
    steps: Sequence[ExplicitStep],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    should_stop: Callable[[], bool] | None = None,
) -> list[tuple[float, int]]:
    """Train every point on ``inputs[order]`` in batches; each point's summed loss and correct
    count, as ``ExplicitStep.run_epoch`` returns them. ``should_stop`` is asked every few
    hundred steps; True raises ``KeyboardInterrupt`` (the weights trained so far are kept)."""
    features, order_ = inputs.numpy(), order.numpy()
    targets = labels.numpy()[order_]
    blocks = make_blocks(steps)
    n_classes = int(steps[0].params[-1].shape[0])
    one_hot = scaled_one_hot(targets, n_classes, batch_size)
    # one row per sample, one column per point: one softmax over all points per batch
    logits = np.empty((len(order_), len(steps), n_classes), np.float32)
    try:
        with torch.no_grad(), one_blas_thread():
            for number, start in enumerate(range(0, len(order_), batch_size)):
                if should_stop is not None and number % STOP_CHECK_STEPS == 0 and should_stop():
                    raise KeyboardInterrupt("the lockstep group was interrupted")
                stop = start + batch_size
                batch = scale_pixels(features[order_[start:stop]])
                out = logits[start:stop]
                for block in blocks:
                    block.forward(batch, out)
                delta = softmax_gradient(out, one_hot[start:stop])
                for block in blocks:
                    block.backward(batch, delta)
                    block.update()
    finally:
        for block in blocks:
            block.write_back()
    results = []
    for column in range(len(steps)):
        point = np.ascontiguousarray(logits[:, column])
        correct = int(np.count_nonzero(point.argmax(axis=1) == targets))
        results.append((cross_entropy_sum(point, targets), correct))
    return results


def softmax_gradient(logits: np.ndarray, one_hot: np.ndarray) -> np.ndarray:
    """``backpropagate``'s softmax step on (batch, points, classes) logits: shifts ``logits`` by
    their row maximum in place and returns (softmax - one_hot) / batch for every point."""
    logits -= logits.max(axis=2, keepdims=True)
    delta = np.exp(logits)
    sums = delta.sum(axis=2, keepdims=True)
    sums *= np.float32(len(logits))
    delta /= sums
    delta -= one_hot[:, None, :]
    return delta


@dataclass
class Arrival:
    """One point waiting for its epoch: its runner and the epoch it asked for."""

    step: ExplicitStep
    inputs: torch.Tensor
    labels: torch.Tensor
    order: torch.Tensor
    batch_size: int
    result: tuple[float, int] | None = None
    error: BaseException | None = None


@dataclass
class Lockstep:
    """Points trained together, each from its own thread: ``join`` one per point before any
    starts, ``leave`` when it ends (however it ends). ``interrupt`` stops them all.

    A point's set-up (seeding, building the model, the optimizer) runs between ``set_up`` and
    its first epoch, one point at a time: the seeds are process-wide, and each point must get
    the initial weights it gets when trained alone.
    """

    members: set[int] = field(default_factory=set)
    arrivals: dict[int, Arrival] = field(default_factory=dict)
    condition: threading.Condition = field(default_factory=threading.Condition)
    interrupted: threading.Event = field(default_factory=threading.Event)
    setup_lock: threading.Lock = field(default_factory=threading.Lock)
    setting_up: int | None = None
    busy: bool = False
    epochs_run: int = 0  # stacked epochs trained (one per epoch of the group)

    def join(self, key: int) -> None:
        with self.condition:
            self.members.add(key)

    def set_up(self, key: int) -> None:
        """Wait for the other points' set-up; this point's ends at its first epoch."""
        self.setup_lock.acquire()
        self.setting_up = key

    def set_up_done(self, key: int) -> None:
        if self.setting_up == key:
            self.setting_up = None
            self.setup_lock.release()

    def leave(self, key: int) -> None:
        self.set_up_done(key)
        with self.condition:
            self.members.discard(key)
            self.arrivals.pop(key, None)
            self.condition.notify_all()

    def interrupt(self) -> None:
        self.interrupted.set()
        with self.condition:
            self.condition.notify_all()

    def member(self, key: int, step: ExplicitStep) -> LockstepMember:
        return LockstepMember(self, key, step)

    def run_epoch(self, key: int, arrival: Arrival) -> tuple[float, int]:
        """Wait until every member asked for its epoch, train them all (in the thread that
        comes last), and return this member's result."""
        self.set_up_done(key)
        with self.condition:
            self.arrivals[key] = arrival
            self.condition.notify_all()
            while arrival.result is None and arrival.error is None:
                if self.interrupted.is_set():
                    self.arrivals.pop(key, None)
                    raise KeyboardInterrupt("the lockstep group was interrupted")
                if not self.busy and self.members <= set(self.arrivals):
                    batch, self.busy = dict(self.arrivals), True
                    self.arrivals.clear()
                    self.condition.release()
                    try:
                        self.train(batch)
                    finally:
                        self.condition.acquire()
                        self.busy = False
                        self.condition.notify_all()
                    continue
                self.condition.wait()
        if arrival.error is not None:
            raise arrival.error
        return arrival.result

    def train(self, arrivals: dict[int, Arrival]) -> None:
        """One epoch of every arrival: those on the same order and batch size stacked."""
        groups: list[list[Arrival]] = []
        for arrival in arrivals.values():
            for group in groups:
                first = group[0]
                if (
                    first.batch_size == arrival.batch_size
                    and first.inputs is arrival.inputs
                    and torch.equal(first.order, arrival.order)
                ):
                    group.append(arrival)
                    break
            else:
                groups.append([arrival])
        self.epochs_run += 1
        for group in groups:
            first = group[0]
            stacked = [a for a in group if stackable(a.step)]
            alone = [a for a in group if not stackable(a.step)]
            try:
                if stacked:
                    results = run_stacked_epoch(
                        [a.step for a in stacked],
                        first.inputs,
                        first.labels,
                        first.order,
                        first.batch_size,
                        self.interrupted.is_set,
                    )
                    for arrival, result in zip(stacked, results, strict=True):
                        arrival.result = result
                for arrival in alone:
                    arrival.result = arrival.step.run_epoch(
                        arrival.inputs, arrival.labels, arrival.order, arrival.batch_size
                    )
            except BaseException as exc:  # noqa: BLE001 - every waiting point must hear of it
                for arrival in group:
                    if arrival.result is None:
                        arrival.error = exc


@dataclass
class LockstepMember:
    """The epoch runner ``MLP.epoch_runner`` hands the engine for a point of a ``Lockstep``."""

    group: Lockstep
    key: int
    step: ExplicitStep

    def run_epoch(
        self, inputs: torch.Tensor, labels: torch.Tensor, order: torch.Tensor, batch_size: int
    ) -> tuple[float, int]:
        arrival = Arrival(self.step, inputs, labels, order, batch_size)
        return self.group.run_epoch(self.key, arrival)
