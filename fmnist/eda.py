"""Exploratory data analysis of the study (Figs. 2-6) in one tracked run, a number per claim.

``run_eda`` loads the data, makes the study's train / validation / test splits and logs to one
MLflow run tagged ``entry_point=eda``: the class distribution (figure, table, imbalance ratio), a
grid of sample images, the mean image of each class, PCA fitted on the training split (cumulative
explained variance, components for 90% / 95%, original vs reconstructed images and the mean
reconstruction error, 2-D and 3-D scatters) and t-SNE of the first ``tsne_samples`` images of the
training file. The study's claim that t-SNE separates the classes where PCA does not is measured
by the silhouette score and the cross-validated 5-NN accuracy of both 2-D embeddings of the same
images. ``eda_summary.md`` gathers the numbers, sets them beside the study's, names the figures.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click
import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and under `mlflow run` without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from fmnist.commands import CommonConfig  # noqa: E402
from fmnist.data import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES, class_counts  # noqa: E402
from fmnist.errors import ConfigError  # noqa: E402

if TYPE_CHECKING:
    from sklearn.decomposition import PCA

    from fmnist.data import FashionMNIST, Splits
    from fmnist.pipeline import PipelineConfig

# What the study reports (Section III.B), set beside our measurements in the summary.
STUDY_COMPONENTS = {0.90: 87, 0.95: 187}
COMPONENT_METRICS = {0.90: "pca_components_90", 0.95: "pca_components_95"}
STUDY_TSNE_SAMPLES = 5000
KNN_NEIGHBORS = 5
CV_FOLDS = 5
MIN_TSNE_SAMPLES = 30
SPLIT_NAMES = ("train", "val", "test")
COLORS = plt.get_cmap("tab10").colors
SAVE_KWARGS = {"dpi": 110, "bbox_inches": "tight"}

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


@dataclass(frozen=True)
class EdaConfig:
    """Options of the EDA; the defaults reproduce the study (t-SNE on 5000 images, 95% PCA)."""

    common: CommonConfig = field(default_factory=CommonConfig)
    tsne_samples: int = STUDY_TSNE_SAMPLES
    pca_variance: float = 0.95
    # t-SNE runs on the first PCA components, the usual speed-up for 784-pixel inputs.
    tsne_pca_dims: int = 50
    tsne_perplexity: float = 30.0
    # Scatter plots show a seeded subsample: 48,000 overlapping points hide the structure.
    scatter_samples: int = 10000
    grid_columns: int = 10
    run_name: str = "eda"

    def validate(self) -> None:
        if not 0.0 < self.pca_variance < 1.0:
            raise ConfigError(f"pca_variance must lie in (0, 1), got {self.pca_variance}.")
        if self.tsne_samples < MIN_TSNE_SAMPLES:
            raise ConfigError(
                f"tsne_samples must be at least {MIN_TSNE_SAMPLES} (t-SNE and the 5-fold 5-NN "
                f"score need them), got {self.tsne_samples}."
            )
        if self.tsne_pca_dims < 2 or self.scatter_samples < 1 or self.grid_columns < 1:
            raise ConfigError("tsne_pca_dims >= 2, scatter_samples >= 1 and grid_columns >= 1.")


class Progress:
    """Echo the start and duration of each slow step (unless quiet) and keep the durations."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.seconds: dict[str, float] = {}

    def note(self, message: str) -> None:
        if not self.quiet:
            click.echo(f"[eda] {message}")

    @contextmanager
    def step(self, key: str, label: str) -> Iterator[None]:
        self.note(f"{label} ...")
        start = time.perf_counter()
        yield
        self.seconds[key] = time.perf_counter() - start
        self.note(f"{label}: done in {self.seconds[key]:.1f} s")


# --- class distribution ----------------------------------------------------------------------


def count_split_classes(splits: Splits) -> dict[str, np.ndarray]:
    return {name: class_counts(getattr(splits, name).labels) for name in SPLIT_NAMES}


def imbalance_ratio(counts: np.ndarray) -> float:
    """Largest over smallest class count (1.0 is perfectly balanced; inf if a class is absent)."""
    smallest = int(counts.min())
    return float(counts.max()) / smallest if smallest else float("inf")


