"""MLflow tracking: one way for every command to open, tag, fill and close its runs.

The store is ``MLFLOW_TRACKING_URI`` when set, else MLflow's embedded ``sqlite:///mlflow.db`` in
the working directory. Under ``mlflow run`` the run already exists (``MLFLOW_RUN_ID``): the first
run a command opens resumes it and never switches experiment; called directly, a command creates
its own run in ``--experiment-name``. A run that raises ends FAILED (KILLED on Ctrl-C) with the
error recorded, and params that ``mlflow run`` already logged are never re-logged with another
value.

A tracking server that goes away once a run is open is ridden out (``Outage``): epoch metrics
and checkpoints are kept and written, in order and with their steps, when it answers again, while
training goes on; the calls that must land before the command can go on (a run's end, a trial's
start, a final flush) wait for it. Past ``FMNIST_TRACKING_OUTAGE_SECONDS`` (default 300) of
silence the command stops with ``TrackingUnavailable``. The first contact still fails fast.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric

from fmnist.config import DEFAULT_EXPERIMENT, redact_uri
from fmnist.tracking.heartbeat import BEAT, clean_once
from fmnist.tracking.outage import (
    OUTAGE,
    TrackingUnavailable,
    server_unreachable,
    tracking_uri,
)
from fmnist.tracking.resume import CHILD_TAGS
from fmnist.tracking.store import prepare_store
from fmnist.tracking.ui import RANDOM_NAME, mark_model_development

DATASET_URL = "https://github.com/zalandoresearch/fashion-mnist"
# An unreachable server must fail fast, not after MLflow's default minutes of retries.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def safe_text(text: str) -> str:
    """What may be logged of a value: no password in a URI, no absolute home path (``~``)."""
    text = redact_uri(text)
    home = str(Path.home())
    if len(home) > 1:  # a home of "/" would turn every absolute path into "~"
        text = re.sub(re.escape(home) + r"(?=/|\b|$)", "~", text)
    return text


def configure() -> str:
    """Point MLflow at the project's store; return the URI in use."""

    for key, value in HTTP_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
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

    try:
        configure()
        client = mlflow.MlflowClient()
        run_id = os.environ["MLFLOW_RUN_ID"]
        message = safe_text(message)
        client.set_tag(run_id, "error", message[:5000])
        client.set_tag(run_id, "mlflow.note.content", f"Failed: {message}")
        client.set_terminated(run_id, status="FAILED")
    except Exception:  # noqa: BLE001 - the store itself may be the problem; the message still prints
        pass


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
    """Open (or resume, under ``mlflow run``) a run tagged with entry point and model family.

    The outermost run of a process resumes ``MLFLOW_RUN_ID`` when it is set (renamed when
    MLflow gave it a random name); runs opened inside another active run, or with
    ``parent_run_id``, are nested children. The run ends FINISHED, FAILED (exception, error
    recorded as a tag) or KILLED (KeyboardInterrupt). A child run (a search trial) waits for a
    tracking server that went away; the outermost run does not (the first contact fails fast).
    ``system_metrics``: MLflow's own CPU, memory (and GPU) sampling, for training runs.
    """

    configure()
    active = mlflow.active_run()
    is_child = nested or parent_run_id is not None or active is not None
    all_tags = {"entry_point": entry_point, "model_family": model_family, **(tags or {})}
    all_tags.update(BEAT.tags())
    all_tags.update(CHILD_TAGS.get(parent_run_id or "", {}))
    sampled = system_metrics and importlib.util.find_spec("psutil") is not None
    if not is_child and under_mlflow_run():
        run = mlflow.start_run(run_id=os.environ["MLFLOW_RUN_ID"], log_system_metrics=sampled)
        if run_name and RANDOM_NAME.fullmatch(run.info.run_name or ""):
            mlflow.set_tag("mlflow.runName", run_name)  # not MLflow's sneaky-moose-235
        mark_model_development(run.info.experiment_id)
    elif not is_child:
        mark_model_development(mlflow.set_experiment(experiment_name).experiment_id)
        run = mlflow.start_run(run_name=run_name, tags=all_tags, log_system_metrics=sampled)
    else:
        parent = parent_run_id or active.info.run_id
        run = start_child_run(parent, run_name, all_tags, sampled)
    mlflow.set_tags(all_tags)
    with ending_run(run.info.run_id):
        yield run


