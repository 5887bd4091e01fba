"""Search workers: processes that take trials from the study and train them while it has work.

A worker runs Optuna's ``study.optimize`` one trial at a time while the study has work (a queued
grid point, or a sampled search's budget), so a trial gets Optuna's bookkeeping: state, pruning,
heartbeat on an RDB storage. A command's workers are processes forked from it before it opens the
tracking store, or Ray tasks (``cluster``, with ``--ray``) running the same ``work``. Dead
workers: on an RDB storage Optuna's heartbeat fails a silent worker's trial and queues it again,
and a worker waits while others train, to take it back; on this machine the launcher sees a
worker end badly, fails its trial (``release_dead``) and trains what is left itself.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import TrialState

from fmnist.errors import FmnistError
from fmnist.liveness import process_id
from fmnist.search import study as studies
from fmnist.search.spec import SearchData, SearchSpec

POLL_SECONDS = 2.0  # how often a waiting worker looks at the other machines' trials
PARENT_WAIT_SECONDS = 60.0  # how long a worker waits for the parent run of the study's creator


@dataclass(frozen=True)
class Work:
    """What every worker gets (it pickles, for Ray); ``catch``: errors after which it goes on."""

    ref: studies.StudyRef
    spec: SearchSpec
    data: SearchData
    make_objective: Callable[[optuna.Study, str], Callable[[optuna.Trial], float]]
    on_stale: studies.StaleHook | None = None
    catch: tuple[type[Exception], ...] = ()


def worker_count(n_jobs: int, pending: int) -> int:
    """``n_jobs`` workers (0: one per usable CPU core), never more than the pending trials."""
    if n_jobs <= 0:
        n_jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return max(1, min(n_jobs, pending)) if pending else 0


def count_trials(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    return len(studies.counted(study.get_trials(deepcopy=False, states=states)))


def has_work(study: optuna.Study, spec: SearchSpec, deadline: float | None, now: float) -> bool:
    """A queued grid point, or a sampled search's budget and time left."""
    if spec.grid:
        return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    return (deadline is None or now < deadline) and pending_count(study, spec) > 0


def pending_count(study: optuna.Study, spec: SearchSpec) -> int:
    """Trials a command could start now: queued points, or a sampled search's budget left."""
    if spec.grid:
        return count_trials(study, (TrialState.WAITING,))
    if spec.n_trials is None:
        return 1 << 30
    trials = studies.counted(study.get_trials(deepcopy=False))
    used = sum(studies.trial_status(t) == "done" or t.state == TrialState.RUNNING for t in trials)
    return max(0, spec.n_trials - used)


def wait_for_parent(study, clock=time.monotonic, sleep=time.sleep, timeout=PARENT_WAIT_SECONDS):
    """The study's parent run once its creator recorded it; None if not in time or it is gone."""
    started = clock()
    while studies.PARENT_RUN not in (attrs := study.user_attrs):
        creator = attrs.get(studies.CREATOR, "")
        if clock() - started >= timeout or (creator and studies.is_gone(creator)):
            return None
        sleep(0.2)
    return attrs[studies.PARENT_RUN]


def work(
    job: Work, worker: int = 0, parent_run_id=None, clock=time.monotonic, sleep=time.sleep
) -> int:
    """Train trials while the study has work; return how many ran. With nothing left to start,
    a worker of an RDB storage waits while others train, to take back the trial of one that
    stops beating; on a journal it returns (the launcher watches its workers)."""
    spec = job.spec
    storage = studies.make_storage(job.ref.storage, job.on_stale)
    done = len(storage.get_all_trials(storage.get_study_id_from_name(job.ref.study_name)))
    study, _ = studies.open_study(
        job.ref, spec.sampler, spec.prune, worker_seed=7919 * worker + done, on_stale=job.on_stale
    )
    parent = parent_run_id or wait_for_parent(study, clock, sleep)
    if parent is None:
        why = "its creator did not record one"
        raise FmnistError(f"Study {job.ref.study_name} has no parent run: {why}.")
    objective = job.make_objective(study, parent)
    deadline = None if spec.timeout is None else clock() + spec.timeout
    ran = 0
    while True:
        studies.release_dead(study, job.on_stale)
        if has_work(study, spec, deadline, clock()):
            study.optimize(objective, n_trials=1, catch=job.catch)
            ran += 1
            continue
        beating = "://" in job.ref.storage  # an RDB storage: Optuna's heartbeat
        running = count_trials(study, (TrialState.RUNNING,))
        if not (beating and running) or (deadline is not None and clock() >= deadline):
            return ran
        with warnings.catch_warnings():  # fail_stale_trials is experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        sleep(min(POLL_SECONDS, studies.liveness().heartbeat))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """One worker, one thread: parallelism comes from processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def worker_main(job: Work, worker: int) -> None:
    """A forked worker, one torch thread; SIGTERM and Ctrl-C interrupt it, once."""
    signal.signal(signal.SIGTERM, interrupt_once)
    signal.signal(signal.SIGINT, interrupt_once)
    torch.set_num_threads(1)
    try:
        work(job, worker)
    except KeyboardInterrupt:
        sys.exit(130)


def interrupt_once(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


class LocalWorkers:
    """``n`` workers forked now (none for one: the caller trains itself); ``join`` waits for
    them, fails the trials of one that died (queued again) and trains what is left here."""

    def __init__(self, job: Work, n: int) -> None:
        self.job, self.n, self.processes, self.ids = job, n, [], [process_id()]
        # the first torch optimizer of a process imports torch's compiler stack (2 s on 2 cores):
        # built before the fork, it is imported once for every worker and the winner's export
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        if n > 1:
            context = multiprocessing.get_context("fork")
            for worker in range(n):
                name = f"search-worker-{worker}"
                process = context.Process(target=worker_main, args=(job, worker), name=name)
                process.start()
                self.processes.append(process)
                self.ids.append(process_id(process.pid))  # whose trials this command trained

    def join(self, parent_run_id: str) -> None:
        pending = list(self.processes)
        while pending:
            multiprocessing.connection.wait([p.sentinel for p in pending])
            for process in [p for p in pending if not p.is_alive()]:
                pending.remove(process)
                if process.exitcode:  # killed, crashed: its running trial is queued again
                    study, _ = studies.open_study(self.job.ref, self.job.spec.sampler, False)
                    studies.release_dead(study, self.job.on_stale)
        if self.n:
            with torch_threads(1):
                work(self.job, parent_run_id=parent_run_id)  # alone, or a dead worker's points

    def stop(self) -> None:
        """Pass a SIGTERM on (Ctrl-C reaches the whole group); give them time to record it."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(timeout=15)
            if process.is_alive():
                process.kill()
                process.join()
