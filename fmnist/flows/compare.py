"""The ``compare`` entry point: the study's results regenerated from the runs found by their tags
in every experiment (wherever ``mlflow run`` put them), each model timed through its pyfunc.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np

from fmnist import tracking
from fmnist.analysis import comparison
from fmnist.analysis.comparison import Candidate
from fmnist.analysis.report import markdown_to_html
from fmnist.config import CompareConfig
from fmnist.data import load_fashion_mnist, scale_pixels
from fmnist.errors import FmnistError
from fmnist.tracking.registry import load_pyfunc

EDA_METRICS = ("pca_components_90", "pca_components_95")
FAMILIES = ("dnn", "cnn")


def search(filter_string: str) -> list:
    """The finished runs that match ``filter_string`` in every active experiment, newest first."""
    experiment_ids = [experiment.experiment_id for experiment in mlflow.search_experiments()]
    return mlflow.search_runs(
        experiment_ids=experiment_ids,
        filter_string=f"attributes.status = 'FINISHED' and {filter_string}",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )


def find_runs(include_quick: bool) -> list:
    """The training runs of both families with test metrics (never ``evaluate`` runs)."""
    runs = []
    for family in FAMILIES:
        tags = f"tags.model_family = '{family}' and tags.entry_point != 'evaluate'"
        runs += search(f"{tags} and metrics.test_accuracy >= 0")
    return [r for r in runs if include_quick or r.data.tags.get("quick", "").lower() != "true"]


def select_candidates(runs: list) -> list[Candidate]:
    """The best dense network by validation accuracy and the latest run of each CNN recipe."""

    def candidate(run, recipe: str) -> Candidate:
        info, data = run.info, run.data
        name = info.run_name or info.run_id[:8]
        return Candidate(info.run_id, name, data.tags["model_family"], recipe, dict(data.metrics))

    def score(run) -> tuple:
        return comparison.validation_accuracy(run.data.metrics) or 0.0, run.info.start_time

    dense = [r for r in runs if r.data.tags.get("model_family") == "dnn"]
    chosen = [candidate(max(dense, key=score), "grid-best")] if dense else []
    latest: dict[str, object] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        if run.data.tags.get("model_family") == "cnn":
            latest[run.data.tags.get("recipe") or run.data.params.get("recipe") or "cnn"] = run
    return chosen + [candidate(run, recipe) for recipe, run in sorted(latest.items())]


def evaluation_metrics(evaluations: list, run_id: str, model_uri: str | None) -> dict:
    """The metrics of the latest ``evaluate`` run of the model trained by ``run_id``, or {}."""
    version = None
    if model_uri and model_uri.startswith("models:/"):
        version = tuple(model_uri.removeprefix("models:/").split("/", 1))
    for run in evaluations:
        tags = run.data.tags
        linked = (tags.get("registered_model_name"), tags.get("registered_model_version"))
        if tags.get("source_run_id") == run_id or (version is not None and linked == version):
            return dict(run.data.metrics)
    return {}


def find_model_uri(client: mlflow.MlflowClient, run_id: str) -> str | None:
    """The registered version trained by this run (or one of its trials), else None."""
    run = client.get_run(run_id)
    if run.data.tags.get("registered_model_uri"):
        return run.data.tags["registered_model_uri"]
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run_id}'"
    )
    for candidate in [run_id] + [child.info.run_id for child in children]:
        versions = client.search_model_versions(f"run_id = '{candidate}'")
        if versions:
            latest = max(versions, key=lambda v: int(v.version))
            return f"models:/{latest.name}/{latest.version}"
    return None


def load_confusion(
    client: mlflow.MlflowClient, run_id: str, folder: str = ""
) -> np.ndarray | None:
    """The run's confusion matrix (counts) from its evaluation artifacts, if logged."""
    for item in client.list_artifacts(run_id, folder or None):
        if item.is_dir:
            found = load_confusion(client, run_id, item.path)
            if found is not None:
                return found
        elif (
            item.path.endswith(".json") and "confusion" in item.path and "normal" not in item.path
        ):
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(client.download_artifacts(run_id, item.path, tmp))
                content = json.loads(local.read_text())
            if isinstance(content, dict):  # older runs logged the counts as "matrix"
                content = content.get("matrix", content.get("counts"))
            if np.shape(content) == (10, 10):
                return np.asarray(content, dtype=float)
    return None


def measure_inference(model_uri: str, images: np.ndarray, repeats: int = 20) -> dict[str, float]:
    """Images per second on the whole batch and the median latency of one image (pyfunc)."""
    model = load_pyfunc(model_uri)
    model.predict(images[:2])  # warm-up
    start = time.perf_counter()
    model.predict(images)
    batch_seconds = time.perf_counter() - start
    latencies = []
    for i in range(repeats):
        start = time.perf_counter()
        model.predict(images[i % len(images)][None])
        latencies.append(time.perf_counter() - start)
    p50 = float(np.median(latencies)) * 1000
    return {"inference_images_per_second": len(images) / batch_seconds, "latency_p50_ms": p50}


def run_compare(cfg: CompareConfig, parent_run_id: str | None = None) -> dict:
    """Collect, measure and report; everything is logged into one ``compare`` run."""
    tracking.configure()
    client = mlflow.MlflowClient()
    experiment, quick = cfg.common.experiment_name, cfg.include_quick
    with tracking.start_run(
        "compare", "comparison", experiment, run_name="compare", parent_run_id=parent_run_id
    ) as run:
        candidates = select_candidates(find_runs(quick))
        if not candidates:
            raise FmnistError(
                "No finished dense-network or CNN run with test metrics was found in any "
                "experiment: train models first (fmnist dnn-search, fmnist cnn)."
            )
        evaluations = search("tags.entry_point = 'evaluate'")
        images = None
        if cfg.inference_images > 0:  # the first test images in [0, 1], the pyfunc's input
            test = load_fashion_mnist(cfg.common.data_dir or None).test_images
            images = scale_pixels(test[: cfg.inference_images].numpy())
        for c in candidates:
            c.model_uri = find_model_uri(client, c.run_id)
            c.confusion = load_confusion(client, c.run_id)
            c.evaluation = evaluation_metrics(evaluations, c.run_id, c.model_uri)
            if c.model_uri and images is not None:
                c.inference = measure_inference(c.model_uri, images)
        rows = comparison.summary_rows(candidates)
        found = [run.data.metrics for run in search("tags.entry_point = 'eda'")]
        eda = {key: next((m[key] for m in found if key in m), None) for key in EDA_METRICS}
        report = comparison.build_report(rows, candidates, eda)
        mlflow.log_table(comparison.summary_columns(rows), "comparison/summary.json")
        mlflow.log_text(report, "comparison/report.md")
        mlflow.log_text(markdown_to_html(report, "fmnist comparison"), "comparison/report.html")
        mlflow.log_figure(comparison.plot_f1_bars(candidates), "comparison/per_class_f1.png")
        confusions = comparison.plot_confusions(candidates)
        if confusions is not None:
            mlflow.log_figure(confusions, "comparison/confusion_matrices.png")
        compared = ",".join(c.run_id for c in candidates)
        tracking.log_params_safe({"include_quick": quick, "compared_runs": compared})
        best = max(rows, key=lambda r: r["test_accuracy"] or 0.0)
        best_accuracy = best["test_accuracy"] or 0.0
        mlflow.log_metrics({"best_test_accuracy": best_accuracy, "models_compared": len(rows)})
    summary = {"models": len(rows), "best": best["model"], "run_id": run.info.run_id}
    return summary | {"best_test_accuracy": best["test_accuracy"]}