@contextmanager
def reopen_run(
    run_id: str, tags: Mapping[str, str] | None = None, system_metrics: bool = False
) -> Iterator[Any]:
    """Resume an ended run (a resumed search's parent, a resumed CNN) and end it as above.

    On success an earlier attempt's ``error`` tag is removed: it no longer describes the run.
    """

    configure()
    sampled = system_metrics and importlib.util.find_spec("psutil") is not None
    nested = mlflow.active_run() is not None
    run = mlflow.start_run(run_id=run_id, nested=nested, log_system_metrics=sampled)
    mlflow.set_tags({**(tags or {}), **BEAT.tags()})
    with ending_run(run_id, clear_error=True):
        yield run


@contextmanager
def ending_run(run_id: str, clear_error: bool = False) -> Iterator[None]:
    """End the active run ``run_id`` FINISHED, FAILED (error recorded) or KILLED (Ctrl-C).

    ``clear_error`` removes an earlier attempt's ``error`` tag on success (a reopened run).
    """

    BEAT.hold(run_id)
    try:
        yield
    except KeyboardInterrupt:
        record_error("interrupted")
        end_active_run(run_id, "KILLED", quietly=True)
        raise
    except BaseException as exc:
        record_error(f"{type(exc).__name__}: {exc}")
        end_active_run(run_id, "FAILED", quietly=True)
        raise
    else:
        if clear_error and "error" in OUTAGE.ride_out(lambda: mlflow.get_run(run_id)).data.tags:
            OUTAGE.ride_out(lambda: MlflowClient().delete_tag(run_id, "error"))
        end_active_run(run_id, "FINISHED")
    finally:
        BEAT.release(run_id)


def end_active_run(run_id: str, status: str, quietly: bool = False) -> None:
    """End the active run ``run_id``; a server that went away gets its status when it is back.

    ``quietly`` (an error is already on its way): an outage that lasts too long leaves the run
    RUNNING with a warning instead of replacing that error.
    """
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


def start_child_run(
    parent_run_id: str, run_name: str | None, tags: Mapping[str, str], system_metrics=False
):
    """Create a child run explicitly and make it active.

    ``mlflow.start_run()`` would resume ``MLFLOW_RUN_ID`` under ``mlflow run``, and the active run
    is per thread, so neither names the parent reliably.
    """

    client = mlflow.MlflowClient()
    parent = OUTAGE.ride_out(lambda: client.get_run(parent_run_id))
    # a run created twice would stay RUNNING for good: sent again only if it never arrived
    child = OUTAGE.ride_out(
        lambda: client.create_run(
            parent.info.experiment_id,
            run_name=run_name,
            tags={**tags, "mlflow.parentRunId": parent_run_id},
        ),
        resend_safe=False,
    )
    nested, run_id = mlflow.active_run() is not None, child.info.run_id
    return OUTAGE.ride_out(
        lambda: mlflow.start_run(run_id=run_id, nested=nested, log_system_metrics=system_metrics)
    )


def record_error(message: str) -> None:

    text = safe_text(message)[:5000]  # messages may quote URIs and paths
    try:
        OUTAGE.ride_out(lambda: mlflow.set_tag("error", text))
    except Exception:  # noqa: BLE001 - never hide the original error behind a logging error
        pass