def counts_table(counts: dict[str, np.ndarray]) -> dict[str, list]:
    """Counts as columns (class, train, val, test) for ``mlflow.log_table``."""
    table: dict[str, list] = {"class": list(CLASS_NAMES)}
    table.update({name: [int(c) for c in values] for name, values in counts.items()})
    return table


def plot_class_distribution(counts: dict[str, np.ndarray]):
    """Grouped bars, one group per class and one bar per split (the study's Fig. 2 count plot)."""
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(counts)
    positions = np.arange(NUM_CLASSES)
    for offset, ((name, values), color) in enumerate(zip(counts.items(), COLORS, strict=False)):
        label = f"{name} ({int(values.sum()):,} images)"
        shift = (offset - (len(counts) - 1) / 2) * width
        ax.bar(positions + shift, values, width, color=color, label=label)
    ax.set_xticks(positions, CLASS_NAMES, rotation=30, ha="right")
    ax.set_xlabel("class")
    ax.set_ylabel("number of images")
    ax.set_title("Class distribution of the train / validation / test splits (study Fig. 2)")
    ax.grid(axis="y", alpha=0.3)
    # Head room above the bars keeps the legend off them.
    ax.set_ylim(0, 1.25 * max(int(values.max()) for values in counts.values()))
    ax.legend(title="split", loc="upper center", ncol=len(counts))
    fig.tight_layout()
    return fig


# --- images --------------------------------------------------------------------------------------


def pick_per_class(labels: np.ndarray, per_class: int, seed: int) -> list[np.ndarray]:
    """Up to ``per_class`` seeded random indices of each class, in class order."""
    rng = np.random.default_rng(seed)
    picked = []
    for label in range(NUM_CLASSES):
        members = np.flatnonzero(labels == label)
        size = min(per_class, len(members))
        picked.append(np.sort(rng.choice(members, size=size, replace=False)))
    return picked


def plot_sample_grid(images: np.ndarray, labels: np.ndarray, columns: int, seed: int):
    picked = pick_per_class(labels, columns, seed)
    fig, axes = plt.subplots(
        NUM_CLASSES, columns, figsize=(0.95 * columns + 1.6, 0.95 * NUM_CLASSES + 0.6)
    )
    axes = np.asarray(axes).reshape(NUM_CLASSES, columns)
    for row, indices in enumerate(picked):
        for col in range(columns):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col < len(indices):
                ax.imshow(images[indices[col]], cmap="gray_r", vmin=0, vmax=255)
        axes[row, 0].set_ylabel(CLASS_NAMES[row], rotation=0, ha="right", va="center")
    fig.suptitle(f"Random training images, {columns} per class (one row per class)")
    fig.tight_layout()
    return fig


