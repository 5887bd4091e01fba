"""The one search driver of every model family: trials as MLflow runs, summary, finalize once.

A family (``Family``: the dense grid or the CNN's TPE search) is its space, the identity that
names its study, the params and tags of its parent run and a finalize callback; this module runs
it. One MLflow parent run per study, recorded in the study, holds a nested child run per trial
with per-epoch metrics (``step=epoch``) and the trial's best-epoch weights (``checkpoint/``), so
the winner is registered without retraining. Re-running a command trains only what is missing (a
finished search trains nothing); independent commands on several machines can share a study: the
study's creator makes the parent run, and the worker that finds every point done and wins the
finalize lock logs the table and finalizes, once. The Optuna side (storage, queue, workers,
figures) is ``study``, ``points``, ``summary`` and ``workers``, and a claim's lockstep
threads are ``claims``; this module imports MLflow but not Optuna.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any

import mlflow
from torch import nn

from fmnist import tracking
from fmnist.config import SearchOptions
from fmnist.errors import TrainingDiverged
from fmnist.models.dense_lockstep import Lockstep
from fmnist.search import claims, points, workers
from fmnist.search import study as studies
from fmnist.search import summary as summaries
from fmnist.search.family import Family, SearchIncomplete, SearchOutcome
from fmnist.search.launcher import start_worker_launcher
from fmnist.search.spec import Built, SearchData, SearchSpec
from fmnist.search.study import POINT, RUN_ID, StudyRef
from fmnist.tracking.artifacts import load_run_model, log_model_files
from fmnist.tracking.onnx_export import prefetch_export_modules
from fmnist.tracking.search_runs import earlier_result, fail_run, log_search_summary, run_exists
from fmnist.train import engine
from fmnist.train.runtime import seed_everything

EPOCH_METRICS = (
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "lr",
    "epoch_seconds",
    "images_per_second",
)
CHECKPOINT_DIR = "checkpoint"  # child-run artifacts: best-epoch state dict and model spec
HISTORY_FILE = "history.json"


class TrialPruned(Exception):
    """Raised from a trial's epoch callback when the pruner stops it."""


class TrialReleased(Exception):
    """Raised from a trial's epoch callback when another worker released the trial (this one
    was silent past the grace period): that worker trains the point; this one stops."""


def start_search(n_jobs: int, pending: int) -> threading.Thread:
    """Open the tracking store in a background thread and, for several workers, start their
    fork server: both overlap with the caller's data loading. ``run_search`` joins the thread.

    A new database store spends seconds creating its tables (``tracking.configure`` does it,
    once per machine at a time); errors are left for the first real call to report.
    """

    def open_store() -> None:
        try:
            tracking.configure()
        except Exception:  # noqa: BLE001 - the caller's own first call reports it properly
            pass

    thread = threading.Thread(target=open_store, name="open-tracking-store", daemon=True)
    thread.start()
    if workers.worker_count(n_jobs, pending) > 1:
        start_worker_launcher()
    return thread


