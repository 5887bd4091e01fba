"""Hyperparameter searches on Optuna, tracked in MLflow: one module for every model family.

A search is a ``SearchSpec``: the sampler and the space (how a trial becomes a params dict, how
params become a model to train, a point's name and its table row) are parameters, so the dense
network's grid (``GridSampler``) and the CNN's TPE search share this code. The study lives in an
Optuna storage (by default a journal file next to the tracking store, safe for several
processes); one MLflow parent run per study, recorded in the study, holds a nested child run per
trial with per-epoch metrics (``step=epoch``) and the trial's best-epoch weights as artifacts, so
the winner is registered without retraining.

Grids go through Optuna's trial queue instead of ``GridSampler``'s own pick, which can hand one
point to two workers: each missing point is enqueued with its name fixed when the trial is
created, a worker pops queued trials (an atomic WAITING -> RUNNING change in every Optuna
storage), and a worker that pops a point another trial already holds (two processes queued it)
gives its trial up. A point is done when a trial for it completed, was pruned, or failed for a
final reason (a diverged loss); an interrupted one (Ctrl-C, a vanished worker process) is queued
again by the next run (another machine's worker is declared gone when its trial's heartbeat
stops). Re-running a command therefore trains only what is missing, and a finished search trains
nothing. Workers are processes with one torch thread each, the coordinator being the first of
them; independent commands on several machines can share a study too: the study's creator makes
the parent run, and the worker that finds the grid done and wins an atomic lock (the creation of
a ``<study>:finalize`` study) logs the table and finalizes, once.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import multiprocessing
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import optuna
import torch
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState
from torch import nn

from fmnist import engine
from fmnist.data import Split
from fmnist.errors import FmnistError, TrainingDiverged

# Trial user attributes.
POINT = "point"  # the grid point's name, fixed when the point is queued
FAIL_REASON = "fail_reason"
FINAL = "final"  # a failure re-running would repeat (a diverged loss): its point is done
SKIPPED = "skipped"  # a duplicate given up when claimed; never counts for its point
WORKER = "worker"  # host:pid:start of the process that runs the trial
HEARTBEAT = "heartbeat"  # wall-clock seconds, refreshed while the trial trains
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0  # another machine's trial without a heartbeat this long is dead
RUN_ID = "mlflow_run_id"
# Study user attributes.
PARENT_RUN = "mlflow_parent_run_id"
CREATOR = "creator"  # the worker that created the study, and so makes its parent run
FINALIZED = "registered_model_uri"
# A sampled search's last finalization: {"trials": done trials then, "model_uri": ... or None}.
FINALIZED_ROUND = "finalized_round"
# The study whose creation (atomic in every Optuna storage) elects the one finalizing worker.
FINALIZE_LOCK_SUFFIX = ":finalize"
PARENT_WAIT_SECONDS = 60.0  # how long a worker waits for the study creator's parent run

EPOCH_METRICS = (
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "epoch_seconds",
    "images_per_second",
)
JOURNAL_FILE = "optuna-journal.log"
CHECKPOINT_DIR = "checkpoint"  # child-run artifacts: best-epoch state dict and model spec
SPEC_FILE = "model_spec.json"
STATE_FILE = "state_dict.pt"
HISTORY_FILE = "history.json"
SUMMARY_DIR = "search"


class SearchIncomplete(FmnistError):
    """Some points were not trained (a worker failed or was interrupted); re-running resumes."""


@dataclass(frozen=True)
class Built:
    """One trial's model: what is logged, what the engine trains, how to rebuild it, fit args."""

    model: nn.Module  # raw (N, 28, 28) images in, logits out: the weights that are logged
    trainable: nn.Module  # the module ``engine.fit`` trains (the model, or its head on features)
    spec: dict[str, Any]  # rebuilds ``model``'s architecture through fmnist.models.build_model
    fit_kwargs: dict[str, Any]  # optimizer, lr, batch_size, ... for engine.fit


