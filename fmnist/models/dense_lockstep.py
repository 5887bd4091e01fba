"""Dense MLPs trained in lockstep: several grid points' epochs over one shuffled order at once.

The study's grid points that share a batch size and a seed see the same batches in the same
order, so one pass over the data can step all of them (``dense_stacked.run_stacked_epoch``:
shared calls, each point's numbers as when it trains alone). ``Lockstep`` is the meeting point of
the points' trainings: each calls its member's ``run_epoch`` from its own thread (its own
``engine.fit``, MLflow run and Optuna trial), the last to arrive trains everyone's epoch, and a
point that stops (pruned, released, failed) leaves without holding up the others.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from fmnist.models.dense_stacked import run_stacked_epoch, stackable
from fmnist.models.dense_step import ExplicitStep


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