def run_search(
    family: Family,
    data: SearchData,
    options: SearchOptions,
    store_ready: threading.Thread,
    *,
    n_jobs: int,
    experiment_name: str,
    outer_run_id: str | None = None,
    finalize_only: bool = False,
) -> SearchOutcome:
    """Run (or resume) a family's search in its parent run, log its summary, finalize it once.

    The study is ``options.study_name``, else one named after the family's identity, in
    ``options.storage`` (default: a journal next to the tracking store). Of several workers
    sharing the study, the one that finds every point done and wins the finalize lock logs the
    table and calls ``family.finalize``; one that finds only points other workers are training
    leaves it to them. ``finalize_only`` (``--finalize``) trains nothing.
    """
    started = time.perf_counter()
    called_at = datetime.datetime.now()  # Optuna stamps trials with naive local times
    store_ready.join()
    storage = studies.resolve_storage(options.storage, tracking.configure())
    name = options.study_name or studies.derive_study_name(family.study_prefix, family.identity)
    ref = StudyRef(storage, name)
    spec = family.spec
    study = open_for_run(spec, ref, finalize_only)
    tags = {**family.tags, "optuna_study": ref.study_name}
    with parent_run(study, spec, experiment_name, family.run_name, outer_run_id, tags) as run:
        log_setup(family, ref)
        pending = 0 if finalize_only else points.pending_count(study, spec)
        n_workers = workers.worker_count(n_jobs, pending)
        runner = partial(
            claims.run_claimed, run_one=partial(run_trial, parent_run_id=run.info.run_id)
        )
        if n_workers > 1 and family.finalize is not None:
            prefetch_export_modules()  # this process only waits while the workers train
        ended = []
        if n_workers:
            ended = workers.run_workers(
                runner,
                spec,
                ref,
                data,
                n_workers,
                {"MLFLOW_TRACKING_URI": tracking.tracking_uri()},
                end_released_runs,
                claim_size(pending, n_workers),
            )
        summary = summaries.summarize(study, spec)
        pids = [pid for pid, _ in ended]
        trained = points.trained_here(study, pids, called_at) if n_workers else []
        finalized = summaries.finalized_model(study, spec, summary, family.finalize is not None)
        outcome = SearchOutcome(ref, run.info.run_id, trained, summary, finalized=finalized)
        finish(study, family, outcome, [code for _, code in ended], finalize_only)
        outcome.finalized = outcome.finalized or None  # "": finalized without a model
        # a re-run that finalizes nothing reports what the earlier finalization registered
        outcome.final = outcome.final or earlier_result(run.info.run_id, outcome.finalized)
        outcome.seconds = time.perf_counter() - started
    return outcome


def claim_size(pending: int, n_workers: int) -> int:
    """How many lockstep points a worker claims at once: all of them for a lone worker; else
    enough for two claims per worker, so that after the costliest points (the study's grid: two
    batch-32 points each) the cheaper ones go to whoever finishes first. One claim each
    gave one worker every batch-32 point of the study's grid and left the other idle (measured:
    8 points, 2 workers, 36 s -> 27 s)."""
    total_claims = 1 if n_workers == 1 else 2 * n_workers
    return max(1, math.ceil(pending / total_claims))


def open_for_run(spec: SearchSpec, ref: StudyRef, finalize_only: bool):
    """Open (or create) the study, release dead workers' trials and queue what is missing.

    The creator queues the points before recording its parent run, so the workers waiting for
    that record find every point held and queue no duplicates.
    """
    study, created = studies.open_study(ref, spec.sampler, spec.prune, create=not finalize_only)
    end_released_runs(points.release_stale_trials(study))
    if not finalize_only:
        if not created:
            studies.wait_for_parent(study)
        if spec.grid or spec.first:
            points.queue_points(study, spec)
    return study


def log_setup(family: Family, ref: StudyRef) -> None:
    """The search's own params, text artifacts and dataset on its parent run."""
    tracking.log_params_safe(
        {"study_name": ref.study_name, "storage": studies.redact_storage(ref.storage)}
    )
    tracking.log_params_safe(dict(family.params))
    for path, text in family.texts.items():
        mlflow.log_text(text, path)
    tracking.log_dataset(family.digest, context="train")


