"""A search's points in its Optuna study: queueing, claiming, heartbeats, budget, how trials end.

Grids go through Optuna's trial queue instead of ``GridSampler``'s own pick, which can hand one
point to two workers: each missing point is enqueued with its name fixed when the trial is
created, a worker pops queued trials (an atomic WAITING -> RUNNING change in every Optuna
storage), and a worker that pops a point another trial already holds (two processes queued it)
gives its trial up. A point is ``done`` when a trial for it completed, was pruned, or failed for
a final reason (a diverged loss); an interrupted one (Ctrl-C, a vanished worker process) is
``missing`` and queued again, by the next run or by any live worker of the study: a worker with
nothing left to claim waits while others train, and takes back a trial whose worker stops
beating (``heartbeat``, ``take_back``). The driver sees trials only through these functions.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
import warnings
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from fmnist.search.spec import SearchSpec
from fmnist.search.study import (
    FAIL_REASON,
    FINAL,
    HEARTBEAT,
    POINT,
    SKIPPED,
    STALE_TRIALS,
    WORKER,
    host_name,
    liveness,
    worker_gone,
    worker_id,
)

STATUS_RANK = {"missing": 0, "held": 1, "done": 2}


def trial_status(trial: FrozenTrial) -> str:
    """``done``, ``held`` (queued or running) or ``missing`` (interrupted: train it again)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return "done"
    if trial.state == TrialState.FAIL and trial.user_attrs.get(FINAL):
        return "done"
    if trial.state in (TrialState.RUNNING, TrialState.WAITING):
        return "held"
    return "missing"


def point_statuses(trials: Sequence[FrozenTrial], names: Sequence[str]) -> dict[str, str]:
    """Each named point's status over all its trials (done beats held beats missing)."""
    statuses = dict.fromkeys(names, "missing")
    for trial in trials:
        name = trial.user_attrs.get(POINT)
        if name not in statuses or trial.user_attrs.get(SKIPPED):
            continue
        status = trial_status(trial)
        if STATUS_RANK[status] > STATUS_RANK[statuses[name]]:
            statuses[name] = status
    return statuses


def queue_points(study: optuna.Study, spec: SearchSpec) -> list[str]:
    """Enqueue every grid point (a sampled search: every ``first`` point) that no trial has done
    or holds, costliest first; return their names."""
    points = spec.grid or spec.first
    names = [spec.space.point_name(params) for params in points]
    statuses = point_statuses(study.get_trials(deepcopy=False), names)
    order = list(zip(names, points, strict=True))
    if spec.grid and spec.cost is not None:
        order.sort(key=lambda item: -spec.cost(item[1]))
    queued = []
    for name, params in order:
        if statuses[name] == "missing":
            study.enqueue_trial(dict(params), user_attrs={POINT: name})
            queued.append(name)
    return queued


def release_stale_trials(study: optuna.Study, now: float | None = None) -> list[FrozenTrial]:
    """Fail the RUNNING trials whose worker is gone; return those this process released.

    Gone is: silent for the grace period (``liveness``) by Optuna's heartbeat on an RDB storage
    (the database server's clock), or by the trial's ``heartbeat`` attribute on a journal (each
    machine's clock); or a process of this machine that no longer exists. Of several workers
    releasing at once, each trial is reported by one only.
    """
    grace = liveness().grace
    now = time.time() if now is None else now
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a no-op on a storage without heartbeat
    released = STALE_TRIALS.drain(study.study_name)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER)
        beat = trial.user_attrs.get(HEARTBEAT)
        silent = beat is not None and now - float(beat) > grace
        if worker and (worker_gone(worker) or silent):
            try:
                study.tell(trial.number, state=TrialState.FAIL)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
                continue  # another worker released it first
            released.append(trial)
    return released


def take_back(study: optuna.Study, spec: SearchSpec) -> list[FrozenTrial]:
    """Release the trials of dead workers and queue their points again; return the released."""
    released = release_stale_trials(study)
    if released and (spec.grid or spec.first):
        queue_points(study, spec)
    return released


def beats_in_storage(storage: Any) -> bool:
    """True for a storage with Optuna's own heartbeat (RDB), False for a journal."""
    interval = getattr(storage, "get_heartbeat_interval", None)
    return callable(interval) and interval() is not None


