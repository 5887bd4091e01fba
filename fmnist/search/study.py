"""The Optuna study of a search: samplers, storage, opening it, the finalize lock, worker identity.

The study lives in an Optuna storage: by default a journal file next to the tracking store (safe
for several processes), or an RDB URL shared by several machines, opened with Optuna's trial
heartbeat (``liveness``: a beat every ``FMNIST_HEARTBEAT_SECONDS``, a trial released after
``FMNIST_GRACE_SECONDS`` of silence). A worker is named ``host:pid:start`` so that another
process can tell whether it still lives. Of several workers sharing a study, the one that wins an
atomic lock (the creation of a ``<study>:finalize`` study) logs the summary and registers the
winner, once. With ``points`` and ``workers`` this is the only code that imports Optuna.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import sqlalchemy.exc
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial

from fmnist.config import redact_uri
from fmnist.errors import FmnistError
from fmnist.locks import machine_lock
from fmnist.search.spec import SamplerSpec

# Trial user attributes.
POINT = "point"  # the grid point's name, fixed when the point is queued
FAIL_REASON = "fail_reason"
FINAL = "final"  # a failure re-running would repeat (a diverged loss): its point is done
SKIPPED = "skipped"  # a duplicate given up when claimed; never counts for its point
WORKER = "worker"  # host:pid:start of the process that runs the trial
HEARTBEAT = "heartbeat"  # a journal trial's wall-clock seconds, refreshed while it trains
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
JOURNAL_FILE = "optuna-journal.log"
# How often a training worker proves it lives, and how long a silent one keeps its trial. Every
# worker of a study should use the same values (a worker releases what looks stale to it).
HEARTBEAT_ENV, DEFAULT_HEARTBEAT_SECONDS = "FMNIST_HEARTBEAT_SECONDS", 30
GRACE_ENV, DEFAULT_GRACE_SECONDS = "FMNIST_GRACE_SECONDS", 120
HOST_ENV = "FMNIST_WORKER_HOST"  # the host name a worker records (default: the machine's)


@dataclass(frozen=True)
class StudyRef:
    """Where a study lives: an Optuna storage URL or a journal file path, and its name."""

    storage: str
    study_name: str


class QueueGridSampler(optuna.samplers.GridSampler):
    """A ``GridSampler`` whose points arrive through the trial queue.

    ``GridSampler.after_trial`` calls ``study.stop()``, which raises outside ``study.optimize``
    and would fail the ask-and-tell loop of a worker; here the worker loop ends the search when
    the queue is empty.
    """

    def after_trial(self, study, trial, state, values) -> None:
        return None


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


def make_sampler(spec: SamplerSpec) -> optuna.samplers.BaseSampler:
    """The grid sampler over ``spec.choices``, or a seeded TPE sampler (constant liar: parallel
    workers spread out)."""
    if spec.kind == "grid":
        choices = {key: list(values) for key, values in (spec.choices or {}).items()}
        return QueueGridSampler(choices, seed=spec.seed)
    return TrialSeededTPESampler(
        seed=spec.seed, n_startup_trials=spec.startup_trials, constant_liar=True
    )


def make_pruner(prune: bool) -> optuna.pruners.BasePruner:
    if prune:
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)
    return optuna.pruners.NopPruner()


# --- storage ---------------------------------------------------------------------------------


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


def redact_storage(location: str) -> str:
    """What may be logged of a storage: a URL without its password, a journal's file name."""
    return redact_uri(location) if "://" in location else Path(location).name


