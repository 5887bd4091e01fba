"""The comparison of the tracked models: summary rows, the report that sets the study's published
numbers beside ours (calibration and robustness included, each number with what it means) and the
per-class F1 bars and confusion matrices. ``fmnist.flows.compare`` fills one ``Candidate`` a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from fmnist import published as study
from fmnist.analysis.metrics import CLASS_KEYS, draw_matrix, normalise_rows
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
# Calibration and robustness column -> (metric, format), and what each means in one sentence.
BEYOND_ACCURACY = {
    "ECE": ("test_ece", "{:.2%}"),
    "ECE before": ("test_ece_uncalibrated", "{:.2%}"),
    "NLL": ("test_nll", "{:.4f}"),
    "Brier": ("test_brier", "{:.4f}"),
    "T": ("temperature", "{:.3f}"),
    "clean acc (subset)": ("robustness_clean_accuracy", "{:.4f}"),
    "mean corruption acc": ("robustness_mean_accuracy", "{:.4f}"),
}
MEANINGS = {
    "ECE": "the mean gap (15 bins) between how sure the model claims to be and its accuracy",
    "ECE before": "the same before temperature scaling: what the trained network alone claims",
    "NLL": "the mean -log(probability of the true class), hardest on confident mistakes",
    "Brier": "the mean squared distance of the probabilities to the one-hot truth (0 to 2)",
    "T": "the temperature fitted on the validation split; above 1: the net was over-confident",
    "clean acc (subset)": "the accuracy on the uncorrupted test subset of the robustness suite",
    "mean corruption acc": "the mean accuracy over 14 corruptions at 3 severities (noise, blur, "
    "exposure, geometry, JPEG, inversion, occlusion, pixelation, uneven light)",
}
STUDY_MACRO_F1 = {"dnn": "0.89", "cnn": "0.90"}  # as the study's classification reports print it


@dataclass
class Candidate:
    """One model to compare: its run, family, recipe, metrics and registered model URI."""

    run_id: str
    name: str
    family: str
    recipe: str
    metrics: dict[str, float]
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
    return [metrics.get(f"test_f1_{key}") for key in CLASS_KEYS]


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
    """One row per model: accuracy, F1, size, speed, calibration and robustness."""
    rows = []
    for c in candidates:
        m = c.metrics
        row = {"model": c.name, "family": c.family, "recipe": c.recipe, "run_id": c.run_id}
        row |= {"val_accuracy": validation_accuracy(m), "test_accuracy": m.get("test_accuracy")}
        row["test_f1_macro"] = macro_f1(m)
        row["param_count"] = m.get("param_count", m.get("parameter_count"))
        row["train_seconds"] = m.get("train_seconds", m.get("fit_seconds"))
        row |= c.inference
        row |= {key: m.get(key, c.evaluation.get(key)) for key, _ in BEYOND_ACCURACY.values()}
        row["model_uri"] = c.model_uri or ""
        row |= {f"f1_{key}": f1 for key, f1 in zip(CLASS_KEYS, per_class_f1(m), strict=True)}
        rows.append(row)
    return rows


def summary_columns(rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
    """The rows as columns for ``mlflow.log_table``: the first row's order, other keys after."""
    return {k: [row.get(k) for row in rows] for k in dict.fromkeys(k for row in rows for k in row)}


def model_table(rows: Sequence[Mapping], columns: Mapping[str, tuple], extra=()) -> str:
    """The rows' model, family:recipe and ``columns`` (name -> (key, format)), then ``extra``."""
    table = [
        {"model": r["model"], "family": f"{r['family']}:{r['recipe']}"}
        | {column: r.get(key) for column, (key, _) in columns.items()}
        for r in rows
    ]
    return markdown_table([*table, *extra], {column: fmt for column, (_, fmt) in columns.items()})


