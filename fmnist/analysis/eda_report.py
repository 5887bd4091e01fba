"""The EDA run's artifact names and its ``eda_summary.md``: every number beside the study's.

``render_summary`` turns the metrics and scores of ``fmnist.flows.eda`` into one markdown page:
where our numbers depart from the study, the class counts, the PCA counts and errors, whether
t-SNE separates the classes better than PCA (with the numbers that say how far), and the figures.
Tables are drawn by ``fmnist.analysis.report.markdown_table``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fmnist.analysis.eda import COMPONENT_METRICS, SPLIT_NAMES, STUDY_COMPONENTS
from fmnist.analysis.report import markdown_table
from fmnist.config import STUDY_TSNE_SAMPLES, EdaConfig
from fmnist.data import CLASS_NAMES

# artifact key -> (file, what it shows); the summary lists them in this order.
FIGURES = {
    "class_distribution": ("class_distribution.png", "class counts per split (study Fig. 2)"),
    "sample_grid": ("sample_grid.png", "random training images, one row per class"),
    "class_means": ("class_means.png", "mean training image of each class"),
    "pca_cumulative_variance": (
        "pca_cumulative_variance.png",
        "cumulative explained variance, 90% / 95% marked (study Fig. 4)",
    ),
    "pca_reconstruction": (
        "pca_reconstruction.png",
        "originals vs PCA reconstructions at `pca_variance` (study Fig. 3)",
    ),
    "pca_scatter_2d": ("pca_scatter_2d.png", "first two PCA components (study Fig. 5, left)"),
    "pca_scatter_3d": ("pca_scatter_3d.png", "first three PCA components (study Fig. 5, right)"),
    "tsne_2d": ("tsne_2d.png", "t-SNE of the first training-file images (study Fig. 6)"),
    "tsne_vs_pca": ("tsne_vs_pca.png", "the same images by PCA and by t-SNE, with their scores"),
}
COUNTS_TABLE = "class_counts.json"
SUMMARY = "eda_summary.md"
ARTIFACTS = (*(file for file, _ in FIGURES.values()), COUNTS_TABLE, SUMMARY)
NO_DIFFERENCE = "Nowhere: every number of the study that we measure agrees."


def table(rows: list[dict], formats: Mapping[str, str] | None = None) -> str:
    """A markdown table as one block of the page (no trailing newline)."""
    return markdown_table(rows, formats).rstrip("\n")


def compare_count(ours: int, study: int) -> str:
    return "matches" if ours == study else f"**differs** (ours {ours}, study {study})"


def worst_classes(per_class: dict[str, float], count: int = 3) -> str:
    """The ``count`` classes with the lowest silhouette, with their values."""
    ranked = sorted(per_class.items(), key=lambda item: item[1])[:count]
    return ", ".join(f"{name} ({value:.3f})" for name, value in ranked)


def overlapping_classes(scores: dict, embedding: str = "tsne") -> list[str]:
    """Classes whose mean silhouette is <= 0: on average nearer another class than their own."""
    per_class = scores[embedding]["per_class_silhouette"]
    return [name for name, value in per_class.items() if value <= 0.0]


def list_differences(metrics: Mapping[str, float], scores: dict) -> list[str]:
    """One line for each place where our measurement departs from what the study reports."""
    lines = []
    for threshold, key in COMPONENT_METRICS.items():
        ours, study = int(metrics[key]), STUDY_COMPONENTS[threshold]
        if ours != study:
            lines.append(
                f"PCA components for {threshold:.0%} of the variance: we measure **{ours}**, "
                f"the study reports {study}."
            )
    if max(metrics["class_imbalance_ratio"], metrics["class_imbalance_ratio_val"]) != 1.0:
        lines.append(
            "The study shows equal class counts in training and validation; our imbalance ratios "
            f"are {metrics['class_imbalance_ratio']:.3f} (train) and "
            f"{metrics['class_imbalance_ratio_val']:.3f} (validation)."
        )
    if int(metrics["tsne_n_samples"]) != STUDY_TSNE_SAMPLES:
        lines.append(
            f"t-SNE ran on {int(metrics['tsne_n_samples'])} images, the study's on "
            f"{STUDY_TSNE_SAMPLES}."
        )
    if metrics["tsne_silhouette"] <= metrics["pca_silhouette"]:
        lines.append(
            "The study finds t-SNE separates the classes better than PCA; our silhouette does not "
            f"(t-SNE {metrics['tsne_silhouette']:.3f} vs PCA {metrics['pca_silhouette']:.3f})."
        )
    if overlapping_classes(scores):
        lines.append(
            "The study sees every class clustered and apart in its t-SNE plot; in ours "
            f"{', '.join(overlapping_classes(scores))} have a per-class silhouette <= 0."
        )
    return lines or [NO_DIFFERENCE]


def render_distribution(metrics: Mapping[str, float], counts: dict[str, np.ndarray]) -> str:
    rows = [
        {"class": name, **{split: int(counts[split][i]) for split in SPLIT_NAMES}}
        for i, name in enumerate(CLASS_NAMES)
    ]
    return "\n".join(
        [
            "## Class distribution (study Fig. 2)",
            "",
            "Imbalance ratio (largest / smallest class count): "
            f"train {metrics['class_imbalance_ratio']:.3f}, "
            f"validation {metrics['class_imbalance_ratio_val']:.3f}, "
            f"test {metrics['class_imbalance_ratio_test']:.3f} (`class_distribution.png`, "
            f"`{COUNTS_TABLE}`).",
            "",
            table(rows),
        ]
    )


def render_pca(cfg: EdaConfig, metrics: Mapping[str, float]) -> str:
    rows = []
    for threshold, key in COMPONENT_METRICS.items():
        ours, study = int(metrics[key]), STUDY_COMPONENTS[threshold]
        quantity = f"components for {threshold:.0%} variance"
        rows.append(
            {"quantity": quantity, "ours": ours, "study": study, "": compare_count(ours, study)}
        )
    return "\n".join(
        [
            "## PCA on the training split (study Figs. 3-5)",
            "",
            table(rows),
            "",
            f"At `pca_variance={cfg.pca_variance}` PCA keeps {int(metrics['pca_components'])} "
            f"components ({metrics['pca_explained_variance']:.2%} of the variance). Mean squared "
            "reconstruction error per pixel (pixels in [0, 1]): "
            f"{metrics['pca_reconstruction_mse']:.5f} on the training split, "
            f"{metrics['pca_reconstruction_mse_test']:.5f} on the test set "
            "(`pca_cumulative_variance.png`, `pca_reconstruction.png`, `pca_scatter_2d.png`, "
            "`pca_scatter_3d.png`).",
        ]
    )


def render_separation(cfg: EdaConfig, metrics: Mapping[str, float], scores: dict) -> str:
    n_tsne = int(metrics["tsne_n_samples"])
    worst = "least separated classes (silhouette)"
    rows = [
        {
            "embedding": label,
            "silhouette": metrics[f"{key}_silhouette"],
            "5-NN accuracy": metrics[f"{key}_knn5_accuracy"],
            worst: worst_classes(scores[key]["per_class_silhouette"]),
        }
        for key, label in (("pca", "PCA, 2 components"), ("tsne", "t-SNE, 2-D"))
    ]
    rows.append(
        {
            "embedding": "all 784 pixels (reference)",
            "5-NN accuracy": metrics["pixels_knn5_accuracy"],
        }
    )
    formats = {"silhouette": "{:.3f}", "5-NN accuracy": "{:.1%}"}
    return "\n".join(
        [
            "## Does t-SNE separate the classes and PCA not? (study Figs. 5-6)",
            "",
            f"The same {n_tsne:,} images (the first of the training file, as in the study) in "
            f"2-D: the PCA projection and t-SNE (run on their first {cfg.tsne_pca_dims} PCA "
            "components). The silhouette takes the true classes as clusters (1: compact and "
            f"apart, 0: overlapping); 5-NN accuracy is {int(metrics['cv_folds'])}-fold stratified "
            "cross-validation (`tsne_2d.png`, `tsne_vs_pca.png`).",
            "",
            table(rows, formats),
            "",
            judge_tsne(metrics, scores),
        ]
    )


def judge_tsne(metrics: Mapping[str, float], scores: dict) -> str:
    """Say, with the numbers, how far the study's 'properly separated' holds."""
    better = metrics["tsne_silhouette"] > metrics["pca_silhouette"]
    text = (
        f"t-SNE {'does' if better else 'does not'} separate the classes better than the 2-D PCA "
        f"projection: silhouette {metrics['tsne_silhouette']:.3f} vs "
        f"{metrics['pca_silhouette']:.3f}, 5-NN accuracy {metrics['tsne_knn5_accuracy']:.1%} vs "
        f"{metrics['pca_knn5_accuracy']:.1%}."
    )
    overlapping = overlapping_classes(scores)
    if overlapping:
        text += (
            f" Not every class stands apart: in the t-SNE map {', '.join(overlapping)} have a "
            "per-class silhouette <= 0, i.e. they sit among other classes."
        )
    elif metrics["tsne_silhouette"] < 0.5:
        text += (
            f" Still, a silhouette of {metrics['tsne_silhouette']:.3f} is far from 1: clusters "
            f"touch, most of all {worst_classes(scores['tsne']['per_class_silhouette'])}."
        )
    # t-SNE preserves neighbourhoods, so the pixels' own 5-NN accuracy is the fair yardstick.
    pixels, tsne = metrics["pixels_knn5_accuracy"], metrics["tsne_knn5_accuracy"]
    text += f" 5-NN on all 784 pixels of the same images scores {pixels:.1%}: " + (
        "the t-SNE map keeps the neighbourhoods the pixels already have, it adds no separation."
        if tsne <= pixels + 0.01
        else "the t-SNE map scores higher than the raw pixels."
    )
    text += (
        " (t-SNE is fitted once on all the images, so its cross-validation scores a fixed map.)"
    )
    return text


