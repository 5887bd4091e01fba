"""A search's Optuna study: storage, sampler, the queue of points, dead workers, the summary.
A journal file beside the tracking store (one machine) or a shared RDB with Optuna's heartbeat,
whose stale trials ``RetryHeartbeatStaleTrialCallback`` queues again. A point is known by its
key (its params as canonical JSON), apart from its run's name."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy.exc
from optuna.storages import JournalStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from fmnist.config import DEFAULT_TRACKING_URI, redact_uri
from fmnist.errors import FmnistError
from fmnist.liveness import is_gone, machine_lock, process_id
from fmnist.search.spec import SamplerSpec

# Trial user attributes.
POINT = "point"  # the point's key: its params as canonical JSON
FAIL_REASON = "fail_reason"
FINAL = "final"  # a failure re-running would repeat (a diverged loss): its point is done
SKIPPED = "skipped"  # a duplicate given up when popped; never counts for its point
WORKER = "worker"  # host:pid:start of the process that trains the trial
RUN_ID = "mlflow_run_id"
BEST_EPOCH = "best_epoch"
# Study user attributes.
PARENT_RUN = "mlflow_parent_run_id"
CREATOR = "creator"  # the process that created the study, and so makes its parent run
FINALIZED = "registered_model_uri"
FINALIZED_ROUND = "finalized_round"  # a sampled search's last: {"trials": n, "model_uri": ...}
JOURNAL_FILE = "optuna-journal.log"
PLAIN_JOURNAL = (Path(DEFAULT_TRACKING_URI).name, "mlruns")  # default stores: JOURNAL_FILE
HEARTBEAT_ENV, DEFAULT_HEARTBEAT_SECONDS = "FMNIST_HEARTBEAT_SECONDS", 30
GRACE_ENV, DEFAULT_GRACE_SECONDS = "FMNIST_GRACE_SECONDS", 120
UNNAMED_SECONDS = 60  # a running trial that names no worker this long after its start is dead
MAX_RETRY = 3  # how often a dead worker's trial is queued again before its point stays missing
StaleHook = Callable[[FrozenTrial], None]  # told of a trial failed because its worker died


@dataclass(frozen=True)
class StudyRef:
    storage: str  # an Optuna storage URL or a journal file's path
    study_name: str


@dataclass(frozen=True)
class Liveness:
    heartbeat: int = DEFAULT_HEARTBEAT_SECONDS
    grace: int = DEFAULT_GRACE_SECONDS


def liveness() -> Liveness:
    """An RDB worker's heartbeat period and the silence that fails its trial (the env's)."""
    values = []
    for key, default in ((HEARTBEAT_ENV, DEFAULT_HEARTBEAT_SECONDS), (GRACE_ENV, 0)):
        text = os.environ.get(key, "").strip()
        values.append(int(text) if text.isdigit() else (default if not text else -1))
        if values[-1] < 0 or (key == HEARTBEAT_ENV and values[-1] == 0):
            raise FmnistError(f"{key}={text!r}: expected a whole number of seconds above 0.")
    beat, grace = values[0], values[1] or max(DEFAULT_GRACE_SECONDS, 4 * values[0])
    if grace <= beat:
        why = "a worker that beats on time would lose its trial"
        raise FmnistError(f"{GRACE_ENV}={grace} must exceed {HEARTBEAT_ENV}={beat}: {why}.")
    return Liveness(beat, grace)


def resolve_storage(storage: str, tracking_uri: str) -> str:
    """``--storage``: an Optuna URL as given, a path as an absolute journal path; empty: a local
    store's own journal beside it (``NAME-optuna-journal.log``, ``optuna-journal.log`` for the
    default ``mlflow.db`` and ``mlruns``), else a journal in the working directory."""
    if "://" in storage:
        return storage
    folder = Path(storage).expanduser() if storage else Path.cwd() / JOURNAL_FILE
    for scheme in ("sqlite:///", "file://"):
        if not storage and tracking_uri.startswith(scheme):
            store = Path(tracking_uri.removeprefix(scheme).split("?")[0])
            own = f"{store.name}-" if store.name not in PLAIN_JOURNAL else ""
            folder = store.parent / f"{own}{JOURNAL_FILE}"
    return str(folder.resolve())


def redact_storage(location: str) -> str:
    """A URL without its password, a journal's file name."""
    return redact_uri(location) if "://" in location else Path(location).name


