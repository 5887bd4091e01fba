"""Test-set evaluation shared by every model family: metrics, report, tables and figures.

Pure functions over plain numpy arrays (probabilities (N, 10), labels (N,), uint8 images
(N, 28, 28)) that compute metric dicts, tables and matplotlib figures; ``build_artifacts`` gathers
them by file name and ``fmnist.tracking.evaluation.evaluate_and_log`` writes them into the active
MLflow run. Metric names are the same for every family (``test_accuracy``, ``test_f1_macro``,
``test_f1_Shirt``, ``test_roc_auc_Bag``...) so the MLflow UI compares a dense and a CNN run column
by column, and ``fmnist compare`` reads them back. Artifacts go under ``evaluation/<prefix>/`` and
the training curves (the study's Fig. 7) under ``evaluation/``. Figures are built with
``matplotlib.figure.Figure`` (Agg rendering, no pyplot state to leak).
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import (
    average_precision_score,
    classification_report,
    confusion_matrix,
    precision_recall_curve,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from fmnist.data import CLASS_NAMES

ARTIFACT_DIR = "evaluation"
NUM_CLASSES = len(CLASS_NAMES)
GALLERY_SIZE = 25
# File names under evaluation/<prefix>/ that evaluate_and_log always writes.
SPLIT_ARTIFACTS = (
    "metrics.json",
    "classification_report.txt",
    "classification_report.json",
    "confusion_matrix.json",
    "confusion_matrix.csv",
    "confusion_matrix.png",
    "confusion_matrix_normalized.png",
    "roc_curves.png",
    "precision_recall_curves.png",
    "misclassified.png",
    "misclassified.json",
)
# Written under evaluation/ when a training history is given.
HISTORY_ARTIFACTS = ("training_curves.png", "training_history.json")


def metric_key(class_name: str) -> str:
    """A class name as a metric-name fragment: ``T-shirt/top`` -> ``T-shirt_top``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", class_name).strip("_")


CLASS_KEYS: tuple[str, ...] = tuple(metric_key(name) for name in CLASS_NAMES)


def artifact_path(name: str, prefix: str = "test") -> str:
    """Where ``evaluate_and_log`` puts a split artifact, e.g. ``evaluation/test/metrics.json``."""
    return f"{ARTIFACT_DIR}/{prefix}/{name}"


def predict_labels(probabilities: np.ndarray) -> np.ndarray:
    return np.asarray(probabilities).argmax(axis=1)


def cross_entropy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class (when the caller has no loss)."""
    picked = np.asarray(probabilities, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, 1.0)).mean())


def compute_metrics(
    probabilities: np.ndarray,
    labels: np.ndarray,
    loss: float | None = None,
    prefix: str = "test",
) -> dict[str, float]:
    """Accuracy, loss, macro/weighted and per-class precision/recall/F1, per-class AUC and AP.

    A per-class ROC AUC or average precision that is undefined (the class is absent from
    ``labels``, or is every label) is left out rather than reported as NaN.
    """
    probabilities, labels = check_inputs(probabilities, labels)
    predicted = predict_labels(probabilities)
    loss = cross_entropy(probabilities, labels) if loss is None else float(loss)
    metrics = {
        f"{prefix}_accuracy": float((predicted == labels).mean()),
        f"{prefix}_loss": loss,
    }
    metrics.update(averaged_scores(labels, predicted, prefix))
    metrics.update(per_class_scores(labels, predicted, prefix))
    metrics.update(ranking_scores(probabilities, labels, prefix))
    return metrics


def check_inputs(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if probabilities.ndim != 2 or probabilities.shape[1] != NUM_CLASSES:
        raise ValueError(f"probabilities must be (N, {NUM_CLASSES}), got {probabilities.shape}")
    if probabilities.shape[0] != labels.shape[0] or labels.shape[0] == 0:
        raise ValueError(
            f"need as many labels as probability rows (> 0): {labels.shape[0]} labels, "
            f"{probabilities.shape[0]} rows"
        )
    return probabilities, labels


def averaged_scores(labels: np.ndarray, predicted: np.ndarray, prefix: str) -> dict[str, float]:
    metrics = {}
    for average in ("macro", "weighted"):
        precision, recall, f1, _ = precision_recall_fscore_support(
            labels, predicted, labels=range(NUM_CLASSES), average=average, zero_division=0
        )
        metrics[f"{prefix}_precision_{average}"] = float(precision)
        metrics[f"{prefix}_recall_{average}"] = float(recall)
        metrics[f"{prefix}_f1_{average}"] = float(f1)
    return metrics


def per_class_scores(labels: np.ndarray, predicted: np.ndarray, prefix: str) -> dict[str, float]:
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, predicted, labels=range(NUM_CLASSES), average=None, zero_division=0
    )
    metrics = {}
    for index, key in enumerate(CLASS_KEYS):
        metrics[f"{prefix}_precision_{key}"] = float(precision[index])
        metrics[f"{prefix}_recall_{key}"] = float(recall[index])
        metrics[f"{prefix}_f1_{key}"] = float(f1[index])
    return metrics


def ranking_scores(probabilities: np.ndarray, labels: np.ndarray, prefix: str) -> dict[str, float]:
    """One-vs-rest ROC AUC and average precision per class, and their macro means."""
    metrics: dict[str, float] = {}
    aucs, aps = [], []
    for index, key in enumerate(CLASS_KEYS):
        positives = labels == index
        if not positives.any() or positives.all():
            continue
        auc = float(roc_auc_score(positives, probabilities[:, index]))
        ap = float(average_precision_score(positives, probabilities[:, index]))
        metrics[f"{prefix}_roc_auc_{key}"] = auc
        metrics[f"{prefix}_average_precision_{key}"] = ap
        aucs.append(auc)
        aps.append(ap)
    if aucs:
        metrics[f"{prefix}_roc_auc_macro"] = float(np.mean(aucs))
        metrics[f"{prefix}_average_precision_macro"] = float(np.mean(aps))
    return metrics


def report_text(labels: np.ndarray, predicted: np.ndarray) -> str:
    """scikit-learn's classification report with class names, as the study printed it."""
    return classification_report(
        labels,
        predicted,
        labels=list(range(NUM_CLASSES)),
        target_names=list(CLASS_NAMES),
        digits=4,
        zero_division=0,
    )