def build_report(rows: Sequence[Mapping], candidates: Sequence[Candidate], eda: Mapping) -> str:
    """The markdown report; ``eda`` holds the latest EDA run's component counts (None: none)."""
    published = []  # the study's numbers, as it prints them
    for f in ("dnn", "cnn"):
        val, test = study.HEADLINE[f"{f}_val_accuracy"], study.HEADLINE[f"{f}_test_accuracy"]
        published.append({"model": f"study {f.upper()} (published)", "family": f, "val acc": val})
        published[-1] |= {"test acc": f"{test:.2f}", "macro F1": STUDY_MACRO_F1[f]}
    f1 = {c.label: per_class_f1(c.metrics) for c in candidates}
    per_class = [
        {"class": name, **{label: values[i] for label, values in f1.items()}}
        | {"study DNN": study.DNN_F1[i], "study CNN": study.CNN_F1[i]}
        for i, name in enumerate(CLASS_NAMES)
    ]
    f1_formats = {label: "{:.3f}" for label in f1} | {"study DNN": "{:.2f}", "study CNN": "{:.2f}"}
    exploratory = [
        {"quantity": f"PCA components for {p}% variance", "ours": eda.get(f"pca_components_{p}")}
        | {"study": study.HEADLINE[f"pca_components_{p}"]}
        for p in (90, 95)
    ]
    lines = ["# Fashion-MNIST: our tracked results beside the study's", ""]
    lines += ["## Headline", "", model_table(rows, HEADLINE_COLUMNS, published)]
    lines += ["## Calibration and robustness", "", model_table(rows, BEYOND_ACCURACY)]
    lines += [f"- **{column}**: {meaning}." for column, meaning in MEANINGS.items()]
    missing = [r for r in rows if r.get("robustness_mean_accuracy") is None]
    if missing:
        commands = [
            f"`fmnist evaluate --model {r['model_uri']}`" for r in missing if r["model_uri"]
        ]
        lines.append(
            "- An empty robustness cell: the model has no `fmnist evaluate` run yet (compare does "
            f"not run the suite, to stay fast); {'; '.join(commands)} fills it."
        )
    lines += ["", "## Per-class test F1", "", markdown_table(per_class, f1_formats)]
    lines += ["## Exploratory numbers", "", markdown_table(exploratory, {"ours": "{:.0f}"})]
    lines += ["## Where the study's text and its own numbers disagree", ""]
    lines += [f"- {item}" for item in study.DISCREPANCIES]
    ours90, study90 = eda.get("pca_components_90"), study.HEADLINE["pca_components_90"]
    if ours90 is not None and int(ours90) != study90:
        lines.append(
            f"- Measured here: {int(ours90)} components reach 90% variance, not {study90}."
        )
    lines += [
        "",
        "The study's Table I is regenerated from the dense-grid trials in the `dnn_search` run's "
        "artifacts.",
    ]
    return "\n".join(lines) + "\n"


def plot_f1_bars(candidates: Sequence[Candidate]) -> Figure:
    """Per-class test F1 bars of each model and of the study's two networks."""
    series = [(c.label, per_class_f1(c.metrics)) for c in candidates]
    series += [("study DNN", list(study.DNN_F1)), ("study CNN", list(study.CNN_F1))]
    fig = Figure(figsize=(12, 5), layout="constrained")
    ax = fig.subplots()
    width, x = 0.8 / len(series), np.arange(len(CLASS_NAMES))
    for i, (label, values) in enumerate(series):
        heights = [0.0 if v is None else v for v in values]
        ax.bar(x + i * width - 0.4 + width / 2, heights, width, label=label)
    ax.set_xticks(x, CLASS_NAMES, rotation=30, ha="right")
    ax.set(ylabel="test F1", ylim=(0.5, 1.0))
    ax.set_title("Per-class F1 on the test set: our models and the study's")
    ax.legend(fontsize=8, ncol=2)
    return fig


def plot_confusions(candidates: Sequence[Candidate]) -> Figure | None:
    """Row-normalised confusion matrices side by side, the last minus the first; None if none."""
    shown = [c for c in candidates if c.confusion is not None]
    if not shown:
        return None
    fig = Figure(figsize=(6 * (len(shown) + (len(shown) > 1)), 5.5), layout="constrained")
    axes = fig.subplots(1, len(shown) + (len(shown) > 1), squeeze=False)[0]
    for ax, c in zip(axes, shown, strict=False):
        draw_matrix(ax, normalise_rows(c.confusion), c.label, vmax=1)
    if len(shown) > 1:
        diff = normalise_rows(shown[-1].confusion) - normalise_rows(shown[0].confusion)
        bound = max(float(np.abs(diff).max()), 1e-6)
        title = f"{shown[-1].label} minus {shown[0].label}"
        draw_matrix(axes[-1], diff, title, "RdBu_r", -bound, bound)
    fig.suptitle("Row-normalised test confusion matrices (rows: true class)")
    return fig
