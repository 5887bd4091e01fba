"""Search workers: processes that claim trials from the study and train them until none is left.

Workers are processes with one torch thread each: the calling process when it is the only one,
else processes that fork from a fork server (``launcher``) started early (it imports torch,
Optuna and MLflow while the caller imports and loads data) while the caller waits. They get the
data as plain numpy arrays, and train each claim with the ``runner`` the driver passes (a
picklable ``runner(study, trials, spec, data)``; ``on_released`` ends a dead worker's run), so
this module knows nothing of MLflow. A worker stays until no other worker trains a point, to
take back one whose worker dies. Ctrl-C reaches every worker; each records its interruption
once.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial

from fmnist.data import Split
from fmnist.search.launcher import start_worker_launcher, worker_context
from fmnist.search.points import claim_group, others_training, take_back
from fmnist.search.spec import SearchData, SearchSpec
from fmnist.search.study import StudyRef, liveness, open_study

# Trains the trials one claim returned (several when their points can train in lockstep).
TrialRunner = Callable[[optuna.Study, list[optuna.Trial], SearchSpec, SearchData], None]
# Called with the trials of dead workers this worker released (the driver ends their runs).
ReleaseHook = Callable[[Sequence[FrozenTrial]], None]
WAIT_POLL_SECONDS = 2.0  # how often a worker with nothing to claim looks at the others' trials


def worker_count(n_jobs: int, pending: int) -> int:
    """``n_jobs`` processes (0: one per usable CPU core), never more than the pending points."""
    if n_jobs <= 0:
        n_jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return max(1, min(n_jobs, pending)) if pending else 0


def work(
    runner: TrialRunner,
    spec: SearchSpec,
    ref: StudyRef,
    data: SearchData,
    worker: int = 0,
    on_released: ReleaseHook | None = None,
    group_limit: int = 1,
    wake: Any = None,
) -> int:
    """Claim and train trials until none is left and no other worker trains one; return how
    many it trained. A claim takes up to ``group_limit`` points that train in lockstep.
    ``wake`` (an Event shared by the workers of one machine) is set when this worker ends a
    claim or stops, so that one waiting for it looks again at once instead of at its next poll.

    While others train, this worker polls: a trial whose worker stops beating for the grace
    period (a machine that died) is released, handed to ``on_released`` (which ends its MLflow
    run) and its point queued again, and this worker trains it.
    """
    study, _ = open_study(ref, spec.sampler, spec.prune)
    started = time.monotonic()
    trained = 0
    waiting = False
    while True:
        released = take_back(study, spec)
        if released and on_released is not None:
            on_released(released)
        trials = claim_group(study, spec, started, group_limit)
        if trials:
            try:
                runner(study, trials, spec, data)
            finally:
                signal_others(wake)
            trained += len(trials)
            waiting = False
            continue
        held = others_training(study, spec, started)
        if not held:
            signal_others(wake)
            return trained
        if not waiting and not spec.quiet and worker == 0:
            print(
                f"Waiting for {held} trial(s) other workers are training: one whose worker "
                f"stops beating for {liveness().grace} s is taken back here.",
                file=sys.stderr,
                flush=True,
            )
        waiting = True
        pause(wake, min(WAIT_POLL_SECONDS, liveness().heartbeat))


def signal_others(wake: Any) -> None:
    if wake is not None:
        wake.set()


def pause(wake: Any, seconds: float) -> None:
    """Wait ``seconds``, or less when a worker of this machine ends a claim: the others' last
    trial ending would otherwise leave this worker (and the command) idle until its next poll,
    up to two seconds (measured at the end of the dense grid)."""
    if wake is None:
        time.sleep(seconds)
        return
    wake.wait(seconds)
    wake.clear()  # a wake-up set after the wait returned is seen by the check that follows


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """One worker, one thread: parallelism comes from processes, not from intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def pack(data: SearchData) -> dict[str, Any]:
    """Plain numpy arrays for a spawned worker (no shared-memory tensor handles)."""
    return {
        "train": (data.train.images.numpy(), data.train.labels.numpy()),
        "val": (data.val.images.numpy(), data.val.labels.numpy()),
        "context": data.context,
    }


def unpack(payload: Mapping[str, Any]) -> SearchData:
    def split(arrays):
        return Split(torch.from_numpy(arrays[0]), torch.from_numpy(arrays[1]))

    return SearchData(split(payload["train"]), split(payload["val"]), payload["context"])


def worker_main(
    runner: TrialRunner,
    spec: SearchSpec,
    ref: StudyRef,
    payload: Mapping[str, Any],
    env: Mapping[str, str],
    worker: int,
    on_released: ReleaseHook | None = None,
    group_limit: int = 1,
    wake: Any = None,
) -> None:
    """Entry point of a spawned worker process."""
    signal.signal(signal.SIGTERM, interrupt_once)
    signal.signal(signal.SIGINT, interrupt_once)
    torch.set_num_threads(1)
    os.environ.update(env)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        work(runner, spec, ref, unpack(payload), worker, on_released, group_limit, wake)
    except KeyboardInterrupt:
        sys.exit(130)


def interrupt_once(signum, frame) -> None:
    """A worker's first SIGINT/SIGTERM interrupts its training; later ones (Ctrl-C reaches the
    whole group, then the coordinator forwards SIGTERM) must not break the cleanup that records
    the interruption."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


def run_workers(
    runner: TrialRunner,
    spec: SearchSpec,
    ref: StudyRef,
    data: SearchData,
    n_workers: int,
    env: Mapping[str, str],
    on_released: ReleaseHook | None = None,
    group_limit: int = 1,
) -> list[tuple[int, int]]:
    """Train queued points with ``n_workers`` processes, each claiming up to ``group_limit``
    lockstep points at a time; their pids and exit codes. One worker is this process; several
    fork from the launcher (getting ``env``) while this one waits: it would otherwise import
    what they have preloaded (torch.optim's first optimizer imports torch._dynamo, about 1.5 s
    on the dense grid's critical path)."""
    if n_workers <= 1:
        with torch_threads(1):
            work(runner, spec, ref, data, 0, on_released, group_limit)
        return []
    start_worker_launcher()  # a no-op when the caller started it early, as it should
    context = worker_context()
    payload, wake, processes = pack(data), context.Event(), []
    try:
        for worker in range(n_workers):
            args = (runner, spec, ref, payload, dict(env), worker, on_released, group_limit, wake)
            process = context.Process(
                target=worker_main, args=args, daemon=True, name=f"search-worker-{worker}"
            )
            process.start()
            processes.append(process)
        for process in processes:
            process.join()
    except BaseException:
        # Ctrl-C reaches the workers too (same process group), a SIGTERM only this process:
        # pass it on, then give them time to record the interruption.
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=15)
            if process.is_alive():
                process.kill()
        raise
    return [(process.pid, process.exitcode) for process in processes]