def report_dict(labels: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    return classification_report(
        labels,
        predicted,
        labels=list(range(NUM_CLASSES)),
        target_names=list(CLASS_NAMES),
        output_dict=True,
        zero_division=0,
    )


def confusion_counts(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(10, 10) counts, rows = true class, columns = predicted class."""
    return confusion_matrix(labels, predicted, labels=list(range(NUM_CLASSES)))


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its total (a class absent from the labels stays a row of zeros)."""
    totals = matrix.sum(axis=1, keepdims=True).astype(np.float64)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)


def confusion_json(matrix: np.ndarray) -> dict[str, Any]:
    return {
        "classes": list(CLASS_NAMES),
        "rows": "true class",
        "columns": "predicted class",
        "counts": np.asarray(matrix).astype(int).tolist(),
        "normalized": np.round(normalise_rows(matrix), 6).tolist(),
    }


def confusion_csv(matrix: np.ndarray) -> str:
    """Counts with a header row of predicted classes and a first column of true classes."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true \\ predicted", *CLASS_NAMES])
    for name, row in zip(CLASS_NAMES, np.asarray(matrix).astype(int), strict=True):
        writer.writerow([name, *row.tolist()])
    return buffer.getvalue()


def most_confident_errors(
    probabilities: np.ndarray, labels: np.ndarray, limit: int = GALLERY_SIZE
) -> list[dict[str, Any]]:
    """The misclassified samples the model was surest about, most confident first."""
    probabilities, labels = check_inputs(probabilities, labels)
    predicted = predict_labels(probabilities)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    # stable sort so ties keep dataset order and the gallery is reproducible
    order = wrong[np.argsort(-confidence, kind="stable")][:limit]
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


def plot_confusion_matrix(matrix: np.ndarray, normalized: bool = False, title: str = "") -> Figure:
    values = normalise_rows(matrix) if normalized else np.asarray(matrix)
    fig = Figure(figsize=(9, 8), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalized else None)
    fig.colorbar(image, ax=ax, shrink=0.8)
    ticks = range(NUM_CLASSES)
    ax.set_xticks(ticks, CLASS_NAMES, rotation=45, ha="right")
    ax.set_yticks(ticks, CLASS_NAMES)
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    default = "Confusion matrix (row-normalised)" if normalized else "Confusion matrix (counts)"
    ax.set_title(title or default)
    threshold = values.max() / 2 if values.size and values.max() > 0 else 0.5
    for row in ticks:
        for col in ticks:
            value = values[row, col]
            text = f"{value:.2f}" if normalized else f"{int(value)}"
            colour = "white" if value > threshold else "black"
            ax.text(col, row, text, ha="center", va="center", fontsize=8, color=colour)
    return fig


def plot_training_curves(history: Sequence[Mapping[str, float]], title: str = "") -> Figure:
    """Loss (left) and accuracy (right) per epoch for training and validation (Fig. 7)."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    for ax, kind in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        for split in ("train", "val"):
            values = [row.get(f"{split}_{kind}", math.nan) for row in history]
            label = "training" if split == "train" else "validation"
            ax.plot(epochs, values, marker="o", markersize=3, label=label)
        ax.set_xlabel("Epoch")
        ax.set_ylabel(kind.capitalize())
        ax.set_title(f"{kind.capitalize()} per epoch")
        ax.grid(alpha=0.3)
    best = best_epoch(history)
    if best is not None:
        for ax in (loss_ax, acc_ax):
            ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best}")
    for ax in (loss_ax, acc_ax):
        ax.legend()
    if title:
        fig.suptitle(title)
    return fig


