"""The ``eda`` entry point: the study's exploratory analysis (Figs. 2-6) in one tracked run.

``run_eda`` loads the data, makes the study's train / validation / test splits, calls
``fmnist.analysis`` (``eda`` computes, ``eda_figures`` draws, ``eda_report`` writes
``eda_summary.md``) and logs to one MLflow run tagged ``entry_point=eda``: the class distribution
(figure, table, imbalance ratios), a grid of sample images, the mean image of each class, PCA
fitted on the training split (cumulative explained variance, components for 90% / 95%, original vs
reconstructed images and the mean reconstruction error, 2-D and 3-D scatters) and t-SNE of the
first ``tsne_samples`` images of the training file, scored against PCA on the same images.
Progress notes of the slow steps are printed unless ``quiet``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
import numpy as np
from matplotlib.figure import Figure
from sklearn.decomposition import PCA

from fmnist import tracking
from fmnist.analysis import eda, eda_figures
from fmnist.analysis.eda_report import COUNTS_TABLE, FIGURES, SUMMARY, render_summary
from fmnist.config import EdaConfig
from fmnist.data import FashionMNIST, Splits, load_fashion_mnist, make_splits

SAVE_KWARGS = {"dpi": 110, "bbox_inches": "tight"}


class Progress:
    """Print the start and duration of each slow step (unless quiet) and keep the durations."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.seconds: dict[str, float] = {}

    def note(self, message: str) -> None:
        if not self.quiet:
            print(f"[eda] {message}", flush=True)

    @contextmanager
    def step(self, key: str, label: str) -> Iterator[None]:
        self.note(f"{label} ...")
        start = time.perf_counter()
        yield
        self.seconds[key] = time.perf_counter() - start
        self.note(f"{label}: done in {self.seconds[key]:.1f} s")


def log_figure(fig: Figure, key: str) -> None:
    mlflow.log_figure(fig, FIGURES[key][0], save_kwargs=SAVE_KWARGS)


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
        "knn_neighbors": eda.KNN_NEIGHBORS,
        "scatter_samples": cfg.scatter_samples,
        "grid_columns": cfg.grid_columns,
    }


def log_distribution(splits: Splits, metrics: dict) -> dict[str, np.ndarray]:
    """Log the class counts (table and figure) and their imbalance ratios; return the counts."""
    counts = eda.count_split_classes(
        {name: getattr(splits, name).labels for name in eda.SPLIT_NAMES}
    )
    mlflow.log_table(eda.counts_table(counts), COUNTS_TABLE)
    log_figure(eda_figures.plot_class_distribution(counts), "class_distribution")
    metrics.update(eda.imbalance_metrics(counts))
    return counts


def log_images(cfg: EdaConfig, images: np.ndarray, labels: np.ndarray) -> None:
    grid = eda_figures.plot_sample_grid(images, labels, cfg.grid_columns, cfg.common.seed)
    log_figure(grid, "sample_grid")
    log_figure(eda_figures.plot_class_means(eda.class_means(images, labels)), "class_means")


def log_pca_figures(
    cfg: EdaConfig, pca: PCA, features: np.ndarray, labels: np.ndarray, kept: int
) -> None:
    cumulative = eda.cumulative_variance(pca)
    marks = eda.study_marks(cumulative)
    log_figure(eda_figures.plot_cumulative_variance(cumulative, marks), "pca_cumulative_variance")
    first = eda.first_of_each_class(labels, cfg.common.seed)
    rebuilt = eda.reconstruct(pca, features[first], kept)
    log_figure(
        eda_figures.plot_reconstructions(
            features[first], rebuilt, labels[first], kept, cfg.pca_variance
        ),
        "pca_reconstruction",
    )
    shown = eda.subsample(len(features), cfg.scatter_samples, cfg.common.seed)
    points = pca.transform(features[shown])[:, :3]
    n = len(features)
    log_figure(eda_figures.plot_pca_scatter_2d(points, labels[shown], n), "pca_scatter_2d")
    log_figure(eda_figures.plot_pca_scatter_3d(points, labels[shown], n), "pca_scatter_3d")


def log_pca(cfg: EdaConfig, splits: Splits, metrics: dict, progress: Progress) -> PCA:
    """Fit PCA on the training split, log its figures, add its numbers; return the fitted PCA."""
    features, labels = eda.flatten(splits.train.images.numpy()), splits.train.labels.numpy()
    with progress.step("pca_seconds", f"PCA on {features.shape[0]:,} x {features.shape[1]}"):
        pca = eda.fit_pca(features)
    test_features = eda.flatten(splits.test.images.numpy())
    metrics.update(eda.measure_pca(pca, features, test_features, cfg.pca_variance))
    progress.note(
        f"components for 90% / 95% variance: {metrics['pca_components_90']} / "
        f"{metrics['pca_components_95']} (study: {eda.STUDY_COMPONENTS[0.90]} / "
        f"{eda.STUDY_COMPONENTS[0.95]})"
    )
    with progress.step("pca_figures_seconds", "PCA figures"):
        log_pca_figures(cfg, pca, features, labels, metrics["pca_components"])
    return pca


def log_tsne(
    cfg: EdaConfig, data: FashionMNIST, pca: PCA, metrics: dict, progress: Progress
) -> dict:
    """t-SNE of the first images of the training file; score it and PCA on the same images."""
    n_tsne = min(cfg.tsne_samples, len(data.train_labels))
    if n_tsne < cfg.tsne_samples:
        progress.note(f"only {n_tsne} images in the training file: t-SNE uses all of them")
    pixels = eda.flatten(data.train_images[:n_tsne].numpy())
    labels = data.train_labels[:n_tsne].numpy()
    projected = pca.transform(pixels)
    perplexity = eda.tsne_perplexity(n_tsne, cfg.tsne_perplexity)
    seed = cfg.common.seed
    with progress.step(
        "tsne_seconds", f"t-SNE of {n_tsne:,} images ({cfg.tsne_pca_dims} PCA dims)"
    ):
        embedding, kl = eda.run_tsne(projected[:, : cfg.tsne_pca_dims], seed, perplexity)
    with progress.step("scores_seconds", "silhouette and cross-validated 5-NN accuracy"):
        scores, scored = eda.score_embeddings(embedding, projected, pixels, labels, seed)
    metrics.update(scored, tsne_n_samples=n_tsne, tsne_kl_divergence=kl)
    progress.note(
        f"silhouette t-SNE {scored['tsne_silhouette']:.3f} vs PCA {scored['pca_silhouette']:.3f};"
        f" 5-NN accuracy {scored['tsne_knn5_accuracy']:.1%} vs {scored['pca_knn5_accuracy']:.1%}"
    )
    with progress.step("tsne_figures_seconds", "t-SNE figures"):
        figure = eda_figures.plot_tsne(embedding, labels, scores["tsne"], cfg.tsne_pca_dims)
        log_figure(figure, "tsne_2d")
        figure = eda_figures.plot_tsne_vs_pca(embedding, projected[:, :2], labels, scores)
        log_figure(figure, "tsne_vs_pca")
    return {"scores": scores, "n_tsne": n_tsne, "perplexity": perplexity}


def run_eda(cfg: EdaConfig, parent_run_id: str | None = None) -> dict[str, Any]:
    """Run the whole EDA in one MLflow run; return its metrics and ``run_id``."""
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
        summary = render_summary(cfg, metrics, counts, tsne["scores"], data.digest)
        mlflow.log_text(summary, SUMMARY)
        progress.note(f"done in {metrics['eda_seconds']:.1f} s; run {run.info.run_id}")
    return {**metrics, "run_id": run.info.run_id}
