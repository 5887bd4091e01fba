"""Dense grid points trained in lockstep (``fmnist.models.dense_lockstep``): each point ends
exactly where it ends when trained alone (same weights, optimizer state, losses, bit for bit),
from the stacked epoch up to ``engine.fit`` in threads; an interrupted group stops every point.
"""

from __future__ import annotations

import threading

import pytest
import torch

from fmnist.data import Split
from fmnist.models.dense import build_mlp
from fmnist.models.dense_lockstep import Lockstep, run_stacked_epoch
from fmnist.models.dense_step import ExplicitStep
from fmnist.train import engine
from fmnist.train.config import TrainConfig
from fmnist.train.optim import make_optimizer, make_scheduler

CPU = torch.device("cpu")
# (hidden, optimizer, lr): two optimizer settings, one and two hidden layers, AdamW too
POINTS = [
    ([16], "adam", 0.01),
    ([16, 8], "rmsprop", 0.01),
    ([12], "rmsprop", 0.01),
    ([16, 8], "adam", 0.01),
    ([16], "adamw", 0.01),
]
TIMING = ("epoch_seconds", "images_per_second")


def make_steps(weight_decay: float, schedule: str = "none") -> list[ExplicitStep]:
    """The points; with ``schedule``, every other one on it (three epochs of five steps)."""
    steps = []
    for hidden, optimizer, lr in POINTS:
        torch.manual_seed(len(steps))
        mlp = build_mlp(12, hidden)
        opt = make_optimizer(optimizer, mlp.parameters(), lr, weight_decay, CPU)
        scheduled = schedule if len(steps) % 2 == 0 else "none"
        steps.append(ExplicitStep(opt, make_scheduler(scheduled, opt, lr, 3, 5)))
    return steps


def assert_same_training(a: ExplicitStep, b: ExplicitStep) -> None:
    for p, q in zip(a.params, b.params, strict=True):
        assert torch.equal(p, q)
        state_a, state_b = a.optimizer.state[p], b.optimizer.state[q]
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), key


@pytest.mark.parametrize(("weight_decay", "schedule"), [(0.0, "none"), (0.01, "cosine")])
def test_a_stacked_epoch_trains_each_point_exactly_as_alone(weight_decay, schedule):
    """Three shuffled epochs of 70 rows at batch 16 (a short last batch): every point's loss,
    correct count, weights and optimizer state equal those of its own ``ExplicitStep`` (with a
    schedule on some points: they share calls with each other, not with the others)."""
    features, targets = torch.randn(70, 12) * 3, torch.randint(0, 10, (70,))
    alone, stacked = make_steps(weight_decay, schedule), make_steps(weight_decay, schedule)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        order = torch.randperm(70, generator=generator)
        expected = [step.run_epoch(features, targets, order, 16) for step in alone]
        assert run_stacked_epoch(stacked, features, targets, order, 16) == expected
    for a, b in zip(alone, stacked, strict=True):
        assert_same_training(a, b)
        assert a.optimizer.param_groups[0]["lr"] == b.optimizer.param_groups[0]["lr"]
    if schedule != "none":  # the schedule ran: three epochs of five steps, down to zero
        assert stacked[0].scheduler.last_epoch == 15
        assert stacked[0].optimizer.param_groups[0]["lr"] == 0.0


def fit_point(index: int, train: Split, val: Split, group: Lockstep | None = None):
    hidden, optimizer, lr = POINTS[index]
    if group is not None:
        group.set_up(index)
    torch.manual_seed(0)
    mlp = build_mlp(12, hidden)
    if group is not None:
        mlp.train_in_lockstep(group, index)
    cfg = TrainConfig(optimizer=optimizer, lr=lr, batch_size=16, epochs=3, seed=5, quiet=True)
    return mlp, engine.fit(mlp, train, val, cfg)


def fit_in_threads(train: Split, val: Split, group: Lockstep) -> dict:
    results, errors = {}, []
    for index in range(len(POINTS)):
        group.join(index)

    def run(index: int) -> None:
        try:
            results[index] = fit_point(index, train, val, group)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)
        finally:
            group.leave(index)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(POINTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    return {"results": results, "errors": errors}


def split(n: int) -> Split:
    return Split(torch.randn(n, 12) * 3, torch.randint(0, 10, (n,)))


def test_fits_in_lockstep_threads_equal_fits_alone():
    """``engine.fit`` per point from its own thread, epochs trained together: the same history
    (but its timings), best epoch and best weights as each point's fit alone."""
    torch.manual_seed(3)
    train, val = split(70), split(30)
    group = Lockstep()
    together = fit_in_threads(train, val, group)
    assert not together["errors"]
    assert group.epochs_run == 3  # one stacked epoch per epoch: nobody trained alone
    for index in range(len(POINTS)):
        mlp, result = together["results"][index]
        alone_mlp, alone = fit_point(index, train, val)
        assert result.best_epoch == alone.best_epoch
        assert result.best_val_accuracy == alone.best_val_accuracy
        strip = [{k: v for k, v in h.items() if k not in TIMING} for h in result.history]
        assert strip == [{k: v for k, v in h.items() if k not in TIMING} for h in alone.history]
        for p, q in zip(mlp.parameters(), alone_mlp.parameters(), strict=True):
            assert torch.equal(p, q)


def test_a_point_that_leaves_does_not_hold_up_the_others():
    """A point that stops after its first epoch (pruned, released, failed) leaves the group;
    the others train their three epochs."""
    torch.manual_seed(3)
    train, val = split(70), split(30)
    real_fit = engine.fit

    def stop_point_two(model, train_split, val_split, cfg, **kwargs):
        if cfg.optimizer == "rmsprop" and model.layers[0].out_features == 12:

            def stop(epoch, metrics):
                raise RuntimeError("pruned")

            kwargs["on_epoch_end"] = stop
        return real_fit(model, train_split, val_split, cfg, **kwargs)

    group = Lockstep()
    engine.fit, saved = stop_point_two, engine.fit
    try:
        together = fit_in_threads(train, val, group)
    finally:
        engine.fit = saved
    assert [str(e) for e in together["errors"]] == ["pruned"]
    assert sorted(together["results"]) == [0, 1, 3, 4]
    assert all(len(r.history) == 3 for _, r in together["results"].values())


def test_an_interrupted_group_stops_every_point():
    """``interrupt`` (Ctrl-C in the worker's main thread) makes every point raise
    KeyboardInterrupt at its next epoch, or within the stacked epoch it is in."""
    torch.manual_seed(3)
    train, val = split(70), split(30)
    group = Lockstep()
    group.interrupt()
    together = fit_in_threads(train, val, group)
    assert not together["results"]
    assert len(together["errors"]) == len(POINTS)
    assert all(isinstance(e, KeyboardInterrupt) for e in together["errors"])