class SearchSpace(Protocol):
    """The family-specific half of a search; instances must pickle (workers are processes)."""

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Turn a trial into a plain params dict (the only place a trial's values are read)."""

    def point_name(self, params: Mapping[str, Any]) -> str:
        """A readable, unique name for the point, used as the child run's name."""

    def build(self, params: Mapping[str, Any], context: Any) -> Built:
        """The objective's model builder: params (and the data's context) to a model to fit."""

    def table_row(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The point's leading columns in the search table (the study's values included)."""


@dataclass(frozen=True)
class SearchData:
    """What every trial trains and validates on, and the context ``build`` needs."""

    train: Split
    val: Split
    context: Any = None


@dataclass(frozen=True)
class SearchSpec:
    """A whole search: the space, the sampler, the budget and the training settings."""

    family: str
    entry_point: str
    space: SearchSpace
    sampler: Callable[[int], optuna.samplers.BaseSampler]  # worker index -> sampler
    grid: tuple[dict[str, Any], ...] = ()  # every point of an exhaustive search, in table order
    # A point's relative cost: costlier points are queued first so parallel workers end together.
    cost: Callable[[Mapping[str, Any]], float] | None = None
    n_trials: int | None = None  # budget of a sampled search (ignored for a grid)
    timeout: float | None = None  # seconds, for a sampled search
    # Points a sampled search trains first (a known-good recipe), queued by the study's creator.
    first: tuple[dict[str, Any], ...] = ()
    epochs: int = 10
    seed: int = 0
    prune: bool = False
    device: str = "cpu"
    quiet: bool = True


@dataclass(frozen=True)
class StudyRef:
    """Where a study lives: an Optuna storage URL or a journal file path, and its name."""

    storage: str
    study_name: str


@dataclass
class SearchSummary:
    """The study as a table, its best trial, and whether every point is done."""

    rows: list[dict[str, Any]]
    best: FrozenTrial | None
    complete: bool
    missing: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)


class QueueGridSampler(optuna.samplers.GridSampler):
    """A ``GridSampler`` whose points arrive through the trial queue.

    ``GridSampler.after_trial`` calls ``study.stop()``, which raises outside ``study.optimize``
    and would fail the ask-and-tell loop of a worker; here the worker loop ends the search when
    the queue is empty.
    """

    def after_trial(self, study, trial, state, values) -> None:
        return None


def grid_sampler(search_space: Mapping[str, Sequence[Any]], seed: int = 0) -> QueueGridSampler:
    return QueueGridSampler({k: list(v) for k, v in search_space.items()}, seed=seed)


class TrialSeededTPESampler(optuna.samplers.TPESampler):
    """A ``TPESampler`` whose random state is derived from (seed, trial number) before each trial.

    Seeded once, a sampler repeats its draws in every process that opens the study: a resumed
    search, or a second worker, would train the first random points again. Reseeding per trial
    makes every trial's draw distinct and reproducible given the trials before it.
    """

    def __init__(self, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(seed=seed, **kwargs)
        self._base_seed = int(seed)

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        seed = (self._base_seed * 1_000_003 + trial.number) % 2**32
        # private in Optuna 5: TPE's own state and its startup RandomSampler's
        self._rng.rng.seed(seed)
        self._random_sampler._rng.rng.seed(seed + 1)
        super().before_trial(study, trial)


def tpe_sampler(seed: int = 0, n_startup_trials: int = 10) -> TrialSeededTPESampler:
    """A seeded TPE sampler for a sampled search (constant liar: parallel workers spread out)."""
    return TrialSeededTPESampler(seed=seed, n_startup_trials=n_startup_trials, constant_liar=True)


# --- storage and study -----------------------------------------------------------------------


def default_storage(tracking_uri: str) -> str:
    """A journal file next to the tracking store (its folder), else in the working directory."""
    folder = Path.cwd()
    if tracking_uri.startswith("sqlite:///"):
        folder = Path(tracking_uri.removeprefix("sqlite:///")).parent
    elif tracking_uri.startswith("file://"):
        folder = Path(tracking_uri.removeprefix("file://")).parent
    elif "://" not in tracking_uri and tracking_uri:
        folder = Path(tracking_uri).parent
    return str((folder / JOURNAL_FILE).resolve())


def resolve_storage(storage: str, tracking_uri: str) -> str:
    """``--storage``: an Optuna URL as given, a file path as an absolute journal path."""
    if not storage:
        return default_storage(tracking_uri)
    if "://" in storage:
        return storage
    return str(Path(storage).expanduser().resolve())


@contextmanager
def machine_lock(key: str) -> Iterator[None]:
    """An exclusive lock shared by this machine's processes (a file lock named after ``key``).

    Several workers started at once on a fresh store would otherwise all create its tables.
    """
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / f"fmnist-store-{digest}.lock"
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sqlalchemy_url(url: str) -> str:
    """``postgresql://`` means psycopg2 to SQLAlchemy; the project installs psycopg (3)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            try:
                import psycopg2  # noqa: F401
            except ImportError:
                return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


def rdb_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage; workers on other machines creating its tables at the same moment make
    one of them fail with a duplicate-table error, so that is retried (a few times)."""
    import sqlalchemy.exc

    from fmnist.tracking import redact_uri

    url = sqlalchemy_url(url)
    for attempt in range(5):
        try:
            with machine_lock(url):
                return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())
        except (sqlalchemy.exc.OperationalError, ImportError) as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc)
            raise FmnistError(
                f"Cannot open the Optuna storage {redact_uri(url)}: {first_line}"
            ) from None
    raise AssertionError("unreachable")


def make_storage(location: str) -> optuna.storages.BaseStorage:
    """An Optuna URL is an RDB storage; anything else is a journal file (made if missing)."""
    if "://" in location:
        return rdb_storage(location)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(location).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(location))


def derive_study_name(prefix: str, identity: Mapping[str, Any]) -> str:
    """``prefix-<hash>``: the hash covers every setting that changes what a trial computes."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return f"{prefix}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def make_pruner(prune: bool) -> optuna.pruners.BasePruner:
    if prune:
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    return optuna.pruners.NopPruner()


def open_study(
    ref: StudyRef, sampler: optuna.samplers.BaseSampler, prune: bool, create: bool = False
) -> tuple[optuna.Study, bool]:
    """Load the study, creating it first when ``create``; returns (study, created here)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(ref.storage)
    pruner = make_pruner(prune)
    if create:
        try:
            study = optuna.create_study(
                storage=storage,
                study_name=ref.study_name,
                sampler=sampler,
                pruner=pruner,
                direction="maximize",
            )
            return study, True
        except optuna.exceptions.DuplicatedStudyError:
            pass
    try:
        study = optuna.load_study(
            study_name=ref.study_name, storage=storage, sampler=sampler, pruner=pruner
        )
    except KeyError:
        raise FmnistError(
            f"No study {ref.study_name!r} in {redact_storage(ref.storage)}: run the search first."
        ) from None
    return study, False


def wait_for_parent(study: optuna.Study, timeout: float = PARENT_WAIT_SECONDS) -> bool:
    """Wait until the worker that created the study has recorded its parent run.

    Workers started together all find the study new; only its creator makes the parent run, so
    the others join it instead of making their own. False when none appeared in time or the
    creator (on this machine) is gone without making it: then this worker makes it.
    """
    started = time.monotonic()
    while PARENT_RUN not in (attrs := study.user_attrs):
        waited = time.monotonic() - started
        creator = attrs.get(CREATOR, "")
        if waited >= timeout or (creator and worker_gone(creator)):
            return False
        if not creator and waited >= 5:  # the creator records itself right after creating
            return False
        time.sleep(0.5)
    return True


def claim_finalization(ref: StudyRef, force: bool = False, round_name: str = "") -> bool:
    """Elect this worker to log Table I and register the winner: True for exactly one caller.

    The claim is the creation of a lock study, atomic in the journal (one log, replayed in
    order) and in RDB storages (a unique study name). A lock whose holder died on this machine
    is taken over; ``force`` (``--finalize``) takes over any lock. A sampled search finalizes
    once per ``round_name`` (its number of done trials), so a resumed search that trained more
    trials logs its summary (and retrains) again.
    """
    storage = make_storage(ref.storage)
    name = ref.study_name + FINALIZE_LOCK_SUFFIX + round_name
    for _ in range(2):
        try:
            lock_id = storage.create_new_study([StudyDirection.MAXIMIZE], name)
        except optuna.exceptions.DuplicatedStudyError:
            if not take_over_lock(storage, name, force):
                return False
            continue
        storage.set_study_user_attr(lock_id, WORKER, worker_id())
        return True
    return False


def take_over_lock(storage: optuna.storages.BaseStorage, name: str, force: bool) -> bool:
    """Delete the lock study when its holder is gone (or ``force``); True to claim again."""
    try:
        lock_id = storage.get_study_id_from_name(name)
        holder = storage.get_study_user_attrs(lock_id).get(WORKER, "")
        if not force and not (holder and worker_gone(holder)):
            return False
        # deleting by id: a lock another worker re-created meanwhile has a new id and survives
        storage.delete_study(lock_id)
    except KeyError:
        pass  # another worker removed it first; the creation race decides
    return True


# --- point bookkeeping -----------------------------------------------------------------------


def trial_status(trial: FrozenTrial) -> str:
    """``done``, ``held`` (queued or running) or ``missing`` (interrupted: train it again)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return "done"
    if trial.state == TrialState.FAIL and trial.user_attrs.get(FINAL):
        return "done"
    if trial.state in (TrialState.RUNNING, TrialState.WAITING):
        return "held"
    return "missing"


STATUS_RANK = {"missing": 0, "held": 1, "done": 2}


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


def queue_missing_points(study: optuna.Study, spec: SearchSpec) -> list[str]:
    """Enqueue every grid point no trial has done or holds; return their names."""
    names = [spec.space.point_name(params) for params in spec.grid]
    statuses = point_statuses(study.get_trials(deepcopy=False), names)
    order = list(zip(names, spec.grid, strict=True))
    if spec.cost is not None:
        order.sort(key=lambda item: -spec.cost(item[1]))
    queued = []
    for name, params in order:
        if statuses[name] == "missing":
            study.enqueue_trial(dict(params), user_attrs={POINT: name})
            queued.append(name)
    return queued


def queue_first_points(study: optuna.Study, spec: SearchSpec) -> list[str]:
    """Enqueue each of a sampled search's ``first`` points no trial has done or holds."""
    names = [spec.space.point_name(params) for params in spec.first]
    statuses = point_statuses(study.get_trials(deepcopy=False), names)
    queued = []
    for name, params in zip(names, spec.first, strict=True):
        if statuses[name] == "missing":
            study.enqueue_trial(dict(params), user_attrs={POINT: name})
            queued.append(name)
    return queued


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def worker_id() -> str:
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{process_start(pid)}"


def worker_gone(worker: str) -> bool:
    """True when ``worker`` ran on this machine and its process no longer exists."""
    host, _, rest = worker.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another machine's worker: its heartbeat decides (release_stale_trials)
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return bool(start) and process_start(pid) not in ("", start)


def release_stale_trials(study: optuna.Study, now: float | None = None) -> list[int]:
    """Fail RUNNING trials whose worker is gone: a process of this machine that no longer
    exists, or another machine's worker whose heartbeat stopped ``STALE_AFTER_SECONDS`` ago."""
    now = time.time() if now is None else now
    released = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER)
        beat = trial.user_attrs.get(HEARTBEAT)
        silent = beat is not None and now - float(beat) > STALE_AFTER_SECONDS
        if worker and (worker_gone(worker) or silent):
            study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
            released.append(trial.number)
    return released


