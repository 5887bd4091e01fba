"""The comparison of the tracked models, from their metrics: rows, the markdown report, figures.

``fmnist.flows.compare`` finds the runs and fills one ``Candidate`` per model (its logged metrics,
its confusion matrix and the timing of its registered pyfunc model); the pure functions here turn
them into the summary rows, the report that sets the study's published numbers beside ours, the
calibration and robustness of each model (each number with what it means in one sentence), the
per-class F1 bars and the row-normalised confusion matrices (``matplotlib.figure.Figure``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fmnist import published as study
from fmnist.analysis.evaluation import metric_key, normalise_rows
from fmnist.analysis.report import markdown_table
from fmnist.data import CLASS_NAMES

# Headline column -> (summary-row key, format of our values).
HEADLINE_COLUMNS = {
    "val acc": ("val_accuracy", "{:.4f}"),
    "test acc": ("test_accuracy", "{:.4f}"),
    "macro F1": ("test_f1_macro", "{:.4f}"),
    "params": ("param_count", "{:.0f}"),
    "train s": ("train_seconds", "{:.1f}"),
    "inference img/s": ("inference_images_per_second", "{:.0f}"),
    "p50 ms": ("latency_p50_ms", "{:.2f}"),
}
# Calibration and robustness column -> (metric, format, what it means in one sentence).
BEYOND_ACCURACY = {
    "ECE": (
        "test_ece",
        "{:.2%}",
        "Expected calibration error (15 equal-width confidence bins) of the registered model's "
        "probabilities: the average gap between how sure it says it is and how often it is "
        "right (0 means honest probabilities).",
    ),
    "ECE before": (
        "test_ece_uncalibrated",
        "{:.2%}",
        "The same before temperature scaling: what the trained network alone would claim.",
    ),
    "NLL": (
        "test_nll",
        "{:.4f}",
        "Negative log-likelihood: the mean of -log(probability given to the true class), "
        "which punishes confident mistakes hardest (lower is better).",
    ),
    "Brier": (
        "test_brier",
        "{:.4f}",
        "Brier score: the mean squared distance between the probability vector and the "
        "one-hot truth (0 best, 2 worst).",
    ),
    "T": (
        "temperature",
        "{:.3f}",
        "The temperature fitted on the validation split that divides the log-probabilities "
        "inside the logged model; above 1 means the network was over-confident.",
    ),
    "clean acc (subset)": (
        "robustness_clean_accuracy",
        "{:.4f}",
        "Accuracy on the uncorrupted test subset the robustness suite uses.",
    ),
    "mean corruption acc": (
        "robustness_mean_accuracy",
        "{:.4f}",
        "Mean accuracy over 14 corruptions (noise, blur, exposure, geometry, JPEG, inversion, "
        "occlusion, pixelation, uneven light) at 3 severities each: how much of its accuracy "
        "the model keeps on images that look less like the test set.",
    ),
}
# The study's macro F1, as its classification reports print it.
STUDY_MACRO_F1 = {"dnn": "0.89", "cnn": "0.90"}


@dataclass
class Candidate:
    """One model to compare: its run, family, recipe, metrics and registered model URI."""

    run_id: str
    name: str
    family: str
    recipe: str
    metrics: dict[str, float]
    params: dict[str, str]
    model_uri: str | None = None
    confusion: np.ndarray | None = None
    inference: dict[str, float] = field(default_factory=dict)
    # metrics of the latest ``fmnist evaluate`` run of this model (robustness lives only there)
    evaluation: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.family}:{self.recipe}"


def per_class_f1(metrics: Mapping[str, float]) -> list[float | None]:
    """Test F1 of each class in ``CLASS_NAMES`` order (None where the run did not log it)."""
    return [metrics.get(f"test_f1_{metric_key(name)}") for name in CLASS_NAMES]


def macro_f1(metrics: Mapping[str, float]) -> float | None:
    """The logged macro F1 (under any of its historical names), else the mean per-class F1."""
    for key in ("test_f1_macro", "test_macro_f1", "test_macro_avg_f1"):
        if key in metrics:
            return metrics[key]
    values = [v for v in per_class_f1(metrics) if v is not None]
    return float(np.mean(values)) if values else None


def validation_accuracy(metrics: Mapping[str, float]) -> float | None:
    """The best validation accuracy of a run (a search logs ``best_val_accuracy``)."""
    return metrics.get("best_val_accuracy", metrics.get("val_accuracy"))


def summary_rows(candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
    """One row per model: accuracies, macro and per-class F1, size, time, inference speed."""
    rows = []
    for c in candidates:
        row = {
            "model": c.name,
            "family": c.family,
            "recipe": c.recipe,
            "run_id": c.run_id,
            "val_accuracy": validation_accuracy(c.metrics),
            "test_accuracy": c.metrics.get("test_accuracy"),
            "test_f1_macro": macro_f1(c.metrics),
            "param_count": c.metrics.get("param_count", c.metrics.get("parameter_count")),
            "train_seconds": c.metrics.get("train_seconds", c.metrics.get("fit_seconds")),
            **c.inference,
            **beyond_accuracy(c),
            "model_uri": c.model_uri or "",
        }
        for name, value in zip(CLASS_NAMES, per_class_f1(c.metrics), strict=True):
            row[f"f1_{metric_key(name)}"] = value
        rows.append(row)
    return rows


def beyond_accuracy(c: Candidate) -> dict[str, float | None]:
    """Calibration and robustness of a model: the training run's own numbers first (what its
    test evaluation logged), else its latest ``evaluate`` run's; None where neither has one."""
    return {
        key: c.metrics.get(key, c.evaluation.get(key)) for key, _, _ in BEYOND_ACCURACY.values()
    }


