"""Search workers: processes that take trials from the study and train them while it has work.

A worker runs Optuna's ``study.optimize`` one trial at a time while the study has work for it (a
queued grid point, or a sampled search's budget), so a trial gets Optuna's own bookkeeping: its
state, its pruning, its heartbeat on an RDB storage. Several workers of one command are processes
forked from it, as torch's DataLoader forks its workers, before it opens the tracking store: each
starts at once with the data and the imports in memory and opens its own store and storage (a
Ray task runs the same ``work``). Dead workers: on an RDB storage, Optuna's heartbeat fails a
silent worker's trial and queues it again, and a worker waits while other machines train, to take
such a trial back; on this machine, the launcher sees a worker process end badly, fails its trial
(``release_dead``) and trains what is left itself.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
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

Objective = Callable[[optuna.Trial], float]
POLL_SECONDS = 2.0  # how often a waiting worker looks at the other machines' trials
PARENT_WAIT_SECONDS = 60.0  # how long a worker waits for the parent run of the study's creator


@dataclass(frozen=True)
class Work:
    """What every worker of a search gets (it pickles, for a Ray task): where the study is, the
    search, the data, and ``make_objective(study, parent_run_id)``, which builds the function
    that trains one trial; ``catch`` are the errors after which a worker goes on."""

    ref: studies.StudyRef
    spec: SearchSpec
    data: SearchData
    make_objective: Callable[[optuna.Study, str], Objective]
    on_stale: studies.StaleHook | None = None
    catch: tuple[type[Exception], ...] = ()


def worker_count(n_jobs: int, pending: int) -> int:
    """``n_jobs`` processes (0: one per usable CPU core), never more than the pending trials."""
    if n_jobs <= 0:
        n_jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return max(1, min(n_jobs, pending)) if pending else 0


def count_trials(study: optuna.Study, states: tuple[TrialState, ...]) -> int:
    return len(studies.counted(study.get_trials(deepcopy=False, states=states)))


def has_work(study: optuna.Study, spec: SearchSpec, deadline: float | None, now: float) -> bool:
    """A queued grid point; or a sampled search's budget: trials done or running below
    ``n_trials``, and time before ``deadline``."""
    if spec.grid:
        return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
    if deadline is not None and now >= deadline:
        return False
    return pending_count(study, spec) > 0


def pending_count(study: optuna.Study, spec: SearchSpec) -> int:
    """How many trials a command could start now: queued points, or what is left of a sampled
    search's budget (trials done or running count; queued ones are handed out first)."""
    if spec.grid:
        return count_trials(study, (TrialState.WAITING,))
    if spec.n_trials is None:
        return 1 << 30
    used = [
        t
        for t in studies.counted(study.get_trials(deepcopy=False))
        if studies.trial_status(t) == "done" or t.state == TrialState.RUNNING
    ]
    return max(0, spec.n_trials - len(used))


def wait_for_parent(
    study: optuna.Study, clock=time.monotonic, sleep=time.sleep, timeout=PARENT_WAIT_SECONDS
) -> str | None:
    """The study's parent run, once its creator has recorded it; None when it did not in time
    or is gone from this machine without it (the caller then makes one)."""
    started = clock()
    while studies.PARENT_RUN not in (attrs := study.user_attrs):
        creator = attrs.get(studies.CREATOR, "")
        if clock() - started >= timeout or (creator and studies.is_gone(creator)):
            return None
        sleep(0.2)
    return attrs[studies.PARENT_RUN]


def work(
    job: Work,
    worker: int = 0,
    parent_run_id: str | None = None,
    clock=time.monotonic,
    sleep=time.sleep,
) -> int:
    """Train trials while the study has work for this worker; return how many it ran.

    With nothing left to start, a worker of an RDB storage waits while other workers train: one
    that stops beating has its trial failed by Optuna after the grace period and queued again,
    and this worker trains it. On a journal (one machine) it returns: the launcher watches its
    own workers."""
    spec = job.spec
    storage = studies.make_storage(job.ref.storage, job.on_stale)
    done = len(storage.get_all_trials(storage.get_study_id_from_name(job.ref.study_name)))
    study, _ = studies.open_study(
        job.ref, spec.sampler, spec.prune, worker_seed=7919 * worker + done, on_stale=job.on_stale
    )
    parent = parent_run_id or wait_for_parent(study, clock, sleep)
    if parent is None:
        raise FmnistError(
            f"Study {job.ref.study_name} has no parent run: its creator did not record one."
        )
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
        studies.fail_stale(study)
        sleep(min(POLL_SECONDS, studies.liveness().heartbeat))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """One worker, one thread: parallelism comes from processes, not from intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def worker_main(job: Work, worker: int) -> None:
    """A forked worker: one torch thread; SIGTERM (the launcher stopping it) and Ctrl-C are an
    interruption, once (a second signal must not break the cleanup that records it)."""
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
        # Every trial builds a torch optimizer, and the first one of a process imports torch's
        # compiler stack (2 s on 2 cores): built here, before the fork, it is imported once
        # for all the workers and for the winner's export.
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
        if n > 1:
            context = multiprocessing.get_context("fork")
            for worker in range(n):
                process = context.Process(
                    target=worker_main, args=(job, worker), name=f"search-worker-{worker}"
                )
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
        """Ctrl-C reaches every worker (same process group), a SIGTERM only this process:
        pass it on, then give them time to record the interruption."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            process.join(timeout=15)
            if process.is_alive():
                process.kill()
                process.join()
