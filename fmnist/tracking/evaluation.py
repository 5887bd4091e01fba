"""Log a test evaluation: metrics and every artifact of ``fmnist.analysis.evaluation``.

The analysis layer computes metrics, tables and figures from arrays; this module writes them into
the active MLflow run: metrics at step 0 (so MLflow links them to a model logged at step 0 in the
same run), artifacts under ``evaluation/``.
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

from fmnist.analysis.evaluation import ARTIFACT_DIR, build_artifacts, compute_metrics
from fmnist.tracking.runs import log_metrics_finite


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
    artifacts = build_artifacts(probabilities, labels, images, metrics, history, prefix)
    with tempfile.TemporaryDirectory() as tmp:
        write_artifacts(artifacts, Path(tmp))
        mlflow.log_artifacts(tmp, ARTIFACT_DIR)
    return metrics
