"""Calibration: NLL, Brier, ECE, the reliability diagram and temperature scaling,
``softmax(log p / T)`` with ``T`` fitted on the validation split: ``log p`` (a net's logits up to
a per-row constant, or a flip-averaged model's log-probabilities) is mapped monotonically row by
row, so no prediction changes. The logged model folds in the same map."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from scipy.optimize import minimize_scalar
from scipy.special import softmax as scipy_softmax

ECE_BINS = 15
# A temperature outside this bracket means a broken model, not a calibration problem.
TEMPERATURE_BOUNDS = (0.05, 20.0)
LOG_FLOOR = 1e-12  # probabilities below it count as this much in a log (as the engine clamps them)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for any scale."""
    return scipy_softmax(np.asarray(scores, dtype=np.float64), axis=1)


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """``log p`` with the floor the engine and the logged model use."""
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), LOG_FLOOR, 1.0))


def tempered(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log_probs / T)``: what the logged model returns with temperature ``T``."""
    return softmax(np.asarray(log_probs, dtype=np.float64) / float(temperature))


def untempered(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """The probabilities before scaling, ``softmax(T * log p_T)`` (exact up to the log floor,
    since ``log p_T = log p / T - c`` per row)."""
    return softmax(float(temperature) * log_probabilities(probabilities))


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class (natural log)."""
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    return float(-log_probabilities(probabilities)[np.arange(len(labels)), labels].mean())


def brier(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of sum_k (p_k - [k == y])^2 (0 best, 2 worst)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    onehot = np.eye(probabilities.shape[1])[np.asarray(labels).astype(np.int64).reshape(-1)]
    return float(((probabilities - onehot) ** 2).sum(axis=1).mean())


@dataclass(frozen=True)
class ReliabilityBins:
    """Per confidence bin: image count, mean confidence and accuracy (NaN where empty)."""

    edges: np.ndarray  # (bins + 1,)
    counts: np.ndarray  # (bins,)
    confidence: np.ndarray
    accuracy: np.ndarray

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean |accuracy - confidence|."""
        filled = self.counts > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float((self.counts[filled] * gaps).sum() / max(self.counts.sum(), 1))


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray) -> ReliabilityBins:
    """Each image binned by its top probability into 15 right-closed bins of (0, 1] (Guo et al.
    2017): bin ``b`` holds ``(b/15, (b+1)/15]``, so a confidence of 1 lands in the last."""
    probabilities, bins = np.asarray(probabilities, dtype=np.float64), ECE_BINS
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels).reshape(-1)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=bins) / counts
        mean_acc = np.bincount(index, weights=correct.astype(float), minlength=bins) / counts
    return ReliabilityBins(np.linspace(0.0, 1.0, bins + 1), counts, mean_conf, mean_acc)


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return reliability_bins(probabilities, labels).ece


def fit_temperature(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` minimising the NLL of ``softmax(log_probs / T)``, 1 for an empty split."""
    # validation logits or log-probabilities, never the test set's
    log_probs = np.asarray(log_probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if len(labels) == 0:
        return 1.0
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:  # the exact log-softmax, no floor
        scaled = log_probs / math.exp(log_t)
        scaled -= scaled.max(axis=1, keepdims=True)
        return float((np.log(np.exp(scaled).sum(axis=1)) - scaled[rows, labels]).mean())

    low, high = (math.log(bound) for bound in TEMPERATURE_BOUNDS)
    found = minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    # never worse than T = 1, the model as trained
    return float(math.exp(found.x)) if found.fun <= loss(0.0) else 1.0


def calibration_metrics(
    calibrated: np.ndarray, uncalibrated: np.ndarray, labels: np.ndarray, temperature: float
) -> dict[str, float]:
    """Test NLL, Brier and ECE after and before temperature scaling, the accuracy before, and T."""
    labels = np.asarray(labels).reshape(-1)
    metrics = {"temperature": float(temperature)}
    for suffix, probabilities in (("", calibrated), ("_uncalibrated", uncalibrated)):
        metrics[f"test_nll{suffix}"] = nll(probabilities, labels)
        metrics[f"test_brier{suffix}"] = brier(probabilities, labels)
        metrics[f"test_ece{suffix}"] = expected_calibration_error(probabilities, labels)
    metrics["test_accuracy_uncalibrated"] = float((np.argmax(uncalibrated, 1) == labels).mean())
    return metrics


def calibration_artifacts(
    calibrated: np.ndarray, uncalibrated: np.ndarray, labels: np.ndarray, metrics: dict
) -> dict[str, Any]:
    """The reliability diagram (per-bin accuracy against confidence before scaling as points, after
    as bars, over the bin counts) and the bins after with ``metrics`` as JSON, by path."""
    labels, temperature = np.asarray(labels).reshape(-1), metrics["temperature"]
    before, after = (reliability_bins(p, labels) for p in (uncalibrated, calibrated))
    table = {**metrics, "bins": ECE_BINS, "bin_counts": after.counts.astype(int).tolist()}
    table["bin_confidence"] = np.nan_to_num(after.confidence).round(6).tolist()
    table["bin_accuracy"] = np.nan_to_num(after.accuracy).round(6).tolist()
    fig = Figure(figsize=(7, 8), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    width = 1.0 / ECE_BINS
    centres = before.edges[:-1] + width / 2
    shown = before.counts > 0, after.counts > 0
    label = f"after (T = {temperature:.3f}): ECE {after.ece:.2%}"
    bar = {"width": width * 0.9, "alpha": 0.7, "edgecolor": "black", "linewidth": 0.4}
    top.bar(centres[shown[1]], after.accuracy[shown[1]], color="tab:blue", label=label, **bar)
    label = f"before (T = 1): ECE {before.ece:.2%}"  # points over the bars: both stay visible
    top.plot(centres[shown[0]], before.accuracy[shown[0]], "o-", color="tab:orange", label=label)
    for found, colour in ((before, "tab:orange"), (after, "tab:blue")):
        bottom.plot(centres, found.counts, marker="o", markersize=3, color=colour)
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    top.set(ylabel="Accuracy in the bin", ylim=(0, 1))
    top.set_title(f"Reliability diagram ({ECE_BINS} equal-width confidence bins)")
    top.legend(loc="upper left", fontsize=8)
    bottom.set(yscale="symlog", ylim=(0, None), xlim=(0, 1), ylabel="Images")
    bottom.set_xlabel("Confidence (top class probability)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    return {"test/reliability_diagram.png": fig, "test/calibration.json": table}