def beat(trial: optuna.Trial) -> bool:
    """Record one heartbeat of ``trial``; False when it no longer runs (another worker released
    it: this worker must stop training it)."""
    storage = trial.storage
    trial_id = trial._trial_id  # private in Optuna 5: Optuna's own heartbeat thread uses it
    try:
        if beats_in_storage(storage):
            storage.record_heartbeat(trial_id)
        else:
            trial.set_user_attr(HEARTBEAT, time.time())
    except Exception:  # noqa: BLE001 - a missed beat must never fail the training
        pass
    try:
        return storage.get_trial(trial_id).state == TrialState.RUNNING
    except Exception:  # noqa: BLE001 - an unreadable storage proves nothing either way
        return True


@contextmanager
def heartbeat(trial: optuna.Trial) -> Iterator[threading.Event]:
    """Beat from a thread while the trial trains, so workers on other machines can tell a long
    epoch from a dead worker (``release_stale_trials``); the event it yields is set when another
    worker released the trial meanwhile."""
    stop, released = threading.Event(), threading.Event()
    period = liveness().heartbeat

    def run() -> None:
        while True:
            if not beat(trial):
                released.set()
                return
            if stop.wait(period):
                return

    thread = threading.Thread(target=run, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield released
    finally:
        stop.set()
        thread.join(timeout=5)


def others_training(study: optuna.Study, spec: SearchSpec, started: float) -> int:
    """How many trials other workers are training that this worker may have to take back (none
    once a sampled search's time is up)."""
    if spec.timeout is not None and time.monotonic() - started >= spec.timeout:
        return 0
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return len([t for t in running if not t.user_attrs.get(SKIPPED)])


# --- claiming --------------------------------------------------------------------------------


def holder_of(study: optuna.Study, number: int, name: str) -> int | None:
    """Another trial that already holds point ``name``: done, or queued/running and older."""
    for other in study.get_trials(deepcopy=False):
        if other.number == number or other.user_attrs.get(POINT) != name:
            continue
        if other.user_attrs.get(SKIPPED):
            continue
        status = trial_status(other)
        if status == "done" or (status == "held" and other.number < number):
            return other.number
    return None


def give_up(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr(SKIPPED, reason)
    study.tell(trial, state=TrialState.FAIL)


def queued_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def budget_left(study: optuna.Study, spec: SearchSpec, started: float) -> bool:
    """A sampled search's budget: trials counted over every worker, and wall-clock time."""
    if spec.timeout is not None and time.monotonic() - started >= spec.timeout:
        return False
    if spec.n_trials is None:
        return spec.timeout is not None
    return trials_left(study, spec) > 0


def trials_left(study: optuna.Study, spec: SearchSpec) -> int:
    """A sampled search's trials still to start: ``n_trials`` minus those done or running
    (queued ones are not started yet: ``ask`` hands them out first)."""
    if spec.n_trials is None:
        return 1 << 30
    counted = [
        t
        for t in study.get_trials(deepcopy=False)
        if not t.user_attrs.get(SKIPPED)
        and (trial_status(t) == "done" or t.state == TrialState.RUNNING)
    ]
    return max(0, spec.n_trials - len(counted))


def pending_count(study: optuna.Study, spec: SearchSpec) -> int:
    """How many trials a run could train now: queued grid points, or the sampled budget."""
    return queued_count(study) if spec.grid else trials_left(study, spec)


def ask(study: optuna.Study) -> optuna.Trial:
    """``study.ask``, with the trial's first heartbeat recorded at once: a trial that never beat
    is never released by Optuna's heartbeat."""
    with warnings.catch_warnings():
        # Optuna beats only inside ``optimize``; ``heartbeat`` and ``beat`` do it here
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        trial = study.ask()
    beat(trial)
    return trial


def claim(study: optuna.Study, spec: SearchSpec, started: float) -> optuna.Trial | None:
    """The next trial this worker trains, or None when nothing is left for it."""
    while True:
        if not spec.grid:
            if not budget_left(study, spec, started):
                return None
            trial = ask(study)
            trial.set_user_attr(WORKER, worker_id())
            return trial
        if not queued_count(study):
            return None
        trial = ask(study)  # pops the oldest queued trial
        try:
            trial.set_user_attr(WORKER, worker_id())  # lets a later run see if this process died
            name = trial.user_attrs.get(POINT)
            if name is None:  # another worker emptied the queue first: the sampler made this
                give_up(study, trial, "the queue was empty")
                return None
            holder = holder_of(study, trial.number, name)
        except BaseException:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            raise
        if holder is None:
            return trial
        give_up(study, trial, f"point {name} is held by trial {holder}")


def lockstep_key(spec: SearchSpec, trial: Any) -> Hashable | None:
    """What a queued trial's point must share with others to train in lockstep with them (the
    space's ``lockstep_key`` of its queued params), or None: it trains alone."""
    key_of = getattr(spec.space, "lockstep_key", None)
    if key_of is None:
        return None
    if not isinstance(trial, FrozenTrial):  # a live trial shows its queued params in storage
        trial = trial.storage.get_trial(trial._trial_id)  # private: as ``beat`` reads it
    params = trial.system_attrs.get("fixed_params")
    return None if params is None else key_of(params)


def next_queued_key(study: optuna.Study, spec: SearchSpec) -> Hashable | None:
    """The lockstep key of the trial ``ask`` pops next (the oldest queued), or None."""
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    if not waiting:
        return None
    return lockstep_key(spec, min(waiting, key=lambda t: t.number))


def claim_group(
    study: optuna.Study, spec: SearchSpec, started: float, limit: int = 1
) -> list[optuna.Trial]:
    """The next trials this worker trains (empty: nothing is left for it): one, and up to
    ``limit`` in all while the next queued point shares its lockstep key. Each is claimed as
    ``claim`` claims one, so each is held, beats and is taken back on its own; another worker
    may pop a point first, so the group's keys may still differ (``claims.run_claimed`` groups
    them by key)."""
    first = claim(study, spec, started)
    if first is None:
        return []
    group, key = [first], lockstep_key(spec, first)
    while key is not None and len(group) < limit and next_queued_key(study, spec) == key:
        trial = claim(study, spec, started)
        if trial is None:
            break
        group.append(trial)
    return group


# --- how a trial ends --------------------------------------------------------------------------


def should_prune(trial: optuna.Trial, value: float, epoch: int, prune: bool) -> bool:
    """Report an epoch's validation accuracy; True when the pruner stops the trial."""
    trial.report(value, epoch)
    return prune and trial.should_prune()


def finish_complete(
    study: optuna.Study, trial: optuna.Trial, value: float, best_epoch: int, seconds: float
) -> None:
    trial.set_user_attr("seconds", round(seconds, 3))
    trial.set_user_attr("best_epoch", best_epoch)
    study.tell(trial, value)


def finish_pruned(study: optuna.Study, trial: optuna.Trial, seconds: float) -> None:
    trial.set_user_attr("seconds", round(seconds, 3))
    study.tell(trial, state=TrialState.PRUNED)


def finish_failed(study: optuna.Study, trial: optuna.Trial, reason: str, final: bool) -> None:
    """Fail the trial: for good (``final``: its point is done) or to be trained again."""
    trial.set_user_attr(FAIL_REASON, reason[:2000])
    trial.set_user_attr(FINAL, final)
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


def trained_here(study: optuna.Study, pids: Sequence[int], since: datetime.datetime) -> list[str]:
    """The points this process and its workers (``pids``) trained to the end since ``since``
    (other workers share the study; an earlier call in this process had the same pid)."""
    prefixes = tuple(f"{host_name()}:{pid}:" for pid in (os.getpid(), *pids))
    return [
        t.user_attrs.get(POINT) or f"trial-{t.number}"
        for t in study.get_trials(deepcopy=False)
        if str(t.user_attrs.get(WORKER, "")).startswith(prefixes)
        and t.datetime_start is not None
        and t.datetime_start >= since
        and not t.user_attrs.get(SKIPPED)
        and trial_status(t) == "done"
    ]


def trial_point(trial: Any) -> str:
    """The point a trial trains, by its queued name (a sampled trial: by its number)."""
    return trial.user_attrs.get(POINT) or f"trial-{trial.number}"