def class_means(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean image of each class in [0, 1] (a class absent from ``labels`` gives zeros)."""
    means = np.zeros((NUM_CLASSES, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float64)
    for label in range(NUM_CLASSES):
        members = images[labels == label]
        if len(members):
            means[label] = members.mean(axis=0) / 255.0
    return means


def plot_class_means(means: np.ndarray):
    fig, axes = plt.subplots(2, NUM_CLASSES // 2, figsize=(11, 5))
    for label, ax in enumerate(axes.flat):
        shown = ax.imshow(means[label], cmap="magma", vmin=0.0, vmax=1.0)
        ax.set_title(CLASS_NAMES[label])
        ax.axis("off")
    fig.colorbar(shown, ax=axes, shrink=0.8, label="mean pixel intensity (0-1)")
    fig.suptitle("Mean training image of each class")
    return fig


# --- PCA -----------------------------------------------------------------------------------------


def flatten(images: np.ndarray) -> np.ndarray:
    """uint8 (N, 28, 28) to float32 (N, 784) in [0, 1], the scaling the study used."""
    return images.reshape(len(images), -1).astype(np.float32) / np.float32(255.0)


def fit_pca(features: np.ndarray) -> PCA:
    """Every component, from the exact eigendecomposition of the 784 x 784 covariance in float64.

    The cumulative curve needs every explained-variance ratio. With 48,000 samples of 784 pixels
    this gives the full SVD's ratios (equal to 1e-8 in float64) in a second or two instead of
    tens of seconds; float32 would move the 95% crossing (0.95003 at 187 components) by 5e-6.
    """
    from sklearn.decomposition import PCA

    return PCA(svd_solver="covariance_eigh").fit(features.astype(np.float64))


def components_for_variance(cumulative: np.ndarray, threshold: float) -> int:
    """Fewest components whose cumulative ratio exceeds ``threshold``: ``PCA(n_components=t)``'s
    rule, so the count equals what the study's ``PCA(n_components=0.95)`` kept."""
    return int(min(np.searchsorted(cumulative, threshold, side="right") + 1, len(cumulative)))


def reconstruct(pca: PCA, features: np.ndarray, n_components: int) -> np.ndarray:
    """Project onto the first ``n_components`` components and back to pixel space."""
    basis = pca.components_[:n_components]
    codes = (features - pca.mean_) @ basis.T
    return codes @ basis + pca.mean_


def reconstruction_mse(pca: PCA, features: np.ndarray, n_components: int) -> float:
    """Mean squared error per pixel (pixels in [0, 1]), in chunks to bound memory."""
    total = 0.0
    for start in range(0, len(features), 8192):
        chunk = features[start : start + 8192]
        total += float(np.square(reconstruct(pca, chunk, n_components) - chunk).sum())
    return total / features.size


def plot_cumulative_variance(cumulative: np.ndarray, marks: dict[float, int]):
    fig, ax = plt.subplots(figsize=(8, 5))
    counts = np.arange(1, len(cumulative) + 1)
    ax.plot(counts, cumulative * 100, color="black", label="cumulative explained variance")
    for (threshold, ours), color in zip(
        sorted(marks.items()), ("tab:blue", "tab:red"), strict=False
    ):
        ax.axhline(threshold * 100, color=color, linestyle=":", linewidth=1)
        ax.axvline(ours, color=color, linestyle="--", linewidth=1)
        ax.plot(
            [ours], [threshold * 100], "o", color=color, label=f"{threshold:.0%}: {ours} (ours)"
        )
        study = STUDY_COMPONENTS.get(threshold)
        if study is not None:
            label = f"{threshold:.0%}: {study} (study)"
            ax.plot([study], [threshold * 100], "x", color=color, markersize=10, label=label)
    ax.set_xscale("log")
    ax.set_xlim(1, len(cumulative))
    ax.set_ylim(0, 101)
    ax.set_xlabel("number of principal components (log scale)")
    ax.set_ylabel("cumulative explained variance (%)")
    ax.set_title("PCA on the training split: cumulative explained variance (study Fig. 4)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def plot_reconstructions(
    originals: np.ndarray, rebuilt: np.ndarray, labels: np.ndarray, n_components: int, var: float
):
    fig, axes = plt.subplots(2, len(originals), figsize=(1.25 * len(originals) + 1.2, 3.4))
    axes = np.asarray(axes).reshape(2, len(originals))
    for col, label in enumerate(labels):
        for row, image in enumerate((originals[col], rebuilt[col])):
            ax = axes[row, col]
            ax.imshow(image.reshape(IMAGE_SIZE, IMAGE_SIZE), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, col].set_title(CLASS_NAMES[label], fontsize=9)
    axes[0, 0].set_ylabel("original")
    axes[1, 0].set_ylabel(f"{n_components} comp.")
    fig.suptitle(
        f"Original (top) vs PCA reconstruction from {n_components} components "
        f"({var:.0%} variance, bottom) (study Fig. 3)"
    )
    fig.tight_layout()
    return fig


def subsample(n: int, size: int, seed: int) -> np.ndarray:
    if size >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def scatter_by_class(ax, points: np.ndarray, labels: np.ndarray, size: float = 3.0) -> None:
    """One scatter per class, so the legend names classes; small translucent markers."""
    for label in range(NUM_CLASSES):
        members = points[labels == label]
        ax.scatter(*members.T, s=size, alpha=0.5, color=COLORS[label], label=CLASS_NAMES[label])


def add_class_legend(ax) -> None:
    ax.legend(markerscale=4, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))


def plot_pca_scatter_2d(points: np.ndarray, labels: np.ndarray, n_total: int):
    fig, ax = plt.subplots(figsize=(8.5, 6.5))
    scatter_by_class(ax, points[:, :2], labels)
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(
        f"First two PCA components, {len(points):,} of {n_total:,} training images "
        "(study Fig. 5, left)"
    )
    add_class_legend(ax)
    fig.tight_layout()
    return fig