def sqlalchemy_url(url: str) -> str:
    """``postgresql://`` means psycopg2 to SQLAlchemy; the project installs psycopg (3)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            try:
                import psycopg2  # noqa: F401 - optional: only its presence is asked
            except ImportError:
                return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


@dataclass(frozen=True)
class Liveness:
    """A training worker's heartbeat period and the silence after which its trial is released
    (both whole seconds: Optuna's RDB heartbeat takes integers)."""

    heartbeat: int = DEFAULT_HEARTBEAT_SECONDS
    grace: int = DEFAULT_GRACE_SECONDS


def liveness() -> Liveness:
    """The heartbeat settings from ``FMNIST_HEARTBEAT_SECONDS`` and ``FMNIST_GRACE_SECONDS``."""
    values = {}
    for key, default in ((HEARTBEAT_ENV, DEFAULT_HEARTBEAT_SECONDS), (GRACE_ENV, 0)):
        text = os.environ.get(key, "").strip()
        try:
            values[key] = int(text) if text else default
        except ValueError:
            values[key] = -1
        if values[key] < 0 or (key == HEARTBEAT_ENV and values[key] == 0):
            raise FmnistError(f"{key}={text!r}: expected a whole number of seconds above 0.")
    beat = values[HEARTBEAT_ENV]
    grace = values[GRACE_ENV] or max(DEFAULT_GRACE_SECONDS, 4 * beat)
    if grace <= beat:
        raise FmnistError(
            f"{GRACE_ENV}={grace} must exceed {HEARTBEAT_ENV}={beat}: a worker that beats "
            "on time would lose its trial."
        )
    return Liveness(beat, grace)


class StaleTrials:
    """Optuna's ``heartbeat_stale_trial_callback``: remembers, per study, the trials that this
    process failed (``fail_stale_trials`` calls it only for those it won), so exactly one worker
    requeues each released point and ends its MLflow run."""

    def __init__(self) -> None:
        self.trials: dict[str, list[FrozenTrial]] = {}

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.trials.setdefault(study.study_name, []).append(trial)

    def drain(self, study_name: str) -> list[FrozenTrial]:
        return self.trials.pop(study_name, [])


STALE_TRIALS = StaleTrials()


def rdb_storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage with Optuna's trial heartbeat (``liveness``); workers on other machines
    creating its tables at the same moment make one of them fail with a duplicate-table error,
    so that is retried (a few times)."""
    url = sqlalchemy_url(url)
    settings = liveness()
    for attempt in range(5):
        try:
            with machine_lock(url), warnings.catch_warnings():
                # the heartbeat is experimental in Optuna 5 (stable enough: used since 2.x)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=settings.heartbeat,
                    grace_period=settings.grace,
                    heartbeat_stale_trial_callback=STALE_TRIALS,
                )
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
    Path(location).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(location))


# --- the study -------------------------------------------------------------------------------


def derive_study_name(prefix: str, identity: Mapping[str, Any]) -> str:
    """``prefix-<hash>``: the hash covers every setting that changes what a trial computes."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return f"{prefix}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def open_study(
    ref: StudyRef, sampler: SamplerSpec, prune: bool, create: bool = False
) -> tuple[optuna.Study, bool]:
    """Load the study, creating it first when ``create``; returns (study, created here)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = make_storage(ref.storage)
    settings = {"sampler": make_sampler(sampler), "pruner": make_pruner(prune)}
    if create:
        try:
            study = optuna.create_study(
                storage=storage, study_name=ref.study_name, direction="maximize", **settings
            )
            study.set_user_attr(CREATOR, worker_id())
            return study, True
        except optuna.exceptions.DuplicatedStudyError:
            pass
    try:
        study = optuna.load_study(study_name=ref.study_name, storage=storage, **settings)
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


def record_finalized(
    study: optuna.Study, model_uri: str | None, sampled: bool, trials: int
) -> None:
    """Remember what finalization registered, so a re-run does not register again."""
    if model_uri:
        study.set_user_attr(FINALIZED, model_uri)
    if sampled:
        study.set_user_attr(FINALIZED_ROUND, {"trials": trials, "model_uri": model_uri})


# --- worker identity -------------------------------------------------------------------------


def process_start(pid: int) -> str:
    """The process's start time in clock ticks since boot (tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[-1].split()[19]


def host_name() -> str:
    """This machine's name in worker ids: ``FMNIST_WORKER_HOST``, else the host name. Set it
    where several machines share a host name but not their processes (containers)."""
    return os.environ.get(HOST_ENV, "").strip() or socket.gethostname()


def worker_id() -> str:
    pid = os.getpid()
    return f"{host_name()}:{pid}:{process_start(pid)}"


def worker_gone(worker: str) -> bool:
    """True when ``worker`` ran on this machine and its process no longer exists."""
    host, _, rest = worker.partition(":")
    pid_text, _, start = rest.partition(":")
    if host != host_name() or not pid_text.isdigit():
        return False  # another machine's worker: its heartbeat decides (release_stale_trials)
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return bool(start) and process_start(pid) not in ("", start)