@contextmanager
def heartbeat(trial: optuna.Trial) -> Iterator[None]:
    """Refresh the trial's heartbeat from a thread while it trains, so workers on other machines
    can tell a long epoch from a dead worker (``release_stale_trials``)."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                trial.set_user_attr(HEARTBEAT, time.time())
            except Exception:  # noqa: BLE001 - a missed beat must never fail the training
                pass
            if stop.wait(HEARTBEAT_SECONDS):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


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


def claim(study: optuna.Study, spec: SearchSpec, started: float) -> optuna.Trial | None:
    """The next trial this worker trains, or None when nothing is left for it."""
    while True:
        if not spec.grid:
            if not budget_left(study, spec, started):
                return None
            trial = study.ask()
            trial.set_user_attr(WORKER, worker_id())
            return trial
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return None
        trial = study.ask()  # pops the oldest queued trial
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


# --- one trial -------------------------------------------------------------------------------


def run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    spec: SearchSpec,
    data: SearchData,
    parent_run_id: str,
) -> None:
    """Train one point in a child run and tell the study how it ended.

    A diverged loss fails the trial for good (re-running would diverge again) and the search goes
    on; an interruption or any other error fails it for a retry and propagates.
    """
    from fmnist import tracking

    started = time.perf_counter()
    run_id = None
    name = trial.user_attrs.get(POINT) or f"trial-{trial.number}"
    try:
        params = spec.space.suggest(trial)
        name = trial.user_attrs.get(POINT) or spec.space.point_name(params)
        with tracking.start_run(
            spec.entry_point,
            spec.family,
            run_name=name,
            parent_run_id=parent_run_id,
            tags={
                "optuna_study": study.study_name,
                "optuna_trial": str(trial.number),
                "optuna_state": "RUNNING",
                "search_point": name,
            },
        ) as run:
            run_id = run.info.run_id
            trial.set_user_attr(RUN_ID, run_id)
            with heartbeat(trial):
                result = train_in_run(trial, spec, data, params)
    except TrainingDiverged as exc:
        finish_failed(study, trial, run_id, f"diverged: {exc}", final=True)
        report(spec, f"trial {trial.number} {name}: failed for good ({exc})")
        return
    except KeyboardInterrupt:
        finish_failed(study, trial, run_id, "interrupted", final=False)
        raise
    except BaseException as exc:
        finish_failed(study, trial, run_id, f"{type(exc).__name__}: {exc}", final=False)
        raise
    seconds = time.perf_counter() - started
    trial.set_user_attr("seconds", round(seconds, 3))
    if result is None:
        study.tell(trial, state=TrialState.PRUNED)
        report(spec, f"trial {trial.number} {name}: pruned after {seconds:.1f} s")
        return
    trial.set_user_attr("best_epoch", result.best_epoch)
    study.tell(trial, result.best_val_accuracy)
    report(
        spec,
        f"trial {trial.number} {name}: val_accuracy {result.best_val_accuracy:.4f} "
        f"(epoch {result.best_epoch}) in {seconds:.1f} s",
    )


def train_in_run(
    trial: optuna.Trial, spec: SearchSpec, data: SearchData, params: Mapping[str, Any]
) -> engine.FitResult | None:
    """Fit the point inside its active child run; None when the pruner stopped it."""
    import mlflow

    from fmnist import tracking
    from fmnist.utils import seed_everything

    # The initial weights depend on the seed alone, not on what this process trained before.
    seed_everything(spec.seed)
    built = spec.space.build(params, data.context)
    tracking.log_params_safe(
        {
            **params,
            # an augment function or an unset option is no param
            **{k: v for k, v in built.fit_kwargs.items() if v is not None and not callable(v)},
            **{f"model.{k}": v for k, v in built.spec.items()},
            "epochs": spec.epochs,
            "seed": spec.seed,
            "trial_number": trial.number,
        }
    )

    log_epoch = tracking.EpochLogger()

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        log_epoch(epoch, {k: metrics[k] for k in EPOCH_METRICS if k in metrics})
        trial.report(metrics["val_accuracy"], epoch)
        if spec.prune and trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")

    cpu_started = time.process_time()
    try:
        result = engine.fit(
            built.trainable,
            data.train,
            data.val,
            epochs=spec.epochs,
            seed=spec.seed,
            device=spec.device,
            quiet=spec.quiet,
            on_epoch_end=on_epoch_end,
            **built.fit_kwargs,
        )
    except optuna.TrialPruned:
        log_epoch.flush()
        mlflow.set_tag("optuna_state", "PRUNED")  # MLflow has no pruned status: FINISHED + tag
        return None
    except BaseException:
        log_epoch.flush_quietly()  # the epochs trained so far stay with the failed run
        raise
    log_epoch.flush()
    mlflow.log_metrics(
        {
            "best_val_accuracy": result.best_val_accuracy,
            "best_epoch": result.best_epoch,
            "fit_seconds": result.seconds,
            # CPU time, unlike wall time, does not grow when other processes share the cores
            "fit_cpu_seconds": time.process_time() - cpu_started,
        }
    )
    log_checkpoint(built, result.history)
    mlflow.set_tag("optuna_state", "COMPLETE")
    return result


def log_checkpoint(built: Built, history: list[dict[str, float]]) -> None:
    """The best epoch's weights (already in ``built.model``), its spec and the history."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        state = {k: v.detach().cpu().clone() for k, v in built.model.state_dict().items()}
        torch.save(state, folder / STATE_FILE)
        (folder / SPEC_FILE).write_text(json.dumps(built.spec, indent=2, sort_keys=True))
        mlflow.log_artifacts(tmp, CHECKPOINT_DIR)
    mlflow.log_dict({"history": history}, HISTORY_FILE)