def sqlalchemy_url(url: str) -> str:
    """``postgresql://`` means psycopg2 to SQLAlchemy; the project installs psycopg (3)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


class Requeue:
    """A worker died: tell ``on_stale`` (which ends its run), then queue its point again."""

    def __init__(self, on_stale: StaleHook | None = None) -> None:
        self.on_stale = on_stale
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if not trial.user_attrs.get(SKIPPED):
            if self.on_stale is not None:
                self.on_stale(trial)
            self.retry(study, trial)


def make_storage(location: str, on_stale: StaleHook | None = None) -> optuna.storages.BaseStorage:
    """An RDB storage with Optuna's heartbeat for a URL, else a journal file. Machines creating
    an RDB's tables at once fail with a duplicate table: tried again."""
    if "://" not in location:
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(location))
    url, settings = sqlalchemy_url(location), liveness()
    for attempt in range(5):
        try:
            with machine_lock(url), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs={"pool_pre_ping": True},
                    heartbeat_interval=settings.heartbeat,
                    grace_period=settings.grace,
                    heartbeat_stale_trial_callback=Requeue(on_stale),
                )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == 4:
                raise
        except (sqlalchemy.exc.OperationalError, ImportError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            message = f"Cannot open the Optuna storage {redact_uri(url)}: {first}"
            raise FmnistError(message) from None
    raise AssertionError("unreachable")


def make_sampler(spec: SamplerSpec, worker_seed: int = 0) -> optuna.samplers.BaseSampler:
    """A grid (points come through the queue), or TPE with constant liar, ``worker_seed`` mixed
    into its seed: a second worker or a resumed search draws new points."""
    if spec.kind == "grid":
        choices = {key: list(values) for key, values in (spec.choices or {}).items()}
        return optuna.samplers.GridSampler(choices, seed=spec.seed)
    seed = (spec.seed * 1_000_003 + worker_seed) % 2**32
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=spec.startup_trials, constant_liar=True
    )


def derive_study_name(prefix: str, identity: Mapping[str, Any]) -> str:
    text = json.dumps(identity, sort_keys=True, default=str)
    return f"{prefix}-{hashlib.sha256(text.encode()).hexdigest()[:10]}"


def open_study(
    ref: StudyRef, sampler: SamplerSpec, prune: bool, create=False, worker_seed=0, on_stale=None
) -> tuple[optuna.Study, bool]:
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines say how trials end
    pruner = optuna.pruners.MedianPruner(2, 2) if prune else optuna.pruners.NopPruner()
    storage, sampler_ = make_storage(ref.storage, on_stale), make_sampler(sampler, worker_seed)
    settings = {"storage": storage, "sampler": sampler_, "pruner": pruner}
    if create:
        try:
            study = optuna.create_study(
                study_name=ref.study_name, direction="maximize", **settings
            )
            study.set_user_attr(CREATOR, process_id())
            return study, True
        except optuna.exceptions.DuplicatedStudyError:
            pass
    try:
        return optuna.load_study(study_name=ref.study_name, **settings), False
    except KeyError:
        where = f"{ref.study_name!r} in {redact_storage(ref.storage)}"
        raise FmnistError(f"No study {where}: run the search first.") from None


def elect(ref: StudyRef, name: str, force: bool = False) -> bool:
    """True for exactly one caller: whose creation of study ``name`` succeeds. A holder gone
    from this machine, or ``force``, loses the lock."""
    storage = make_storage(ref.storage)
    for _ in range(2):
        try:
            lock = storage.create_new_study([StudyDirection.MAXIMIZE], name)
        except optuna.exceptions.DuplicatedStudyError:
            try:
                lock = storage.get_study_id_from_name(name)
                if not (force or is_gone(storage.get_study_user_attrs(lock).get(WORKER, ""))):
                    return False
                storage.delete_study(lock)  # by id: a lock made again meanwhile survives
            except KeyError:
                pass  # removed by another caller first: the next creation decides
            continue
        storage.set_study_user_attr(lock, WORKER, process_id())
        return True
    return False


def point_key(params: Mapping[str, Any]) -> str:
    return json.dumps(dict(params), sort_keys=True, default=str)


def counted(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    return [t for t in trials if not t.user_attrs.get(SKIPPED)]


def trial_status(trial: FrozenTrial) -> str:
    """``done``, ``held`` (queued or running) or ``missing`` (to train again)."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return "done"
    if trial.state == TrialState.FAIL:
        return "done" if trial.user_attrs.get(FINAL) else "missing"
    return "held"


def point_statuses(trials: Sequence[FrozenTrial], keys: Sequence[str]) -> dict[str, str]:
    rank = {"missing": 0, "held": 1, "done": 2}
    statuses = dict.fromkeys(keys, "missing")
    for trial in counted(trials):
        key, status = trial.user_attrs.get(POINT), trial_status(trial)
        if key in statuses and rank[status] > rank[statuses[key]]:
            statuses[key] = status
    return statuses


def queue_points(study: optuna.Study, points: Sequence[Mapping[str, Any]]) -> None:
    keys = [point_key(p) for p in points]
    statuses = point_statuses(study.get_trials(deepcopy=False), keys)
    for key, params in zip(keys, points, strict=True):
        if statuses[key] == "missing":
            study.enqueue_trial(dict(params), user_attrs={POINT: key})


def held_elsewhere(study: optuna.Study, number: int, key: str) -> bool:
    """Another trial has point ``key``: done, or held and older (the younger gives up)."""
    return any(
        other.number != number
        and other.user_attrs.get(POINT) == key
        and (
            trial_status(other) == "done"
            or (trial_status(other) == "held" and other.number < number)
        )
        for other in counted(study.get_trials(deepcopy=False))
    )


def release_dead(study: optuna.Study, on_stale: StaleHook | None = None) -> list[FrozenTrial]:
    """Fail the running trials of this machine's gone processes; queue their points again."""
    released, now = [], datetime.datetime.now()  # Optuna's times are naive local ones
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get(WORKER, ""))  # none: killed before its first word
        unnamed = not worker and (now - trial.datetime_start).total_seconds() > UNNAMED_SECONDS
        if not (unnamed or is_gone(worker)):
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError):
            continue  # another process released it first
        Requeue(on_stale)(study, trial)
        released.append(trial)
    return released


