"""The trials of one claim: those whose points share a lockstep key trained together, any other
alone.

A worker's claim (``points.claim_group``) may hold several trials whose points can train in
lockstep (``fmnist.models.dense_lockstep``): each then runs in its own thread with its own child
run, trial, heartbeat and ``engine.fit``, and one ``Lockstep`` trains their epochs at once
(MLflow's active run is per thread). How one trial runs (its MLflow run) is the driver's
``run_trial``, passed in as ``run_one``: this module imports no MLflow.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from fmnist.models.dense_lockstep import Lockstep
from fmnist.search import points
from fmnist.search.spec import SearchData, SearchSpec

# run_one(study, trial, spec, data, lockstep=None, sharing=1): one trial in its own run.
TrialRun = Callable[..., None]


def run_claimed(study, trials, spec: SearchSpec, data: SearchData, run_one: TrialRun) -> None:
    """Train the trials a worker claimed: those whose points share a lockstep key together
    (``run_in_lockstep``), any other alone. Trials not started when an error stops the worker
    fail for a retry, so that their points are queued again."""
    groups: dict[Any, list] = {}
    for trial in trials:
        key = points.lockstep_key(spec, trial)
        groups.setdefault(("alone", trial.number) if key is None else key, []).append(trial)
    pending = list(groups.values())
    try:
        while pending:
            group = pending.pop(0)
            if len(group) == 1:
                run_one(study, group[0], spec, data)
            else:
                run_in_lockstep(study, group, spec, data, run_one)
    except BaseException:
        for trial in (t for group in pending for t in group):
            points.finish_failed(study, trial, "its worker stopped before it started", False)
        raise


def run_in_lockstep(
    study, trials: Sequence, spec: SearchSpec, data: SearchData, run_one: TrialRun
) -> None:
    """Train several points together, each in its own thread, their epochs trained at once by
    one ``Lockstep``. Ctrl-C (which reaches only this thread) interrupts them all; the first
    error of any point is raised once every point has ended."""
    group = Lockstep()
    for trial in trials:
        group.join(trial.number)
    errors: list[BaseException] = []

    def train(trial) -> None:
        try:
            run_one(study, trial, spec, data, lockstep=group, sharing=len(trials))
        except BaseException as exc:  # noqa: BLE001 - raised again by the calling thread
            errors.append(exc)
            group.interrupt()  # the worker stops: the other points stop too, for a retry
        finally:
            group.leave(trial.number)

    threads = [
        threading.Thread(target=train, args=(t,), name=f"trial-{t.number}", daemon=True)
        for t in trials
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.5)  # a timed join lets Ctrl-C through
    except BaseException:
        group.interrupt()
        for thread in threads:
            thread.join()
        raise
    if errors:
        raise errors[0]
