"""Log a test evaluation (``fmnist.analysis`` computes it) into the active MLflow run: metrics at
step 0, so MLflow links them to a model logged at step 0, artifacts under ``evaluation/``."""

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
from fmnist.analysis.metrics import ARTIFACT_DIR, build_artifacts, compute_metrics
from fmnist.tracking.values import log_metrics_finite


def log_results(metrics: dict[str, float], artifacts: Mapping[str, Any]) -> dict[str, float]:
    """Log ``metrics``, then texts, dicts (JSON) and figures by their paths in ``evaluation/``."""
    log_metrics_finite(metrics)
    with tempfile.TemporaryDirectory() as tmp:
        for relative, value in artifacts.items():
            path = Path(tmp) / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(value, Figure):
                value.savefig(path, dpi=100)
            elif isinstance(value, str):
                path.write_text(value)
            else:
                path.write_text(json.dumps(value, indent=2, default=float))
        mlflow.log_artifacts(tmp, ARTIFACT_DIR)
    return metrics


def evaluate_and_log(
    probabilities: np.ndarray,
    labels: np.ndarray,
    images: np.ndarray,
    loss: float | None,
    history: Sequence[Mapping[str, float]] | None = None,
) -> dict[str, float]:
    """Compute the test metrics, log them and every evaluation artifact; return them."""
    metrics = compute_metrics(probabilities, labels, loss)
    return log_results(metrics, build_artifacts(probabilities, labels, images, metrics, history))


def log_calibration(
    calibrated: np.ndarray, uncalibrated: np.ndarray, labels: np.ndarray, temperature: float
) -> dict[str, float]:
    """Log the calibration metrics and the reliability diagram; return the metrics."""
    metrics = cal.calibration_metrics(calibrated, uncalibrated, labels, temperature)
    artifacts = cal.calibration_artifacts(calibrated, uncalibrated, labels, metrics)
    return log_results(metrics, artifacts)


def calibrated_evaluation(
    val_scores: np.ndarray,
    val_labels: np.ndarray,
    test_scores: np.ndarray,
    test_labels: np.ndarray,
    test_images: np.ndarray,
    history: Sequence[Mapping[str, float]] | None = None,
) -> tuple[dict[str, float], float]:
    """Fit T on validation scores, then log the tempered test evaluation (what the registered
    model outputs) and its calibration; the metrics and T."""
    temperature = cal.fit_temperature(val_scores, val_labels)
    calibrated = cal.tempered(test_scores, temperature)
    metrics = evaluate_and_log(calibrated, test_labels, test_images, None, history)
    uncalibrated = cal.tempered(test_scores, 1.0)
    metrics.update(log_calibration(calibrated, uncalibrated, test_labels, temperature))
    return metrics, temperature


def log_robustness(result: rob.RobustnessResult) -> dict[str, float]:
    """The suite's metrics, its grid (JSON) and two figures under ``evaluation/robustness/``."""
    metrics = rob.robustness_metrics(result)
    return log_results(metrics, rob.robustness_artifacts(result))