def best_epoch(history: Sequence[Mapping[str, float]]) -> int | None:
    scored = [row for row in history if math.isfinite(row.get("val_accuracy", math.nan))]
    if not scored:
        return None
    best = max(scored, key=lambda row: row["val_accuracy"])
    return int(best.get("epoch", history.index(best) + 1))


def plot_roc_curves(probabilities: np.ndarray, labels: np.ndarray) -> Figure:
    """One-vs-rest ROC curve per class, its AUC in the legend."""
    probabilities, labels = check_inputs(probabilities, labels)
    fig = Figure(figsize=(8, 7), layout="constrained")
    ax = fig.subplots()
    for index, name in enumerate(CLASS_NAMES):
        positives = labels == index
        if not positives.any() or positives.all():
            continue
        fpr, tpr, _ = roc_curve(positives, probabilities[:, index])
        auc = roc_auc_score(positives, probabilities[:, index])
        ax.plot(fpr, tpr, linewidth=1.2, label=f"{name} (AUC {auc:.4f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title("One-vs-rest ROC curves")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def plot_precision_recall_curves(probabilities: np.ndarray, labels: np.ndarray) -> Figure:
    """One-vs-rest precision-recall curve per class, its average precision in the legend."""
    probabilities, labels = check_inputs(probabilities, labels)
    fig = Figure(figsize=(8, 7), layout="constrained")
    ax = fig.subplots()
    for index, name in enumerate(CLASS_NAMES):
        positives = labels == index
        if not positives.any():
            continue
        precision, recall, _ = precision_recall_curve(positives, probabilities[:, index])
        ap = average_precision_score(positives, probabilities[:, index])
        ax.plot(recall, precision, linewidth=1.2, label=f"{name} (AP {ap:.4f})")
    ax.set_xlabel("Recall")
    ax.set_ylabel("Precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("One-vs-rest precision-recall curves")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def plot_misclassified(images: np.ndarray, errors: Sequence[Mapping[str, Any]]) -> Figure:
    """A grid of misclassified images titled with true and predicted class and confidence."""
    images = np.asarray(images)
    count = len(errors)
    columns = min(5, max(count, 1))
    rows = max(1, math.ceil(count / columns))
    height = 2.7 * rows + 0.6
    fig = Figure(figsize=(2.4 * columns, height))
    # fixed margins: constrained layout over 25 axes took half of this figure's 0.8 s
    spacing = {"left": 0.02, "right": 0.98, "bottom": 0.1 / height, "top": 1 - 0.75 / height}
    grid = {**spacing, "hspace": 0.35, "wspace": 0.1}
    axes = np.atleast_1d(fig.subplots(rows, columns, gridspec_kw=grid)).ravel()
    # uint8 pixels are 0-255; float pixels are already in [0, 1]
    vmax = 255 if images.dtype == np.uint8 else 1.0
    for ax in axes:
        ax.axis("off")
    for ax, error in zip(axes, errors, strict=False):
        ax.imshow(images[error["index"]], cmap="gray", vmin=0, vmax=vmax)
        ax.set_title(
            f"true: {error['true']}\npred: {error['predicted']} ({error['confidence']:.2f})",
            fontsize=8,
        )
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
    prefix: str = "test",
) -> dict[str, Any]:
    """Relative path under ``evaluation/`` -> str (text), dict (JSON) or Figure (PNG)."""
    probabilities, labels = check_inputs(probabilities, labels)
    predicted = predict_labels(probabilities)
    matrix = confusion_counts(labels, predicted)
    errors = most_confident_errors(probabilities, labels)
    split = {
        "metrics.json": dict(metrics),
        "classification_report.txt": report_text(labels, predicted),
        "classification_report.json": report_dict(labels, predicted),
        "confusion_matrix.json": confusion_json(matrix),
        "confusion_matrix.csv": confusion_csv(matrix),
        "confusion_matrix.png": plot_confusion_matrix(matrix),
        "confusion_matrix_normalized.png": plot_confusion_matrix(matrix, normalized=True),
        "roc_curves.png": plot_roc_curves(probabilities, labels),
        "precision_recall_curves.png": plot_precision_recall_curves(probabilities, labels),
        "misclassified.png": plot_misclassified(images, errors),
        "misclassified.json": {"errors": errors},
    }
    artifacts: dict[str, Any] = {f"{prefix}/{name}": value for name, value in split.items()}
    if history:
        artifacts["training_curves.png"] = plot_training_curves(history)
        artifacts["training_history.json"] = {"history": [dict(row) for row in history]}
    return artifacts