@dataclass(frozen=True)
class BestTrial:
    number: int
    value: float
    params: dict[str, Any]
    run_id: str
    best_epoch: int
    point: str = ""  # its run's name (the driver names it)


@dataclass
class Summary:
    rows: list[tuple[Mapping[str, Any], FrozenTrial | None]]
    best: BestTrial | None
    missing: list[dict[str, Any]] = field(default_factory=list)
    held: list[dict[str, Any]] = field(default_factory=list)
    unnamed: int = 0  # running trials that name no worker: a worker killed as it took one?


def summarize(study: optuna.Study, grid: Sequence[Mapping[str, Any]]) -> Summary:
    """A row per grid point (its deciding trial), or per done trial of a sampled search."""
    trials = counted(study.get_trials(deepcopy=False))
    if grid:
        keys = [point_key(p) for p in grid]
        statuses, deciding = point_statuses(trials, keys), {}
        for trial in trials:  # a later trial of a point replaces an earlier, unfinished one
            key = trial.user_attrs.get(POINT)
            if key in statuses and (key not in deciding or trial_status(deciding[key]) != "done"):
                deciding[key] = trial
        rows = [(p, deciding.get(k)) for k, p in zip(keys, grid, strict=True)]
        left = {
            s: [dict(p) for k, p in zip(keys, grid, strict=True) if statuses[k] == s]
            for s in ("missing", "held")
        }
    else:
        rows = [(t.params, t) for t in trials if trial_status(t) == "done"]
        left = {"missing": [], "held": [t.params for t in trials if t.state == TrialState.RUNNING]}
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    if best is not None:
        run_id, epoch = best.user_attrs.get(RUN_ID, ""), best.user_attrs.get(BEST_EPOCH, 0)
        best = BestTrial(
            best.number, float(best.value), dict(best.params), str(run_id), int(epoch)
        )
    unnamed = sum(t.state == TrialState.RUNNING and not t.user_attrs.get(WORKER) for t in trials)
    return Summary(rows, best, left["missing"], left["held"], unnamed)


def trial_columns(trial: FrozenTrial | None, run_name: str) -> dict[str, Any]:
    value = trial.value if trial is not None and trial.state == TrialState.COMPLETE else None
    return {
        "val_accuracy": round(100 * value, 2) if value is not None else None,
        "best_epoch": trial.user_attrs.get(BEST_EPOCH) if trial else None,
        "state": trial.state.name if trial else "MISSING",
        "trial": trial.number if trial else None,
        "run_name": run_name,
        "run_id": trial.user_attrs.get(RUN_ID) if trial else None,
    }


def finalized_model(study: optuna.Study, sampled: bool, done: int, wants_model: bool):
    """An earlier finalization's model URI ("" without a model), None when (again) to finalize:
    a grid once, a sampled search per number of done trials (and when a model is now wanted)."""
    if not sampled:
        return study.user_attrs.get(FINALIZED)
    last = study.user_attrs.get(FINALIZED_ROUND) or {}
    if last.get("trials") != done or (wants_model and not last.get("model_uri")):
        return None
    return last.get("model_uri") or ""


def record_finalized(study: optuna.Study, model_uri: str | None, sampled: bool, done: int):
    if model_uri:
        study.set_user_attr(FINALIZED, model_uri)
    if sampled:
        study.set_user_attr(FINALIZED_ROUND, {"trials": done, "model_uri": model_uri})


def study_figures(study: optuna.Study) -> Iterator[tuple[str, Any, str]]:
    """Optuna's plots: ``(file name, figure, "")`` or ``(file name, None, why not drawn)``."""
    import matplotlib  # local: only a finalizing process draws

    matplotlib.use("Agg")  # files only: never a window, whatever the environment asks for
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in ("optimization_history", "param_importances", "parallel_coordinate", "slice"):
            try:
                axes = getattr(plots, f"plot_{name}")(study)
            except Exception as exc:  # noqa: BLE001 - importances need two different trials
                yield f"{name}.png", None, str(exc)
                continue
            figure = np.ravel(axes)[0].figure  # a slice plot has a panel (axes) per param
            figure.set_size_inches(max(8, 3.2 * np.size(axes)), 5)
            figure.tight_layout()
            try:
                yield f"{name}.png", figure, ""
            finally:
                plt.close(figure)