def finish_failed(
    study: optuna.Study, trial: optuna.Trial, run_id: str | None, reason: str, final: bool
) -> None:
    trial.set_user_attr(FAIL_REASON, reason[:2000])
    trial.set_user_attr(FINAL, final)
    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    if run_id:
        import mlflow

        mlflow.MlflowClient().set_tag(run_id, "optuna_state", "FAIL")


def report(spec: SearchSpec, line: str) -> None:
    if not spec.quiet:
        print(line, flush=True)


# --- workers ---------------------------------------------------------------------------------


def work(
    spec: SearchSpec, ref: StudyRef, data: SearchData, parent_run_id: str, worker: int = 0
) -> int:
    """Claim and train trials until none is left for this worker; return how many it trained."""
    study, _ = open_study(ref, spec.sampler(worker), spec.prune)
    started = time.monotonic()
    trained = 0
    while (trial := claim(study, spec, started)) is not None:
        run_trial(study, trial, spec, data, parent_run_id)
        trained += 1
    return trained


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
    spec: SearchSpec,
    ref: StudyRef,
    payload: Mapping[str, Any],
    parent_run_id: str,
    tracking_uri: str,
    worker: int,
) -> None:
    """Entry point of a spawned worker process."""
    signal.signal(signal.SIGTERM, interrupt_once)
    signal.signal(signal.SIGINT, interrupt_once)
    torch.set_num_threads(1)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        work(spec, ref, unpack(payload), parent_run_id, worker)
    except KeyboardInterrupt:
        sys.exit(130)


