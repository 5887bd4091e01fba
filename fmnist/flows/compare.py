"""The ``compare`` entry point: the study's results section regenerated from MLflow runs.

``run_compare`` reads the tracking store and the registry: the best dense network (the dnn search
run with the highest validation accuracy) and the latest run of each CNN recipe. It times the
registered pyfunc model of each (images/s on a batch, one-image latency), finds the latest
``fmnist evaluate`` run of each model (its robustness numbers; ``evaluate`` runs are never
candidates themselves), hands the runs' metrics and confusion matrices to
``fmnist.analysis.compare`` and logs one ``compare`` run: a table of both
families, per-class F1 bars, the confusion matrices side by side with their difference, and a
markdown and HTML report that puts the study's published numbers beside ours and lists where the
study's text and its own numbers disagree.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np

from fmnist import tracking
from fmnist.analysis.compare import (
    Candidate,
    build_report,
    plot_confusions,
    plot_f1_bars,
    summary_columns,
    summary_rows,
    validation_accuracy,
)
from fmnist.analysis.report import markdown_to_html
from fmnist.config import CompareConfig
from fmnist.data import load_fashion_mnist, scale_pixels
from fmnist.errors import FmnistError
from fmnist.tracking.registry import load_pyfunc

EDA_METRICS = ("pca_components_90", "pca_components_95")


def is_quick(run) -> bool:
    return run.data.tags.get("quick", "false").lower() == "true"


def find_runs(experiment_ids: list[str], include_quick: bool) -> list:
    runs = mlflow.search_runs(
        experiment_ids=experiment_ids,
        filter_string="attributes.status = 'FINISHED' and metrics.test_accuracy >= 0",
        output_format="list",
        max_results=5000,
    )
    runs = [r for r in runs if r.data.tags.get("entry_point") != "evaluate"]
    return [r for r in runs if include_quick or not is_quick(r)]


def evaluation_metrics(experiment_ids: list[str], run_id: str, model_uri: str | None) -> dict:
    """The metrics of the latest finished ``evaluate`` run of the model trained by ``run_id``
    (linked by its source run or its registered version), or {} when there is none."""
    runs = mlflow.search_runs(
        experiment_ids=experiment_ids,
        filter_string="tags.entry_point = 'evaluate' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    version = None
    if model_uri and model_uri.startswith("models:/"):
        version = tuple(model_uri.removeprefix("models:/").split("/", 1))
    for run in runs:
        tags = run.data.tags
        linked = (tags.get("registered_model_name"), tags.get("registered_model_version"))
        if tags.get("source_run_id") == run_id or (version is not None and linked == version):
            return dict(run.data.metrics)
    return {}


def select_candidates(runs: list) -> list[Candidate]:
    """The best dense network by validation accuracy and the latest run of each CNN recipe."""
    dense = [r for r in runs if r.data.tags.get("model_family") == "dnn"]
    cnn = [r for r in runs if r.data.tags.get("model_family") == "cnn"]
    chosen = []
    if dense:
        best = max(
            dense, key=lambda r: (validation_accuracy(r.data.metrics) or 0.0, r.info.start_time)
        )
        chosen.append(to_candidate(best, "dnn", "grid-best"))
    by_recipe: dict[str, object] = {}
    for run in sorted(cnn, key=lambda r: r.info.start_time):
        recipe = run.data.tags.get("recipe") or run.data.params.get("recipe") or "cnn"
        by_recipe[recipe] = run
    chosen += [to_candidate(run, "cnn", recipe) for recipe, run in sorted(by_recipe.items())]
    return chosen


def to_candidate(run, family: str, recipe: str) -> Candidate:
    name = run.info.run_name or run.info.run_id[:8]
    return Candidate(
        run.info.run_id, name, family, recipe, dict(run.data.metrics), dict(run.data.params)
    )


def find_model_uri(run_id: str) -> str | None:
    """The registered version trained by this run (or one of its trials), else None."""
    client = mlflow.MlflowClient()
    tagged = client.get_run(run_id).data.tags.get("registered_model_uri")
    if tagged:
        return tagged
    run_ids = [run_id] + [
        r.info.run_id
        for r in client.search_runs(
            [client.get_run(run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{run_id}'",
        )
    ]
    for candidate in run_ids:
        versions = client.search_model_versions(f"run_id = '{candidate}'")
        if versions:
            latest = max(versions, key=lambda v: int(v.version))
            return f"models:/{latest.name}/{latest.version}"
    return None


def load_confusion(run_id: str) -> np.ndarray | None:
    """The run's confusion matrix (counts) from its evaluation artifacts, if logged."""
    client = mlflow.MlflowClient()
    for path in walk_artifacts(client, run_id, ""):
        if path.endswith(".json") and "confusion" in path and "normal" not in path:
            with tempfile.TemporaryDirectory() as tmp:
                local = client.download_artifacts(run_id, path, tmp)
                content = json.loads(Path(local).read_text())
            matrix = (
                content.get("matrix", content.get("counts"))
                if isinstance(content, dict)
                else content
            )
            array = np.asarray(matrix, dtype=float)
            if array.shape == (10, 10):
                return array
    return None