def finish(
    study, family: Family, outcome: SearchOutcome, exit_codes: list[int], finalize_only: bool
) -> None:
    """Log the summary and finalize when every point is done and this worker wins the lock.

    Nothing while other workers still train points (they finish the search); a grid with
    missing points raises ``SearchIncomplete``.
    """
    spec, summary = family.spec, outcome.summary
    if summary.held and not summary.missing and not finalize_only:
        print(
            f"{len(summary.held)} points are still being trained by other workers "
            f"({', '.join(summary.held)}); the worker that finishes the last one logs "
            "the table and registers the winner.",
            file=sys.stderr,
        )
        return
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
        round_name = f"-{len(summary.rows)}" + ("-model" if family.finalize else "")
    if outcome.finalized is None and studies.claim_finalization(
        outcome.ref, finalize_only, round_name
    ):
        if summary.rows:
            figures = summaries.study_figures(study)
            log_search_summary(summary.rows, family.title, figures, summary.best)
        if family.finalize is not None and summary.best is not None:
            outcome.final = dict(family.finalize(outcome))
            outcome.finalized = outcome.final.get("model_uri")
        studies.record_finalized(study, outcome.finalized, not spec.grid, len(summary.rows))


# --- the parent run --------------------------------------------------------------------------


@contextmanager
def parent_run(
    study,
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
    all_tags = {"entry_point": spec.entry_point, "model_family": spec.family, **(tags or {})}
    recorded = study.user_attrs.get(studies.PARENT_RUN)
    own = os.environ.get("MLFLOW_RUN_ID")
    if recorded and recorded != own and run_exists(recorded):
        if own and outer_run_id is None:
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
        study.set_user_attr(studies.PARENT_RUN, run.info.run_id)
        yield run


# --- one trial -------------------------------------------------------------------------------


def run_trial(
    study,
    trial,
    spec: SearchSpec,
    data: SearchData,
    parent_run_id: str,
    lockstep: Lockstep | None = None,
    sharing: int = 1,
) -> None:
    """Train one point in a child run and tell the study how it ended (in ``lockstep`` with
    ``sharing`` points in all, when given).

    A diverged loss fails the trial for good (re-running would diverge again) and the search goes
    on; an interruption or any other error fails it for a retry and propagates.
    """
    started = time.perf_counter()
    run_id = None
    name = points.trial_point(trial)
    try:
        params = spec.space.suggest(trial)
        name = trial.user_attrs.get(POINT) or spec.space.point_name(params)
        tags = {
            "optuna_study": study.study_name,
            "optuna_trial": str(trial.number),
            "optuna_state": "RUNNING",
            "search_point": name,
        }
        with tracking.start_run(
            spec.entry_point, spec.family, run_name=name, parent_run_id=parent_run_id, tags=tags
        ) as run:
            run_id = run.info.run_id
            trial.set_user_attr(RUN_ID, run_id)
            with points.heartbeat(trial) as released:
                result = train_in_run(trial, spec, data, params, released, lockstep, sharing)
    except TrialReleased as exc:
        report(spec, f"trial {trial.number} {name}: stopped ({exc})")
        return  # its run ended FAILED; the worker that released the trial trains the point
    except TrainingDiverged as exc:
        fail_trial(study, trial, run_id, f"diverged: {exc}", final=True)
        report(spec, f"trial {trial.number} {name}: failed for good ({exc})")
        return
    except KeyboardInterrupt:
        fail_trial(study, trial, run_id, "interrupted", final=False)
        raise
    except BaseException as exc:
        fail_trial(study, trial, run_id, f"{type(exc).__name__}: {exc}", final=False)
        raise
    seconds = time.perf_counter() - started
    if result is None:
        points.finish_pruned(study, trial, seconds)
        report(spec, f"trial {trial.number} {name}: pruned after {seconds:.1f} s")
        return
    points.finish_complete(study, trial, result.best_val_accuracy, result.best_epoch, seconds)
    report(
        spec,
        f"trial {trial.number} {name}: val_accuracy {result.best_val_accuracy:.4f} "
        f"(epoch {result.best_epoch}) in {seconds:.1f} s",
    )


def train_in_run(
    trial,
    spec: SearchSpec,
    data: SearchData,
    params: Mapping[str, Any],
    released: threading.Event | None = None,
    lockstep: Lockstep | None = None,
    sharing: int = 1,
) -> engine.FitResult | None:
    """Fit the point inside its active child run; None when the pruner stopped it. Raises
    ``TrialReleased`` at the end of an epoch when ``released`` is set. In ``lockstep``, its
    epochs are trained with the group's (``fit_cpu_seconds``: the process's CPU time over the
    ``sharing`` points)."""
    built = build_point(trial.number, spec, data, params, lockstep)
    cfg = built.train.replace(
        epochs=spec.epochs, seed=spec.seed, device=spec.device, quiet=spec.quiet
    )
    tracking.log_params_safe(
        {
            **params,
            **built.fit_params,
            **{f"model.{k}": v for k, v in built.spec.items()},
            "epochs": spec.epochs,
            "seed": spec.seed,
            "trial_number": trial.number,
        }
    )
    log_epoch = tracking.EpochLogger()

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        log_epoch(epoch, {k: metrics[k] for k in EPOCH_METRICS if k in metrics})
        if released is not None and released.is_set():
            raise TrialReleased("another worker took the trial back: this one missed its beats")
        if points.should_prune(trial, metrics["val_accuracy"], epoch, spec.prune):
            raise TrialPruned(f"pruned after epoch {epoch}")

    cpu_started = time.process_time()
    try:
        result = engine.fit(built.trainable, data.train, data.val, cfg, on_epoch_end=on_epoch_end)
    except TrialPruned:
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
            "fit_cpu_seconds": (time.process_time() - cpu_started) / sharing,
        }
    )
    log_model_files(built.spec, built.model, CHECKPOINT_DIR)  # the best epoch's weights
    mlflow.log_dict({"history": result.history}, HISTORY_FILE)
    mlflow.set_tag("optuna_state", "COMPLETE")
    return result


