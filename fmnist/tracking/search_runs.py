"""What a search records in MLflow: each trial's child run (epochs, best-epoch weights in
``checkpoint/``, history) and the parent run (the table in ``search/``, Optuna's figures, the best
trial as ``best_*``). It gets plain values: nothing here knows Optuna."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow

# Imported here, before a search forks its workers, rather than by each worker's first trial
# (0.7 s on 2 cores); the finalizing process needs them too.
import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
from mlflow.exceptions import MlflowException

from fmnist.analysis.report import markdown_table
from fmnist.errors import ConfigError
from fmnist.tracking.artifacts import read_model_files, write_model_files
from fmnist.tracking.runs import reopen_run, start_run
from fmnist.tracking.values import (
    log_changing_params,
    log_dataset,
    log_metrics_finite,
    log_params_safe,
    log_table_replacing,
)

if TYPE_CHECKING:  # search workers import this module, and they draw nothing (0.3 s less)
    from matplotlib.figure import Figure

SUMMARY_DIR = "search"
CHECKPOINT_DIR = "checkpoint"  # child-run artifacts: best-epoch state dict and model spec
HISTORY_FILE = "history.json"
ELSEWHERE = "is not in this tracking store: use its store, or a new --study-name or --storage"


@contextmanager
def trial_run(spec, parent_run_id: str, name: str, tags: Mapping[str, str]) -> Iterator[Any]:
    """A trial's child run (``spec``: entry point and family), tagged with its Optuna state."""
    tags = {**tags, "optuna_state": "RUNNING"}
    with start_run(
        spec.entry_point, spec.family, run_name=name, parent_run_id=parent_run_id, tags=tags
    ) as run:
        try:
            yield run
        except BaseException:
            mlflow.set_tag("optuna_state", "FAIL")
            raise


def log_trial_result(result, spec, model, cpu_seconds: float) -> None:
    """A finished trial's best epoch, best-epoch weights and history (``result``: FitResult)."""
    best = {"best_val_accuracy": result.best_val_accuracy, "best_epoch": result.best_epoch}
    # CPU time, unlike wall time, does not grow when other processes share the cores
    log_metrics_finite({**best, "fit_seconds": result.seconds, "fit_cpu_seconds": cpu_seconds})
    with tempfile.TemporaryDirectory() as tmp:
        write_model_files(Path(tmp), spec, model)
        mlflow.log_artifacts(tmp, CHECKPOINT_DIR)
    mlflow.log_dict({"history": result.history}, HISTORY_FILE)
    mlflow.set_tag("optuna_state", "COMPLETE")


def load_trial_model(run_id: str):
    """A trial's best-epoch model (eval mode), its spec and its per-epoch history."""
    # a progress bar per downloaded file would only clutter the command's output
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_DIR)
    model, spec = read_model_files(Path(folder))
    history = mlflow.artifacts.load_dict(f"runs:/{run_id}/{HISTORY_FILE}")["history"]
    return model, spec, history


def set_tags(tags: Mapping[str, str]) -> None:
    mlflow.set_tags(dict(tags))


@contextmanager
def parent_run(recorded, entry_point, family, experiment_name, run_name, outer_run_id, tags):
    """A search's parent run: ``recorded`` (the study's) while it exists, else a new one; under
    ``mlflow run`` the run it made for a resumed search is tagged with the recorded parent."""
    own = os.environ.get("MLFLOW_RUN_ID")
    if recorded and recorded != own and run_exists(recorded):
        if own and outer_run_id is None:
            mlflow.MlflowClient().set_tag(own, "search_parent_run_id", recorded)
        with reopen_run(recorded, tags, system_metrics=True) as run:
            yield run
        return
    with start_run(
        entry_point, family, experiment_name, run_name, tags, outer_run_id, system_metrics=True
    ) as run:
        yield run


def log_search_setup(params: Mapping[str, Any], texts: Mapping[str, str], digest: str) -> None:
    """The search's own params, text artifacts and dataset on its parent run."""
    log_params_safe(dict(params))
    for path, text in texts.items():
        mlflow.log_text(text, path)
    log_dataset(digest, context="train")


def log_search_summary(
    rows: Sequence[Mapping[str, Any]],
    title: str,
    figures: Sequence[tuple[str, Figure | None, str]],
    best: Any | None,
) -> None:
    """Into the active (parent) run: the table, the figures (``(name, figure or None, why
    not)``), point counts and the best trial's ``best_*`` params and metrics."""
    columns = {key: [row.get(key) for row in rows] for key in rows[0]}
    log_table_replacing(columns, f"{SUMMARY_DIR}/table.json")
    mlflow.log_text(f"# {title}\n\n" + markdown_table(rows), f"{SUMMARY_DIR}/table.md")
    for name, figure, reason in figures:
        if figure is None:
            mlflow.log_text(f"not drawn: {reason}\n", f"{SUMMARY_DIR}/{name}.txt")
        else:
            mlflow.log_figure(figure, f"{SUMMARY_DIR}/{name}")
    counts = Counter({"complete": 0, "pruned": 0})
    counts.update(str(row["state"]).lower() for row in rows)
    mlflow.log_metrics({f"points_{state}": float(n) for state, n in counts.items()})
    if best is None:
        return
    mlflow.log_dict(dict(best.params), f"{SUMMARY_DIR}/best_params.json")
    log_changing_params(best.params, prefix="best_")
    best_metrics = {"best_val_accuracy": best.value, "best_epoch": float(best.best_epoch)}
    mlflow.log_metrics({**best_metrics, "best_trial_number": float(best.number)})
    mlflow.set_tags({"best_point": best.point, "best_run_id": best.run_id})


def run_exists(run_id: str) -> bool:
    try:
        return mlflow.MlflowClient().get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":  # a study run against another store
            raise ConfigError(f"{run_id}, the study's parent run, {ELSEWHERE}") from None
        return False


def earlier_result(parent_run_id: str, model_uri: str | None) -> dict[str, Any]:
    """A finished search's test accuracy, alias and retrained run, from its parent run."""
    if not model_uri:
        return {}
    parent = mlflow.MlflowClient().get_run(parent_run_id)
    accuracy = parent.data.metrics.get("test_accuracy")
    return {
        "test_accuracy": round(accuracy, 4) if accuracy is not None else None,
        "alias": parent.data.tags.get("registered_alias"),
        "retrained_run_id": parent.data.tags.get("retrained_run_id"),
    }


def fail_run(run_id: str | None, tags: Mapping[str, str]) -> None:
    """End FAILED with ``tags`` the run of a trial whose worker died: RUNNING, KILLED by the
    cleaner, or FINISHED when the kill came after the run ended and before Optuna's tell."""
    client = mlflow.MlflowClient()
    with suppress(MlflowException):  # a run deleted meanwhile: nothing left to end
        if run_id and client.get_run(run_id).info.status != "FAILED":
            for key, value in tags.items():
                client.set_tag(run_id, key, value)
            client.set_terminated(run_id, status="FAILED")