def walk_artifacts(client: mlflow.MlflowClient, run_id: str, path: str) -> Iterator[str]:
    for item in client.list_artifacts(run_id, path or None):
        if item.is_dir:
            yield from walk_artifacts(client, run_id, item.path)
        else:
            yield item.path


def measure_inference(model_uri: str, images: np.ndarray, repeats: int = 20) -> dict[str, float]:
    """Images per second on the whole batch and the median latency of one image (pyfunc)."""
    model = load_pyfunc(model_uri)
    model.predict(images[:2])
    start = time.perf_counter()
    model.predict(images)
    batch_seconds = time.perf_counter() - start
    latencies = []
    for i in range(repeats):
        start = time.perf_counter()
        model.predict(images[i % len(images)][None])
        latencies.append(time.perf_counter() - start)
    return {
        "inference_images_per_second": len(images) / batch_seconds,
        "latency_p50_ms": float(np.median(latencies)) * 1000,
    }


def test_images(cfg: CompareConfig) -> np.ndarray:
    """The first ``inference_images`` test images in [0, 1], the pyfunc model's input."""
    data = load_fashion_mnist(cfg.common.data_dir or None)
    count = min(cfg.inference_images, data.test_images.shape[0])
    return scale_pixels(data.test_images[:count].numpy())


def latest_metrics(
    experiment_ids: list[str], entry_point: str, keys: tuple[str, ...]
) -> dict[str, float | None]:
    """Each metric from the latest run of ``entry_point`` that logged it (None if none did)."""
    runs = mlflow.search_runs(
        experiment_ids=experiment_ids,
        filter_string=f"tags.entry_point = '{entry_point}'",
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    return {
        key: next((r.data.metrics[key] for r in runs if key in r.data.metrics), None)
        for key in keys
    }


def run_compare(cfg: CompareConfig, parent_run_id: str | None = None) -> dict:
    """Collect, measure and report; everything is logged into one ``compare`` run."""
    tracking.configure()
    with tracking.start_run(
        "compare",
        "comparison",
        cfg.common.experiment_name,
        run_name="compare",
        parent_run_id=parent_run_id,
    ) as run:
        experiment_ids = [run.info.experiment_id]
        candidates = select_candidates(find_runs(experiment_ids, cfg.include_quick))
        if not candidates:
            raise FmnistError(
                "No finished dense-network or CNN run with test metrics was found "
                f"in experiment {cfg.common.experiment_name!r}: train models first "
                "(fmnist dnn-search, fmnist cnn)."
            )
        images = test_images(cfg) if cfg.inference_images > 0 else None
        for c in candidates:
            c.model_uri = find_model_uri(c.run_id)
            c.confusion = load_confusion(c.run_id)
            c.evaluation = evaluation_metrics(experiment_ids, c.run_id, c.model_uri)
            if c.model_uri and images is not None:
                c.inference = measure_inference(c.model_uri, images)
        rows = summary_rows(candidates)
        eda = latest_metrics(experiment_ids, "eda", EDA_METRICS)
        report = build_report(rows, candidates, eda)
        log_outputs(rows, candidates, report)
        tracking.log_params_safe(
            {
                "include_quick": cfg.include_quick,
                "compared_runs": ",".join(c.run_id for c in candidates),
            }
        )
        best = max(rows, key=lambda r: r["test_accuracy"] or 0.0)
        mlflow.log_metrics(
            {"best_test_accuracy": best["test_accuracy"] or 0.0, "models_compared": len(rows)}
        )
    return {
        "models": len(rows),
        "best": best["model"],
        "best_test_accuracy": best["test_accuracy"],
        "run_id": run.info.run_id,
    }


def log_outputs(rows: list[dict], candidates: list[Candidate], report: str) -> None:
    """The summary table, the report (markdown and HTML) and the figures, under comparison/."""
    mlflow.log_table(summary_columns(rows), "comparison/summary.json")
    mlflow.log_text(report, "comparison/report.md")
    mlflow.log_text(markdown_to_html(report, "fmnist comparison"), "comparison/report.html")
    mlflow.log_figure(plot_f1_bars(candidates), "comparison/per_class_f1.png")
    confusions = plot_confusions(candidates)
    if confusions is not None:
        mlflow.log_figure(confusions, "comparison/confusion_matrices.png")