def plot_pca_scatter_3d(points: np.ndarray, labels: np.ndarray, n_total: int):
    fig = plt.figure(figsize=(9, 7))
    ax = fig.add_subplot(projection="3d")
    scatter_by_class(ax, points[:, :3], labels, size=2.0)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_zlabel("PC 3")
    ax.view_init(elev=20, azim=-60)
    ax.set_title(
        f"First three PCA components, {len(points):,} of {n_total:,} training images "
        "(study Fig. 5, right)"
    )
    # A legend beside a 3-D axes would cover its z label: put it in the figure's right margin.
    handles, names = ax.get_legend_handles_labels()
    fig.legend(handles, names, markerscale=4, fontsize=8, loc="center right")
    fig.subplots_adjust(left=0.0, right=0.82)
    return fig


# --- t-SNE and separation scores -----------------------------------------------------------------


def tsne_perplexity(n_samples: int, wanted: float) -> float:
    """sklearn requires perplexity < n_samples; tiny test runs need a smaller one."""
    return float(min(wanted, max(2.0, (n_samples - 1) / 3.0)))


def run_tsne(features: np.ndarray, seed: int, perplexity: float):
    from sklearn.manifold import TSNE

    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, n_jobs=2)
    embedding = tsne.fit_transform(features)
    return embedding, float(tsne.kl_divergence_)


def cv_folds(labels: np.ndarray) -> int:
    """5 folds, fewer when the rarest class has fewer members (only on tiny test data)."""
    sizes = np.bincount(labels)
    return int(max(2, min(CV_FOLDS, sizes[sizes > 0].min())))


