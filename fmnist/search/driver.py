"""The one search driver of every model family: a parent run per study, a child run per trial.

A ``Family`` (the dense grid, the CNN's TPE search) is its space, its study's identity, its parent
run's params and tags and a finalize callback. Each trial trains in a child run with per-epoch
metrics and its best-epoch weights. Re-running trains only what is missing; commands on several
machines share a study: its creator makes the parent run, the last one to finish finalizes.
"""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import optuna

from fmnist import tracking
from fmnist.config import SearchOptions
from fmnist.errors import FmnistError, TrainingDiverged
from fmnist.liveness import process_id
from fmnist.search import study as studies
from fmnist.search.cluster import RayWorkers
from fmnist.search.spec import SearchData, SearchSpec
from fmnist.search.workers import LocalWorkers, Work, pending_count, wait_for_parent, worker_count
from fmnist.tracking import search_runs
from fmnist.train import engine
from fmnist.train.settings import hyperparameters, seed_everything

UNNAMED = (
    f" A trial that names no worker is taken back {studies.UNNAMED_SECONDS} s after its start (its"
    " worker was killed as it took it, or names it now): run the command again after that."
)
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
EPOCH_METRICS += ("epoch_seconds", "images_per_second")


class SearchIncomplete(FmnistError):
    """Some points were not trained (a worker failed or was interrupted)."""


class Pruned(Exception):
    """Raised from a trial's epoch callback when the pruner stops it."""


class SkipPoint(Exception):
    """A popped trial whose point another trial holds: not trained."""


@dataclass
class SearchOutcome:
    ref: studies.StudyRef
    parent_run_id: str
    trained: list[str]
    summary: studies.Summary
    finalized: str | None = None  # the registered model URI (recorded in the study)
    final: dict[str, Any] | None = None  # what ``finalize`` returned in this run


@dataclass(frozen=True)
class Family:
    spec: SearchSpec  # the space, sampler, budget and training settings (sent to workers)
    study_prefix: str  # the readable head of the default study name
    identity: Mapping[str, Any]  # all that changes what a trial computes: hashed into the name
    run_name: str  # the parent run's name
    title: str  # the summary table's heading
    params: Mapping[str, Any]  # the parent run's own params
    tags: Mapping[str, str]  # the parent run's tags (``optuna_study`` is added)
    digest: str  # the training data, logged as the parent run's dataset
    texts: Mapping[str, str] = field(default_factory=dict)  # parent artifacts: path -> text
    # registers the winner in the parent run; returns at least ``model_uri``
    finalize: Callable[[SearchOutcome], Mapping[str, Any]] | None = None


def run_search(
    family: Family,
    data: SearchData,
    options: SearchOptions,
    *,
    n_jobs: int,
    experiment_name: str,
    outer_run_id: str | None = None,
    finalize_only: bool = False,
) -> SearchOutcome:
    """Run (or resume) a family's search in its parent run, log its summary, finalize it once.
    The workers (``options.ray``: Ray tasks) start before this process opens the tracking store;
    ``finalize_only`` (``--finalize``) trains nothing."""
    since, spec = datetime.datetime.now(), family.spec  # Optuna stamps naive local times
    storage = studies.resolve_storage(options.storage, tracking.tracking_uri())
    name = options.study_name or studies.derive_study_name(family.study_prefix, family.identity)
    ref = studies.StudyRef(storage, name)
    study, created = studies.open_study(ref, spec.sampler, spec.prune, create=not finalize_only)
    released = studies.release_dead(study)  # a killed command's trials: queued again
    if not finalize_only:
        studies.queue_points(study, spec.queued())
    objective, catch = partial(make_objective, spec=spec, data=data), (TrainingDiverged, SkipPoint)
    job = Work(ref, spec, data, objective, end_dead_run, catch)
    pending = 0 if finalize_only else pending_count(study, spec)
    workers = start_workers(job, options.ray, n_jobs, pending)
    try:
        tracking.configure()
        for trial in released:
            end_dead_run(trial)
        tags = {"entry_point": spec.entry_point, "model_family": spec.family, **family.tags}
        recorded = None if created else wait_for_parent(study)
        where = (spec.entry_point, spec.family, experiment_name, family.run_name, outer_run_id)
        with search_runs.parent_run(recorded, *where, {**tags, "optuna_study": name}) as run:
            study.set_user_attr(studies.PARENT_RUN, run.info.run_id)
            setup = {"study_name": name, "storage": studies.redact_storage(storage)}
            search_runs.log_search_setup({**setup, **family.params}, family.texts, family.digest)
            workers.join(run.info.run_id)
            trained = trained_by(study, spec, workers.ids, since)
            summary = studies.summarize(study, spec.grid)
            outcome = SearchOutcome(ref, run.info.run_id, trained, summary)
            finish(study, family, outcome, finalize_only)
    except BaseException:
        workers.stop()
        raise
    return outcome


