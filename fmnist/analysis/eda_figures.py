"""EDA figures (the study's Figs. 2-6) as ``matplotlib.figure.Figure`` objects.

Each function draws from arrays the ``eda`` module computed and returns a figure; no pyplot state
is touched, so nothing needs closing and nothing leaks between runs (the flow logs them).
"""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fmnist.analysis.eda import STUDY_COMPONENTS, pick_per_class
from fmnist.data import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES

COLORS = matplotlib.colormaps["tab10"].colors


def plot_class_distribution(counts: dict[str, np.ndarray]) -> Figure:
    """Grouped bars, one group per class and one bar per split (the study's Fig. 2 count plot)."""
    fig = Figure(figsize=(11, 5))
    ax = fig.subplots()
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


def plot_sample_grid(images: np.ndarray, labels: np.ndarray, columns: int, seed: int) -> Figure:
    """``columns`` seeded random images of each class, one row per class."""
    picked = pick_per_class(labels, columns, seed)
    fig = Figure(figsize=(0.95 * columns + 1.6, 0.95 * NUM_CLASSES + 0.6))
    axes = np.asarray(fig.subplots(NUM_CLASSES, columns)).reshape(NUM_CLASSES, columns)
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


def plot_class_means(means: np.ndarray) -> Figure:
    """The mean image of each class (values in [0, 1]) with one shared colour bar."""
    fig = Figure(figsize=(11, 5))
    axes = fig.subplots(2, NUM_CLASSES // 2)
    for label, ax in enumerate(axes.flat):
        shown = ax.imshow(means[label], cmap="magma", vmin=0.0, vmax=1.0)
        ax.set_title(CLASS_NAMES[label])
        ax.axis("off")
    fig.colorbar(shown, ax=axes, shrink=0.8, label="mean pixel intensity (0-1)")
    fig.suptitle("Mean training image of each class")
    return fig


def plot_cumulative_variance(cumulative: np.ndarray, marks: dict[float, int]) -> Figure:
    """The cumulative explained variance with our and the study's component counts marked."""
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
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
) -> Figure:
    """Originals (top row) over their PCA reconstructions (bottom row), pixels in [0, 1]."""
    fig = Figure(figsize=(1.25 * len(originals) + 1.2, 3.4))
    axes = np.asarray(fig.subplots(2, len(originals))).reshape(2, len(originals))
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


def scatter_by_class(ax: Axes, points: np.ndarray, labels: np.ndarray, size: float = 3.0) -> None:
    """One scatter per class, so the legend names classes; small translucent markers."""
    for label in range(NUM_CLASSES):
        members = points[labels == label]
        ax.scatter(*members.T, s=size, alpha=0.5, color=COLORS[label], label=CLASS_NAMES[label])


def add_class_legend(ax: Axes) -> None:
    ax.legend(markerscale=4, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))


def plot_pca_scatter_2d(points: np.ndarray, labels: np.ndarray, n_total: int) -> Figure:
    fig = Figure(figsize=(8.5, 6.5))
    ax = fig.subplots()
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


def plot_pca_scatter_3d(points: np.ndarray, labels: np.ndarray, n_total: int) -> Figure:
    fig = Figure(figsize=(9, 7))
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


def plot_embedding(
    ax: Axes, points: np.ndarray, labels: np.ndarray, scores: dict, name: str
) -> None:
    """A 2-D embedding by class, its silhouette and 5-NN accuracy in the title."""
    scatter_by_class(ax, points, labels, size=4.0)
    ax.set_xlabel(f"{name} 1")
    ax.set_ylabel(f"{name} 2")
    ax.set_title(
        f"{name}: silhouette {scores['silhouette']:.3f}, "
        f"5-NN accuracy {scores['knn5_accuracy']:.1%}"
    )


def plot_tsne(embedding: np.ndarray, labels: np.ndarray, scores: dict, pca_dims: int) -> Figure:
    fig = Figure(figsize=(9, 7))
    ax = fig.subplots()
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
) -> Figure:
    """The same images side by side: the 2-D PCA projection and the t-SNE map."""
    fig = Figure(figsize=(15, 6.5))
    axes = fig.subplots(1, 2)
    plot_embedding(axes[0], pca_points, labels, scores["pca"], "PCA")
    plot_embedding(axes[1], tsne_points, labels, scores["tsne"], "t-SNE")
    add_class_legend(axes[1])
    fig.suptitle(f"The same {len(labels):,} images in 2-D: PCA projection vs t-SNE")
    fig.tight_layout()
    return fig
