"""The EDA's figures (the study's Figs. 2-6) as ``matplotlib.figure.Figure`` objects, drawn from
the arrays ``eda_stats`` computes; no pyplot state, so nothing needs closing."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fmnist.analysis.eda_stats import STUDY_COMPONENTS, pick_per_class
from fmnist.data import CLASS_NAMES, IMAGE_SIZE, NUM_CLASSES

COLORS = matplotlib.colormaps["tab10"].colors
CLASS_LEGEND = dict(markerscale=4, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))


def plot_class_distribution(counts: dict[str, np.ndarray]) -> Figure:
    """Grouped bars, one group per class and one bar per split (the study's Fig. 2 count plot)."""
    fig = Figure(figsize=(11, 5), layout="tight")
    ax = fig.subplots()
    width, positions = 0.8 / len(counts), np.arange(NUM_CLASSES)
    for offset, ((name, values), color) in enumerate(zip(counts.items(), COLORS, strict=False)):
        label = f"{name} ({int(values.sum()):,} images)"
        shift = (offset - (len(counts) - 1) / 2) * width
        ax.bar(positions + shift, values, width, color=color, label=label)
    ax.set_xticks(positions, CLASS_NAMES, rotation=30, ha="right")
    # head room above the bars keeps the legend off them
    top = 1.25 * max(int(values.max()) for values in counts.values())
    ax.set(xlabel="class", ylabel="number of images", ylim=(0, top))
    ax.set_title("Class distribution of the train / validation / test splits (study Fig. 2)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="split", loc="upper center", ncol=len(counts))
    return fig


def plot_sample_grid(images: np.ndarray, labels: np.ndarray, columns: int, seed: int) -> Figure:
    """``columns`` seeded random images of each class, one row per class."""
    picked = pick_per_class(labels, columns, seed)
    fig = Figure(figsize=(0.95 * columns + 1.6, 0.95 * NUM_CLASSES + 0.6), layout="tight")
    axes = np.asarray(fig.subplots(NUM_CLASSES, columns)).reshape(NUM_CLASSES, columns)
    for row, indices in enumerate(picked):
        for col in range(columns):
            axes[row, col].set(xticks=[], yticks=[])
            if col < len(indices):
                axes[row, col].imshow(images[indices[col]], cmap="gray_r", vmin=0, vmax=255)
        axes[row, 0].set_ylabel(CLASS_NAMES[row], rotation=0, ha="right", va="center")
    fig.suptitle(f"Random training images, {columns} per class (one row per class)")
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
    fig = Figure(figsize=(8, 5), layout="tight")
    ax = fig.subplots()
    counts = np.arange(1, len(cumulative) + 1)
    ax.plot(counts, cumulative * 100, color="black", label="cumulative explained variance")
    colors = ("tab:blue", "tab:red")
    for (threshold, ours), color in zip(sorted(marks.items()), colors, strict=False):
        percent, study = threshold * 100, STUDY_COMPONENTS.get(threshold)
        ax.axhline(percent, color=color, linestyle=":", linewidth=1)
        ax.axvline(ours, color=color, linestyle="--", linewidth=1)
        ax.plot([ours], [percent], "o", color=color, label=f"{threshold:.0%}: {ours} (ours)")
        if study is not None:
            label = f"{threshold:.0%}: {study} (study)"
            ax.plot([study], [percent], "x", color=color, markersize=10, label=label)
    ax.set(xscale="log", xlim=(1, len(cumulative)), ylim=(0, 101))
    ax.set_xlabel("number of principal components (log scale)")
    ax.set_ylabel("cumulative explained variance (%)")
    ax.set_title("PCA on the training split: cumulative explained variance (study Fig. 4)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return fig


def plot_reconstructions(
    originals: np.ndarray, rebuilt: np.ndarray, labels: np.ndarray, n_components: int, var: float
) -> Figure:
    """Originals (top row) over their PCA reconstructions (bottom row), pixels in [0, 1]."""
    fig = Figure(figsize=(1.25 * len(originals) + 1.2, 3.4), layout="tight")
    axes = np.asarray(fig.subplots(2, len(originals))).reshape(2, len(originals))
    for col, label in enumerate(labels):
        for ax, image in zip(axes[:, col], (originals[col], rebuilt[col]), strict=True):
            ax.imshow(image.reshape(IMAGE_SIZE, IMAGE_SIZE), cmap="gray_r", vmin=0, vmax=1)
            ax.set(xticks=[], yticks=[])
        axes[0, col].set_title(CLASS_NAMES[label], fontsize=9)
    axes[0, 0].set_ylabel("original")
    axes[1, 0].set_ylabel(f"{n_components} comp.")
    fig.suptitle(
        f"Original (top) vs PCA reconstruction from {n_components} components "
        f"({var:.0%} variance, bottom) (study Fig. 3)"
    )
    return fig


def scatter_by_class(ax: Axes, points: np.ndarray, labels: np.ndarray, size: float = 3.0) -> None:
    """One scatter per class, so the legend names classes; small translucent markers."""
    for label in range(NUM_CLASSES):
        members = points[labels == label]
        ax.scatter(*members.T, s=size, alpha=0.5, color=COLORS[label], label=CLASS_NAMES[label])


def plot_pca_scatter(points: np.ndarray, labels: np.ndarray, n_total: int, dims: int) -> Figure:
    """The first ``dims`` (2 or 3) PCA components of the shown training images, by class."""
    flat = dims == 2
    fig = Figure(figsize=(8.5, 6.5) if flat else (9, 7), layout="tight" if flat else None)
    ax = fig.add_subplot(projection=None if flat else "3d")
    scatter_by_class(ax, points[:, :dims], labels, size=3.0 if flat else 2.0)
    ax.set(**{f"{a}label": f"principal component {i + 1}" for i, a in enumerate("xyz"[:dims])})
    which, side = ("two", "left") if flat else ("three", "right")
    ax.set_title(
        f"First {which} PCA components, {len(points):,} of {n_total:,} training images "
        f"(study Fig. 5, {side})"
    )
    if flat:
        ax.legend(**CLASS_LEGEND)
        return fig
    ax.view_init(elev=20, azim=-60)
    # a legend beside a 3-D axes would cover its z label: it goes in the figure's right margin
    fig.legend(*ax.get_legend_handles_labels(), markerscale=4, fontsize=8, loc="center right")
    fig.subplots_adjust(left=0.0, right=0.82)
    return fig


def plot_embeddings(panels: dict[str, tuple], labels: np.ndarray, title: str) -> Figure:
    """Each 2-D embedding (name -> (points, scores)) by class, silhouette and 5-NN in the title."""
    fig = Figure(figsize=(15, 6.5) if len(panels) > 1 else (9, 7), layout="tight")
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (name, (points, scores)) in zip(axes, panels.items(), strict=True):
        scatter_by_class(ax, points, labels, size=4.0)
        ax.set(xlabel=f"{name} 1", ylabel=f"{name} 2")
        silhouette, knn = scores["silhouette"], scores["knn5_accuracy"]
        ax.set_title(f"{name}: silhouette {silhouette:.3f}, 5-NN accuracy {knn:.1%}")
    axes[-1].legend(**CLASS_LEGEND)
    fig.suptitle(title)
    return fig