def interrupt_once(signum, frame) -> None:
    """A worker's first SIGINT/SIGTERM interrupts its training; later ones (Ctrl-C reaches the
    whole group, then the coordinator forwards SIGTERM) must not break the cleanup that records
    the interruption."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt(f"signal {signum}")


# Imported once by the fork server that launches workers, so a worker starts in milliseconds.
WORKER_PRELOAD = ["fmnist.search", "mlflow", "mlflow.store.tracking.sqlalchemy_store"]


def worker_context():
    """Workers fork from a fork server (a clean process that never opened a store or a thread
    pool), or are spawned where there is none."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


def start_worker_launcher() -> None:
    """Start the fork server now: it imports torch, Optuna and MLflow while the caller loads
    data, instead of every worker importing them when the training starts."""
    context = worker_context()
    if context.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        context.set_forkserver_preload(WORKER_PRELOAD)
        forkserver.ensure_running()


def run_workers(
    spec: SearchSpec, ref: StudyRef, data: SearchData, parent_run_id: str, n_workers: int
) -> list[tuple[int, int]]:
    """Train queued points with ``n_workers`` processes (this one included); the others' pids
    and exit codes."""
    from fmnist.tracking import tracking_uri

    processes = []
    if n_workers > 1:
        start_worker_launcher()  # a no-op when the caller started it early, as it should
        context = worker_context()
        payload = pack(data)
        for worker in range(1, n_workers):
            process = context.Process(
                target=worker_main,
                args=(spec, ref, payload, parent_run_id, tracking_uri(), worker),
                daemon=True,
                name=f"search-worker-{worker}",
            )
            process.start()
            processes.append(process)
    try:
        with torch_threads(1):
            work(spec, ref, data, parent_run_id, 0)
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


def trained_here(study: optuna.Study, pids: Sequence[int], since: datetime.datetime) -> list[str]:
    """The points this process and its workers (``pids``) trained to the end since ``since``
    (other workers share the study; an earlier call in this process had the same pid)."""
    prefixes = tuple(f"{socket.gethostname()}:{pid}:" for pid in (os.getpid(), *pids))
    return [
        t.user_attrs.get(POINT) or f"trial-{t.number}"
        for t in study.get_trials(deepcopy=False)
        if str(t.user_attrs.get(WORKER, "")).startswith(prefixes)
        and t.datetime_start is not None
        and t.datetime_start >= since
        and not t.user_attrs.get(SKIPPED)
        and trial_status(t) == "done"
    ]


