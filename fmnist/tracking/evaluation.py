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
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
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
from fmnist.prefetch import THREAD_PREFIX
from fmnist.tracking.runs import log_metrics_finite

RELIABILITY_FIGURE = "reliability_diagram.png"
CALIBRATION_JSON = "calibration.json"
ROBUSTNESS_DIR = f"{ARTIFACT_DIR}/robustness"


def write_artifacts(artifacts: Mapping[str, Any], folder: Path) -> None:
    """Write texts, JSON-able dicts and figures to ``folder`` under their relative paths.

    Rendering the figures (PNG encoding, constrained layout) is most of an evaluation's time
    and runs on one core: where the platform forks, a child process renders every other figure
    while this one renders the rest (measured: a test evaluation's seven figures, 1.07 s in one
    process, 0.65 s in two).
    """
    figures = []
    for relative, value in artifacts.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, Figure):
            figures.append((path, value))
        elif isinstance(value, str):
            path.write_text(value)
        else:
            path.write_text(json.dumps(value, indent=2, default=float))
    child = fork_child(partial(save_figures, figures[1::2])) if len(figures) > 1 else None
    save_figures(figures[::2] if child is not None else figures)
    if child is not None and not child_succeeded(child):
        save_figures(figures[1::2])  # the child failed: render its share here


def save_figures(figures: Sequence[tuple[Path, Figure]]) -> None:
    for path, figure in figures:
        figure.savefig(path, dpi=100)


def fork_child(work: Callable[[], None]) -> int | None:
    """The pid of a forked child that runs ``work`` and exits; None where there is no fork.
    The child touches nothing but numpy, matplotlib and its files, and leaves by ``os._exit``
    (no atexit handler, buffer flush or store connection of this process runs twice)."""
    if not hasattr(os, "fork"):
        return None
    for thread in threading.enumerate():
        if thread.name.startswith(THREAD_PREFIX):
            thread.join()  # a thread mid-import would leave the child its module locks
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        work()
        code = 0
    finally:
        os._exit(code)


def child_succeeded(pid: int, timeout: float = 300.0) -> bool:
    """Whether the child ended well within ``timeout`` seconds (else it is killed: a fork can
    inherit a lock another thread held, and the work is then done here instead)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


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
    with artifacts_in_background(
        partial(build_artifacts, probabilities, labels, images, metrics, history, prefix)
    ):
        pass
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
    with artifacts_in_background(
        partial(
            calibration_artifacts, calibrated, uncalibrated, labels, temperature, metrics, prefix
        )
    ):
        pass
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


@contextmanager
def calibrated_evaluation(
    val_scores: np.ndarray,
    val_labels: np.ndarray,
    test_scores: np.ndarray,
    test_labels: np.ndarray,
    test_images: np.ndarray,
    history: Sequence[Mapping[str, float]] | None = None,
) -> Iterator[tuple[dict[str, float], float]]:
    """Fit the temperature on the validation scores (logits or log-probabilities), evaluate the
    tempered test probabilities (the registered model's output) and log it all.

    Yields the metrics (the test evaluation's and the calibration's, logged) and the
    temperature; the artifacts (figures, reports, the reliability diagram) are built and
    written beside the block (``artifacts_in_background``: the caller logs its model meanwhile)
    and logged when it ends. The test loss is the tempered model's NLL; the accuracy is
    unchanged (a monotone map of each row), and ``test_accuracy_uncalibrated`` is logged beside
    it to show it.
    """
    temperature = cal.fit_temperature(val_scores, val_labels)
    calibrated = cal.tempered(test_scores, temperature)
    uncalibrated = cal.tempered(test_scores, 1.0)
    metrics = compute_metrics(calibrated, test_labels, None, "test")
    log_metrics_finite(metrics)
    calibration = log_calibration_metrics(calibrated, uncalibrated, test_labels, temperature)

    def build() -> dict[str, Any]:
        artifacts = build_artifacts(calibrated, test_labels, test_images, metrics, history)
        artifacts.update(
            calibration_artifacts(calibrated, uncalibrated, test_labels, temperature, calibration)
        )
        return artifacts

    with artifacts_in_background(build):
        yield {**metrics, **calibration}, temperature


@contextmanager
def artifacts_in_background(build: Callable[[], Mapping[str, Any]]) -> Iterator[None]:
    """Build and write ``build()``'s artifacts in a forked child while the block runs, then log
    them under ``evaluation/``. Figures are most of an evaluation's time on one core, and what
    a flow does next (logging its model) does not need them: the two then share two cores.
    Where there is no fork, or the child fails, they are built here after the block."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        child = fork_child(lambda: write_artifacts(build(), folder))
        try:
            yield
        finally:
            if child is None or not child_succeeded(child):
                write_artifacts(build(), folder)
        mlflow.log_artifacts(tmp, ARTIFACT_DIR)


def log_robustness(result: rob.RobustnessResult) -> dict[str, float]:
    """The suite's metrics, its grid (JSON) and two figures under ``evaluation/robustness/``."""
    metrics = rob.robustness_metrics(result)
    log_metrics_finite(metrics)
    mlflow.log_dict(rob.robustness_table(result), f"{ROBUSTNESS_DIR}/accuracy.json")
    mlflow.log_figure(rob.plot_accuracy_grid(result), f"{ROBUSTNESS_DIR}/accuracy_grid.png")
    mlflow.log_figure(rob.plot_samples(result.samples), f"{ROBUSTNESS_DIR}/samples.png")
    return metrics
