"""Calibration: are the class probabilities honest? NLL, Brier, ECE, a reliability diagram, and
temperature scaling.

Pure numpy (and scipy's bounded 1-D search) over probabilities (N, 10), log-probabilities and
labels. Temperature scaling divides a model's log-probabilities by one scalar ``T`` fitted on the
validation split (never the test set) by minimising the negative log-likelihood:
``softmax(log p / T)``. For a plain classifier ``log p`` is its logits up to a per-row constant, so
this is the usual ``softmax(logits / T)``; for a flip-averaged model it is the log of the averaged
probabilities, so the argmax, hence the accuracy, never changes (a monotone map of each row). The
same function is folded into the logged model (``fmnist.models.ProbabilityModel``), which is why
every metric here can be computed before and after from one set of outputs. Metric names are shared
by every family: ``test_nll``, ``test_brier``, ``test_ece`` (after), the same with
``_uncalibrated``, and ``temperature``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure
from scipy.optimize import minimize_scalar

ECE_BINS = 15
# The bracket of the search on log T: a temperature outside it means a broken model, not a
# calibration problem (a net is seldom off by more than a factor of 3 either way).
TEMPERATURE_BOUNDS = (0.05, 20.0)
LOG_FLOOR = 1e-12  # probabilities below it count as this much in a log (as the engine clamps them)


def softmax(scores: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, stable for any scale."""
    scores = np.asarray(scores, dtype=np.float64)
    shifted = scores - scores.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """``log p`` with the floor the engine and the logged model use."""
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), LOG_FLOOR, 1.0))


def tempered(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log_probs / T)``: what the logged model returns with temperature ``T``."""
    return softmax(np.asarray(log_probs, dtype=np.float64) / float(temperature))


def untempered(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Undo a temperature: ``softmax(T * log p_T)`` recovers the probabilities before scaling
    (exactly, up to the log floor), since ``log p_T = log p / T - c`` per row."""
    return softmax(float(temperature) * log_probabilities(probabilities))


def nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class (natural log)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, LOG_FLOOR, 1.0)).mean())


def brier(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score: mean over images of sum_k (p_k - [k == y])^2 (0 best, 2 worst)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    onehot = np.zeros_like(probabilities)
    onehot[np.arange(len(labels)), labels] = 1.0
    return float(((probabilities - onehot) ** 2).sum(axis=1).mean())


@dataclass(frozen=True)
class ReliabilityBins:
    """Per confidence bin: image count, mean confidence and accuracy (NaN where empty)."""

    edges: np.ndarray  # (bins + 1,)
    counts: np.ndarray  # (bins,)
    confidence: np.ndarray  # (bins,)
    accuracy: np.ndarray  # (bins,)

    @property
    def ece(self) -> float:
        """Expected calibration error: the count-weighted mean |accuracy - confidence|."""
        filled = self.counts > 0
        gaps = np.abs(self.accuracy[filled] - self.confidence[filled])
        return float((self.counts[filled] * gaps).sum() / max(self.counts.sum(), 1))


def reliability_bins(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> ReliabilityBins:
    """Bin each image by its top probability into ``bins`` equal-width bins of (0, 1].

    Bin ``b`` holds confidences in ``(b/bins, (b+1)/bins]`` (the usual right-closed bins of Guo et
    al. 2017), so a confidence of exactly 1 lands in the last bin.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=bins) / counts
        mean_acc = np.bincount(index, weights=correct, minlength=bins) / counts
    return ReliabilityBins(np.linspace(0.0, 1.0, bins + 1), counts, mean_conf, mean_acc)


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    return reliability_bins(probabilities, labels, bins).ece


def fit_temperature(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """The ``T`` minimising the NLL of ``softmax(log_probs / T)`` (a bounded search on log T).

    ``log_probs`` are the model's validation logits or log-probabilities; never pass the test
    set. An empty split gives 1 (no scaling).
    """
    log_probs = np.asarray(log_probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if len(labels) == 0:
        return 1.0
    rows = np.arange(len(labels))

    def loss(log_t: float) -> float:
        scaled = log_probs / math.exp(log_t)
        shifted = scaled - scaled.max(axis=1, keepdims=True)
        log_norm = np.log(np.exp(shifted).sum(axis=1))
        return float((log_norm - shifted[rows, labels]).mean())

    low, high = (math.log(bound) for bound in TEMPERATURE_BOUNDS)
    found = minimize_scalar(loss, bounds=(low, high), method="bounded", options={"xatol": 1e-5})
    # the search never returns a point worse than T = 1, the model as trained
    return float(math.exp(found.x)) if found.fun <= loss(0.0) else 1.0


def calibration_metrics(
    calibrated: np.ndarray,
    uncalibrated: np.ndarray,
    labels: np.ndarray,
    temperature: float,
    prefix: str = "test",
) -> dict[str, float]:
    """NLL, Brier and ECE after and before temperature scaling, the accuracy before, and T."""
    metrics = {"temperature": float(temperature)}
    for suffix, probabilities in (("", calibrated), ("_uncalibrated", uncalibrated)):
        metrics[f"{prefix}_nll{suffix}"] = nll(probabilities, labels)
        metrics[f"{prefix}_brier{suffix}"] = brier(probabilities, labels)
        metrics[f"{prefix}_ece{suffix}"] = expected_calibration_error(probabilities, labels)
    predicted = np.asarray(uncalibrated).argmax(axis=1)
    metrics[f"{prefix}_accuracy_uncalibrated"] = float((predicted == labels).mean())
    return metrics


def plot_reliability_diagram(
    calibrated: np.ndarray,
    uncalibrated: np.ndarray,
    labels: np.ndarray,
    temperature: float,
    bins: int = ECE_BINS,
) -> Figure:
    """Accuracy against confidence per bin, before and after scaling, over the bins' counts."""
    fig = Figure(figsize=(7, 8), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    width = 1.0 / bins
    series = (
        ("before (T = 1)", uncalibrated, "tab:orange"),
        (f"after (T = {temperature:.3f})", calibrated, "tab:blue"),
    )
    for name, probabilities, colour in series:
        found = reliability_bins(probabilities, labels, bins)
        centres = found.edges[:-1] + width / 2
        filled = found.counts > 0
        label = f"{name}: ECE {found.ece:.2%}"
        if colour == "tab:blue":  # after: bars; before: points over them, so both stay visible
            top.bar(
                centres[filled],
                found.accuracy[filled],
                width=width * 0.9,
                alpha=0.7,
                color=colour,
                edgecolor="black",
                linewidth=0.4,
                label=label,
            )
        else:
            top.plot(centres[filled], found.accuracy[filled], "o-", color=colour, label=label)
        bottom.plot(centres, found.counts, marker="o", markersize=3, color=colour, label=name)
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    top.set_ylabel("Accuracy in the bin")
    top.set_ylim(0, 1)
    top.set_title(f"Reliability diagram ({bins} equal-width confidence bins)")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_yscale("symlog")
    bottom.set_ylim(bottom=0)
    bottom.set_xlabel("Confidence (top class probability)")
    bottom.set_ylabel("Images")
    bottom.set_xlim(0, 1)
    bottom.grid(alpha=0.3)
    return fig