# --- the parent run and the summary ----------------------------------------------------------


def run_exists(run_id: str) -> bool:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


@contextmanager
def parent_run(
    study: optuna.Study,
    spec: SearchSpec,
    experiment_name: str,
    run_name: str,
    outer_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """The study's one parent run: the recorded one when resuming, else a new one (recorded).

    Under ``mlflow run`` a resumed search's new run is linked to the recorded parent by a tag,
    and the trials keep going to the parent.
    """
    from fmnist import tracking

    all_tags = {"entry_point": spec.entry_point, "model_family": spec.family, **(tags or {})}
    recorded = study.user_attrs.get(PARENT_RUN)
    own = os.environ.get("MLFLOW_RUN_ID")
    if recorded and recorded != own and run_exists(recorded):
        if own and outer_run_id is None:
            import mlflow

            mlflow.MlflowClient().set_tag(own, "search_parent_run_id", recorded)
        with tracking.reopen_run(recorded, all_tags) as run:
            yield run
        return
    with tracking.start_run(
        spec.entry_point,
        spec.family,
        experiment_name,
        run_name=run_name,
        parent_run_id=outer_run_id,
        tags=all_tags,
    ) as run:
        study.set_user_attr(PARENT_RUN, run.info.run_id)
        yield run


def summarize(study: optuna.Study, spec: SearchSpec) -> SearchSummary:
    """One row per point (the trial that decided it), the best trial, what is left."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(SKIPPED)]
    if spec.grid:
        names = [spec.space.point_name(p) for p in spec.grid]
        statuses = point_statuses(trials, names)
        deciding = {}
        for trial in trials:  # later trials of a point replace earlier, unfinished ones
            name = trial.user_attrs.get(POINT)
            if name in statuses and (
                name not in deciding or trial_status(deciding[name]) != "done"
            ):
                deciding[name] = trial
        ordered = [
            (params, deciding.get(name)) for name, params in zip(names, spec.grid, strict=True)
        ]
        missing = [n for n, s in statuses.items() if s == "missing"]
        held = [n for n, s in statuses.items() if s == "held"]
    else:
        ordered = [(t.params, t) for t in trials if trial_status(t) == "done"]
        missing = []
        # trials other workers still train: the last worker to finish logs the summary (a
        # queued trial the budget left over waits for the next run and holds nothing up)
        held = [
            t.user_attrs.get(POINT) or f"trial-{t.number}"
            for t in trials
            if t.state == TrialState.RUNNING
        ]
    rows = [table_row(spec, params, trial) for params, trial in ordered]
    completed = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(completed, key=lambda t: (t.value, -t.number)) if completed else None
    return SearchSummary(rows, best, not missing and not held, missing, held)


def table_row(
    spec: SearchSpec, params: Mapping[str, Any], trial: FrozenTrial | None
) -> dict[str, Any]:
    value = trial.value if trial is not None and trial.state == TrialState.COMPLETE else None
    return {
        **spec.space.table_row(params),
        "val_accuracy": round(100 * value, 2) if value is not None else None,
        "best_epoch": trial.user_attrs.get("best_epoch") if trial else None,
        "state": trial.state.name if trial else "MISSING",
        "trial": trial.number if trial else None,
        "run_name": spec.space.point_name(params),
        "run_id": trial.user_attrs.get(RUN_ID) if trial else None,
    }


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = ["" if row.get(c) is None else str(row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def log_summary(study: optuna.Study, summary: SearchSummary, title: str) -> None:
    """Into the active (parent) run: the table (``log_table`` and markdown), Optuna's figures,
    and the best trial's params and metrics as ``best_*``."""
    import mlflow

    columns = {key: [row.get(key) for row in summary.rows] for key in summary.rows[0]}
    log_table_replacing(columns, f"{SUMMARY_DIR}/table.json")
    mlflow.log_text(f"# {title}\n\n" + markdown_table(summary.rows), f"{SUMMARY_DIR}/table.md")
    log_figures(study)
    counts = {state.name.lower(): 0 for state in (TrialState.COMPLETE, TrialState.PRUNED)}
    for row in summary.rows:
        key = str(row["state"]).lower()
        counts[key] = counts.get(key, 0) + 1
    mlflow.log_metrics({f"points_{state}": float(n) for state, n in counts.items()})
    best = summary.best
    if best is None:
        return
    log_best_params(best.params)
    mlflow.log_metrics(
        {
            "best_val_accuracy": float(best.value),
            "best_epoch": float(best.user_attrs.get("best_epoch", 0)),
            "best_trial_number": float(best.number),
        }
    )
    mlflow.set_tags(
        {
            "best_point": str(best.user_attrs.get(POINT, best.number)),
            "best_run_id": str(best.user_attrs.get(RUN_ID, "")),
        }
    )


def log_table_replacing(columns: Mapping[str, list], artifact_file: str) -> None:
    """``mlflow.log_table``, but a table already there (a resumed sampled search's summary) is
    replaced: ``log_table`` would append the new rows to the old ones."""
    import mlflow
    import pandas as pd

    folder, name = artifact_file.rsplit("/", 1)
    run_id = mlflow.active_run().info.run_id
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, folder)}
    if artifact_file not in logged:
        mlflow.log_table(dict(columns), artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        # the file log_table writes, so the UI keeps showing it as a table
        pd.DataFrame(dict(columns)).to_json(path, orient="split", index=False, date_format="iso")
        mlflow.log_artifact(str(path), folder)


def log_best_params(params: Mapping[str, Any]) -> None:
    """``best_*`` params, and all of them in ``search/best_params.json``.

    A resumed sampled search may find a new best; MLflow params never change, so a second value
    goes under ``cfg.best_*`` (``log_params_safe``) and a later one only into the JSON file.
    """
    import mlflow

    from fmnist import tracking

    mlflow.log_dict(dict(params), f"{SUMMARY_DIR}/best_params.json")
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    values = {}
    for key, value in params.items():
        text, name = tracking.format_param(value), f"best_{key}"
        taken = existing.get(name, text) != text and existing.get(f"cfg.{name}", text) != text
        if not taken:
            values[name] = value
    tracking.log_params_safe(values)


def log_figures(study: optuna.Study) -> None:
    """Optuna's optimization history, parameter importances, parallel-coordinate and slice plots
    as PNGs (matplotlib backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import mlflow
    from optuna.visualization import matplotlib as optuna_plots

    figures = {
        "optimization_history.png": optuna_plots.plot_optimization_history,
        "param_importances.png": optuna_plots.plot_param_importances,
        "parallel_coordinate.png": optuna_plots.plot_parallel_coordinate,
        "slice.png": optuna_plots.plot_slice,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, plot in figures.items():
            try:
                axes = plot(study)
            except Exception as exc:  # noqa: BLE001 - a figure must never fail the search
                # importances need two completed trials that differ; say so instead
                mlflow.log_text(f"not drawn: {exc}\n", f"{SUMMARY_DIR}/{name}.txt")
                continue
            figure = axes.figure if hasattr(axes, "figure") else np.ravel(axes)[0].figure
            # a slice plot has one panel per parameter: widen it with their number
            panels = np.size(axes) if not hasattr(axes, "figure") else 1
            figure.set_size_inches(max(8, 3.2 * panels), 5)
            figure.tight_layout()
            mlflow.log_figure(figure, f"{SUMMARY_DIR}/{name}")
            plt.close(figure)


def load_trial_model(run_id: str) -> tuple[nn.Module, dict[str, Any], list[dict[str, float]]]:
    """A trial's best-epoch model (eval mode), its spec and its per-epoch history."""
    import mlflow

    from fmnist.models import build_model

    # a progress bar per downloaded file would only clutter the command's output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_DIR))
    spec = json.loads((folder / SPEC_FILE).read_text())
    model = build_model(spec)
    model.load_state_dict(torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True))
    history = mlflow.artifacts.load_dict(f"runs:/{run_id}/{HISTORY_FILE}")["history"]
    return model.eval(), spec, history


