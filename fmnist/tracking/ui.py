"""What the MLflow UI shows of the project: the Runs view (``ui_url``; MLflow 3 opens its GenAI
overview otherwise), experiments tagged so it asks no "which kind" question, our run names for
those ``mlflow run`` created, and the pipeline run's headline metrics and model links."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput

from fmnist.tracking.outage import OUTAGE

RANDOM_NAME = re.compile(r"[a-z]+-[a-z]+-\d+")  # the names MLflow gives unnamed runs
KIND_TAG = "mlflow.experimentKind"  # MLflow 3's UI then asks no "which kind" question


def mark_model_development(experiment_id: str) -> None:
    client = MlflowClient()
    if KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, KIND_TAG, "custom_model_development")


def ui_url(experiment_id: str, base: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI's Runs view of an experiment (not the GenAI overview MLflow 3 opens)."""
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def log_headline(results: Mapping[str, Mapping[str, Any]], steps) -> None:
    """On the active (pipeline) run: each step's model's test accuracy and ECE as its run logged
    them (``dnn_test_accuracy``...), and the logged models as outputs, for the Runs view's row."""
    client, metrics, outputs = MlflowClient(), {}, []
    for step in steps:
        result = results.get(step) or {}
        if not result.get("model_uri"):
            continue
        source = result.get("retrained_run_id") or result["run_id"]
        logged = client.get_run(source).data.metrics
        family = step.split("_")[0]
        for name in ("test_accuracy", "test_ece"):
            if name in logged:
                metrics[f"{family}_{name}"] = logged[name]
        version = client.get_model_version(*result["model_uri"].split("/")[-2:])
        outputs.append(LoggedModelOutput(str(version.source).removeprefix("models:/"), step=0))
        mlflow.set_tag(f"{family}_model", result["model_uri"])
    if metrics:
        OUTAGE.ride_out(lambda: mlflow.log_metrics(metrics))
    if outputs:
        mlflow.log_outputs(models=outputs)