def build_point(
    number: int,
    spec: SearchSpec,
    data: SearchData,
    params: Mapping[str, Any],
    lockstep: Lockstep | None,
) -> Built:
    """The point's untrained model and settings, seeded; in ``lockstep``, joined to its group
    (or leaving it when the model has no lockstep epoch)."""
    if lockstep is not None:
        lockstep.set_up(number)  # seeding and building are process-wide: one at a time
    # The initial weights depend on the seed alone, not on what this process trained before.
    seed_everything(spec.seed)
    built = spec.space.build(params, data.context)
    if lockstep is not None:
        join = getattr(built.trainable, "train_in_lockstep", None)
        if join is None:
            lockstep.leave(number)  # a model without a lockstep epoch trains alone
        else:
            join(lockstep, number)
    return built


def end_released_runs(trials) -> None:
    """End FAILED the child runs of trials released from dead workers (the workers never will),
    with the reason recorded; their points are trained again."""
    tracking.configure()
    for trial in trials:
        worker = trial.user_attrs.get(studies.WORKER, "an unknown worker")
        name = points.trial_point(trial)
        print(
            f"trial {trial.number} {name}: its worker {worker} stopped beating or died; "
            "released, the point is trained again.",
            file=sys.stderr,
            flush=True,
        )
        reason = f"worker {worker} stopped; released by {studies.worker_id()}"
        fail_run(trial.user_attrs.get(RUN_ID), {"optuna_state": "FAIL", "error": reason})


def fail_trial(study, trial, run_id: str | None, reason: str, final: bool) -> None:
    points.finish_failed(study, trial, reason, final)
    if run_id:
        mlflow.MlflowClient().set_tag(run_id, "optuna_state", "FAIL")


def report(spec: SearchSpec, line: str) -> None:
    if not spec.quiet:
        print(line, flush=True)


def load_trial_model(run_id: str) -> tuple[nn.Module, dict[str, Any], list[dict[str, float]]]:
    """A trial's best-epoch model (eval mode), its spec and its per-epoch history."""
    model, spec = load_run_model(run_id, CHECKPOINT_DIR)
    history = mlflow.artifacts.load_dict(f"runs:/{run_id}/{HISTORY_FILE}")["history"]
    return model, spec, history