def warm_up_tracking() -> threading.Thread:
    """Open the tracking store in a background thread; join it before the first run.

    A new SQLite store spends seconds creating its tables; data loading and PCA (which release
    the GIL) overlap with it. Errors are left for the first real call to report.
    """

    def open_store() -> None:
        import mlflow

        from fmnist import tracking

        try:
            uri = tracking.configure()
            # workers started together on a fresh store must not all create its tables
            with machine_lock(uri if "://" in uri else str(Path(uri).resolve())):
                mlflow.MlflowClient().search_experiments(max_results=1)
        except Exception:  # noqa: BLE001 - the caller's own first call reports it properly
            pass

    thread = threading.Thread(target=open_store, name="open-tracking-store", daemon=True)
    thread.start()
    return thread


def worker_count(n_jobs: int, pending: int) -> int:
    """``n_jobs`` processes (0: one per usable CPU core), never more than the pending points."""
    if n_jobs <= 0:
        n_jobs = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return max(1, min(n_jobs, pending)) if pending else 0


@dataclass
class SearchOutcome:
    """What a search run did: the study, its parent run, the points trained now, the summary."""

    study: optuna.Study
    ref: StudyRef
    parent_run_id: str
    trained: list[str]
    summary: SearchSummary
    seconds: float
    finalized: str | None = None  # the registered model URI (recorded in the study)
    final: dict[str, Any] | None = None  # what ``finalize`` returned in this run