def log_params_safe(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Log params, skipping keys already logged with the same value; return what was logged.

    A key already logged with a different value (``mlflow run`` logs entry-point parameters
    first) is kept as it is and the new value goes under ``cfg.<key>`` instead.
    """

    run = mlflow.active_run()
    existing = OUTAGE.ride_out(lambda: mlflow.get_run(run.info.run_id)).data.params if run else {}
    to_log: dict[str, str] = {}
    for key, value in params.items():
        full = f"{prefix}{key}"
        text = format_param(value)
        if full in existing:
            if existing[full] == text:
                continue
            full = f"cfg.{full}"
            if existing.get(full) == text:
                continue
        to_log[full] = text
    if to_log:
        OUTAGE.ride_out(lambda: mlflow.log_params(to_log))  # the same values again: harmless
    return to_log


def format_param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    if isinstance(value, Path):
        return value.name
    return safe_text(str(value))


def log_metrics_finite(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log the finite numeric entries of ``metrics`` (NaN would break charts and comparisons)."""

    clean = finite_metrics(metrics)
    if clean:
        timestamp = int(time.time() * 1000)  # one timestamp: a repeated write is the same rows
        OUTAGE.ride_out(lambda: mlflow.log_metrics(clean, step=step, timestamp=timestamp))


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


class EpochLogger:
    """``engine.fit``'s ``on_epoch_end`` for the active run: each epoch's finite metrics at
    ``step=epoch``, written in one batch at most every ``interval`` seconds and on ``flush``.

    A database write costs about 5 ms, half a dense grid epoch's training; batching keeps the
    tracking overhead of a fast loop small, while an epoch longer than ``interval`` (any CNN)
    is still written as it ends. The caller flushes in a ``finally`` so that an interrupted or
    pruned run keeps every epoch it trained; MLflow's asynchronous logging would not need that,
    but its flush waits a second for its worker thread, longer than a whole dense trial's logging.

    While the tracking server is away (``Outage``) the epochs are kept and training goes on;
    ``flush`` waits for the server and writes them in order, each with its step and the time it
    ended.
    """

    def __init__(self, interval: float = 1.0, skip: frozenset[int] = frozenset()) -> None:
        self.run_id = mlflow.active_run().info.run_id
        self.interval, self.skip = interval, skip  # ``skip``: epochs the run holds already
        self.pending: list = []
        self.written = time.monotonic()

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if epoch in self.skip:
            return  # trained again after a kill, from the checkpoint before it: the same values
        now = int(time.time() * 1000)
        self.pending += [Metric(k, v, now, epoch) for k, v in finite_metrics(metrics).items()]
        if time.monotonic() - self.written >= self.interval:
            OUTAGE.attempt(self.write)

    def flush(self) -> None:
        """Write every kept epoch, waiting for a tracking server that went away."""
        OUTAGE.ride_out(self.write)

    def write(self) -> None:

        client = MlflowClient()
        while self.pending:
            batch = self.pending[:MAX_METRICS_PER_BATCH]
            client.log_batch(self.run_id, batch)
            del self.pending[: len(batch)]  # written: a retry after an error must not repeat it
        self.written = time.monotonic()

    def flush_quietly(self) -> None:
        """``flush`` while another error is on its way: a failing store must not replace it."""
        try:
            self.write()  # one try: an interrupted command must not wait for a server
        except Exception as exc:  # noqa: BLE001 - the error in flight matters more
            warnings.warn(
                f"{len(self.pending)} epoch metrics not logged: {exc}", RuntimeWarning, 2
            )


MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call


def logged_steps(run_id: str, metric: str) -> set[int]:
    """The steps at which run ``run_id`` logged ``metric``."""
    return {m.step for m in MlflowClient().get_metric_history(run_id, metric)}


def log_dataset(digest: str, context: str, name: str = "fashion-mnist") -> None:
    """Name the exact data of a run: a dataset input with the arrays' digest, and a tag."""

    dataset = MetaDataset(source=HTTPDatasetSource(DATASET_URL), name=name, digest=digest)
    mlflow.log_input(dataset, context=context)
    mlflow.set_tag("data_digest", digest)


def log_text_artifact(text: str, artifact_file: str) -> None:

    mlflow.log_text(text, artifact_file)


def log_table_replacing(columns: Mapping[str, list], artifact_file: str) -> None:
    """``mlflow.log_table``, but a table already there (a resumed search's summary) is
    replaced: ``log_table`` would append the new rows to the old ones."""
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


def log_changing_params(params: Mapping[str, Any], prefix: str) -> None:
    """Log ``params`` as ``<prefix><key>`` where they may differ from an earlier attempt's.

    A resumed search may find a new best; MLflow params never change, so a second value goes
    under ``cfg.<prefix><key>`` (``log_params_safe``) and a later one is not logged again (the
    caller keeps the whole set in a file as well).
    """
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    values = {}
    for key, value in params.items():
        text, name = format_param(value), f"{prefix}{key}"
        taken = existing.get(name, text) != text and existing.get(f"cfg.{name}", text) != text
        if not taken:
            values[name] = value
    log_params_safe(values)
