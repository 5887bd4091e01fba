"""Log a test evaluation: metrics and every artifact of ``fmnist.analysis.evaluation``, the
calibration (``fmnist.analysis.calibration``) and the robustness suite (``...robustness``).

The analysis layer computes metrics, tables and figures from arrays; this module writes them into
the active MLflow run: metrics at step 0 (so MLflow links them to a model logged at step 0 in the
same run), artifacts under ``evaluation/``. ``calibrated_evaluation`` is what a training
flow calls: it fits the temperature on the validation outputs, scores the test set with it (what
the registered model will output) and logs both evaluations.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from matplotlib.figure import Figure

from fmnist.analysis import calibration as cal
from fmnist.analysis import robustness as rob
from fmnist.analysis.evaluation import (
    ARTIFACT_DIR,
    build_artifacts,
    compute_metrics,
)
from fmnist.tracking.values import log_metrics_finite

RELIABILITY_FIGURE = "reliability_diagram.png"
CALIBRATION_JSON = "calibration.json"
ROBUSTNESS_DIR = f"{ARTIFACT_DIR}/robustness"


def write_artifacts(artifacts: Mapping[str, Any], folder: Path) -> None:
    """Write texts, JSON-able dicts and figures to ``folder`` under their relative paths."""
    for relative, value in artifacts.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, Figure):
            value.savefig(path, dpi=100)
        elif isinstance(value, str):
            path.write_text(value)
        else:
            path.write_text(json.dumps(value, indent=2, default=float))


def log_artifacts(artifacts: Mapping[str, Any]) -> None:
    """``write_artifacts`` into the active run, under ``evaluation/``."""
    with tempfile.TemporaryDirectory() as tmp:
        write_artifacts(artifacts, Path(tmp))
        mlflow.log_artifacts(tmp, ARTIFACT_DIR)


def evaluate_and_log(
    probabilities: np.ndarray,
    labels: np.ndarray,
    images: np.ndarray,
    loss: float | None,
    history: Sequence[Mapping[str, float]] | None = None,
    prefix: str = "test",
) -> dict[str, float]:
    """Compute the metrics, log them and every evaluation artifact to the active run; return them.

    Metrics are logged at step 0 (so MLflow links them to a model logged at step 0 in the same
    run); artifacts go under ``evaluation/``.
    """
    metrics = compute_metrics(probabilities, labels, loss, prefix)
    log_metrics_finite(metrics)
    log_artifacts(build_artifacts(probabilities, labels, images, metrics, history, prefix))
    return metrics


def log_calibration(
    calibrated: np.ndarray,
    uncalibrated: np.ndarray,
    labels: np.ndarray,
    temperature: float,
    prefix: str = "test",
) -> dict[str, float]:
    """NLL, Brier, ECE before and after, ``temperature``, and the reliability diagram (under
    ``evaluation/<prefix>/``) into the active run; return the metrics."""
    metrics = log_calibration_metrics(calibrated, uncalibrated, labels, temperature, prefix)
    log_artifacts(
        calibration_artifacts(calibrated, uncalibrated, labels, temperature, metrics, prefix)
    )
    return metrics


def log_calibration_metrics(calibrated, uncalibrated, labels, temperature, prefix="test"):
    labels = np.asarray(labels).reshape(-1)
    metrics = cal.calibration_metrics(calibrated, uncalibrated, labels, temperature, prefix)
    log_metrics_finite(metrics)
    return metrics


def calibration_artifacts(
    calibrated, uncalibrated, labels, temperature: float, metrics, prefix: str = "test"
) -> dict[str, Any]:
    """The reliability diagram and its bins (JSON), by path under ``evaluation/``."""
    labels = np.asarray(labels).reshape(-1)
    figure = cal.plot_reliability_diagram(calibrated, uncalibrated, labels, temperature)
    bins = cal.reliability_bins(calibrated, labels)
    table = {
        **metrics,
        "bins": cal.ECE_BINS,
        "bin_counts": bins.counts.astype(int).tolist(),
        "bin_confidence": np.nan_to_num(bins.confidence).round(6).tolist(),
        "bin_accuracy": np.nan_to_num(bins.accuracy).round(6).tolist(),
    }
    return {f"{prefix}/{RELIABILITY_FIGURE}": figure, f"{prefix}/{CALIBRATION_JSON}": table}


def calibrated_evaluation(
    val_scores: np.ndarray,
    val_labels: np.ndarray,
    test_scores: np.ndarray,
    test_labels: np.ndarray,
    test_images: np.ndarray,
    history: Sequence[Mapping[str, float]] | None = None,
) -> tuple[dict[str, float], float]:
    """Fit the temperature on the validation scores (logits or log-probabilities), evaluate the
    tempered test probabilities (the registered model's output) and log it all: the metrics
    (the test evaluation's and the calibration's) and the artifacts (figures, reports, the
    reliability diagram). Returns the metrics and the temperature. The test loss is the
    tempered model's NLL; the accuracy is unchanged (a monotone map of each row), and
    ``test_accuracy_uncalibrated`` is logged beside it to show it.
    """
    temperature = cal.fit_temperature(val_scores, val_labels)
    calibrated = cal.tempered(test_scores, temperature)
    uncalibrated = cal.tempered(test_scores, 1.0)
    metrics = compute_metrics(calibrated, test_labels, None, "test")
    log_metrics_finite(metrics)
    calibration = log_calibration_metrics(calibrated, uncalibrated, test_labels, temperature)
    artifacts = build_artifacts(calibrated, test_labels, test_images, metrics, history)
    artifacts.update(
        calibration_artifacts(calibrated, uncalibrated, test_labels, temperature, calibration)
    )
    log_artifacts(artifacts)
    return {**metrics, **calibration}, temperature


def log_robustness(result: rob.RobustnessResult) -> dict[str, float]:
    """The suite's metrics, its grid (JSON) and two figures under ``evaluation/robustness/``."""
    metrics = rob.robustness_metrics(result)
    log_metrics_finite(metrics)
    mlflow.log_dict(rob.robustness_table(result), f"{ROBUSTNESS_DIR}/accuracy.json")
    mlflow.log_figure(rob.plot_accuracy_grid(result), f"{ROBUSTNESS_DIR}/accuracy_grid.png")
    mlflow.log_figure(rob.plot_samples(result.samples), f"{ROBUSTNESS_DIR}/samples.png")
    return metrics