def search(
    spec: SearchSpec,
    ref: StudyRef,
    data: SearchData,
    *,
    n_jobs: int,
    experiment_name: str,
    run_name: str,
    outer_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    title: str = "Search",
    on_start: Callable[[], None] | None = None,
    finalize: Callable[[SearchOutcome], dict[str, Any]] | None = None,
    finalize_only: bool = False,
) -> SearchOutcome:
    """Run (or resume) a search in its parent run, log its summary, then ``finalize`` it once.

    ``on_start()`` runs first inside the parent run (the family logs its own params there).
    ``finalize(outcome)`` runs inside the parent run when every point is done and the study has
    no registered model yet (evaluation and registration are the family's business); the
    ``model_uri`` of what it returns is recorded in the study, so a re-run does not register
    again. Of several workers sharing the study, the one that finds every point done and wins
    ``claim_finalization`` logs Table I and finalizes; one that finds only points other workers
    are training leaves it to them. ``finalize_only`` (``--finalize``) trains nothing.
    """
    started = time.perf_counter()
    called_at = datetime.datetime.now()  # Optuna stamps trials with naive local times
    study, created = open_study(ref, spec.sampler(0), spec.prune, create=not finalize_only)
    if created:
        study.set_user_attr(CREATOR, worker_id())
    release_stale_trials(study)
    if not created and not finalize_only:
        wait_for_parent(study)
    # The creator queues the grid before recording its parent run, so the workers waiting for
    # that record find every point held and queue no duplicates.
    if spec.grid and not finalize_only:
        queue_missing_points(study, spec)
    elif spec.first and not finalize_only:
        queue_first_points(study, spec)
    with parent_run(study, spec, experiment_name, run_name, outer_run_id, tags) as run:
        parent_id = run.info.run_id
        from fmnist import tracking

        tracking.log_params_safe(
            {"study_name": ref.study_name, "storage": redact_storage(ref.storage)}
        )
        if on_start is not None:
            on_start()
        pending = len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
        workers = worker_count(n_jobs, pending if spec.grid else trials_left(study, spec))
        if finalize_only:
            workers = 0
        ended = run_workers(spec, ref, data, parent_id, workers) if workers else []
        exit_codes = [code for _, code in ended]
        summary = summarize(study, spec)
        trained = trained_here(study, [pid for pid, _ in ended], called_at) if workers else []
        finalized = study.user_attrs.get(FINALIZED)
        if not spec.grid:
            finalized = current_round(study, summary, finalize is not None)
        outcome = SearchOutcome(study, ref, parent_id, trained, summary, 0.0, finalized)
        if summary.held and not summary.missing and not finalize_only:
            print(
                f"{len(summary.held)} points are still being trained by other workers "
                f"({', '.join(summary.held)}); the worker that finishes the last one logs "
                "the table and registers the winner.",
                file=sys.stderr,
            )
            outcome.seconds = time.perf_counter() - started
            return outcome
        if not summary.complete and spec.grid:
            bad = [code for code in exit_codes if code]
            raise SearchIncomplete(
                f"{len(summary.missing) + len(summary.held)} of {len(spec.grid)} points are not "
                f"done (missing: {', '.join(summary.missing) or 'none'}; held by other workers: "
                f"{', '.join(summary.held) or 'none'})"
                + (f"; worker exit codes {bad}" if bad else "")
                + ". Run the same command again to train only those."
            )
        # a finished search re-run changes nothing; of racing workers one only finalizes
        round_name = ""
        if not spec.grid:
            round_name = f"-{len(summary.rows)}" + ("-model" if finalize else "")
        if outcome.finalized is None and claim_finalization(ref, finalize_only, round_name):
            if summary.rows:
                log_summary(study, summary, title)
            if finalize is not None and summary.best is not None:
                outcome.final = dict(finalize(outcome))
                outcome.finalized = outcome.final.get("model_uri")
                if outcome.finalized:
                    study.set_user_attr(FINALIZED, outcome.finalized)
            if not spec.grid:
                study.set_user_attr(
                    FINALIZED_ROUND, {"trials": len(summary.rows), "model_uri": outcome.finalized}
                )
        outcome.finalized = outcome.finalized or None  # "": finalized without a model
        outcome.seconds = time.perf_counter() - started
    return outcome


def current_round(study: optuna.Study, summary: SearchSummary, wants_model: bool) -> str | None:
    """A sampled search's finalization when it still describes the study (the same done
    trials, and a model if one is wanted): its model URI, "" without one; else None."""
    last = study.user_attrs.get(FINALIZED_ROUND) or {}
    if last.get("trials") != len(summary.rows):
        return None
    if wants_model and not last.get("model_uri"):
        return None
    return last.get("model_uri") or ""


def earlier_result(parent_run_id: str, model_uri: str | None) -> dict[str, Any]:
    """A finished search's test accuracy, alias and retrained run (if any), read back from its
    parent run when a re-run trains nothing."""
    if not model_uri:
        return {}
    import mlflow

    parent = mlflow.MlflowClient().get_run(parent_run_id)
    accuracy = parent.data.metrics.get("test_accuracy")
    return {
        "test_accuracy": round(accuracy, 4) if accuracy is not None else None,
        "alias": parent.data.tags.get("registered_alias"),
        "retrained_run_id": parent.data.tags.get("retrained_run_id"),
    }


def redact_storage(location: str) -> str:
    from fmnist.tracking import redact_uri

    return redact_uri(location) if "://" in location else Path(location).name