def render_summary(
    cfg: EdaConfig,
    metrics: Mapping[str, float],
    counts: dict[str, np.ndarray],
    scores: dict,
    digest: str,
) -> str:
    """``eda_summary.md``: every number on one page, beside the study's, figures named."""
    timings = ", ".join(
        f"{key.removesuffix('_seconds')} {value:.1f} s"
        for key, value in metrics.items()
        if key.endswith("_seconds")
    )
    figures = [
        {"artifact": f"[`{file}`]({file})", "shows": what} for file, what in FIGURES.values()
    ]
    return "\n".join(
        [
            "# EDA summary",
            "",
            f"Data digest `{digest}`. Splits train / validation / test: "
            f"{int(metrics['n_train']):,} / {int(metrics['n_val']):,} / "
            f"{int(metrics['n_test']):,} images (stratified 80/20 split of the training file, "
            f"`split_seed={cfg.common.split_seed}`).",
            "",
            "## Where our numbers differ from the study",
            "",
            *(f"- {line}" for line in list_differences(metrics, scores)),
            "",
            render_distribution(metrics, counts),
            "",
            render_pca(cfg, metrics),
            "",
            render_separation(cfg, metrics, scores),
            "",
            "## Figures",
            "",
            table(figures),
            "",
            f"Timings: {timings}.",
            "",
        ]
    )
