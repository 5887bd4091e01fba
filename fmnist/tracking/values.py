"""What a run holds: params logged once (a second value goes under ``cfg.<key>``), finite
metrics only (NaN breaks charts), epochs in batches kept while the server is away, data, tables;
no value logged carries a password or a home path."""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.data.http_dataset_source import HTTPDatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric

from fmnist.config import redact_uri
from fmnist.tracking.outage import OUTAGE

DATASET_URL = "https://github.com/zalandoresearch/fashion-mnist"
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit for one log_batch call


def safe_text(text: str) -> str:
    """What may be logged of a value: no password in a URI, no absolute home path (``~``)."""
    text, home = redact_uri(text), str(Path.home())
    if len(home) > 1:  # a home of "/" would turn every absolute path into "~"
        text = re.sub(re.escape(home) + r"(?=/|\b|$)", "~", text)
    return text


def format_param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    return value.name if isinstance(value, Path) else safe_text(str(value))


def log_params_safe(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Log params not logged with the same value yet; return what was logged. A key logged with
    another value (``mlflow run`` logs first) keeps it: the new one goes under ``cfg.<key>``."""
    run = mlflow.active_run()
    existing = OUTAGE.ride_out(lambda: mlflow.get_run(run.info.run_id)).data.params if run else {}
    to_log: dict[str, str] = {}
    for key, value in params.items():
        full, text = f"{prefix}{key}", format_param(value)
        if full in existing and existing[full] != text:
            full = f"cfg.{full}"
        if existing.get(full) != text:
            to_log[full] = text
    if to_log:
        OUTAGE.ride_out(lambda: mlflow.log_params(to_log))  # the same values again: harmless
    return to_log


def log_changing_params(params: Mapping[str, Any], prefix: str) -> None:
    """Log ``params`` as ``<prefix><key>`` that may change between attempts (a resumed search's
    new best): a second value under ``cfg.<prefix><key>``, a third not at all."""
    run = mlflow.active_run()
    existing = mlflow.get_run(run.info.run_id).data.params if run else {}
    values = {}
    for key, value in params.items():
        text, name = format_param(value), f"{prefix}{key}"
        if existing.get(name, text) == text or existing.get(f"cfg.{name}", text) == text:
            values[name] = value
    log_params_safe(values)


def finite_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def log_metrics_finite(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Log the finite numeric entries of ``metrics`` (NaN would break charts and comparisons)."""
    clean = finite_metrics(metrics)
    if clean:
        timestamp = int(time.time() * 1000)  # one timestamp: a repeated write is the same rows
        OUTAGE.ride_out(lambda: mlflow.log_metrics(clean, step=step, timestamp=timestamp))


def logged_steps(run_id: str, metric: str) -> set[int]:
    return {m.step for m in MlflowClient().get_metric_history(run_id, metric)}


class EpochLogger:
    """``engine.fit``'s ``on_epoch_end``: finite metrics at ``step=epoch``, written at most every
    ``interval`` s (a database write costs half a dense epoch), kept while the server is away,
    and on ``flush``. ``skip``: epochs the run holds already (trained again after a kill)."""

    def __init__(self, interval: float = 1.0, skip: frozenset[int] = frozenset()) -> None:
        self.run_id = mlflow.active_run().info.run_id
        self.interval, self.skip = interval, skip
        self.pending: list[Metric] = []  # not written yet
        self.written = time.monotonic()

    def __call__(self, epoch: int, metrics: Mapping[str, float]) -> None:
        if epoch in self.skip:
            return
        now = int(time.time() * 1000)
        self.pending += [Metric(k, v, now, epoch) for k, v in finite_metrics(metrics).items()]
        if time.monotonic() - self.written >= self.interval:
            OUTAGE.attempt(self.write)

    def flush(self) -> None:
        OUTAGE.ride_out(self.write)  # waits for a server that went away

    def write(self) -> None:
        client = MlflowClient()
        while self.pending:
            batch = self.pending[:MAX_METRICS_PER_BATCH]
            client.log_batch(self.run_id, batch)
            del self.pending[: len(batch)]  # written: a retry after an error must not repeat it
        self.written = time.monotonic()

    def flush_quietly(self) -> None:
        try_quietly(self.write, lambda: f"{len(self.pending)} epoch metrics")


def try_quietly(action: Callable[[], Any], what: Callable[[], str]) -> None:
    """One try of ``action`` while another error is on its way: a failure only warns that
    ``what()`` was not logged, never replacing that error."""
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - the error in flight matters more
        warnings.warn(f"{what()} not logged: {exc}", RuntimeWarning, 3)


def log_dataset(digest: str, context: str, name: str = "fashion-mnist") -> None:
    """Name the exact data of a run: a dataset input with the arrays' digest, and a tag."""
    dataset = MetaDataset(source=HTTPDatasetSource(DATASET_URL), name=name, digest=digest)
    mlflow.log_input(dataset, context=context)
    mlflow.set_tag("data_digest", digest)


def log_table_replacing(columns: Mapping[str, list], artifact_file: str) -> None:
    """``mlflow.log_table`` replacing a table already there (``log_table`` would append)."""
    folder, name = artifact_file.rsplit("/", 1)
    run_id = mlflow.active_run().info.run_id
    if artifact_file not in {a.path for a in MlflowClient().list_artifacts(run_id, folder)}:
        mlflow.log_table(dict(columns), artifact_file)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name  # the file log_table writes, so the UI shows it as a table
        pd.DataFrame(dict(columns)).to_json(path, orient="split", index=False, date_format="iso")
        mlflow.log_artifact(str(path), folder)