def knn_accuracy(features: np.ndarray, labels: np.ndarray, seed: int) -> float:
    """Mean stratified-CV accuracy of 5-NN: how well local neighbourhoods keep the class."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    folds = StratifiedKFold(cv_folds(labels), shuffle=True, random_state=seed)
    scores = cross_val_score(KNeighborsClassifier(KNN_NEIGHBORS), features, labels, cv=folds)
    return float(scores.mean())


def separation_scores(embedding: np.ndarray, labels: np.ndarray, seed: int) -> dict[str, Any]:
    """Silhouette (in [-1, 1]), per-class silhouette and 5-NN CV accuracy of one embedding."""
    from sklearn.metrics import silhouette_samples

    per_sample = silhouette_samples(embedding, labels)
    per_class = {CLASS_NAMES[c]: float(per_sample[labels == c].mean()) for c in np.unique(labels)}
    return {
        "silhouette": float(per_sample.mean()),
        "per_class_silhouette": per_class,
        "knn5_accuracy": knn_accuracy(embedding, labels, seed),
    }


def plot_embedding(ax, points: np.ndarray, labels: np.ndarray, scores: dict, name: str) -> None:
    scatter_by_class(ax, points, labels, size=4.0)
    ax.set_xlabel(f"{name} 1")
    ax.set_ylabel(f"{name} 2")
    ax.set_title(
        f"{name}: silhouette {scores['silhouette']:.3f}, "
        f"5-NN accuracy {scores['knn5_accuracy']:.1%}"
    )


def plot_tsne(embedding: np.ndarray, labels: np.ndarray, scores: dict, pca_dims: int):
    fig, ax = plt.subplots(figsize=(9, 7))
    plot_embedding(ax, embedding, labels, scores, "t-SNE")
    fig.suptitle(
        f"t-SNE to 2-D of the first {len(labels):,} training-file images "
        f"(via {pca_dims} PCA components) (study Fig. 6)"
    )
    add_class_legend(ax)
    fig.tight_layout()
    return fig


def plot_tsne_vs_pca(
    tsne_points: np.ndarray, pca_points: np.ndarray, labels: np.ndarray, scores: dict
):
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    plot_embedding(axes[0], pca_points, labels, scores["pca"], "PCA")
    plot_embedding(axes[1], tsne_points, labels, scores["tsne"], "t-SNE")
    add_class_legend(axes[1])
    fig.suptitle(f"The same {len(labels):,} images in 2-D: PCA projection vs t-SNE")
    fig.tight_layout()
    return fig


# --- summary -------------------------------------------------------------------------------------


def compare(ours: int, study: int) -> str:
    return "matches" if ours == study else f"**differs** (ours {ours}, study {study})"


def worst_classes(per_class: dict[str, float], count: int = 3) -> str:
    ranked = sorted(per_class.items(), key=lambda item: item[1])[:count]
    return ", ".join(f"{name} ({value:.3f})" for name, value in ranked)


def overlapping_classes(scores: dict, embedding: str = "tsne") -> list[str]:
    """Classes whose mean silhouette is <= 0: on average nearer another class than their own."""
    per_class = scores[embedding]["per_class_silhouette"]
    return [name for name, value in per_class.items() if value <= 0.0]


def differences(metrics: dict[str, float], scores: dict) -> list[str]:
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
    return lines or ["Nowhere: every number of the study that we measure agrees."]


def summary_distribution(metrics: dict[str, float], counts: dict[str, np.ndarray]) -> str:
    rows = [
        f"| {name} | " + " | ".join(str(int(counts[s][i])) for s in SPLIT_NAMES) + " |"
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
            "| class | train | val | test |",
            "|---|---|---|---|",
            *rows,
        ]
    )


def summary_pca(cfg: EdaConfig, metrics: dict[str, float]) -> str:
    rows = []
    for threshold, key in COMPONENT_METRICS.items():
        ours, study = int(metrics[key]), STUDY_COMPONENTS[threshold]
        rows.append(
            f"| components for {threshold:.0%} variance | {ours} | {study} | "
            f"{compare(ours, study)} |"
        )
    return "\n".join(
        [
            "## PCA on the training split (study Figs. 3-5)",
            "",
            "| quantity | ours | study | |",
            "|---|---|---|---|",
            *rows,
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


def summary_separation(cfg: EdaConfig, metrics: dict[str, float], scores: dict) -> str:
    n_tsne = int(metrics["tsne_n_samples"])
    rows = [
        f"| {label} | {metrics[f'{key}_silhouette']:.3f} | {metrics[f'{key}_knn5_accuracy']:.1%} "
        f"| {worst_classes(scores[key]['per_class_silhouette'])} |"
        for key, label in (("pca", "PCA, 2 components"), ("tsne", "t-SNE, 2-D"))
    ]
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
            "| embedding | silhouette | 5-NN accuracy | least separated classes (silhouette) |",
            "|---|---|---|---|",
            *rows,
            f"| all 784 pixels (reference) | | {metrics['pixels_knn5_accuracy']:.1%} | |",
            "",
            tsne_verdict(metrics, scores),
        ]
    )


def tsne_verdict(metrics: dict[str, float], scores: dict) -> str:
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


def write_summary(
    cfg: EdaConfig,
    metrics: dict[str, float],
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
    figures = [f"| [`{file}`]({file}) | {what} |" for file, what in FIGURES.values()]
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
            *(f"- {line}" for line in differences(metrics, scores)),
            "",
            summary_distribution(metrics, counts),
            "",
            summary_pca(cfg, metrics),
            "",
            summary_separation(cfg, metrics, scores),
            "",
            "## Figures",
            "",
            "| artifact | shows |",
            "|---|---|",
            *figures,
            "",
            f"Timings: {timings}.",
            "",
        ]
    )


# --- the run -------------------------------------------------------------------------------------


def log_figure(fig, key: str) -> None:
    import mlflow

    mlflow.log_figure(fig, FIGURES[key][0], save_kwargs=SAVE_KWARGS)
    plt.close(fig)


def eda_params(cfg: EdaConfig, n_tsne: int, perplexity: float) -> dict[str, Any]:
    return {
        "tsne_samples": cfg.tsne_samples,
        "pca_variance": cfg.pca_variance,
        "seed": cfg.common.seed,
        "split_seed": cfg.common.split_seed,
        "pca_fit_on": "train split",
        "pca_svd_solver": "covariance_eigh",
        "pca_dtype": "float64",
        "tsne_input": f"first {n_tsne} images of the training file",
        "tsne_pca_dims": cfg.tsne_pca_dims,
        "tsne_perplexity": perplexity,
        "tsne_init": "pca",
        "tsne_learning_rate": "auto",
        "tsne_max_iter": 1000,
        "tsne_metric": "euclidean",
        "knn_neighbors": KNN_NEIGHBORS,
        "scatter_samples": cfg.scatter_samples,
        "grid_columns": cfg.grid_columns,
    }


def log_distribution(splits: Splits, metrics: dict) -> dict[str, np.ndarray]:
    import mlflow

    counts = count_split_classes(splits)
    mlflow.log_table(counts_table(counts), COUNTS_TABLE)
    log_figure(plot_class_distribution(counts), "class_distribution")
    metrics["class_imbalance_ratio"] = imbalance_ratio(counts["train"])
    metrics["class_imbalance_ratio_val"] = imbalance_ratio(counts["val"])
    metrics["class_imbalance_ratio_test"] = imbalance_ratio(counts["test"])
    return counts


def log_images(cfg: EdaConfig, images: np.ndarray, labels: np.ndarray) -> None:
    log_figure(plot_sample_grid(images, labels, cfg.grid_columns, cfg.common.seed), "sample_grid")
    log_figure(plot_class_means(class_means(images, labels)), "class_means")


def measure_pca(cfg: EdaConfig, pca: PCA, features: np.ndarray, splits: Splits) -> dict:
    cumulative = np.cumsum(pca.explained_variance_ratio_)
    kept = components_for_variance(cumulative, cfg.pca_variance)
    test_features = flatten(splits.test.images.numpy())
    return {
        **{key: components_for_variance(cumulative, t) for t, key in COMPONENT_METRICS.items()},
        "pca_components": kept,
        "pca_explained_variance": float(cumulative[kept - 1]),
        "pca_reconstruction_mse": reconstruction_mse(pca, features, kept),
        "pca_reconstruction_mse_test": reconstruction_mse(pca, test_features, kept),
    }


def log_pca_figures(cfg: EdaConfig, pca: PCA, features: np.ndarray, labels, kept: int) -> None:
    cumulative = np.cumsum(pca.explained_variance_ratio_)
    marks = {t: components_for_variance(cumulative, t) for t in COMPONENT_METRICS}
    log_figure(plot_cumulative_variance(cumulative, marks), "pca_cumulative_variance")
    first = np.array([idx[0] for idx in pick_per_class(labels, 1, cfg.common.seed) if len(idx)])
    rebuilt = reconstruct(pca, features[first], kept)
    figure = plot_reconstructions(features[first], rebuilt, labels[first], kept, cfg.pca_variance)
    log_figure(figure, "pca_reconstruction")
    shown = subsample(len(features), cfg.scatter_samples, cfg.common.seed)
    points = pca.transform(features[shown])[:, :3]
    log_figure(plot_pca_scatter_2d(points, labels[shown], len(features)), "pca_scatter_2d")
    log_figure(plot_pca_scatter_3d(points, labels[shown], len(features)), "pca_scatter_3d")


def log_pca(cfg: EdaConfig, splits: Splits, metrics: dict, progress: Progress) -> PCA:
    """Fit PCA on the training split, log its numbers and figures; return the fitted PCA."""
    features, labels = flatten(splits.train.images.numpy()), splits.train.labels.numpy()
    with progress.step("pca_seconds", f"PCA on {features.shape[0]:,} x {features.shape[1]}"):
        pca = fit_pca(features)
    metrics.update(measure_pca(cfg, pca, features, splits))
    progress.note(
        f"components for 90% / 95% variance: {metrics['pca_components_90']} / "
        f"{metrics['pca_components_95']} (study: {STUDY_COMPONENTS[0.90]} / "
        f"{STUDY_COMPONENTS[0.95]})"
    )
    with progress.step("pca_figures_seconds", "PCA figures"):
        log_pca_figures(cfg, pca, features, labels, metrics["pca_components"])
    return pca


def score_embeddings(embedding, projected, pixels, labels, seed: int) -> tuple[dict, dict]:
    """Separation scores of t-SNE and PCA on the same samples, and their metrics."""
    scores = {
        "tsne": separation_scores(embedding, labels, seed),
        "pca": separation_scores(projected[:, :2], labels, seed),
    }
    metrics = {
        "cv_folds": cv_folds(labels),
        "tsne_silhouette": scores["tsne"]["silhouette"],
        "pca_silhouette": scores["pca"]["silhouette"],
        "tsne_knn5_accuracy": scores["tsne"]["knn5_accuracy"],
        "pca_knn5_accuracy": scores["pca"]["knn5_accuracy"],
        "pixels_knn5_accuracy": knn_accuracy(pixels, labels, seed),
    }
    return scores, metrics


def log_tsne(
    cfg: EdaConfig, data: FashionMNIST, pca: PCA, metrics: dict, progress: Progress
) -> dict:
    """t-SNE of the first images of the training file; score it and PCA on the same images."""
    n_tsne = min(cfg.tsne_samples, len(data.train_labels))
    if n_tsne < cfg.tsne_samples:
        progress.note(f"only {n_tsne} images in the training file: t-SNE uses all of them")
    pixels = flatten(data.train_images[:n_tsne].numpy())
    labels = data.train_labels[:n_tsne].numpy()
    projected = pca.transform(pixels)
    perplexity = tsne_perplexity(n_tsne, cfg.tsne_perplexity)
    label = f"t-SNE of {n_tsne:,} images ({cfg.tsne_pca_dims} PCA dims)"
    with progress.step("tsne_seconds", label):
        embedding, kl = run_tsne(projected[:, : cfg.tsne_pca_dims], cfg.common.seed, perplexity)
    with progress.step("scores_seconds", "silhouette and cross-validated 5-NN accuracy"):
        scores, scored = score_embeddings(embedding, projected, pixels, labels, cfg.common.seed)
    metrics.update(scored, tsne_n_samples=n_tsne, tsne_kl_divergence=kl)
    progress.note(
        f"silhouette t-SNE {scored['tsne_silhouette']:.3f} vs PCA {scored['pca_silhouette']:.3f};"
        f" 5-NN accuracy {scored['tsne_knn5_accuracy']:.1%} vs {scored['pca_knn5_accuracy']:.1%}"
    )
    with progress.step("tsne_figures_seconds", "t-SNE figures"):
        log_figure(plot_tsne(embedding, labels, scores["tsne"], cfg.tsne_pca_dims), "tsne_2d")
        log_figure(plot_tsne_vs_pca(embedding, projected[:, :2], labels, scores), "tsne_vs_pca")
    return {"scores": scores, "n_tsne": n_tsne, "perplexity": perplexity}


def run_eda(cfg: EdaConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run the whole EDA in one MLflow run; return its metrics and ``run_id``."""
    import mlflow

    from fmnist import tracking
    from fmnist.data import load_fashion_mnist, make_splits

    cfg.validate()
    progress = Progress(cfg.common.quiet)
    start = time.perf_counter()
    common = cfg.common
    with tracking.start_run(
        "eda", "none", common.experiment_name, run_name=cfg.run_name, parent_run_id=parent_run_id
    ) as run:
        with progress.step("load_seconds", "loading the data"):
            data = load_fashion_mnist(common.data_dir or None)
            splits = make_splits(data, common.split_seed)
        tracking.log_dataset(data.digest, context="eda")
        metrics: dict[str, Any] = {
            "n_train": len(splits.train),
            "n_val": len(splits.val),
            "n_test": len(splits.test),
        }
        counts = log_distribution(splits, metrics)
        with progress.step("images_seconds", "sample grid and class means"):
            log_images(cfg, splits.train.images.numpy(), splits.train.labels.numpy())
        pca = log_pca(cfg, splits, metrics, progress)
        tsne = log_tsne(cfg, data, pca, metrics, progress)
        tracking.log_params_safe(eda_params(cfg, tsne["n_tsne"], tsne["perplexity"]))
        metrics.update(progress.seconds, eda_seconds=time.perf_counter() - start)
        tracking.log_metrics_finite(metrics)
        summary = write_summary(cfg, metrics, counts, tsne["scores"], data.digest)
        mlflow.log_text(summary, SUMMARY)
        progress.note(f"done in {metrics['eda_seconds']:.1f} s; run {run.info.run_id}")
    return {**metrics, "run_id": run.info.run_id}


def run_eda_step(cfg: PipelineConfig, parent_run_id: str) -> dict:
    """The pipeline's eda step, a child run; ``quick`` shrinks t-SNE and the scatters."""
    eda_cfg = EdaConfig(
        common=cfg.common,
        tsne_samples=1000 if cfg.quick else STUDY_TSNE_SAMPLES,
        scatter_samples=3000 if cfg.quick else 10000,
    )
    result = run_eda(eda_cfg, parent_run_id=parent_run_id)
    keys = (
        "pca_components_90",
        "pca_components_95",
        "tsne_silhouette",
        "pca_silhouette",
        "tsne_knn5_accuracy",
        "pca_knn5_accuracy",
        "eda_seconds",
    )
    return {key: round(float(result[key]), 4) for key in keys}