def start_workers(job: Work, ray_address: str, n_jobs: int, pending: int):
    """Ray tasks with ``--ray`` (Ray is imported only then), else forked processes."""
    if ray_address:
        return RayWorkers(job, ray_address, n_jobs, pending)
    return LocalWorkers(job, worker_count(n_jobs, pending))


def trained_by(study, spec: SearchSpec, ids: list[str], since) -> list[str]:
    return [
        spec.space.point_name(t.params)
        for t in studies.counted(study.get_trials(deepcopy=False))
        if studies.trial_status(t) == "done"  # so it started
        and t.user_attrs.get(studies.WORKER) in ids
        and t.datetime_start >= since
    ]


def finish(study, family: Family, outcome: SearchOutcome, finalize_only: bool) -> None:
    """Log the table and finalize when every point is done and this command wins the election
    (while others still train, the last one to finish does it)."""
    spec, summary = family.spec, outcome.summary
    sampled, done = not spec.grid, len(summary.rows)
    outcome.finalized = studies.finalized_model(study, sampled, done, family.finalize is not None)
    if summary.held and not summary.missing and not finalize_only:
        names = ", ".join(spec.space.point_name(p) for p in summary.held)
        print(
            f"{len(summary.held)} points are still being trained by other workers ({names}); the "
            "one that finishes last logs the table and registers the winner."
            + (UNNAMED if summary.unnamed else ""),
            file=sys.stderr,
        )
    elif summary.missing and spec.grid:
        names = ", ".join(spec.space.point_name(p) for p in summary.missing)
        raise SearchIncomplete(
            f"{len(summary.missing)} of {len(spec.grid)} points are not done ({names}). Run the "
            "same command again to train only those."
        )
    elif outcome.finalized is None:
        round_name = f"-{done}" + ("-model" if family.finalize else "") if sampled else ""
        if studies.elect(outcome.ref, f"{study.study_name}:finalize{round_name}", finalize_only):
            finalize(study, family, outcome)
            studies.record_finalized(study, outcome.finalized, sampled, done)
    outcome.finalized = outcome.finalized or None  # "": finalized without a model
    # a re-run that finalizes nothing reports what the earlier finalization registered
    earlier = search_runs.earlier_result(outcome.parent_run_id, outcome.finalized)
    outcome.final = outcome.final or earlier


def finalize(study, family: Family, outcome: SearchOutcome) -> None:
    """The table, figures and best trial on the parent run; the family registers the winner."""
    space, summary = family.spec.space, outcome.summary
    if summary.best is not None:
        summary.best = replace(summary.best, point=space.point_name(summary.best.params))
    if summary.rows:
        rows = [
            {**space.table_row(p), **studies.trial_columns(t, space.point_name(p))}
            for p, t in summary.rows
        ]
        figures = studies.study_figures(study)
        search_runs.log_search_summary(rows, family.title, figures, summary.best)
    if family.finalize is not None and summary.best is not None:
        outcome.final = dict(family.finalize(outcome))
        outcome.finalized = outcome.final.get("model_uri")


def make_objective(study, parent_run_id: str, spec: SearchSpec, data: SearchData):
    return partial(run_trial, study=study, spec=spec, data=data, parent_run_id=parent_run_id)


