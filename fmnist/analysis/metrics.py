"""Test-set metrics, reports and figures, named alike for every model family (``test_accuracy``,
``test_f1_Shirt``...) so runs line up; ``build_artifacts`` names each by its path in
``evaluation/``, where ``fmnist.tracking.eval_logging`` logs it."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from sklearn import metrics as skm
from sklearn.preprocessing import normalize

from fmnist.analysis.calibration import nll
from fmnist.data import CLASS_NAMES, NUM_CLASSES

ARTIFACT_DIR = "evaluation"
CLASSES = list(range(NUM_CLASSES))
REPORT_ARGS = dict(labels=CLASSES, target_names=list(CLASS_NAMES), zero_division=0, digits=4)
RANKINGS = {"roc_auc": skm.roc_auc_score, "average_precision": skm.average_precision_score}
GALLERY_SIZE = 25


def metric_key(class_name: str) -> str:
    """A class name as a metric-name fragment: ``T-shirt/top`` -> ``T-shirt_top``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", class_name).strip("_")


CLASS_KEYS: tuple[str, ...] = tuple(metric_key(name) for name in CLASS_NAMES)


def check_inputs(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if probabilities.ndim != 2 or probabilities.shape[1] != NUM_CLASSES:
        raise ValueError(f"probabilities must be (N, {NUM_CLASSES}), got {probabilities.shape}")
    if not 0 < len(labels) == len(probabilities):
        raise ValueError(f"{len(labels)} labels for {len(probabilities)} probability rows")
    return probabilities, labels


def compute_metrics(
    probabilities: np.ndarray, labels: np.ndarray, loss: float | None = None, prefix: str = "test"
) -> dict[str, float]:
    """Accuracy, loss (the cross-entropy unless given), precision, recall, F1, ROC AUC and AP;
    an AUC or AP undefined for a class (absent, or every label) is left out, not NaN."""
    probabilities, labels = check_inputs(probabilities, labels)
    predicted = probabilities.argmax(axis=1)
    metrics = {
        f"{prefix}_accuracy": float((predicted == labels).mean()),
        f"{prefix}_loss": nll(probabilities, labels) if loss is None else float(loss),
    }
    for average in ("macro", "weighted", None):
        scores = skm.precision_recall_fscore_support(
            labels, predicted, labels=CLASSES, average=average, zero_division=0
        )
        keys = [average] if average else CLASS_KEYS
        for name, found in zip(("precision", "recall", "f1"), scores, strict=False):
            for key, value in zip(keys, np.ravel(found), strict=True):
                metrics[f"{prefix}_{name}_{key}"] = float(value)
    for name, score in RANKINGS.items():
        found = {
            key: float(score(labels == index, probabilities[:, index]))
            for index, key in enumerate(CLASS_KEYS)
            if 0 < (labels == index).sum() < len(labels)
        }
        metrics.update({f"{prefix}_{name}_{key}": value for key, value in found.items()})
        if found:
            metrics[f"{prefix}_{name}_macro"] = float(np.mean(list(found.values())))
    return metrics


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row of counts divided by its total (a class absent from the labels stays zeros)."""
    return normalize(matrix, norm="l1")


def most_confident_errors(
    probabilities: np.ndarray, labels: np.ndarray, limit: int = GALLERY_SIZE
) -> list[dict[str, Any]]:
    """The misclassified samples the model was surest about, most confident first."""
    probabilities, labels = check_inputs(probabilities, labels)
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    # a stable sort: ties keep dataset order, so the gallery is reproducible
    order = wrong[np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")][:limit]
    return [
        {
            "index": int(i),
            "true": CLASS_NAMES[labels[i]],
            "predicted": CLASS_NAMES[predicted[i]],
            "confidence": float(probabilities[i, predicted[i]]),
            "true_class_probability": float(probabilities[i, labels[i]]),
        }
        for i in order
    ]


def draw_matrix(
    ax: Axes, values: np.ndarray, title: str, cmap="Blues", vmin=0.0, vmax=None, fmt=None
) -> None:
    """A class-by-class matrix (rows: true class) with a colour bar; ``fmt`` writes each cell."""
    ax.figure.colorbar(ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax), ax=ax, shrink=0.8)
    ax.set_xticks(CLASSES, CLASS_NAMES, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(CLASSES, CLASS_NAMES, fontsize=8)
    ax.set(xlabel="Predicted class", ylabel="True class")
    ax.set_title(title, fontsize=10)
    if fmt is None:
        return
    threshold = values.max() / 2 if values.max() > 0 else 0.5
    for (row, col), value in np.ndenumerate(values):
        colour = "white" if value > threshold else "black"
        ax.text(col, row, fmt.format(value), ha="center", va="center", fontsize=8, color=colour)


def plot_confusion_matrix(matrix: np.ndarray, normalized: bool = False) -> Figure:
    fig = Figure(figsize=(9, 8), layout="constrained")
    if normalized:
        title, values, fmt = "Confusion matrix (row-normalised)", normalise_rows(matrix), "{:.2f}"
    else:
        title, values, fmt = "Confusion matrix (counts)", np.asarray(matrix, dtype=int), "{:d}"
    draw_matrix(fig.subplots(), values, title, vmax=1 if normalized else None, fmt=fmt)
    return fig


def plot_training_curves(history: Sequence[Mapping[str, float]]) -> Figure:
    """Loss (left) and accuracy (right) per epoch for training and validation (study Fig. 7)."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    val = [row.get("val_accuracy", math.nan) for row in history]
    scored = [(v, e) for v, e in zip(val, epochs, strict=True) if math.isfinite(v)]
    best = max(scored, key=lambda pair: pair[0])[1] if scored else None
    for ax, kind in zip(fig.subplots(1, 2), ("loss", "accuracy"), strict=True):
        for split, label in (("train", "training"), ("val", "validation")):
            values = [row.get(f"{split}_{kind}", math.nan) for row in history]
            ax.plot(epochs, values, marker="o", markersize=3, label=label)
        if best is not None:
            ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best}")
        ax.set(xlabel="Epoch", ylabel=kind.capitalize(), title=f"{kind.capitalize()} per epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_one_vs_rest(probabilities: np.ndarray, labels: np.ndarray, roc: bool) -> Figure:
    """One-vs-rest ROC (``roc``) or precision-recall curve per class, AUC or AP in the legend."""
    fig = Figure(figsize=(8, 7), layout="constrained")
    ax = fig.subplots()
    for index, name in enumerate(CLASS_NAMES):
        positives, scores = labels == index, probabilities[:, index]
        if not positives.any() or (roc and positives.all()):
            continue  # no curve without positives (nor a ROC curve without negatives)
        if roc:  # x: false positive rate, y: true positive rate
            x, y, _ = skm.roc_curve(positives, scores)
            label = f"{name} (AUC {skm.roc_auc_score(positives, scores):.4f})"
        else:  # x: recall, y: precision
            y, x, _ = skm.precision_recall_curve(positives, scores)
            label = f"{name} (AP {skm.average_precision_score(positives, scores):.4f})"
        ax.plot(x, y, lw=1.2, label=label)
    if roc:
        ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
        ax.set(xlabel="False positive rate", ylabel="True positive rate")
    else:
        ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_title(f"One-vs-rest {'ROC' if roc else 'precision-recall'} curves")
    ax.legend(loc="lower right" if roc else "lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def plot_misclassified(images: np.ndarray, errors: Sequence[Mapping[str, Any]]) -> Figure:
    """A grid of misclassified images titled with true and predicted class and confidence."""
    images = np.asarray(images)
    columns = min(5, max(len(errors), 1))
    rows = max(1, math.ceil(len(errors) / columns))
    height = 2.7 * rows + 0.6
    fig = Figure(figsize=(2.4 * columns, height))
    # fixed margins: a constrained layout of 25 axes took half of this figure's time
    grid = {"left": 0.02, "right": 0.98, "bottom": 0.1 / height, "top": 1 - 0.75 / height}
    axes = np.atleast_1d(fig.subplots(rows, columns, gridspec_kw=grid | {"hspace": 0.35})).ravel()
    vmax = 255 if images.dtype == np.uint8 else 1.0  # uint8 pixels or floats in [0, 1]
    for ax in axes:
        ax.axis("off")
    for ax, error in zip(axes, errors, strict=False):
        ax.imshow(images[error["index"]], cmap="gray", vmin=0, vmax=vmax)
        title = f"true: {error['true']}\npred: {error['predicted']} ({error['confidence']:.2f})"
        ax.set_title(title, fontsize=8)
    if not errors:
        axes[0].text(0.5, 0.5, "no misclassifications", ha="center", va="center")
    fig.suptitle("Most confident misclassifications")
    return fig


def build_artifacts(
    probabilities: np.ndarray,
    labels: np.ndarray,
    images: np.ndarray,
    metrics: Mapping[str, float],
    history: Sequence[Mapping[str, float]] | None,
) -> dict[str, Any]:
    """Relative path under ``evaluation/`` -> str (text), dict (JSON) or Figure (PNG)."""
    probabilities, labels = check_inputs(probabilities, labels)
    predicted = probabilities.argmax(axis=1)
    matrix = skm.confusion_matrix(labels, predicted, labels=CLASSES)
    errors = most_confident_errors(probabilities, labels)
    confusion = {"classes": list(CLASS_NAMES), "rows": "true class", "columns": "predicted class"}
    normalized = normalise_rows(matrix).round(6).tolist()
    confusion |= {"counts": matrix.tolist(), "normalized": normalized}
    # CSV: a header row of predicted classes, a first column of true classes
    table = [["true \\ predicted", *CLASS_NAMES]]
    table += [[name, *row] for name, row in zip(CLASS_NAMES, matrix.tolist(), strict=True)]
    report, report_json = (
        skm.classification_report(labels, predicted, output_dict=as_dict, **REPORT_ARGS)
        for as_dict in (False, True)
    )
    split = {
        "metrics.json": dict(metrics),
        "classification_report.txt": report,
        "classification_report.json": report_json,
        "confusion_matrix.json": confusion,
        "confusion_matrix.csv": "".join(",".join(map(str, row)) + "\n" for row in table),
        "confusion_matrix.png": plot_confusion_matrix(matrix),
        "confusion_matrix_normalized.png": plot_confusion_matrix(matrix, normalized=True),
        "roc_curves.png": plot_one_vs_rest(probabilities, labels, roc=True),
        "precision_recall_curves.png": plot_one_vs_rest(probabilities, labels, roc=False),
        "misclassified.png": plot_misclassified(images, errors),
        "misclassified.json": {"errors": errors},
    }
    artifacts: dict[str, Any] = {f"test/{name}": value for name, value in split.items()}
    if history:
        artifacts["training_curves.png"] = plot_training_curves(history)
        artifacts["training_history.json"] = {"history": [dict(row) for row in history]}
    return artifacts