def beyond_accuracy_section(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The calibration and robustness table and what each column means."""
    table = [
        {
            "model": r["model"],
            "family": f"{r['family']}:{r['recipe']}",
            **{column: r.get(key) for column, (key, _, _) in BEYOND_ACCURACY.items()},
        }
        for r in rows
    ]
    formats = {column: pattern for column, (_, pattern, _) in BEYOND_ACCURACY.items()}
    lines = ["## Calibration and robustness", "", markdown_table(table, formats)]
    lines += [f"- **{column}**: {meaning}" for column, (_, _, meaning) in BEYOND_ACCURACY.items()]
    missing = [r for r in rows if r.get("robustness_mean_accuracy") is None]
    if missing:
        lines.append(
            "- An empty robustness cell: the model has no `fmnist evaluate` run yet (compare "
            "does not run the suite, to stay fast); "
            + "; ".join(
                f"`fmnist evaluate --model {r['model_uri']}`" for r in missing if r["model_uri"]
            )
            + " fills it."
        )
    return [*lines, ""]


def summary_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """The rows as columns for ``mlflow.log_table``: the first row's order, other keys after."""
    first = list(rows[0])
    keys = sorted(
        {key for row in rows for key in row},
        key=lambda k: first.index(k) if k in first else 999,
    )
    return {key: [row.get(key) for row in rows] for key in keys}


def headline_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Ours (formatted) and the study's published numbers (as it prints them), one table."""
    table = [
        {
            "model": r["model"],
            "family": f"{r['family']}:{r['recipe']}",
            **{column: r.get(key) for column, (key, _) in HEADLINE_COLUMNS.items()},
        }
        for r in rows
    ]
    h = study.HEADLINE
    for family in ("dnn", "cnn"):
        table.append(
            {
                "model": f"study {family.upper()} (published)",
                "family": family,
                "val acc": h[f"{family}_val_accuracy"],
                "test acc": f"{h[f'{family}_test_accuracy']:.2f}",
                "macro F1": STUDY_MACRO_F1[family],
            }
        )
    formats = {column: pattern for column, (_, pattern) in HEADLINE_COLUMNS.items()}
    return markdown_table(table, formats)


def per_class_table(candidates: Sequence[Candidate]) -> str:
    """Per-class test F1 of each model beside the study's two classification reports."""
    f1 = {c.label: per_class_f1(c.metrics) for c in candidates}
    rows = [
        {
            "class": name,
            **{label: values[i] for label, values in f1.items()},
            "study DNN": study.DNN_F1[i],
            "study CNN": study.CNN_F1[i],
        }
        for i, name in enumerate(CLASS_NAMES)
    ]
    formats = {label: "{:.3f}" for label in f1} | {"study DNN": "{:.2f}", "study CNN": "{:.2f}"}
    return markdown_table(rows, formats)


def exploratory_table(eda: Mapping[str, float | None]) -> str:
    rows = [
        {
            "quantity": f"PCA components for {percent}% variance",
            "ours": eda.get(f"pca_components_{percent}"),
            "study": study.HEADLINE[f"pca_components_{percent}"],
        }
        for percent in (90, 95)
    ]
    return markdown_table(rows, {"ours": "{:.0f}"})


def build_report(
    rows: Sequence[Mapping[str, Any]],
    candidates: Sequence[Candidate],
    eda: Mapping[str, float | None],
) -> str:
    """Markdown report: headline table, per-class F1, Table I pointer, discrepancies.

    ``eda`` holds the latest EDA run's ``pca_components_90`` / ``_95`` (None if there is none).
    """
    lines = ["# Fashion-MNIST: our tracked results beside the study's", ""]
    lines += ["## Headline", "", headline_table(rows)]
    lines += beyond_accuracy_section(rows)
    lines += ["## Per-class test F1", "", per_class_table(candidates)]
    lines += ["## Exploratory numbers", "", exploratory_table(eda)]
    lines += ["## Where the study's text and its own numbers disagree", ""]
    lines += [f"- {item}" for item in study.DISCREPANCIES]
    ours90, study90 = eda.get("pca_components_90"), study.HEADLINE["pca_components_90"]
    if ours90 is not None and int(ours90) != study90:
        lines.append(
            f"- Measured here: {int(ours90)} components reach 90% variance, not {study90}."
        )
    lines += [
        "",
        "The study's Table I is regenerated from the dense-grid trials in the "
        "`dnn_search` run's artifacts.",
    ]
    return "\n".join(lines) + "\n"


def plot_f1_bars(candidates: Sequence[Candidate]) -> Figure:
    """Per-class test F1 bars of each model and of the study's two networks."""
    series = [(c.label, per_class_f1(c.metrics)) for c in candidates]
    series += [("study DNN", list(study.DNN_F1)), ("study CNN", list(study.CNN_F1))]
    fig = Figure(figsize=(12, 5))
    ax = fig.subplots()
    width = 0.8 / len(series)
    x = np.arange(len(CLASS_NAMES))
    for i, (label, values) in enumerate(series):
        heights = [v if v is not None else 0.0 for v in values]
        ax.bar(x + i * width - 0.4 + width / 2, heights, width, label=label)
    ax.set_xticks(x, CLASS_NAMES, rotation=30, ha="right")
    ax.set_ylabel("test F1")
    ax.set_ylim(0.5, 1.0)
    ax.set_title("Per-class F1 on the test set: our models and the study's")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def plot_confusions(candidates: Sequence[Candidate]) -> Figure | None:
    """Row-normalised confusion matrices side by side and, for two or more, the last minus the
    first; None when no candidate has a matrix."""
    with_matrix = [c for c in candidates if c.confusion is not None]
    if not with_matrix:
        return None
    panels = len(with_matrix) + (1 if len(with_matrix) >= 2 else 0)
    fig = Figure(figsize=(6 * panels, 5.5))
    axes = fig.subplots(1, panels, squeeze=False)
    for ax, c in zip(axes[0], with_matrix, strict=False):
        draw_matrix(ax, normalise_rows(c.confusion), c.label, "Blues", 0, 1)
    if len(with_matrix) >= 2:
        first, last = with_matrix[0], with_matrix[-1]
        diff = normalise_rows(last.confusion) - normalise_rows(first.confusion)
        bound = max(float(np.abs(diff).max()), 1e-6)
        title = f"{last.label} minus {first.label}"
        draw_matrix(axes[0][-1], diff, title, "RdBu_r", -bound, bound)
    fig.suptitle("Row-normalised test confusion matrices (rows: true class)")
    fig.tight_layout()
    return fig


def draw_matrix(
    ax: Axes, matrix: np.ndarray, title: str, cmap: str, vmin: float, vmax: float
) -> None:
    image = ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xticks(range(10), CLASS_NAMES, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(10), CLASS_NAMES, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=9)
    ax.figure.colorbar(image, ax=ax, fraction=0.046)
