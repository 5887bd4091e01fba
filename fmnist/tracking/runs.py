"""MLflow runs: one way for every command to open, tag and close its runs in the store
``MLFLOW_TRACKING_URI`` (else ``sqlite:///mlflow.db``). Under ``mlflow run`` a command's first run
resumes the one it made (``MLFLOW_RUN_ID``), else it is created in ``--experiment-name``. A run
that raises ends FAILED (KILLED on Ctrl-C), the error recorded. A server that goes away once a
run is open is ridden out (``outage``); the first contact fails fast."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

import mlflow
from mlflow import MlflowClient

from fmnist.config import DEFAULT_EXPERIMENT
from fmnist.tracking.heartbeat import BEAT, clean_once
from fmnist.tracking.outage import OUTAGE, TrackingUnavailable, server_unreachable, tracking_uri
from fmnist.tracking.resume import CHILD_TAGS
from fmnist.tracking.store import prepare_store
from fmnist.tracking.ui import RANDOM_NAME, mark_model_development
from fmnist.tracking.values import safe_text


def configure() -> str:
    """Point MLflow at the project's store; return the URI in use."""
    # an unreachable server must fail fast, not after MLflow's default minutes of retries
    for key, value in (("MAX_RETRIES", "2"), ("BACKOFF_FACTOR", "1"), ("TIMEOUT", "10")):
        os.environ.setdefault(f"MLFLOW_HTTP_REQUEST_{key}", value)
    uri = tracking_uri()
    if uri.startswith("sqlite:"):  # no pooled connection for a forked search worker to share
        os.environ.setdefault("MLFLOW_SQLALCHEMYSTORE_POOLCLASS", "NullPool")
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # it says so
    mlflow.set_tracking_uri(uri)
    prepare_store(uri)  # a fresh SQLite store: one process of the machine creates its tables
    clean_once(uri)  # runs left RUNNING by killed processes end KILLED
    return uri


def under_mlflow_run() -> bool:
    """True when ``mlflow run`` started this process and created its run."""
    return bool(os.environ.get("MLFLOW_RUN_ID"))


def fail_pending_run(message: str) -> None:
    """Under ``mlflow run``, record ``message`` on the run it created and end it FAILED."""
    if not under_mlflow_run():
        return
    with suppress(Exception):  # the store itself may be the problem; the message still prints
        configure()
        client, run_id, message = MlflowClient(), os.environ["MLFLOW_RUN_ID"], safe_text(message)
        client.set_tag(run_id, "error", message[:5000])
        client.set_tag(run_id, "mlflow.note.content", f"Failed: {message}")
        client.set_terminated(run_id, status="FAILED")


@contextmanager
def start_run(
    entry_point: str,
    model_family: str = "none",
    experiment_name: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    nested: bool = False,
    system_metrics: bool = False,
) -> Iterator[Any]:
    """Open a run tagged with entry point and model family, ended by ``ending_run``. A process's
    outermost run resumes ``MLFLOW_RUN_ID`` when set; runs opened in another active run, or with
    ``parent_run_id``, are children, which wait for a server that went away."""
    configure()
    active = mlflow.active_run()
    all_tags = {"entry_point": entry_point, "model_family": model_family, **(tags or {})}
    all_tags |= BEAT.tags() | CHILD_TAGS.get(parent_run_id or "", {})
    sampled = system_metrics and importlib.util.find_spec("psutil") is not None
    if nested or parent_run_id is not None or active is not None:
        # created explicitly: mlflow.start_run() would resume MLFLOW_RUN_ID under `mlflow run`,
        # and the active run is per thread
        client, parent_id = MlflowClient(), parent_run_id or active.info.run_id
        parent = OUTAGE.ride_out(lambda: client.get_run(parent_id))
        # a run created twice would stay RUNNING for good: sent again only if it never arrived
        experiment = parent.info.experiment_id
        new = {"run_name": run_name, "tags": {**all_tags, "mlflow.parentRunId": parent_id}}
        child = OUTAGE.ride_out(lambda: client.create_run(experiment, **new), resend_safe=False)
        run_id, in_run = child.info.run_id, active is not None
        run = OUTAGE.ride_out(
            lambda: mlflow.start_run(run_id=run_id, nested=in_run, log_system_metrics=sampled)
        )
    elif under_mlflow_run():
        run = mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"], log_system_metrics=sampled)
        if run_name and RANDOM_NAME.fullmatch(run.info.run_name or ""):
            mlflow.set_tag("mlflow.runName", run_name)  # not MLflow's sneaky-moose-235
        mark_model_development(run.info.experiment_id)
    else:
        mark_model_development(mlflow.set_experiment(experiment_name).experiment_id)
        run = mlflow.start_run(run_name=run_name, tags=all_tags, log_system_metrics=sampled)
    mlflow.set_tags(all_tags)
    with ending_run(run.info.run_id):
        yield run


@contextmanager
def reopen_run(
    run_id: str, tags: Mapping[str, str] | None = None, system_metrics: bool = False
) -> Iterator[Any]:
    """Resume an ended run (a resumed search's parent, a resumed CNN) and end it as above; on
    success an earlier attempt's ``error`` tag goes (it no longer describes the run)."""
    configure()
    sampled = system_metrics and importlib.util.find_spec("psutil") is not None
    nested = mlflow.active_run() is not None
    run = mlflow.start_run(run_id=run_id, nested=nested, log_system_metrics=sampled)
    mlflow.set_tags({**(tags or {}), **BEAT.tags()})
    with ending_run(run_id, clear_error=True):
        yield run


@contextmanager
def ending_run(run_id: str, clear_error: bool = False) -> Iterator[None]:
    """End the active run ``run_id`` FINISHED, FAILED (error recorded) or KILLED (Ctrl-C)."""
    BEAT.hold(run_id)
    try:
        yield
    except BaseException as exc:
        interrupted = isinstance(exc, KeyboardInterrupt)
        # messages may quote URIs and paths
        text = safe_text("interrupted" if interrupted else f"{type(exc).__name__}: {exc}")
        with suppress(Exception):  # never hide the original error behind a logging error
            OUTAGE.ride_out(lambda: mlflow.set_tag("error", text[:5000]))
        end_active_run(run_id, "KILLED" if interrupted else "FAILED", quietly=True)
        raise
    else:
        if clear_error and "error" in OUTAGE.ride_out(lambda: mlflow.get_run(run_id)).data.tags:
            OUTAGE.ride_out(lambda: MlflowClient().delete_tag(run_id, "error"))
        end_active_run(run_id, "FINISHED")
    finally:
        BEAT.release(run_id)


def end_active_run(run_id: str, status: str, quietly: bool = False) -> None:
    """End the active run ``run_id``; a server that went away gets its status when it is back.
    ``quietly`` (an error is on its way): a too long outage leaves the run RUNNING, warned."""
    try:
        mlflow.end_run(status)
        return
    except Exception as exc:
        if not server_unreachable(exc):
            raise
    # mlflow.end_run took the run off the active stack before it failed: only its status is left
    try:
        OUTAGE.ride_out(lambda: MlflowClient().set_terminated(run_id, status))
    except TrackingUnavailable:
        if not quietly:
            raise
        print(
            f"Run {run_id} could not be marked {status}: the tracking server is still away; "
            "it stays RUNNING until the command runs again.",
            file=sys.stderr,
        )