def run_trial(trial, study, spec: SearchSpec, data: SearchData, parent_run_id: str) -> float:
    """Train one point in a child run; its best validation accuracy is the trial's value. A
    diverged loss fails it for good (the worker goes on), any other error for a retry."""
    started = time.perf_counter()
    trial.set_user_attr(studies.WORKER, process_id())  # first: a kill leaves a trial named
    params = spec.space.suggest(trial)
    key = studies.point_key(params)
    if spec.grid and (
        trial.user_attrs.get(studies.POINT) != key
        or studies.held_elsewhere(study, trial.number, key)
    ):
        trial.set_user_attr(studies.SKIPPED, True)
        raise SkipPoint(f"point {key} is held by another trial")
    trial.set_user_attr(studies.POINT, key)
    name = spec.space.point_name(params)
    tags = {"optuna_study": study.study_name, "optuna_trial": str(trial.number)}
    try:
        with search_runs.trial_run(
            spec, parent_run_id, name, {**tags, "search_point": name}
        ) as run:
            trial.set_user_attr(studies.RUN_ID, run.info.run_id)
            result = train_point(trial, spec, data, params)
    except BaseException as exc:
        final = isinstance(exc, TrainingDiverged)
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{exc}"
        trial.set_user_attr(
            studies.FAIL_REASON, (f"diverged: {reason}" if final else reason)[:2000]
        )
        trial.set_user_attr(studies.FINAL, final)
        report(spec, f"trial {trial.number} {name}: failed{' for good' * final} ({reason})")
        raise
    seconds = time.perf_counter() - started
    if result is None:
        report(spec, f"trial {trial.number} {name}: pruned after {seconds:.1f} s")
        raise optuna.TrialPruned()
    trial.set_user_attr(studies.BEST_EPOCH, result.best_epoch)
    line = f"val_accuracy {result.best_val_accuracy:.4f} (epoch {result.best_epoch})"
    report(spec, f"trial {trial.number} {name}: {line} in {seconds:.1f} s")
    return result.best_val_accuracy


def train_point(trial, spec: SearchSpec, data: SearchData, params) -> engine.FitResult | None:
    seed_everything(spec.seed)  # initial weights depend on the seed alone
    built = spec.space.build(params, data.context)
    cfg = built.train.replace(epochs=spec.epochs, seed=spec.seed, device=spec.device)
    cfg = cfg.replace(quiet=spec.quiet)
    model_params = {f"model.{k}": v for k, v in built.spec.items()}
    run_params = {"trial_number": trial.number, "seed": spec.seed}
    tracking.log_params_safe({**params, **hyperparameters(cfg), **model_params, **run_params})
    log_epoch = tracking.EpochLogger()

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        log_epoch(epoch, {k: metrics[k] for k in EPOCH_METRICS if k in metrics})
        trial.report(metrics["val_accuracy"], epoch)
        if spec.prune and trial.should_prune():
            raise Pruned(f"pruned after epoch {epoch}")

    cpu_started = time.process_time()
    try:
        run_epoch = {"on_epoch_end": on_epoch_end, "epoch_runner": built.epoch_runner}
        result = engine.fit(built.trainable, data.train, data.val, cfg, **run_epoch)
    except Pruned:
        log_epoch.flush()
        search_runs.set_tags({"optuna_state": "PRUNED"})  # MLflow has no pruned status
        return None
    except BaseException:
        log_epoch.flush_quietly()  # the epochs trained so far stay with the failed run
        raise
    log_epoch.flush()
    cpu_seconds = time.process_time() - cpu_started
    search_runs.log_trial_result(result, built.spec, built.model, cpu_seconds)
    return result


def end_dead_run(trial) -> None:
    """End FAILED, with the reason, the child run of a trial whose worker died."""
    worker = trial.user_attrs.get(studies.WORKER, "an unknown worker")
    line = f"trial {trial.number}: its worker {worker} stopped beating or died; released, its "
    print(line + "point is trained again.", file=sys.stderr, flush=True)
    tracking.configure()
    reason = f"worker {worker} stopped; released by {process_id()}"
    run_id = trial.user_attrs.get(studies.RUN_ID)
    search_runs.fail_run(run_id, {"optuna_state": "FAIL", "error": reason})


def report(spec: SearchSpec, line: str) -> None:
    if not spec.quiet:
        print(line, flush=True)
